"""`ppow plan`: per-device memory of a recipe, from the target's config.json alone (no weights loaded).

    ppow plan recipes/llama3/8B_eagle3_ppow.yaml --gpus 8

The target's sizes come from its config.json alone (`target_arch`): --target-config, else model.target, else
(target not downloaded yet) the packaged known config of the same name (e.g. llama-3.1-8b-instruct).

Every number is an *estimate* in GB (1 GB = 1e9 bytes) per device, with N = gpus x nodes data-parallel ranks:

  drafter params        P_d·b                                  (÷N under ZeRO-3)
  drafter grads         P_d·b                                  (÷N under ZeRO-2/3)
  optimizer states      P_d·s, s = 12 (fp32 master + 2 moments) under bf16, 8 (2 moments) under fp32
                                                               (÷N under ZeRO-1/2/3)
  frozen embeddings     V·H·b                                  (the drafter's own copy; no grads, no states)
  frozen target         P_t·b_t                                (replicated on every rank)
  target KV cache       2·L·kv·hd·P·b_t                        (P = target_positions: T + the G·K tree;
                                                               one batch-1 cache, sequences run one at a time)
  rotary tables         P·hd·2·4 (target, one shared fp32 cos/sin pair) + EAGLE-1 drafter: ctx·hd·2·4
  rollout graph         2·N_w·heads·hd·b·((K−1)·T + K(K−1)/2)  (PPOW: the drafter's K−1 cached steps over
                                                               N_w = n·G windows keep their head-repeated
                                                               K and V [N_w, heads, T+j, hd] for backward)
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
`max_position_embeddings` positions; training sizes it to P instead (`eagle_compat.new_kv_cache`), `ppow eval`
to its longest prompt + max_new_tokens + the tree (`evaluation/decode_positions`); `host_kv_prealloc_gb`
reports what the host alone would take.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from ppow_plugin.config import Config
from ppow_plugin.errors import UserError
from ppow_plugin.host.target_arch import TargetArch

GB = 1e9
DTYPE_BYTES = {"fp32": 4, "bf16": 2}
# Bytes of optimizer state per trainable parameter: AdamW's two fp32 moments, plus an fp32 master copy
# when the parameters themselves are bf16 (DeepSpeed mixed precision; ZeRO paper's K = 12).
OPTIM_BYTES = {"fp32": 8, "bf16": 12}


@dataclass(frozen=True)
class Hardware:
    """What `ppow plan` is told about the machines: its command-line flags, checked here."""

    gpus: int = 1                 # --gpus: devices per node
    nodes: int = 1                # --nodes
    gpu_memory_gb: float = 80.0   # --gpu-memory-gb: warn above this per device
    tflops: float = 200.0         # --tflops: achieved TFLOP/s per device, for the time bound

    def __post_init__(self):
        for flag, value, ok, rule in (
                ("--gpus", self.gpus, 1 <= self.gpus <= 4096, "in [1, 4096] per node"),
                ("--nodes", self.nodes, 1 <= self.nodes <= 1 << 20, f"in [1, {1 << 20}]"),
                ("--gpu-memory-gb", self.gpu_memory_gb, 0 < self.gpu_memory_gb <= 1e5, "in (0, 100000] GB per device"),
                # from 1 GFLOP/s: a tiny positive value (1e-320) made the time bound "inf h"
                ("--tflops", self.tflops, 1e-3 <= self.tflops <= 1e5, "in [0.001, 100000] achieved TFLOP/s per device")):
            if not ok:  # "not ok" so nan fails too
                raise UserError(f"{flag} {value}: must be {rule}")


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


def target_positions(cfg: Config) -> int:
    """Positions the training target's KV cache and rotary tables must hold: data.max_len, plus the G·K tree
    that a tree verification appends after a prefix s <= T - 1 (s + 1 + G·K <= T + G·K; PPOW with
    rollout.verify greedy or sampling). `Trainer` allocates exactly this."""
    tree = cfg.rollout.group_size * cfg.rollout.window if cfg.stage == "ppow" and cfg.rollout.verify != "data" else 0
    return cfg.data.max_len + tree


def rotary_bytes(a: TargetArch, cfg: Config) -> int:
    """fp32 cos/sin tables: the target's, P rows shared by its layers (`eagle_compat.fix_rotary_caches`), plus
    the host EAGLE-1 drafter's at full context (EAGLE-3 computes its rotary on the fly)."""
    drafter_rows = a.max_position_embeddings if cfg.model.drafter_type == "eagle1" else 0
    return (target_positions(cfg) + drafter_rows) * a.head_dim * 2 * 4


def rollout_graph_bytes(a: TargetArch, cfg: Config) -> int:
    """PPOW: what the drafter's window rollout keeps for backward, per sequence. Step j (0..K-2) attends the
    T-position prefix plus j+1 drafted positions with K and V repeated to every head, [N_w, heads, T+j+1, hd]
    each, N_w = n·G windows; the logits are in `activation_bytes`."""
    if cfg.stage != "ppow":
        return 0
    r, t = cfg.rollout, cfg.data.max_len
    n_w, steps = r.prefixes_per_sequence * r.group_size, r.window - 1
    attended = steps * t + steps * (steps + 1) // 2
    return 2 * n_w * a.num_heads * a.head_dim * attended * DTYPE_BYTES[cfg.dist.dtype]


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
    act = activation_bytes(a, cfg)
    n_target = target_params(a)
    rows = {
        "drafter params (trainable)": z["params"],
        "drafter grads": z["grads"],
        "optimizer states (AdamW)": z["optimizer"],
        "drafter embeddings (frozen)": frozen * DTYPE_BYTES[cfg.dist.dtype],
        "target weights (frozen)": n_target * DTYPE_BYTES[cfg.dist.target_dtype],
        "target KV cache": kv_cache_bytes(a, target_positions(cfg), 1, cfg.dist.target_dtype),
        "rotary tables (fp32)": rotary_bytes(a, cfg),
        "activations: target hidden states": act["hidden"],
        "activations: logits": act["logits"],
        "rollout graph (drafter windows)": rollout_graph_bytes(a, cfg),
    }
    prealloc = kv_cache_bytes(a, a.max_position_embeddings, 1, cfg.dist.target_dtype)
    return MemoryPlan({k: v / GB for k, v in rows.items()}, world, trainable, frozen, n_target, prealloc / GB)


def check_device_fits(cfg: Config, a: TargetArch, world: int, device_gb: float) -> str | None:
    """Before a GPU run loads anything (`ppow sft|train`): the plan for `world` ranks against this device's memory.

    Returns a warning line when the planned total exceeds `device_gb`, else None.
    Raises:
        UserError: the frozen target alone is larger than the device (every rank holds all of it).
    """
    p = plan_memory(cfg, a, world)
    target_gb = p.rows["target weights (frozen)"]
    if target_gb > device_gb:
        raise UserError(f"the frozen target alone is {target_gb:.1f} GB in {cfg.dist.target_dtype} and every rank holds "
                        f"all of it, but this GPU has {device_gb:.1f} GB; ppow does not shard the target: use GPUs "
                        f"with more than {p.total_gb:.0f} GB (`ppow plan` lists the rows)")
    if p.total_gb > device_gb:
        return (f"warning: ppow plan estimates {p.total_gb:.1f} GB per device on {world} rank(s), more than this GPU's "
                f"{device_gb:.1f} GB; expect an out-of-memory error (see `ppow plan <recipe> --gpus {world}` for what "
                "to shrink)")
    return None


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
    target_gb = p.rows["target weights (frozen)"]
    if target_gb > gpu_memory_gb:
        lines.append(f"REFUSED: the frozen target alone is {target_gb:.1f} GB and every rank holds all of it; ppow does "
                     "not shard the target yet (no ZeRO-3 inference partitioning or tensor parallelism): use devices "
                     f"with more than {p.total_gb:.0f} GB, or a smaller target")
    host_rotary = a.num_layers * a.max_position_embeddings * a.head_dim * 2 * 4 / GB
    lines.append(f"rotary tables: {p.rows['rotary tables (fp32)']:.4f} GB (the target's one fp32 pair of "
                 f"{target_positions(cfg)} rows, shared by its {a.num_layers} layers; the host alone builds one "
                 f"pair per layer at {a.max_position_embeddings} positions: {host_rotary:.2f} GB)")
    kv_needed = p.rows["target KV cache"]
    if p.host_kv_prealloc_gb > kv_needed + 1.0:
        lines.append(f"NOTE: training sizes the target KV cache to {target_positions(cfg)} positions ({kv_needed:.2f} "
                     f"GB), `ppow eval` to its longest prompt + --max-new-tokens + the tree; the host alone would "
                     f"preallocate max_position_embeddings={a.max_position_embeddings}: {p.host_kv_prealloc_gb:.1f} GB")
    return "\n".join(lines)
