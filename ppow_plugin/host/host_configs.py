"""What each serving host makes of an EAGLE-3 drafter `config.json`, and the vLLM `speculators` config dialect.

    problems = host_problems(config)            # {"eagle": [...], "sglang": [...], "vllm": [...]}, [] = accepted
    host_rotation("vllm", config)               # ("default", 500000.0): the RoPE that host builds
    host_aux_layers("sglang", config, 32)       # (2, 16, 29): HF hidden_states indices it feeds the drafter

The rules are re-written from the hosts' source (never copied); each function names its file. They are facts
about other programs, checked by tests/test_export.py and listed in docs/export.md ("Host config rules"):

- EAGLE `main` (SafeAILab/EAGLE, eagle/model/configs.py `EConfig._rope_scaling_validation`; eagle/model/cnets.py
  `LlamaAttention.__init__`/`_init_rope`, `Model.__init__`): `rope_scaling` is null or exactly
  `{type: linear|dynamic, factor: float > 1}` (else ValueError); plain RoPE with `rope_theta` (10000 when
  absent); `head_dim` is always hidden_size // num_attention_heads (a config `head_dim` is ignored);
  `draft_vocab_size` is read unconditionally.
- SGLang (python/sglang/srt/models/llama_eagle3.py, models/llama.py `LlamaDecoderLayer`, model_runner.py
  eagle_config): the class comes from `architectures` (`LlamaForCausalLMEagle3`); `tie_word_embeddings: true`
  makes the head the full embedding; no `draft_vocab_size` loads the target's head; `bias` adds fc and o_proj
  biases; RoPE from `rope_theta`/`rope_scaling`; aux layers only from
  `eagle_config.eagle_aux_hidden_state_layer_ids`, read as layer *outputs* (captured at id + 1), default
  (2, L//2, L-3) as layer inputs.
- vLLM (vllm/model_executor/models/llama_eagle3.py, models/registry.py, v1/worker/gpu_model_runner.py
  `_get_eagle3_aux_layers_from_config`, models/llama.py capture loop, transformers_utils/configs/speculators/
  algos.py `update_eagle3`): `LlamaForCausalLMEagle3` or `Eagle3LlamaForCausalLM`; fc never has a bias and
  `bias: true` gives o_proj one; `norm_before_residual` (default false, but **true** for speculators configs
  that omit it); aux layers from top-level `eagle_aux_hidden_state_layer_ids`, else the same key in
  `eagle_config`, both read as layer *inputs*.
"""

from __future__ import annotations

from typing import Any

from ppow_plugin.errors import UserError

HOSTS = ("eagle", "sglang", "vllm")
SOURCES = {
    "eagle": "SafeAILab/EAGLE eagle/model/configs.py, eagle/model/cnets.py",
    "sglang": "sgl-project/sglang python/sglang/srt/models/llama_eagle3.py, models/llama.py",
    "vllm": "vllm-project/vllm vllm/model_executor/models/llama_eagle3.py, v1/worker/gpu_model_runner.py",
}
_LLAMA_SIZES = ("vocab_size", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
                "rms_norm_eps", "max_position_embeddings")


def _eagle_problems(config: dict[str, Any]) -> list[str]:
    out = [f"lacks {k}" for k in (*_LLAMA_SIZES, "draft_vocab_size") if k not in config]
    scaling = config.get("rope_scaling")
    if scaling is not None and not (isinstance(scaling, dict) and len(scaling) == 2
                                    and scaling.get("type") in ("linear", "dynamic")
                                    and isinstance(scaling.get("factor"), float) and scaling["factor"] > 1):
        out.append(f"EConfig raises ValueError on rope_scaling {scaling} (needs null or exactly "
                   "{type: linear|dynamic, factor: float > 1})")
    hidden, heads = config.get("hidden_size"), config.get("num_attention_heads")
    if isinstance(hidden, int) and isinstance(heads, int) and heads > 0:
        if hidden % heads:
            out.append(f"hidden_size {hidden} is not divisible by num_attention_heads {heads}")
        elif config.get("head_dim", hidden // heads) != hidden // heads:
            out.append(f"head_dim {config['head_dim']} != hidden_size // num_attention_heads = {hidden // heads} "
                       "(EAGLE ignores head_dim and would build other shapes)")
    if "rope_theta" not in config:
        out.append("no rope_theta: EAGLE would rotate with base 10000")
    return out


def _sglang_problems(config: dict[str, Any]) -> list[str]:
    out = [f"lacks {k}" for k in _LLAMA_SIZES if k not in config]
    if "LlamaForCausalLMEagle3" not in (config.get("architectures") or []):
        out.append(f"architectures {config.get('architectures')} lacks LlamaForCausalLMEagle3 (SGLang picks the "
                   "class from it)")
    if config.get("tie_word_embeddings"):
        out.append("tie_word_embeddings true: SGLang would use the embeddings as the drafter head")
    if config.get("draft_vocab_size") is None:
        out.append("no draft_vocab_size: SGLang would load the target's lm_head instead of the drafter's")
    if config.get("bias"):
        out.append("bias true: SGLang would add an o_proj bias the weights do not have")
    ids = (config.get("eagle_config") or {}).get("eagle_aux_hidden_state_layer_ids")
    if ids is not None and not _three_ints(ids):
        out.append(f"eagle_config.eagle_aux_hidden_state_layer_ids {ids} is not a list of 3 integers")
    return out


def _vllm_problems(config: dict[str, Any]) -> list[str]:
    out = [f"lacks {k}" for k in _LLAMA_SIZES if k not in config]
    if not {"LlamaForCausalLMEagle3", "Eagle3LlamaForCausalLM"} & set(config.get("architectures") or []):
        out.append(f"architectures {config.get('architectures')} names no vLLM EAGLE-3 class")
    if config.get("bias"):
        out.append("bias true: vLLM's fc has no bias and its o_proj would get one")
    if config.get("norm_before_residual"):
        out.append("norm_before_residual true: vLLM would keep the normed hidden state as the residual")
    ids = config.get("eagle_aux_hidden_state_layer_ids")
    if ids is not None and not _three_ints(ids):
        out.append(f"eagle_aux_hidden_state_layer_ids {ids} is not a list of 3 integers")
    return out


def _three_ints(ids: Any) -> bool:
    return isinstance(ids, list) and len(ids) == 3 and all(isinstance(i, int) for i in ids)


_PROBLEMS = {"eagle": _eagle_problems, "sglang": _sglang_problems, "vllm": _vllm_problems}


def host_problems(config: dict[str, Any]) -> dict[str, list[str]]:
    """Per host, why it would refuse or misread this EAGLE-3 `config.json` ([] = accepted as meant)."""
    return {host: _PROBLEMS[host](config) for host in HOSTS}


def host_rotation(host: str, config: dict[str, Any]) -> tuple[str, float]:
    """(rope kind, theta) the host builds for the drafter's attention. All three read `rope_theta` (default
    10000) and `rope_scaling`; EAGLE names the kind `type`, SGLang/vLLM accept `rope_type` or `type`."""
    theta = float(config.get("rope_theta", 10000.0))
    scaling = config.get("rope_scaling")
    if scaling is None:
        return "default", theta
    kind = scaling.get("type") if host == "eagle" else scaling.get("rope_type", scaling.get("type"))
    return str(kind), theta


def host_aux_layers(host: str, config: dict[str, Any], target_layers: int) -> tuple[int, ...]:
    """HF `hidden_states` indices (decoder-layer inputs) the host feeds the drafter's fc, in order.

    EAGLE `main` always takes layers 2, L//2, L-3 (modeling_llama_kv.py); SGLang reads
    `eagle_config.eagle_aux_hidden_state_layer_ids` as layer outputs (+1); vLLM reads the top-level key, else
    the `eagle_config` one, as layer inputs. All fall back to (2, L//2, L-3).
    """
    default = (2, target_layers // 2, target_layers - 3)
    nested = (config.get("eagle_config") or {}).get("eagle_aux_hidden_state_layer_ids")
    if host == "sglang":
        return tuple(i + 1 for i in nested) if nested else default
    if host == "vllm":
        ids = config.get("eagle_aux_hidden_state_layer_ids") or nested
        return tuple(ids) if ids else default
    return default


# --------------------------------------------------------------------------------------------------
# The speculators dialect (vllm-project/speculators src/speculators/models/eagle3/config.py, config.py,
# proposals/greedy.py; read by vLLM through transformers_utils/configs/speculators/)

# LlamaConfig defaults, which a `transformer_layer_config` written with `to_diff_dict` leaves out
_LLAMA_DEFAULTS = {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_attention_heads": 32,
                   "hidden_act": "silu", "max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "rope_theta": 10000.0}
_SPECULATOR_TOP = ("draft_vocab_size", "target_hidden_size", "eagle_aux_hidden_state_layer_ids")
_UNSUPPORTED_FLAGS = ("norm_before_residual", "norm_before_fc", "fc_norm", "norm_output")
_LAYER_BIASES = ("attention_bias", "mlp_bias")  # transformer_layer_config fields; EAGLE-3 layers have none


def is_speculators(config: dict[str, Any]) -> bool:
    return "speculators_model_type" in config


def from_speculators(config: dict[str, Any], where: str) -> dict[str, Any]:
    """A speculators `eagle3` config.json -> the flat Llama EAGLE-3 config the rest of ppow reads.

    Raises:
        UserError: another speculator type, no `transformer_layer_config`, or a flag ppow's drafter does not
            compute (norm_before_residual, norm_before_fc, fc_norm, norm_output, attention/mlp biases).
    """
    kind = config.get("speculators_model_type")
    layer = config.get("transformer_layer_config")
    if kind != "eagle3" or not isinstance(layer, dict):
        raise UserError(f"{where}: speculators config of type {kind!r}"
                        f"{'' if isinstance(layer, dict) else ' without a transformer_layer_config'}; only "
                        "speculators_model_type \"eagle3\" with a transformer_layer_config is read")
    on = [k for k in _UNSUPPORTED_FLAGS if config.get(k)] + [k for k in _LAYER_BIASES if layer.get(k)]
    if on:
        raise UserError(f"{where}: speculators config sets {', '.join(on)}; ppow's EAGLE-3 drafter computes none "
                        "of these (plain EAGLE-3 only)")
    flat = {**_LLAMA_DEFAULTS, **{k: v for k, v in layer.items() if k not in _LAYER_BIASES},
            "architectures": ["LlamaForCausalLMEagle3"]}
    flat.update({k: config[k] for k in _SPECULATOR_TOP if config.get(k) is not None})
    return flat


def vllm_speculators_view(config: dict[str, Any]) -> dict[str, Any]:
    """The flat config vLLM builds from a speculators `eagle3` config.json (vllm/transformers_utils/configs/
    speculators/base.py + algos.py `update_eagle3`): `transformer_layer_config`, plus `draft_vocab_size`,
    `target_hidden_size` and `eagle_aux_hidden_state_layer_ids` when set, `norm_before_residual` defaulting
    to **true**, `norm_before_fc` to false, and `architectures: ["Eagle3LlamaForCausalLM"]`."""
    view = dict(config.get("transformer_layer_config") or {})
    view.update({k: config[k] for k in _SPECULATOR_TOP if config.get(k) is not None})
    view.update(norm_before_residual=config.get("norm_before_residual", True),
                norm_before_fc=config.get("norm_before_fc", False), architectures=["Eagle3LlamaForCausalLM"])
    return view


def to_speculators(config: dict[str, Any], verifier: dict[str, Any]) -> dict[str, Any]:
    """The flat EAGLE-3 config -> speculators `eagle3` layout (what its `Eagle3SpeculatorConfig` writes).

    Args:
        config: flat EAGLE-3 config (`Eagle3Config.to_hf_dict()` fields).
        verifier: {"name_or_path": target dir or None, "architectures": [...]} of the target.
    """
    layer = {k: v for k, v in config.items()
             if k not in (*_SPECULATOR_TOP, "architectures", "eagle_config", "bias", "num_hidden_layers")}
    layer.update(model_type="llama", num_hidden_layers=1, attention_bias=False, mlp_bias=False,
                 tie_word_embeddings=False)
    out = {"architectures": ["Eagle3Speculator"], "speculators_model_type": "eagle3",
           "transformer_layer_config": layer, "norm_before_residual": False, "norm_before_fc": False,
           "fc_norm": False, "norm_output": False,
           "speculators_config": {"algorithm": "eagle3", "default_proposal_method": "greedy",
                                  "proposal_methods": [{"proposal_type": "greedy", "speculative_tokens": 5,
                                                        "verifier_accept_k": 1, "accept_tolerance": 0.0}],
                                  "verifier": verifier}}
    out.update({k: config[k] for k in _SPECULATOR_TOP if config.get(k) is not None})
    return out
