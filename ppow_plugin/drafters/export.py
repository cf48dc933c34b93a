"""Drafter export: write exactly what a serving stack loads, atomically, and re-read it before the rename.

    ppow export runs/ppow <out> --format eagle1          # host layout (EaModel, strict load)

The formats (`eagle1`, `eagle1-compact`, `eagle3`, `speculators`) and the strict reader every export is re-read
with are `formats.py`'s (docs/export.md has the key tables and which engine reads which); where the drafter
comes from (run, checkpoint, drafter dir; the checkpoint's rebuilt config) is `drafter_source.py`'s; what each
host makes of an EAGLE-3 config is `host_configs.py`'s; which target an export names (never a path of this
machine) is `serving_names.py`'s. Here: the writers (`save_drafter_dir` for the
trainer's compact dir, `save_eagle3_dir`, `write_host_eagle1`), and
`ppow export` (`export`) with its optional τ gate on an eval report of the same weights.

Rule: exports go through `outputs.atomic_dir` and are re-read before the rename, so a crash or a bad write never
leaves a half-written or unloadable directory; a full disk is reported as `DiskFull` (one line).
Exports keep the source's floating dtype (the one most weights have) unless `--dtype` says otherwise, and
config.json records it (`torch_dtype`; `dtype` in the speculators layout).
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from ppow_plugin import outputs
from ppow_plugin.drafters import drafter_source, formats
from ppow_plugin.drafters.drafter_source import sha256_file
from ppow_plugin.host import host_configs, serving_names
from ppow_plugin.errors import UserError


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}  # `ppow export --dtype`


class _Out(NamedTuple):
    """What an export writes besides the drafter: where the target's embeddings are read from (this machine),
    the dtype of the floating weights, and the speculators `verifier` (the target as the server finds it)."""
    target_dir: str | None = None
    dtype: torch.dtype = torch.float32
    verifier: dict[str, Any] | None = None
    record_dtype: bool = False  # write `torch_dtype` / `dtype` into config.json (exports; not the trainer's dirs)


def source_dtype(state: dict[str, torch.Tensor]) -> torch.dtype:
    """The dtype holding most floating elements of `state` (fp32 when it has none)."""
    counts: dict[torch.dtype, int] = {}
    for v in state.values():
        if v.is_floating_point():
            counts[v.dtype] = counts.get(v.dtype, 0) + v.numel()
    return max(counts, key=counts.get) if counts else torch.float32


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


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
    with outputs.atomic_dir(out_dir) as tmp:
        _write_json(tmp / "config.json", config)
        save_file(weights, str(tmp / "model.safetensors"))
        _write_json(tmp / "ppow_meta.json", dict(meta, weights_sha256=sha256_file(tmp / "model.safetensors")))
    return Path(out_dir)


def save_eagle3_dir(out_dir: Path, state: dict[str, torch.Tensor], config: dict[str, Any],
                    meta: dict[str, Any]) -> Path:
    """Write a trained EAGLE-3 drafter as an `eagle3` dir (the `ppow export --format eagle3` writer),
    checked key by key first and re-read before the rename; `d2t`/`t2d` are written as given."""
    drafter = formats.validate_drafter("eagle3", config, _cpu(state), where="trained EAGLE-3 drafter")
    with outputs.atomic_dir(out_dir) as tmp:
        _write_eagle3(tmp, drafter, _Out())
        formats.load_drafter(tmp)
        _write_json(tmp / "ppow_meta.json", dict(meta, format="eagle3",
                                                 weights_sha256=sha256_file(tmp / "model.safetensors")))
    return Path(out_dir)


def write_host_eagle1(out_dir: Path, state: dict[str, torch.Tensor], config: dict[str, Any],
                      embed_weight: torch.Tensor, meta: dict[str, Any] | None = None) -> Path:
    """Write the host's EAGLE-1 layout: config.json + pytorch_model.bin with embeddings (fp32)."""
    full = _cpu(state)
    full[formats.EMBED_KEY] = embed_weight.detach().to("cpu", torch.float32).contiguous()
    with outputs.atomic_dir(out_dir) as tmp:
        _write_json(tmp / "config.json", config)
        torch.save(full, tmp / "pytorch_model.bin")
        if meta is not None:
            _write_json(tmp / "ppow_meta.json", meta)
    return Path(out_dir)


# --------------------------------------------------------------------------------------------------
# Export


def export(source: str | Path, out_dir: str | Path, fmt: str, target: str | None = None, force: bool = False,
           min_tau: float | None = None, eval_report: str | Path | None = None, verifier: str | None = None,
           dtype: str | None = None) -> tuple[Path, formats.LoadedDrafter]:
    """`ppow export`: a run dir, checkpoint dir or drafter dir -> one serving-ready drafter dir.

    Args:
        source: `<run>` (newest intact checkpoint), `<run>/checkpoints/step-N`, or a drafter dir.
        out_dir: created atomically; an existing non-empty dir needs `force`.
        fmt: one of `formats.FORMATS`.
        target: "default", a target model dir, or None (a checkpoint's recorded target).
        force: overwrite `out_dir`, and export even when the tau gate fails.
        min_tau / eval_report: refuse when the report's tau is below `min_tau` (unless `force`).
        verifier: the target's name on the serving machine (hub id or path), written as given; None: the
            hub id of the target's family (`serving_names`), else refused for speculators, warned otherwise.
        dtype: "fp32" | "fp16" | "bf16" for the floating weights; None keeps the source's.
    Returns:
        (out_dir, the drafter as read from the source).
    """
    if fmt not in formats.FORMATS:
        raise UserError(f"--format must be one of {', '.join(formats.FORMATS)}, got {fmt!r}")
    if dtype is not None and dtype not in DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if verifier is not None and not verifier.strip():
        raise UserError("--verifier is empty; pass the target's Hugging Face id or its path on the serving machine")
    src, out = Path(source), outputs.resolve_out_dir(out_dir)
    _check_out_dir(src, out, force)
    report = _read_report(eval_report, min_tau)
    drafter, meta_src = drafter_source.read_source(src, target)
    want = "eagle1" if fmt.startswith("eagle1") else "eagle3"
    if drafter.format != want:
        raise UserError(f"{src} holds an {drafter.format} drafter; it can only be exported as "
                        f"{'eagle3 or speculators' if drafter.format == 'eagle3' else 'eagle1 or eagle1-compact'}")
    tau = _tau_gate(report, eval_report, drafter, src, min_tau, force)
    serving = serving_names.for_export(drafter.format, drafter.dims, meta_src, fmt, verifier)
    meta = _export_meta(drafter, meta_src, fmt, tau, min_tau, force)
    plan = _Out(meta_src.get("target_dir"), DTYPES[dtype] if dtype else source_dtype(drafter.state),
                {"name_or_path": serving.name, "architectures": list(serving.architectures)}, record_dtype=True)
    meta.update(target=serving.name, target_named_by=serving.how, dtype=_dtype_name(plan.dtype))
    with outputs.atomic_dir(out) as tmp:
        _WRITERS[fmt](tmp, drafter, plan)
        check = formats.load_drafter(tmp)  # re-read before the rename: never leave an unloadable export
        if fmt == "eagle1" and formats.EMBED_KEY not in check.state:
            raise AssertionError("eagle1 export lacks embed_tokens.weight")
        if want == "eagle3":
            refused = {h: p for h, p in host_configs.host_problems(check.config).items() if p}
            meta["host_problems"] = refused
            drafter.notes.extend(f"{h} would refuse or misread this config: {'; '.join(p)}" for h, p in refused.items())
        meta["files"] = {f.name: sha256_file(f) for f in sorted(tmp.iterdir()) if f.is_file()}
        _write_json(tmp / "ppow_meta.json", meta)
    serving_names.warn_unnamed(serving)
    return out, drafter


def _check_out_dir(src: Path, out: Path, force: bool) -> None:
    """`out` is resolved (`resolve_out_dir`). Refuses a non-empty dir without `force`, and the source or a
    directory holding it."""
    if src.exists() and (out == src.resolve() or out in src.resolve().parents):
        raise UserError(f"output dir {out} would replace the source {src}; choose another output dir")
    if out.exists() and any(out.iterdir()) and not force:
        raise UserError(f"output dir {out} exists and is not empty; pass --force to replace it")


def _read_report(eval_report: str | Path | None, min_tau: float | None) -> dict[str, Any] | None:
    """The `ppow eval` report.json, read before any work."""
    if eval_report is None:
        if min_tau is not None:
            raise UserError("--min-tau needs --eval-report <report.json> with the measured tau")
        return None
    try:
        report = json.loads(Path(eval_report).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"eval report {eval_report} is unreadable ({type(exc).__name__}); "
                        "pass a `ppow eval` report.json") from None
    if not isinstance(report, dict):
        raise UserError(f"eval report {eval_report} is not a `ppow eval` report.json (a JSON object)")
    return report


def _tau_gate(report: dict[str, Any] | None, path: str | Path | None, drafter: formats.LoadedDrafter, src: Path,
              min_tau: float | None, force: bool) -> float | None:
    """tau (`stats.overall.tau`) of a report made for exactly these weights; refuse below min_tau (unless force).

    The report must record `settings.drafter_weights_sha256` (`formats.weights_digest` of the drafter it
    evaluated, written by `ppow eval`) equal to the source's: a report for another drafter, or one too old to
    say, is refused even with --force (its tau says nothing about this drafter).
    """
    if report is None:
        return None
    settings = report.get("settings") if isinstance(report.get("settings"), dict) else {}
    recorded, ours = settings.get("drafter_weights_sha256"), formats.weights_digest(drafter.state)
    if recorded != ours:
        why = ("records no drafter weight hash (made by an older ppow eval)" if recorded is None else
               f"was made for other weights ({settings.get('drafter', 'unknown drafter')}, weights "
               f"{str(recorded)[:12]}, this source {ours[:12]})")
        raise UserError(f"eval report {path} {why}; run `ppow eval --drafter {src}` and pass its report.json")
    overall = (report.get("stats") or {}).get("overall") if isinstance(report.get("stats"), dict) else None
    tau = overall.get("tau") if isinstance(overall, dict) else None
    if not isinstance(tau, (int, float)) or isinstance(tau, bool):
        raise UserError(f"eval report {path} has no numeric stats.overall.tau; pass a `ppow eval` report.json")
    if min_tau is not None and tau < min_tau and not force:
        raise UserError(f"measured tau {tau:.3f} is below --min-tau {min_tau:.3f}: not exporting a regressed "
                        "drafter (pass --force to export anyway)")
    return float(tau)


def _target_embeddings(target_dir: str | None, d: formats.Dims, layout: str = "the eagle1 host layout") -> torch.Tensor:
    """`model.embed_tokens.weight` of the target (single or sharded safetensors), for the layouts whose
    readers need the drafter's embeddings in its own file (EAGLE-1 host, speculators)."""
    if target_dir is None:
        raise UserError(f"this drafter has no embed_tokens.weight and {layout} needs it; "
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


# Fields a source config.json may carry that say something about the machine or the weights it was saved
# from, not about this export: dropped, and the dtype written anew (`_with_dtype`).
_SOURCE_ONLY = ("_name_or_path", "name_or_path", "torch_dtype", "dtype")


def _with_dtype(config: dict[str, Any], out: _Out, key: str = "torch_dtype") -> dict[str, Any]:
    """`config` plus the weights' dtype under `key` (`torch_dtype`: read by transformers 4 and 5, so by
    EAGLE, SGLang and vLLM), when the export records it."""
    return dict(config, **{key: _dtype_name(out.dtype)}) if out.record_dtype else config


def _eagle1_config(drafter: formats.LoadedDrafter) -> dict[str, Any]:
    config = {k: v for k, v in drafter.config.items()
              if k not in ("draft_vocab_size", "target_hidden_size", *_SOURCE_ONLY)}
    config.setdefault("architectures", ["LlamaForCausalLM"])
    config.setdefault("model_type", "llama")
    return config


def _write_eagle1(tmp: Path, drafter: formats.LoadedDrafter, out: _Out) -> None:
    """Host layout: config.json (EConfig fields + "bias") + pytorch_model.bin with embeddings."""
    state = _cpu(drafter.state, out.dtype)
    if formats.EMBED_KEY not in state:
        state[formats.EMBED_KEY] = _target_embeddings(out.target_dir, drafter.dims).to(out.dtype).contiguous()
    _write_json(tmp / "config.json", _with_dtype(_eagle1_config(drafter), out))
    torch.save(state, tmp / "pytorch_model.bin")


def _write_eagle1_compact(tmp: Path, drafter: formats.LoadedDrafter, out: _Out) -> None:
    _write_json(tmp / "config.json", _with_dtype(_eagle1_config(drafter), out))
    weights = {k: v for k, v in _cpu(drafter.state, out.dtype).items() if k != formats.EMBED_KEY}
    save_file(weights, str(tmp / "model.safetensors"))


def _eagle3_config(drafter: formats.LoadedDrafter) -> dict[str, Any]:
    """The drafter's config with the fields every host needs (docs/export.md, "Host config rules")."""
    d = drafter.dims
    config = dict({k: v for k, v in drafter.config.items() if k not in _SOURCE_ONLY},
                  architectures=["LlamaForCausalLMEagle3"], model_type="llama", num_hidden_layers=1,
                  draft_vocab_size=d.draft_vocab)
    config.pop("target_hidden_size", None)
    if d.target_hidden != d.hidden:
        config["target_hidden_size"] = d.target_hidden
    ids = config.get("eagle_aux_hidden_state_layer_ids")
    if ids and "eagle_config" not in config:  # SGLang reads only this one, as layer outputs (host_configs)
        config["eagle_config"] = {"use_aux_hidden_state": True,
                                  "eagle_aux_hidden_state_layer_ids": [i - 1 for i in ids]}
    return config


def _write_eagle3(tmp: Path, drafter: formats.LoadedDrafter, out: _Out) -> None:
    """config.json (Llama + draft_vocab_size [+ target_hidden_size], LlamaForCausalLMEagle3) + safetensors."""
    _write_json(tmp / "config.json", _with_dtype(_eagle3_config(drafter), out))
    save_file(_cpu(drafter.state, out.dtype), str(tmp / "model.safetensors"))


def _write_speculators(tmp: Path, drafter: formats.LoadedDrafter, out: _Out) -> None:
    """vLLM speculators layout: nested config.json (host_configs.to_speculators; top-level `dtype`, as the
    transformers-5-only library reads it) + `layers.0.*` safetensors with `embed_tokens.weight` (the
    target's when the source has none). `out.verifier` names the target."""
    config = host_configs.to_speculators(_eagle3_config(drafter), out.verifier or {})
    _write_json(tmp / "config.json", _with_dtype(config, out, key="dtype"))
    state = _cpu(drafter.state, out.dtype)
    if formats.EMBED_KEY not in state:  # the library's own checkpoints carry them; without, 0.9.0 draws them
        layout = "the speculators layout (the speculators library would draw them at random)"  # (docs/export.md)
        state[formats.EMBED_KEY] = _target_embeddings(out.target_dir, drafter.dims, layout).to(out.dtype)
    state = {("layers.0." + k[len("midlayer."):] if k.startswith("midlayer.") else k): v for k, v in state.items()}
    save_file(state, str(tmp / "model.safetensors"))


_WRITERS = {"eagle1": _write_eagle1, "eagle1-compact": _write_eagle1_compact, "eagle3": _write_eagle3,
            "speculators": _write_speculators}


def _export_meta(drafter: formats.LoadedDrafter, src: dict[str, Any], fmt: str, tau: float | None,
                 min_tau: float | None, force: bool) -> dict[str, Any]:
    import ppow_plugin
    portable = serving_names.portable  # ppow_meta.json names no path of this machine
    meta = {"plugin_version": ppow_plugin.__version__, "format": fmt, "drafter_type": drafter.format,
            "exported_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "notes": portable(drafter.notes),
            "source": portable(src["source"]), "source_files_sha256": src["source_files"], "step": src.get("step"),
            "stage": src.get("stage"), "config": portable(src.get("config"))}
    if tau is not None:
        meta["tau"] = tau
        meta["min_tau"] = min_tau
        meta["tau_gate"] = "forced" if (min_tau is not None and tau < min_tau) else "passed"
    return meta

