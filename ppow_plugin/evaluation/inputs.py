"""What an evaluation reads: the target and drafter directories, resolved, checked to fit each other, and
staged in a layout the host loads.

    target_dir = resolve_target("default")             # the prepared SmolLM2 target, or a local HF dir
    fmt = drafter_format(target_dir, drafter_dir)       # "eagle1" | "eagle3", after checking the fit
    host_dir = host_drafter_dir(drafter_dir, embed, scratch)   # EAGLE-1: a dir eagle-llm's loader takes
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ppow_plugin.drafters import export, formats
from ppow_plugin.errors import UserError


def read_config(path: Path, what: str) -> dict[str, Any]:
    if not path.is_dir():
        raise UserError(f"{what} {path} does not exist or is not a directory; pass a model directory")
    if not (path / "config.json").is_file():
        raise UserError(f"{what} {path} has no config.json; pass a model directory")
    try:
        return json.loads((path / "config.json").read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{path / 'config.json'} is not valid JSON ({exc.msg})") from None


def _attention_shape(cfg: dict[str, Any], where: str) -> dict[str, int]:
    try:
        heads = int(cfg["num_attention_heads"])
        return {"hidden_size": int(cfg["hidden_size"]), "vocab_size": int(cfg["vocab_size"]),
                "num_attention_heads": heads,
                "num_key_value_heads": int(cfg.get("num_key_value_heads") or heads),
                "head_dim": int(cfg.get("head_dim") or int(cfg["hidden_size"]) // heads)}
    except (KeyError, TypeError, ValueError) as exc:
        raise UserError(f"{where}/config.json lacks a usable Llama field ({exc}); is it a Llama config?") from None


def check_fit(target_cfg: dict[str, Any], drafter_cfg: dict[str, Any], target_where: str = "target",
              drafter_where: str = "drafter") -> None:
    """Check from the two config.json dicts that an EAGLE-1 drafter was built for this target.

    Raises:
        UserError: an EAGLE-3 drafter, or a differing hidden size, vocabulary or attention shape.
    """
    if "draft_vocab_size" in drafter_cfg or "target_hidden_size" in drafter_cfg:
        raise UserError(f"{drafter_where} is an EAGLE-3 drafter; the eagle-llm 1.2.1 host evaluates only "
                        "EAGLE-1 drafters (train one with a stage=sft recipe)")
    want, got = _attention_shape(target_cfg, target_where), _attention_shape(drafter_cfg, drafter_where)
    bad = [f"{k} {got[k]} vs target {want[k]}" for k in want if got[k] != want[k]]
    if bad:
        raise UserError(f"drafter {drafter_where} does not fit target {target_where} ({'; '.join(bad)}); "
                        "pass the target the drafter was trained for")


def resolve_target(target: str | Path) -> Path:
    """"default" -> the prepared SmolLM2 target; else a local directory with config.json."""
    from ppow_plugin.host import assets
    if str(target) == "default":
        return assets.default_target_dir(prepare=True)
    path = Path(target)
    read_config(path, "--target")
    assets.require_tokenizer(path, "--target ")
    return path


def host_drafter_dir(drafter_dir: Path, embed_weight: torch.Tensor, scratch: Path) -> Path:
    """A directory the host can load: `drafter_dir` itself if it is a host layout with embeddings, else
    a host layout written into `scratch` with the target's embeddings (compact dirs have none)."""
    config, state = formats.load_drafter_dir(drafter_dir)
    if config.get("bias", True) != ("fc.bias" in state):
        raise UserError(f"{drafter_dir}: config.json says bias={config.get('bias', True)} but the weights "
                        f"{'lack' if 'fc.bias' not in state else 'have'} fc.bias; re-export the drafter")
    if (drafter_dir / "pytorch_model.bin").is_file() and formats.EMBED_KEY in state:
        return drafter_dir
    state.pop(formats.EMBED_KEY, None)  # EAGLE-1 drafters share the target's (frozen) embeddings
    return export.write_host_eagle1(scratch / "host_drafter", state, config, embed_weight)


def drafter_format(target_dir: Path, drafter_dir: Path) -> str:
    """"eagle1" or "eagle3", read by `formats.load_drafter` (which checks an EAGLE-3 dir against the target).

    EAGLE-1 dirs are then checked by `check_fit` and the host loader, with their own messages, as before.
    Raises:
        UserError: an EAGLE-3 dir that is unreadable or does not fit the target, or an EAGLE-1 misfit.
    """
    target_cfg, drafter_cfg = read_config(target_dir, "--target"), read_config(drafter_dir, "--drafter")
    looks_eagle3 = ("draft_vocab_size" in drafter_cfg or "target_hidden_size" in drafter_cfg
                    or "LlamaForCausalLMEagle3" in (drafter_cfg.get("architectures") or []))
    try:
        fmt, read = formats.load_drafter(drafter_dir, target_cfg).format, True
    except UserError:
        if looks_eagle3:
            raise
        fmt, read = "eagle1", False
    if fmt == "eagle1":
        check_fit(target_cfg, drafter_cfg, str(target_dir), str(drafter_dir))
    if not read:  # missing, unreadable or truncated weights: refused now, not after other drafters were evaluated
        formats.read_weights(drafter_dir, [])
    return fmt


def weights_sha256(drafter_dir: Path) -> str | None:
    """`formats.weights_digest` of the evaluated drafter (what `ppow export --eval-report` checks); None when
    the strict reader refuses a dir the host loaded anyway."""
    try:
        return formats.weights_digest(formats.load_drafter(drafter_dir).state)
    except UserError:
        return None
