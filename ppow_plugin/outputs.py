"""Where a command may write: the one check every output path goes through before any work starts.

    outputs.check_output(args.out, {"--drafter": args.drafter}, args.force, "--out")   # eval, compare, export, profile
    outputs.check_run_dir(cfg)                                                        # sft / train (Trainer.setup)
    outputs.check_generation_dir(args.out, {"--target": ...})                         # data generate

Rules (docs/reliability.md, "Outputs"):
1. A replaced output (`ppow eval|compare|export --out`, `ppow profile --out`) that exists and is not empty
   is refused unless `--force`; one of the other kind (a file where a folder goes, or the reverse) always.
2. Never, even with `--force`: an input's own path or a folder holding an input (the drafter, target,
   source, recipe or report the command reads), nor the current directory or a folder above it.
3. A run directory (`run.output_dir`) is written into, never replaced: a fresh start needs it absent,
   empty or holding only a ppow run's own files, and it must not hold the run's inputs (model.drafter,
   model.target, data.path, reward.gamma_profile); checkpoints there need `run.resume=true`. A
   `ppow data generate` output dir likewise: absent, empty or holding only a generation's files.
And how it writes: `atomic_dir` (a temp dir beside the output, renamed over it only on success) and
`replace_dir` (exports, eval reports, checkpoints, the run's drafter).
Only stdlib imports, so the CLI can check before torch is loaded.
"""

from __future__ import annotations

import fnmatch
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

from ppow_plugin.errors import DiskFull, UserError, is_disk_full

# What a ppow run writes into run.output_dir (rundir.py and trainer.py); anything else is someone else's.
RUN_ENTRIES = ("checkpoints", "drafter", "metrics.jsonl", "metrics.jsonl.before-resume-*", ".metrics.jsonl.tmp",
               "data_report.json", "run.lock", ".drafter.tmp-*", ".drafter.old-*", ".write-probe-*")


# What `ppow data generate` writes into its output dir (data/generate.py, data/shards.py, cli.py); anything else is someone else's.
GEN_ENTRIES = ("provenance.json", "shard-?????.npz", ".shard-?????.npz.*.tmp", ".provenance.json.*.tmp",
               "generate.lock")


def check_output(out: str | Path, inputs: Mapping[str, str | Path | None], force: bool, flag: str,
                 kind: str = "dir") -> Path:
    """Refuse an output that would destroy something (rules 1-2); returns `out` as an absolute path.

    Args:
        out: the output path as given.
        inputs: flag or key -> path the command reads (None entries are skipped).
        force: the user passed --force (replace an existing output).
        flag: how the user named `out`, for the message ("--out", "output").
        kind: "dir" or "file": what the command writes at `out`.
    Raises:
        UserError: one line naming the fix.
    """
    for name, given in [(flag, out), *inputs.items()]:
        if given is not None and "\x00" in str(given):
            raise UserError(f"{name} contains a NUL byte; pass a real path")
    try:
        return _check_output(out, inputs, force, flag, kind)
    except OSError as exc:  # a name too long, a component that is a file, no permission to look
        raise UserError(f"{flag} {out}: the system refuses this path ({exc.strerror}); choose another") from None


def _check_output(out: str | Path, inputs: Mapping[str, str | Path | None], force: bool, flag: str,
                  kind: str) -> Path:
    path = Path(os.path.abspath(out))
    real = path.resolve()
    cwd = Path.cwd().resolve()
    if real == cwd or real in cwd.parents:
        raise UserError(f"{flag} {out} is the current directory or one of its parents; replacing it would delete "
                        f"what you are working in: choose a new {'folder' if kind == 'dir' else 'file name'}")
    _refuse_inputs(out, real, inputs, flag)
    _refuse_under_a_file(out, path, flag)
    if not path.exists() and not path.is_symlink():
        return path
    if kind == "dir" and not path.is_dir():
        raise UserError(f"{flag} {out} exists and is not a directory; choose another path")
    if kind == "file" and path.is_dir():
        raise UserError(f"{flag} {out} is a directory; pass a file name (e.g. {out}/profile.json)")
    if force or (kind == "dir" and not any(path.iterdir())):
        return path
    what = f"is not empty ({_listing(path)})" if kind == "dir" else "exists"
    raise UserError(f"{flag} {out} {what}; pass --force to replace it, or choose a new "
                    f"{'folder' if kind == 'dir' else 'file name'}")


def check_generation_dir(out: str | Path, inputs: Mapping[str, str | Path | None], flag: str = "--out") -> Path:
    """Rules 2-3 for `ppow data generate --out`: a generation dir is extended in place, never replaced, so it
    must be absent, empty or hold only a generation's own files (`GEN_ENTRIES`), and not be or hold an input.

    Raises:
        UserError: one line naming the fix.
    """
    path = check_output(out, inputs, force=True, flag=flag, kind="dir")  # cwd, inputs, a file, under a file
    foreign = [p for p in _entries(path) if not any(fnmatch.fnmatchcase(p.name, pat) for pat in GEN_ENTRIES)]
    if foreign:
        raise UserError(f"{flag} {out} is not empty and holds no `ppow data generate` output "
                        f"({_listing(path, foreign)}); choose a new or empty folder")
    return path


def _refuse_under_a_file(out: str | Path, path: Path, flag: str) -> None:
    """`--out f/sub` with `f` a regular file: say so (the system would say 'Not a directory' later)."""
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"{flag} {out} is under {parent}, which is a file, not a folder; choose another path")
            return


def check_run_dir(out: str | Path, inputs: Mapping[str, str | Path | None], resume: bool) -> None:
    """Rule 3 for `run.output_dir`: refuse a fresh start over someone else's files or a run's inputs.

    Raises:
        UserError: one line naming the fix.
    """
    path = Path(out)
    _refuse_inputs(out, path.resolve(), inputs, "run.output_dir")
    ckpts = path / "checkpoints"
    if ckpts.is_dir() and any(ckpts.iterdir()):
        if not resume:
            raise UserError(f"{out} already holds checkpoints; pass run.resume=true to continue "
                            "or choose another run.output_dir")
        return
    foreign = [p for p in _entries(path) if not any(fnmatch.fnmatchcase(p.name, pat) for pat in RUN_ENTRIES)]
    if foreign:
        raise UserError(f"run.output_dir {out} is not empty and holds no ppow run "
                        f"({_listing(path, foreign)}); choose a new or empty folder")


def run_inputs(cfg) -> dict[str, str | None]:
    """The paths a training run reads (rule 3): recipe key -> path; "default" means the cached target."""
    return {"model.target": _target_path(cfg.model.target), "model.drafter": cfg.model.drafter,
            "data.path": cfg.data.path if cfg.data.dataset == "jsonl" else None,
            "reward.gamma_profile": cfg.reward.gamma_profile}


def target_input(target: str | None) -> str | None:
    """A `--target` value as the path it reads ("default": the cached SmolLM2 dir)."""
    return _target_path(target) if target is not None else None


def _target_path(target: str) -> str:
    if target != "default":
        return target
    from ppow_plugin.host import assets  # stdlib only
    return str(assets.cache_dir() / "targets" / assets.SMOLLM2_135M.name)


def _refuse_inputs(out: str | Path, real: Path, inputs: Mapping[str, str | Path | None], flag: str) -> None:
    for name, given in inputs.items():
        if given is None or str(given) == "":
            continue
        src = Path(given).resolve()
        if real == src or real in src.parents:
            held = "is" if real == src else "holds"
            raise UserError(f"{flag} {out} {held} the {name} {given}; writing there would destroy it: "
                            "choose a folder outside the inputs")


def _entries(path: Path) -> list[Path]:
    try:
        return sorted(path.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return []


def _listing(path: Path, entries: list[Path] | None = None) -> str:
    entries = _entries(path) if entries is None else entries
    names = [p.name + ("/" if p.is_dir() else "") for p in entries[:3]]
    more = f" and {len(entries) - 3} more" if len(entries) > 3 else ""
    return ", ".join(names) + more


# --------------------------------------------------------------------------------------------------
# Atomic directories: a command's fresh output appears whole or not at all


def atomic_dir(out_dir: Path):
    """Context manager: yields a temp dir beside `out_dir`; renamed over it only on success.

    `out_dir` is resolved first ('.', 'a/..', symlinks); the current directory and its parents are refused
    (`resolve_out_dir`). Files left in the temp dir get normal read permissions (0666 & ~umask; safetensors
    writes 0600) before the rename.
    """
    return _AtomicDir(resolve_out_dir(out_dir))


def resolve_out_dir(out_dir: str | Path) -> Path:
    """The absolute, resolved output dir. Raises UserError for the current dir or one of its parents (replacing
    it would delete the directory the command runs in), and for an existing non-directory."""
    out = Path(out_dir).resolve()
    if out == Path.cwd().resolve() or out in Path.cwd().resolve().parents:
        raise UserError(f"output {out_dir} is the current directory or one of its parents ({out}); "
                        "name a new directory, e.g. ./export")
    if out.exists() and not out.is_dir():
        raise UserError(f"output {out_dir} exists and is not a directory; choose another path")
    return out


class _AtomicDir:
    def __init__(self, out_dir: Path):
        self.out_dir = out_dir

    def __enter__(self) -> Path:
        parent = self.out_dir.parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"cannot create {parent}: {exc.strerror}; choose a writable output directory") from None
        if not os.access(parent, os.W_OK):
            raise UserError(f"output directory {parent} is not writable; choose another")
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out_dir.name}.tmp-", dir=parent))
        os.chmod(self.tmp, 0o777 & ~_umask())  # mkdtemp makes it 0700; the export is for others to read
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            full = is_disk_full(exc, self.tmp)  # before the partial files are deleted
            shutil.rmtree(self.tmp, ignore_errors=True)
            if full:
                kept = "the existing one is unchanged" if self.out_dir.exists() else "nothing was written"
                raise DiskFull(f"disk full while writing {self.out_dir}; {kept}: free space on that disk "
                               "or choose another output directory") from None
            return False
        for f in self.tmp.rglob("*"):
            if f.is_file() and not f.is_symlink():
                os.chmod(f, 0o666 & ~_umask())
        replace_dir(self.tmp, self.out_dir)
        return False


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def replace_dir(src: Path, dst: Path) -> None:
    """Rename the complete dir `src` to `dst` (both resolved, see `resolve_out_dir`); an existing `dst` is moved
    aside first and deleted last."""
    old = None
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        os.replace(dst, old)
    os.replace(src, dst)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
