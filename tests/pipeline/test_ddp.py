"""Two processes under torchrun (gloo): one epoch of warmup and of S4MIM training; ranks agree."""

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import TINY_OVERRIDES

ROOT = Path(__file__).resolve().parents[2]


def test_two_process_ddp_with_torchrun(tiny_shapes, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        str(ROOT / "tests" / "pipeline" / "ddp_fit.py"), str(tmp_path / "out"), str(tmp_path / "runs"),
        *TINY_OVERRIDES, f'data.root="{tiny_shapes}"', "data.split=1/2", "unimatch.threshold=0.5",
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / "out" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["world"] == ranks[1]["world"] == 2
    assert ranks[0]["warmup"] == ranks[1]["warmup"]
    assert ranks[0]["train"] == ranks[1]["train"]
    # 20 labeled images, batch 4, 2 ranks: 2 steps each; the epoch is shared, not repeated.
    assert ranks[0]["warmup_steps"] == 2
