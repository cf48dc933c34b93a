"""Drafter export: write exactly what a serving stack loads, atomically, and re-read it before the rename.

    ppow export runs/ppow <out> --format eagle1          # host layout (EaModel, strict load)

The formats (`eagle1`, `eagle1-compact`, `eagle3`) and the strict reader every export is re-read with are
`formats.py`'s (docs/export.md has the key tables and which engine reads which). Here: the writers
(`save_drafter_dir` for the trainer's compact dir, `save_eagle3_dir`, `write_host_eagle1`), `atomic_dir` /
`replace_dir`, and `ppow export` (`export`): a run's newest intact checkpoint (DeepSpeed ZeRO 0-3 or
engine.pt, consolidated), one checkpoint, or a drafter dir -> one format, with an optional τ gate.

Rule: exports go through `atomic_dir` and are re-read before the rename, so a crash or a bad write never
leaves a half-written or unloadable directory; a full disk is reported as `DiskFull` (one line).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from ppow_plugin import formats
from ppow_plugin.errors import DiskFull, UserError, is_disk_full


# --------------------------------------------------------------------------------------------------
# Atomic directories and hashing


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
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(self.tmp, 0o777 & ~umask)  # mkdtemp makes it 0700; the export is for others to read
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
        replace_dir(self.tmp, self.out_dir)
        return False


def replace_dir(src: Path, dst: Path) -> None:
    """Rename the complete dir `src` to `dst`; an existing `dst` is moved aside first and deleted last."""
    old = None
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        os.replace(dst, old)
    os.replace(src, dst)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _cpu(state: dict[str, torch.Tensor], dtype: torch.dtype | None = torch.float32) -> dict[str, torch.Tensor]:
    """Detached contiguous CPU copies; floating tensors cast to `dtype`, int/bool buffers kept."""
    return {k: (v.detach().to("cpu", dtype) if dtype is not None and v.is_floating_point()
                else v.detach().to("cpu")).contiguous().clone() for k, v in state.items()}


# --------------------------------------------------------------------------------------------------
# Drafter directories the trainer writes


def save_drafter_dir(out_dir: Path, state: dict[str, torch.Tensor], config: dict[str, Any],
                     meta: dict[str, Any], dtype: torch.dtype = torch.float32) -> Path:
    """Write a compact drafter dir (no embeddings) atomically; returns `out_dir`."""
    weights = {k: v for k, v in _cpu(state, dtype).items() if k != formats.EMBED_KEY}
    with atomic_dir(out_dir) as tmp:
        _write_json(tmp / "config.json", config)
        save_file(weights, str(tmp / "model.safetensors"))
        _write_json(tmp / "ppow_meta.json", dict(meta, weights_sha256=sha256_file(tmp / "model.safetensors")))
    return Path(out_dir)


def save_eagle3_dir(out_dir: Path, state: dict[str, torch.Tensor], config: dict[str, Any],
                    meta: dict[str, Any]) -> Path:
    """Write a trained EAGLE-3 drafter as an `eagle3` dir (the `ppow export --format eagle3` writer),
    checked key by key first and re-read before the rename; `d2t`/`t2d` are written as given."""
    drafter = formats.validate_drafter("eagle3", config, _cpu(state), where="trained EAGLE-3 drafter")
    with atomic_dir(out_dir) as tmp:
        _write_eagle3(tmp, drafter, None)
        formats.load_drafter(tmp)
        _write_json(tmp / "ppow_meta.json", dict(meta, format="eagle3",
                                                 weights_sha256=sha256_file(tmp / "model.safetensors")))
    return Path(out_dir)


def write_host_eagle1(out_dir: Path, state: dict[str, torch.Tensor], config: dict[str, Any],
                      embed_weight: torch.Tensor, meta: dict[str, Any] | None = None) -> Path:
    """Write the host's EAGLE-1 layout: config.json + pytorch_model.bin with embeddings (fp32)."""
    full = _cpu(state)
    full[formats.EMBED_KEY] = embed_weight.detach().to("cpu", torch.float32).contiguous()
    with atomic_dir(out_dir) as tmp:
        _write_json(tmp / "config.json", config)
        torch.save(full, tmp / "pytorch_model.bin")
        if meta is not None:
            _write_json(tmp / "ppow_meta.json", meta)
    return Path(out_dir)


# --------------------------------------------------------------------------------------------------
# Export


def export(source: str | Path, out_dir: str | Path, fmt: str, target: str | None = None, force: bool = False,
           min_tau: float | None = None,
           eval_report: str | Path | None = None) -> tuple[Path, formats.LoadedDrafter]:
    """`ppow export`: a run dir, checkpoint dir or drafter dir -> one serving-ready drafter dir.

    Args:
        source: `<run>` (newest intact checkpoint), `<run>/checkpoints/step-N`, or a drafter dir.
        out_dir: created atomically; an existing non-empty dir needs `force`.
        fmt: one of `formats.FORMATS`.
        target: "default", a target model dir, or None (a checkpoint's recorded target).
        force: overwrite `out_dir`, and export even when the tau gate fails.
        min_tau / eval_report: refuse when the report's tau is below `min_tau` (unless `force`).
    Returns:
        (out_dir, the drafter as read from the source).
    """
    if fmt not in formats.FORMATS:
        raise UserError(f"--format must be one of {', '.join(formats.FORMATS)}, got {fmt!r}")
    src, out = Path(source), Path(out_dir)
    _check_out_dir(src, out, force)
    tau = _tau_gate(min_tau, eval_report, force)
    drafter, meta_src = _read_source(src, target)
    want = "eagle3" if fmt == "eagle3" else "eagle1"
    if drafter.format != want:
        raise UserError(f"{src} holds an {drafter.format} drafter; it can only be exported as "
                        f"{'eagle3' if drafter.format == 'eagle3' else 'eagle1 or eagle1-compact'}")
    meta = _export_meta(drafter, meta_src, fmt, tau, min_tau, force)
    with atomic_dir(out) as tmp:
        _WRITERS[fmt](tmp, drafter, meta_src.get("target_dir"))
        check = formats.load_drafter(tmp)  # re-read before the rename: never leave an unloadable export
        if fmt == "eagle1" and formats.EMBED_KEY not in check.state:
            raise AssertionError("eagle1 export lacks embed_tokens.weight")
        meta["files"] = {f.name: sha256_file(f) for f in sorted(tmp.iterdir()) if f.is_file()}
        _write_json(tmp / "ppow_meta.json", meta)
    return out, drafter


def _check_out_dir(src: Path, out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"output {out} exists and is not a directory; choose another path")
    if out.exists() and any(out.iterdir()) and not force:
        raise UserError(f"output dir {out} exists and is not empty; pass --force to replace it")
    if src.exists() and (out.resolve() == src.resolve() or out.resolve() in src.resolve().parents):
        raise UserError(f"output dir {out} would replace the source {src}; choose another output dir")


def _tau_gate(min_tau: float | None, eval_report: str | Path | None, force: bool) -> float | None:
    """tau from an eval report (`ppow eval`'s stats.overall.tau, or a top-level "tau"); refuse below min_tau."""
    if eval_report is None:
        if min_tau is not None:
            raise UserError("--min-tau needs --eval-report <report.json> with the measured tau")
        return None
    try:
        report = json.loads(Path(eval_report).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"eval report {eval_report} is unreadable ({type(exc).__name__}); pass a `ppow eval` JSON") from None
    stats = report.get("stats") if isinstance(report, dict) else None
    nodes = (report, stats.get("overall") if isinstance(stats, dict) else None) if isinstance(report, dict) else ()
    tau = next((node["tau"] for node in nodes
                if isinstance(node, dict) and isinstance(node.get("tau"), (int, float))), None)
    if tau is None:
        raise UserError(f"eval report {eval_report} has no numeric tau (stats.overall.tau of `ppow eval`, "
                        "or a top-level \"tau\")")
    if min_tau is not None and tau < min_tau and not force:
        raise UserError(f"measured tau {tau:.3f} is below --min-tau {min_tau:.3f}: not exporting a regressed "
                        "drafter (pass --force to export anyway)")
    return float(tau)


def _read_source(src: Path, target: str | None) -> tuple[formats.LoadedDrafter, dict[str, Any]]:
    """The drafter plus what ppow_meta.json records about its origin."""
    if not src.is_dir():
        raise UserError(f"{src} is not a directory; pass a run dir, a checkpoints/step-N dir or a drafter dir")
    if (src / "checkpoints").is_dir():
        src = _newest_checkpoint(src)
    if (src / "engine").is_dir() or (src / "engine.pt").is_file():
        return _read_checkpoint(src, target)
    target_dir = _resolve_target(target) if target is not None else None
    drafter = formats.load_drafter(src, _target_config(target_dir) if target_dir else None)
    try:
        prior = json.loads((src / "ppow_meta.json").read_text()) if (src / "ppow_meta.json").is_file() else {}
    except json.JSONDecodeError:
        prior = {}
    return drafter, {"source": str(src.resolve()), "source_files": {f.name: sha256_file(f) for f in drafter.files},
                     "step": prior.get("step"), "stage": prior.get("stage"), "config": prior.get("config"),
                     "target_dir": str(target_dir) if target_dir else None}


def _newest_checkpoint(run: Path) -> Path:
    for ckpt in sorted((run / "checkpoints").glob("step-??????"), reverse=True):
        if _checkpoint_problem(ckpt) is None:
            return ckpt
    raise UserError(f"{run}/checkpoints holds no intact checkpoint; pass {run}/drafter or a checkpoint dir")


def _checkpoint_problem(ckpt: Path) -> str | None:
    try:
        files = json.loads((ckpt / "meta.json").read_text())["files"]
    except (OSError, json.JSONDecodeError, KeyError):
        return "meta.json missing or unreadable"
    for rel, digest in files.items():
        if not (ckpt / rel).is_file() or sha256_file(ckpt / rel) != digest:
            return f"{rel} missing or corrupt (hash mismatch)"
    return None


def _read_checkpoint(ckpt: Path, target: str | None) -> tuple[formats.LoadedDrafter, dict[str, Any]]:
    """Consolidate engine state (DeepSpeed ZeRO 0-3 or engine.pt) and rebuild the drafter config."""
    problem = _checkpoint_problem(ckpt)
    if problem:
        raise UserError(f"checkpoint {ckpt} is not intact ({problem}); use another step")
    meta = json.loads((ckpt / "meta.json").read_text())
    if (ckpt / "engine").is_dir():
        from ppow_plugin import distributed  # the DeepSpeed seam
        state = distributed.consolidate_deepspeed_checkpoint(ckpt, tag="engine")
        weight_files = sorted((ckpt / "engine").iterdir())
    else:
        try:
            state = torch.load(ckpt / "engine.pt", map_location="cpu", weights_only=True)["module"]
        except Exception as exc:
            raise UserError(f"{ckpt / 'engine.pt'} is unreadable or truncated ({type(exc).__name__})") from None
        weight_files = [ckpt / "engine.pt"]
    recorded = meta.get("target") or (meta.get("config") or {}).get("model", {}).get("target")
    target_dir = _resolve_target(target if target is not None else recorded)
    target_cfg = _target_config(target_dir)
    fmt = formats.detect_format(state)
    _precheck_target(fmt, state, target_cfg, str(ckpt))
    config = _config_from_checkpoint(fmt, state, target_cfg)
    drafter = formats.validate_drafter(fmt, config, state, target_cfg, where=str(ckpt))
    rel = {f.relative_to(ckpt).as_posix(): meta["files"].get(f.relative_to(ckpt).as_posix()) for f in weight_files}
    return drafter._replace(files=tuple(weight_files)), {
        "source": str(ckpt.resolve()), "source_files": rel, "step": meta.get("step"), "stage": meta.get("stage"),
        "config": meta.get("config"), "target_dir": str(target_dir)}


def _resolve_target(target: str | None) -> Path:
    if target is None:
        raise UserError("cannot tell which target this drafter belongs to; pass --target default|DIR")
    if target == "default":
        from ppow_plugin import assets
        return assets.default_target_dir(prepare=False)
    p = Path(target)
    if not (p / "config.json").is_file():
        raise UserError(f"target {target} is not a model directory with config.json; pass --target default|DIR")
    return p


def _target_config(target_dir: Path) -> Any:
    from transformers import AutoConfig
    return AutoConfig.from_pretrained(str(target_dir))


def _precheck_target(fmt: str, state: dict[str, torch.Tensor], target_cfg: Any, where: str) -> None:
    """Engine state has no config.json: its sizes come from the target, so compare widths first."""
    fc = state.get("fc.weight")
    if fc is None or fc.dim() != 2:
        return  # the key check reports it
    width = fc.shape[0] if fmt == "eagle1" else fc.shape[1] // 3
    if width != target_cfg.hidden_size:
        raise UserError(f"{where}: hidden-size mismatch: the drafter expects target features of width {width}, "
                        f"the target has hidden_size {target_cfg.hidden_size}; pass the target it was trained for")


def _config_from_checkpoint(fmt: str, state: dict[str, torch.Tensor], target_cfg: Any) -> dict[str, Any]:
    """Drafter config.json for engine state: the target's Llama fields, sizes read off the weights."""
    from ppow_plugin import eagle_compat  # no host import: eagle1_config_dict only reads the config
    config = eagle_compat.eagle1_config_dict(target_cfg, bias="fc.bias" in state)
    if fmt == "eagle1":
        config["num_hidden_layers"] = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("layers."))
        return config
    layer = {k.split(".", 2)[-1]: v for k, v in formats.normalise_eagle3(dict(state), []).items()
             if k.startswith("midlayer.")}
    head_dim = getattr(target_cfg, "head_dim", None) or target_cfg.hidden_size // target_cfg.num_attention_heads
    hidden = state["norm.weight"].shape[0] if "norm.weight" in state else target_cfg.hidden_size
    config.update(architectures=["LlamaForCausalLMEagle3"], hidden_size=hidden, head_dim=head_dim,
                  intermediate_size=layer["gate_proj.weight"].shape[0] if "gate_proj.weight" in layer
                  else target_cfg.intermediate_size,
                  num_attention_heads=layer["q_proj.weight"].shape[0] // head_dim if "q_proj.weight" in layer
                  else target_cfg.num_attention_heads,
                  num_key_value_heads=layer["k_proj.weight"].shape[0] // head_dim if "k_proj.weight" in layer
                  else target_cfg.num_key_value_heads)
    if "lm_head.weight" in state:
        config["draft_vocab_size"] = state["lm_head.weight"].shape[0]
    if hidden != target_cfg.hidden_size:
        config["target_hidden_size"] = target_cfg.hidden_size
    return config


def _target_embeddings(target_dir: str | None, d: formats.Dims) -> torch.Tensor:
    """`model.embed_tokens.weight` of the target (single or sharded safetensors), for EAGLE-1 host exports."""
    if target_dir is None:
        raise UserError("this drafter has no embed_tokens.weight and the eagle1 host layout needs it; "
                        "pass --target default|DIR to copy the target's embeddings")
    from safetensors import safe_open
    p = Path(target_dir)
    key = "model.embed_tokens.weight"
    if (p / "model.safetensors.index.json").is_file():
        files = [p / json.loads((p / "model.safetensors.index.json").read_text())["weight_map"][key]]
    else:
        files = [p / "model.safetensors"]
    try:
        with safe_open(str(files[0]), framework="pt") as f:
            embed = f.get_tensor(key)
    except (SafetensorError, OSError, KeyError) as exc:
        raise UserError(f"cannot read {key} from target {p} ({type(exc).__name__}); pass a safetensors target") from None
    if tuple(embed.shape) != (d.vocab, d.hidden):
        raise UserError(f"target {p} embeddings are {list(embed.shape)}, drafter needs [{d.vocab}, {d.hidden}]")
    return embed


def _eagle1_config(drafter: formats.LoadedDrafter) -> dict[str, Any]:
    config = {k: v for k, v in drafter.config.items() if k not in ("draft_vocab_size", "target_hidden_size")}
    config.setdefault("architectures", ["LlamaForCausalLM"])
    config.setdefault("model_type", "llama")
    return config


def _write_eagle1(tmp: Path, drafter: formats.LoadedDrafter, target_dir: str | None) -> None:
    """Host layout: config.json (EConfig fields + "bias") + fp32 pytorch_model.bin with embeddings."""
    state = _cpu(drafter.state)
    if formats.EMBED_KEY not in state:
        state[formats.EMBED_KEY] = _target_embeddings(target_dir, drafter.dims).to(torch.float32).contiguous()
    _write_json(tmp / "config.json", _eagle1_config(drafter))
    torch.save(state, tmp / "pytorch_model.bin")


def _write_eagle1_compact(tmp: Path, drafter: formats.LoadedDrafter, target_dir: str | None) -> None:
    _write_json(tmp / "config.json", _eagle1_config(drafter))
    weights = {k: v for k, v in _cpu(drafter.state).items() if k != formats.EMBED_KEY}
    save_file(weights, str(tmp / "model.safetensors"))


def _write_eagle3(tmp: Path, drafter: formats.LoadedDrafter, target_dir: str | None) -> None:
    """config.json (Llama + draft_vocab_size [+ target_hidden_size], LlamaForCausalLMEagle3) + safetensors."""
    d = drafter.dims
    config = dict(drafter.config, architectures=["LlamaForCausalLMEagle3"], model_type="llama",
                  num_hidden_layers=1, draft_vocab_size=d.draft_vocab)
    config.pop("target_hidden_size", None)
    if d.target_hidden != d.hidden:
        config["target_hidden_size"] = d.target_hidden
    _write_json(tmp / "config.json", config)
    save_file(_cpu(drafter.state), str(tmp / "model.safetensors"))


_WRITERS = {"eagle1": _write_eagle1, "eagle1-compact": _write_eagle1_compact, "eagle3": _write_eagle3}


def _export_meta(drafter: formats.LoadedDrafter, src: dict[str, Any], fmt: str, tau: float | None,
                 min_tau: float | None, force: bool) -> dict[str, Any]:
    import ppow_plugin
    meta = {"plugin_version": ppow_plugin.__version__, "format": fmt, "drafter_type": drafter.format,
            "exported_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "notes": drafter.notes,
            "source": src["source"], "source_files_sha256": src["source_files"], "step": src.get("step"),
            "stage": src.get("stage"), "config": src.get("config"), "target": src.get("target_dir")}
    if tau is not None:
        meta["tau"] = tau
        meta["min_tau"] = min_tau
        meta["tau_gate"] = "forced" if (min_tau is not None and tau < min_tau) else "passed"
    return meta
