"""Two processes on gloo under torchrun: the same tiny PPOW run trains, writes one checkpoint and one
drafter, and ranks stay in sync (ZeRO-2 and ZeRO-3)."""

import json
import os
import subprocess
import sys

import pytest

from ppow_plugin import patching
from tiny import recipe_file

pytestmark = pytest.mark.distributed
if patching.patch_status().state != "patched":
    pytest.skip("the EAGLE host is not installed and patched (`ppow patch apply`)", allow_module_level=True)


def torchrun(tmp_path, args, port):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           "-m", "ppow_plugin.cli", *args]
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("zero", [2, 3])
def test_two_process_sft_then_ppow(tmp_path, zero):
    sft = recipe_file(tmp_path, "sft", "deepspeed", **{"run.max_steps": 2, "dist.zero_stage": zero})
    res = torchrun(tmp_path, ["sft", str(sft)], 29611 + zero)
    assert res.returncode == 0, res.stderr[-3000:]
    ppow = recipe_file(tmp_path, "ppow", "deepspeed", **{"run.max_steps": 2, "dist.zero_stage": zero,
                                       "model.drafter": tmp_path / "run-sft" / "drafter"})
    res = torchrun(tmp_path, ["train", str(ppow)], 29621 + zero)
    assert res.returncode == 0, res.stderr[-3000:]
    run = tmp_path / "run-ppow"
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(r["loss"] is not None for r in rows)  # logged once (rank 0)
    ckpt = sorted((run / "checkpoints").iterdir())[-1]
    assert (ckpt / "trainer_state_rank0.pt").is_file() and (ckpt / "trainer_state_rank1.pt").is_file()
    assert (run / "drafter" / "model.safetensors").is_file()
