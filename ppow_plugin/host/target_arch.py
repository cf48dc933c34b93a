"""A target's sizes (`TargetArch`) from its config.json alone, for `ppow plan` and `ppow validate`.

    arch, note = load_target_arch(cfg)   # model.target's config.json, else the packaged known config

Known configs: `known_configs/<name>/config.json` (package data, no weights) for the targets our recipes
name; `<name>` is the lower-cased last component of `model.target` (`default` = SmolLM2-135M-Instruct).
They stand in for a target that is not downloaded yet, and the note says so.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ppow_plugin.config import Config
from ppow_plugin.errors import UserError

_REQUIRED = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")
_OPTIONAL = ("num_key_value_heads", "head_dim", "tie_word_embeddings", "attention_bias", "max_position_embeddings",
             "model_type")  # the other config.json keys TargetArch reads (and --target-field may set)
_MAX_SIZE = 1 << 24  # any size beyond this is a typo (the widest published vocabularies are ~0.26 M)
_MAX_POSITIONS = 1 << 30
KNOWN_CONFIGS = Path(__file__).parent / "known_configs"  # package data: config.json only, no weights


@dataclass(frozen=True)
class TargetArch:
    """The numbers of a target's config.json that memory depends on."""

    hidden_size: int          # H
    num_layers: int           # L
    num_heads: int
    num_kv_heads: int         # kv
    head_dim: int             # hd
    intermediate_size: int    # I
    vocab_size: int           # V
    tie_word_embeddings: bool = False
    qkv_bias: bool = False    # Qwen2: biases on q/k/v
    qk_norm: bool = False     # Qwen3: RMSNorm on q and k per head
    max_position_embeddings: int = 2048
    model_type: str = "llama"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TargetArch":
        """From a HF config dict (a nested `text_config` is used when present).

        Raises:
            UserError: a required size is missing.
        """
        d = _text_config(d)
        missing = [k for k in _REQUIRED if d.get(k) is None]
        if missing:
            raise UserError(f"target config lacks {', '.join(missing)}; pass --target-config or --target-field")
        size = lambda key, default=None, top=_MAX_SIZE: _size(d, key, default, top)  # noqa: E731
        flag = lambda key, default: _flag(d, key, default)  # noqa: E731
        model_type = d.get("model_type") or "llama"
        if not isinstance(model_type, str):
            raise UserError(f"target config model_type ({model_type!r}) must be a string, e.g. llama")
        heads, hidden = size("num_attention_heads"), size("hidden_size")
        arch = cls(
            hidden_size=hidden, num_layers=size("num_hidden_layers"), num_heads=heads,
            num_kv_heads=size("num_key_value_heads", heads), head_dim=size("head_dim", max(hidden // heads, 1)),
            intermediate_size=size("intermediate_size"), vocab_size=size("vocab_size"),
            tie_word_embeddings=flag("tie_word_embeddings", False),
            qkv_bias=flag("attention_bias", model_type == "qwen2"), qk_norm=model_type == "qwen3",
            max_position_embeddings=size("max_position_embeddings", 2048, _MAX_POSITIONS),
            model_type=model_type,
        )
        if arch.num_heads % arch.num_kv_heads:
            raise UserError(f"target config num_attention_heads ({arch.num_heads}) must be a multiple of "
                            f"num_key_value_heads ({arch.num_kv_heads})")
        return arch


def _text_config(d: Any) -> dict[str, Any]:
    """The decoder's config: `d` itself or its nested `text_config` (multimodal checkpoints)."""
    if not isinstance(d, dict):
        raise UserError(f"target config must be a JSON object, got {type(d).__name__}")
    inner = d.get("text_config", d)
    return inner if isinstance(inner, dict) else d


def _size(d: dict[str, Any], key: str, default: int | None, top: int) -> int:
    value = d.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= top:
        raise UserError(f"target config {key} ({value!r}) must be an integer in [1, {top}]; "
                        "fix the config.json or --target-field")
    return value


def _flag(d: dict[str, Any], key: str, default: bool) -> bool:
    value = d.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise UserError(f"target config {key} ({value!r}) must be true or false")
    return value


def load_target_arch(cfg: Config, target_config: str | None = None,
                     fields: list[str] | None = None) -> tuple[TargetArch, str | None]:
    """The target's sizes, and a one-line note when they come from a packaged known config.

    config.json from `target_config` (file or dir), else from `model.target`, else (the target is not
    there yet) the known config of the same name; then the `key=value` fields on top.

    Raises:
        UserError: an unreadable config.json, no config and not every required size given as a field,
            a field that is not a known key (with the nearest one) or not a valid value.
    """
    raw: dict[str, Any] = {}
    note = None
    if target_config is not None:
        raw = _read_config_json(Path(target_config), "--target-config")
    else:
        source = _recipe_config_json(cfg)
        known = known_config(cfg.model.target)
        if _is_file(source):
            raw = _read_config_json(source, "model.target")
        elif known is not None:
            raw = _read_config_json(known, "known config")
            note = (f"note: model.target={cfg.model.target} has no config.json here; sizes from the packaged "
                    f"known config {known.parent.name} ({known})")
        elif not fields:
            names = ", ".join(sorted(p.name for p in KNOWN_CONFIGS.iterdir() if p.is_dir()))
            raise UserError(f"no config.json at {source}; pass --target-config PATH, the sizes with --target-field "
                            f"key=value, or a model.target named like a known config ({names})")
    _apply_fields(_text_config(raw) if raw else raw, fields or [])
    return TargetArch.from_dict(raw), note


def check_against_target(cfg: Config, a: TargetArch) -> None:
    """What a recipe says that its target's sizes bound.

    Raises:
        UserError: model.draft_vocab_size above the target's vocabulary; data.max_len plus the PPOW tree
            (G·K + 1 positions) beyond the target's max_position_embeddings.
    """
    vd = cfg.model.draft_vocab_size
    if vd is not None and vd > a.vocab_size:
        raise UserError(f"model.draft_vocab_size ({vd}) exceeds the target's vocabulary ({a.vocab_size}); "
                        "lower it, or null for the full vocabulary")
    tree = cfg.rollout.group_size * cfg.rollout.window + 1 if cfg.stage == "ppow" else 0
    if cfg.data.max_len + tree > a.max_position_embeddings:
        raise UserError(f"data.max_len ({cfg.data.max_len})" + (f" + the {tree}-position rollout tree" if tree else "")
                        + f" exceeds the target's max_position_embeddings ({a.max_position_embeddings}); "
                        f"lower data.max_len to {a.max_position_embeddings - tree} or less")


def known_config(target: str) -> Path | None:
    """The packaged config.json whose name is `target`'s last path component, lower-cased (or None).

    `default` is the embedded SmolLM2 target.
    """
    name = "smollm2-135m-instruct" if target == "default" else Path(target.rstrip("/\\")).name.lower()
    p = KNOWN_CONFIGS / name / "config.json"
    return p if name and _is_file(p) else None


def _is_file(p: Path) -> bool:
    """`p.is_file()`, False also where the OS refuses to look (a name too long, no permission)."""
    try:
        return p.is_file()
    except OSError:
        return False


def _apply_fields(raw: dict[str, Any], fields: list[str]) -> None:
    """`--target-field key=value` items onto a config dict; a value is JSON (4096, true) or a bare word."""
    keys = (*_REQUIRED, *_OPTIONAL)
    for item in fields:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep:
            raise UserError(f"--target-field {item!r} must look like hidden_size=4096")
        if key not in keys:
            near = difflib.get_close_matches(key, keys, n=1)
            hint = f"did you mean {near[0]}?" if near else f"choose from {', '.join(keys)}"
            raise UserError(f"--target-field {item!r}: unknown key {key!r}; {hint}")
        try:
            raw[key] = json.loads(text) if text.strip() not in ("", "None") else None
        except ValueError:
            raw[key] = text.strip()  # a bare word (model_type=qwen3); the sizes' checks refuse others


def _read_config_json(p: Path, what: str) -> dict[str, Any]:
    p = p / "config.json" if not _is_file(p) else p
    if not _is_file(p):
        raise UserError(f"{what}: no config.json at {str(p)[:200]}; pass --target-config PATH (a config.json or its "
                        "dir) or the sizes with --target-field key=value")
    try:
        raw = json.loads(p.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise UserError(f"{what}: {p} is not a readable JSON file ({type(exc).__name__}); point to a "
                        "config.json") from None
    if not isinstance(raw, dict):
        raise UserError(f"{what}: {p} holds a JSON {type(raw).__name__}, not a config object")
    return raw


def _recipe_config_json(cfg: Config) -> Path:
    if cfg.model.target != "default":
        return Path(cfg.model.target) / "config.json"
    from ppow_plugin.host import assets  # the cached SmolLM2 dir; never prepared (no download) by `plan`
    return assets.cache_dir() / "targets" / assets.SMOLLM2_135M.name / "config.json"
