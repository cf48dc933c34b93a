"""Precision (issue 26): no bf16 training without fp32 master weights, and one rule for the weights an export
writes: the fp32 masters, for a live run's drafter and for `ppow export` of its checkpoint alike."""

import os

import pytest
import torch

from ppow_plugin import cli
from ppow_plugin.drafters import formats
from ppow_plugin.host import patching
from ppow_plugin.config import load_config
from ppow_plugin.errors import UserError
from tiny import run_trainer


def test_torch_engine_with_bf16_parameters_is_refused():
    with pytest.raises(UserError, match=r"dist.dtype \('bf16'\) must be fp32 with dist.engine=torch .* use "
                                        r"dist.engine=deepspeed for bf16 \(fp32 masters\) or dist.dtype=fp32"):
        load_config(None, ["dist.engine=torch", "dist.dtype=bf16"])
    load_config(None, ["dist.engine=deepspeed", "dist.dtype=bf16"])
    load_config(None, ["dist.engine=torch", "dist.dtype=fp32", "dist.target_dtype=bf16"])  # a bf16 target is fine


def test_zero0_with_bf16_parameters_is_refused():
    """DeepSpeed's ZeRO-0 bf16 path keeps its fp32 masters where no export reads them (measured: both exports
    wrote bf16 values)."""
    with pytest.raises(UserError, match=r"dist.zero_stage \(0\) must be >= 1 with dist.dtype=bf16 .* use "
                                        r"dist.zero_stage=2"):
        load_config(None, ["dist.engine=deepspeed", "dist.dtype=bf16", "dist.zero_stage=0"])
    load_config(None, ["dist.engine=deepspeed", "dist.dtype=fp32", "dist.zero_stage=0"])


@pytest.mark.skipif(patching.patch_status().state != "patched", reason="the EAGLE host is not patched")
@pytest.mark.parametrize("zero", [1, 2, 3])
def test_live_export_and_checkpoint_export_write_the_same_fp32_masters(tmp_path, zero):
    """A bf16 DeepSpeed run: its `drafter/` equals `ppow export` of its final checkpoint, bit for bit, and those
    weights are the fp32 masters (most are not bf16 values, which the bf16 module copy upcast would be)."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    t, before, _, live_dir = run_trainer(tmp_path, "sft", engine="deepspeed",
                                         **{"dist.dtype": "bf16", "dist.zero_stage": zero, "run.max_steps": 2,
                                            "optim.lr": 2e-4})
    ckpt = tmp_path / "run-sft" / "checkpoints" / "step-000002"
    out = tmp_path / "exported"
    assert cli.main(["export", str(ckpt), str(out), "--format", "eagle1-compact"]) == 0
    _, live = formats.load_drafter_dir(live_dir)
    _, exported = formats.load_drafter_dir(out)
    assert live.keys() == exported.keys()
    for k in live:
        assert live[k].dtype == torch.float32 and torch.equal(live[k], exported[k]), k
    trained = [k for k in live if k in before and not torch.equal(live[k], before[k].float())]
    assert trained, "the run did not change the drafter"
    off_grid = sum(int((live[k] != live[k].bfloat16().float()).sum()) for k in trained)
    assert off_grid > 0, "every exported weight is a bf16 value: the bf16 module copy was exported, not the masters"
