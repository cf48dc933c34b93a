"""Every launcher starts training (issue 26): the `--local_rank` / `--local-rank` forms the deepspeed launcher and
torch.distributed.launch pass, LOCAL_RANK, `dist.device=cuda` = this rank's GPU with `set_device` called before
anything touches a GPU (CUDA calls mocked), and a real 2-process run started by the `deepspeed` launcher on gloo."""

import os
import subprocess
import sys

import pytest
import torch

from ppow_plugin import cli, distributed
from ppow_plugin.host import patching
from ppow_plugin.training import trainer
from ppow_plugin.errors import UserError
from tiny import free_port, recipe_file


@pytest.fixture
def called(monkeypatch):
    """`ppow sft|train` with the training itself replaced by a recorder of (stage, recipe, overrides, LOCAL_RANK)."""
    seen = []
    monkeypatch.setattr(cli, "cmd_train", lambda args, stage: seen.append(
        (stage, args.recipe, args.overrides, os.environ.get("LOCAL_RANK"))) or 0)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    return seen


@pytest.mark.parametrize("argv, local", [
    (["train", "r.yaml", "--local_rank=0"], "0"),          # the form
    (["train", "r.yaml", "--local-rank", "1"], "1"),       # torch.distributed.launch
    (["--local_rank=1", "train", "r.yaml"], "1"),          # what `deepspeed --module ppow_plugin.cli` runs
    (["--local-rank=2", "train", "r.yaml", "run.max_steps=3"], "2"),
    (["train", "r.yaml", "run.max_steps=3", "--local_rank", "3"], "3"),
    (["train", "r.yaml", "run.max_steps=3"], None),        # no launcher: LOCAL_RANK stays unset
])
def test_local_rank_forms_reach_training(called, argv, local):
    assert cli.main(argv) == 0
    overrides = ["run.max_steps=3"] if "run.max_steps=3" in argv else []
    assert called == [("ppow", "r.yaml", overrides, local)]
    assert "LOCAL_RANK" not in os.environ  # set for the command only: main() also runs in-process


def test_sft_takes_local_rank_too(called):
    assert cli.main(["--local_rank=0", "sft", "s.yaml", "optim.lr=1e-4"]) == 0
    assert called == [("sft", "s.yaml", ["optim.lr=1e-4"], "0")]


def test_local_rank_disagreeing_with_env_is_refused(called, monkeypatch, capsys):
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert cli.main(["train", "r.yaml", "--local_rank=0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --local_rank 0 but LOCAL_RANK=1") and not called
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert cli.main(["train", "r.yaml", "--local_rank=0"]) == 0  # both set and equal: fine


@pytest.fixture
def gpus(monkeypatch):
    """8 mocked GPUs; returns the log of `torch.cuda.set_device` calls."""
    log = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: log.append(torch.device(d)))
    return log


@pytest.mark.parametrize("name", ["cuda", "auto"])
@pytest.mark.parametrize("local", [0, 3, 7])
def test_cuda_means_this_ranks_gpu(gpus, monkeypatch, name, local):
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_RANK", str(local))
    assert distributed.get_device(name) == torch.device("cuda", local)
    assert gpus == [torch.device("cuda", local)]  # made current before anything is allocated


def test_explicit_gpu(gpus, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert distributed.get_device("cuda:5") == torch.device("cuda", 5) and gpus == [torch.device("cuda", 5)]
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(UserError, match="pins every rank to GPU 5; use dist.device=cuda"):
        distributed.get_device("cuda:5")


def test_rank_without_its_gpu(gpus, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "16")
    monkeypatch.setenv("LOCAL_RANK", "9")
    with pytest.raises(UserError, match="wants GPU 9 .* but 8 GPU"):
        distributed.get_device("cuda")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # CUDA_VISIBLE_DEVICES set per rank
    assert distributed.get_device("cuda") == torch.device("cuda", 0)


def test_trainer_sets_the_gpu_before_the_process_group_and_the_target(gpus, monkeypatch):
    """Trainer.setup: set_device(cuda:LOCAL_RANK), then init_process_group (NCCL binds there), then loading."""
    events = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: events.append(("set_device", str(torch.device(d)))))
    monkeypatch.setattr(distributed, "init_process_group", lambda dev: events.append(("process_group", str(dev)))
                        or distributed.DistInfo(rank=2, world_size=4, local_rank=2))
    monkeypatch.setattr(trainer.Trainer, "_check_output_dir", lambda self: None)
    monkeypatch.setattr(trainer.Trainer, "_load", lambda self: events.append(("load", str(self.device))))
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "2")
    from ppow_plugin.config import load_config
    trainer.Trainer(load_config(None, ["dist.device=cuda"])).setup()
    assert events == [("set_device", "cuda:2"), ("process_group", "cuda:2"), ("load", "cuda:2")]


@pytest.mark.distributed
@pytest.mark.skipif(patching.patch_status().state != "patched", reason="the EAGLE host is not patched")
def test_deepspeed_launcher_two_cpu_processes(tmp_path):
    """`deepspeed --num_gpus 2 --module ppow_plugin.cli sft R`: the launcher starts 2 ranks on gloo (DeepSpeed's
    CPU accelerator; it also sets CUDA_VISIBLE_DEVICES=0,1, harmless here) and passes each `--local_rank=N`
    before the command."""
    rec = recipe_file(tmp_path, "sft", "deepspeed", **{"run.max_steps": 2})
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    env.pop("LOCAL_RANK", None)
    port = free_port()  # not a fixed one: 29661 was once in use (EADDRINUSE, red)
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(port),
           "--module", "ppow_plugin.cli", "sft", str(rec)]
    res = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-3000:]
    assert "--local_rank=0" in out and "--local_rank=1" in out  # the launcher's log of what it spawned
    ckpt = sorted((tmp_path / "run-sft" / "checkpoints").iterdir())[-1]
    assert (ckpt / "trainer_state_rank0.pt").is_file() and (ckpt / "trainer_state_rank1.pt").is_file()
    assert (tmp_path / "run-sft" / "drafter" / "model.safetensors").is_file()
