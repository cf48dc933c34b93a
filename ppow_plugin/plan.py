"""`ppow plan`: per-device memory of a recipe, from the target's config.json alone (no weights loaded).

    ppow plan recipes/llama3/8B_eagle3_ppow.yaml --gpus 8

The target's config.json comes from --target-config, else model.target, else (target not downloaded yet)
the packaged known config of the same name (ppow_plugin/known_configs/, e.g. llama-3.1-8b-instruct).

Every number is an *estimate* in GB (1 GB = 1e9 bytes) per device, with N = gpus x nodes data-parallel ranks:

  drafter params        P_d·b                                  (÷N under ZeRO-3)
  drafter grads         P_d·b                                  (÷N under ZeRO-2/3)
  optimizer states      P_d·s, s = 12 (fp32 master + 2 moments) under bf16, 8 (2 moments) under fp32
                                                               (÷N under ZeRO-1/2/3)
  frozen embeddings     V·H·b                                  (the drafter's own copy; no grads, no states)
  frozen target         P_t·b_t                                (replicated on every rank)
  target KV cache       2·L·kv·hd·(T + n·G·K)·mb·b_t           (T = data.max_len prefix + the G·K tree)
  activations           mb·T·H·L·b_t                           (teacher-forced target pass, hidden states)
                      + mb·(S_t·V + 2·S_d·V_d)·4               (fp32 logits: target P, drafter Q and its grad)

Time (a compute-only lower bound; rollouts are sequential and latency-bound, so real steps are slower):
  FLOPs per sequence  PPOW  2·P_t'·(T + n·(1 + G·K)) + 8·P_d'·(T + n·G·K)
                      SFT   2·P_t'·T + 6·P_d'·T·u      (u = ttt_steps for EAGLE-3, 1 for EAGLE-1)
  seconds per step    FLOPs per sequence · mb · grad_accum / (tflops · 1e12)   (each rank its own sequences)
  P_t' = P_t − V·H (embedding lookups cost nothing); P_d' = trainable drafter params + the LM head it runs
  (EAGLE-1 uses the target's V·H head). 8 = 2 (no-grad rollout) + 6 (re-scored with gradients).

b / b_t: bytes of dist.dtype / dist.target_dtype (bf16 2, fp32 4). mb = data.micro_batch, n =
rollout.prefixes_per_sequence, G = rollout.group_size, K = rollout.window. Scored positions: PPOW
S_t = S_d = T + n·G·K; SFT S_t = T and S_d = T (EAGLE-1) or ttt_steps·T (EAGLE-3 unroll).
Parameter counts (Llama-style decoder layer = attention + SwiGLU MLP + RMSNorms):
  EAGLE-1  fc (2H->H, +H bias) + one decoder layer without input_layernorm; the LM head is the target's.
  EAGLE-3  fc (3H_t->H) + one decoder layer whose q/k/v read 2H + hidden_norm + norm + lm_head [V_d, H].
Not counted: CUDA context and allocator slack (typically 1-3 GB), DeepSpeed communication buckets, the
drafter's own small layer activations. The EAGLE-1 PyPI host preallocates its KV cache for
`max_position_embeddings` positions; `host_kv_prealloc_gb` reports that separately.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ppow_plugin.config import Config
from ppow_plugin.errors import UserError

GB = 1e9
DTYPE_BYTES = {"fp32": 4, "bf16": 2}
# Bytes of optimizer state per trainable parameter: AdamW's two fp32 moments, plus an fp32 master copy
# when the parameters themselves are bf16 (DeepSpeed mixed precision; ZeRO paper's K = 12).
OPTIM_BYTES = {"fp32": 8, "bf16": 12}
_REQUIRED = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")
_OPTIONAL = ("num_key_value_heads", "head_dim", "tie_word_embeddings", "attention_bias", "max_position_embeddings",
             "model_type")  # the other config.json keys TargetArch reads (and --target-field may set)
_BOOL_KEYS = ("tie_word_embeddings", "attention_bias")
_MAX_SIZE = 1 << 24  # any size beyond this is a typo (the widest published vocabularies are ~0.26 M)
_MAX_POSITIONS = 1 << 30
KNOWN_CONFIGS = Path(__file__).parent / "known_configs"  # package data: config.json only, no weights


@dataclass(frozen=True)
class Hardware:
    """What `ppow plan` is told about the machines: its command-line flags, checked here."""

    gpus: int = 1                 # --gpus: devices per node
    nodes: int = 1                # --nodes
    gpu_memory_gb: float = 80.0   # --gpu-memory-gb: warn above this per device
    tflops: float = 200.0         # --tflops: achieved TFLOP/s per device, for the time bound

    def __post_init__(self):
        for flag, value, ok, rule in (
                ("--gpus", self.gpus, self.gpus >= 1, ">= 1"), ("--nodes", self.nodes, self.nodes >= 1, ">= 1"),
                ("--gpu-memory-gb", self.gpu_memory_gb, 0 < self.gpu_memory_gb <= 1e5, "in (0, 100000] GB per device"),
                ("--tflops", self.tflops, 0 < self.tflops <= 1e5, "in (0, 100000] achieved TFLOP/s per device")):
            if not ok:  # "not ok" so nan fails too
                raise UserError(f"{flag} {value}: must be {rule}")


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
            tie_word_embeddings=flag("tie_word_embeddings", False), qkv_bias=flag("attention_bias", model_type == "qwen2"),
            qk_norm=model_type == "qwen3", max_position_embeddings=size("max_position_embeddings", 2048, _MAX_POSITIONS),
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


def _attention_params(h_in: int, h_out: int, heads: int, kv: int, hd: int, bias: bool = False) -> int:
    """q/k/v read width h_in, o writes h_out; optional q/k/v biases."""
    weights = h_in * heads * hd + 2 * h_in * kv * hd + heads * hd * h_out
    return weights + ((heads + 2 * kv) * hd if bias else 0)


def _mlp_params(h: int, inter: int) -> int:
    return 3 * h * inter  # gate, up, down


def target_params(a: TargetArch) -> int:
    """All parameters of the frozen target (embeddings, L decoder layers, final norm, LM head unless tied)."""
    layer = (_attention_params(a.hidden_size, a.hidden_size, a.num_heads, a.num_kv_heads, a.head_dim, a.qkv_bias)
             + _mlp_params(a.hidden_size, a.intermediate_size) + 2 * a.hidden_size
             + (2 * a.head_dim if a.qk_norm else 0))
    embed = a.vocab_size * a.hidden_size
    return embed + a.num_layers * layer + a.hidden_size + (0 if a.tie_word_embeddings else embed)


def drafter_params(a: TargetArch, drafter_type: str, draft_vocab_size: int | None = None,
                   bias: bool = True) -> tuple[int, int]:
    """(trainable, frozen) parameter counts of a drafter for target `a` (drafter width H = the target's).

    Frozen = the drafter's copy of the target's input embeddings [V, H] (counted once, never trained).
    """
    h, i, v = a.hidden_size, a.intermediate_size, a.vocab_size
    frozen = v * h
    mlp = _mlp_params(h, i)
    if drafter_type == "eagle1":
        fc = 2 * h * h + (h if bias else 0)
        attn = _attention_params(h, h, a.num_heads, a.num_kv_heads, a.head_dim)
        return fc + attn + mlp + h, frozen  # + post_attention_layernorm; layer 0 has no input_layernorm
    if drafter_type == "eagle3":
        vd = draft_vocab_size or v
        fc = 3 * h * h
        attn = _attention_params(2 * h, h, a.num_heads, a.num_kv_heads, a.head_dim)
        norms = 3 * h + h  # hidden_norm, input_layernorm, post_attention_layernorm; final norm
        return fc + attn + mlp + norms + vd * h, frozen
    raise UserError(f"unknown drafter_type {drafter_type!r}")


def zero_bytes(n_params: int, dtype: str, stage: int, world: int) -> dict[str, float]:
    """Per-device bytes of trainable params, grads and optimizer states under ZeRO `stage` on `world` ranks.

    Stage 1 shards optimizer states, 2 also gradients, 3 also parameters (÷ world each).
    """
    b = DTYPE_BYTES[dtype]
    shard = lambda on: world if stage >= on else 1  # noqa: E731
    return {"params": n_params * b / shard(3), "grads": n_params * b / shard(2),
            "optimizer": n_params * OPTIM_BYTES[dtype] / shard(1)}


def kv_cache_bytes(a: TargetArch, positions: int, micro_batch: int, dtype: str) -> int:
    """K and V for every layer: 2·L·kv·hd·positions·mb·b."""
    return 2 * a.num_layers * a.num_kv_heads * a.head_dim * positions * micro_batch * DTYPE_BYTES[dtype]


def scored_positions(cfg: Config) -> tuple[int, int]:
    """(target positions, drafter positions) whose logits a micro-step holds, per sequence."""
    t = cfg.data.max_len
    if cfg.stage == "ppow":
        s = t + cfg.rollout.prefixes_per_sequence * cfg.rollout.group_size * cfg.rollout.window
        return s, s
    return t, (cfg.sft.ttt_steps * t if cfg.model.drafter_type == "eagle3" else t)


def activation_bytes(a: TargetArch, cfg: Config) -> dict[str, int]:
    """Teacher-forced hidden states mb·T·H·L·b_t and fp32 logits mb·(S_t·V + 2·S_d·V_d)·4."""
    mb, t = cfg.data.micro_batch, cfg.data.max_len
    s_t, s_d = scored_positions(cfg)
    vd = (cfg.model.draft_vocab_size or a.vocab_size) if cfg.model.drafter_type == "eagle3" else a.vocab_size
    return {"hidden": mb * t * a.hidden_size * a.num_layers * DTYPE_BYTES[cfg.dist.target_dtype],
            "logits": mb * (s_t * a.vocab_size + 2 * s_d * vd) * 4}


@dataclass(frozen=True)
class MemoryPlan:
    rows: dict[str, float]       # GB per device, in table order
    world_size: int
    drafter_trainable: int       # parameter counts
    drafter_frozen: int
    target: int
    host_kv_prealloc_gb: float   # what the EAGLE-1 host allocates (max_position_embeddings positions)

    @property
    def total_gb(self) -> float:
        return sum(self.rows.values())


def plan_memory(cfg: Config, a: TargetArch, gpus: int = 1, nodes: int = 1) -> MemoryPlan:
    """Per-device memory estimate for `cfg` on gpus x nodes ranks. Pure arithmetic."""
    Hardware(gpus, nodes)  # its invariant checks the counts
    world = gpus * nodes
    trainable, frozen = drafter_params(a, cfg.model.drafter_type, cfg.model.draft_vocab_size, cfg.model.drafter_bias)
    z = zero_bytes(trainable, cfg.dist.dtype, cfg.dist.zero_stage, world)
    positions = cfg.data.max_len + (cfg.rollout.group_size * cfg.rollout.window if cfg.stage == "ppow" else 0)
    act = activation_bytes(a, cfg)
    n_target = target_params(a)
    rows = {
        "drafter params (trainable)": z["params"],
        "drafter grads": z["grads"],
        "optimizer states (AdamW)": z["optimizer"],
        "drafter embeddings (frozen)": frozen * DTYPE_BYTES[cfg.dist.dtype],
        "target weights (frozen)": n_target * DTYPE_BYTES[cfg.dist.target_dtype],
        "target KV cache": kv_cache_bytes(a, positions, cfg.data.micro_batch, cfg.dist.target_dtype),
        "activations: target hidden states": act["hidden"],
        "activations: logits": act["logits"],
    }
    prealloc = kv_cache_bytes(a, a.max_position_embeddings, 1, cfg.dist.target_dtype)
    return MemoryPlan({k: v / GB for k, v in rows.items()}, world, trainable, frozen, n_target, prealloc / GB)


def step_seconds(cfg: Config, a: TargetArch, tflops: float = 200.0) -> float:
    """Compute-only lower bound on seconds per optimizer step per rank at `tflops` achieved TFLOP/s."""
    Hardware(tflops=tflops)
    trainable, _ = drafter_params(a, cfg.model.drafter_type, cfg.model.draft_vocab_size, cfg.model.drafter_bias)
    p_t = target_params(a) - a.vocab_size * a.hidden_size
    p_d = trainable + (a.vocab_size * a.hidden_size if cfg.model.drafter_type == "eagle1" else 0)
    t = cfg.data.max_len
    if cfg.stage == "ppow":
        r = cfg.rollout
        n_win = r.prefixes_per_sequence * r.group_size * r.window
        flops = 2 * p_t * (t + r.prefixes_per_sequence * (1 + r.group_size * r.window)) + 8 * p_d * (t + n_win)
    else:
        unroll = cfg.sft.ttt_steps if cfg.model.drafter_type == "eagle3" else 1
        flops = 2 * p_t * t + 6 * p_d * t * unroll
    return flops * cfg.data.micro_batch * cfg.optim.grad_accum / (tflops * 1e12)


# ----------------------------------------------------------------------------------------------
# Resolving the target config and printing


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
        if source.is_file():
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
    return p if name and p.is_file() else None


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
    p = p / "config.json" if p.is_dir() else p
    if not p.is_file():
        raise UserError(f"{what}: no config.json at {p}; pass --target-config PATH (a config.json or its dir) "
                        "or the sizes with --target-field key=value")
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
    from ppow_plugin import assets  # the cached SmolLM2 dir; never prepared (no download) by `plan`
    return assets.cache_dir() / "targets" / assets.SMOLLM2_135M.name / "config.json"


def format_plan(cfg: Config, a: TargetArch, p: MemoryPlan, ds_config: dict[str, Any],
                gpu_memory_gb: float = 80.0, tflops: float = 200.0) -> str:
    """The table, the DeepSpeed JSON and any warnings, as printed by `ppow plan`."""
    lines = [f"target: {a.model_type}, H={a.hidden_size}, L={a.num_layers}, heads={a.num_heads}/{a.num_kv_heads}, "
             f"I={a.intermediate_size}, V={a.vocab_size} ({p.target / 1e9:.2f} B params)",
             f"drafter: {cfg.model.drafter_type}, {p.drafter_trainable / 1e6:.1f} M trainable + "
             f"{p.drafter_frozen / 1e6:.1f} M frozen embedding params",
             f"stage={cfg.stage} dtype={cfg.dist.dtype} target_dtype={cfg.dist.target_dtype} "
             f"ZeRO-{cfg.dist.zero_stage} ranks={p.world_size} micro_batch={cfg.data.micro_batch} "
             f"max_len={cfg.data.max_len}", "",
             f"{'per-device memory (estimate)':40s} {'GB':>9s}"]
    lines += [f"{name:40s} {gb:9.2f}" for name, gb in p.rows.items()]
    sec = step_seconds(cfg, a, tflops)
    lines += [f"{'total':40s} {p.total_gb:9.2f}", "",
              "not counted: CUDA context + allocator slack (~1-3 GB), communication buckets",
              f"time (compute-only lower bound at {tflops:g} TFLOP/s per device): {sec:.2f} s per optimizer step, "
              f"{sec * cfg.run.max_steps / 3600:.1f} h for run.max_steps={cfg.run.max_steps} "
              f"({sec * cfg.run.max_steps * p.world_size / 3600:.0f} device-hours)", "",
              "DeepSpeed config (distributed.deepspeed_config):", json.dumps(ds_config, indent=2)]
    if p.total_gb > gpu_memory_gb:
        lines.append(f"WARNING: {p.total_gb:.1f} GB per device does not fit in {gpu_memory_gb:g} GB; "
                     "use more ranks with a higher dist.zero_stage, a smaller data.max_len, or bigger GPUs")
    kv_needed = p.rows["target KV cache"]
    if p.host_kv_prealloc_gb > kv_needed + 1.0:
        lines.append(f"NOTE: the EAGLE-1 host preallocates KV for max_position_embeddings={a.max_position_embeddings} "
                     f"positions: {p.host_kv_prealloc_gb:.1f} GB instead of {kv_needed:.2f} GB")
    return "\n".join(lines)
