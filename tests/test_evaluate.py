"""`ppow eval` / `ppow compare`: hand-computed τ accounting, input errors, and end-to-end runs on a tiny
random Llama target (word-level tokenizer with a toy chat template; benchmark loaders monkeypatched)."""

import json
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from ppow_plugin import cli
from ppow_plugin.data import datasets
from ppow_plugin.drafters import export, formats
from ppow_plugin.evaluation import evaluate, inputs
from ppow_plugin.host import eagle_compat, patching
from ppow_plugin.errors import UserError
from ppow_plugin.evaluation.eval_report import (PromptRecord, accept_histogram, acceptance_rates, first_mismatch, summarize,
                                     truncate_generation)

EOS = 1
VOCAB = 64


# --- pure accounting -------------------------------------------------------------------------------


def test_truncate_overshoot_counts_the_partly_kept_last_cycle() -> None:
    # accept [2, 0, 3] -> blocks of 3, 1, 4 tokens = 8 committed; budget 5 keeps 3 + 1 + 1 of them
    kept = truncate_generation(list(range(10, 18)), [2, 0, 3], eos_token_id=EOS, max_new_tokens=5)
    assert kept.tokens == [10, 11, 12, 13, 14]
    assert (kept.cycles, kept.accept_lengths, kept.last_cycle_kept) == (3, [2, 0, 3], 1)
    assert len(kept.tokens) / kept.cycles == pytest.approx(5 / 3)  # host's untruncated figure: 8 / 3


def test_truncate_early_eos_drops_later_tokens_and_cycles() -> None:
    # EOS is the 3rd token of cycle 1 (accept 2 + bonus): cycle 2 and the rest of the output do not count
    kept = truncate_generation([10, 11, EOS, 12, 13, 14], [2, 2], eos_token_id=EOS, max_new_tokens=100)
    assert (kept.tokens, kept.cycles, kept.accept_lengths, kept.last_cycle_kept) == ([10, 11, EOS], 1, [2], 3)


def test_truncate_eos_as_first_token_of_a_cycle() -> None:
    # blocks [2, 4]; EOS at index 2 = the root token that cycle 2 commits: 2 cycles, 1 kept token in the last
    kept = truncate_generation([10, 11, EOS, 12, 13, 14], [1, 3], eos_token_id=EOS, max_new_tokens=100)
    assert (len(kept.tokens), kept.cycles, kept.accept_lengths, kept.last_cycle_kept) == (3, 2, [1, 3], 1)


def test_truncate_nothing_to_cut_matches_host_tau() -> None:
    kept = truncate_generation([5, 6, 7, 8, 9, 10], [4, 0], eos_token_id=EOS, max_new_tokens=6)
    assert (kept.cycles, kept.last_cycle_kept) == (2, 1) and len(kept.tokens) / kept.cycles == 3.0
    with pytest.raises(ValueError, match="cycles commit"):
        truncate_generation([5, 6, 7], [4], eos_token_id=EOS, max_new_tokens=6)


def test_acceptance_rates_and_histogram_hand_computed() -> None:
    accepts = [0, 2, 5, 1]
    assert acceptance_rates(accepts, 5) == [3 / 4, 2 / 4, 1 / 4, 1 / 4, 1 / 4]
    assert accept_histogram(accepts, 5) == [1, 1, 1, 0, 0, 1]
    assert acceptance_rates([], 3) == [0.0, 0.0, 0.0]


def test_summarize_ratios_of_sums() -> None:
    records = [PromptRecord("mt_bench", "1", 9, 6, 3, [1, 0, 2], 8, 3, 1.0, 6, 2.0, None),
               PromptRecord("mt_bench", "2", 9, 4, 1, [3], 4, 1, 1.0, 4, 3.0, 2)]
    stats = summarize(records, depth=3, greedy=True)
    assert stats.tau == 10 / 4 and stats.tau_host == 12 / 4
    assert stats.eagle_tokens_per_s == 5.0 and stats.baseline_tokens_per_s == 2.0 and stats.speedup == 2.5
    assert stats.accept_rates == [3 / 4, 2 / 4, 1 / 4] and stats.mismatches == 1
    assert summarize(records, depth=3, greedy=False).mismatches is None


def test_first_mismatch() -> None:
    assert first_mismatch([1, 2, 3], [1, 2, 3]) is None
    assert first_mismatch([1, 2, 3], [1, 5, 3]) == 1
    assert first_mismatch([1, 2], [1, 2, 3]) == 2


# --- input errors ----------------------------------------------------------------------------------


def test_unknown_benchmark_suggests_the_nearest() -> None:
    with pytest.raises(UserError, match="did you mean mt_bench"):
        evaluate.resolve_benchmarks("mt_bnech")
    assert evaluate.resolve_benchmarks("humaneval, mt_bench,humaneval") == ["humaneval", "mt_bench"]


def test_zero_prompts_is_a_user_error() -> None:
    with pytest.raises(UserError, match="--num-prompts 0"):
        evaluate.load_prompts(["mt_bench"], 0)


def _llama_cfg(**over) -> dict:
    cfg = {"hidden_size": 64, "vocab_size": VOCAB, "num_attention_heads": 4, "num_key_value_heads": 2}
    return {**cfg, **over}


@pytest.mark.parametrize("over, message", [({"hidden_size": 32}, "hidden_size 32 vs target 64"),
                                           ({"vocab_size": 99}, "vocab_size 99 vs target 64"),
                                           ({"num_key_value_heads": 4}, "num_key_value_heads 4 vs target 2"),
                                           ({"draft_vocab_size": 32}, "EAGLE-3")])
def test_check_fit_rejects_mismatches(over: dict, message: str) -> None:
    inputs.check_fit(_llama_cfg(), _llama_cfg())
    with pytest.raises(UserError, match=message):
        inputs.check_fit(_llama_cfg(), _llama_cfg(**over))


# --- end to end on a tiny target -------------------------------------------------------------------

needs_host = pytest.mark.skipif(patching.patch_status().state in ("missing", "wrong-version"),
                                reason="eagle-llm 1.2.1 is not installed")


def _save_tokenizer(out_dir: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t3"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    template = ("{% for m in messages %}{{ 't4 ' if m['role'] == 'user' else 't5 ' }}{{ m['content'] }} t6 "
                "{% endfor %}{% if add_generation_prompt %}t5 {% endif %}")
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="t0", eos_token=f"t{EOS}", unk_token="t3",
                            chat_template=template).save_pretrained(out_dir)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A near-bigram 2-layer target, a compact drafter that accepts often, and the same in host layout."""
    root = tmp_path_factory.mktemp("eval")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         rope_theta=1e5, bos_token_id=0, eos_token_id=EOS)
    target = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for layer in target.model.layers:
            layer.self_attn.o_proj.weight.mul_(0.3)
            layer.mlp.down_proj.weight.mul_(0.3)
    target.save_pretrained(root / "target")
    _save_tokenizer(root / "target")
    embed = target.get_input_embeddings().weight
    drafter = eagle_compat.new_eagle1_drafter(config, bias=True, embed_weight=embed)
    with torch.no_grad():  # predict the embedding of the input token: often what a near-bigram target says
        drafter.fc.weight.zero_()
        drafter.fc.weight[:, :64] = torch.eye(64)
        drafter.layers[0].self_attn.o_proj.weight.zero_()
        drafter.layers[0].mlp.down_proj.weight.zero_()
    drafter_cfg = eagle_compat.eagle1_config_dict(config, bias=True)
    export.save_drafter_dir(root / "compact", drafter.state_dict(), drafter_cfg, {"stage": "test"})
    export.write_host_eagle1(root / "host", {k: v for k, v in drafter.state_dict().items()
                                             if k != formats.EMBED_KEY}, drafter_cfg, embed)
    return {"target": root / "target", "compact": root / "compact", "host": root / "host"}


@pytest.fixture
def fake_benchmarks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(datasets, "load_mt_bench", lambda: [
        datasets.MTBenchQuestion(81, "writing", ("t10 t11 t12 t13", "t20 t21")),
        datasets.MTBenchQuestion(82, "math", ("t30 t31", "t32"))])
    monkeypatch.setattr(datasets, "load_humaneval", lambda: [
        datasets.HumanEvalProblem("HumanEval/0", "t40 t41 t42 t43 t44", "f", "", "")])


@needs_host
def test_eval_end_to_end_deterministic_and_lossless(tiny: dict[str, Path], fake_benchmarks: None,
                                                    tmp_path: Path) -> None:
    kwargs = {"benchmarks": "mt_bench,humaneval", "num_prompts": 1, "max_new_tokens": 20, "seed": 0,
              "progress": False}
    first = evaluate.evaluate(tiny["target"], tiny["compact"], out_dir=tmp_path / "out", **kwargs)
    again = evaluate.evaluate(tiny["target"], tiny["compact"], **kwargs)

    assert [r.prompt_id for r in first.records] == ["81", "HumanEval/0"]
    for a, b in zip(first.records, again.records):
        assert (a.new_tokens, a.cycles, a.accept_lengths, a.host_new_tokens) == \
               (b.new_tokens, b.cycles, b.accept_lengths, b.host_new_tokens)
    overall = first.overall
    assert overall.mismatches == 0 and overall.prompts == 2
    assert overall.tau == overall.new_tokens / overall.cycles > 1.0  # the bigram drafter gets accepted
    assert all(r.new_tokens <= 20 and r.host_new_tokens >= r.new_tokens for r in first.records)
    assert set(first.stats) == {"mt_bench", "humaneval", "overall"} and overall.speedup > 0
    for name in ("report.json", "summary.md", "accept_hist.png", "tau.png"):
        assert (tmp_path / "out" / name).stat().st_size > 0
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert saved["stats"]["overall"]["tau"] == pytest.approx(overall.tau)
    assert "| overall |" in (tmp_path / "out" / "summary.md").read_text()
    # the report names the weights it measured, so `ppow export --eval-report` accepts it for this drafter
    host_weights = formats.load_drafter(tiny["host"]).state  # the same weights in another format
    assert saved["settings"]["drafter_weights_sha256"] == formats.weights_digest(host_weights)
    export.export(tiny["compact"], tmp_path / "exp", "eagle1-compact", eval_report=tmp_path / "out" / "report.json")


@needs_host
def test_eval_both_turns_and_sampling(tiny: dict[str, Path], fake_benchmarks: None) -> None:
    report = evaluate.evaluate(tiny["target"], tiny["host"], "mt_bench", num_prompts=1, max_new_tokens=8,
                               both_turns=True, temperature=0.8, progress=False)
    assert [r.prompt_id for r in report.records] == ["81/turn1", "81/turn2"]
    assert report.records[1].prompt_tokens > report.records[0].prompt_tokens  # turn 2 sees turn 1's answer
    assert report.overall.mismatches is None


@needs_host
def test_cli_eval_errors_are_one_line(tiny: dict[str, Path], fake_benchmarks: None, tmp_path: Path,
                                      capsys: pytest.CaptureFixture) -> None:
    base = ["eval", "--target", str(tiny["target"]), "--out", str(tmp_path / "o")]
    assert cli.main(base + ["--drafter", str(tiny["compact"]), "--num-prompts", "0"]) == 2
    assert cli.main(base + ["--drafter", str(tiny["compact"]), "--benchmarks", "humaneva"]) == 2
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    (wrong / "config.json").write_text(json.dumps(_llama_cfg(hidden_size=32)))
    assert cli.main(base + ["--drafter", str(wrong), "--num-prompts", "1"]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 3 and all(e.startswith("error: ") for e in errors)
    assert "--num-prompts 0" in errors[0] and "did you mean humaneval" in errors[1] and "hidden_size" in errors[2]
    assert not (tmp_path / "o").exists()


@needs_host
def test_cli_compare_writes_table_and_chart(tiny: dict[str, Path], fake_benchmarks: None, tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    rc = cli.main(["compare", str(tiny["compact"]), str(tiny["host"]), "--names", "a,b", "--target",
                   str(tiny["target"]), "--benchmarks", "humaneval", "--num-prompts", "1",
                   "--max-new-tokens", "8", "--out", str(out)])
    assert rc == 0
    table = (out / "compare.md").read_text()
    assert "| a |" in table and "| b |" in table and "(+0.0 % [+0.0, +0.0])" in table  # same weights, same τ
    assert (out / "compare.png").stat().st_size > 0 and (out / "a" / "report.json").is_file()
