"""Load a `ppow export --format speculators` directory with the real `speculators` library (run with the
python of the venv `scripts/speculators_venv.sh` builds; it cannot import ppow_plugin: other transformers).

    python tests/speculators_load.py EXPORT INPUTS.safetensors RESULT.json

INPUTS holds `features` [1, T, 3H] fp32 and `next_ids` [1, T] int64 (ppow's `eagle3.ttt_unroll` inputs).
The target is found the way a serving machine finds it: from `speculators_config.verifier.name_or_path`
(the caller points HF_HUB_CACHE at a cache holding it, offline). Writes RESULT.json: the class built, the
dtype loaded, stored tensors loaded bit for bit, unexpected / missing keys, and the first-step draft
logits [1, T, Vd] (fp32, model cast up) per attention implementation into RESULT.json's sibling
`logits_<impl>.safetensors`.
"""

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from speculators import SpeculatorModel, SpeculatorModelConfig

VERIFIER_OWNED = {"embed_tokens.weight", "verifier_lm_head.weight", "verifier_norm.weight"}  # from the target
ATTENTION = ("sdpa", "eager", "simple_flex_attention")  # the last is speculators' default


def first_step_logits(model, features: torch.Tensor, next_ids: torch.Tensor) -> torch.Tensor:
    """The draft logits of TTT step 0 ([1, T, Vd]): the lm_head output of a one-step forward at positions
    0..T-1 (ppow's; speculators' own default starts at 1), one document."""
    seen = []
    hook = model.lm_head.register_forward_hook(lambda mod, args, out: seen.append(out.detach()))
    t = next_ids.shape[1]
    with torch.no_grad():
        model(hidden_states=features, input_ids=next_ids, document_ids=torch.zeros_like(next_ids),
              position_ids=torch.arange(t)[None], ttt_steps=1)
    hook.remove()
    return seen[0].float()


def main(export: str, inputs: str, result: str) -> None:
    stored = load_file(str(Path(export) / "model.safetensors"))
    data = load_file(inputs)
    report = {"tensors_stored": len(stored)}
    for impl in ATTENTION:
        config = SpeculatorModelConfig.from_pretrained(export)
        config.transformer_layer_config._attn_implementation = impl
        model = SpeculatorModel.from_pretrained(export, config=config).eval()
        if impl == ATTENTION[0]:  # what was loaded, as loaded (before the cast to fp32)
            state = model.state_dict()
            equal = [k for k, v in stored.items() if k in state and torch.equal(state[k].cpu(), v.to(state[k].dtype))]
            report.update(
                model_class=type(model).__name__, config_class=type(config).__name__,
                loaded_dtype=str(next(model.parameters()).dtype).removeprefix("torch."),
                verifier=config.speculators_config.verifier.name_or_path,
                tensors_loaded_equal=len(equal), unexpected=sorted(set(stored) - set(state)),
                missing=sorted(set(state) - set(stored) - VERIFIER_OWNED),
                verifier_owned_finite=all(bool(torch.isfinite(state[k]).all()) for k in VERIFIER_OWNED if k in state))
        logits = first_step_logits(model.float(), data["features"], data["next_ids"])
        save_file({"logits": logits.contiguous()}, str(Path(result).parent / f"logits_{impl}.safetensors"))
    Path(result).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main(*sys.argv[1:4])
