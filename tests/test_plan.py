"""`ppow plan`: memory arithmetic on hand-computed cases, every recipe plans against its packaged known config,
and bad flags end in one `error:` line, exit 2."""

import json
from pathlib import Path

import pytest

from ppow_plugin.host import target_arch
from ppow_plugin.training import plan
from ppow_plugin.cli import main
from ppow_plugin.config import Config, ModelCfg, load_config
from ppow_plugin.distributed import deepspeed_config

ROOT = Path(__file__).parents[1]
RECIPES = sorted((ROOT / "recipes").rglob("*.yaml"))
KNOWN = target_arch.KNOWN_CONFIGS  # packaged config-only copies (ppow_plugin/known_configs/README.md)


def _known(path: Path) -> Path:
    cfg = load_config(path)
    known = target_arch.known_config(cfg.model.target)
    assert known is not None, f"{path}: add ppow_plugin/known_configs/<last part of model.target, lower-cased>"
    return known


def _tiny_arch(**kw) -> plan.TargetArch:
    base = dict(hidden_size=8, num_layers=6, num_heads=2, num_kv_heads=1, head_dim=4, intermediate_size=16,
                vocab_size=32, max_position_embeddings=64)
    return plan.TargetArch(**{**base, **kw})


# -- parameter counts ----------------------------------------------------------------------------------


def test_llama_8b_target_has_8_03b_params():
    a = plan.TargetArch.from_dict(json.loads((KNOWN / "llama-3.1-8b-instruct/config.json").read_text()))
    assert plan.target_params(a) == 8_030_261_248  # the published Llama-3.1-8B count


def test_drafter_params_hand_computed():
    a = _tiny_arch()  # H 8, heads 2 x hd 4 (= 8), kv 1 x 4, I 16, V 32
    # EAGLE-1: fc 2H·H + H bias (136) + q 64 + k 32 + v 32 + o 64 + mlp 3·8·16 = 384 + post-attn norm 8
    assert plan.drafter_params(a, "eagle1", bias=True) == (136 + 192 + 384 + 8, 32 * 8)
    assert plan.drafter_params(a, "eagle1", bias=False)[0] == 128 + 192 + 384 + 8
    # EAGLE-3: fc 3H·H 192 + q 16·8 128 + k,v 16·4 64 each + o 64 + mlp 384 + 4 norms 32 + lm_head Vd·H
    assert plan.drafter_params(a, "eagle3", draft_vocab_size=10) == (192 + 320 + 384 + 32 + 80, 256)
    assert plan.drafter_params(a, "eagle3")[0] == 192 + 320 + 384 + 32 + 256  # full vocabulary head


def test_llama_8b_eagle3_drafter_size():
    a = plan.TargetArch.from_dict(json.loads((KNOWN / "llama-3.1-8b-instruct/config.json").read_text()))
    trainable, frozen = plan.drafter_params(a, "eagle3", draft_vocab_size=32000)
    assert frozen == 128256 * 4096
    # fc 3·4096² + attn (2·4096 in: q 4096, k/v 1024 wide; o 4096²) + MLP 3·4096·14336 + 4 norms + 32000·4096
    assert trainable == 3 * 4096**2 + 8192 * 4096 + 2 * 8192 * 1024 + 4096**2 + 3 * 4096 * 14336 + 4 * 4096 + 32000 * 4096
    assert round(trainable / 1e6, 1) == 424.7


# -- ZeRO partitioning -----------------------------------------------------------------------------------


@pytest.mark.parametrize("stage,world,expected", [
    # 1M params in bf16: params 2 MB, grads 2 MB, AdamW fp32 master + 2 moments 12 MB
    (0, 1, (2e6, 2e6, 12e6)), (1, 1, (2e6, 2e6, 12e6)), (2, 1, (2e6, 2e6, 12e6)), (3, 1, (2e6, 2e6, 12e6)),
    (0, 8, (2e6, 2e6, 12e6)),      # stage 0: everything replicated
    (1, 8, (2e6, 2e6, 1.5e6)),     # stage 1: optimizer states / 8
    (2, 8, (2e6, 0.25e6, 1.5e6)),  # stage 2: + gradients / 8
    (3, 8, (0.25e6, 0.25e6, 1.5e6)),  # stage 3: + parameters / 8
])
def test_zero_partitioning_bf16(stage, world, expected):
    z = plan.zero_bytes(1_000_000, "bf16", stage, world)
    assert (z["params"], z["grads"], z["optimizer"]) == pytest.approx(expected)


def test_zero_fp32_has_no_master_copy():
    z = plan.zero_bytes(1_000_000, "fp32", 2, 4)
    assert (z["params"], z["grads"], z["optimizer"]) == pytest.approx((4e6, 1e6, 2e6))  # 2 moments, 8 B / 4


def test_plan_rows_hand_computed():
    a = _tiny_arch()
    cfg = Config(model=ModelCfg(drafter_type="eagle1"))
    cfg.data.max_len, cfg.dist.dtype, cfg.dist.target_dtype, cfg.dist.zero_stage = 16, "bf16", "bf16", 2
    cfg.rollout.group_size, cfg.rollout.window, cfg.rollout.prefixes_per_sequence = 2, 3, 1
    p = plan.plan_memory(cfg, a, gpus=2, nodes=1)
    rows = {k: v * plan.GB for k, v in p.rows.items()}
    n = 720  # EAGLE-1 trainable (test above)
    assert rows["drafter params (trainable)"] == 2 * n
    assert rows["drafter grads"] == 2 * n / 2
    assert rows["optimizer states (AdamW)"] == 12 * n / 2
    assert rows["drafter embeddings (frozen)"] == 32 * 8 * 2
    assert rows["target weights (frozen)"] == plan.target_params(a) * 2
    assert rows["target KV cache"] == 2 * 6 * 1 * 4 * (16 + 2 * 3) * 2      # 2·L·kv·hd·(T + G·K)·b
    assert rows["activations: target hidden states"] == 16 * 8 * 6 * 2      # T·H·L·b
    assert rows["activations: logits"] == (22 * 32 + 2 * 22 * 32) * 4      # (S_t·V + 2·S_d·V)·4, S = T + n·G·K
    assert rows["rotary tables (fp32)"] == (22 + 64) * 4 * 2 * 4            # (P + EAGLE-1 drafter's ctx)·hd·2·4
    assert rows["rollout graph (drafter windows)"] == 2 * 2 * 2 * 4 * (2 * 16 + 3) * 2  # 2·N_w·heads·hd·Σ(T+j+1)·b
    assert p.total_gb == pytest.approx(sum(p.rows.values()))
    assert p.host_kv_prealloc_gb * plan.GB == 2 * 6 * 1 * 4 * 64 * 2


def test_target_positions_are_what_the_trainer_allocates():
    cfg = Config()
    cfg.data.max_len, cfg.rollout.group_size, cfg.rollout.window = 100, 8, 5
    assert plan.target_positions(cfg) == 140  # the prefix plus the G·K tree a verification appends
    cfg.rollout.verify = "data"
    assert plan.target_positions(cfg) == 100  # no tree forward
    assert plan.target_positions(Config(stage="sft", data=cfg.data)) == 100
    assert plan.rollout_graph_bytes(_tiny_arch(), Config(stage="sft")) == 0


def test_sft_eagle3_counts_the_ttt_unroll():
    a = _tiny_arch()
    cfg = Config(stage="sft", model=ModelCfg(drafter_type="eagle3", draft_vocab_size=10))
    cfg.data.max_len = 16
    assert plan.scored_positions(cfg) == (16, 7 * 16)
    assert plan.activation_bytes(a, cfg)["logits"] == (16 * 32 + 2 * 112 * 10) * 4


def test_missing_sizes_are_a_user_error(tmp_path):
    from ppow_plugin.errors import UserError
    with pytest.raises(UserError, match="hidden_size"):
        plan.TargetArch.from_dict({"num_hidden_layers": 2})
    cfg = load_config(RECIPES[0])
    with pytest.raises(UserError, match="--target-config"):
        target_arch.load_target_arch(cfg, str(tmp_path / "nowhere"))
    a, note = target_arch.load_target_arch(cfg, str(KNOWN / "llama-3.1-8b-instruct"), ["num_hidden_layers=80"])
    assert a.num_layers == 80 and a.hidden_size == 4096 and note is None


# -- every recipe ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(p.parents[1])))
def test_recipe_loads_validates_and_plans(path, capsys):
    assert main(["validate", "--no-path-check", str(path)]) == 0
    cfg = load_config(path)
    a, _ = target_arch.load_target_arch(cfg, str(_known(path)))
    for gpus in (1, 8):
        p = plan.plan_memory(cfg, a, gpus)
        assert all(v >= 0 for v in p.rows.values()) and p.total_gb > 0
        ds = deepspeed_config(cfg, gpus)
        # The DeepSpeed JSON says what the recipe says.
        assert ds["zero_optimization"]["stage"] == cfg.dist.zero_stage
        assert ds["train_micro_batch_size_per_gpu"] == cfg.data.micro_batch
        assert ds["gradient_accumulation_steps"] == cfg.optim.grad_accum
        assert ds["train_batch_size"] == cfg.data.micro_batch * cfg.optim.grad_accum * gpus
        assert ds["gradient_clipping"] == cfg.optim.grad_clip
        assert ds["bf16"]["enabled"] == (cfg.dist.dtype == "bf16")
    if cfg.dist.dtype == "bf16":  # GPU recipes: the header states the plan's numbers
        header = path.read_text().split("\nstage:")[0]
        assert f"1 GPU {plan.plan_memory(cfg, a, 1).total_gb:.1f}" in header
        assert f"8 GPUs {plan.plan_memory(cfg, a, 8).total_gb:.1f}" in header


def test_gpu_recipes_say_set_this_and_use_bf16():
    for path in RECIPES:
        cfg = load_config(path)
        if cfg.model.target.startswith("/models/"):
            assert "SET THIS" in path.read_text()
            assert cfg.dist.dtype == cfg.dist.target_dtype == "bf16"
        if cfg.model.drafter_type == "eagle3" and "llama" in str(path):
            assert cfg.model.draft_vocab_size == 32000


def test_cli_plan_prints_table_deepspeed_and_warning(capsys):
    recipe = ROOT / "recipes/llama3/70B_eagle3_ppow.yaml"
    rc = main(["plan", str(recipe), "--gpus", "8", "--target-config", str(KNOWN / "llama-3.3-70b-instruct")])
    out = capsys.readouterr().out
    assert rc == 0
    assert "target weights (frozen)" in out and "total" in out
    assert '"stage": 3' in out and '"train_batch_size": 16' in out
    assert "WARNING:" in out and "does not fit in 80 GB" in out
    main(["plan", str(ROOT / "recipes/llama3/8B_eagle3_ppow.yaml"), "--gpus", "8",
          "--target-config", str(KNOWN / "llama-3.1-8b-instruct")])
    assert "WARNING" not in capsys.readouterr().out


# -- docs/recipes.md keeps up with config.py -------------------------------------------------------------


def test_every_config_field_is_documented():
    import dataclasses
    text = (ROOT / "docs" / "recipes.md").read_text()
    missing = []
    for section in dataclasses.fields(Config):
        if section.name == "stage":
            continue
        for f in dataclasses.fields(section.default_factory):
            if f"`{section.name}.{f.name}`" not in text:
                missing.append(f"{section.name}.{f.name}")
    assert not missing, f"docs/recipes.md lacks {missing}"


# -- a fresh clone: the packaged known configs; bad flags (issue 16) ------------------------------------


def test_readme_plan_command_works_without_the_target(capsys, tmp_path, monkeypatch):
    command = "ppow plan recipes/llama3/8B_eagle3_ppow.yaml --gpus 8"
    assert command in (ROOT / "README.md").read_text()
    monkeypatch.chdir(tmp_path)
    assert main(["plan", str(ROOT / "recipes/llama3/8B_eagle3_ppow.yaml"), "--gpus", "8"]) == 0
    out = capsys.readouterr().out
    known = KNOWN / "llama-3.1-8b-instruct"
    assert out.splitlines()[0] == (f"note: model.target=/models/Llama-3.1-8B-Instruct has no config.json here; sizes "
                                   f"from the packaged known config llama-3.1-8b-instruct ({known / 'config.json'})")
    assert out.count("note:") == 1
    main(["plan", str(ROOT / "recipes/llama3/8B_eagle3_ppow.yaml"), "--gpus", "8", "--target-config", str(known)])
    assert capsys.readouterr().out == out.split("\n", 1)[1]  # the same plan, minus the note
    assert list(tmp_path.iterdir()) == []


def test_known_configs_are_package_data():
    import fnmatch
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["ppow_plugin"]
    files = [str(p.relative_to(ROOT / "ppow_plugin")) for p in KNOWN.glob("*/config.json")]  # package-relative
    assert len(files) == 8 and KNOWN.parent == Path(target_arch.__file__).parent
    assert all(any(fnmatch.fnmatch(f, pat) for pat in patterns) for f in files), (files, patterns)
    assert not (ROOT / "tests" / "fixtures" / "configs").exists()  # one copy


def test_known_config_is_named_like_the_target():
    assert target_arch.known_config("/models/Llama-3.1-8B-Instruct") == KNOWN / "llama-3.1-8b-instruct/config.json"
    assert target_arch.known_config("default") == KNOWN / "smollm2-135m-instruct/config.json"
    coder = target_arch.known_config(".cache/targets/qwen2.5-coder-0.5b-instruct/")
    assert coder.parent.name == "qwen2.5-coder-0.5b-instruct"
    assert target_arch.known_config("/models/my-own-model") is None


def one_error(capsys, argv) -> str:
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 2 and out == "", (code, out, err)
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    return err.strip()


@pytest.mark.parametrize("flags,message", [
    (["--tflops", "0"], "--tflops 0.0: must be in [0.001, 100000] achieved TFLOP/s per device"),
    (["--tflops", "1e-320"], "--tflops 1e-320: must be in [0.001, 100000] achieved TFLOP/s per device"),  # "inf h"
    (["--tflops", "nan"], "--tflops nan: must be a finite number"),
    (["data.max_len=1e3"], "data.max_len must be an integer, got '1e3'"),
    (["--gpu-memory-gb", "-1"], "--gpu-memory-gb -1.0: must be in (0, 100000] GB per device"),
    (["--gpu-memory-gb", "inf"], "--gpu-memory-gb inf: must be a finite number"),
    (["--gpus", "0"], "--gpus 0: must be in [1, 4096] per node"),
    (["--gpus", str(10**400)], f"--gpus {10**400}: must be in [1, 4096] per node"),  # was an OverflowError
    (["--nodes", "-2"], "--nodes -2: must be in [1, 1048576]"),
    (["--target-field", "num_hidden_layers=-5"],
     "target config num_hidden_layers (-5) must be an integer in [1, 16777216]; fix the config.json or --target-field"),
    (["--target-field", "hidden_size=abc"],
     "target config hidden_size ('abc') must be an integer in [1, 16777216]; fix the config.json or --target-field"),
    (["--target-field", "num_hiden_layers=80"],
     "--target-field 'num_hiden_layers=80': unknown key 'num_hiden_layers'; did you mean num_hidden_layers?"),
    (["--target-field", "80"], "--target-field '80' must look like hidden_size=4096"),
    (["--target-field", "num_key_value_heads=5"],
     "target config num_attention_heads (32) must be a multiple of num_key_value_heads (5)"),
    (["--target-field", "tie_word_embeddings=2"], "target config tie_word_embeddings (2) must be true or false"),
    (["model.draft_vocab_size=200000"],
     "model.draft_vocab_size (200000) exceeds the target's vocabulary (128256); lower it, or null for the full "
     "vocabulary"),
    (["--target-field", "max_position_embeddings=1024"],
     "data.max_len (2048) + the 65-position rollout tree exceeds the target's max_position_embeddings (1024); "
     "lower data.max_len to 959 or less"),  # K = 8: 1 + G·K = 65
])
def test_bad_plan_flags_are_one_line_errors(flags, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert one_error(capsys, ["plan", str(ROOT / "recipes/llama3/8B_eagle3_ppow.yaml"), *flags]) == f"error: {message}"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("content,message", [
    (b"[1, 2]", "holds a JSON list, not a config object"),
    (b"{not json", "is not a readable JSON file (JSONDecodeError); point to a config.json"),
    (b"\xff\xfe{}", "is not a readable JSON file (UnicodeDecodeError)"),
    (b'{"hidden_size": 8}', "target config lacks num_hidden_layers, num_attention_heads, intermediate_size"),
])
def test_bad_target_config_files(content, message, capsys, tmp_path):
    (tmp_path / "config.json").write_bytes(content)
    recipe = str(ROOT / "recipes/llama3/8B_eagle3_ppow.yaml")
    assert message in one_error(capsys, ["plan", recipe, "--target-config", str(tmp_path)])
    assert message in one_error(capsys, ["plan", recipe, f"model.target={tmp_path}"])  # the recipe's own target


# -- a GPU run checks the plan against its GPU before loading anything (issue 26) -------------------------


@pytest.fixture
def gpu80(monkeypatch):
    """One mocked 80 GB GPU per rank; `trainer.main` replaced by a recorder (nothing is loaded)."""
    import types

    import torch

    from ppow_plugin.training import trainer
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: None)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: types.SimpleNamespace(total_memory=80e9))
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    trained = []
    monkeypatch.setattr(trainer, "main", lambda cfg: trained.append(cfg.run.output_dir) or Path(cfg.run.output_dir))
    return trained


def test_a_target_larger_than_the_gpu_is_refused_before_loading(gpu80, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", str(ROOT / "recipes/llama3/70B_eagle3_ppow.yaml"), f"run.output_dir={out}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: the frozen target alone is 141.1 GB in bf16") and "80.0 GB" in err[-1]
    assert gpu80 == [] and not out.exists()


def test_a_plan_larger_than_the_gpu_is_warned_about(gpu80, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "8")  # under a launcher; this process is rank 0
    monkeypatch.setenv("LOCAL_RANK", "0")
    qwen = ROOT / "recipes/qwen3/32B_eagle3_ppow.yaml"
    assert main(["train", str(qwen), f"run.output_dir={tmp_path / 'a'}"]) == 0
    assert "warning: ppow plan estimates 89.0 GB per device on 8 rank(s), more than this GPU's 80.0 GB" in \
        capsys.readouterr().err
    assert main(["train", str(qwen), f"run.output_dir={tmp_path / 'b'}", "rollout.prefixes_per_sequence=1"]) == 0
    assert "warning" not in capsys.readouterr().err  # 77.5 GB: fits
    assert main(["train", str(ROOT / "recipes/llama3/70B_eagle3_ppow.yaml"), "dist.device=cpu",
                 f"run.output_dir={tmp_path / 'c'}"]) == 0  # not a GPU run: nothing to check
    assert len(gpu80) == 3
