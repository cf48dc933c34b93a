"""The EAGLE-1 host bridge: loading, the drafter contract, and lossless greedy decoding vs HF `generate`.

Tiny random Llama targets (rope_theta 1e5, so the rope-base patch matters), Qwen2 targets (non-zero
q/k/v biases, rope_theta 1e6, patch 0004), and Llama-3.1 / Qwen3 targets built from the real configs in
ppow_plugin/known_configs with layers and widths shrunk (llama3 rope: patch 0005; q/k norms and a decoupled
head_dim: patch 0006), with a word-level tokenizer; one slow test on the real SmolLM2-135M-Instruct target
with MT-Bench prompts (Qwen2.5-Coder: tests/test_qwen_recipe.py).
"""

import json
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from ppow_plugin.host import eagle_compat, patching, target_arch
from ppow_plugin.errors import UserError

if patching.patch_status().state in ("missing", "wrong-version"):
    pytest.skip("eagle-llm 1.2.1 is not installed", allow_module_level=True)

VOCAB = 256
EOS = 1


def _save_tokenizer(out_dir: Path) -> None:
    """Word-level tokenizer "t0".."t255" (EaModel reads the target dir's tokenizer for its EOS id)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t3"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="t0", eos_token=f"t{EOS}",
                            unk_token="t3").save_pretrained(out_dir)


def _make_target(out_dir: Path, tie: bool, residual_scale: float, seed: int = 0) -> LlamaForCausalLM:
    """A 3-layer random Llama saved to `out_dir`. `residual_scale` < 1 shrinks what attention and MLP
    add to the residual stream, so the model is close to a bigram model (see `_bigram_drafter`)."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         rope_theta=1e5, bos_token_id=0, eos_token_id=EOS, tie_word_embeddings=tie)
    return _shrink_residuals_and_save(LlamaForCausalLM(config).eval(), out_dir, residual_scale)


def _shrink_residuals_and_save(model, out_dir: Path, residual_scale: float):
    """Scale what attention and MLP add to the residual stream, save model and tokenizer; returns the model."""
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.mul_(residual_scale)
            layer.mlp.down_proj.weight.mul_(residual_scale)
    model.save_pretrained(out_dir)
    _save_tokenizer(out_dir)
    return model


@pytest.fixture(scope="module")
def near_bigram_target(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, LlamaForCausalLM]:
    out_dir = tmp_path_factory.mktemp("target_untied")
    return out_dir, _make_target(out_dir, tie=False, residual_scale=0.3)


@pytest.fixture(scope="module")
def tied_target(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, LlamaForCausalLM]:
    out_dir = tmp_path_factory.mktemp("target_tied")
    return out_dir, _make_target(out_dir, tie=True, residual_scale=1.0, seed=1)


def _bigram_drafter(drafter: torch.nn.Module) -> torch.nn.Module:
    """Make the drafter output the embedding of its input token: fc = [I | 0], its layer adds nothing.
    For a target whose features are ~norm(embed(x_t)), lm_head of that predicts the target's next token,
    so this drafter is often right (long accepted prefixes, off-first-branch acceptances)."""
    hidden = drafter.fc.weight.shape[0]
    with torch.no_grad():
        drafter.fc.weight.zero_()
        drafter.fc.weight[:, :hidden] = torch.eye(hidden)
        drafter.fc.bias.zero_()
        drafter.layers[0].self_attn.o_proj.weight.zero_()
        drafter.layers[0].mlp.down_proj.weight.zero_()
    return drafter


def _save_drafter(drafter: torch.nn.Module, target_config: LlamaConfig, out_dir: Path, bias: bool) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(eagle_compat.eagle1_config_dict(target_config, bias)))
    torch.save(drafter.state_dict(), out_dir / "pytorch_model.bin")
    return out_dir


def _hf_greedy(model: torch.nn.Module, prompt: torch.Tensor, n: int) -> list[int]:
    out = model.generate(prompt, max_new_tokens=n, do_sample=False, eos_token_id=model.config.eos_token_id,
                         pad_token_id=model.config.eos_token_id)
    return out[0, prompt.shape[1]:].tolist()


def _check_lossless_and_accounting(result: eagle_compat.HostGenerateResult, prompt: torch.Tensor,
                                   reference: list[int], n: int, max_depth: int) -> None:
    generated = result.output_ids[0, prompt.shape[1]:].tolist()
    assert generated[: len(reference)] == reference
    if EOS not in reference and len(reference) == n:
        assert len(generated) > n  # eagenerate stops once more than max_new_tokens are committed
    # one cycle commits its accepted drafts plus the root token sampled by the previous cycle
    assert result.new_tokens == len(generated)
    assert len(result.accept_lengths) == result.cycles
    assert sum(result.accept_lengths) + result.cycles == result.new_tokens
    assert all(0 <= a <= max_depth for a in result.accept_lengths)


def _tree_depth() -> int:
    return max(len(path) for path in eagle_compat.default_tree_choices())


@pytest.mark.parametrize("fixture", ["near_bigram_target", "tied_target"])
def test_load_host_target_matches_hf(fixture: str, request: pytest.FixtureRequest) -> None:
    target_dir, hf_model = request.getfixturevalue(fixture)
    host = eagle_compat.load_host_target(target_dir)
    assert not host.training and not any(p.requires_grad for p in host.parameters())
    if hf_model.config.tie_word_embeddings:
        assert host.lm_head.weight.data_ptr() == host.model.embed_tokens.weight.data_ptr()
    ids = torch.randint(2, VOCAB, (2, 17))
    with torch.no_grad():
        torch.testing.assert_close(host(ids).logits, hf_model(ids).logits, rtol=1e-4, atol=1e-5)
    rotary = host.model.layers[0].self_attn.rotary_emb
    assert rotary.base == 1e5 and rotary.cos_cached.dtype == torch.float32


def test_host_kv_cache_and_features(near_bigram_target: tuple[Path, LlamaForCausalLM]) -> None:
    """Features = final-norm output (HF's last hidden state); the host cache continues a sequence."""
    target_dir, hf_model = near_bigram_target
    host = eagle_compat.load_host_target(target_dir)
    ids = torch.randint(2, VOCAB, (1, 12))
    kv = eagle_compat.new_kv_cache(host)
    with torch.no_grad():
        full = host.model(input_ids=ids)[0]                      # [1, 12, H]
        reference = hf_model(ids, output_hidden_states=True).hidden_states[-1]
        head = host.model(input_ids=ids[:, :9], past_key_values=kv)[0]
        tail = host.model(input_ids=ids[:, 9:], past_key_values=kv)[0]
        assert kv[0][0].current_length.item() == 12
        eagle_compat.reset_kv(kv)
        again = host.model(input_ids=ids, past_key_values=kv)[0]
    torch.testing.assert_close(full, reference, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(torch.cat([head, tail], dim=1), full, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(again, full, rtol=1e-4, atol=1e-5)


def test_load_drafter_weights_is_strict(near_bigram_target: tuple[Path, LlamaForCausalLM]) -> None:
    _, target = near_bigram_target
    with_bias = eagle_compat.new_eagle1_drafter(target.config, bias=True)
    without_bias = eagle_compat.new_eagle1_drafter(target.config, bias=False)
    with pytest.raises(UserError, match=r"unexpected \['fc.bias'\]"):
        eagle_compat.load_drafter_weights(without_bias, with_bias.state_dict())
    state = {k: v for k, v in with_bias.state_dict().items() if k != "fc.bias"}
    eagle_compat.load_drafter_weights(without_bias, state)
    assert torch.equal(without_bias.fc.weight, with_bias.fc.weight)


def test_load_host_target_rejects_other_architectures(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gemma", "architectures": ["GemmaForCausalLM"]}))
    with pytest.raises(UserError, match="supports only LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM"):
        eagle_compat.load_host_target(tmp_path)


def test_load_host_target_rejects_sliding_window(tmp_path: Path) -> None:
    config = Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, use_sliding_window=True, sliding_window=64)
    config.architectures = ["Qwen2ForCausalLM"]
    config.save_pretrained(tmp_path)
    with pytest.raises(UserError, match="sliding-window attention"):
        eagle_compat.load_host_target(tmp_path)


@pytest.mark.parametrize("bias", [True, False])
def test_new_drafter_contract(near_bigram_target: tuple[Path, LlamaForCausalLM], bias: bool) -> None:
    _, target = near_bigram_target
    embed = target.get_input_embeddings().weight
    drafter = eagle_compat.new_eagle1_drafter(target.config, bias=bias, embed_weight=embed)
    keys = set(drafter.state_dict())
    assert ("fc.bias" in keys) == bias
    assert "layers.0.input_layernorm.weight" not in keys and len(drafter.layers) == 1
    assert torch.equal(drafter.embed_tokens.weight, embed) and not drafter.embed_tokens.weight.requires_grad

    drafter.train()  # with the host's gradient checkpointing left on, train mode returned no KV
    features = torch.randn(2, 7, 64)    # [B, T, H] target features f_0..f_6
    shifted_ids = torch.randint(2, VOCAB, (2, 7))  # [B, T] tokens x_1..x_7
    out, kv = drafter(features, input_ids=shifted_ids, use_cache=True)
    assert out.shape == (2, 7, 64) and len(kv) == 1 and kv[0][0].shape == (2, 2, 7, 16)
    out.sum().backward()
    assert drafter.fc.weight.grad is not None

    # the KV cache continues the sequence: last position computed incrementally == full forward
    drafter.eval()
    with torch.no_grad():
        full = drafter(features, input_ids=shifted_ids)
        _, kv = drafter(features[:, :6], input_ids=shifted_ids[:, :6], use_cache=True)
        last, _ = drafter(features[:, 6:], input_ids=shifted_ids[:, 6:], past_key_values=kv, use_cache=True)
    torch.testing.assert_close(last, full[:, 6:], rtol=1e-4, atol=1e-5)


def test_greedy_host_generate_is_lossless_with_random_drafter(
        near_bigram_target: tuple[Path, LlamaForCausalLM], tmp_path: Path) -> None:
    target_dir, target = near_bigram_target
    drafter = eagle_compat.new_eagle1_drafter(target.config, bias=True,
                                              embed_weight=target.get_input_embeddings().weight)
    ea_model = eagle_compat.load_ea_model(target_dir, _save_drafter(drafter, target.config, tmp_path, True))
    torch.manual_seed(2)
    for length in (3, 8, 13):
        prompt = torch.randint(2, VOCAB, (1, length))
        result = eagle_compat.host_generate(ea_model, prompt, temperature=0.0, max_new_tokens=24)
        _check_lossless_and_accounting(result, prompt, _hf_greedy(target, prompt, 24), 24, _tree_depth())


def test_greedy_host_generate_is_lossless_with_accepting_drafter(
        near_bigram_target: tuple[Path, LlamaForCausalLM], tmp_path: Path) -> None:
    target_dir, target = near_bigram_target
    drafter = eagle_compat.new_eagle1_drafter(target.config, bias=True,
                                              embed_weight=target.get_input_embeddings().weight)
    drafter_dir = _save_drafter(_bigram_drafter(drafter), target.config, tmp_path, True)
    ea_model = eagle_compat.load_ea_model(target_dir, drafter_dir)
    torch.manual_seed(3)
    all_accepts = []
    for length in (4, 9, 5, 12):
        prompt = torch.randint(2, VOCAB, (1, length))
        result = eagle_compat.host_generate(ea_model, prompt, temperature=0.0, max_new_tokens=40)
        _check_lossless_and_accounting(result, prompt, _hf_greedy(target, prompt, 40), 40, _tree_depth())
        all_accepts += result.accept_lengths
    assert max(all_accepts) == _tree_depth() and min(all_accepts) < _tree_depth()  # full and partial accepts


def test_tied_target_and_bias_free_drafter_round_trip(tied_target: tuple[Path, LlamaForCausalLM],
                                                      tmp_path: Path) -> None:
    target_dir, target = tied_target
    drafter = eagle_compat.new_eagle1_drafter(target.config, bias=False,
                                              embed_weight=target.get_input_embeddings().weight)
    ea_model = eagle_compat.load_ea_model(target_dir, _save_drafter(drafter, target.config, tmp_path, False))
    for name, tensor in drafter.state_dict().items():  # strict load: every key, same values
        assert torch.equal(ea_model.ea_layer.state_dict()[name], tensor), name
    prompt = torch.randint(2, VOCAB, (1, 6))
    result = eagle_compat.host_generate(ea_model, prompt, max_new_tokens=16)
    _check_lossless_and_accounting(result, prompt, _hf_greedy(target, prompt, 16), 16, _tree_depth())


def test_sampling_runs_and_keeps_accounting(near_bigram_target: tuple[Path, LlamaForCausalLM],
                                            tmp_path: Path) -> None:
    target_dir, target = near_bigram_target
    drafter = eagle_compat.new_eagle1_drafter(target.config, embed_weight=target.get_input_embeddings().weight)
    ea_model = eagle_compat.load_ea_model(target_dir, _save_drafter(_bigram_drafter(drafter), target.config,
                                                                    tmp_path, True))
    torch.manual_seed(4)
    result = eagle_compat.host_generate(ea_model, torch.randint(2, VOCAB, (1, 5)), temperature=0.8,
                                        max_new_tokens=20)
    assert sum(result.accept_lengths) + result.cycles == result.new_tokens == result.output_ids.shape[1] - 5


def test_tree_helpers_are_reexported() -> None:
    buffers = eagle_compat.generate_tree_buffers(device="cpu")
    nodes = len(eagle_compat.default_tree_choices())
    assert buffers["tree_attn_mask"].shape[-1] == nodes + 1  # + the root
    assert buffers["retrieve_indices"].shape[1] == _tree_depth() + 1


# --------------------------------------------------------------------------------------------------
# Qwen2 targets (patch 0004): Llama + q/k/v biases


def _make_qwen2_target(out_dir: Path, tie: bool, residual_scale: float = 1.0, seed: int = 5) -> Qwen2ForCausalLM:
    """A 3-layer random Qwen2 saved to `out_dir`, its q/k/v biases drawn non-zero (HF initialises them to 0,
    which would hide a host that drops them). `residual_scale` as in `_make_target`."""
    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         rope_theta=1e6, bos_token_id=0, eos_token_id=EOS, tie_word_embeddings=tie)
    model = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0.0, 0.5)
    return _shrink_residuals_and_save(model, out_dir, residual_scale)


@pytest.fixture(scope="module")
def qwen2_target(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Qwen2ForCausalLM]:
    out_dir = tmp_path_factory.mktemp("qwen2_untied")
    return out_dir, _make_qwen2_target(out_dir, tie=False, residual_scale=0.1)


@pytest.mark.parametrize("tie", [False, True])
def test_qwen2_target_matches_hf(tie: bool, tmp_path: Path) -> None:
    hf_model = _make_qwen2_target(tmp_path, tie=tie)
    host = eagle_compat.load_host_target(tmp_path)
    attn = host.model.layers[1].self_attn
    assert attn.o_proj.bias is None
    torch.testing.assert_close(attn.k_proj.bias, hf_model.model.layers[1].self_attn.k_proj.bias)
    assert attn.rotary_emb.base == 1e6
    ids = torch.randint(2, VOCAB, (2, 19))
    with torch.no_grad():
        host_logits, hf_logits = host(ids).logits, hf_model(ids).logits
        torch.testing.assert_close(host_logits, hf_logits, rtol=1e-4, atol=1e-5)
        # the tolerance tells models apart: HF without the q/k/v biases is far outside it
        for layer in hf_model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.zero_()
        assert (host_logits - hf_model(ids).logits).abs().max() > 1e-2


def test_qwen2_target_loaded_without_biases_is_refused(qwen2_target: tuple[Path, Qwen2ForCausalLM],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """If transformers stopped keeping `model_type` on the host's config, patch 0004 would build no q/k/v
    biases and the target would silently decode a different model; the bridge refuses instead."""
    target_dir, _ = qwen2_target
    read = eagle_compat._host_config

    def as_llama(path):
        config = read(path)
        config.model_type = "llama"
        return config

    monkeypatch.setattr(eagle_compat, "_host_config", as_llama)
    with pytest.raises(UserError, match="without its q/k/v biases"):
        eagle_compat.load_host_target(target_dir)


def test_qwen2_drafter_config_is_eagle1_llama(qwen2_target: tuple[Path, Qwen2ForCausalLM]) -> None:
    """The drafter stays an EAGLE-1 Llama layer (no q/k/v bias, as the host's cnets) with Qwen2's rope base."""
    _, target = qwen2_target
    config = eagle_compat.eagle1_config_dict(target.config)
    assert config["architectures"] == ["LlamaForCausalLM"] and config["rope_theta"] == 1e6
    drafter = eagle_compat.new_eagle1_drafter(target.config, embed_weight=target.get_input_embeddings().weight)
    assert drafter.layers[0].self_attn.q_proj.bias is None and drafter.fc.bias is not None
    assert drafter.layers[0].self_attn.rotary_emb.base == 1e6


def test_qwen2_greedy_host_generate_is_lossless(qwen2_target: tuple[Path, Qwen2ForCausalLM],
                                                tmp_path: Path) -> None:
    """Random drafter (mostly rejected) and bigram drafter (long accepted prefixes): both == HF greedy."""
    target_dir, target = qwen2_target
    embed = target.get_input_embeddings().weight
    torch.manual_seed(6)
    random_drafter = eagle_compat.new_eagle1_drafter(target.config, embed_weight=embed)
    accepting = _bigram_drafter(eagle_compat.new_eagle1_drafter(target.config, embed_weight=embed))
    accepts = []
    for name, drafter in (("random", random_drafter), ("bigram", accepting)):
        ea_model = eagle_compat.load_ea_model(target_dir, _save_drafter(drafter, target.config, tmp_path / name, True))
        for length in (3, 9, 14):
            prompt = torch.randint(2, VOCAB, (1, length))
            result = eagle_compat.host_generate(ea_model, prompt, temperature=0.0, max_new_tokens=32)
            _check_lossless_and_accounting(result, prompt, _hf_greedy(target, prompt, 32), 32, _tree_depth())
            accepts += result.accept_lengths if name == "bigram" else []
    assert max(accepts) >= 2  # verification of multi-token drafts ran through the biased attention


@pytest.mark.slow
def test_smollm2_greedy_host_generate_is_lossless(tmp_path: Path) -> None:
    """Real target, random-init EAGLE-1 drafter, MT-Bench first turns: 64 new tokens == HF greedy."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ppow_plugin.host.assets import default_target_dir
    from ppow_plugin.data.datasets import load_mt_bench

    target_dir = default_target_dir(prepare=True)
    tokenizer = AutoTokenizer.from_pretrained(target_dir)
    target = AutoModelForCausalLM.from_pretrained(target_dir, dtype=torch.float32).eval()
    torch.manual_seed(0)
    drafter = eagle_compat.new_eagle1_drafter(target.config, bias=True,
                                              embed_weight=target.get_input_embeddings().weight)
    ea_model = eagle_compat.load_ea_model(target_dir, _save_drafter(drafter, target.config, tmp_path, True))

    questions = {q.category: q for q in load_mt_bench()}  # one per category, deterministic
    for category in ("writing", "reasoning", "coding"):
        messages = [{"role": "user", "content": questions[category].turns[0]}]
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                               return_dict=True)["input_ids"]
        result = eagle_compat.host_generate(ea_model, prompt, temperature=0.0, max_new_tokens=64)
        reference = target.generate(prompt, max_new_tokens=64, do_sample=False)[0, prompt.shape[1]:].tolist()
        generated = result.output_ids[0, prompt.shape[1]:].tolist()
        assert generated[: len(reference)] == reference, category
        assert sum(result.accept_lengths) + result.cycles == result.new_tokens == len(generated)


# --------------------------------------------------------------------------------------------------
# Llama-3.x (patch 0005: llama3 rope) and Qwen3 (patch 0006: q/k norms, head_dim of its own) targets,
# built from the real configs with layers and widths shrunk; every other field kept as published.

REAL_CONFIGS = target_arch.KNOWN_CONFIGS  # packaged config-only copies of the recipes' targets
# name -> shrunk sizes; GQA ratio kept, Qwen3-32B's head_dim stays decoupled (8 x 32 != 160)
TINY = {
    "llama-3.1-8b-instruct": dict(hidden_size=256, num_attention_heads=8, num_key_value_heads=2,
                                  intermediate_size=512),
    "qwen3-8b": dict(hidden_size=128, num_attention_heads=8, num_key_value_heads=2, head_dim=16,
                     intermediate_size=256),
    "qwen3-32b": dict(hidden_size=160, num_attention_heads=8, num_key_value_heads=1, head_dim=32,
                      intermediate_size=256),
}


def _make_real_config_target(name: str, out_dir: Path, residual_scale: float = 1.0, seed: int = 7):
    """A 2-layer random target from `ppow_plugin/known_configs/<name>` (sizes from `TINY`, vocab VOCAB), saved
    with the tokenizer. Qwen3's q/k norm weights are drawn away from 1 (HF initialises them to ones)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config_dict = json.loads((REAL_CONFIGS / name / "config.json").read_text())
    config_dict.update(TINY[name], num_hidden_layers=2, vocab_size=VOCAB, bos_token_id=0, eos_token_id=EOS)
    config = AutoConfig.for_model(**config_dict)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            for norm in (getattr(layer.self_attn, "q_norm", None), getattr(layer.self_attn, "k_norm", None)):
                if norm is not None:
                    norm.weight.uniform_(0.5, 1.5)
    return _shrink_residuals_and_save(model, out_dir, residual_scale)


def _logits_gap(host, hf_model, ids: torch.Tensor) -> float:
    with torch.no_grad():
        return (host(ids).logits - hf_model(ids).logits).abs().max().item()


def test_llama3_target_matches_hf(tmp_path: Path) -> None:
    """Llama-3.1's rope (theta 5e5, llama3 scaling: factor 8, bands at 8192 / 4 and 8192 / 1 wavelengths) on
    the host == HF within 1e-5; HF with plain rope is far outside that, so a host without patch 0005's
    frequency bands would fail here."""
    hf_model = _make_real_config_target("llama-3.1-8b-instruct", tmp_path)
    host = eagle_compat.load_host_target(tmp_path)
    rotary = host.model.layers[0].self_attn.rotary_emb
    assert type(rotary).__name__ == "LlamaLlama3ScalingRotaryEmbedding" and rotary.base == 5e5
    assert (rotary.scaling_factor, rotary.original_max_position_embeddings) == (8.0, 8192)
    ids = torch.randint(2, VOCAB, (2, 96))  # long enough for the low and middle bands to turn visibly
    with torch.no_grad():
        torch.testing.assert_close(host(ids).logits, hf_model(ids).logits, rtol=1e-4, atol=1e-5)
    # switched off: the same weights under plain rope (theta kept) are far outside the tolerance
    from transformers import AutoModelForCausalLM

    plain = hf_model.config.to_dict()
    plain["rope_parameters"] = {"rope_type": "default", "rope_theta": 5e5}
    plain_model = AutoModelForCausalLM.from_config(type(hf_model.config).from_dict(plain), dtype=torch.float32)
    plain_model.load_state_dict(hf_model.state_dict())
    assert _logits_gap(host, plain_model.eval(), ids) > 1e-3


@pytest.mark.parametrize("name", ["qwen3-8b", "qwen3-32b"])
def test_qwen3_target_matches_hf(name: str, tmp_path: Path) -> None:
    """Qwen3 on the host == HF within 1e-5 (q/k norms, no q/k/v bias, head_dim from the config); HF with the
    q/k norms switched off is far outside the tolerance."""
    hf_model = _make_real_config_target(name, tmp_path)
    host = eagle_compat.load_host_target(tmp_path)
    attn = host.model.layers[1].self_attn
    assert attn.q_proj.bias is None and attn.head_dim == TINY[name]["head_dim"]
    torch.testing.assert_close(attn.k_norm.weight, hf_model.model.layers[1].self_attn.k_norm.weight)
    ids = torch.randint(2, VOCAB, (2, 19))
    with torch.no_grad():
        torch.testing.assert_close(host(ids).logits, hf_model(ids).logits, rtol=1e-4, atol=1e-5)
        for layer in hf_model.model.layers:
            layer.self_attn.q_norm = torch.nn.Identity()
            layer.self_attn.k_norm = torch.nn.Identity()
    assert _logits_gap(host, hf_model, ids) > 1e-2


def test_qwen3_target_loaded_without_norms_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """If the loaded config stopped saying qwen3, patch 0006 would build no q/k norms; refuse, as for Qwen2."""
    _make_real_config_target("qwen3-8b", tmp_path)
    read = eagle_compat._host_config

    def as_llama(path):
        config = read(path)
        config.model_type = "llama"
        return config

    monkeypatch.setattr(eagle_compat, "_host_config", as_llama)
    with pytest.raises(UserError, match="Qwen3 target .* without its q/k norms"):
        eagle_compat.load_host_target(tmp_path)


@pytest.mark.parametrize("name", ["llama-3.1-8b-instruct", "qwen3-32b"])
def test_real_config_greedy_host_generate_is_lossless(name: str, tmp_path: Path) -> None:
    """Random drafter (mostly rejected) and bigram drafter (long accepted prefixes): host greedy == HF greedy
    through tree verification, the host KV cache (head_dim 32 on Qwen3-32B's decoupled shape) and llama3 rope."""
    target = _make_real_config_target(name, tmp_path / "target", residual_scale=0.1)
    embed = target.get_input_embeddings().weight
    torch.manual_seed(8)
    accepts = []
    for kind in ("random", "bigram"):
        drafter = eagle_compat.new_eagle1_drafter(target.config, embed_weight=embed)
        drafter = _bigram_drafter(drafter) if kind == "bigram" else drafter
        ea_model = eagle_compat.load_ea_model(tmp_path / "target",
                                              _save_drafter(drafter, target.config, tmp_path / kind, True))
        for length in (3, 11):
            prompt = torch.randint(2, VOCAB, (1, length))
            result = eagle_compat.host_generate(ea_model, prompt, temperature=0.0, max_new_tokens=24)
            _check_lossless_and_accounting(result, prompt, _hf_greedy(target, prompt, 24), 24, _tree_depth())
            accepts += result.accept_lengths if kind == "bigram" else []
    assert max(accepts) >= 2  # multi-token drafts were verified through the new attention pieces


@pytest.mark.parametrize("name", sorted(p.name for p in REAL_CONFIGS.iterdir() if p.is_dir()))
def test_every_real_config_field_is_accounted_for(name: str) -> None:
    """Every field of every recipe target's config (the file and what transformers 5 makes of it) is in
    `CONFIG_FIELDS`, and every one of these targets passes the host's checks."""
    from transformers import AutoConfig

    from ppow_plugin.host import target_fields

    raw = json.loads((REAL_CONFIGS / name / "config.json").read_text())
    config = AutoConfig.from_pretrained(REAL_CONFIGS / name)
    unknown = (set(raw) | set(config.to_dict())) - set(target_fields.CONFIG_FIELDS)
    assert not unknown, f"{name}: fields the host table does not account for: {sorted(unknown)}"
    target_fields.check_target_config(config, name)


def _refusal(tmp_path: Path, name: str, **changes) -> str:
    config_dict = json.loads((REAL_CONFIGS / name / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config_dict, **changes}))
    with pytest.raises(UserError) as err:
        eagle_compat.load_host_target(tmp_path)
    return str(err.value)


@pytest.mark.parametrize("name, changes, says", [
    ("qwen3-8b", dict(use_sliding_window=True, sliding_window=4096, max_window_layers=28), "sliding-window"),
    ("qwen3-8b", dict(architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", num_experts=128,
                      num_experts_per_tok=8, moe_intermediate_size=768), "mixture-of-experts"),
    ("llama-3.1-8b-instruct", dict(rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                                 "original_max_position_embeddings": 32768}), "rope yarn"),
    ("llama-3.1-8b-instruct", dict(mlp_bias=True), "MLP biases"),
])
def test_what_the_host_cannot_run_is_refused_in_one_line(name: str, changes: dict, says: str,
                                                         tmp_path: Path) -> None:
    message = _refusal(tmp_path, name, **changes)
    assert says in message and "\n" not in message
