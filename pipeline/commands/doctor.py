"""``s4mim doctor``: what this machine and cluster offer, and what is missing."""

from __future__ import annotations

import os
import platform

from pipeline.console import say
from pipeline.paths import data_dir, runs_dir
from pipeline.paths import ray_address as resolve_address


def run_doctor(ray_address: str | None, tracking: str | None) -> int:
    problems = 0

    def check(label: str, fn) -> None:
        nonlocal problems
        try:
            say(f"  ok    {label}: {fn()}")
        except Exception as exc:  # every finding is reported, none stops the rest
            problems += 1
            say(f"  FAIL  {label}: {' '.join(str(exc).split())}")

    import torch
    import torchvision

    say("s4mim doctor")
    say(f"  ok    python {platform.python_version()}, torch {torch.__version__}, torchvision {torchvision.__version__}")
    if torch.cuda.is_available():
        names = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        say(f"  ok    CUDA {torch.version.cuda}: {torch.cuda.device_count()} GPU(s): {names}")
    else:
        say(f"  info  no CUDA GPU: training runs on CPU ({os.cpu_count()} cores, gloo)")

    from pipeline.backends.ray_train import check_storage, storage_path
    from pipeline.tracking.runs import check_tracking_uri, tracking_uri

    runs = runs_dir()
    storage = storage_path(runs)
    check(f"storage {storage}", lambda: (check_storage(storage), "writable")[1])
    uri = tracking_uri(None, tracking)
    check(f"MLflow {uri}", lambda: (check_tracking_uri(uri), "answers")[1])

    address = resolve_address(ray_address)
    if address:
        check(f"Ray cluster {address}", lambda: _cluster(address))
    else:
        say(
            f"  info  Ray: no cluster named (--ray-address / RAY_ADDRESS); a local Ray uses this machine's "
            f"{os.cpu_count()} CPUs"
        )

    for name in ("shapes", "voc", "cityscapes", "custom"):
        root = data_dir() / name
        if root.exists():
            check(f"dataset {name} at {root}", lambda name=name, root=root: _dataset(name, root))
        else:
            say(f"  info  dataset {name}: not at {root} (pass --data-root, or set S4MIM_DATA)")
    say("all checks passed" if not problems else f"{problems} check(s) failed")
    return 0 if not problems else 1


def _cluster(address: str) -> str:
    import ray

    from pipeline.backends.ray_train import connect

    connect(address)
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    parts = []
    for n in nodes:
        r = n["Resources"]
        parts.append(f"{n['NodeManagerAddress']} ({r.get('CPU', 0):g} CPU, {r.get('GPU', 0):g} GPU)")
    return f"{len(nodes)} node(s): " + "; ".join(parts)


def _dataset(name: str, root) -> str:
    from data_prep.readers import read_dataset

    index = read_dataset(name, root)
    train = sum(s.split == "train" for s in index.samples)
    return f"{train} train, {len(index.samples) - train} val images, {index.num_classes} classes"
