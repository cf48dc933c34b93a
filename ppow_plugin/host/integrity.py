"""Files the program reads back from its own caches and outputs verify themselves before use.

    integrity.save_npz(path, arrays)              # writes arrays + a "__sha256__" member, atomically
    arrays = integrity.load_npz(path)             # Damaged(reason) if truncated, zeroed, bit-flipped
    integrity.save_safetensors(path, tensors)     # the digest goes into the header's __metadata__
    integrity.write_json(path, blob)              # the digest goes into the blob itself, under "sha256"
    blob = integrity.read_json(path)

Each writer records a sha256 over the content (array names, dtypes, shapes and bytes; or the canonical JSON
of the blob without its digest) at write time; each reader recomputes it and raises `Damaged` when it
differs or the file cannot be parsed at all. What a caller does then depends on what the file is:

- a **cache** entry (feature cache, continuation cache, data-scan cache) is rebuilt, with one
  `warning:` line naming it (`rebuilding`);
- **data** (generated shards, their provenance.json) is refused with one `error:` line naming the file
  and the fix, because silently regenerating it would change what a run trained on.

Files written before digests were recorded (no "__sha256__" member / key) are still read: npz members
carry zip CRC-32s, which `load_npz` checks by reading every member in full; `require_digest=True`
refuses them instead (the caches use that: an old entry is simply rebuilt once).
Checkpoints have their own record (the sha256 of every file in `meta.json`, `drafter_source`).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
import zipfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np

DIGEST = "__sha256__"  # npz member / safetensors metadata key holding the content digest
JSON_DIGEST = "sha256"  # key of a JSON blob's own digest


class Damaged(Exception):
    """A file of ours that is unreadable or whose content differs from the digest recorded when it was written."""


class Unverified(Damaged):
    """A readable file without a recorded digest (written before digests were): a cache rebuilds it quietly."""


def arrays_digest(arrays: Mapping[str, np.ndarray]) -> str:
    """sha256 over sorted names, dtypes, shapes and bytes of `arrays` (the content, not the container)."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}:{a.dtype.str}:{a.shape};".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _atomic_write(path: Path, write) -> None:
    """`write(file object)` into a temporary file next to `path`, then rename it over `path`."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_npz(path: str | Path, arrays: Mapping[str, np.ndarray]) -> Path:
    """Write `arrays` (uncompressed npz) with their digest, atomically (a reader never sees half a file)."""
    path = Path(path)
    blob = {k: np.asarray(v) for k, v in arrays.items()}
    digest = np.frombuffer(arrays_digest(blob).encode(), dtype=np.uint8)
    _atomic_write(path, lambda f: np.savez(f, **blob, **{DIGEST: digest}))
    return path


def load_npz(path: str | Path, require_digest: bool = False) -> dict[str, np.ndarray]:
    """Every array of an npz written by `save_npz`, checked.

    Raises:
        FileNotFoundError: no file (not damage: the caller decides).
        Damaged: unreadable (truncated, zeroed, bad CRC), or the content differs from its recorded digest
            (or, with require_digest, none was recorded).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {name: z[name] for name in z.files}  # reads every member in full: zip CRCs are checked
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, RuntimeError) as exc:
        raise Damaged(f"unreadable: {_reason(exc)}") from None
    recorded = arrays.pop(DIGEST, None)
    if recorded is None:
        if require_digest:
            raise Unverified("no content digest recorded")
        return arrays
    if bytes(recorded.astype(np.uint8)).decode("ascii", "replace") != arrays_digest(arrays):
        raise Damaged("content differs from the sha256 recorded when it was written")
    return arrays


def save_safetensors(path: str | Path, tensors: Mapping) -> Path:
    """Write torch tensors as safetensors with their digest in the header metadata, atomically."""
    from safetensors.torch import save

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    digest = arrays_digest({k: _as_numpy(v) for k, v in tensors.items()})
    data = save(tensors, metadata={DIGEST: digest})
    _atomic_write(path, lambda f: f.write(data))
    return path


def load_safetensors(path: str | Path) -> dict:
    """Torch tensors of a file written by `save_safetensors`, checked (a recorded digest is required).

    Raises:
        FileNotFoundError: no file.
        Damaged: unreadable, no digest, or content differing from it.
    """
    from safetensors import safe_open
    from safetensors.torch import load

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(path)
    try:
        data = path.read_bytes()
        tensors = load(data)
        with safe_open(str(path), framework="pt") as f:
            recorded = (f.metadata() or {}).get(DIGEST)
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own SafetensorError, torch RuntimeError, ...
        raise Damaged(f"unreadable: {_reason(exc)}") from None
    if recorded is None:
        raise Unverified("no content digest recorded")
    if recorded != arrays_digest({k: _as_numpy(v) for k, v in tensors.items()}):
        raise Damaged("content differs from the sha256 recorded when it was written")
    return tensors


def _as_numpy(t) -> np.ndarray:
    """A tensor's bytes as a numpy array (bf16 has no numpy dtype: viewed as int16)."""
    import torch
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return t.numpy()


def json_digest(blob: Mapping) -> str:
    """sha256 of the canonical JSON of `blob` without its own digest key."""
    rest = {k: v for k, v in blob.items() if k != JSON_DIGEST}
    return hashlib.sha256(json.dumps(rest, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def write_json(path: str | Path, blob: Mapping) -> Path:
    """Write a JSON object with its digest (key "sha256"), atomically."""
    path = Path(path)
    blob = json.loads(json.dumps(dict(blob)))  # as it will read back (tuples -> lists, int keys -> str)
    body = blob | {JSON_DIGEST: json_digest(blob)}
    _atomic_write(path, lambda f: f.write((json.dumps(body, indent=2) + "\n").encode()))
    return path


def read_json(path: str | Path, require_digest: bool = False) -> dict:
    """A JSON object written by `write_json`, checked; without a recorded digest it is accepted unless
    `require_digest`.

    Raises:
        FileNotFoundError: no file.
        Damaged: not a UTF-8 JSON object, or its content differs from the recorded digest.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(path)
    try:
        blob = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, ValueError) as exc:
        raise Damaged(f"unreadable: {_reason(exc)}") from None
    if not isinstance(blob, dict):
        raise Damaged("not a JSON object")
    recorded = blob.pop(JSON_DIGEST, None)
    if recorded is None:
        if require_digest:
            raise Unverified("no content digest recorded")
        return blob
    if recorded != json_digest(blob):
        raise Damaged("content differs from the sha256 recorded when it was written")
    return blob


_WARNED: set[str] = set()


def warn_rebuilding(what: str, path: str | Path, problem: Damaged | str) -> None:
    """One `warning:` line on stderr for a damaged cache entry that is being rebuilt (once per path); an
    entry of the format before digests (`Unverified`) is rebuilt without one."""
    key = str(path)
    if key in _WARNED or isinstance(problem, Unverified):
        return
    _WARNED.add(key)
    print(f"warning: {what} {path} is damaged ({problem}); rebuilding it", file=sys.stderr)


def _reason(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}" + (f": {text[:120]}" if text else "")
