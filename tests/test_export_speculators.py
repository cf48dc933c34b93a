"""Opt-in: a `speculators` export loads in the real `speculators` library and computes ppow's logits.

    bash scripts/speculators_venv.sh /work/venvs/speculators        # once: speculators 0.9.0, CPU torch
    PPOW_SPECULATORS_PYTHON=/work/venvs/speculators/bin/python pytest -q tests/test_export_speculators.py

Skipped unless PPOW_SPECULATORS_PYTHON names that venv's python (speculators pins transformers <= 5.19, so it
cannot share the project's venv) and the default target is prepared (`ppow prepare`). The committed fp16
EAGLE-3 drafter is exported as a serving user would (`ppow export ... --format speculators`, target named
by its hub id), the target is laid out as a Hugging Face cache entry under that id (what the serving machine
has; offline), and `tests/speculators_load.py` loads the export with `SpeculatorModel.from_pretrained` in
the other venv. docs/export.md records the figures of a run.
"""

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ppow_plugin.drafters import adapters, eagle3, export
from ppow_plugin.host import assets
from ppow_plugin.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
SMOL_E3 = ROOT / "assets" / "drafters" / "smollm2-135m-eagle3-sft-gen"
HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
PYTHON = os.environ.get("PPOW_SPECULATORS_PYTHON", "")
TOLERANCE = {"sdpa": 1e-5, "eager": 1e-4, "simple_flex_attention": 1e-4}  # max |logit diff| in fp32; |logits| <~ 10

pytestmark = pytest.mark.skipif(not (PYTHON and Path(PYTHON).is_file()),
                                reason="set PPOW_SPECULATORS_PYTHON (bash scripts/speculators_venv.sh)")


def _target_dir() -> Path:
    try:
        return assets.default_target_dir(prepare=False)
    except UserError:
        pytest.skip("the default target is not prepared (ppow prepare)")


def _hub_cache(root: Path, target_dir: Path) -> Path:
    """`root` as HF_HUB_CACHE holding `target_dir` under HUB_ID, as a download would leave it."""
    revision = "0" * 40
    repo = root / ("models--" + HUB_ID.replace("/", "--"))
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    for f in target_dir.iterdir():
        if f.is_file():
            (snapshot / f.name).symlink_to(f.resolve())
    return root


def _inputs(target_dir: Path, config: dict) -> tuple[torch.Tensor, torch.Tensor, torch.nn.Module]:
    """Real target features for a short text ([1, T, 3H] fp32), the next tokens ([1, T]), the target."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(target_dir)
    target = AutoModelForCausalLM.from_pretrained(target_dir, dtype=torch.float32).eval()
    ids = tok("Speculative decoding drafts several tokens and the target verifies them in one pass.",
              return_tensors="pt").input_ids
    with torch.no_grad():
        hidden = target(ids, output_hidden_states=True).hidden_states
    features = eagle3.target_features(hidden, config["eagle_aux_hidden_state_layer_ids"])
    return features[:, :-1].contiguous(), ids[:, 1:].contiguous(), target


def test_speculators_library_loads_the_export_and_matches_ttt_unroll(tmp_path: Path) -> None:
    target_dir = _target_dir()
    out, _ = export.export(SMOL_E3, tmp_path / "export", "speculators")  # named by the hub id, fp16 kept
    config = json.loads((out / "config.json").read_text())
    assert config["speculators_config"]["verifier"]["name_or_path"] == HUB_ID
    features, next_ids, target = _inputs(target_dir, config)
    save_file({"features": features, "next_ids": next_ids}, str(tmp_path / "inputs.safetensors"))
    drafter = adapters.load_eagle3_drafter(out, target).eval()  # ppow's reading of the same files, cast to fp32
    with torch.no_grad():
        ours = eagle3.ttt_unroll(drafter, features, next_ids, 1)[0]
    env = dict(os.environ, HF_HUB_CACHE=str(_hub_cache(tmp_path / "hub", target_dir)), HF_HUB_OFFLINE="1",
               OMP_NUM_THREADS="1")
    proc = subprocess.run([PYTHON, str(ROOT / "tests" / "speculators_load.py"), str(out),
                           str(tmp_path / "inputs.safetensors"), str(tmp_path / "result.json")],
                          env=env, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "result.json").read_text())
    stored = load_file(str(out / "model.safetensors"))
    assert result["model_class"] == "Eagle3DraftModel" and result["verifier"] == HUB_ID
    assert result["tensors_loaded_equal"] == result["tensors_stored"] == len(stored)  # every tensor, bit for bit
    assert result["unexpected"] == [] and result["missing"] == [] and result["verifier_owned_finite"]
    assert result["loaded_dtype"] == "float16"  # as stored (and as config.json says)
    diffs = {}
    for impl, tol in TOLERANCE.items():
        theirs = load_file(str(tmp_path / f"logits_{impl}.safetensors"))["logits"]
        assert theirs.shape == ours.shape
        diffs[impl] = float((theirs - ours).abs().max())
        assert diffs[impl] <= tol, (impl, diffs)
    print(f"\nspeculators: {result['tensors_loaded_equal']}/{result['tensors_stored']} tensors loaded equal, "
          f"dtype {result['loaded_dtype']}, max |logit diff| vs ttt_unroll step 0 over {tuple(ours.shape)}: "
          + ", ".join(f"{k} {v:.3g}" for k, v in diffs.items())
          + f"; |logits| max {float(ours.abs().max()):.3g}")
