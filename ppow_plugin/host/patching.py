"""Version-pinned patches for the EAGLE-1 host (PyPI `eagle-llm` 1.2.1): `ppow patch check|apply|revert`.

The host fails under transformers 5 and is not lossless for rope_theta != 10000; the unified diffs in
`patches/eagle-llm-1.2.1/` fix that and add one logging hook (each file's header says what it does). This
module applies them to the *installed* package with `/usr/bin/patch`, records what it did, and undoes it:

- The host is located with `importlib.util.find_spec("eagle")` and never imported here (importing it
  would cache the unpatched modules in this process).
- The version is read from the `eagle_llm-*.dist-info` that sits next to that package, so the check
  describes the files we are about to edit, not some other copy on `sys.path`.
- Every patch is dry-run first; a failure rolls back what this call applied.
- State lives in `<eagle>/.ppow_patches.json`: applied patch names, their sha256 and text (so `revert`
  works even if the repo's patch files change later), the sha256 of each touched file before the first
  patch (`originals`) and after the last one (`patched`). `revert` checks the result against `originals`.

Every function takes an optional `package_dir` (the `eagle/` directory) and `patch_dir`, so tests can work
on a copy of the host without touching the real install.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ppow_plugin.errors import UserError

log = logging.getLogger(__name__)

HOST_DIST = "eagle-llm"
HOST_VERSION = "1.2.1"
HOST_PACKAGE = "eagle"
PATCH_BIN = "/usr/bin/patch"
STATE_FILE = ".ppow_patches.json"
DEFAULT_PATCH_DIR = Path(__file__).resolve().parents[2] / "patches" / f"{HOST_DIST}-{HOST_VERSION}"

INSTALL_HINT = f"pip install --no-deps {HOST_DIST}=={HOST_VERSION}"
REINSTALL_HINT = f"pip install --force-reinstall --no-deps {HOST_DIST}=={HOST_VERSION}"

State = Literal["missing", "wrong-version", "clean", "partial", "patched", "outdated", "modified"]


@dataclass(frozen=True)
class PatchStatus:
    """What `ppow patch check` reports. `state` is the one-word summary:

    missing: no `eagle` package; wrong-version: not eagle-llm 1.2.1; clean: no patch applied and the
    touched files match the wheel's RECORD; partial: some patches applied; patched: all applied and the
    files are as we left them; outdated: an applied patch differs from the repo's copy; modified: the
    touched files match neither the wheel nor what we wrote.
    """

    installed: bool
    version: str | None
    package_dir: Path | None
    applied: tuple[str, ...]
    pending: tuple[str, ...]
    state: State

    @property
    def fully_patched(self) -> bool:
        return self.state == "patched"

    def __str__(self) -> str:
        return self.describe()

    def describe(self) -> str:
        """Four lines for `ppow patch check` / `ppow doctor`."""
        lines = [
            f"host: {HOST_DIST} {self.version or '(not installed)'} at {self.package_dir or '-'}",
            f"state: {self.state}",
            f"applied: {', '.join(self.applied) or '-'}",
            f"pending: {', '.join(self.pending) or '-'}",
        ]
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------
# Locating the host and the patches


def find_package_dir() -> Path | None:
    """The installed `eagle/` directory, found without importing it; None if not installed."""
    spec = importlib.util.find_spec(HOST_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))).resolve()


def _distribution(package_dir: Path) -> importlib.metadata.Distribution | None:
    """The eagle-llm distribution installed in the same site directory as `package_dir`."""
    for dist in importlib.metadata.distributions(path=[str(package_dir.parent)]):
        if (dist.metadata["Name"] or "").lower().replace("_", "-") == HOST_DIST:
            return dist
    return None


def patch_files(patch_dir: Path | None = None) -> list[Path]:
    """The patch series in application order (file names start with a 4-digit index)."""
    patch_dir = patch_dir or DEFAULT_PATCH_DIR
    files = sorted(patch_dir.glob("[0-9][0-9][0-9][0-9]-*.patch"))
    if not files:
        raise UserError(f"no patches found in {patch_dir}; run ppow from a source checkout of ppow-plugin")
    return files


def _touched_files(diff: str) -> list[str]:
    """Paths (relative to the site directory) that a `-p1` unified diff edits, in order."""
    paths = re.findall(r"^\+\+\+ b/(\S+)", diff, flags=re.MULTILINE)
    return list(dict.fromkeys(paths))


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _record_hashes(dist: importlib.metadata.Distribution) -> dict[str, str]:
    """sha256 (hex) of each file as shipped in the wheel, from the dist-info RECORD."""
    hashes = {}
    for entry in dist.files or []:
        if entry.hash is not None and entry.hash.mode == "sha256":
            padded = entry.hash.value + "=" * (-len(entry.hash.value) % 4)
            hashes[str(entry)] = base64.urlsafe_b64decode(padded).hex()
    return hashes


# ---------------------------------------------------------------------------------------------------
# State file


def _load_state(package_dir: Path) -> dict:
    path = package_dir / STATE_FILE
    if not path.exists():
        return {"host_version": HOST_VERSION, "originals": {}, "patched": {}, "applied": []}
    return json.loads(path.read_text())


def _save_state(package_dir: Path, state: dict) -> None:
    path = package_dir / STATE_FILE
    if not state["applied"]:
        path.unlink(missing_ok=True)
        return
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=1, sort_keys=True))
    os.replace(tmp, path)  # atomic: a crash never leaves a half-written state


def _current_hashes(site_dir: Path, rel_paths: list[str]) -> dict[str, str]:
    return {rel: _sha256(site_dir / rel) for rel in rel_paths}


def _state_is_stale(site_dir: Path, state: dict) -> bool:
    """True when the state says "applied" but the files are the originals again (e.g. after a pip
    reinstall, which rewrites the files but leaves our untracked state file behind)."""
    originals = state["originals"]
    return bool(state["applied"]) and _current_hashes(site_dir, list(originals)) == originals


# ---------------------------------------------------------------------------------------------------
# Public API


def locate_host(package_dir: Path | None = None) -> tuple[Path | None, str | None]:
    """(the `eagle/` directory, its eagle-llm version), or Nones when absent; imports nothing."""
    package_dir = package_dir.resolve() if package_dir is not None else find_package_dir()
    if package_dir is None or not package_dir.is_dir():
        return None, None
    dist = _distribution(package_dir)
    return package_dir, (dist.version if dist is not None else None)


def patch_status(package_dir: Path | None = None, patch_dir: Path | None = None) -> PatchStatus:
    """Inspect the installed host and the patch series; changes nothing."""
    package_dir, version = locate_host(package_dir)
    names = [p.name for p in patch_files(patch_dir)]
    if package_dir is None:
        return PatchStatus(False, None, None, (), tuple(names), "missing")
    if version != HOST_VERSION:
        return PatchStatus(True, version, package_dir, (), tuple(names), "wrong-version")

    site_dir = package_dir.parent
    state = _load_state(package_dir)
    if _state_is_stale(site_dir, state):
        state = {"originals": {}, "patched": {}, "applied": []}
    applied = [entry["name"] for entry in state["applied"]]
    pending = tuple(n for n in names if n not in applied)
    repo_sha = {p.name: _sha256(p) for p in patch_files(patch_dir)}

    if not applied:
        touched = sorted({f for p in patch_files(patch_dir) for f in _touched_files(p.read_text())})
        shipped = _record_hashes(_distribution(package_dir))  # type: ignore[arg-type]
        pristine = all(_sha256(site_dir / f) == shipped.get(f) for f in touched)
        return PatchStatus(True, version, package_dir, (), pending, "clean" if pristine else "modified")
    if _current_hashes(site_dir, list(state["patched"])) != state["patched"]:
        kind: State = "modified"
    elif any(entry["sha256"] != repo_sha.get(entry["name"]) for entry in state["applied"]):
        kind = "outdated"
    else:
        kind = "partial" if pending else "patched"
    return PatchStatus(True, version, package_dir, tuple(applied), pending, kind)


def _run_patch(site_dir: Path, diff: str, *, reverse: bool, dry_run: bool) -> subprocess.CompletedProcess:
    args = [PATCH_BIN, "-p1", "--batch", "--silent", "--no-backup-if-mismatch", "--reject-file=-",
            "-d", str(site_dir)]
    args += ["--reverse"] if reverse else ["--forward"]
    args += ["--dry-run"] if dry_run else []
    # bytes in, bytes out: cnets.py has CRLF line endings that a text-mode round trip would destroy
    return subprocess.run(args, input=diff.encode(), capture_output=True, check=False)


def _require_host(package_dir: Path | None) -> tuple[Path, str]:
    package_dir, version = locate_host(package_dir)
    if package_dir is None:
        raise UserError(f"EAGLE host not installed; run `{INSTALL_HINT}`")
    if version != HOST_VERSION:
        raise UserError(f"EAGLE host is {HOST_DIST} {version}, ppow needs {HOST_VERSION}; run `{INSTALL_HINT}`")
    return package_dir, version


def apply_patches(package_dir: Path | None = None, patch_dir: Path | None = None) -> list[str]:
    """Apply every pending patch in order. Idempotent: when all are applied already it changes nothing
    and returns [] (and logs that it was a no-op).

    Returns:
        Names of the patches applied by this call.
    Raises:
        UserError: host missing / wrong version, files modified outside ppow, a patch changed since it
            was applied, or a patch does not apply (everything applied by this call is rolled back).
    """
    package_dir, _ = _require_host(package_dir)
    status = patch_status(package_dir, patch_dir)
    if status.state == "modified":
        raise UserError(f"EAGLE host files at {package_dir} were edited outside ppow; run `{REINSTALL_HINT}`")
    if status.state == "outdated":
        raise UserError("the repo's EAGLE patches changed since they were applied; "
                        "run `ppow patch revert` then `ppow patch apply`")
    if not status.pending:
        log.info("all %d EAGLE patches already applied; nothing to do", len(status.applied))
        return []

    site_dir = package_dir.parent
    state = _load_state(package_dir)
    if _state_is_stale(site_dir, state):
        state = {"host_version": HOST_VERSION, "originals": {}, "patched": {}, "applied": []}
    done: list[dict] = []
    for path in patch_files(patch_dir):
        if path.name not in status.pending:
            continue
        diff = path.read_bytes().decode()
        touched = _touched_files(diff)
        before = _current_hashes(site_dir, touched)
        check = _run_patch(site_dir, diff, reverse=False, dry_run=True)
        if check.returncode != 0:
            for entry in reversed(done):  # leave the host as we found it
                _run_patch(site_dir, entry["diff"], reverse=True, dry_run=False)
            raise UserError(f"EAGLE patch {path.name} does not apply to {package_dir} "
                            f"({check.stdout.decode().strip()[:200]}); run `{REINSTALL_HINT}`")
        _run_patch(site_dir, diff, reverse=False, dry_run=False).check_returncode()
        for rel, sha in before.items():
            state["originals"].setdefault(rel, sha)
        done.append({"name": path.name, "sha256": _sha256(path), "files": touched, "diff": diff})

    state["applied"] += done
    state["patched"] = _current_hashes(site_dir, list(state["originals"]))
    _save_state(package_dir, state)
    return [entry["name"] for entry in done]


def revert_patches(package_dir: Path | None = None) -> list[str]:
    """Reverse every applied patch (newest first) and check each touched file is byte-identical to its
    recorded original. Returns the names reverted ([] if nothing was applied).

    Raises:
        UserError: host missing / wrong version, or the files cannot be restored exactly.
    """
    package_dir, _ = _require_host(package_dir)
    site_dir = package_dir.parent
    state = _load_state(package_dir)
    if not state["applied"] or _state_is_stale(site_dir, state):
        _save_state(package_dir, {**state, "applied": []})
        return []
    if _current_hashes(site_dir, list(state["patched"])) != state["patched"]:
        raise UserError(f"EAGLE host files at {package_dir} were edited after patching; run `{REINSTALL_HINT}`")

    reverted = []
    for entry in list(reversed(state["applied"])):
        check = _run_patch(site_dir, entry["diff"], reverse=True, dry_run=True)
        if check.returncode != 0:
            raise UserError(f"cannot reverse EAGLE patch {entry['name']}; run `{REINSTALL_HINT}`")
        _run_patch(site_dir, entry["diff"], reverse=True, dry_run=False).check_returncode()
        reverted.append(entry["name"])
        state["applied"].remove(entry)
        state["patched"] = _current_hashes(site_dir, list(state["originals"]))
        _save_state(package_dir, state)  # after each step, so a crash leaves a state matching the files

    if _current_hashes(site_dir, list(state["originals"])) != state["originals"]:
        raise UserError(f"reverted EAGLE files differ from the originals; run `{REINSTALL_HINT}`")
    return reverted


def require_patched_host(package_dir: Path | None = None) -> None:
    """Raise a one-line UserError naming the fix unless the host is eagle-llm 1.2.1 with every patch."""
    status = patch_status(package_dir)
    if status.state in ("missing", "wrong-version"):
        found = f"{HOST_DIST} {status.version}" if status.installed else "no EAGLE host"
        raise UserError(f"found {found}, ppow needs {HOST_DIST} {HOST_VERSION}; run `{INSTALL_HINT}`")
    if status.state == "modified":
        raise UserError(f"EAGLE host files at {status.package_dir} were edited outside ppow; "
                        f"run `{REINSTALL_HINT}` then `ppow patch apply`")
    if status.state == "outdated":
        raise UserError("EAGLE host patches are outdated; run `ppow patch revert` then `ppow patch apply`")
    if status.state != "patched":
        raise UserError(f"EAGLE host is not patched ({status.state}); run `ppow patch apply`")
