"""The GPU smoke check's CPU rehearsal (scripts/gpu_smoke.py --rehearsal; issue 26): the same script a GPU run
uses, at width / 16 with a 512-word vocabulary in fp32, so it cannot rot before a GPU is lent. ~1 min."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ppow_plugin.host import patching

ROOT = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.slow, pytest.mark.skipif(patching.patch_status().state != "patched",
                                                   reason="the EAGLE host is not patched")]


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
    assert set(checks) == {"build_target", "host_vs_hf", "sft", "resume", "ppow", "export"}
    assert report["device"] == "cpu" and report["dtype"] == "fp32"
    assert checks["host_vs_hf"]["max_abs_logit_diff"] <= 1e-3 and checks["export"]["tokens"] == 24
