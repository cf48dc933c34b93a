"""Evaluation on the device (issue 26): one resolution of device and dtype per command (`resolve_placement`),
passed down to every model `eval`, `compare`, `--simulate`, `data generate` and `profile` load; continuation
caches kept apart per device type and dtype; the τ probe runs where training runs. CUDA is mocked; bf16 runs
for real on the CPU (tiny target), so a model left in fp32 or a dtype mismatch in a bf16 path fails here."""

import ast
import inspect
import json
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from ppow_plugin import cli, devices
from ppow_plugin.config import EvalCfg, RolloutCfg, load_config
from ppow_plugin.data import continuations, datasets, generate
from ppow_plugin.errors import UserError
from ppow_plugin.evaluation import evaluate, profile, simulate, tree_decode, tree_draft, tree_walk
from ppow_plugin.host import eagle_compat, patching
from tiny import make_conversations, make_target, overrides

needs_host = pytest.mark.skipif(patching.patch_status().state != "patched",
                                reason="the EAGLE host is not installed and patched")


@pytest.fixture
def gpus(monkeypatch: pytest.MonkeyPatch) -> SimpleNamespace:
    """Two visible CUDA devices with bf16 (nothing is allocated on them); records set_device."""
    state = SimpleNamespace(current=[], bf16=True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda dev: state.current.append(str(dev)))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: state.bf16)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Fake V100")
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    return state


# --- the resolution --------------------------------------------------------------------------------


def test_auto_is_this_ranks_gpu_in_bf16_and_cpu_stays_fp32(gpus, monkeypatch: pytest.MonkeyPatch) -> None:
    assert devices.resolve_placement() == (torch.device("cuda", 0), torch.bfloat16)
    assert gpus.current == ["cuda:0"]  # made current before anything is loaded
    assert devices.resolve_placement("cpu") == (torch.device("cpu"), torch.float32)
    assert devices.resolve_placement("cpu", "bf16").tag == "cpu-bf16"
    assert devices.resolve_placement("cuda", "fp32") == (torch.device("cuda", 0), torch.float32)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert devices.resolve_placement("cuda").device == torch.device("cuda", 1)
    gpus.bf16 = False  # a GPU without bf16: auto takes fp16, bf16 asked for is refused
    assert devices.resolve_placement("auto").dtype == torch.float16
    with pytest.raises(UserError, match="--dtype bf16: this GPU .Fake V100. has no bf16; use --dtype fp16 or fp32"):
        devices.resolve_placement("cuda", "bf16")


def test_no_gpu_auto_is_cpu_fp32_and_bad_choices_are_user_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert devices.resolve_placement() == (torch.device("cpu"), torch.float32)
    with pytest.raises(UserError, match="^--device cuda but no CUDA device is visible; use --device cpu or auto$"):
        devices.resolve_placement("cuda")
    with pytest.raises(UserError, match="^eval.device=cuda:1 but no CUDA device"):
        devices.resolve_placement("cuda:1", "auto", ("eval.device", "eval.dtype"))
    with pytest.raises(UserError, match="--dtype fp16 runs on a GPU only; on cpu use --dtype fp32 or bf16"):
        devices.resolve_placement("cpu", "fp16")
    for junk in ("nan", "", "meta", "cuda:x"):  # torch's own RuntimeError, or a device nothing here runs on
        with pytest.raises(UserError, match="is not a device; use auto, cpu, cuda, cuda:N or mps"):
            devices.resolve_placement(junk)
    with pytest.raises(UserError, match="eval.dtype.*bf17.*bf16"):
        load_config(None, ["eval.dtype=bf17"])
    with pytest.raises(UserError, match="eval.device.*must be auto, cpu, cuda or cuda:N"):
        load_config(None, ["eval.device=gpu"])


# --- each command passes the resolved placement down ---------------------------------------------------


class Recorded(Exception):
    """Raised by a fake entry point once it has recorded what it was given."""


def _record(monkeypatch: pytest.MonkeyPatch, module, name: str) -> list:
    seen = []

    def fake(*args, **kwargs):
        seen.append(kwargs["placement"])
        raise Recorded

    monkeypatch.setattr(module, name, fake)
    return seen


@pytest.fixture(scope="module")
def target_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_target(tmp_path_factory.mktemp("dev") / "target", layers=2)


def test_every_command_takes_device_and_dtype(gpus, target_dir: Path, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    drafter = tmp_path / "drafter"
    drafter.mkdir()
    common = ["--target", str(target_dir)]
    cases = [(evaluate, "evaluate", ["eval", "--drafter", str(drafter), *common, "--out", str(tmp_path / "e")]),
             (evaluate, "compare", ["compare", str(drafter), *common, "--out", str(tmp_path / "c")]),
             (profile, "profile", ["profile", *common, "--out", str(tmp_path / "p.json")]),
             (generate, "generate", ["data", "generate", *common, "--dataset", "jsonl", "--path",
                                     str(make_conversations(tmp_path / "c.jsonl")), "--num-prompts", "1",
                                     "--out", str(tmp_path / "g")])]
    for module, name, argv in cases:
        seen = _record(monkeypatch, module, name)
        for extra, want in (([], ("cuda:0", torch.bfloat16)), (["--device", "cpu"], ("cpu", torch.float32)),
                            (["--dtype", "fp32"], ("cuda:0", torch.float32)),
                            (["--device", "cpu", "--dtype", "bf16"], ("cpu", torch.bfloat16)),
                            (["--local_rank=1"], ("cuda:1", torch.bfloat16))):
            with pytest.raises(Recorded):  # --local_rank before the command, as the deepspeed launcher puts it
                cli.main(extra + argv if extra == ["--local_rank=1"] else argv + extra)
            assert (str(seen[-1].device), seen[-1].dtype) == want, (name, extra)


def test_eval_reads_device_and_dtype_from_the_recipe_and_flags_win(gpus, target_dir: Path, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch,
                                                                   capsys: pytest.CaptureFixture) -> None:
    seen = _record(monkeypatch, evaluate, "evaluate")
    recipe = tmp_path / "r.yaml"
    argv = ["eval", "--recipe", str(recipe), "--drafter", str(tmp_path), "--target", str(target_dir),
            "--out", str(tmp_path / "o")]
    recipe.write_text("eval:\n  device: cpu\n")
    for extra, want in (([], ("cpu", torch.float32)), (["--dtype", "bf16"], ("cpu", torch.bfloat16)),
                        (["--device", "cuda"], ("cuda:0", torch.bfloat16))):
        with pytest.raises(Recorded):
            cli.main(argv + extra)
        assert (str(seen[-1].device), seen[-1].dtype) == want, extra
    recipe.write_text("eval:\n  device: cuda:5\n")  # the message names where the value came from
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: eval.device=cuda:5: this rank wants GPU 5")
    recipe.write_text("eval:\n  devcie: cpu\n")
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "devcie" in err[0] and "device" in err[0].replace("devcie", "")
    assert not (tmp_path / "o").exists()


def test_a_gpu_that_is_not_there_is_one_error_line_and_nothing_is_written(target_dir: Path, tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch,
                                                                         capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for argv, out in ((["eval", "--drafter", str(tmp_path), "--device", "cuda"], "o"),
                      (["profile", "--dtype", "fp16"], "p.json"),
                      (["data", "generate", "--device", "cuda:1"], "g")):
        assert cli.main([*argv, "--target", str(target_dir), "--out", str(tmp_path / out)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: --d") and ("use --device cpu" in err[0]
                                                                        or "use --dtype fp32" in err[0]), err
        assert not (tmp_path / out).exists()


# --- no tensor of a device path is made on the CPU by default ---------------------------------------

FACTORIES = {"zeros", "ones", "arange", "full", "empty", "tensor", "eye", "rand", "randn", "randint"}
DEVICE_PATHS = [simulate.draft_greedy_path, tree_walk.dynamic_accept_lengths, tree_walk.tree_accepts,
                tree_draft.start_trees, tree_draft.grow, continuations.greedy_batches,
                generate._generate_batch, tree_decode.draft_candidates, tree_decode.draft_tree]


@pytest.mark.parametrize("fn", DEVICE_PATHS, ids=lambda f: f"{f.__module__.split('.')[-1]}.{f.__name__}")
def test_device_paths_create_every_tensor_with_a_device(fn) -> None:
    """The tensors these functions make meet model outputs: each factory call names its device (a CPU
    tensor there fails on a GPU only, which no CPU run would show)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    bare = [ast.unparse(node) for node in ast.walk(tree) if isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute) and node.func.attr in FACTORIES
            and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch"
            and not any(k.arg == "device" for k in node.keywords)]
    assert bare == [], f"{fn.__qualname__} creates CPU tensors: {bare}"


# --- bf16 on the CPU, end to end ------------------------------------------------------------------


@pytest.fixture(scope="module")
def drafters(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """EAGLE-1 and EAGLE-3 drafters (8 SFT steps: a few drafts get accepted) for the tiny 6-layer target."""
    from ppow_plugin.training import trainer
    if patching.patch_status().state != "patched":
        pytest.skip("the EAGLE host is not installed and patched")
    tmp = tmp_path_factory.mktemp("bf16")
    out = {"target": tmp / "target"}
    for kind, extra in (("eagle3", {"model.drafter_type": "eagle3", "model.draft_vocab_size": 64}), ("eagle1", {})):
        t = trainer.Trainer(load_config(None, overrides(tmp, "sft", **{
            "run.output_dir": tmp / kind, "data.max_len": 64, "run.max_steps": 8, "optim.lr": 3e-3, **extra})))
        t.setup()
        out[kind] = t.train()
        t.cleanup()
    return out


def _watch_dtypes(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, torch.dtype, str]]:
    """Record the parameter dtype and device of every model the evaluation loads."""
    seen = []

    def wrap(module, name, pick=lambda m: m):
        real = getattr(module, name)

        def loader(*args, **kwargs):
            model = real(*args, **kwargs)
            p = next(pick(model).parameters())
            seen.append((name, p.dtype, p.device.type))
            return model
        monkeypatch.setattr(module, name, loader)

    wrap(continuations, "hf_model")                                   # HF baseline, continuation generator
    wrap(eagle_compat, "load_host_target")
    wrap(eagle_compat, "load_ea_model", lambda m: m.ea_layer)         # the EAGLE-1 drafter in the host
    wrap(simulate, "load_drafter")
    from ppow_plugin.drafters import adapters
    wrap(adapters, "load_eagle3_drafter")
    return seen


@pytest.mark.parametrize("kind", ["eagle1", "eagle3"])
def test_bf16_on_the_cpu_decodes_simulates_and_keeps_its_own_continuations(kind: str, drafters: dict, tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PPOW_CACHE", str(tmp_path / "cache"))
    prompts = [evaluate.EvalPrompt("mt_bench", str(i), (f"w{i} w{i + 1} w{i + 2}",)) for i in (1, 40)]
    kw = dict(prompts=prompts, max_new_tokens=12, progress=False, tree=evaluate.Eagle3Tree(2, 3, 6))
    fp32 = devices.resolve_placement("cpu", "fp32")
    evaluate.evaluate(drafters["target"], drafters[kind], simulate=True, placement=fp32, **kw)
    seen = _watch_dtypes(monkeypatch)
    bf16 = devices.resolve_placement("cpu", "bf16")
    real = evaluate.evaluate(drafters["target"], drafters[kind], placement=bf16, out_dir=tmp_path / "r", **kw)
    sim = evaluate.evaluate(drafters["target"], drafters[kind], simulate=True, placement=bf16, **kw)
    assert seen and all(dtype == torch.bfloat16 for _, dtype, _ in seen), seen
    assert {name for name, _, _ in seen} >= {"hf_model", "load_host_target", "load_drafter"}
    # the drafts are accepted now and then (the tree's KV compaction runs in bf16), and losslessness is checked
    assert any(a > 0 for r in real.records for a in r.accept_lengths)
    assert real.overall.mismatches == 0 and real.overall.prompts == 2
    assert [r.accept_lengths for r in sim.records] == [r.accept_lengths for r in real.records]
    report = json.loads((tmp_path / "r" / "report.json").read_text())["settings"]
    assert (report["device"], report["dtype"]) == ("cpu", "bf16") and "bf16, cpu" in report["baseline"]
    assert "- device cpu, dtype bf16" in (tmp_path / "r" / "summary.md").read_text()
    # bf16 continuations are made by a bf16 target and kept apart from the fp32 ones made first
    assert sim.settings["continuation_cache"]["generated"] == 2
    root = continuations.cache_root(drafters["target"], fp32)
    assert len(list(root.glob("*.ids.safetensors"))) == 2
    assert len(list((root / "cpu-bf16").glob("*.ids.safetensors"))) == 2


def test_a_mismatch_is_reported_with_device_and_dtype() -> None:
    from ppow_plugin.evaluation import eval_report
    rec = [eval_report.PromptRecord("mt_bench", str(i), 4, 6, 3, [1, 0, 2], 6, 3, 1.0, 6, 1.0, m)
           for i, m in enumerate([None, 3])]
    report = eval_report.build_report(rec, {
        "target": "t", "drafter": "d", "temperature": 0.0, "max_new_tokens": 6, "seed": 0, "prompts": 2,
        "turns_decoded": 2, "turns_skipped_too_long": 0, "tree": "x", "baseline": "b", "torch_threads": 1,
        "tau_formula": "f", "device": "cuda:0", "dtype": "bf16"}, 5, 0.0)
    text = eval_report.summary_markdown(report)
    assert report.overall.mismatches == 1
    assert "**1 of 2 turns differ from the baseline's greedy output (bf16 on cuda:0).**" in text
    assert "- device cuda:0, dtype bf16" in text


# --- the τ probe runs where training runs ---------------------------------------------------------


@needs_host
def test_tau_probe_takes_a_target_on_the_gpu(target_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ppow_plugin.evaluation import tau_probe
    monkeypatch.setattr(datasets, "load_mt_bench", lambda: [datasets.MTBenchQuestion(81, "x", ("w1 w2", "w3"))])
    given = []
    monkeypatch.setattr(continuations, "load_continuations",
                        lambda target_dir, target, *a, **k: given.append(target) or ([], {}))
    weight = SimpleNamespace(device=torch.device("cuda", 0), dtype=torch.bfloat16)
    target = SimpleNamespace(parameters=lambda: iter([weight]), lm_head=SimpleNamespace(weight=weight))
    cfg = SimpleNamespace(eval=EvalCfg(benchmarks=["mt_bench"], every_steps=1, every_prompts=1), rollout=RolloutCfg())
    probe = tau_probe.TauProbe(cfg, target, target_dir, "eagle1", None)
    assert given == [target] and probe.due(1)  # the continuations come from the training target itself


# --- data generate -------------------------------------------------------------------------------


def test_generate_runs_in_bf16_and_never_mixes_dtypes_in_one_dir(target_dir: Path, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PPOW_CACHE", str(tmp_path / "cache"))  # the feature cache the generation fills
    prompts = generate.first_turn_prompts(datasets.load_jsonl_conversations(
        make_conversations(tmp_path / "c.jsonl", n=6)), heldout_fraction=0.0)
    settings = generate.GenSettings(max_new_tokens=4, max_prompt_len=64, batch_size=2, shard_size=2)
    bf16, fp32 = devices.resolve_placement("cpu", "bf16"), devices.resolve_placement("cpu", "fp32")
    out = generate.generate(target_dir, prompts, settings, 4, "test", 0.0, out_dir=tmp_path / "g", max_shards=1,
                            placement=bf16, features=["eagle1"])
    assert json.loads((out / "provenance.json").read_text())["dtype"] == "bf16"
    with pytest.raises(UserError, match=r"made in bf16, not fp32; continue it with --dtype bf16, or pass another"):
        generate.generate(target_dir, prompts, settings, 4, "test", 0.0, out_dir=out, placement=fp32)
    generate.generate(target_dir, prompts, settings, 4, "test", 0.0, out_dir=out, placement=bf16)  # resumes
    assert json.loads((out / "provenance.json").read_text())["totals"]["prompts"] == 4


@needs_host
@pytest.mark.parametrize("kind", ["eagle1", "eagle3"])
def test_profile_times_target_and_drafter_in_bf16(kind: str, drafters: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    seen = _watch_dtypes(monkeypatch)
    real = profile._build_drafter
    monkeypatch.setattr(profile, "_build_drafter", lambda *a: seen.append(
        ("drafter", next((d := real(*a)).parameters()).dtype, "cpu")) or d)
    result = profile.profile(drafters["target"], drafters[kind], repeats=1, tree_sizes=[1, 4], prefix_len=8, inner=1,
                             placement=devices.resolve_placement("cpu", "bf16"))
    assert [n for n, _, _ in seen] == ["load_host_target", *(["load_eagle3_drafter"] if kind == "eagle3" else []),
                                       "drafter"]
    assert all(dtype == torch.bfloat16 for _, dtype, _ in seen), seen
    assert (result["settings"]["device"], result["settings"]["dtype"]) == ("cpu", "bf16") and result["gamma"] > 0


def test_gpu_timings_wait_for_their_own_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    """CUDA runs kernels asynchronously: each timed call of `ppow eval` and `ppow profile` is bracketed by a
    synchronisation of its device, so a timing neither stops early nor pays for the previous call's kernels."""
    events: list = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda dev=None: events.append(f"sync {dev}"))
    host = eagle_compat.HostGenerateResult(torch.tensor([[1, 2, 5, 6]]), 2, 1, [1])
    monkeypatch.setattr(evaluate, "_host_generate", lambda *a: events.append("eagle") or host)
    monkeypatch.setattr(evaluate, "_baseline_generate", lambda *a: events.append("baseline") or [5, 6])
    dec = evaluate._Decoders(None, None, None, None, 100, device=torch.device("cuda", 0))
    prompt = evaluate.EvalPrompt("b", "0", ("x",))
    record, _ = evaluate._decode_turn(dec, prompt, "0", torch.tensor([[1, 2]]), 0.0, 2, 0)
    assert events == ["sync cuda:0", "eagle", "sync cuda:0", "baseline", "sync cuda:0"] and record.mismatch_at is None
    events.clear()
    profile._per_call(lambda: events.append("call"), 2, torch.device("cuda", 1))
    assert events == ["sync cuda:1", "call", "call", "sync cuda:1"]
    events.clear()
    profile._per_call(lambda: events.append("call"), 1, torch.device("cpu"))
    assert events == ["call"]
