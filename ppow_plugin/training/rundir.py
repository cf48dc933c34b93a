"""A run directory's own bookkeeping: one run at a time, a history that matches the weights, no stale temps.

    with rundir.RunLock(cfg.run.output_dir):       # `ppow sft|train`, rank 0, before torch is imported
        trainer.main(cfg)

1. `RunLock`: an exclusive `flock` on `<run>/run.lock`, which holds the owner's PID. The kernel drops the
   lock when its process dies, so the file a crashed run leaves behind is stale by construction and the
   next run simply takes it; a second live run is refused at once, naming the PID.
2. `cut_history`: on (re)start `metrics.jsonl` keeps only the rows up to the step the weights are at, so a
   resume, a fall-back to an older checkpoint or a fresh start never leaves a step listed twice; the
   rows cut are kept aside in `metrics.jsonl.before-resume-N`.
3. `remove_stale_temps`: the temp dirs a killed run leaves (`checkpoints/step-N.tmp`, the moved-aside
   copies of `outputs.replace_dir`, `.drafter.tmp-*`); only these names, nothing else.
Only stdlib imports (the CLI takes the lock before loading torch).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
from pathlib import Path

from ppow_plugin.errors import UserError

LOCK_NAME = "run.lock"
METRICS_NAME = "metrics.jsonl"
# globs relative to the run dir; the shapes trainer.save_checkpoint and outputs.atomic_dir/replace_dir use
STALE_TEMPS = ("checkpoints/step-??????.tmp", "checkpoints/.step-??????.old-*", ".drafter.tmp-*", ".drafter.old-*",
               ".metrics.jsonl.tmp")


class RunLock:
    """Context manager: hold `<run_dir>/run.lock` exclusively; creates `run_dir` if needed.

    On exit the lock file is removed (while still held), and so is every folder it created, if empty.

    Raises:
        UserError: another live process holds the lock (its PID is named), or `run_dir` is not writable.
    """

    def __init__(self, run_dir: str | Path, flag: str = "run.output_dir", lock_name: str = LOCK_NAME,
                 command: str = "ppow run"):
        self.run_dir = Path(run_dir)
        self.flag, self.command = flag, command  # how the user named the dir; what else may hold it
        self.path = self.run_dir / lock_name
        self.fd: int | None = None
        self.created: Path | None = None

    def __enter__(self) -> RunLock:
        self.created = next((p for p in reversed([self.run_dir, *self.run_dir.parents]) if not p.exists()), None)
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            while self.fd is None:
                self.fd = self._try_lock()
        except OSError as exc:
            remove_created_dirs(self.run_dir, self.created)
            raise UserError(f"{self.flag} {self.run_dir} is not writable ({exc.strerror}); "
                            "choose another") from None
        os.ftruncate(self.fd, 0)
        os.write(self.fd, f"{os.getpid()}\n".encode())
        return self

    def _try_lock(self) -> int | None:
        """An fd holding the lock on the file now at `path`, or None if it was replaced meanwhile (retry)."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
            raise UserError(f"{self.flag} {self.run_dir} is in use by another {self.command} (pid {holder}); wait "
                            f"for it to finish (or stop it), or choose another {self.flag}") from None
        try:  # the previous holder unlinks the file before releasing: then ours is an orphan inode
            same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if not same:
            os.close(fd)
            return None
        return fd

    def __exit__(self, *exc) -> bool:
        if self.fd is not None:
            self.path.unlink(missing_ok=True)
            os.close(self.fd)
            self.fd = None
        remove_created_dirs(self.run_dir, self.created)
        return False


def remove_created_dirs(out_dir: Path, created: Path | None) -> None:
    """Remove `out_dir` and its parents up to `created` (the topmost dir we made), where empty."""
    if created is None:
        return
    for p in [out_dir, *out_dir.parents]:
        if p.exists():
            try:
                p.rmdir()
            except OSError:  # not empty: another rank's probe, the run's files or someone else's
                return
        if p == created:
            return


def lock_for_rank(run_dir: str | Path) -> RunLock | None:
    """The lock for rank 0 of a launch (RANK unset: a single process); None for the other ranks."""
    return RunLock(run_dir) if int(os.environ.get("RANK", "0")) == 0 else None


def cut_history(run_dir: Path, step: int) -> Path | None:
    """Keep the complete rows of `metrics.jsonl` whose "step" is <= `step` (0: none, a fresh start).

    If any row goes, the whole old file is kept as `metrics.jsonl.before-resume-N` (first free N).
    Returns:
        that file, or None when nothing was cut (the file is left as it was).
    """
    path = Path(run_dir) / METRICS_NAME
    if not path.is_file():
        return None
    lines = path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if _row_step(line) is not None and _row_step(line) <= step]
    if len(kept) == len(lines):
        return None
    n = 1
    while path.with_name(f"{METRICS_NAME}.before-resume-{n}").exists():
        n += 1
    aside = path.with_name(f"{METRICS_NAME}.before-resume-{n}")
    tmp = path.with_name(f".{METRICS_NAME}.tmp")
    tmp.write_text("".join(kept))
    os.replace(path, aside)
    os.replace(tmp, path)
    return aside


def _row_step(line: str) -> int | None:
    """The "step" of one complete JSON row; None for a torn (no newline) or unreadable one."""
    if not line.endswith("\n"):
        return None
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        return None
    step = row.get("step") if isinstance(row, dict) else None
    return step if isinstance(step, int) else None


def remove_stale_temps(run_dir: Path) -> list[str]:
    """Delete the temp dirs an interrupted run left (`STALE_TEMPS` only); returns their relative paths."""
    run_dir = Path(run_dir)
    stale = sorted(p for pattern in STALE_TEMPS for p in run_dir.glob(pattern))
    for p in stale:
        shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    return [p.relative_to(run_dir).as_posix() for p in stale]
