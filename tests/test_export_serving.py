"""Exports that work on the serving machine (issue 31): the target named as the server finds it, no path of
the exporting machine in any exported file, and the source's dtype kept.

Sources: tiny random targets and drafters (test_export's helpers), and the committed fp16 EAGLE-3 drafter
assets/drafters/smollm2-135m-eagle3-sft-gen, whose ppow_meta.json records the training machine's target dir.
"""

import json
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_export import (
    TINY_HUB_ID,
    _checkpoint,
    _eagle3_config,
    _eagle3_state,
    _make_target,
    _module_from_state,
    _write_dir,
)

from ppow_plugin import cli
from ppow_plugin.drafters import export, formats
from ppow_plugin.host import assets, eagle_compat, serving_names
from ppow_plugin.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
SMOL_E3 = ROOT / "assets" / "drafters" / "smollm2-135m-eagle3-sft-gen"  # fp16, no embeddings
SMOL_HUB = "HuggingFaceTB/SmolLM2-135M-Instruct"
FORMATS = {"eagle1": ("eagle1", "eagle1-compact"), "eagle3": ("eagle3", "speculators")}


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A run (torch engine checkpoint) and a trainer-style drafter dir per drafter type, all recording the
    target by its absolute tmp path; the drafter dirs' config.json also carry an absolute `_name_or_path`."""
    base = tmp_path_factory.mktemp("serving")
    target_dir = base / "target"
    target = _make_target(target_dir)
    torch.manual_seed(1)
    e1 = eagle_compat.new_eagle1_drafter(target.config, bias=True, embed_weight=target.get_input_embeddings().weight)
    e3 = _module_from_state(_eagle3_state())
    e1_config = dict(eagle_compat.eagle1_config_dict(target.config, bias=True), _name_or_path=str(target_dir))
    drafter1 = export.save_drafter_dir(base / "drafter1", e1.state_dict(), e1_config,
                                       {"step": 3, "target": str(target_dir)})
    drafter3 = _write_dir(base / "drafter3", dict(_eagle3_config(), _name_or_path=str(base / "drafter3")),
                          dict(_eagle3_state()))
    (drafter3 / "ppow_meta.json").write_text(json.dumps({"step": 3, "target": str(target_dir)}))
    return {"target_dir": target_dir, "target": target,
            "eagle1": {"run": _checkpoint(base / "run1", e1, "torch", 0, target_dir), "drafter": drafter1},
            "eagle3": {"run": _checkpoint(base / "run3", e3, "torch", 0, target_dir), "drafter": drafter3}}


def _machine_paths(tmp_path: Path) -> set[bytes]:
    """Byte strings that must never appear in an export: this machine's home, asset cache, temp dirs, and
    the working directory and checkout (both absolute)."""
    paths = {Path.home(), assets.cache_dir(), Path(tempfile.gettempdir()) / "", tmp_path, Path.cwd(), ROOT}
    return {(str(p) + "/").encode() for p in paths}


def _assert_no_machine_path(out: Path, tmp_path: Path) -> None:
    for f in sorted(out.rglob("*")):
        data = f.read_bytes()
        for bad in _machine_paths(tmp_path):
            assert bad not in data, f"{f.name} holds {bad.decode()}"


# ---------------------------------------------------------------------------------------------------
# no path of this machine in any exported file


@pytest.mark.parametrize("origin", ["run", "drafter"])
@pytest.mark.parametrize("fmt", ["eagle1", "eagle1-compact", "eagle3", "speculators"])
def test_no_exported_file_holds_a_path_of_this_machine(sources: dict, tmp_path: Path, fmt: str,
                                                       origin: str) -> None:
    kind = "eagle1" if fmt.startswith("eagle1") else "eagle3"
    verifier = TINY_HUB_ID if fmt == "speculators" else None  # the tiny target has no hub id
    out, _ = export.export(sources[kind][origin], tmp_path / "out", fmt, verifier=verifier)
    _assert_no_machine_path(out, tmp_path)
    meta = json.loads((out / "ppow_meta.json").read_text())
    assert meta["target"] == verifier and meta["source"].startswith(".../")  # tmp_path: outside the cwd
    if origin == "run":  # the recipe's model.target was the absolute tmp path
        recorded = meta["config"]["model"]["target"]
        assert recorded.startswith(".../") and recorded.endswith("/target")


def _smol_target() -> Path:
    """The prepared SmolLM2 target (the speculators layout copies its embeddings into slim drafters)."""
    try:
        return assets.default_target_dir(prepare=False)
    except UserError:
        pytest.skip("the default target is not prepared (ppow prepare)")


@pytest.mark.parametrize("fmt", ["eagle3", "speculators"])
def test_committed_drafter_exports_name_the_hub_target(tmp_path: Path, fmt: str) -> None:
    """Its ppow_meta.json records /root/.cache/ppow/targets/smollm2-135m-instruct (the training machine's
    prepared target): the export names SmolLM2's hub id, and writes no path of this machine."""
    out, _ = export.export(SMOL_E3, tmp_path / "out", fmt, target=str(_smol_target()))
    _assert_no_machine_path(out, tmp_path)
    meta = json.loads((out / "ppow_meta.json").read_text())
    assert meta["target"] == SMOL_HUB and "smollm2-135m-instruct" in meta["target_named_by"]
    if fmt == "speculators":
        verifier = json.loads((out / "config.json").read_text())["speculators_config"]["verifier"]
        assert verifier == {"name_or_path": SMOL_HUB, "architectures": ["LlamaForCausalLM"]}


def test_target_dir_of_another_machine_is_named_by_its_name(tmp_path: Path) -> None:
    """The recorded target dir is absent here: named from its last component, checked against the drafter's
    widths; the speculators layout, which needs the target's embeddings, asks for --target."""
    src = tmp_path / "src"
    shutil.copytree(SMOL_E3, src)
    meta = json.loads((src / "ppow_meta.json").read_text())
    elsewhere = "/elsewhere/home/.cache/ppow/targets/smollm2-135m-instruct"
    (src / "ppow_meta.json").write_text(json.dumps(dict(meta, target=elsewhere)))
    out, _ = export.export(src, tmp_path / "out", "eagle3")
    assert json.loads((out / "ppow_meta.json").read_text())["target"] == SMOL_HUB
    assert b"/elsewhere" not in b"".join(f.read_bytes() for f in out.iterdir())
    with pytest.raises(UserError, match="speculators layout .* pass --target"):
        export.export(src, tmp_path / "spec", "speculators")


# ---------------------------------------------------------------------------------------------------
# which name: the rules of serving_names.serving_target


def _target_config_dir(path: Path, known: str, **changes) -> Path:
    config = json.loads((serving_names.KNOWN_CONFIGS / known / "config.json").read_text())
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({k: v for k, v in dict(config, **changes).items()
                                                  if not k.startswith("_")}))
    return path


def test_target_names_by_marker_default_cache_and_checked_dir_name(tmp_path: Path) -> None:
    name = lambda *args: serving_names.serving_target(*args).name
    smol = (576, 49152)
    prepared = tmp_path / "anything"
    prepared.mkdir()
    (prepared / "ppow_asset.json").write_text(json.dumps({"target": "qwen2.5-coder-0.5b-instruct"}))
    assert name(None, str(prepared), (), smol) == "Qwen/Qwen2.5-Coder-0.5B-Instruct"  # the GGUFTarget's name
    assert name(None, None, (None, "default"), smol) == SMOL_HUB
    snapshot = tmp_path / "hub" / "models--my-org--My-Model" / "snapshots" / "abc123"
    assert name(None, str(snapshot), (), smol) == "my-org/My-Model"
    qwen = _target_config_dir(tmp_path / "models" / "Qwen3-8B", "qwen3-8b")
    assert name(None, str(qwen), (), smol) == "Qwen/Qwen3-8B"  # named like the known config, sizes agree
    link = tmp_path / "link" / "qwen3-8b"
    link.parent.mkdir()
    link.symlink_to(qwen)
    assert name(None, str(link), (), smol) == "Qwen/Qwen3-8B"
    # the training machine's dir, absent here: its name, checked against the drafter's widths
    assert name(None, None, ("/elsewhere/.cache/ppow/targets/smollm2-135m-instruct",), smol) == SMOL_HUB
    assert name(None, None, ("meta-llama/Llama-3.1-8B-Instruct",), (4096, 128256)) == "meta-llama/Llama-3.1-8B-Instruct"
    assert name(None, None, ("my-org/fine-tune",), smol) == "my-org/fine-tune"  # an earlier export's name
    assert name("served/as-this", str(qwen), (), smol) == "served/as-this"  # --verifier wins, as given


def test_target_names_refuse_a_dir_name_whose_sizes_disagree(tmp_path: Path) -> None:
    """Can-fail side: a name alone, or sizes alone, names no family."""
    name = lambda *args: serving_names.serving_target(*args).name
    fake = _target_config_dir(tmp_path / "qwen3-8b", "qwen3-8b", num_hidden_layers=2)  # a shrunk copy
    assert name(None, str(fake), (), (4096, 151936)) is None
    assert name(None, None, ("/elsewhere/smollm2-135m-instruct",), (64, 256)) is None  # widths disagree
    same_sizes = _target_config_dir(tmp_path / "my-llama", "llama-3.1-8b-instruct")
    assert name(None, str(same_sizes), (), (4096, 128256)) is None  # Llama-3.1-8B sizes, unknown name
    assert name(None, None, ("/abs/org/model",), (64, 256)) is None  # a path of another machine, not a name


def test_speculators_export_without_a_name_is_refused_naming_verifier(sources: dict, tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "spec"
    assert cli.main(["export", str(sources["eagle3"]["run"]), str(out), "--format", "speculators"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot name the target") and "--verifier" in err and err.count("\n") == 1
    assert not out.exists() and not list(tmp_path.glob(".spec.tmp-*"))
    assert cli.main(["export", str(sources["eagle3"]["run"]), str(out), "--format", "speculators",
                     "--verifier", "/srv/models/tiny"]) == 0  # a path the user asks for, written as given
    config = json.loads((out / "config.json").read_text())
    assert config["speculators_config"]["verifier"]["name_or_path"] == "/srv/models/tiny"


def test_other_formats_without_a_name_warn_once_and_record_null(sources: dict, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["export", str(sources["eagle3"]["run"]), str(tmp_path / "e3"), "--format", "eagle3"]) == 0
    err = capsys.readouterr().err
    assert [line for line in err.splitlines() if line.startswith("warning:")] == err.splitlines()
    assert len(err.splitlines()) == 1 and "--verifier" in err
    assert json.loads((tmp_path / "e3" / "ppow_meta.json").read_text())["target"] is None


# ---------------------------------------------------------------------------------------------------
# dtype


def _dtypes(out: Path) -> set[torch.dtype]:
    f = next(p for p in out.iterdir() if p.name in ("model.safetensors", "pytorch_model.bin"))
    state = load_file(str(f)) if f.suffix == ".safetensors" else torch.load(f, weights_only=True)
    return {v.dtype for v in state.values() if v.is_floating_point()}


def _config_dtype(out: Path) -> str:
    config = json.loads((out / "config.json").read_text())
    return config["dtype"] if "speculators_model_type" in config else config["torch_dtype"]


@pytest.mark.parametrize("fmt", ["eagle3", "speculators"])
def test_fp16_source_exports_fp16_unless_dtype_says_otherwise(tmp_path: Path, fmt: str) -> None:
    target = str(_smol_target()) if fmt == "speculators" else None
    out, _ = export.export(SMOL_E3, tmp_path / "kept", fmt, target=target)
    assert _dtypes(out) == {torch.float16} and _config_dtype(out) == "float16"
    embed = 49152 * 576 * 2 if fmt == "speculators" else 0  # the target's embeddings, fp16 too
    src = (SMOL_E3 / "model.safetensors").stat().st_size + embed
    assert abs((out / "model.safetensors").stat().st_size - src) < 0.01 * src  # 19.7 MB (+ 56.6), not twice
    source = formats.load_drafter(SMOL_E3).state
    again = formats.load_drafter(out).state
    assert all(torch.equal(again[k], v) for k, v in source.items())  # bit for bit
    for flag, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        cast, _ = export.export(SMOL_E3, tmp_path / flag, fmt, dtype=flag, target=target)
        assert _dtypes(cast) == {dtype} and _config_dtype(cast) == str(dtype).removeprefix("torch.")


@pytest.mark.parametrize("fmt", ["eagle1", "eagle1-compact"])
def test_fp16_eagle1_source_exports_fp16_and_the_host_loads_it(sources: dict, tmp_path: Path, fmt: str) -> None:
    config, state = formats.load_drafter_dir(sources["eagle1"]["drafter"])
    half = _write_dir(tmp_path / "half", config, {k: v.half() for k, v in state.items()})
    (half / "ppow_meta.json").write_text(json.dumps({"target": str(sources["target_dir"])}))
    out, _ = export.export(half, tmp_path / "out", fmt)
    assert _dtypes(out) == {torch.float16} and _config_dtype(out) == "float16"  # the target's embeddings too
    if fmt == "eagle1":
        ea_model = eagle_compat.load_ea_model(sources["target_dir"], out)  # strict load
        for k, v in torch.load(out / "pytorch_model.bin", weights_only=True).items():
            assert torch.equal(ea_model.ea_layer.state_dict()[k].to(v.dtype), v), k


def test_fp32_source_stays_fp32_and_bad_dtype_is_refused(sources: dict, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture) -> None:
    out, _ = export.export(sources["eagle3"]["drafter"], tmp_path / "out", "eagle3")
    assert _dtypes(out) == {torch.float32} and _config_dtype(out) == "float32"
    with pytest.raises(UserError, match="--dtype must be one of fp32, fp16, bf16"):
        export.export(sources["eagle3"]["drafter"], tmp_path / "bad", "eagle3", dtype="fp8")
    assert not (tmp_path / "bad").exists()


def test_source_config_fields_of_another_machine_are_dropped(sources: dict, tmp_path: Path) -> None:
    """`_name_or_path` (transformers 4 writes it) and a stale `torch_dtype` do not travel into the export."""
    src = tmp_path / "src"
    shutil.copytree(sources["eagle3"]["drafter"], src)
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps(dict(config, torch_dtype="bfloat16")))
    assert "_name_or_path" in config
    out, _ = export.export(src, tmp_path / "out", "eagle3")
    written = json.loads((out / "config.json").read_text())
    assert "_name_or_path" not in written and written["torch_dtype"] == "float32"


def test_portable_shortens_absolute_paths_only() -> None:
    cwd = Path.cwd()
    assert serving_names.portable(f"read {cwd}/runs/a and /root/.cache/ppow/x/y") == "read runs/a and .../x/y"
    assert serving_names.portable({"a": ["/tmp/q", "rel/path", "fp16/bf16", 3]}) == {"a": [".../q", "rel/path",
                                                                                      "fp16/bf16", 3]}
    assert serving_names.portable("https://huggingface.co/org/name") == "https://huggingface.co/org/name"
