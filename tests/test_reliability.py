"""Faults: SIGKILL mid-run and resume, a corrupt newest checkpoint, non-finite losses, unwritable output."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from ppow_plugin import export, patching, trainer
from ppow_plugin.config import load_config
from ppow_plugin.errors import UserError
from tiny import overrides, recipe_file

if patching.patch_status().state != "patched":
    pytest.skip("the EAGLE host is not installed and patched (`ppow patch apply`)", allow_module_level=True)


def cli(*args, **kw):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    return subprocess.Popen([sys.executable, "-m", "ppow_plugin.cli", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, **kw)


def kill_after_checkpoint(proc, ckpt_dir, step):
    target = ckpt_dir / f"step-{step:06d}"
    deadline = time.time() + 300
    while not target.exists():
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        assert time.time() < deadline, "no checkpoint in time"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def test_sigkill_twice_then_resume_is_bit_identical(tmp_path):
    common = {"run.max_steps": 7, "run.save_every": 1, "run.keep_last": 3}
    straight = recipe_file(tmp_path, "sft", "torch", **common, **{"run.output_dir": tmp_path / "straight"})
    assert cli("sft", str(straight)).wait() == 0
    killed = recipe_file(tmp_path, "sft", "torch", **common, **{"run.output_dir": tmp_path / "killed"})
    ckpts = tmp_path / "killed" / "checkpoints"
    kill_after_checkpoint(cli("sft", str(killed)), ckpts, 2)
    kill_after_checkpoint(cli("sft", str(killed), "run.resume=true"), ckpts, 5)
    proc = cli("sft", str(killed), "run.resume=true")
    assert proc.wait() == 0, proc.stderr.read()[-2000:]
    _, a = export.load_drafter_dir(tmp_path / "straight" / "drafter")
    _, b = export.load_drafter_dir(tmp_path / "killed" / "drafter")
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
    real = trainer.Trainer._sft_loss
    monkeypatch.setattr(trainer.Trainer, "_sft_loss",
                        lambda self, item: real(self, item)._replace(loss=torch.tensor(float("nan"))))
    t.cfg.run.max_steps = 2
    t.train()  # two bad steps: skipped, not fatal
    assert t.bad_steps == 2
    for k, v in t.drafter.state_dict().items():
        assert torch.equal(before[k], v), f"{k} changed on a skipped step"
    t.cfg.run.max_steps = 5
    with pytest.raises(RuntimeError, match="non-finite loss"):
        t.train()


def test_output_dir_not_writable(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if os.access(ro, os.W_OK):
            pytest.skip("running as a user that can write anywhere (root)")
    finally:
        pass
    t = trainer.Trainer(load_config(None, overrides(tmp_path, "sft", **{"run.output_dir": ro / "run"})))
    with pytest.raises(UserError, match="not writable"):
        t.setup()
