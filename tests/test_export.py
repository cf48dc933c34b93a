"""Import/export of drafters: ZeRO 0/2/3 and torch checkpoints -> each format -> strict re-import.

Tiny random Llama targets (hidden 64, vocab 256); EAGLE-1 drafters from the host, EAGLE-3 state dicts
built by hand (the format is the contract, not a module). Negative tests check the one-line error and that
the output directory was never created.
"""

import copy
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from ppow_plugin import cli, distributed
from ppow_plugin.drafters import export, formats
from ppow_plugin.host import eagle_compat, patching
from ppow_plugin.config import config_to_dict, load_config
from ppow_plugin.errors import UserError

if patching.patch_status().state in ("missing", "wrong-version"):
    pytest.skip("eagle-llm 1.2.1 is not installed", allow_module_level=True)

VOCAB, HIDDEN, DRAFT_VOCAB = 256, 64, 48
TINY_HUB_ID = "test-org/tiny-llama"  # --verifier for the random targets, which no known config names


def _make_target(out_dir: Path, hidden: int = HIDDEN) -> LlamaForCausalLM:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=6,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         rope_theta=1e5, bos_token_id=0, eos_token_id=1, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(out_dir)
    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t3"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="t0", eos_token="t1", unk_token="t3").save_pretrained(out_dir)
    return model


def _module_from_state(state: dict[str, torch.Tensor]) -> nn.Module:
    """An nn.Module whose state_dict is exactly `state` (floats trainable, ints/bools buffers)."""
    root = nn.Module()
    for key, tensor in state.items():
        *path, leaf = key.split(".")
        module = root
        for part in path:
            if part not in module._modules:
                module.add_module(part, nn.Module())
            module = module._modules[part]
        if tensor.is_floating_point():
            module.register_parameter(leaf, nn.Parameter(tensor.clone()))
        else:
            module.register_buffer(leaf, tensor.clone())
    return root


def _eagle3_state(draft_vocab: int = DRAFT_VOCAB, seed: int = 0, prefix: str = "midlayer.") -> dict[str, torch.Tensor]:
    """A tiny EAGLE-3 state dict (H = H_target = 64, 4 heads, 2 KV heads, MLP 128) with a reduced vocab."""
    g = torch.Generator().manual_seed(seed)
    H, q, kv, inter = HIDDEN, 64, 32, 128
    shapes = {"fc.weight": (H, 3 * H), "norm.weight": (H,), "lm_head.weight": (draft_vocab, H),
              f"{prefix}self_attn.q_proj.weight": (q, 2 * H), f"{prefix}self_attn.k_proj.weight": (kv, 2 * H),
              f"{prefix}self_attn.v_proj.weight": (kv, 2 * H), f"{prefix}self_attn.o_proj.weight": (H, q),
              f"{prefix}mlp.gate_proj.weight": (inter, H), f"{prefix}mlp.up_proj.weight": (inter, H),
              f"{prefix}mlp.down_proj.weight": (H, inter), f"{prefix}hidden_norm.weight": (H,),
              f"{prefix}input_layernorm.weight": (H,), f"{prefix}post_attention_layernorm.weight": (H,)}
    state = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    used = torch.randperm(VOCAB, generator=g)[:draft_vocab].sort().values  # kept target ids, ascending
    state["d2t"] = used - torch.arange(draft_vocab)  # target_id = draft_id + d2t[draft_id]
    t2d = torch.zeros(VOCAB, dtype=torch.bool)
    t2d[used] = True
    state["t2d"] = t2d
    return state


def _eagle3_config(draft_vocab: int = DRAFT_VOCAB) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
            "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": VOCAB,
            "num_hidden_layers": 1, "draft_vocab_size": draft_vocab, "rms_norm_eps": 1e-6,
            "max_position_embeddings": 128, "rope_theta": 1e5, "hidden_act": "silu"}


def _write_dir(out: Path, config: dict, state: dict[str, torch.Tensor], name: str = "model.safetensors") -> Path:
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config))
    if name.endswith(".bin"):
        torch.save(state, out / name)
    else:
        save_file({k: v.contiguous() for k, v in state.items()}, str(out / name))
    return out


def _checkpoint(root: Path, module: nn.Module, engine: str, stage: int, target_dir: Path) -> Path:
    """What Trainer.save_checkpoint writes: engine state + meta.json with every file's sha256."""
    cfg = load_config(None, [f"dist.engine={engine}", f"dist.zero_stage={stage}", f"model.target={target_dir}"])
    eng = distributed.Engine(copy.deepcopy(module), cfg, distributed.DistInfo(0, 1, 0))
    ckpt = root / "checkpoints" / "step-000003"
    ckpt.mkdir(parents=True)
    eng.save(ckpt)
    files = {p.relative_to(ckpt).as_posix(): export.sha256_file(p) for p in sorted(ckpt.rglob("*")) if p.is_file()}
    meta = {"step": 3, "stage": "ppow", "config": config_to_dict(cfg), "target": str(target_dir), "files": files}
    (ckpt / "meta.json").write_text(json.dumps(meta))
    return root


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    base = tmp_path_factory.mktemp("export")
    target_dir, small_dir = base / "target", base / "target_h32"
    target = _make_target(target_dir)
    _make_target(small_dir, hidden=32)
    torch.manual_seed(1)
    drafter = eagle_compat.new_eagle1_drafter(target.config, bias=True,
                                              embed_weight=target.get_input_embeddings().weight).eval()
    with torch.no_grad():
        drafter.fc.bias.normal_()  # a non-zero bias, so dropping it would show
    eagle3 = _module_from_state(_eagle3_state())
    runs = {}
    for engine, stage in (("deepspeed", 0), ("deepspeed", 2), ("deepspeed", 3), ("torch", 0)):
        name = f"{engine}{stage}"
        runs[("eagle1", name)] = _checkpoint(base / f"run1-{name}", drafter, engine, stage, target_dir)
        if engine == "deepspeed":
            runs[("eagle3", name)] = _checkpoint(base / f"run3-{name}", eagle3, engine, stage, target_dir)
    return {"target_dir": target_dir, "small_dir": small_dir, "target": target, "drafter": drafter,
            "eagle3": {k: v.clone() for k, v in eagle3.state_dict().items()}, "runs": runs}


def _forward(drafter: nn.Module) -> torch.Tensor:
    g = torch.Generator().manual_seed(5)
    features = torch.randn(1, 6, HIDDEN, generator=g)   # [B, T, H]
    ids = torch.randint(2, VOCAB, (1, 6), generator=g)  # [B, T]
    with torch.no_grad():
        return drafter(features, input_ids=ids)


def _assert_nothing_written(out: Path) -> None:
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.tmp-*"))  # no temp dir left behind


# ---------------------------------------------------------------------------------------------------
# round trips


@pytest.mark.parametrize("fmt", ["eagle1", "eagle1-compact"])
@pytest.mark.parametrize("engine", ["deepspeed0", "deepspeed2", "deepspeed3", "torch0"])
def test_eagle1_round_trip_same_weights_and_outputs(world: dict, tmp_path: Path, engine: str, fmt: str) -> None:
    ref = world["drafter"]
    out, _ = export.export(world["runs"][("eagle1", engine)], tmp_path / "out", fmt, target=str(world["target_dir"]))
    loaded = formats.load_drafter(out, target_config=world["target_dir"])
    assert loaded.format == "eagle1" and loaded.config["bias"] is True
    expected = {k: v for k, v in ref.state_dict().items() if fmt == "eagle1" or k != formats.EMBED_KEY}
    assert set(loaded.state) == set(expected)
    for k, v in expected.items():
        assert torch.equal(loaded.state[k], v), k
    again = eagle_compat.new_eagle1_drafter(world["target"].config, bias=True,
                                            embed_weight=world["target"].get_input_embeddings().weight).eval()
    eagle_compat.load_drafter_weights(again, loaded.state | {formats.EMBED_KEY: ref.embed_tokens.weight})
    assert torch.equal(_forward(again), _forward(ref))
    meta = json.loads((out / "ppow_meta.json").read_text())
    assert meta["step"] == 3 and meta["format"] == fmt and meta["config"]["dist"]["engine"] in engine
    assert all(len(h) == 64 for h in meta["source_files_sha256"].values()) and meta["source_files_sha256"]
    names = {"eagle1": {"config.json", "pytorch_model.bin"}, "eagle1-compact": {"config.json", "model.safetensors"}}
    assert {p.name for p in out.iterdir()} == names[fmt] | {"ppow_meta.json"}


@pytest.mark.parametrize("engine", ["deepspeed0", "deepspeed2", "deepspeed3"])
def test_eagle3_round_trip_from_zero_checkpoints(world: dict, tmp_path: Path, engine: str) -> None:
    """Same tensors (d2t/t2d dtypes included) after ZeRO consolidation; identical weights give identical logits."""
    out, _ = export.export(world["runs"][("eagle3", engine)], tmp_path / "out", "eagle3")  # recorded target
    written = load_file(str(out / "model.safetensors"))
    ref = world["eagle3"]
    assert set(written) == set(ref)
    for k, v in ref.items():
        assert written[k].dtype == v.dtype and torch.equal(written[k], v), k
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLMEagle3"] and config["draft_vocab_size"] == DRAFT_VOCAB
    assert "target_hidden_size" not in config and config["num_hidden_layers"] == 1
    assert formats.load_drafter(out, world["target_dir"]).format == "eagle3"


def test_exported_eagle1_loads_in_host_with_every_key(world: dict, tmp_path: Path) -> None:
    out, _ = export.export(world["runs"][("eagle1", "deepspeed2")], tmp_path / "host", "eagle1")
    ea_model = eagle_compat.load_ea_model(world["target_dir"], out)  # the host loads with strict=True
    host_state = ea_model.ea_layer.state_dict()
    written = torch.load(out / "pytorch_model.bin", weights_only=True)
    assert set(host_state) == set(written) == set(world["drafter"].state_dict())
    for k, v in written.items():
        assert torch.equal(host_state[k], v) and v.dtype == torch.float32, k


def test_compact_to_host_takes_target_embeddings(world: dict, tmp_path: Path) -> None:
    """From --target, else from the target dir a trainer's drafter dir records in ppow_meta.json; an export
    records no dir of this machine (only the target's name), so re-exporting one needs --target."""
    trained = export.save_drafter_dir(tmp_path / "trained", world["drafter"].state_dict(),
                                      eagle_compat.eagle1_config_dict(world["target"].config, bias=True),
                                      {"step": 3, "target": str(world["target_dir"])})
    recorded, _ = export.export(trained, tmp_path / "recorded", "eagle1")
    compact, _ = export.export(world["runs"][("eagle1", "torch0")], tmp_path / "compact", "eagle1-compact",
                               verifier=TINY_HUB_ID)
    with pytest.raises(UserError, match="pass --target"):
        export.export(compact, tmp_path / "host", "eagle1")
    _assert_nothing_written(tmp_path / "host")
    host, _ = export.export(compact, tmp_path / "host", "eagle1", target=str(world["target_dir"]))
    assert json.loads((host / "ppow_meta.json").read_text())["target"] == TINY_HUB_ID  # the export's name kept
    for out in (host, recorded):
        written = torch.load(out / "pytorch_model.bin", weights_only=True)
        assert torch.equal(written[formats.EMBED_KEY], world["target"].get_input_embeddings().weight)


@pytest.mark.parametrize("prefix", ["midlayer.", "midlayer.0.", "layers.0."])
def test_eagle3_variants_normalise_and_keep_d2t(tmp_path: Path, prefix: str) -> None:
    state = _eagle3_state(prefix=prefix)
    src = _write_dir(tmp_path / "src", _eagle3_config(), state, "pytorch_model.bin")
    loaded = formats.load_drafter(src)
    assert loaded.format == "eagle3" and all(not k.startswith(("layers.", "midlayer.0.")) for k in loaded.state)
    assert any("renamed" in n for n in loaded.notes) == (prefix != "midlayer.")
    assert "reduced to 48" in loaded.describe()
    out, _ = export.export(src, tmp_path / "out", "eagle3")
    again = formats.load_drafter(out)
    assert torch.equal(again.state["d2t"], state["d2t"]) and torch.equal(again.state["t2d"], state["t2d"])
    assert again.state["d2t"].dtype == torch.int64 and again.state["t2d"].dtype == torch.bool
    assert set(again.state) == set(_eagle3_state())


def test_eagle3_full_vocab_without_d2t_gets_identity_map(tmp_path: Path) -> None:
    state = {k: v for k, v in _eagle3_state(draft_vocab=VOCAB).items() if k not in ("d2t", "t2d")}
    src = _write_dir(tmp_path / "src", _eagle3_config(VOCAB), state)
    out, drafter = export.export(src, tmp_path / "out", "eagle3")
    written = load_file(str(out / "model.safetensors"))
    assert torch.equal(written["d2t"], torch.zeros(VOCAB, dtype=torch.int64)) and bool(written["t2d"].all())
    assert any("identity map" in n for n in drafter.notes)


def test_sharded_safetensors_and_bias_reconciliation(world: dict, tmp_path: Path) -> None:
    state = {k: v for k, v in world["drafter"].state_dict().items() if k != "fc.bias"}
    config = eagle_compat.eagle1_config_dict(world["target"].config, bias=True)  # says bias, weights have none
    src = tmp_path / "sharded"
    src.mkdir()
    keys = sorted(state)
    shards = {"model-00001-of-00002.safetensors": keys[:5], "model-00002-of-00002.safetensors": keys[5:]}
    for name, part in shards.items():
        save_file({k: state[k].contiguous() for k in part}, str(src / name))
    weight_map = {k: name for name, part in shards.items() for k in part}
    (src / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (src / "config.json").write_text(json.dumps(config))
    loaded = formats.load_drafter(src, world["target"].config)
    assert loaded.config["bias"] is False and any("the weights win" in n for n in loaded.notes)
    assert all(torch.equal(loaded.state[k], v) for k, v in state.items())
    out, _ = export.export(src, tmp_path / "host", "eagle1")
    assert json.loads((out / "config.json").read_text())["bias"] is False
    eagle_compat.load_ea_model(world["target_dir"], out)  # strict: no fc.bias expected, none written


# ---------------------------------------------------------------------------------------------------
# refusals: one-line error, nothing written


def _refuse(match: str, *args, **kwargs) -> None:
    out = Path(args[1])
    with pytest.raises(UserError, match=match) as info:
        export.export(*args, **kwargs)
    assert "\n" not in str(info.value)
    _assert_nothing_written(out)


def test_refuses_misnamed_key(world: dict, tmp_path: Path) -> None:
    state = dict(world["drafter"].state_dict())
    state["layers.0.mlp.upproj.weight"] = state.pop("layers.0.mlp.up_proj.weight")
    src = _write_dir(tmp_path / "src", eagle_compat.eagle1_config_dict(world["target"].config), state)
    _refuse(r"missing \['layers.0.mlp.up_proj.weight'\], unexpected \['layers.0.mlp.upproj.weight'\]",
            src, tmp_path / "out", "eagle1")


def test_refuses_reduced_vocab_without_d2t(tmp_path: Path) -> None:
    state = {k: v for k, v in _eagle3_state().items() if k not in ("d2t", "t2d")}
    src = _write_dir(tmp_path / "src", _eagle3_config(), state)
    _refuse(r"reduced draft vocabulary \(48 of 256\) without d2t", src, tmp_path / "out", "eagle3")


def test_refuses_hidden_size_mismatch_with_target(world: dict, tmp_path: Path) -> None:
    _refuse("hidden-size mismatch", world["runs"][("eagle1", "torch0")], tmp_path / "out", "eagle1",
            target=str(world["small_dir"]))


def test_refuses_vocab_mismatch_with_target(world: dict, tmp_path: Path) -> None:
    config = dict(eagle_compat.eagle1_config_dict(world["target"].config), vocab_size=VOCAB + 44)
    state = {k: v for k, v in world["drafter"].state_dict().items() if k != formats.EMBED_KEY}  # compact
    src = _write_dir(tmp_path / "src", config, state)
    _refuse(f"vocabulary mismatch: drafter vocab_size {VOCAB + 44}, target {VOCAB}", src, tmp_path / "out",
            "eagle1", target=str(world["target_dir"]))


def test_refuses_truncated_weight_file(world: dict, tmp_path: Path) -> None:
    src, _ = export.export(world["runs"][("eagle1", "torch0")], tmp_path / "src", "eagle1-compact")
    weights = src / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    _refuse("unreadable or truncated", src, tmp_path / "out", "eagle1", target=str(world["target_dir"]))


def test_refuses_existing_out_dir_without_force(world: dict, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="exists and is not empty; pass --force") as info:
        export.export(world["runs"][("eagle1", "torch0")], out, "eagle1")
    assert "\n" not in str(info.value) and [p.name for p in out.iterdir()] == ["keep.txt"]
    export.export(world["runs"][("eagle1", "torch0")], out, "eagle1", force=True)
    assert not (out / "keep.txt").exists() and (out / "pytorch_model.bin").is_file()


def _report(path: Path, tau: float, weights: dict[str, torch.Tensor] | None, drafter: str = "d") -> Path:
    """A `ppow eval` report.json; `weights` given: it records their weight hash, as `ppow eval` does."""
    settings = {"drafter": drafter}
    if weights is not None:
        settings["drafter_weights_sha256"] = formats.weights_digest(weights)
    path.write_text(json.dumps({"settings": settings, "stats": {"overall": {"tau": tau}}}))
    return path


def test_tau_gate_and_cli(world: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    report = _report(tmp_path / "report.json", 2.5, world["drafter"].state_dict())
    run, out = world["runs"][("eagle1", "torch0")], tmp_path / "out"
    argv = ["export", str(run), str(out), "--format", "eagle1", "--min-tau", "3.0", "--eval-report", str(report)]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: measured tau 2.500 is below --min-tau 3.000") and err.count("\n") == 1
    _assert_nothing_written(out)
    assert cli.main(argv + ["--force"]) == 0
    meta = json.loads((out / "ppow_meta.json").read_text())
    assert meta["tau"] == 2.5 and meta["tau_gate"] == "forced"
    assert "EAGLE-1/2 drafter, hidden 64" in capsys.readouterr().out


@pytest.mark.parametrize("case", ["other drafter", "no hash", "same drafter"])
def test_eval_report_must_be_for_the_exported_weights(world: dict, tmp_path: Path, case: str) -> None:
    """Issue 16: a report made for another drafter passed the gate. Now its weight hash must match the source's,
    even with --force; the same weights pass (the can-fail side: the check is not a blanket refusal)."""
    weights = dict(world["drafter"].state_dict())
    if case == "other drafter":
        weights["fc.bias"] = weights["fc.bias"] + 1e-3
    report = _report(tmp_path / "r.json", 4.0, None if case == "no hash" else weights, drafter="runs/other/drafter")
    args = (world["runs"][("eagle1", "torch0")], tmp_path / "out", "eagle1")
    if case == "same drafter":
        export.export(*args, min_tau=3.0, eval_report=report)
        assert json.loads((tmp_path / "out" / "ppow_meta.json").read_text())["tau_gate"] == "passed"
        return
    match = "was made for other weights" if case == "other drafter" else "records no drafter weight hash"
    _refuse(match + r".*run `ppow eval --drafter", *args, min_tau=3.0, eval_report=report, force=True)


def test_refuses_eagle1_as_eagle3(world: dict, tmp_path: Path) -> None:
    _refuse("can only be exported as eagle1 or eagle1-compact", world["runs"][("eagle1", "torch0")],
            tmp_path / "out", "eagle3")


# ---------------------------------------------------------------------------------------------------
# one drafter, one config: a Llama-3.1-shaped EAGLE-3 run (llama3 rope scaling, 6 layers) as the trainer writes it

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64, "rope_theta": 5e5}


@pytest.fixture(scope="module")
def llama3_run(tmp_path_factory: pytest.TempPathFactory, world: dict) -> dict:
    """`<run>/drafter` written by the trainer's writer (save_eagle3_dir + Eagle3Config.to_hf_dict, drafters.py)
    and `<run>/checkpoints/step-000003` (engine.pt) holding the same weights."""
    from ppow_plugin.drafters.eagle3 import Eagle3Config, Eagle3Drafter, build_vocab_map
    base = tmp_path_factory.mktemp("llama3")
    target_dir = base / "target"
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=6,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         rope_scaling=dict(LLAMA3_ROPE), bos_token_id=0, eos_token_id=1, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(target_dir)
    cfg = Eagle3Config.from_target_config(config, DRAFT_VOCAB)
    drafter = Eagle3Drafter(cfg).eval()
    drafter.set_vocab_map(*build_vocab_map(torch.arange(VOCAB).float() % 7, DRAFT_VOCAB))
    run = _checkpoint(base / "run", drafter, "torch", 0, target_dir)
    export.save_eagle3_dir(run / "drafter", drafter.state_dict(), cfg.to_hf_dict(),
                           {"step": 3, "target": str(target_dir)})
    return {"run": run, "target_dir": target_dir, "drafter": drafter, "cfg": cfg}


def _exports(src_dirs: dict[str, Path], out: Path, fmt: str, **kwargs) -> dict[str, tuple[bytes, dict]]:
    result = {}
    for name, src in src_dirs.items():
        done, _ = export.export(src, out / name, fmt, **kwargs)
        weights = next(p for p in done.iterdir() if p.name in ("model.safetensors", "pytorch_model.bin"))
        state = load_file(str(weights)) if weights.suffix == ".safetensors" else torch.load(weights, weights_only=True)
        result[name] = ((done / "config.json").read_bytes(), state)
    return result


def _assert_identical(exports: dict[str, tuple[bytes, dict]]) -> None:
    (config, state), *others = exports.values()
    for other_config, other_state in others:
        assert other_config == config
        assert set(other_state) == set(state) and all(torch.equal(other_state[k], v) for k, v in state.items())


@pytest.mark.parametrize("fmt", ["eagle3", "speculators"])
def test_eagle3_run_checkpoint_and_drafter_dir_export_identically(llama3_run: dict, world: dict, tmp_path: Path,
                                                                  fmt: str) -> None:
    run = llama3_run["run"]
    sources = {"run": run, "checkpoint": run / "checkpoints" / "step-000003", "drafter": run / "drafter"}
    exports = _exports(sources, tmp_path, fmt, verifier=TINY_HUB_ID)
    _assert_identical(exports)
    config = json.loads(exports["run"][0])
    flat = config if fmt == "eagle3" else dict(config["transformer_layer_config"], **config)
    assert flat["eagle_aux_hidden_state_layer_ids"] == [2, 3, 3] and flat["tie_word_embeddings"] is False
    assert flat["rope_theta"] == 5e5 and flat.get("rope_scaling") is None
    if fmt == "eagle3":
        assert config["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [1, 2, 2]
    # can fail: the same weights rebuilt against another target (rope_theta 1e5) give another config
    other = _exports({"checkpoint": sources["checkpoint"]}, tmp_path / "other", fmt, target=str(world["target_dir"]),
                     verifier=TINY_HUB_ID)
    with pytest.raises(AssertionError):
        _assert_identical({"run": exports["run"], **other})


@pytest.mark.parametrize("fmt", ["eagle1", "eagle1-compact"])
def test_eagle1_run_checkpoint_and_drafter_dir_export_identically(world: dict, tmp_path: Path, fmt: str) -> None:
    run = tmp_path / "run"
    shutil.copytree(world["runs"][("eagle1", "torch0")], run)
    export.save_drafter_dir(run / "drafter", world["drafter"].state_dict(),
                            eagle_compat.eagle1_config_dict(world["target"].config, bias=True),
                            {"step": 3, "target": str(world["target_dir"])})
    sources = {"run": run, "checkpoint": run / "checkpoints" / "step-000003", "drafter": run / "drafter"}
    _assert_identical(_exports(sources, tmp_path / "out", fmt))


# Host rules (ppow_plugin/host_configs.py), re-written from: SafeAILab/EAGLE eagle/model/configs.py and
# eagle/model/cnets.py; sgl-project/sglang python/sglang/srt/models/llama_eagle3.py, models/llama.py and the
# model runner's eagle_config read; vllm-project/vllm vllm/model_executor/models/llama_eagle3.py, registry.py,
# v1/worker/gpu_model_runner.py (_get_eagle3_aux_layers_from_config), transformers_utils/configs/speculators/.
BROKEN = {
    "llama3 rope_scaling (what the trainer wrote before)": ("eagle", {"rope_scaling": dict(LLAMA3_ROPE)}),
    "head_dim EAGLE cannot build (Qwen3-32B-like)": ("eagle", {"head_dim": 96}),  # 4096 // 32 = 128
    "no rope_theta": ("eagle", {"rope_theta": None}),
    "EAGLE-1 architecture": ("sglang", {"architectures": ["LlamaForCausalLM"]}),
    "tied head": ("sglang", {"tie_word_embeddings": True}),
    "no draft_vocab_size": ("sglang", {"draft_vocab_size": None}),
    "bias": ("vllm", {"bias": True}),
    "norm_before_residual": ("vllm", {"norm_before_residual": True}),
}


def _llama31_config() -> tuple[dict, int]:
    from transformers import AutoConfig

    from ppow_plugin.drafters.eagle3 import Eagle3Config
    from ppow_plugin.host.target_arch import KNOWN_CONFIGS
    tc = AutoConfig.from_pretrained(KNOWN_CONFIGS / "llama-3.1-8b-instruct")
    return Eagle3Config.from_target_config(tc, 32000).to_hf_dict(), tc.num_hidden_layers


def test_llama31_eagle3_config_is_read_as_trained_by_every_host() -> None:
    """Accepted by EAGLE, SGLang and vLLM; each rotates with the drafter's plain RoPE at theta 500000 and feeds
    the drafter's aux layers (2, 16, 29) (SGLang through eagle_config's output-indexed ids)."""
    from eagle.model.configs import EConfig  # eagle-llm's EConfig: the same rope_scaling check as EAGLE main

    from ppow_plugin.host import host_configs
    config, layers = _llama31_config()
    assert host_configs.host_problems(config) == {"eagle": [], "sglang": [], "vllm": []}
    for host in host_configs.HOSTS:
        assert host_configs.host_rotation(host, config) == ("default", 500000.0)
        assert host_configs.host_aux_layers(host, config, layers) == (2, 16, 29)
    EConfig(**{k: v for k, v in config.items() if k != "rope_parameters"})  # the real validator accepts it


@pytest.mark.parametrize("case", list(BROKEN))
def test_host_rules_catch_what_each_host_refuses_or_misreads(case: str) -> None:
    from ppow_plugin.host import host_configs
    host, change = BROKEN[case]
    config = {k: v for k, v in {**_llama31_config()[0], **change}.items() if v is not None}
    assert host_configs.host_problems(config)[host], case
    if case.startswith("llama3"):
        from eagle.model.configs import EConfig
        with pytest.raises(ValueError, match="rope_scaling"):  # the real validator agrees with the rule
            EConfig(**{k: v for k, v in config.items() if k != "rope_parameters"})


def test_sglang_reads_eagle_config_ids_as_layer_outputs() -> None:
    from ppow_plugin.host import host_configs
    config, layers = _llama31_config()
    unshifted = dict(config, eagle_config={"eagle_aux_hidden_state_layer_ids": [2, 16, 29]})
    assert host_configs.host_aux_layers("sglang", unshifted, layers) == (3, 17, 30)  # one layer late
    assert host_configs.host_aux_layers("vllm", unshifted, layers) == (2, 16, 29)  # top-level key wins


def test_speculators_round_trip_gives_equal_logits(llama3_run: dict, tmp_path: Path) -> None:
    from ppow_plugin.host import host_configs
    from ppow_plugin.drafters.eagle3 import Eagle3Drafter
    spec, _ = export.export(llama3_run["run"] / "drafter", tmp_path / "spec", "speculators", verifier=TINY_HUB_ID)
    config = json.loads((spec / "config.json").read_text())
    # the fields vLLM's speculators reader requires (validate_speculators_config / update_eagle3)
    assert config["speculators_model_type"] == "eagle3" and config["norm_before_residual"] is False
    assert config["speculators_config"]["proposal_methods"][0]["speculative_tokens"] >= 1
    assert config["speculators_config"]["verifier"] == {"name_or_path": TINY_HUB_ID,
                                                        "architectures": ["LlamaForCausalLM"]}
    assert any(k.startswith("layers.0.") for k in load_file(str(spec / "model.safetensors")))
    view = host_configs.vllm_speculators_view(config)  # what vLLM makes of it: accepted, same aux layers
    assert host_configs.host_problems(view)["vllm"] == [] and host_configs.host_aux_layers("vllm", view, 6) == (2, 3, 3)
    silent = {k: v for k, v in config.items() if k != "norm_before_residual"}  # can fail: vLLM's default is true
    assert host_configs.host_problems(host_configs.vllm_speculators_view(silent))["vllm"]
    loaded = formats.load_drafter(spec, llama3_run["target_dir"])
    back = Eagle3Drafter(llama3_run["cfg"]).eval()
    back.load_state_dict(loaded.state, strict=True)
    g = torch.Generator().manual_seed(3)
    hidden, ids = torch.randn(1, 5, 3 * HIDDEN, generator=g), torch.randint(0, VOCAB, (1, 5), generator=g)
    with torch.no_grad():
        assert torch.equal(back(hidden, ids)[1], llama3_run["drafter"](hidden, ids)[1])
    again, _ = export.export(spec, tmp_path / "eagle3", "eagle3")  # speculators in -> the same eagle3 config
    direct, _ = export.export(llama3_run["run"] / "drafter", tmp_path / "direct", "eagle3")
    assert (again / "config.json").read_bytes() == (direct / "config.json").read_bytes()


@pytest.mark.parametrize("change, match", [({"norm_before_residual": True}, "sets norm_before_residual"),
                                           ({"transformer_layer_config": None}, "without a transformer_layer_config")])
def test_speculators_configs_ppow_cannot_compute_are_refused(llama3_run: dict, tmp_path: Path, change: dict,
                                                             match: str) -> None:
    spec, _ = export.export(llama3_run["run"] / "drafter", tmp_path / "spec", "speculators", verifier=TINY_HUB_ID)
    config = json.loads((spec / "config.json").read_text())
    (spec / "config.json").write_text(json.dumps(dict(config, **change)))
    with pytest.raises(UserError, match=match + ".*"):
        formats.load_drafter(spec)


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_exported_files_are_readable_as_umask_allows(world: dict, tmp_path: Path, umask: int) -> None:
    old = os.umask(umask)
    try:
        out, _ = export.export(world["runs"][("eagle1", "torch0")], tmp_path / "out", "eagle1-compact")
    finally:
        os.umask(old)
    assert {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()} == dict.fromkeys(
        ("config.json", "model.safetensors", "ppow_meta.json"), 0o666 & ~umask)  # safetensors alone writes 0600


@pytest.mark.parametrize("out", [".", "a/..", "..", "/"])
def test_output_that_is_the_cwd_or_a_parent_is_refused_before_any_work(world: dict, tmp_path: Path, out: str,
                                                                       monkeypatch: pytest.MonkeyPatch,
                                                                       capsys: pytest.CaptureFixture) -> None:
    """Issue 16: `ppow export SRC . --force` did the work, then raised ValueError and left a `..tmp-*` dir."""
    work = tmp_path / "work"
    (work / "a").mkdir(parents=True)
    (work / "notes.txt").write_text("mine")
    monkeypatch.chdir(work)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    argv = ["export", str(world["runs"][("eagle1", "torch0")]), out, "--format", "eagle1", "--force"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: output") and "current directory or one of its parents" in err and err.count("\n") == 1
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_output_path_with_dot_dot_components_is_resolved(world: dict, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Can-fail side of the test above: 'a/../out' is a fine new directory once resolved."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a").mkdir()
    assert cli.main(["export", str(world["runs"][("eagle1", "torch0")]), "a/../out", "--format", "eagle1"]) == 0
    assert (tmp_path / "out" / "pytorch_model.bin").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "out"]


# ---------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_shaped_drafter_exports_and_loads_in_host(tmp_path: Path) -> None:
    from transformers import AutoConfig

    from ppow_plugin.host.assets import default_target_dir

    target_dir = default_target_dir(prepare=True)
    config = AutoConfig.from_pretrained(target_dir)
    drafter = eagle_compat.new_eagle1_drafter(config, bias=False)
    compact = export.save_drafter_dir(tmp_path / "compact", drafter.state_dict(),
                                      eagle_compat.eagle1_config_dict(config, bias=False), {"step": 0})
    out, loaded = export.export(compact, tmp_path / "host", "eagle1", target="default")
    ea_model = eagle_compat.load_ea_model(target_dir, out)
    for k, v in loaded.state.items():
        assert torch.equal(ea_model.ea_layer.state_dict()[k], v), k
