"""`ppow eval` / `ppow compare` on EAGLE-3 drafter dirs: detected through `formats.load_drafter`, decoded with
the dynamic tree (`tree_decode.generate_eagle3`), lossless at T = 0 against HF greedy. Tiny 6-layer target."""

import json
from pathlib import Path

import pytest

from ppow_plugin import cli
from ppow_plugin.data import datasets
from ppow_plugin.evaluation import eval_report, evaluate
from ppow_plugin.host import patching
from ppow_plugin.training import trainer
from ppow_plugin.config import load_config
from tiny import make_target, overrides

if patching.patch_status().state != "patched":
    pytest.skip("the EAGLE host is not installed and patched (`ppow patch apply`)", allow_module_level=True)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> dict[str, Path]:
    """An EAGLE-3 drafter (reduced vocabulary, 3 SFT steps) and an EAGLE-1 one for the same tiny target."""
    tmp = tmp_path_factory.mktemp("e3eval")
    out = {}
    for kind, extra in (("eagle3", {"model.drafter_type": "eagle3", "model.draft_vocab_size": 64,
                                    "sft.ttt_steps": 2}), ("eagle1", {})):
        t = trainer.Trainer(load_config(None, overrides(tmp, "sft", **{"run.output_dir": tmp / kind,
                                                                        "data.max_len": 64, **extra})))
        t.setup()
        out[kind] = t.train()
        t.cleanup()
    out["target"] = tmp / "target"
    return out


@pytest.fixture
def fake_mt_bench(monkeypatch):
    monkeypatch.setattr(datasets, "load_mt_bench", lambda: [
        datasets.MTBenchQuestion(81, "writing", ("w1 w2 w3 w4", "w5")),
        datasets.MTBenchQuestion(82, "math", ("w10 w11 w12", "w13"))])


def test_eagle3_eval_is_lossless_at_t0(dirs):
    prompts = [evaluate.EvalPrompt("mt_bench", str(i), (f"w{i} w{i + 1} w{i + 2}",)) for i in (1, 40, 77)]
    report = evaluate.evaluate(dirs["target"], dirs["eagle3"], prompts=prompts, max_new_tokens=24,
                               progress=False, tree=evaluate.Eagle3Tree(depth=4, top_k=5, total_tokens=20))
    overall = report.overall
    assert overall.mismatches == 0 and overall.prompts == 3
    assert overall.tau == overall.new_tokens / overall.cycles >= 1.0
    assert len(overall.accept_rates) == 5  # depth + 1 drafts can be accepted per cycle
    assert report.settings["drafter_type"] == "eagle3" and "depth 4" in report.settings["tree"]
    assert all(r.new_tokens <= 24 for r in report.records)
    assert "# EAGLE-3 evaluation" in eval_report.summary_markdown(report)


def test_cli_compare_eagle1_vs_eagle3(dirs, fake_mt_bench, tmp_path):
    out = tmp_path / "cmp"
    rc = cli.main(["compare", str(dirs["eagle1"]), str(dirs["eagle3"]), "--names", "e1,e3", "--target",
                   str(dirs["target"]), "--benchmarks", "mt_bench", "--num-prompts", "1", "--max-new-tokens", "8",
                   "--depth", "3", "--top-k", "4", "--total-tokens", "12", "--out", str(out)])
    assert rc == 0
    table = (out / "compare.md").read_text()
    assert "| e1 |" in table and "| e3 |" in table
    assert "mc_sim_7b_63" in (out / "e1" / "summary.md").read_text()
    assert "EAGLE-3 dynamic tree (depth 3, top-k 4, 12 draft nodes" in (out / "e3" / "summary.md").read_text()


def test_eagle3_eval_bad_tree_and_misfit_are_user_errors(dirs, tmp_path, capsys):
    base = ["eval", "--target", str(dirs["target"]), "--drafter", str(dirs["eagle3"]), "--out", str(tmp_path / "o")]
    assert cli.main(base + ["--top-k", "0"]) == 2
    other = tmp_path / "other-target"
    make_target(other, layers=8)
    cfg = json.loads((other / "config.json").read_text())
    cfg["vocab_size"] = 100
    (other / "config.json").write_text(json.dumps(cfg))
    assert cli.main(["eval", "--target", str(other), "--drafter", str(dirs["eagle3"]), "--out", str(tmp_path / "o")]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 2 and "--top-k 0" in errors[0] and "vocabulary mismatch" in errors[1]


def test_cli_eval_reads_settings_from_the_recipe_and_flags_win(dirs, fake_mt_bench, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model:\n  target: {dirs['target']}\neval:\n  benchmarks: [mt_bench]\n  num_prompts: 1\n"
                      "  max_new_tokens: 6\n  tree_depth: 2\n  tree_top_k: 3\n  tree_total_tokens: 6\n")
    out = tmp_path / "o"
    assert cli.main(["eval", "--recipe", str(recipe), "--drafter", str(dirs["eagle3"]), "--top-k", "4",
                     "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["settings"]["max_new_tokens"] == 6 and report["settings"]["prompts"] == 1
    assert "depth 2, top-k 4, 6 draft nodes" in report["settings"]["tree"]  # top-k from the flag, rest from recipe


def test_cli_eval_recipe_errors_are_one_line(dirs, tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("eval:\n  tree_dept: 2\n")
    assert cli.main(["eval", "--recipe", str(recipe), "--drafter", str(dirs["eagle3"]), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "tree_dept" in err[0] and "tree_depth" in err[0]
    assert not (tmp_path / "o").exists()
