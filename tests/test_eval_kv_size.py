"""`ppow eval` sizes the target's KV cache and rotary tables once per evaluation, to its longest prompt +
--max-new-tokens + the tree (`decode_positions`), not to the model's full context (issue 26: 131 072 positions,
~17 GB at Llama-3.1-8B in bf16); decoding is unchanged by it. Tiny 5-layer target (context 512), a few seconds."""

from pathlib import Path

import pytest
import torch

from ppow_plugin.drafters import export
from ppow_plugin.errors import UserError
from ppow_plugin.evaluation import decode_positions, evaluate, tree_decode
from ppow_plugin.host import eagle_compat, patching
from tiny import make_target

if patching.patch_status().state != "patched":
    pytest.skip("the EAGLE host is not installed and patched (`ppow patch apply`)", allow_module_level=True)

CONTEXT = 512  # tiny.make_target's max_position_embeddings
NEW = 12
TREE = evaluate.Eagle3Tree(depth=2, top_k=3, total_tokens=6)
PROMPTS = [evaluate.EvalPrompt("mt_bench", str(i), (" ".join(f"w{i + k}" for k in range(n)),))
           for i, n in ((1, 3), (40, 9), (77, 5))]


def test_positions_are_the_longest_fitting_turn_plus_new_tokens_and_margin() -> None:
    assert decode_positions.kv_positions([10, 30, 20], 8, 5, 512) == 30 + 8 + 5
    assert decode_positions.kv_positions([10, 600], 8, 5, 512) == 10 + 8 + 5  # a turn past the context is skipped
    assert decode_positions.kv_positions([499, 500], 8, 5, 512) == 512  # 499 + 13 fills the context exactly
    assert decode_positions.decode_margin(None) == decode_positions.MARGIN_TOKENS
    assert decode_positions.decode_margin(TREE) == TREE.depth + TREE.total_tokens + 2
    # can fail: the context instead of the need would give 512 in the first case


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny target, an EAGLE-1 drafter that predicts the input token's embedding (accepted now and then),
    and a random EAGLE-3 drafter (reduced vocabulary of 64)."""
    from ppow_plugin.drafters.eagle3 import Eagle3Config, Eagle3Drafter
    root = tmp_path_factory.mktemp("kv")
    target_dir = make_target(root / "target", layers=5)
    from transformers import AutoConfig, AutoModelForCausalLM
    config = AutoConfig.from_pretrained(str(target_dir))
    embed = AutoModelForCausalLM.from_pretrained(str(target_dir)).get_input_embeddings().weight.detach()
    drafter = eagle_compat.new_eagle1_drafter(config, bias=True, embed_weight=embed)
    with torch.no_grad():
        drafter.fc.weight.zero_()
        drafter.fc.weight[:, :64] = torch.eye(64)
        drafter.layers[0].self_attn.o_proj.weight.zero_()
        drafter.layers[0].mlp.down_proj.weight.zero_()
    export.save_drafter_dir(root / "eagle1", drafter.state_dict(), eagle_compat.eagle1_config_dict(config), {})
    torch.manual_seed(0)
    cfg = Eagle3Config.from_target_config(config, 64)
    export.save_eagle3_dir(root / "eagle3", Eagle3Drafter(cfg).state_dict(), cfg.to_hf_dict(), {})
    return {"target": target_dir, "eagle1": root / "eagle1", "eagle3": root / "eagle3"}


def _cache_positions(dec) -> tuple[int, int]:
    """(KV-cache positions, target rotary rows) the decoders hold."""
    if dec.eagle3 is not None:
        target, _, kv = dec.eagle3
        return eagle_compat.kv_positions(kv), target.model.layers[0].self_attn.rotary_emb.cos_cached.shape[2]
    ea = dec.ea_model
    return (ea.past_key_values_data[0].shape[3],  # [2 L, 1, kv_heads, positions, head_dim]
            ea.base_model.model.layers[0].self_attn.rotary_emb.cos_cached.shape[2])


@pytest.mark.parametrize("kind", ["eagle1", "eagle3"])
def test_eval_allocates_what_its_prompts_reach_and_decodes_the_same(kind: str, dirs: dict, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    loaded = []
    real = evaluate._load_decoders
    monkeypatch.setattr(evaluate, "_load_decoders", lambda *a, **k: loaded.append(real(*a, **k)) or loaded[-1])
    report = evaluate.evaluate(dirs["target"], dirs[kind], prompts=PROMPTS, max_new_tokens=NEW, progress=False,
                               tree=TREE)
    dec = loaded[0]
    longest = max(decode_positions.format_turns(dec.tokenizer, p.turns, []).shape[1] for p in PROMPTS)
    need = longest + NEW + (TREE.depth + TREE.total_tokens + 2 if kind == "eagle3" else decode_positions.MARGIN_TOKENS)
    assert need < CONTEXT and dec.positions == need
    # what was allocated and used for the whole evaluation (eagenerate reuses the EaModel's cache when set)
    assert _cache_positions(dec) == (need, need)  # can fail: `positions = None` in _load_decoders gives 512
    assert report.overall.mismatches == 0 and report.overall.prompts == len(PROMPTS)

    # the tokens equal those of decoders at the model's full context (the host's own sizing)
    full = real(dirs["target"], dirs[kind], tmp_path, kind, TREE)
    for p in PROMPTS:
        ids = decode_positions.format_turns(dec.tokenizer, p.turns, [])
        sized, whole = (evaluate._host_generate(d, ids, 0.0, NEW) for d in (dec, full))
        assert torch.equal(sized.output_ids, whole.output_ids) and sized.accept_lengths == whole.accept_lengths
    assert _cache_positions(full)[0] == CONTEXT and _cache_positions(dec) == (need, need)  # the host kept ours
    if kind == "eagle1":
        assert any(a > 0 for r in report.records for a in r.accept_lengths)  # the tree's KV compaction ran


def test_second_turns_fit_their_bound_and_a_broken_bound_is_one_error(dirs: dict,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """--both-turns: a second turn counts its earlier answer as ANSWER_BOUND x max_new_tokens tokens. Can fail:
    with a bound of 0 the second turn (which carries a real answer) does not fit and the user gets one error."""
    two = [evaluate.EvalPrompt("mt_bench", "81", ("w1 w2 w3", "w4 w5"))]
    report = evaluate.evaluate(dirs["target"], dirs["eagle1"], prompts=two, max_new_tokens=NEW, progress=False)
    assert [r.prompt_id for r in report.records] == ["81/turn1", "81/turn2"]
    monkeypatch.setattr(decode_positions, "ANSWER_BOUND", 0)
    with pytest.raises(UserError, match=r"turn 2 of prompt 81 has \d+ tokens, more than the KV cache sized for this "
                                        r"evaluation \(\d+ positions\) allows with --max-new-tokens 12; drop"):
        evaluate.evaluate(dirs["target"], dirs["eagle1"], prompts=two, max_new_tokens=NEW, progress=False)


def test_a_cache_one_position_short_is_refused(dirs: dict) -> None:
    """generate_eagle3 checks the cache it is given against what the call can reach (can fail: drop the check,
    then the forward past the cache's end raises inside the host, or writes past what the caller sized)."""
    from ppow_plugin.drafters import adapters
    target = eagle_compat.load_host_target(dirs["target"])
    drafter = adapters.load_eagle3_drafter(dirs["eagle3"], target, torch.float32).eval()
    ids = torch.tensor([[2, 4, 10, 11, 12]])
    need = tree_decode.positions_needed(ids.shape[1], NEW, TREE.depth, TREE.total_tokens)
    out = tree_decode.generate_eagle3(target, drafter, ids, NEW, 0.0, *TREE,
                                      kv_cache=eagle_compat.new_kv_cache(target, need))
    assert out.new_tokens >= NEW
    with pytest.raises(ValueError, match=f"needs {need} positions; the target has 512, its KV cache {need - 1}"):
        tree_decode.generate_eagle3(target, drafter, ids, NEW, 0.0, *TREE,
                                    kv_cache=eagle_compat.new_kv_cache(target, need - 1))
