"""(slow) Every committed drafter's recorded τ check reproduces from this clone.

Each `assets/drafters/*/provenance.json` with a `tau_check` records a `ppow eval --simulate` command and
what it measured (new tokens and cycles: integers, so the check is exact) for the committed weights (stored
fp16 by `scripts/slim_drafter.py`; an `fp32` entry, where recorded, is what the run's fp32 weights measured).
The test runs that command on the prepared embedded target and compares. Can fail: the same command on a
copy of the drafter with its weights nudged (0.3 std of noise per tensor) measures something else, and the
test says so.
"""

import json
import shlex
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ppow_plugin import cli
from ppow_plugin.host import assets
from ppow_plugin.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
# Retired drafters (RETIRED.md, weights in git history only: tests/test_tree_size.py) keep their record only.
CHECKED = sorted(p.parent for p in (ROOT / "assets" / "drafters").glob("*/provenance.json")
                 if "tau_check" in json.loads(p.read_text()) and not (p.parent / "RETIRED.md").exists())


def _measure(check: dict, drafter: Path, out: Path) -> tuple[int, int]:
    argv = shlex.split(check["command"])
    assert argv[:2] == ["ppow", "eval"] and "--simulate" in argv, check["command"]
    argv = argv[1:]
    argv[argv.index("--drafter") + 1] = str(drafter)
    assert cli.main(argv + ["--out", str(out)]) == 0
    overall = json.loads((out / "report.json").read_text())["stats"]["overall"]
    return overall["new_tokens"], overall["cycles"]


@pytest.mark.slow
def test_some_committed_drafter_records_a_tau_check():
    assert CHECKED, "no committed drafter records a tau_check in its provenance.json"


@pytest.mark.slow
@pytest.mark.parametrize("drafter", CHECKED, ids=[p.name for p in CHECKED])
def test_the_recorded_tau_check_reproduces(drafter: Path, tmp_path: Path):
    try:
        assets.default_target_dir(prepare=False)
    except UserError:
        pytest.skip("the embedded target is not prepared (ppow prepare)")
    check = json.loads((drafter / "provenance.json").read_text())["tau_check"]
    got = _measure(check, drafter, tmp_path / "eval")
    assert got == (check["new_tokens"], check["cycles"]), f"{drafter.name}: measured {got}, recorded {check}"
    assert round(got[0] / got[1], 4) == round(check["tau"], 4)
    # Can fail: a nudged copy of the drafter is measured differently by the same command.
    nudged = tmp_path / "nudged"
    shutil.copytree(drafter, nudged)
    weights = load_file(nudged / "model.safetensors")
    gen = torch.Generator().manual_seed(0)
    save_file({k: v + 0.3 * v.std() * torch.randn(v.shape, generator=gen) if v.is_floating_point() and v.numel() > 1
               else v for k, v in weights.items()}, nudged / "model.safetensors")
    assert _measure(check, nudged, tmp_path / "eval-nudged") != got
