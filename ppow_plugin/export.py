"""Drafter directories: write atomically, read strictly, convert to what the host loads.

Two on-disk forms of an EAGLE-1 drafter:
- *compact* (what training writes and what we commit): `config.json` + `model.safetensors` with every
  drafter weight except `embed_tokens.weight` (it is the target's, frozen), + `ppow_meta.json`.
- *host* (EAGLE-1 `EaModel.from_pretrained` reads only this): `config.json` + `pytorch_model.bin`
  with `embed_tokens.weight` included, since the host loads with strict=True.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ppow_plugin.errors import UserError

EMBED_KEY = "embed_tokens.weight"


def atomic_dir(out_dir: Path):
    """Context manager: yields a temp dir beside `out_dir`; renamed over it only on success."""
    return _AtomicDir(Path(out_dir))


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
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        old = None
        if self.out_dir.exists():
            old = self.out_dir.with_name(f".{self.out_dir.name}.old-{os.getpid()}")
            os.replace(self.out_dir, old)
        os.replace(self.tmp, self.out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return False


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_drafter_dir(out_dir: Path, state: dict[str, torch.Tensor], config: dict[str, Any],
                     meta: dict[str, Any], dtype: torch.dtype = torch.float32) -> Path:
    """Write a compact drafter dir (no embeddings) atomically; returns `out_dir`."""
    weights = {k: v.detach().to("cpu", dtype).contiguous() for k, v in state.items() if k != EMBED_KEY}
    with atomic_dir(out_dir) as tmp:
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        save_file(weights, str(tmp / "model.safetensors"))
        meta = dict(meta, weights_sha256=sha256_file(tmp / "model.safetensors"))
        (tmp / "ppow_meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return Path(out_dir)


def load_drafter_dir(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read `config.json` and the weights (`model.safetensors` or `pytorch_model.bin`) of a drafter dir."""
    p = Path(path)
    if not (p / "config.json").is_file():
        raise UserError(f"drafter dir {p} has no config.json; pass an EAGLE drafter directory")
    try:
        config = json.loads((p / "config.json").read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{p / 'config.json'} is not valid JSON ({exc.msg})") from None
    if (p / "model.safetensors").is_file():
        try:
            state = load_file(str(p / "model.safetensors"))
        except (SafetensorError, OSError) as exc:
            raise UserError(f"{p / 'model.safetensors'} is unreadable or truncated ({exc}); re-export it") from None
    elif (p / "pytorch_model.bin").is_file():
        try:
            state = torch.load(p / "pytorch_model.bin", map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises several types for truncated zip/pickle data
            raise UserError(f"{p / 'pytorch_model.bin'} is unreadable or truncated "
                            f"({type(exc).__name__}); re-export it") from None
    else:
        raise UserError(f"drafter dir {p} has neither model.safetensors nor pytorch_model.bin")
    return config, state


def write_host_eagle1(out_dir: Path, state: dict[str, torch.Tensor], config: dict[str, Any],
                      embed_weight: torch.Tensor, meta: dict[str, Any] | None = None) -> Path:
    """Write the host's EAGLE-1 layout: config.json + pytorch_model.bin with embeddings (fp32)."""
    full = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}
    full[EMBED_KEY] = embed_weight.detach().to("cpu", torch.float32).contiguous()
    with atomic_dir(out_dir) as tmp:
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        torch.save(full, tmp / "pytorch_model.bin")
        if meta is not None:
            (tmp / "ppow_meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return Path(out_dir)
