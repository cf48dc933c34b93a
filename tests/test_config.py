"""Config loading: strict keys with suggestions, types, invariants (every field's range), dotted overrides,
recipe files, and `ppow validate`'s path check."""

import re
import types
import typing
from pathlib import Path

import pytest
from test_properties import config_fields  # the fields, enumerated from the dataclasses

from ppow_plugin import cli
from ppow_plugin.config import Config, config_to_dict, load_config
from ppow_plugin.errors import UserError


def write(tmp_path, text):
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return p


def test_defaults_match_paper_values():
    cfg = load_config(None)
    assert (cfg.rollout.group_size, cfg.rollout.window, cfg.reward.gamma) == (8, 10, 0.12)
    # eta below R_speedup(1) = 1/1.12 so a near miss never beats one accepted token
    assert cfg.reward.eta < 1 / (1 + cfg.reward.gamma)


def test_unknown_key_suggests_nearest(tmp_path):
    p = write(tmp_path, "rollout:\n  group_sise: 4\n")
    with pytest.raises(UserError, match=r"unknown config key 'rollout.group_sise'; did you mean 'rollout.group_size'"):
        load_config(p)


def test_unknown_section_suggests(tmp_path):
    with pytest.raises(UserError, match="did you mean 'reward'"):
        load_config(write(tmp_path, "rewards:\n  gamma: 0.1\n"))


def test_type_errors_are_one_line(tmp_path):
    with pytest.raises(UserError, match="rollout.window must be an integer"):
        load_config(write(tmp_path, "rollout:\n  window: ten\n"))
    with pytest.raises(UserError, match="dist.dtype must be one of fp32, bf16, got 'bf61'; did you mean 'bf16'"):
        load_config(write(tmp_path, "dist:\n  dtype: bf61\n"))
    with pytest.raises(UserError, match="run.resume must be true or false"):
        load_config(write(tmp_path, "run:\n  resume: 3\n"))


def test_invariants(tmp_path):
    with pytest.raises(UserError, match="group_size .1. must be >= 2"):
        load_config(None, ["rollout.group_size=1"])
    with pytest.raises(UserError, match="zero_stage"):
        load_config(None, ["dist.zero_stage=4"])


def test_overrides_parse_yaml_scalars(tmp_path):
    p = write(tmp_path, "optim:\n  lr: 1e-5\nrun:\n  max_steps: 3\n")
    cfg = load_config(p, ["run.max_steps=7", "model.drafter=null", "optim.betas=[0.8, 0.9]", "reward.gamma=1"])
    assert cfg.optim.lr == 1e-5 and isinstance(cfg.optim.lr, float)
    assert cfg.run.max_steps == 7 and cfg.model.drafter is None
    assert cfg.optim.betas == (0.8, 0.9)
    assert cfg.reward.gamma == 1.0 and isinstance(cfg.reward.gamma, float)


def test_bad_override_syntax():
    with pytest.raises(UserError, match="section.field=value"):
        load_config(None, ["run.max_steps"])


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(write(tmp_path, "a: [1,\n"))
    with pytest.raises(UserError, match="must be a mapping"):
        load_config(write(tmp_path, "- 1\n- 2\n"))


def test_roundtrip_dict():
    d = config_to_dict(Config())
    assert d["optim"]["betas"] == [0.9, 0.95]
    assert d["rollout"]["group_size"] == 8


# -- every field has a range (issue 16) -------------------------------------------------------------------


ROOT = Path(__file__).parents[1]
PPOW = str(ROOT / "recipes/smollm2/135M_eagle1_ppow.yaml")


def _kinds(tp) -> set:
    """{int} for `int | None`, {tuple[float, float]} for a tuple: the non-None members of a union."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return {a for a in typing.get_args(tp) if a is not type(None)}
    return {tp}


NUMERIC = [n for n, tp in config_fields() if _kinds(tp) & {int, float}]
FLOATS = [n for n, tp in config_fields() if float in _kinds(tp)]
TEXT = [n for n, tp in config_fields() if str in _kinds(tp)]


def test_field_enumeration_sees_every_kind():
    assert len(NUMERIC) >= 40 and len(FLOATS) >= 20 and len(TEXT) == 7
    assert "optim.lr" in FLOATS and "dist.seed" in NUMERIC and "run.output_dir" in TEXT


@pytest.mark.parametrize("name", NUMERIC)
def test_every_numeric_field_has_a_lower_bound(name):
    # No field of ours means anything at -1: a field that accepts it has no range check.
    with pytest.raises(UserError, match=rf"^{re.escape(name)} \(-1(\.0)?\) must be"):
        load_config(None, [f"{name}=-1", "stage=ppow"] if name != "stage" else [f"{name}=-1"])


@pytest.mark.parametrize("name", FLOATS)
@pytest.mark.parametrize("text", ["nan", ".nan", "inf", "-.inf", "1e400", str(10**400), "3.5e38"])
def test_every_float_field_refuses_non_finite(name, text):
    with pytest.raises(UserError, match=rf"^{re.escape(name)} must be a finite number"):
        load_config(None, [f"{name}={text}"])


INTS = [n for n, tp in config_fields() if int in _kinds(tp)]


@pytest.mark.parametrize("name", INTS)
def test_every_int_field_refuses_more_than_int64(name):
    # 10**400 fed to the plan arithmetic was an OverflowError; torch and NumPy hold int64 at most.
    with pytest.raises(UserError, match=rf"^{re.escape(name)} must be an integer below 2\*\*63 in size"):
        load_config(None, [f"{name}={2**63}"])


@pytest.mark.parametrize("name", TEXT)
def test_every_text_field_refuses_empty(name):
    with pytest.raises(UserError, match=rf"^{re.escape(name)} \('( )?'\) must be"):
        load_config(None, [f"{name}= "] if name != "data.path" else ["data.dataset=jsonl", f"{name}= "])


# -- the values issue 16 found accepted, through the CLI ------------------------------------------------


def one_error(capsys, argv) -> str:
    """Run the CLI: exit 2, nothing on stdout, exactly one stderr line, `error: ...`."""
    code = cli.main(argv)
    out, err = capsys.readouterr()
    assert code == 2 and out == "", (code, out, err)
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    return err.strip()


def tree(path: Path) -> set:
    return {str(p.relative_to(path)) for p in path.rglob("*")}


@pytest.mark.parametrize("cmd", ["validate", "train"])
@pytest.mark.parametrize("override,message", [
    ("optim.lr=nan", "optim.lr must be a finite number (|x| <= 3.4e38, float32), got 'nan'"),
    ("optim.betas=[2,3]", "optim.betas ([2.0, 3.0]) must be two numbers in [0, 1), e.g. [0.9, 0.95]"),
    ("dist.seed=-1", "dist.seed (-1) must be in [0, 4294967295]"),
    ("dist.device=tpu", "dist.device ('tpu') must be auto, cpu, cuda, cuda:N or mps"),
    ("reward.gamma=inf", "reward.gamma must be a finite number (|x| <= 3.4e38, float32), got 'inf'"),
    ("run.max_minutes=-1", "run.max_minutes (-1.0) must be > 0 (or null = no time limit)"),
    ("data.num_conversations=0", "data.num_conversations (0) must be >= 1 (or null = all)"),
    ("data.dataset=sharegpt data.path=convs.jsonl", "data.path ('convs.jsonl') must be null for data.dataset=sharegpt (the bundled set); "
                              "use data.dataset=jsonl to train on the file"),
    ("run.output_dir=", "run.output_dir ('') must be a directory for the run (e.g. runs/my-run)"),
])
def test_values_that_training_crashed_on_are_refused_up_front(cmd, override, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # run.output_dir= would have written here
    (tmp_path / "convs.jsonl").write_text("")
    assert one_error(capsys, [cmd, PPOW, *override.split()]) == f"error: {message}"
    assert tree(tmp_path) == {"convs.jsonl"}


def test_cross_section_invariants():
    with pytest.raises(UserError, match=r"reward.delta_positions \(11\) must be <= rollout.window \(10\)"):
        load_config(None, ["reward.delta_positions=11"])
    with pytest.raises(UserError, match="null for drafter_type=eagle1"):
        load_config(None, ["model.draft_vocab_size=100"])
    assert load_config(None, ["model.drafter_type=eagle3", "model.draft_vocab_size=100"]).model.draft_vocab_size == 100
    with pytest.raises(UserError, match="both 0: every reward is 0"):
        load_config(None, ["reward.speedup_weight=0", "reward.proximity_weight=0"])
    with pytest.raises(UserError, match=r"data.path \(None\) must be set for data.dataset=jsonl"):
        load_config(None, ["data.dataset=jsonl"])


def test_verification_on_the_data_needs_generated_data_and_reads_only_rows_up_to_k_plus_1():
    ok = ["rollout.verify=data", "data.dataset=generated"]
    cfg = load_config(None, ok + ["data.feature_cache=true"])  # no tree: the target's KV cache is not needed
    assert (cfg.rollout.verify, cfg.data.feature_cache) == ("data", True)
    with pytest.raises(UserError, match=r"data.dataset \('sharegpt'\) must be generated for rollout.verify=data"):
        load_config(None, ["rollout.verify=data"])
    with pytest.raises(UserError, match=r"loss.kl_positions \('window'\) must be accepted_prefix"):
        load_config(None, ok + ["loss.kl_positions=window"])
    with pytest.raises(UserError, match=r"reward.delta_positions \(2\) must be 1 for rollout.verify=data"):
        load_config(None, ok + ["reward.delta_positions=2"])
    with pytest.raises(UserError, match=r"data.feature_cache \(True\) must be false for PPOW unless rollout.verify=data"):
        load_config(None, ["data.dataset=generated", "data.feature_cache=true"])
    assert load_config(None, ["stage=sft", "data.feature_cache=true"]).data.feature_cache  # SFT: always allowed


def test_empty_section_still_takes_overrides(tmp_path):
    cfg = load_config(write(tmp_path, "stage: sft\noptim:\n"), ["optim.lr=1e-4"])
    assert cfg.optim.lr == 1e-4


# -- reading the recipe file -----------------------------------------------------------------------------


@pytest.mark.parametrize("name,content,message", [
    ("latin1.yaml", "stage: ppow\n# caf\xe9\n".encode("latin-1"),
     r"recipe \S+ is not UTF-8 text \(byte 0xe9 on line 2\); save it as UTF-8"),
    ("syntax.yaml", b"stage: ppow\nmodel:\n  target: [default\n",
     r"recipe \S+, line 4, column 1 is not valid YAML \(.*\); fix it there"),
    ("empty.yaml", b"# nothing but a comment\n",
     r"recipe \S+ is empty; a recipe sets at least stage \(sft or ppow\), model.target and, for ppow, "
     r"model.drafter: start from a file under recipes/"),
    ("dup.yaml", b"stage: ppow\noptim:\n  lr: 1.0e-5\n  grad_clip: 0.5\n  lr: 3.0e-4\n",
     r"recipe \S+, line 5: key 'lr' is already set on line 3; keep one of them"),
    ("dup_top.yaml", b"stage: ppow\nrun:\n  max_steps: 3\nstage: sft\n",
     r"recipe \S+, line 4: key 'stage' is already set on line 1; keep one of them"),
])
def test_recipe_file_errors_name_the_file_and_line(name, content, message, capsys, tmp_path, monkeypatch):
    (tmp_path / name).write_bytes(content)
    monkeypatch.chdir(tmp_path)
    before = tree(tmp_path)
    assert re.fullmatch(f"error: {message}", one_error(capsys, ["validate", name]))
    assert tree(tmp_path) == before


def test_recipe_path_that_is_a_directory(capsys, tmp_path):
    (tmp_path / "a.yaml").write_text("stage: sft\n")
    line = one_error(capsys, ["validate", str(tmp_path)])
    assert line == f"error: recipe {tmp_path} is a directory; pass one YAML file, e.g. {tmp_path / 'a.yaml'}"
    line = one_error(capsys, ["validate", str(tmp_path / "nope.yaml")])
    assert line.startswith(f"error: recipe {tmp_path / 'nope.yaml'} does not exist (tried ")
    line = one_error(capsys, ["validate", "x" * 300])  # is_dir() raised OSError(ENAMETOOLONG): a traceback
    assert line == f"error: recipe {'x' * 80} cannot be read (File name too long); check the path and its permissions"


def test_duplicate_key_check_is_what_refuses(tmp_path):
    # Without the strict loader PyYAML keeps the last value: the recipe would load with lr 3e-4.
    p = write(tmp_path, "optim:\n  lr: 1.0e-5\n  lr: 3.0e-4\n")
    import yaml
    assert yaml.safe_load(p.read_text())["optim"]["lr"] == 3.0e-4
    with pytest.raises(UserError, match="key 'lr' is already set on line 2"):
        load_config(p)


# -- validate checks the paths a run reads (relative ones against the current directory) ------------------


def test_validate_prints_absolute_paths_and_refuses_missing_ones(capsys, tmp_path, monkeypatch):
    (tmp_path / "drafter").mkdir()  # validate reads the drafter as train does (preflight.py): a real one
    for f in ("config.json", "model.safetensors"):
        (tmp_path / "drafter" / f).symlink_to(ROOT / "assets" / "drafters" / "smollm2-135m-eagle1-sft-gen" / f)
    (tmp_path / "r.yaml").write_text("stage: ppow\nmodel:\n  drafter: drafter\n")
    monkeypatch.chdir(tmp_path)
    assert cli.main(["validate", "r.yaml"]) == 0
    assert f"model.drafter: {tmp_path / 'drafter'}\n" in capsys.readouterr().err
    sub = tmp_path / "sub"
    sub.mkdir()
    monkeypatch.chdir(sub)  # the same recipe from another directory: `drafter` is now sub/drafter
    before = tree(tmp_path)
    line = one_error(capsys, ["validate", "../r.yaml"])
    assert line == (f"error: model.drafter=drafter: {sub / 'drafter'} does not exist (relative paths resolve "
                    "against the current directory); fix the path, or pass --no-path-check to check keys and "
                    "values only")
    assert cli.main(["validate", "../r.yaml", "--no-path-check"]) == 0
    assert f"model.drafter: {sub / 'drafter'} (does not exist; not checked)" in capsys.readouterr().err
    assert tree(tmp_path) == before


@pytest.mark.parametrize("override,message", [
    ("model.drafter=.", "model.drafter=.: {cwd} is not a model directory with config.json"),
    ("model.target=nowhere", "model.target=nowhere: {cwd}/nowhere does not exist"),
    ("reward.gamma_profile=.", "reward.gamma_profile=.: {cwd} is not a file"),
    (f"data.dataset=jsonl data.path={'x' * 300}",  # exists() raised OSError(ENAMETOOLONG): a traceback
     f"data.path={'x' * 300}: {{cwd}}/{'x' * 300} cannot be checked (File name too long)"),
])
def test_validate_checks_each_input_path(override, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    drafter, data = ROOT / "assets/drafters/smollm2-135m-eagle1-sft-gen", ROOT / "assets/generated/smollm2-135m-sharegpt-2048"
    line = one_error(capsys, ["validate", PPOW, f"model.drafter={drafter}", f"data.path={data}", *override.split()])
    assert line.startswith("error: " + message.format(cwd=tmp_path))
    assert tree(tmp_path) == set()


def test_validate_refuses_ppow_without_a_drafter(capsys, tmp_path):
    line = one_error(capsys, ["validate", str(write(tmp_path, "stage: ppow\nrun:\n  max_steps: 3\n"))])
    assert line.startswith("error: stage=ppow starts from a drafter: set model.drafter=<drafter dir>")
