"""The EAGLE-3 drafter: exact checkpoint keys, vocabulary maps, feature layers, cached == full forward."""

import pytest
import torch
from transformers import LlamaConfig

from ppow_plugin.drafters.draft_vocab import (build_vocab_map, draft_label_mask, draft_to_target_ids,
                                             map_target_probs_to_draft)
from ppow_plugin.drafters.eagle3 import (Eagle3Config, Eagle3Drafter, causal_mask, feature_layer_ids, target_features,
                                         ttt_mask, ttt_unroll)


def _target_config(layers: int = 6, vocab: int = 256) -> LlamaConfig:
    return LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rope_theta=1e5)


def _drafter(draft_vocab: int = 64, seed: int = 0) -> Eagle3Drafter:
    torch.manual_seed(seed)
    return Eagle3Drafter(Eagle3Config.from_target_config(_target_config(), draft_vocab)).eval()


# The published EAGLE-3 key set (eagle-host.md §3), for H = H_t = 64, 4 heads x 16, 2 kv heads,
# intermediate 128, vocab 256, draft vocab 64.
EXPECTED = {
    "embed_tokens.weight": ((256, 64), torch.float32),
    "fc.weight": ((64, 192), torch.float32),
    "midlayer.self_attn.q_proj.weight": ((64, 128), torch.float32),
    "midlayer.self_attn.k_proj.weight": ((32, 128), torch.float32),
    "midlayer.self_attn.v_proj.weight": ((32, 128), torch.float32),
    "midlayer.self_attn.o_proj.weight": ((64, 64), torch.float32),
    "midlayer.mlp.gate_proj.weight": ((128, 64), torch.float32),
    "midlayer.mlp.up_proj.weight": ((128, 64), torch.float32),
    "midlayer.mlp.down_proj.weight": ((64, 128), torch.float32),
    "midlayer.hidden_norm.weight": ((64,), torch.float32),
    "midlayer.input_layernorm.weight": ((64,), torch.float32),
    "midlayer.post_attention_layernorm.weight": ((64,), torch.float32),
    "norm.weight": ((64,), torch.float32),
    "lm_head.weight": ((64, 64), torch.float32),
    "d2t": ((64,), torch.int64),
    "t2d": ((256,), torch.bool),
}


def test_state_dict_is_exactly_the_eagle3_format():
    state = _drafter().state_dict()
    assert set(state) == set(EXPECTED)
    for key, (shape, dtype) in EXPECTED.items():
        assert tuple(state[key].shape) == shape and state[key].dtype == dtype, key


def test_only_embedding_is_frozen_and_dtype_keeps_buffers():
    drafter = _drafter().to(torch.bfloat16)
    frozen = {n for n, p in drafter.named_parameters() if not p.requires_grad}
    assert frozen == {"embed_tokens.weight"}
    assert drafter.d2t.dtype == torch.int64 and drafter.t2d.dtype == torch.bool
    assert drafter.fc.weight.dtype == torch.bfloat16


def test_config_from_target_and_hf_dict():
    cfg = Eagle3Config.from_target_config(_target_config(layers=30), 64)
    assert cfg.feature_layer_ids == (2, 15, 27)
    assert cfg.rope_theta == 1e5 and cfg.head_dim == 16 and cfg.num_key_value_heads == 2
    hf = cfg.to_hf_dict()
    assert hf["architectures"] == ["LlamaForCausalLMEagle3"] and hf["draft_vocab_size"] == 64
    assert hf["num_hidden_layers"] == 1 and hf["target_hidden_size"] == 64
    assert Eagle3Config.from_target_config(_target_config()).draft_vocab_size == 256


@pytest.mark.parametrize("layers, expected", [(6, (2, 3, 3)), (7, (2, 3, 4)), (30, (2, 15, 27))])
def test_feature_layer_ids(layers, expected):
    assert feature_layer_ids(layers) == expected


def test_feature_layer_ids_rejects_shallow_targets():
    with pytest.raises(ValueError):
        feature_layer_ids(4)


def test_target_features_concatenates_layer_inputs_low_to_high():
    states = tuple(torch.full((1, 2, 3), float(i)) for i in range(8))  # embeddings + 7 layer inputs
    fused = target_features(states, (2, 4, 5))
    assert fused.shape == (1, 2, 9)
    assert fused[0, 0].tolist() == [2.0] * 3 + [4.0] * 3 + [5.0] * 3


def test_draft_to_target_ids_on_hand_built_reduced_vocab():
    used = torch.tensor([1, 4, 5, 9])             # target ids in the draft vocabulary, ascending
    d2t = used - torch.arange(4)                   # [1, 3, 3, 6]
    assert d2t.tolist() == [1, 3, 3, 6]
    draft = torch.tensor([[0, 3], [2, 1]])
    assert draft_to_target_ids(draft, d2t).tolist() == [[1, 9], [5, 4]]


def test_build_vocab_map_on_hand_made_counts():
    counts = torch.tensor([5, 0, 9, 1, 9, 3, 0, 7])   # top-4: ids 2, 4 (9), 7 (7), 0 (5)
    d2t, t2d = build_vocab_map(counts, 4)
    assert d2t.tolist() == [0, 1, 2, 4]                  # used = [0, 2, 4, 7]
    assert t2d.tolist() == [True, False, True, False, True, False, False, True]
    assert draft_to_target_ids(torch.arange(4), d2t).tolist() == [0, 2, 4, 7]
    # ties keep the lower id: ids 1 and 6 both 0, 3 beats them
    d2t, t2d = build_vocab_map(counts, 6)
    assert t2d.nonzero()[:, 0].tolist() == [0, 2, 3, 4, 5, 7]
    d2t, t2d = build_vocab_map(counts, 8)               # full vocabulary: identity, d2t all zero
    assert d2t.tolist() == [0] * 8 and t2d.all()
    with pytest.raises(ValueError):
        build_vocab_map(counts, 9)


def test_map_target_probs_to_draft_hand_computed():
    logits = torch.log(torch.tensor([[0.1, 0.2, 0.3, 0.4]]))
    t2d = torch.tensor([False, True, False, True])
    torch.testing.assert_close(map_target_probs_to_draft(logits, t2d), torch.tensor([[1 / 3, 2 / 3]]))
    torch.testing.assert_close(map_target_probs_to_draft(logits, t2d, renormalize=False), torch.tensor([[0.2, 0.4]]))
    assert draft_label_mask(logits, t2d).tolist() == [True]
    assert draft_label_mask(torch.log(torch.tensor([0.1, 0.2, 0.6, 0.1])), t2d).item() is False


def test_set_vocab_map_checks_shapes():
    drafter = _drafter()
    d2t, t2d = build_vocab_map(torch.arange(256), 64)
    drafter.set_vocab_map(d2t, t2d)
    assert draft_to_target_ids(torch.tensor([0, 63]), drafter.d2t).tolist() == [192, 255]
    with pytest.raises(ValueError):
        drafter.set_vocab_map(d2t[:10], t2d)


def test_forward_shapes_and_hidden_dispatch():
    drafter = _drafter()
    feats, ids = torch.randn(2, 5, 192), torch.randint(0, 256, (2, 5))
    out, logits, (k, v) = drafter(feats, ids)
    assert out.shape == (2, 5, 64) and logits.shape == (2, 5, 64)
    assert k.shape == v.shape == (2, 2, 5, 16)
    out2, logits2, _ = drafter(out, ids)   # own outputs fed back as-is (no fc)
    assert out2.shape == (2, 5, 64)
    with pytest.raises(ValueError):
        drafter(torch.randn(2, 5, 100), ids)


def test_incremental_forward_equals_full():
    drafter = _drafter(seed=1)
    feats, ids = torch.randn(1, 7, 192), torch.randint(0, 256, (1, 7))
    with torch.no_grad():
        full_out, full_logits, full_kv = drafter(feats, ids)
        out_a, logits_a, kv = drafter(feats[:, :4], ids[:, :4])
        out_b, logits_b, kv = drafter(feats[:, 4:6], ids[:, 4:6], past_kv=kv)
        out_c, logits_c, kv = drafter(feats[:, 6:], ids[:, 6:], past_kv=kv)   # single-token step
    torch.testing.assert_close(torch.cat([out_a, out_b, out_c], 1), full_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat([logits_a, logits_b, logits_c], 1), full_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kv[0], full_kv[0])


def test_explicit_mask_and_positions_match_default():
    drafter = _drafter(seed=2)
    feats, ids = torch.randn(1, 5, 192), torch.randint(0, 256, (1, 5))
    with torch.no_grad():
        ref = drafter(feats, ids)[1]
        got = drafter(feats, ids, position_ids=torch.arange(5)[None], attention_mask=causal_mask(5, 0)[None])[1]
        shifted = drafter(feats, ids, position_ids=torch.arange(5)[None] + 3)[1]
    torch.testing.assert_close(got, ref)
    torch.testing.assert_close(shifted, ref, rtol=1e-4, atol=1e-5)  # rope is relative: a shift changes nothing
    assert causal_mask(2, 1).tolist() == [[True, True, False], [True, True, True]]


def test_ttt_mask_hand_built():
    assert ttt_mask(3, 1).int().tolist() == [[1, 0, 0, 1, 0, 0], [1, 1, 0, 0, 1, 0], [1, 1, 1, 0, 0, 1]]


def test_ttt_unroll_matches_inference_chain():
    """Step k, row i of the unrolled TTT pass == drafting k steps from committed pair i with a KV cache."""
    drafter = _drafter(seed=4)
    feats, ids = torch.randn(1, 5, 192), torch.randint(0, 256, (1, 5))
    with torch.no_grad():
        steps = ttt_unroll(drafter, feats, ids, steps=3)
        assert [s.shape for s in steps] == [(1, 5, 64)] * 3
        i = 1
        out, logits, kv = drafter(feats[:, :i + 1], ids[:, :i + 1])   # committed pairs 0..i
        torch.testing.assert_close(steps[0][:, i], logits[:, -1], rtol=1e-5, atol=1e-5)
        hidden = out[:, -1:]
        for k in (1, 2):
            hidden, logits, kv = drafter(hidden, ids[:, i + k:i + k + 1], past_kv=kv,
                                         position_ids=torch.tensor([[i + k]]))
            torch.testing.assert_close(steps[k][:, i], logits[:, 0], rtol=1e-5, atol=1e-5)


LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64, "rope_theta": 5e5}


def test_llama3_target_gets_a_plain_rope_drafter_that_every_host_rotates_alike():
    """Llama-3.1 targets: the drafter rotates with plain RoPE at the target's theta (transformers' plain
    LlamaRotaryEmbedding is the reference), and each host, reading the written config, builds that same rotation
    (host_configs: rules from EAGLE cnets.py, SGLang llama.py, vLLM llama.py). Can fail: had the drafter kept
    the llama3 bands (transformers' llama3 LlamaRotaryEmbedding), its frequencies would differ from every host's."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    from ppow_plugin.host import host_configs
    from ppow_plugin.drafters.eagle3 import rope_inv_freq
    tc = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
                     num_key_value_heads=2, max_position_embeddings=256, rope_scaling=dict(LLAMA3_ROPE))
    cfg = Eagle3Config.from_target_config(tc, 64)
    plain_tc = LlamaConfig(**{**tc.to_dict(), "rope_scaling": None, "rope_parameters": None, "rope_theta": 5e5})
    torch.testing.assert_close(rope_inv_freq(cfg), LlamaRotaryEmbedding(plain_tc).inv_freq.float(), rtol=1e-6, atol=0)
    assert not torch.allclose(rope_inv_freq(cfg), LlamaRotaryEmbedding(tc).inv_freq.float())
    hf = cfg.to_hf_dict()
    assert hf["rope_scaling"] is None and hf["rope_theta"] == 5e5
    assert {host_configs.host_rotation(h, hf) for h in host_configs.HOSTS} == {("default", 5e5)}
    old = dict(hf, rope_scaling=dict(LLAMA3_ROPE))  # what the trainer wrote before: SGLang/vLLM would scale
    assert host_configs.host_rotation("sglang", old) == ("llama3", 5e5) and host_configs.host_problems(old)["eagle"]


def test_unsupported_rope_scaling_is_refused():
    tc = _target_config()
    tc.rope_parameters = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e5}
    with pytest.raises(ValueError, match="rope type 'yarn' is not supported.*default, llama3"):
        Eagle3Config.from_target_config(tc, 64)


@pytest.mark.parametrize("name", ["llama-3.1-8b-instruct", "llama-3.3-70b-instruct", "deepseek-r1-distill-llama-8b"])
def test_llama3_family_configs_give_a_plain_rope_drafter_config(name):
    from transformers import AutoConfig

    from ppow_plugin.host.target_arch import KNOWN_CONFIGS
    tc = AutoConfig.from_pretrained(KNOWN_CONFIGS / name)
    cfg = Eagle3Config.from_target_config(tc, 32000)
    assert cfg.rope_theta == 500000.0 and cfg.to_hf_dict()["rope_scaling"] is None
    assert cfg.feature_layer_ids == (2, tc.num_hidden_layers // 2, tc.num_hidden_layers - 3)
