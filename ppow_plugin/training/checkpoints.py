"""A run's checkpoints: atomic `checkpoints/step-N` dirs (engine state, per-rank trainer state, meta.json with
every file's sha256), the newest `run.keep_last` kept, and resume from the newest one that checks out.

    final = save(run_dir, step, engine, trainer_state, meta, dist, keep_last)
    state = load_newest(run_dir, engine, rank)   # the trainer state saved beside the weights, or None
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from ppow_plugin import distributed, outputs
from ppow_plugin.drafters import drafter_source
from ppow_plugin.errors import DiskFull, is_disk_full


def save(run_dir: Path, step: int, engine: distributed.Engine, trainer_state: dict, meta: Callable[[], dict],
         dist: distributed.DistInfo, keep_last: int) -> Path:
    """Atomic checkpoint dir with engine state, trainer state (RNG, data position) and meta.json.

    Written as `step-N.tmp` and renamed when complete; if a write fails (e.g. the disk is full) the
    `.tmp` dir is removed, older checkpoints are untouched and a full disk is a one-line `DiskFull`.
    """
    final = run_dir / "checkpoints" / f"step-{step:06d}"
    tmp = final.with_name(final.name + ".tmp")
    try:
        if dist.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        distributed.barrier()
        engine.save(tmp)
        # Per rank: data position and RNG streams differ between ranks.
        torch.save(trainer_state, tmp / f"trainer_state_rank{dist.rank}.pt")
        distributed.barrier()
        if dist.is_main:
            drafter_source.write_checkpoint_meta(tmp, meta())  # every file's sha256 + meta.json's own
    except Exception as exc:
        full = is_disk_full(exc, tmp)  # before the partial files are deleted
        shutil.rmtree(tmp, ignore_errors=True)
        if not full:
            raise
        older = sorted(p.name for p in final.parent.glob("step-??????") if p != final)
        kept = f"{older[-1]} is intact" if older else "there is no earlier checkpoint"
        raise DiskFull(f"disk full while writing checkpoint {final.name} in {final.parent}; the partial copy "
                       f"was removed and {kept}: free space on that disk (or move the run to a bigger one "
                       "and point run.output_dir there), then rerun with run.resume=true") from None
    if dist.is_main:
        outputs.replace_dir(tmp, final)
        for old in sorted(final.parent.glob("step-??????"))[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    distributed.barrier()
    return final


def load_newest(run_dir: Path, engine: distributed.Engine, rank: int) -> dict | None:
    """Load the newest usable checkpoint into `engine`; return this rank's trainer state (None: none usable)."""
    for ckpt in sorted((run_dir / "checkpoints").glob("step-??????"), reverse=True):
        problem = drafter_source.checkpoint_problem(ckpt)
        if problem:
            print(f"warning: skipping checkpoint {ckpt.name}: {problem}", file=sys.stderr)
            continue
        engine.load(ckpt)
        state = torch.load(ckpt / f"trainer_state_rank{rank}.pt", map_location="cpu", weights_only=False)
        print(f"resumed from {ckpt} at step {state['step']}", file=sys.stderr)
        return state
    print(f"no usable checkpoint in {run_dir / 'checkpoints'}; starting fresh", file=sys.stderr)
    return None
