"""Faults and bad input (docs/reliability.md): SIGKILL mid-run and resume, a corrupt newest checkpoint,
non-finite losses, a full disk while saving; bad inputs end in one `error:` line and write nothing."""

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ppow_plugin.drafters import adapters, drafter_source, export, formats
from ppow_plugin.host import eagle_compat, patching
from ppow_plugin.training import sft_step, trainer
from ppow_plugin.cli import main as cli_main
from ppow_plugin.config import load_config
from ppow_plugin.errors import UserError, is_disk_full
from tiny import overrides, recipe_file, wait_for_checkpoint

if patching.patch_status().state != "patched":
    pytest.skip("the EAGLE host is not installed and patched (`ppow patch apply`)", allow_module_level=True)


def cli(*args, **kw):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    return subprocess.Popen([sys.executable, "-m", "ppow_plugin.cli", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, **kw)


def kill_after_checkpoint(proc, ckpt_dir, step) -> str:
    """SIGKILL `proc` once checkpoint `step` is complete; returns its stderr."""
    wait_for_checkpoint(proc, ckpt_dir, step)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return proc.stderr.read()


def resumed_step(stderr: str) -> int:
    return int(re.search(r"resumed from \S+ at step (\d+)", stderr).group(1))


def test_sigkill_twice_then_resume_is_bit_identical(tmp_path):
    common = {"run.max_steps": 12, "run.save_every": 1, "run.keep_last": 3}
    straight = recipe_file(tmp_path, "sft", "torch", **common, **{"run.output_dir": tmp_path / "straight"})
    assert cli("sft", str(straight)).wait() == 0
    killed = recipe_file(tmp_path, "sft", "torch", **common, **{"run.output_dir": tmp_path / "killed"})
    ckpts = tmp_path / "killed" / "checkpoints"
    kill_after_checkpoint(cli("sft", str(killed)), ckpts, 2)
    err = kill_after_checkpoint(cli("sft", str(killed), "run.resume=true"), ckpts, 6)
    proc = cli("sft", str(killed), "run.resume=true")
    assert proc.wait() == 0, proc.stderr.read()[-2000:]
    # each kill landed mid-run (steps take milliseconds here, so this is checked, not assumed)
    assert 2 <= resumed_step(err) < 6 <= resumed_step(proc.stderr.read()) < 12
    _, a = formats.load_drafter_dir(tmp_path / "straight" / "drafter")
    _, b = formats.load_drafter_dir(tmp_path / "killed" / "drafter")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_corrupt_newest_checkpoint_falls_back(tmp_path, capfd):
    over = overrides(tmp_path, "sft", **{"run.max_steps": 3, "run.save_every": 1, "run.keep_last": 3})
    t = trainer.Trainer(load_config(None, over))
    t.setup()
    t.train()
    newest = tmp_path / "run-sft" / "checkpoints" / "step-000003" / "engine.pt"
    newest.write_bytes(newest.read_bytes()[:100])  # truncated
    t2 = trainer.Trainer(load_config(None, over + ["run.resume=true", "run.max_steps=4"]))
    t2.setup()
    assert t2.step == 2
    assert "skipping checkpoint step-000003" in capfd.readouterr().err


def test_nonfinite_losses_are_skipped_then_abort(tmp_path, monkeypatch):
    t = trainer.Trainer(load_config(None, overrides(tmp_path, "sft", **{"run.max_bad_steps": 2, "run.max_steps": 5})))
    t.setup()
    before = {k: v.clone() for k, v in t.drafter.state_dict().items()}
    real = sft_step.SftStep.loss
    monkeypatch.setattr(sft_step.SftStep, "loss",
                        lambda self, item: real(self, item)._replace(loss=torch.tensor(float("nan"))))
    t.cfg.run.max_steps = 2
    t.train()  # two bad steps: skipped, not fatal
    assert t.bad_steps == 2
    for k, v in t.drafter.state_dict().items():
        assert torch.equal(before[k], v), f"{k} changed on a skipped step"
    t.cfg.run.max_steps = 5
    with pytest.raises(RuntimeError, match="non-finite loss"):
        t.train()


# ---------------------------------------------------------------------------------------------------
# disk full while saving (simulated: the write stops halfway with ENOSPC)


def ppow(capsys, *argv) -> tuple[int, str]:
    """`ppow ...` in this process: exit code and the one `error:` line (or "")."""
    code = cli_main(list(argv))
    lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error: ")]
    assert len(lines) <= 1, lines
    return code, lines[0] if lines else ""


def half_written(real, fail_when, make_exc):
    """A writer that, when `fail_when(path)`, writes half of what `real` would and raises like a full disk."""
    def write(obj, path, *args, **kwargs):
        if not fail_when(str(path)):
            return real(obj, path, *args, **kwargs)
        whole = Path(str(path) + ".whole")
        real(obj, str(whole), *args, **kwargs)
        data = whole.read_bytes()
        whole.unlink()
        Path(path).write_bytes(data[: len(data) // 2])
        raise make_exc()
    return write


def test_disk_full_while_saving_a_checkpoint(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    recipe = recipe_file(tmp_path, "sft", **{"run.max_steps": 4, "run.save_every": 1, "run.keep_last": 5,
                                             "run.output_dir": run})
    monkeypatch.setattr(torch, "save", half_written(torch.save, lambda p: "step-000003.tmp" in p,
                                                    lambda: OSError(errno.ENOSPC, "No space left on device")))
    code, err = ppow(capsys, "sft", str(recipe))
    assert code == 2
    assert re.fullmatch(r"error: disk full while writing checkpoint step-000003 in \S+; the partial copy was "
                        r"removed and step-000002 is intact: free space .* run.output_dir .* run.resume=true", err)
    ckpts = run / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-000001", "step-000002"]  # no step-000003.tmp
    assert drafter_source.checkpoint_problem(ckpts / "step-000002") is None
    assert not (run / "drafter").exists()
    monkeypatch.undo()  # space freed: resume continues from the intact checkpoint
    code, _ = ppow(capsys, "sft", str(recipe), "run.resume=true")
    assert code == 0 and (run / "drafter" / "model.safetensors").is_file()


def test_disk_full_while_exporting_the_drafter(tmp_path, monkeypatch, capsys):
    from safetensors import SafetensorError
    run = tmp_path / "run"
    recipe = recipe_file(tmp_path, "sft", **{"run.max_steps": 2, "run.output_dir": run})
    assert ppow(capsys, "sft", str(recipe)) == (0, "")
    before = {p.name: p.read_bytes() for p in (run / "drafter").iterdir()}
    # the message safetensors gives for ENOSPC ("... (os error 28)")
    full = half_written(export.save_file, lambda p: True, lambda: SafetensorError(
        "Error while serializing: I/O error: No space left on device (os error 28)"))
    monkeypatch.setattr(export, "save_file", full)
    code, err = ppow(capsys, "sft", str(recipe), "run.resume=true", "run.max_steps=3")
    assert code == 2
    assert err.startswith(f"error: disk full while writing the drafter to {run / 'drafter'}; the previous "
                          "drafter there is unchanged and the checkpoints are intact: free space")
    assert {p.name: p.read_bytes() for p in (run / "drafter").iterdir()} == before
    assert not list(run.glob(".drafter.tmp-*"))
    assert drafter_source.checkpoint_problem(run / "checkpoints" / "step-000003") is None
    # `ppow export` to a new dir: nothing written
    code, err = ppow(capsys, "export", str(run), str(tmp_path / "out"), "--format", "eagle1-compact")
    assert code == 2 and err.startswith(f"error: disk full while writing {tmp_path / 'out'}; nothing was written")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp-*"))


def test_is_disk_full_recognises_each_way_a_full_disk_shows(tmp_path, monkeypatch):
    from safetensors import SafetensorError
    assert is_disk_full(OSError(errno.ENOSPC, "No space left on device"), tmp_path)
    assert is_disk_full(OSError(errno.EDQUOT, "Disk quota exceeded"), tmp_path)
    assert is_disk_full(SafetensorError("I/O error: No space left on device (os error 28)"), tmp_path)
    # what torch.save raised when a real 256 KB tmpfs filled up: only the free space tells
    torch_full = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
    assert not is_disk_full(torch_full, tmp_path)
    assert not is_disk_full(OSError(errno.EACCES, "Permission denied"), tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9, 4096))
    assert is_disk_full(torch_full, tmp_path / "not" / "yet" / "there")
    assert not is_disk_full(ValueError("bad value"), tmp_path)


# ---------------------------------------------------------------------------------------------------
# bad input: one `error:` line naming the fix, exit code 2, run.output_dir never created


def refused(capsys, tmp_path, match, *extra_args, stage="sft", **extra):
    out = tmp_path / "run"
    recipe = recipe_file(tmp_path, stage, **{"run.output_dir": out, **extra})
    code, err = ppow(capsys, "sft" if stage == "sft" else "train", str(recipe), *extra_args)
    assert code == 2 and re.search(match, err), err
    assert not out.exists(), f"{out} was written: {list(out.rglob('*'))}"


def target_config(tmp_path, **changes):
    from transformers import AutoConfig
    overrides(tmp_path, "sft")  # builds the tiny target
    return AutoConfig.from_pretrained(tmp_path / "target", **changes)


def eagle1_dir(path, config, rename: tuple[str, str] | None = None):
    state = eagle_compat.new_eagle1_drafter(config, bias=True).state_dict()
    if rename:
        state[rename[1]] = state.pop(rename[0])
    return export.save_drafter_dir(path, state, eagle_compat.eagle1_config_dict(config, bias=True), {})


def test_warm_start_drafter_for_another_target_is_refused(tmp_path, capsys):
    cases = [
        (target_config(tmp_path, hidden_size=32, intermediate_size=64), "hidden-size mismatch"),
        (target_config(tmp_path, vocab_size=200), "vocabulary mismatch: drafter vocab_size 200, target 128"),
    ]
    for i, (config, match) in enumerate(cases):
        refused(capsys, tmp_path, match, **{"model.drafter": eagle1_dir(tmp_path / f"d{i}", config)})
    misnamed = eagle1_dir(tmp_path / "d2", target_config(tmp_path),
                          ("layers.0.mlp.up_proj.weight", "layers.0.mlp.upproj.weight"))
    refused(capsys, tmp_path, r"missing \['layers.0.mlp.up_proj.weight'\], unexpected \['layers.0.mlp.upproj",
            **{"model.drafter": misnamed})
    extra = eagle1_dir(tmp_path / "d3", target_config(tmp_path), ("fc.bias", "fc.bias_extra"))
    refused(capsys, tmp_path, r"unexpected \['fc.bias_extra'\]", **{"model.drafter": extra})


def test_eagle3_reduced_vocabulary_without_d2t_is_refused(tmp_path, capsys):
    from safetensors.torch import save_file
    from transformers import LlamaForCausalLM
    overrides(tmp_path, "sft")
    d = adapters.new_eagle3(LlamaForCausalLM.from_pretrained(tmp_path / "target"), 48, torch.float32)
    src = tmp_path / "e3"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(d.cfg.to_hf_dict()))
    save_file({k: v.contiguous() for k, v in d.state_dict().items() if k not in ("d2t", "t2d")},
              str(src / "model.safetensors"))
    refused(capsys, tmp_path, r"reduced draft vocabulary \(48 of 128\) without d2t",
            **{"model.drafter": src, "model.drafter_type": "eagle3"})


def test_chat_template_absent_is_refused(tmp_path, capsys):
    overrides(tmp_path, "sft")
    bare = tmp_path / "bare-target"
    shutil.copytree(tmp_path / "target", bare)
    (bare / "chat_template.jinja").unlink(missing_ok=True)
    tok_cfg = json.loads((bare / "tokenizer_config.json").read_text())
    tok_cfg.pop("chat_template", None)
    (bare / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    refused(capsys, tmp_path, "has no chat template; training needs one", **{"model.target": bare})


def long_prompt_convs(path, n, start=0):
    with open(path, "a") as f:
        for i in range(start, start + n):
            user = " ".join(f"w{k % 120}" for k in range(120))  # 120 tokens: longer than data.max_len
            f.write(json.dumps({"id": f"long{i}", "conversations": [
                {"from": "human", "value": user}, {"from": "gpt", "value": "w1 w2 w3"}]}) + "\n")
    return path


def test_every_sample_longer_than_max_len_or_empty_dataset_is_refused(tmp_path, capsys):
    refused(capsys, tmp_path, r"no training conversation has an assistant token within data.max_len=96 "
                              r"\(4 with an empty loss mask, 0 where the chat template failed\); raise data.max_len",
            **{"data.path": long_prompt_convs(tmp_path / "long.jsonl", 4)})
    (tmp_path / "empty.jsonl").write_text("")
    refused(capsys, tmp_path, "holds no usable conversation", **{"data.path": tmp_path / "empty.jsonl"})


def test_empty_loss_masks_are_counted_reported_and_recorded(tmp_path, capsys):
    overrides(tmp_path, "sft")
    mixed = tmp_path / "mixed.jsonl"
    shutil.copy(tmp_path / "convs.jsonl", mixed)
    long_prompt_convs(mixed, 3)
    with open(mixed, "a") as f:
        f.write(json.dumps({"id": "assistant-first", "conversations": [{"from": "gpt", "value": "w1"}]}) + "\n")
    run = tmp_path / "run"
    recipe = recipe_file(tmp_path, "sft", **{"data.path": mixed, "run.output_dir": run, "run.max_steps": 2})
    code = cli_main(["sft", str(recipe)])
    assert code == 0
    expected = {"conversations": 15, "used": 12, "truncated": 5, "empty_mask": 3, "template_failed": 0,
                "parse_dropped": {"no_user_start": 1}, "max_len": 96, "first_failure": ""}
    log = [x for x in capsys.readouterr().err.splitlines() if x.startswith("data: ")]
    assert log == ["data: 15 training conversations: 12 used, 3 dropped (empty loss mask within data.max_len=96: 3, "
                   "chat template failed: 0), 5 truncated to 96 tokens; records dropped while parsing: "
                   "{'no_user_start': 1}"]
    assert json.loads((run / "data_report.json").read_text()) == expected
    assert json.loads((run / "checkpoints" / "step-000002" / "meta.json").read_text())["data"] == expected
    assert json.loads((run / "drafter" / "ppow_meta.json").read_text())["data"] == expected


def test_unknown_recipe_key_writes_nothing(tmp_path, capsys):
    refused(capsys, tmp_path, "unknown config key 'rollout.windw'; did you mean 'rollout.window'", "rollout.windw=4")


def test_output_dir_not_writable(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("mine")
    recipe = recipe_file(tmp_path, "sft", **{"run.output_dir": afile / "run"})
    code, err = ppow(capsys, "sft", str(recipe))
    assert code == 2 and re.fullmatch(r"error: run.output_dir \S+ is not writable \(Not a directory\); choose another",
                                      err)
    assert afile.read_text() == "mine"


def test_output_dir_without_permission(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    if os.access(ro, os.W_OK):
        pytest.skip("running as a user that can write anywhere (root); test_output_dir_not_writable covers it")
    t = trainer.Trainer(load_config(None, overrides(tmp_path, "sft", **{"run.output_dir": ro / "run"})))
    with pytest.raises(UserError, match="not writable"):
        t.setup()
    assert list(ro.iterdir()) == []


def test_missing_drafter_and_empty_source_say_what_is_missing(tmp_path, capsys, monkeypatch):
    """A drafter path that does not exist is not "without config.json"; a folder with nothing to export
    names the three things it looked for. The generic message still serves a real dir without config.json."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty").mkdir()
    code, err = ppow(capsys, "eval", "--drafter", str(tmp_path / "nope"), "--simulate", "--out", "o")
    assert code == 2 and err.endswith(f"{tmp_path / 'nope'} does not exist or is not a directory; pass a model directory")
    code, err = ppow(capsys, "export", str(tmp_path / "empty"), "o2", "--format", "eagle1")
    assert code == 2 and "holds no drafter (no config.json), no checkpoints/ and no engine state" in err
    with pytest.raises(UserError, match="does not exist or is not a directory"):
        formats.load_drafter(tmp_path / "nope")
    with pytest.raises(UserError, match="has no config.json"):
        formats.load_drafter(tmp_path / "empty")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]
