"""What the patched EAGLE-1 host can compute, read from a target's config (no host import).

`eagle_compat` calls `check_target_config` before every load; `CONFIG_FIELDS` accounts for every field of the
Llama, Qwen2 and Qwen3 configs ppow's recipes name (tests/test_eagle_compat.py walks the real ones).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ppow_plugin.errors import UserError

# Qwen2 through patch 0004, Qwen3 through 0006 (Llama-3.x's rope scaling: 0005)
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
HOST_ROPE_TYPES = ("default", "linear", "dynamic", "llama3")

# Every field a Llama / Qwen2 / Qwen3 config carries (transformers 5 `to_dict()` and the published
# config.json files) and what the patched host does with it. A field missing here fails the test that walks
# the real configs, so a new one gets looked at before a target that has it is trusted.
CONFIG_FIELDS: dict[str, str] = {
    # computed by the host's KV Llama
    "vocab_size": "embedding and lm_head rows", "hidden_size": "residual width",
    "intermediate_size": "MLP width", "num_hidden_layers": "decoder layers",
    "num_attention_heads": "query heads", "num_key_value_heads": "GQA key/value heads (repeat_kv)",
    "head_dim": "per-head width; patch 0006 (Qwen3-32B: 128 != 5120 / 64)", "hidden_act": "ACT2FN in the MLP",
    "rms_norm_eps": "every RMSNorm, Qwen3's q/k norms too",
    "max_position_embeddings": "rotary cache and KV cache length",
    "rope_theta": "rotary base (patch 0002)", "rope_parameters": "rope type and base (0001, 0002; llama3: 0005)",
    "rope_scaling": "rope type (0001; llama3: 0005)", "attention_bias": "q/k/v/o biases (0004)",
    "tie_word_embeddings": "lm_head shares the embedding (bridge: _adapt_host_classes)",
    "model_type": "qwen2 -> q/k/v biases (0004), qwen3 -> q/k norms (0006)",
    "architectures": "routing in EaModel.from_pretrained (0004, 0006)",
    "pretraining_tp": "the host's sliced projections (refused with a decoupled head_dim)",
    # refused unless off (checked by check_target_config)
    "use_sliding_window": "refused when true", "layer_types": "refused unless all full_attention",
    "sliding_window": "read only with use_sliding_window / sliding layer_types",
    "max_window_layers": "read only with use_sliding_window", "mlp_bias": "refused when true",
    # no effect on the eval-mode forward pass
    "attention_dropout": "train-time only", "initializer_range": "random init only", "use_cache": "generation flag",
    "bos_token_id": "tokenizer ids", "eos_token_id": "tokenizer ids (EaModel stops on the tokenizer's)",
    "pad_token_id": "tokenizer ids", "unk_token_id": "tokenizer ids",
    "torch_dtype": "load dtype is ppow's choice", "dtype": "same as torch_dtype",
    "transformers_version": "metadata", "_name_or_path": "metadata", "_model_name_or_path": "metadata",
    "_hub_id": "ppow metadata in the packaged known configs: the target's Hugging Face id (host/serving_names)",
    "_known_config": "ppow's packaged config-only copies",
    "id2label": "classification heads", "label2id": "classification heads", "problem_type": "classification heads",
    "chunk_size_feed_forward": "unused by Llama", "is_encoder_decoder": "false for decoders",
    "output_attentions": "output flag", "output_hidden_states": "output flag", "return_dict": "output flag",
}



def rope_parameters(config: Any) -> dict[str, Any]:
    """transformers 5 keeps rope type, theta and scaling in `rope_parameters`; 4.x in `rope_scaling`."""
    return dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})


def rope_theta(config: Any) -> float:
    """transformers 5 keeps theta in `rope_parameters`; 4.x in `rope_theta`."""
    return float(rope_parameters(config).get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def check_target_config(config: Any, where: str | Path) -> None:
    """Refuse, in one line, a target the patched host would not compute exactly (module doc, item 8)."""
    archs = list(getattr(config, "architectures", None) or [])
    experts = max(int(getattr(config, name, None) or 0) for name in ("num_experts", "num_local_experts"))
    if experts or any("Moe" in arch for arch in archs):
        raise UserError(f"target at {where} is a mixture-of-experts model ({archs[0] if archs else 'MoE'}), "
                        "which the EAGLE-1 host does not implement; use a dense Llama, Qwen2 or Qwen3 target")
    if not archs or archs[0] not in SUPPORTED_ARCHITECTURES:
        raise UserError(f"target at {where} is {archs or 'of unknown architecture'}; the EAGLE-1 host "
                        f"supports only {', '.join(SUPPORTED_ARCHITECTURES)}")
    layer_types = set(getattr(config, "layer_types", None) or ["full_attention"])
    if getattr(config, "use_sliding_window", False) or layer_types != {"full_attention"}:
        raise UserError(f"target at {where} uses sliding-window attention, which the EAGLE-1 host does not "
                        "implement; use a checkpoint with use_sliding_window false")
    rope = rope_parameters(config)
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in HOST_ROPE_TYPES or float(rope.get("partial_rotary_factor", 1.0)) != 1.0:
        raise UserError(f"target at {where} uses rope {rope_type} (partial_rotary_factor "
                        f"{rope.get('partial_rotary_factor', 1.0)}); the EAGLE-1 host implements full-width "
                        f"{', '.join(HOST_ROPE_TYPES)} only")
    if getattr(config, "mlp_bias", False):
        raise UserError(f"target at {where} has MLP biases (mlp_bias true), which the EAGLE-1 host does not build")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if (getattr(config, "pretraining_tp", 1) or 1) > 1 and head_dim * config.num_attention_heads != config.hidden_size:
        raise UserError(f"target at {where} sets pretraining_tp > 1 with head_dim {head_dim} x "
                        f"{config.num_attention_heads} heads != hidden_size; set pretraining_tp 1")


def eagle1_config_dict(target_config: Any, bias: bool = True) -> dict[str, Any]:
    """The drafter `config.json` EAGLE-1's loader reads: the target's Llama sizes with one layer.

    Both rope spellings are written (`rope_theta` for transformers 4.x, `rope_parameters` for 5.x); `bias`
    decides whether the loader builds `fc.bias`, which must then be in `pytorch_model.bin` (strict load).
    """
    theta = rope_theta(target_config)
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "bias": bool(bias),
        "vocab_size": target_config.vocab_size,
        "hidden_size": target_config.hidden_size,
        "intermediate_size": target_config.intermediate_size,
        "num_hidden_layers": 1,
        "num_attention_heads": target_config.num_attention_heads,
        "num_key_value_heads": target_config.num_key_value_heads,
        "hidden_act": target_config.hidden_act,
        "max_position_embeddings": target_config.max_position_embeddings,
        "rms_norm_eps": target_config.rms_norm_eps,
        "pad_token_id": target_config.pad_token_id,
        "bos_token_id": target_config.bos_token_id,
        "eos_token_id": target_config.eos_token_id,
        "rope_theta": theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": theta},
    }
