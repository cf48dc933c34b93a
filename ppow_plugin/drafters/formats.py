"""Drafter formats: read any EAGLE drafter directory strictly, detect its format, check every key and shape.

    drafter = load_drafter("yuhuili/EAGLE3-...", target_config="targets/llama3"); print(drafter.describe())
    config, state = load_drafter_dir("runs/sft/drafter")   # config.json + weights, unchecked

Formats (docs/export.md has the key tables and which engine reads which):
- `eagle1`: host layout, `config.json` + fp32 `pytorch_model.bin` with `embed_tokens.weight`.
- `eagle1-compact`: what training writes, `config.json` + `model.safetensors` without the embeddings
  (they are the target's, frozen) + `ppow_meta.json`.
- `eagle3`: `config.json` (`LlamaForCausalLMEagle3`) + `model.safetensors` with exactly the EAGLE-3 keys.
- `speculators`: vLLM's speculators layout of the same drafter: nested `config.json`
  (`speculators_model_type: eagle3`, sizes under `transformer_layer_config`) + `layers.0.*` safetensors;
  read by flattening the config (`host_configs.from_speculators`).

Rules:
1. The format is detected from the weights' keys, never from file names. Variant EAGLE-3 layer names
   (`midlayer.0.`, `midlayers.0.`, `layers.0.`) are normalised to `midlayer.` and the user is told.
2. Every key and shape is checked against the drafter's config and, when given, the target's. Missing,
   misnamed or extra keys raise `UserError`; nothing is dropped silently (the one dropped kind,
   `rotary_emb.inv_freq` buffers, is listed in the notes).
3. A reduced EAGLE-3 vocabulary without `d2t` is refused: engines would map draft ids to the first N
   target ids and acceptance collapses.

Writing these formats is `export.py`'s.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ppow_plugin.host import host_configs
from ppow_plugin.errors import UserError

EMBED_KEY = "embed_tokens.weight"
FORMATS = ("eagle1", "eagle1-compact", "eagle3", "speculators")
_EAGLE3_LAYER_PREFIXES = ("midlayer.0.", "midlayers.0.", "layers.0.", "midlayer.")  # -> "midlayer."
_DROPPABLE_SUFFIX = "rotary_emb.inv_freq"  # recomputed by every loader; EAGLE's trainer saves it anyway


# --------------------------------------------------------------------------------------------------
# Reading weight files


def load_drafter_dir(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read `config.json` and the weights (single or sharded safetensors, or .bin) of a drafter dir."""
    p = Path(path)
    config = _read_config(p)
    state, _ = read_weights(p, [])
    return config, state


def _read_config(p: Path, notes: list[str] | None = None) -> dict[str, Any]:
    """config.json as a flat Llama drafter config (a speculators config is flattened and said so in `notes`)."""
    config = _read_json_config(p)
    if host_configs.is_speculators(config):
        config = host_configs.from_speculators(config, where=str(p / "config.json"))
        if notes is not None:
            notes.append("read a vLLM speculators config (transformer_layer_config flattened)")
    return config


def _read_json_config(p: Path) -> dict[str, Any]:
    if not p.is_dir():
        raise UserError(f"drafter dir {p} does not exist or is not a directory; pass an EAGLE drafter directory")
    if not (p / "config.json").is_file():
        raise UserError(f"drafter dir {p} has no config.json; pass an EAGLE drafter directory")
    try:
        config = json.loads((p / "config.json").read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{p / 'config.json'} is not valid JSON ({exc.msg})") from None
    if not isinstance(config, dict):
        raise UserError(f"{p / 'config.json'} must hold a JSON object")
    return config


def _load_one(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as exc:
            raise UserError(f"{path} is unreadable or truncated ({str(exc)[:80]}); re-export it") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for truncated zip/pickle data
        raise UserError(f"{path} is unreadable or truncated ({type(exc).__name__}); re-export it") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path} is not a flat state dict of tensors")
    return state


def read_weights(p: Path, notes: list[str]) -> tuple[dict[str, torch.Tensor], list[Path]]:
    """Weights of a drafter dir: `model.safetensors`, its sharded index, `pytorch_model.bin` or its index.

    Returns the merged state dict and the files read (for hashing). Raises UserError on a missing shard,
    a key the index and the shards disagree on, or a truncated file.
    """
    for name in ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json"):
        if not (p / name).is_file():
            continue
        others = [n for n in ("model.safetensors", "pytorch_model.bin") if n != name and (p / n).is_file()]
        if others:
            notes.append(f"both {name} and {others[0]} exist; read {name} (EAGLE main prefers "
                         "pytorch_model.bin: delete the stale one)")
        if not name.endswith(".index.json"):
            return _load_one(p / name), [p / name]
        return _read_sharded(p / name)
    retired = p / "RETIRED.md"  # a committed drafter whose weights live in git history only: say how to restore
    if retired.is_file():
        restore = next((ln.strip() for ln in retired.read_text().splitlines() if ln.strip().startswith("git ")), "")
        raise UserError(f"drafter dir {p} is retired (its weights are out of the tree, see {retired}); restore "
                        f"them with: {restore or 'the command in ' + str(retired)}")
    raise UserError(f"drafter dir {p} has no model.safetensors, pytorch_model.bin or shard index")


def _read_sharded(index: Path) -> tuple[dict[str, torch.Tensor], list[Path]]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise UserError(f"{index} is not a shard index (needs a \"weight_map\")") from None
    files = [index.parent / f for f in sorted(set(weight_map.values()))]
    state: dict[str, torch.Tensor] = {}
    for f in files:
        if not f.is_file():
            raise UserError(f"{index} names shard {f.name}, which is missing")
        state.update(_load_one(f))
    if set(state) != set(weight_map):
        diff = sorted(set(state) ^ set(weight_map))[:4]
        raise UserError(f"{index} and its shards disagree on keys {diff}; re-shard the checkpoint")
    return state, files


# --------------------------------------------------------------------------------------------------
# Layouts: the exact key -> shape sets


class Dims(NamedTuple):
    hidden: int         # H: drafter width
    intermediate: int   # MLP width
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int          # V: target vocabulary
    layers: int         # EAGLE-1 decoder layers (EAGLE-3: always 1)
    draft_vocab: int    # EAGLE-3 lm_head rows (== vocab when not reduced)
    target_hidden: int  # EAGLE-3 width of each of the 3 target features


def config_dims(config: dict[str, Any], fmt: str, where: str = "drafter") -> Dims:
    """Sizes from a drafter `config.json`. Raises UserError naming the dir and a missing field."""
    def need(key: str) -> int:
        if not isinstance(config.get(key), int):
            raise UserError(f"{where}: {fmt} config.json lacks an integer \"{key}\"; it must list the Llama sizes "
                            "(flat, or a speculators config with transformer_layer_config)")
        return config[key]

    hidden, heads = need("hidden_size"), need("num_attention_heads")
    vocab = need("vocab_size")
    return Dims(hidden=hidden, intermediate=need("intermediate_size"), heads=heads,
                kv_heads=config.get("num_key_value_heads") or heads,
                head_dim=config.get("head_dim") or hidden // heads, vocab=vocab,
                layers=config.get("num_hidden_layers", 1) if fmt == "eagle1" else 1,
                draft_vocab=config.get("draft_vocab_size") or vocab,
                target_hidden=config.get("target_hidden_size") or hidden)


def _layer_shapes(prefix: str, d: Dims, attn_in: int) -> dict[str, tuple[int, ...]]:
    q, kv = d.heads * d.head_dim, d.kv_heads * d.head_dim
    shapes = {f"{prefix}self_attn.q_proj.weight": (q, attn_in), f"{prefix}self_attn.k_proj.weight": (kv, attn_in),
              f"{prefix}self_attn.v_proj.weight": (kv, attn_in), f"{prefix}self_attn.o_proj.weight": (d.hidden, q),
              f"{prefix}mlp.gate_proj.weight": (d.intermediate, d.hidden),
              f"{prefix}mlp.up_proj.weight": (d.intermediate, d.hidden),
              f"{prefix}mlp.down_proj.weight": (d.hidden, d.intermediate),
              f"{prefix}post_attention_layernorm.weight": (d.hidden,)}
    return shapes


def expected_shapes(fmt: str, d: Dims, bias: bool) -> dict[str, tuple[int, ...]]:
    """Required keys and shapes (embeddings excluded; `d2t`/`t2d` included for EAGLE-3)."""
    if fmt == "eagle1":
        shapes = {"fc.weight": (d.hidden, 2 * d.hidden)}
        for i in range(d.layers):
            shapes |= _layer_shapes(f"layers.{i}.", d, d.hidden)
            if i > 0:  # the host's first layer has no input_layernorm
                shapes[f"layers.{i}.input_layernorm.weight"] = (d.hidden,)
    else:
        shapes = {"fc.weight": (d.hidden, 3 * d.target_hidden), "norm.weight": (d.hidden,),
                  "lm_head.weight": (d.draft_vocab, d.hidden), "d2t": (d.draft_vocab,), "t2d": (d.vocab,)}
        shapes |= _layer_shapes("midlayer.", d, 2 * d.hidden)
        shapes["midlayer.hidden_norm.weight"] = (d.hidden,)
        shapes["midlayer.input_layernorm.weight"] = (d.hidden,)
    if bias:
        shapes["fc.bias"] = (d.hidden,)
    return shapes


# --------------------------------------------------------------------------------------------------
# Detection and normalisation


def detect_format(state: dict[str, torch.Tensor]) -> str:
    """'eagle1' or 'eagle3' from the keys: EAGLE-3 alone has hidden_norm, lm_head, norm, d2t/t2d, midlayer."""
    keys = set(state)
    eagle3_marks = {"d2t", "t2d", "lm_head.weight", "norm.weight"}
    if keys & eagle3_marks or any(k.startswith("midlayer") or "hidden_norm" in k for k in keys):
        return "eagle3"
    if "fc.weight" in keys or any(k.startswith("layers.") for k in keys):
        return "eagle1"
    raise UserError(f"weights are neither an EAGLE-1/2 nor an EAGLE-3 drafter (keys {sorted(keys)[:5]}...); "
                    "expected fc.weight with layers.0.* or midlayer.*")


def normalise_eagle3(state: dict[str, torch.Tensor], notes: list[str]) -> dict[str, torch.Tensor]:
    """Rename the decoder-layer prefix to `midlayer.`; refuse multi-layer EAGLE-3 drafters."""
    extra_layers = sorted({k.split(".")[1] for k in state
                           if k.split(".")[0] in ("midlayer", "midlayers", "layers") and k.split(".")[1].isdigit()
                           and k.split(".")[1] != "0"})
    if extra_layers:
        raise UserError(f"multi-layer EAGLE-3 drafters (layers {extra_layers}) are not supported; "
                        "export a single-layer drafter")
    for prefix in _EAGLE3_LAYER_PREFIXES:
        if any(k.startswith(prefix) for k in state):
            break
    if prefix != "midlayer.":
        renamed = {("midlayer." + k[len(prefix):] if k.startswith(prefix) else k): v for k, v in state.items()}
        if len(renamed) != len(state):
            raise UserError(f"weights hold both '{prefix}*' and 'midlayer.*' keys for the same layer; keep one")
        notes.append(f"renamed the EAGLE-3 layer prefix '{prefix}' to 'midlayer.' (official EAGLE naming)")
        state = renamed
    return state


def _reconcile_bias(config: dict[str, Any], state: dict[str, torch.Tensor], fmt: str, notes: list[str]) -> bool:
    """The weights decide whether `fc.bias` exists; say so when config.json disagrees (pitfall 2)."""
    has_bias = "fc.bias" in state
    default = fmt == "eagle1"  # EAGLE-1's loader defaults "bias" to true; EAGLE-3's fc has none
    declared = config.get("bias", default)
    if bool(declared) != has_bias:
        origin = f"says \"bias\": {str(declared).lower()}" if "bias" in config else f"omits \"bias\" (default {str(default).lower()})"
        notes.append(f"config.json {origin} but fc.bias is {'present' if has_bias else 'absent'}: the weights "
                     f"win; exports write \"bias\": {str(has_bias).lower()} (a strict loader would have failed)")
    return has_bias


def _drop_buffers(state: dict[str, torch.Tensor], notes: list[str]) -> dict[str, torch.Tensor]:
    dropped = sorted(k for k in state if k.endswith(_DROPPABLE_SUFFIX))
    if dropped:
        notes.append(f"dropped {len(dropped)} rotary inv_freq buffer(s) ({dropped[0]}...); loaders recompute them")
    return {k: v for k, v in state.items() if k not in dropped}


# --------------------------------------------------------------------------------------------------
# Checking


def _target_sizes(target_config: Any) -> tuple[int, int] | None:
    """(hidden_size, vocab_size) of a target given as an HF config, a dict, or a model directory."""
    if target_config is None:
        return None
    if isinstance(target_config, (str, Path)):
        target_config = _read_config(Path(target_config))
    get = target_config.get if isinstance(target_config, dict) else lambda k: getattr(target_config, k, None)
    return int(get("hidden_size")), int(get("vocab_size"))


def _check_keys(fmt: str, d: Dims, bias: bool, state: dict[str, torch.Tensor], where: str) -> None:
    expected = expected_shapes(fmt, d, bias)
    optional = {EMBED_KEY}
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected) - optional)
    if missing or extra:
        raise UserError(f"{where}: {fmt} weights do not match their config: missing {missing[:4]}, unexpected "
                        f"{extra[:4]}; rename or remove these keys (nothing is dropped silently)")
    expected[EMBED_KEY] = (d.vocab, d.hidden)
    wrong = [f"{k} {list(v.shape)} (expected {list(expected[k])})" for k, v in sorted(state.items())
             if tuple(v.shape) != expected[k]]
    if wrong:
        raise UserError(f"{where}: {len(wrong)} weight(s) have the wrong shape for the config: {'; '.join(wrong[:3])}")


def _check_target(fmt: str, d: Dims, target: tuple[int, int] | None, where: str) -> None:
    if target is None:
        return
    t_hidden, t_vocab = target
    width = d.hidden if fmt == "eagle1" else d.target_hidden
    if width != t_hidden:
        raise UserError(f"{where}: hidden-size mismatch: the drafter expects target features of width {width}, "
                        f"the target has hidden_size {t_hidden}; pass the target this drafter was trained for")
    if d.vocab != t_vocab:
        raise UserError(f"{where}: vocabulary mismatch: drafter vocab_size {d.vocab}, target {t_vocab}")


def _fix_vocab_map(state: dict[str, torch.Tensor], d: Dims, notes: list[str], where: str) -> None:
    """Check or complete EAGLE-3 `d2t` (target_id = draft_id + d2t[draft_id]) and `t2d` in place."""
    if "d2t" not in state:
        if d.draft_vocab < d.vocab:
            raise UserError(f"{where}: reduced draft vocabulary ({d.draft_vocab} of {d.vocab}) without d2t: "
                            "engines would map drafts to the first ids and acceptance collapses; add d2t")
        state["d2t"] = torch.zeros(d.draft_vocab, dtype=torch.int64)
        notes.append("no d2t with the full vocabulary: wrote the identity map (all-zero d2t)")
    if state["d2t"].dtype != torch.int64 and not state["d2t"].is_floating_point():
        state["d2t"] = state["d2t"].to(torch.int64)
    if state["d2t"].dtype != torch.int64 or tuple(state["d2t"].shape) != (d.draft_vocab,):
        raise UserError(f"{where}: d2t must be int64 [{d.draft_vocab}], got {state['d2t'].dtype} {list(state['d2t'].shape)}")
    target_ids = torch.arange(d.draft_vocab) + state["d2t"]
    if target_ids.min() < 0 or target_ids.max() >= d.vocab or target_ids.unique().numel() != d.draft_vocab:
        raise UserError(f"{where}: d2t maps draft ids outside [0, {d.vocab}) or twice onto one target id")
    t2d = torch.zeros(d.vocab, dtype=torch.bool)
    t2d[target_ids] = True
    if "t2d" not in state:
        notes.append("t2d missing: derived it from d2t")
    elif tuple(state["t2d"].shape) != (d.vocab,) or not torch.equal(state["t2d"].bool(), t2d):
        raise UserError(f"{where}: t2d does not mark exactly the target ids d2t maps to; the vocabulary map is corrupt")
    state["t2d"] = t2d


# --------------------------------------------------------------------------------------------------
# Import


class LoadedDrafter(NamedTuple):
    format: str                      # "eagle1" (EAGLE-1/2) or "eagle3"
    config: dict[str, Any]           # the drafter config.json, reconciled ("bias", sizes)
    state: dict[str, torch.Tensor]   # normalised names (EAGLE-1: layers.N.*; EAGLE-3: midlayer.*)
    notes: list[str]                 # what was reconciled, renamed, filled in or dropped
    source: str = ""                 # where it was read from
    files: tuple[Path, ...] = ()     # weight files read (hashed into ppow_meta.json)

    @property
    def dims(self) -> Dims:
        return config_dims(self.config, self.format)

    def describe(self) -> str:
        """One paragraph for the user: what was found and what was changed."""
        d, n = self.dims, sum(v.numel() for k, v in self.state.items() if v.is_floating_point() and k != EMBED_KEY)
        kind = "EAGLE-1/2" if self.format == "eagle1" else "EAGLE-3"
        text = (f"{self.source or 'drafter'}: {kind} drafter, hidden {d.hidden}, {d.heads} heads "
                f"({d.kv_heads} KV, head_dim {d.head_dim}), MLP {d.intermediate}, vocab {d.vocab}, "
                f"{n / 1e6:.2f}M weights without embeddings")
        if self.format == "eagle1":
            text += f", {d.layers} layer(s), fc bias {'yes' if 'fc.bias' in self.state else 'no'}"
        else:
            reduced = f"reduced to {d.draft_vocab}" if d.draft_vocab < d.vocab else "not reduced"
            text += f", draft vocabulary {reduced}, target feature width {d.target_hidden} (fc 3x)"
        text += f", embeddings {'included' if EMBED_KEY in self.state else 'not included'}"
        text += f", read from {', '.join(f.name for f in self.files)}." if self.files else "."
        return text + (" " + " ".join(f"Note: {m}." for m in self.notes) if self.notes else "")


def weights_digest(state: dict[str, torch.Tensor]) -> str:
    """sha256 of a checked drafter's weights: sorted keys, shapes and values (floats as fp32), without
    `embed_tokens.weight` (the target's, optional in every format). Equal for the same weights in any format,
    so an eval report can name the drafter it measured (`ppow export --eval-report`)."""
    import hashlib
    h = hashlib.sha256()
    for key in sorted(k for k in state if k != EMBED_KEY):
        t = state[key].detach().cpu()
        t = t.float() if t.is_floating_point() else t
        h.update(f"{key}:{t.dtype}:{list(t.shape)};".encode())
        h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()


def validate_drafter(fmt: str, config: dict[str, Any], state: dict[str, torch.Tensor], target_config: Any = None,
                     notes: list[str] | None = None, where: str = "drafter") -> LoadedDrafter:
    """Normalise names, reconcile `bias`, check every key and shape; returns the checked drafter."""
    notes = [] if notes is None else notes
    state = _drop_buffers(dict(state), notes)
    if fmt == "eagle3":
        state = normalise_eagle3(state, notes)
    bias = _reconcile_bias(config, state, fmt, notes)
    config = dict(config, bias=bias)
    d = config_dims(config, fmt, where)
    if fmt == "eagle3":
        if "lm_head.weight" in state and state["lm_head.weight"].shape[0] != d.draft_vocab:
            raise UserError(f"{where}: lm_head has {state['lm_head.weight'].shape[0]} rows but config.json "
                            f"draft_vocab_size is {d.draft_vocab}")
        if "lm_head.weight" in state:
            _fix_vocab_map(state, d, notes, where)
        if config.get("rope_scaling"):
            notes.append(f"config.json declares rope_scaling {config['rope_scaling']}: ppow's EAGLE-3 drafter "
                         "trains with plain RoPE (rope_theta), as EAGLE main computes; SGLang/vLLM would apply "
                         "the scaling")
        if config.get("num_hidden_layers", 1) != 1:
            notes.append(f"config.json says num_hidden_layers {config['num_hidden_layers']}; EAGLE-3 has one "
                         "layer and exports write 1 (engines would build that many)")
    _check_keys(fmt, d, bias, state, where)
    _check_target(fmt, d, _target_sizes(target_config), where)
    return LoadedDrafter(fmt, config, state, notes, where)


def load_drafter(path: str | Path, target_config: Any = None) -> LoadedDrafter:
    """Read an EAGLE-1/2 or EAGLE-3 drafter directory (ours, EAGLE's, NVIDIA's, SpecForge's), strictly.

    Args:
        path: directory with `config.json` and weights (`model.safetensors`, `pytorch_model.bin`, or a
            sharded safetensors/bin index).
        target_config: optional target (HF config, dict, or model dir) to check hidden and vocab sizes.
    Returns:
        LoadedDrafter with normalised key names; `describe()` summarises it for the user.
    Raises:
        UserError: unreadable/truncated files, unknown layout, missing/extra/misnamed keys, wrong shapes,
            a reduced vocabulary without `d2t`, or a size mismatch with the target.
    """
    p = Path(path)
    notes: list[str] = []
    config = _read_config(p, notes)
    state, files = read_weights(p, notes)
    fmt = detect_format(state)
    loaded = validate_drafter(fmt, config, state, target_config, notes, where=str(p))
    return loaded._replace(files=tuple(files))
