"""The GPU smoke check's CPU rehearsal (scripts/gpu_smoke.py --rehearsal; issue 26): the same script a GPU run
uses, at width / 16 with a 512-word vocabulary in fp32, so it cannot rot before a GPU is lent (slow, 130-150 s on
the shared 2-core machine). The CPU-vs-device comparison it makes on a GPU is checked here on its own (fast).

Can fail: the rehearsal fails on any failed check (its report names it); `compare_steps` refuses a loss 1 %
off and a gradient pointing elsewhere (`test_the_parity_bounds_refuse_what_they_should`).
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ppow_plugin.host import patching

ROOT = Path(__file__).resolve().parent.parent
CHECKS = {"build_target", "host_vs_hf", "sft", "resume", "ppow", "parity", "export", "profile"}


def smoke_module():
    spec = importlib.util.spec_from_file_location("gpu_smoke", ROOT / "scripts" / "gpu_smoke.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_parity_bounds_refuse_what_they_should():
    smoke = smoke_module()
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(30, 7, generator=gen), torch.randn(11, generator=gen)]
    near = [g + 1e-5 * torch.randn(g.shape, generator=gen) for g in grads]
    ok = smoke.compare_steps(2.0, grads, 2.0 + 1e-4, near)
    assert ok["ok"] and ok["grad_cosine"] > 0.9999, ok
    off = smoke.compare_steps(2.0, grads, 2.02, near)
    assert not off["ok"] and off["error"].startswith("loss differs: 2.0 (CPU) vs 2.02 (device)"), off
    turned = smoke.compare_steps(2.0, grads, 2.0, [grads[0], -grads[1]])
    assert not turned["ok"] and turned["error"].startswith("gradient cosine"), turned


@pytest.mark.slow
@pytest.mark.skipif(patching.patch_status().state != "patched", reason="the EAGLE host is not patched")
def test_rehearsal_passes_every_check(tmp_path):
    out = tmp_path / "smoke.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_smoke.py"), "--rehearsal", "--families",
                           "llama-3.1-8b", "--out", str(out)], env=env, capture_output=True, text=True, timeout=900)
    report = json.loads(out.read_text())
    checks = report["families"]["llama-3.1-8b"]
    failed = {k: c.get("error") for k, c in checks.items() if not c["ok"]}
    assert proc.returncode == 0 and report["ok"], failed or proc.stderr[-3000:]
    assert set(checks) == CHECKS
    assert report["device"] == "cpu" and report["dtype"] == "fp32"
    assert checks["host_vs_hf"]["max_abs_logit_diff"] <= 1e-3 and checks["export"]["tokens"] == 24
    parity = checks["parity"]  # CPU against CPU: the same numbers
    assert parity["loss_cpu"] == parity["loss_device"] and parity["grad_cosine"] > 1 - 1e-9
    assert parity["accept_len_equal_share"] == 1.0 and parity["grad_norm_cpu"] > 0
    assert "torch.distributed.run" in checks["ppow"]["launcher"] and checks["ppow"]["plan_gb"] > 0
    assert checks["profile"]["gamma"] > 0 and checks["profile"]["profile_device"] == "cpu"
    assert report["finished"] is True  # the last of the reports written after every check
