"""The one seam to the EAGLE-1 host (PyPI `eagle-llm` 1.2.1, import name `eagle`).

No other module imports `eagle`. Every entry point first calls `require_patched_host()` (see
`ppow_plugin.host.patching`) and imports the host lazily, so `import ppow_plugin.host.eagle_compat` is cheap and
works without the host installed. What the bridge adds on top of the patches:

1. Rotary caches are recomputed after loading (`fix_rotary_caches`). transformers 5 builds models on the
   meta device, so the host's `inv_freq`/`cos_cached`/`sin_cached` buffers are never filled; greedy output
   silently degenerates to token 0. Recomputing is sturdier than relying on v5's init hooks, and keeps the
   caches in fp32 when the model runs in bf16 (`Module.to(dtype)` would round them).
2. `.eval()` everywhere: the drafter checkpoints its layers in train mode and then returns no KV cache.
3. Tied embeddings (`tie_word_embeddings`, e.g. SmolLM2): the host declares `_tied_weights_keys` as a
   list, transformers 5 expects a `{target: source}` dict and raises AttributeError in `post_init`.
   `_adapt_host_classes` sets the dict form on the host class before loading (4.x iterates it as keys),
   and marks the never-saved `rotary_emb.inv_freq` buffers as expected-missing.
4. `dtype=` instead of the deprecated `torch_dtype=`; the architecture is checked before the host
   silently falls back to its Mixtral path.
5. Qwen2 targets (e.g. Qwen2.5-Coder) run on the host's KV Llama. Qwen2 is the Llama architecture plus
   biases on q/k/v (not o); rope_theta, GQA, tied or untied head are config values the Llama code already
   reads. Patch 0004 makes the host build those biases and route `Qwen2ForCausalLM` to the KV Llama (not
   its Mixtral fallback): a fix in the host's own model code keeps one implementation of the verified
   forward pass, and the host stays usable on its own. The bridge refuses Qwen2 sliding-window attention
   (the KV Llama attends to every position) and checks after loading that the biases exist, because the
   patch reads the model type that transformers 5 keeps on the loaded config (`LlamaConfig` reading a
   qwen2 `config.json`). The EAGLE-1 drafter stays a plain Llama layer: the host's drafter (`cnets.py`)
   has no q/k/v bias, and `"bias"` in its config is about `fc` only.
6. Llama-3.x targets: patch 0005 adds the `llama3` RoPE scaling (three frequency bands) to the host's
   target rotary embedding; `fix_rotary_caches` passes the band parameters on when it rebuilds the caches.
7. Qwen3 targets (dense): patch 0006 adds the per-head RMSNorm on q and k, head_dim read from the config
   (Qwen3-32B: 64 x 128 != 5120) in the attention and the preallocated KV cache, and routes
   `Qwen3ForCausalLM` to the KV Llama. The bridge checks the norms exist after loading (same reason as 5).
8. Every config field is accounted for in `target_fields.CONFIG_FIELDS` (what the host does with it);
   `target_fields.check_target_config`
   refuses, in one line, the values the host cannot run: sliding-window layers, mixture-of-experts, rope
   types other than default/linear/dynamic/llama3, partial rotary, MLP biases.
9. Drafting many rows after one prefix (training's window rollouts, `rollout.draft_windows`): patch 0007 lets the
   drafter's attention take a cache entry (shared_k, shared_v, own_k, own_v), the prefix stored once for every
   row plus each row's own positions (`rollout.shared_prefix_cache`), so the prefix is not copied per row and
   per depth by `cat` / `repeat_kv` (the host's two-tensor caches run as before).

Host facts the rest of ppow relies on (eagle-llm 1.2.1):
- Target "features" are the last decoder layer's output *after* the final RMSNorm (what
  `base_model.model(...)[0]` returns), i.e. exactly what `lm_head` consumes.
- One `eagenerate` cycle commits `accept_len + 1` tokens (accepted drafts + the root token that the
  previous cycle sampled), so `new_tokens == sum(accept_lengths) + cycles`, and EAGLE's
  tau = new_tokens / cycles. `new_tokens` can overshoot `max_new_tokens` by up to tree depth + 1.
- The target KV cache is preallocated for `max_position_embeddings` positions (SmolLM2: 8192 x 30 layers,
  ~380 MB in fp32; Qwen2.5-Coder-0.5B: 32768 x 24 layers x 2 KV heads, ~800 MB) on the first `eagenerate`
  call and reused afterwards; its rotary tables likewise, one pair per layer. Training sizes both to what a
  run reaches (`new_kv_cache(target, positions)`, `load_host_target(..., positions=)`, `plan.target_positions`),
  evaluation to its longest prompt + max_new_tokens + the tree (`load_ea_model(..., positions=)` presets the
  EaModel's cache, `evaluation/decode_positions`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from ppow_plugin.devices import direct_load
from ppow_plugin.errors import UserError
from ppow_plugin.host.target_fields import (CONFIG_FIELDS, HOST_ROPE_TYPES, SUPPORTED_ARCHITECTURES,  # noqa: F401
                                            check_target_config, eagle1_config_dict)  # (re-exported)
from ppow_plugin.host.patching import locate_host, require_patched_host

class HostGenerateResult(NamedTuple):
    output_ids: Tensor          # [1, P + new_tokens] int64  prompt followed by every committed token
    new_tokens: int             # tokens committed after the prompt (may exceed max_new_tokens)
    cycles: int                 # draft/verify cycles = target tree forwards (EAGLE's `idx + 1`)
    accept_lengths: list[int]   # per cycle: accepted draft tokens, bonus excluded


def host_version() -> str | None:
    """Installed eagle-llm version (read from its dist-info, without importing it); None if absent."""
    return locate_host()[1]


def _read_target_config(path: str | Path) -> Any:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(path))
    check_target_config(config, path)
    return config


def _host_config(path: str | Path) -> Any:
    """The target's `config.json` as the `LlamaConfig` the host's KV Llama is built from.

    `from_dict` keeps the file's `model_type` ("qwen2" for Qwen2, which patch 0004 reads to build the q/k/v
    biases) without the "model of type qwen2 to instantiate a model of type llama" warning that
    `from_pretrained` would print on every load, though for Qwen2 this is expected.
    """
    from transformers import LlamaConfig

    config_dict, _ = LlamaConfig.get_config_dict(str(path))
    return LlamaConfig.from_dict(config_dict)


def fix_rotary_caches(model: nn.Module, positions: int | None = None) -> int:
    """Recompute every host rotary module's `inv_freq` and cos/sin caches, in fp32, on the model's device.

    A fresh instance of the same host class computes the values, so the formula (and any linear/dynamic/
    llama3 scaling) stays the host's. The tables keep `positions` rows (None: max_position_embeddings) and are
    shared by every module with the same settings: the host builds one pair per layer at full context (Llama-3.1-
    8B: 32 x 134 MB in fp32). A longer sequence still runs: the host regrows a module's table on demand (same
    values). Call it on the model's final device (`.to()` copies each module's buffers, undoing the sharing).
    Returns how many rotary modules were fixed.
    """
    device = next(model.parameters()).device
    shared: dict[tuple, nn.Module] = {}
    fixed = 0
    for module in model.modules():
        if not (hasattr(module, "inv_freq") and hasattr(module, "_set_cos_sin_cache")):
            continue
        extra = {name: getattr(module, name) for name in _ROTARY_SCALING_ARGS if hasattr(module, name)}
        key = (type(module), module.dim, module.max_position_embeddings, module.base, tuple(sorted(extra.items())))
        if key not in shared:
            fresh = type(module)(module.dim, module.max_position_embeddings, module.base, device=device, **extra)
            rows = fresh.max_seq_len_cached if positions is None else min(positions, fresh.max_seq_len_cached)
            fresh.cos_cached = fresh.cos_cached[:, :, :rows].clone()  # [1, 1, rows, head_dim] fp32
            fresh.sin_cached = fresh.sin_cached[:, :, :rows].clone()
            fresh.max_seq_len_cached = rows
            shared[key] = fresh
        fresh = shared[key]
        module.inv_freq = fresh.inv_freq          # assignment to a registered buffer keeps it a buffer
        module.cos_cached = fresh.cos_cached
        module.sin_cached = fresh.sin_cached
        module.max_seq_len_cached = fresh.max_seq_len_cached
        fixed += 1
    return fixed


_ROTARY_SCALING_ARGS = ("scaling_factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def _adapt_host_classes() -> None:
    """Class-level transformers-5 fixes that need no patch (see module doc, item 3). Idempotent."""
    from eagle.model.modeling_llama_kv import LlamaForCausalLM as HostLlama

    if isinstance(HostLlama._tied_weights_keys, list):
        HostLlama._tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    # inv_freq is a persistent buffer in the host but never in checkpoints; fix_rotary_caches rebuilds it,
    # so keep it out of transformers' "MISSING" load report
    HostLlama._keys_to_ignore_on_load_missing = [r"rotary_emb\.inv_freq"]


def _freeze_for_inference(model: nn.Module) -> nn.Module:
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    return model


def load_host_target(path: str | Path, dtype: torch.dtype = torch.float32, device: torch.device | None = None,
                     positions: int | None = None) -> nn.Module:
    """Load a local HF Llama, Qwen2 or Qwen3 directory as the host's KV-cache Llama
    (`modeling_llama_kv.LlamaForCausalLM`).

    The returned model is in eval mode, frozen, on `device` (None: CPU), with rotary caches fixed for
    `positions` rows (None: the full context; `fix_rotary_caches`). Its `model(...)` accepts the host's
    preallocated `past_key_values` (see `new_kv_cache`). On a GPU the weights are loaded straight there when
    accelerate is installed (no full CPU copy per rank).

    Raises:
        UserError: the host is missing/unpatched, or the target is not a supported architecture.
    """
    require_patched_host()
    _read_target_config(path)
    from eagle.model.modeling_llama_kv import LlamaForCausalLM as HostLlama

    _adapt_host_classes()
    model = HostLlama.from_pretrained(str(path), config=_host_config(path), dtype=dtype, **direct_load(device))
    _check_loaded_target(model, path)
    if device is not None:
        model.to(device)  # also the buffers built outside the checkpoint; a no-op where already there
    fix_rotary_caches(model, positions)
    return _freeze_for_inference(model)


def _check_loaded_target(model: nn.Module, where: str | Path) -> None:
    """A Qwen2 target loaded without its q/k/v biases, or a Qwen3 one without its q/k norms, would run
    (transformers only logs the unused weights) but decode a different model; fail instead (module doc,
    items 5 and 7)."""
    archs = getattr(model.config, "architectures", None) or []
    attn = model.model.layers[0].self_attn
    if "Qwen2ForCausalLM" in archs and attn.q_proj.bias is None:
        missing = "q/k/v biases"
    elif "Qwen3ForCausalLM" in archs and not hasattr(attn, "q_norm"):
        missing = "q/k norms"
    else:
        return
    raise UserError(f"the EAGLE-1 host loaded the {archs[0][:-len('ForCausalLM')]} target at {where} without "
                    f"its {missing}; run `ppow patch revert` then `ppow patch apply`")


def new_eagle1_drafter(target_config: Any, bias: bool = True, dtype: torch.dtype = torch.float32,
                       embed_weight: Tensor | None = None) -> nn.Module:
    """A randomly initialised host EAGLE-1 drafter (`eagle.model.cnets.Model`) shaped for the target.

    I/O contract: `drafter(hidden_states, input_ids, use_cache=False)` with
        hidden_states: target features [B, T, H] (final-norm output of the target, see module doc);
        input_ids: tokens [B, T] *shifted by one* relative to the features: feature f_i pairs with token
            x_{i+1}, i.e. `input_ids = tokens[:, 1:T+1]` for `hidden_states = features[:, :T]`;
    returns the predicted next features [B, T, H] (f_{i+1} at position i), plus a tuple of per-layer
    (k, v) when `use_cache=True`. Draft logits are `target.lm_head(features)`; the drafter has no head
    and no final norm. Optional kwargs: `past_key_values`, `position_ids`, `attention_mask` [B, T_total].

    Args:
        target_config: the target's HF config (Llama).
        bias: whether `fc` (Linear 2H -> H) has a bias; must match the exported `config.json`.
        dtype: parameter dtype; the rotary caches stay fp32.
        embed_weight: the target's input embedding [V, H]; copied in and frozen. Pass it: EAGLE's loader
            expects `embed_tokens.weight` in the drafter checkpoint and the drafter is trained with the
            target's embeddings. Left random (still frozen) when None.
    """
    require_patched_host()
    check_target_config(target_config, "target_config")
    from eagle.model.cnets import Model as HostDrafter
    from eagle.model.configs import EConfig

    drafter = HostDrafter(EConfig(**eagle1_config_dict(target_config, bias)), bias=bias)
    # The host sets this to True; in train mode it then runs its layers under torch checkpointing and
    # returns no KV cache, which breaks cached drafting. ppow manages memory itself.
    drafter.gradient_checkpointing = False
    drafter.diff_device = False  # the host's topK_genrate reads this (EaModel normally sets it)
    if embed_weight is not None:
        if tuple(embed_weight.shape) != tuple(drafter.embed_tokens.weight.shape):
            raise ValueError(f"embed_weight shape {tuple(embed_weight.shape)} != "
                             f"{tuple(drafter.embed_tokens.weight.shape)}")
        with torch.no_grad():
            drafter.embed_tokens.weight.copy_(embed_weight)
    drafter.embed_tokens.weight.requires_grad_(False)
    drafter.to(dtype)
    fix_rotary_caches(drafter)
    return drafter


def load_ea_model(target_dir: str | Path, drafter_dir: str | Path, dtype: torch.dtype = torch.float32,
                  device: torch.device | None = None, positions: int | None = None) -> nn.Module:
    """Host `EaModel.from_pretrained` for a local target and an EAGLE-1 drafter directory.

    The drafter directory needs `config.json` (see `eagle1_config_dict`) and `pytorch_model.bin`, loaded
    with strict=True: exactly `embed_tokens.weight`, `fc.weight` (+ `fc.bias` iff "bias"), `layers.0.*`
    without `input_layernorm` (the host's first layer has none). The tokenizer is read from `target_dir`
    (EAGLE stops on its `eos_token_id`). Target and drafter in `dtype` on `device` (None: CPU); the host
    builds its tree buffers on the target's device in its dtype. `positions` (None: the full context, the
    host's own size) sizes the target's KV cache, preallocated here for every later `eagenerate`, and the
    rotary tables. Returned in eval mode, frozen, rotary caches fixed (fp32).
    """
    require_patched_host()
    _read_target_config(target_dir)
    drafter_dir = Path(drafter_dir)
    for name in ("config.json", "pytorch_model.bin"):
        if not (drafter_dir / name).is_file():
            raise UserError(f"EAGLE-1 drafter dir {drafter_dir} has no {name}; export it with ppow export")
    from eagle.model.ea_model import EaModel

    _adapt_host_classes()
    ea_model = EaModel.from_pretrained(base_model_path=str(target_dir), ea_model_path=str(drafter_dir),
                                       config=_host_config(target_dir), dtype=dtype, **direct_load(device))
    if device is not None:
        ea_model.to(device)
    ea_model.ea_layer.gradient_checkpointing = False
    _check_loaded_target(ea_model.base_model, target_dir)
    fix_rotary_caches(ea_model.base_model, positions)
    fix_rotary_caches(ea_model.ea_layer, positions)
    if positions is not None:  # eagenerate reuses these three when present (else it sizes them itself)
        (ea_model.past_key_values, ea_model.past_key_values_data,
         ea_model.current_length_data) = _sized_kv(ea_model.base_model, positions)
    return _freeze_for_inference(ea_model)


def host_generate(ea_model: nn.Module, input_ids: Tensor, temperature: float = 0.0, max_new_tokens: int = 512,
                  tree_choices: list[list[int]] | None = None, max_length: int = 2048) -> HostGenerateResult:
    """Run the host's `eagenerate` (static tree, batch 1) and return its output with the tau accounting.

    Args:
        ea_model: from `load_ea_model`.
        input_ids: prompt [1, P] int64, on the model's device.
        temperature: 0 = greedy (then output == target greedy decoding); > 0 samples.
        max_new_tokens: stop once more than this many tokens are committed (the last cycle may overshoot).
        tree_choices: static draft tree; None = the host's default `mc_sim_7b_63` (25 nodes, depth 5).
        max_length: stop once the sequence is longer than this; keep prompt + max_new_tokens + tree size
            within the KV cache (`load_ea_model`'s `positions`, else `max_position_embeddings`).
    Returns:
        HostGenerateResult; `output_ids` also stops after an EOS (tokens of that cycle after it included).
    """
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"the EAGLE-1 host decodes one sequence: input_ids must be [1, P], got {tuple(input_ids.shape)}")
    kwargs: dict[str, Any] = {"tree_choices": tree_choices} if tree_choices is not None else {}
    output_ids = ea_model.eagenerate(input_ids, temperature=temperature, max_new_tokens=max_new_tokens,
                                     max_length=max_length, **kwargs)
    record = ea_model.ppow_log  # written by patch 0003 on every cycle
    return HostGenerateResult(output_ids, record["new_tokens"], record["cycles"], list(record["accept_lengths"]))


# --------------------------------------------------------------------------------------------------
# Host tree helpers that PPOW verification may reuse (thin wrappers so the import stays in this module)


def default_tree_choices() -> list[list[int]]:
    """The host's default static tree `mc_sim_7b_63`: 25 draft nodes as paths of top-k ranks, depth <= 5."""
    require_patched_host()
    from eagle.model.choices import mc_sim_7b_63

    return [list(path) for path in mc_sim_7b_63]


def generate_tree_buffers(tree_choices: list[list[int]] | None = None,
                          device: torch.device | str = "cpu") -> dict[str, Any]:
    """Host `utils.generate_tree_buffers`: attention mask, tree indices, position ids, retrieve indices,
    p/b indices for a static tree (default `mc_sim_7b_63`)."""
    require_patched_host()
    from eagle.model.utils import generate_tree_buffers as host_fn

    return host_fn(tree_choices if tree_choices is not None else default_tree_choices(), device=device)


def evaluate_posterior(*args: Any, **kwargs: Any) -> tuple[Tensor, Tensor | int, Tensor]:
    """Host `utils.evaluate_posterior(logits, candidates, logits_processor, cart_candidates_prob, op,
    p_indices, tree_candidates, b_indices)` -> (best_candidate, accept_length, sample_p).

    accept_length counts accepted draft tokens, bonus excluded (a 0-d tensor when greedy, an int when
    sampling). Sampling uses the drafter's probabilities q with a (p - q)+ residual.
    """
    require_patched_host()
    from eagle.model.utils import evaluate_posterior as host_fn

    return host_fn(*args, **kwargs)


def new_kv_cache(target: nn.Module, positions: int | None = None) -> list[list[Any]]:
    """A fresh host KV cache for `target`: per layer [key KVCache, value KVCache], length 0, preallocated
    for `positions` positions (None: `max_position_embeddings`, the host's own size; Llama-3.1-8B in bf16:
    17 GB). Pass it as `target.model(..., past_key_values=kv)`; a forward past `positions` raises."""
    return _sized_kv(target, positions)[0]


def kv_positions(kv: list[list[Any]]) -> int:
    """How many positions a host KV cache was allocated for (its data is [1, kv_heads, positions, head_dim])."""
    return int(kv[0][0].data.shape[2])


def _sized_kv(target: nn.Module, positions: int | None) -> tuple[list, list[Tensor], Tensor]:
    """`initialize_past_key_values` for min(`positions`, the context) positions (None: the context)."""
    full = target.config.max_position_embeddings
    target.config.max_position_embeddings = min(positions or full, full)  # the only thing the host sizes it by
    try:
        return initialize_past_key_values(target)
    finally:
        target.config.max_position_embeddings = full


def reset_kv(kv: list[list[Any]]) -> None:
    """Mark a host KV cache empty (its memory is kept and overwritten by the next forward)."""
    for layer in kv:
        for cache in layer:
            cache.current_length.fill_(0)


def load_drafter_weights(drafter: nn.Module, state: dict[str, Tensor]) -> None:
    """Strictly load an EAGLE-1 state dict into a `new_eagle1_drafter`, as the host loader would; floating
    weights are cast to the drafter's dtype (an fp16 slim dir loads into an fp32 drafter).

    Raises:
        UserError: the key sets differ (names the first few), e.g. `fc.bias` vs the config's "bias".
    """
    expected, given = set(drafter.state_dict()), set(state)
    if expected != given:
        missing, unexpected = sorted(expected - given)[:4], sorted(given - expected)[:4]
        raise UserError(f"drafter weights do not match an EAGLE-1 drafter of this shape (missing {missing}, "
                        f"unexpected {unexpected}); check the drafter's config.json \"bias\" and target")
    ref = drafter.state_dict()  # committed drafters are stored fp16: upcast to the drafter's (training) dtype
    drafter.load_state_dict({k: v.to(ref[k].dtype) if v.is_floating_point() else v for k, v in state.items()},
                            strict=True)


def require_host() -> None:
    """`require_patched_host`, for callers that only import this module."""
    require_patched_host()


def initialize_past_key_values(model: nn.Module) -> tuple[list, list[Tensor], Tensor]:
    """Host `kv_cache.initialize_past_key_values(target)`: per-layer KVCache views, the backing tensors
    [2 L, 1, kv_heads, max_position_embeddings, head_dim] and the current-length counter [2 L]."""
    require_patched_host()
    from eagle.model.kv_cache import initialize_past_key_values as host_fn

    return host_fn(model)


__all__ = [
    "CONFIG_FIELDS", "HOST_ROPE_TYPES", "SUPPORTED_ARCHITECTURES", "HostGenerateResult", "default_tree_choices", "eagle1_config_dict",
    "evaluate_posterior", "fix_rotary_caches", "generate_tree_buffers", "host_generate", "host_version",
    "initialize_past_key_values", "kv_positions", "load_drafter_weights", "load_ea_model", "load_host_target",
    "new_eagle1_drafter", "new_kv_cache", "require_host", "reset_kv",
]
