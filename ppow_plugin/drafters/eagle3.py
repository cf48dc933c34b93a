"""The EAGLE-3 drafter, written from the published checkpoint format (EAGLE-3, arXiv 2503.01840).

The PyPI host (`eagle-llm` 1.2.1) ships only EAGLE-1, so ppow owns its EAGLE-3 drafter. Parameter and
buffer names are exactly the EAGLE-3 checkpoint keys (docs: eagle-host.md §3), so `state_dict()` IS the
export: `fc.weight`, `midlayer.self_attn.{q,k,v,o}_proj.weight`, `midlayer.mlp.{gate,up,down}_proj.weight`,
`midlayer.{hidden_norm,input_layernorm,post_attention_layernorm}.weight`, `norm.weight`, `lm_head.weight`,
`d2t`, `t2d` and the frozen `embed_tokens.weight` (optional for loaders, kept so the export is
self-contained).

Conventions (same alignment as EAGLE-1, see rollout.py):
- Target features: the decoder-layer *inputs* of layers (2, L//2, L-3), i.e. HF `hidden_states[2]`,
  `[L//2]`, `[L-3]`, concatenated low→high into [B, T, 3·H_t] (`target_features`).
- The drafter reads pairs (h_i, x_{i+1}) at position i and predicts x_{i+2}: `hidden[:, i]` is the
  fused target feature at i (projected by `fc`) or the drafter's own previous output (fed back as-is),
  `input_ids[:, i]` is the *next* token.
- Draft ids index the reduced draft vocabulary; target id = draft id + d2t[draft id].

Where we depart from / fill gaps in the reference code:
  1. Rotary embeddings: plain RoPE with the target's `rope_theta`, also for Llama-3.1/3.3 targets whose
     `llama3` frequency scaling is dropped: EAGLE `main` can only build plain (or linear/dynamic) RoPE
     and refuses a `llama3` `rope_scaling`, SGLang and vLLM build whatever config.json says, so plain RoPE
     is the one rotation every host computes the same (EAGLE's released Llama-3.1 EAGLE-3 drafters do the
     same; docs/export.md, "Host config rules"). Other target scalings (yarn, linear, ...) raise.
  2. `draft_vocab.map_target_probs_to_draft` renormalises over the draft vocabulary by default, as EAGLE-3's training
     code does (softmax of the restricted target logits); `renormalize=False` gives the raw mass.
  3. Attention masks are always explicit booleans (True = may attend); there is no implicit causal
     mask once a mask is passed, so tree and training-time-test layouts are just masks.
  4. `ttt_unroll` gives step k rotary position i+k and lets row i see only its own chain in later
     steps, i.e. exactly what a depth-k tree node sees at inference (tested); the reference training
     code keeps positions unshifted across steps.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

DraftKV = tuple[Tensor, Tensor]  # (keys, values), each [B, kv_heads, S, head_dim], keys already rotated


@dataclass(frozen=True)
class Eagle3Config:
    hidden_size: int            # H: drafter width (EAGLE-3 uses the target's)
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    rope_theta: float
    target_hidden_size: int     # H_t: width of each fused target feature
    vocab_size: int             # V: target vocabulary (embedding rows, t2d length)
    draft_vocab_size: int       # Vd: drafter head rows (d2t length)
    feature_layer_ids: tuple[int, int, int]  # HF hidden_states indices (= decoder-layer inputs)
    max_position_embeddings: int = 2048
    hidden_act: str = "silu"

    def __post_init__(self):
        if self.draft_vocab_size < 1 or self.draft_vocab_size > self.vocab_size:
            raise ValueError(f"draft_vocab_size ({self.draft_vocab_size}) must be in [1, vocab_size="
                             f"{self.vocab_size}]")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                             f"num_key_value_heads ({self.num_key_value_heads})")
        if self.hidden_size == 3 * self.target_hidden_size:
            raise ValueError("hidden_size == 3 * target_hidden_size: fused features and the drafter's own "
                             "outputs would have the same width and could not be told apart")
        if self.hidden_act != "silu":
            raise ValueError(f"hidden_act {self.hidden_act!r} unsupported (EAGLE-3 drafters use silu)")
        if not (self.rope_theta > 0 and math.isfinite(self.rope_theta)):
            raise ValueError(f"rope_theta ({self.rope_theta}) must be a finite number > 0")

    @classmethod
    def from_target_config(cls, target_config: Any, draft_vocab_size: int | None = None) -> "Eagle3Config":
        """Drafter sizes from a target HF Llama config; `draft_vocab_size=None` keeps the full vocabulary.

        Raises:
            ValueError: the target uses a rope scaling other than default/llama3 (llama3 targets get a plain-RoPE
                drafter, module doc item 1), or has fewer than 5 layers (the feature indices 2, L//2, L-3 would
                be out of order).
        """
        # HF config objects: transformers 5 keeps rope settings in `rope_parameters`, 4.x in `rope_scaling`.
        params = getattr(target_config, "rope_parameters", None) or getattr(target_config, "rope_scaling", None) or {}
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type not in TARGET_ROPE_TYPES:
            raise ValueError(f"target rope type {rope_type!r} is not supported by the EAGLE-3 drafter "
                             f"(supported: {', '.join(TARGET_ROPE_TYPES)})")
        theta = float(params.get("rope_theta", getattr(target_config, "rope_theta", 10000.0)))
        hidden, heads = target_config.hidden_size, target_config.num_attention_heads
        return cls(
            hidden_size=hidden, num_attention_heads=heads,
            num_key_value_heads=getattr(target_config, "num_key_value_heads", None) or heads,
            head_dim=getattr(target_config, "head_dim", None) or hidden // heads,
            intermediate_size=target_config.intermediate_size, rms_norm_eps=target_config.rms_norm_eps,
            rope_theta=theta, target_hidden_size=hidden, vocab_size=target_config.vocab_size,
            draft_vocab_size=draft_vocab_size or target_config.vocab_size,
            feature_layer_ids=feature_layer_ids(target_config.num_hidden_layers),
            max_position_embeddings=target_config.max_position_embeddings,
            hidden_act=getattr(target_config, "hidden_act", "silu"),
        )

    def to_hf_dict(self) -> dict[str, Any]:
        """The drafter `config.json` that vLLM, SGLang and EAGLE `main` read (docs/export.md, "Host config rules").

        Plain RoPE: `rope_theta` (4.x readers, EAGLE) and `rope_parameters` (5.x) say the same, `rope_scaling`
        is null. Aux layers: `eagle_aux_hidden_state_layer_ids` are HF `hidden_states` indices (= vLLM's
        "input of layer i"); SGLang reads `eagle_config.eagle_aux_hidden_state_layer_ids` as "output of layer
        i" and adds 1, so it gets the same layers minus one.
        """
        out = {k: v for k, v in asdict(self).items() if k != "feature_layer_ids"}
        out.update({
            "architectures": ["LlamaForCausalLMEagle3"], "model_type": "llama", "num_hidden_layers": 1,
            "tie_word_embeddings": False, "bias": False, "rope_scaling": None,
            "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
            "eagle_aux_hidden_state_layer_ids": list(self.feature_layer_ids),
            "eagle_config": {"use_aux_hidden_state": True,
                             "eagle_aux_hidden_state_layer_ids": [i - 1 for i in self.feature_layer_ids]},
        })
        return out


def feature_layer_ids(num_layers: int) -> tuple[int, int, int]:
    """EAGLE-3's low/mid/high feature indices (2, L//2, L-3) into HF `hidden_states` (layer inputs).

    For L = 6 this is (2, 3, 3): layer 3's input is fed twice, so `fc` still reads 3·H_t (tiny test
    targets use L = 6; engines that index by this tuple behave the same, EAGLE's own set-based collection
    would not).

    Raises:
        ValueError: num_layers < 5 (the indices would not be non-decreasing).
    """
    if num_layers < 5:
        raise ValueError(f"EAGLE-3 needs a target with >= 5 layers for its feature layers, got {num_layers}")
    return (2, num_layers // 2, num_layers - 3)


def target_features(hidden_states: Sequence[Tensor], layer_ids: Sequence[int]) -> Tensor:
    """Fuse target hidden states into EAGLE-3 drafter input.

    Args:
        hidden_states: HF-style tuple, entry i = input of decoder layer i ([0] = embeddings), each [B, T, H_t].
        layer_ids: three indices, e.g. `Eagle3Config.feature_layer_ids`.
    Returns:
        [B, T, 3·H_t], low → high.
    """
    return torch.cat([hidden_states[i] for i in layer_ids], dim=-1)


# ----------------------------------------------------------------------------------------------
# Modules


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


TARGET_ROPE_TYPES = ("default", "llama3")  # target rope types a drafter is built for (always plain RoPE)


def rope_inv_freq(cfg: Eagle3Config, device: torch.device | str = "cpu") -> Tensor:
    """Rotary inverse frequencies theta^(-2i/hd), i < hd/2: [head_dim/2] fp32 (plain RoPE, module doc item 1)."""
    hd = cfg.head_dim
    return 1.0 / cfg.rope_theta ** (torch.arange(0, hd, 2, device=device, dtype=torch.float32) / hd)


def _rope(q: Tensor, k: Tensor, position_ids: Tensor, inv_freq: Tensor) -> tuple[Tensor, Tensor]:
    """Llama rotary embedding, computed in fp32. q/k [B, heads, T, hd], position_ids [B, T], inv_freq [hd/2]."""
    freqs = position_ids.float()[..., None] * inv_freq  # [B, T, hd/2]
    emb = torch.cat([freqs, freqs], dim=-1)[:, None]  # [B, 1, T, hd]
    cos, sin = emb.cos(), emb.sin()
    rot = lambda x: (x.float() * cos + _rotate_half(x.float()) * sin).to(x.dtype)  # noqa: E731
    return rot(q), rot(k)


class Attention(nn.Module):
    """GQA self-attention whose q/k/v read the 2H-wide [embedding ‖ hidden] input."""

    def __init__(self, cfg: Eagle3Config):
        super().__init__()
        self.cfg = cfg
        h, hd = cfg.hidden_size, cfg.head_dim
        self.q_proj = nn.Linear(2 * h, cfg.num_attention_heads * hd, bias=False)
        self.k_proj = nn.Linear(2 * h, cfg.num_key_value_heads * hd, bias=False)
        self.v_proj = nn.Linear(2 * h, cfg.num_key_value_heads * hd, bias=False)
        self.o_proj = nn.Linear(cfg.num_attention_heads * hd, h, bias=False)

    def forward(self, x: Tensor, position_ids: Tensor, mask: Tensor, past_kv: DraftKV | None) -> tuple[Tensor, DraftKV]:
        b, t, _ = x.shape
        cfg = self.cfg
        q = self.q_proj(x).view(b, t, cfg.num_attention_heads, cfg.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, cfg.num_key_value_heads, cfg.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, cfg.num_key_value_heads, cfg.head_dim).transpose(1, 2)
        q, k = _rope(q, k, position_ids, rope_inv_freq(cfg, q.device))
        if past_kv is not None:
            k, v = torch.cat([past_kv[0], k], dim=2), torch.cat([past_kv[1], v], dim=2)
        groups = cfg.num_attention_heads // cfg.num_key_value_heads
        out = F.scaled_dot_product_attention(q, k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1),
                                             attn_mask=mask[:, None])  # [B, heads, T, hd]
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1)), (k, v)


class MLP(nn.Module):
    def __init__(self, cfg: Eagle3Config):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MidLayer(nn.Module):
    """The single EAGLE-3 decoder layer: attention over cat(input_layernorm(emb), hidden_norm(h)), residual on h."""

    def __init__(self, cfg: Eagle3Config):
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.hidden_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, emb: Tensor, hidden: Tensor, position_ids: Tensor, mask: Tensor,
                past_kv: DraftKV | None) -> tuple[Tensor, DraftKV]:
        x = torch.cat([self.input_layernorm(emb), self.hidden_norm(hidden)], dim=-1)
        attn, kv = self.self_attn(x, position_ids, mask, past_kv)
        hidden = hidden + attn
        return hidden + self.mlp(self.post_attention_layernorm(hidden)), kv


class Eagle3Drafter(nn.Module):
    """EAGLE-3 drafter; `state_dict()` has exactly the EAGLE-3 checkpoint keys.

    Args:
        cfg: sizes (`Eagle3Config.from_target_config`).
        embed_weight: the target's input embedding [V, H], copied in; frozen either way.
    """

    def __init__(self, cfg: Eagle3Config, embed_weight: Tensor | None = None):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        if embed_weight is not None:
            if tuple(embed_weight.shape) != (cfg.vocab_size, cfg.hidden_size):
                raise ValueError(f"embed_weight shape {tuple(embed_weight.shape)} != {(cfg.vocab_size, cfg.hidden_size)}")
            with torch.no_grad():
                self.embed_tokens.weight.copy_(embed_weight)
        self.embed_tokens.weight.requires_grad_(False)
        self.fc = nn.Linear(3 * cfg.target_hidden_size, cfg.hidden_size, bias=False)
        self.midlayer = MidLayer(cfg)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.draft_vocab_size, bias=False)
        # Identity map by default: draft id i = target id i (t2d marks the first Vd ids).
        self.register_buffer("d2t", torch.zeros(cfg.draft_vocab_size, dtype=torch.long))
        self.register_buffer("t2d", torch.arange(cfg.vocab_size) < cfg.draft_vocab_size)

    def set_vocab_map(self, d2t: Tensor, t2d: Tensor) -> None:
        """Install a `draft_vocab.build_vocab_map` result (shapes must match the config)."""
        if d2t.shape != self.d2t.shape or t2d.shape != self.t2d.shape:
            raise ValueError(f"vocab map shapes {tuple(d2t.shape)}, {tuple(t2d.shape)} != "
                             f"{tuple(self.d2t.shape)}, {tuple(self.t2d.shape)}")
        if int(t2d.sum()) != d2t.numel():
            raise ValueError(f"t2d marks {int(t2d.sum())} ids but d2t has {d2t.numel()}")
        self.d2t.copy_(d2t)
        self.t2d.copy_(t2d)

    def forward(self, hidden: Tensor, input_ids: Tensor, past_kv: DraftKV | None = None,
                position_ids: Tensor | None = None, attention_mask: Tensor | None = None
                ) -> tuple[Tensor, Tensor, DraftKV]:
        """One drafter step over T new positions.

        Args:
            hidden: [B, T, 3·H_t] fused target features (projected by `fc`) or [B, T, H] the drafter's own
                previous `out_hidden` (used as-is).
            input_ids: [B, T] int64 *target* ids of the next tokens (pair (h_i, x_{i+1})).
            past_kv: cache from earlier calls, (k, v) each [B, kv_heads, S, head_dim], or None (S = 0).
            position_ids: [B, T] int64 rotary positions; default S .. S+T-1.
            attention_mask: [B, T, S+T] bool, True = may attend; default causal over the new positions,
                everything in the cache visible.
        Returns:
            out_hidden [B, T, H] (pre-norm; feed back as `hidden` for the next step),
            logits [B, T, Vd] over the draft vocabulary,
            new_kv: past_kv with these T positions appended, [B, kv_heads, S+T, head_dim].
        """
        b, t = input_ids.shape
        if hidden.shape[-1] == 3 * self.cfg.target_hidden_size:
            hidden = self.fc(hidden)
        elif hidden.shape[-1] != self.cfg.hidden_size:
            raise ValueError(f"hidden width {hidden.shape[-1]} is neither 3*H_t={3 * self.cfg.target_hidden_size} "
                             f"nor H={self.cfg.hidden_size}")
        past = 0 if past_kv is None else past_kv[0].shape[2]
        if position_ids is None:
            position_ids = torch.arange(past, past + t, device=input_ids.device).expand(b, t)
        if attention_mask is None:
            attention_mask = causal_mask(t, past, input_ids.device).expand(b, t, past + t)
        emb = self.embed_tokens(input_ids).to(hidden.dtype)
        out_hidden, new_kv = self.midlayer(emb, hidden, position_ids, attention_mask, past_kv)
        return out_hidden, self.lm_head(self.norm(out_hidden)), new_kv


def causal_mask(t: int, past: int, device: torch.device | str | None = None) -> Tensor:
    """[t, past + t] bool: every cached position plus causal over the t new ones."""
    new = torch.ones(t, t, dtype=torch.bool, device=device).tril()
    return torch.cat([torch.ones(t, past, dtype=torch.bool, device=device), new], dim=1)


def ttt_mask(t: int, step: int, device: torch.device | str | None = None) -> Tensor:
    """[t, t·(step+1)] bool attention of TTT step `step` over the keys of steps 0..step.

    Row i (the chain that starts at committed pair i) sees committed pairs 0..i (step-0 block, causal)
    and, in every later block, only its own column i: exactly what the tree node at depth `step` sees at
    inference (its committed prefix, its ancestors, itself).
    """
    blocks = [torch.ones(t, t, dtype=torch.bool, device=device).tril()]
    blocks += [torch.eye(t, dtype=torch.bool, device=device)] * step
    return torch.cat(blocks, dim=1)


def ttt_unroll(drafter: Eagle3Drafter, features: Tensor, next_ids: Tensor, steps: int) -> list[Tensor]:
    """Training-time test: `steps` unrolled drafter passes, each fed the previous pass's outputs (with grad).

    Step k at row i drafts the token x_{i+2+k} from the chain that starts at committed pair i: it reads
    the step-(k-1) output at row i and the token x_{i+1+k} (`next_ids` shifted left by k, zero-padded),
    at rotary position i+k, with `ttt_mask` (same attention and positions as `tree_decode` at depth k).

    Args:
        features: [B, T, 3·H_t] fused target features f_0..f_{T-1}.
        next_ids: [B, T] int64, next_ids[:, i] = x_{i+1} (the token after f_i).
        steps: unrolled steps (EAGLE-3: 7).
    Returns:
        per step, draft logits [B, T, Vd]; row i of step k predicts x_{i+2+k}. Rows with i+1+k >= T read
        padding: mask them out.
    """
    b, t = next_ids.shape
    pos = torch.arange(t, device=next_ids.device).expand(b, t)
    hidden, kv, ids, out_logits = features, None, next_ids, []
    for k in range(steps):
        mask = ttt_mask(t, k, next_ids.device).expand(b, t, t * (k + 1))
        hidden, logits, kv = drafter(hidden, ids, past_kv=kv, position_ids=pos + k, attention_mask=mask)
        out_logits.append(logits)
        ids = torch.cat([ids[:, 1:], torch.zeros_like(ids[:, :1])], dim=1)
    return out_logits


def new_eagle3_drafter(target: nn.Module, draft_vocab_size: int | None = None,
                       dtype: torch.dtype | None = None) -> Eagle3Drafter:
    """A random-init drafter shaped for `target` (an HF or host Llama), with its input embedding copied in."""
    cfg = Eagle3Config.from_target_config(target.config, draft_vocab_size)
    embed = target.get_input_embeddings().weight.detach()
    drafter = Eagle3Drafter(cfg, embed_weight=embed)
    return drafter.to(dtype or embed.dtype)


__all__ = [
    "DraftKV", "TARGET_ROPE_TYPES", "Eagle3Config", "Eagle3Drafter", "causal_mask", "feature_layer_ids",
    "new_eagle3_drafter", "rope_inv_freq",
    "target_features", "ttt_mask", "ttt_unroll",
]
