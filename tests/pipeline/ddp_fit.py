"""Run under torchrun: warmup then S4MIM training for one epoch each, on every rank.

Each rank writes the val mIoU it computed to OUT/rank<N>.json, so a test can check they agree.
"""

import json
import sys
from pathlib import Path

import torch.distributed as dist

from pipeline.local import LocalContext, init_distributed
from pipeline.prepare import prepare_stage
from pipeline.presets import load_preset
from pipeline.stages import StageInputs, fit


def main() -> None:
    out, runs = Path(sys.argv[1]), Path(sys.argv[2])
    config = load_preset("shapes-1/8", sys.argv[3:])
    rank, world, device = init_distributed()
    if rank == 0:
        prepare_stage(config, runs)
    dist.barrier()
    prepared = prepare_stage(config, runs)
    record = {"world": world}
    init = None
    for stage in ("warmup", "train"):
        folder = out / stage
        ctx = LocalContext(stage, folder, rank, world, device, 1)
        result = fit(config, stage, StageInputs(prepared.manifest, prepared.split_dir, init), ctx)
        record[stage] = result["metrics"]["val/miou"]
        record[f"{stage}_steps"] = result["steps_per_epoch"]
        init = folder / "last.pt"
    (out / f"rank{rank}.json").write_text(json.dumps(record))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
