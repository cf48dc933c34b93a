"""Two processes on gloo under torchrun: the same tiny PPOW run trains, writes one checkpoint and one
drafter, and ranks stay in sync (ZeRO-2 and ZeRO-3); a tiny SFT run SIGKILLed twice and resumed ends
where an uninterrupted one ends; 1 and 2 processes give the same SFT loss curve."""

import json
import os
import re
import signal
import subprocess
import sys

import pytest

from ppow_plugin import distributed
from ppow_plugin.drafters import formats
from ppow_plugin.host import patching
from tiny import free_port, recipe_file, wait_for_checkpoint

pytestmark = pytest.mark.distributed
if patching.patch_status().state != "patched":
    pytest.skip("the EAGLE host is not installed and patched (`ppow patch apply`)", allow_module_level=True)


def torchrun(tmp_path, args, nproc=2):
    """`ppow <args>` in `nproc` workers under torchrun; nproc=1 runs plain `python -m`, no launcher."""
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    launcher = ["-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", str(free_port())]
    cmd = [sys.executable, *(launcher if nproc > 1 else []), "-m", "ppow_plugin.cli", *args]
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("zero", [2, 3])
def test_two_process_sft_then_ppow(tmp_path, zero):
    sft = recipe_file(tmp_path, "sft", "deepspeed", **{"run.max_steps": 2, "dist.zero_stage": zero})
    res = torchrun(tmp_path, ["sft", str(sft)])
    assert res.returncode == 0, res.stderr[-3000:]
    ppow = recipe_file(tmp_path, "ppow", "deepspeed", **{"run.max_steps": 2, "dist.zero_stage": zero,
                                       "model.drafter": tmp_path / "run-sft" / "drafter"})
    res = torchrun(tmp_path, ["train", str(ppow)])
    assert res.returncode == 0, res.stderr[-3000:]
    run = tmp_path / "run-ppow"
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(r["loss"] is not None for r in rows)  # logged once (rank 0)
    ckpt = sorted((run / "checkpoints").iterdir())[-1]
    assert (ckpt / "trainer_state_rank0.pt").is_file() and (ckpt / "trainer_state_rank1.pt").is_file()
    assert (run / "drafter" / "model.safetensors").is_file()


KILL_TOLERANCE = 0.0  # max |delta| of any drafter weight, killed+resumed vs uninterrupted (measured: 0)


def launch(tmp_path, args, log):
    """torchrun with 2 workers, output to `log`."""
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(free_port()), "-m", "ppow_plugin.cli", *args]
    return subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)


def workers(proc) -> list:
    import psutil  # a DeepSpeed dependency
    return psutil.Process(proc.pid).children(recursive=True)


def kill_rank(proc, rank: int) -> None:
    """SIGKILL one worker; torchrun then stops the other and exits non-zero."""
    everyone = workers(proc)
    ranked = [w for w in everyone if w.environ().get("RANK") == str(rank)]
    assert len(ranked) == 1, ranked
    ranked[0].send_signal(signal.SIGKILL)
    assert proc.wait(timeout=120) != 0
    assert not [w for w in everyone if w.is_running() and w.status() != "zombie"], "torchrun left a worker running"


def kill_job(proc) -> None:
    """SIGKILL the launcher and every worker at once (a lost node). torchrun starts each worker in a
    session of its own, so killing the launcher's process group would leave them running."""
    import psutil
    for p in [*workers(proc), psutil.Process(proc.pid)]:
        p.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)


def resumed_step(log) -> int:
    steps = {int(m) for m in re.findall(r"resumed from \S+ at step (\d+)", log.read_text())}
    assert len(steps) == 1, steps  # both ranks resumed from the same checkpoint
    return steps.pop()


def test_two_process_sigkill_twice_then_resume_matches_uninterrupted(tmp_path):
    """ZeRO-2 on gloo: kill rank 1 after checkpoint 2, the whole job after checkpoint 6; resume each time."""
    common = {"run.max_steps": 12, "run.save_every": 1, "run.keep_last": 3, "dist.zero_stage": 2}
    straight = recipe_file(tmp_path, "sft", "deepspeed", **common, **{"run.output_dir": tmp_path / "straight"})
    killed = recipe_file(tmp_path, "sft", "deepspeed", **common, **{"run.output_dir": tmp_path / "killed"})
    proc = launch(tmp_path, ["sft", str(straight)], tmp_path / "straight.log")
    assert proc.wait(timeout=600) == 0, (tmp_path / "straight.log").read_text()[-3000:]
    ckpts = tmp_path / "killed" / "checkpoints"
    proc = launch(tmp_path, ["sft", str(killed)], tmp_path / "run1.log")
    wait_for_checkpoint(proc, ckpts, 2, tmp_path / "run1.log")
    kill_rank(proc, 1)
    proc = launch(tmp_path, ["sft", str(killed), "run.resume=true"], tmp_path / "run2.log")
    wait_for_checkpoint(proc, ckpts, 6, tmp_path / "run2.log")
    kill_job(proc)
    proc = launch(tmp_path, ["sft", str(killed), "run.resume=true"], tmp_path / "run3.log")
    assert proc.wait(timeout=600) == 0, (tmp_path / "run3.log").read_text()[-3000:]
    # each kill landed mid-run: the resumes started before the last step
    assert 2 <= resumed_step(tmp_path / "run2.log") < 6 <= resumed_step(tmp_path / "run3.log") < 12
    assert not list(ckpts.glob("*.tmp")), "a partial checkpoint was left behind"
    _, a = formats.load_drafter_dir(tmp_path / "straight" / "drafter")
    _, b = formats.load_drafter_dir(tmp_path / "killed" / "drafter")
    assert a.keys() == b.keys()
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    print(f"max |delta| killed vs uninterrupted: {diff:.3g}")
    assert diff <= KILL_TOLERANCE
    # The comparison can fail: one optimizer step earlier (step 11 of the same run) is far outside it.
    step11 = distributed.consolidate_deepspeed_checkpoint(tmp_path / "straight" / "checkpoints" / "step-000011")
    assert max((a[k] - step11[k]).abs().max().item() for k in a) > 1e-4


# 1 vs 2 processes. Same global batch per optimizer step: 1 process x grad_accum 2 sees the pair of samples
# that ranks 0 and 1 take with grad_accum 1 (TrainingData deals each epoch's permutation round-robin; the
# 12 tiny samples divide by 2). The logged loss is the mean over micro-steps and ranks in both. Feature
# noise is off: it is the only per-rank randomness in SFT, so what remains is float summation order (gloo
# all-reduce vs local accumulation, ZeRO partitions). Measured max |dloss| over 10 steps: 0 (ZeRO-2),
# 3e-8 (ZeRO-3). With the default noise (0.2) it is 3e-4..5e-4 (seeds 0-3), which is why noise is off.
CURVE_TOL = 1e-5  # 300x the measured float-order difference; lr 1.2e-3 instead of 1e-3 moves the curve ~2.5e-2
CURVE_STEPS = 10


def sft_curve(root, name, nproc, **extra):
    """Per-step logged loss of a 10-step tiny SFT run without feature noise, in `nproc` processes."""
    rec = recipe_file(root, "sft", "deepspeed", **{"run.max_steps": CURVE_STEPS, "sft.feature_noise": 0.0,
                                                 "optim.grad_accum": 2 // nproc, "run.output_dir": root / name,
                                                 **extra})
    res = torchrun(root, ["sft", str(rec)], nproc=nproc)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [json.loads(x) for x in (root / name / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, CURVE_STEPS + 1))  # logged once per step (rank 0)
    return [r["loss"] for r in rows]


@pytest.fixture(scope="module")
def one_process_curve(tmp_path_factory):
    """The 1-process baseline, shared by both ZeRO stages (in one process stage 2 and 3 do the same math)."""
    root = tmp_path_factory.mktemp("curve")
    return root, sft_curve(root, "p1", 1, **{"dist.zero_stage": 2})


def max_gap(a, b) -> float:
    assert len(a) == len(b) == CURVE_STEPS
    return max(abs(x - y) for x, y in zip(a, b))


@pytest.mark.parametrize("zero", [2, 3])
def test_one_and_two_processes_same_sft_loss_curve(one_process_curve, zero):
    root, base = one_process_curve
    two = sft_curve(root, f"p2-zero{zero}", 2, **{"dist.zero_stage": zero})
    print(f"ZeRO-{zero}: max |dloss| 1 vs 2 processes: {max_gap(base, two):.3g}")
    assert max_gap(base, two) <= CURVE_TOL, (base, two)


def test_loss_curve_check_can_fail(one_process_curve):
    """A genuinely different run (lr +20 %) falls outside the tolerance."""
    root, base = one_process_curve
    other = sft_curve(root, "p1-lr", 1, **{"dist.zero_stage": 2, "optim.lr": 1.2e-3})
    print(f"max |dloss| lr 1e-3 vs 1.2e-3: {max_gap(base, other):.3g}")
    assert max_gap(base, other) > CURVE_TOL
