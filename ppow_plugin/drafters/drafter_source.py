"""Where an export's drafter comes from: a run dir, one checkpoint, or a drafter dir -> one checked drafter.

    drafter, origin = read_source(Path("runs/ppow"), target=None)   # newest intact checkpoint
    checkpoint_problem(Path("runs/ppow/checkpoints/step-000200"))    # None, or why it is not intact

Rule (one drafter, one config): a checkpoint holds no `config.json`, so its config is rebuilt with the very
function the trainer wrote `<run>/drafter/config.json` with (`eagle_compat.eagle1_config_dict`,
`eagle3.Eagle3Config.to_hf_dict`), sizes read off the weights; exporting a run, its checkpoint or its
drafter dir gives the same `config.json`.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import torch

from ppow_plugin.drafters import formats
from ppow_plugin.host import integrity
from ppow_plugin.errors import UserError


def sha256_file(path: Path) -> str:
    import hashlib
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_checkpoint_meta(ckpt: Path, meta: dict) -> Path:
    """`ckpt/meta.json`: `meta` plus the sha256 of every file in `ckpt`, and its own digest (`integrity`)."""
    files = {p.relative_to(ckpt).as_posix(): sha256_file(p) for p in sorted(ckpt.rglob("*")) if p.is_file()}
    return integrity.write_json(ckpt / "meta.json", meta | {"files": files})


def checkpoint_problem(ckpt: Path) -> str | None:
    """None when `ckpt/meta.json` is intact and lists files that all exist with their sha256; else what is wrong."""
    try:
        files = integrity.read_json(ckpt / "meta.json")["files"]
    except integrity.Damaged as exc:
        return f"meta.json damaged ({exc})"
    except (OSError, KeyError, TypeError):
        return "meta.json missing or unreadable"
    for rel, digest in files.items():
        if not (ckpt / rel).is_file() or sha256_file(ckpt / rel) != digest:
            return f"{rel} missing or corrupt (hash mismatch)"
    return None


def read_source(src: Path, target: str | None) -> tuple[formats.LoadedDrafter, dict[str, Any]]:
    """The drafter plus what its metadata records about its origin (source, hashes, step, stage, target)."""
    if not src.is_dir():
        raise UserError(f"{src} is not a directory; pass a run dir, a checkpoints/step-N dir or a drafter dir")
    if (src / "checkpoints").is_dir():
        src = _newest_checkpoint(src)
    if (src / "engine").is_dir() or (src / "engine.pt").is_file():
        return _read_checkpoint(src, target)
    if not (src / "config.json").is_file():
        raise UserError(f"{src} holds no drafter (no config.json), no checkpoints/ and no engine state; pass a run "
                        "dir, a checkpoints/step-N dir or a drafter dir")
    target_dir = resolve_target(target) if target is not None else None
    drafter = formats.load_drafter(src, target_config(target_dir) if target_dir else None)
    try:
        prior = integrity.read_json(src / "ppow_meta.json") if (src / "ppow_meta.json").is_file() else {}
    except integrity.Damaged as exc:  # only provenance: the weights were checked above; say what is lost
        print(f"warning: {src / 'ppow_meta.json'} is damaged ({exc}); the export records no step, stage or "
              "config from it", file=sys.stderr)
        prior = {}
    recorded = prior.get("target") if isinstance(prior.get("target"), str) else None
    if target_dir is None and recorded and (Path(recorded) / "config.json").is_file():
        target_dir = recorded  # the trainer's drafter dirs record the target dir; exports record its hub id
    return drafter, {"source": str(src.resolve()), "source_files": {f.name: sha256_file(f) for f in drafter.files},
                     "step": prior.get("step"), "stage": prior.get("stage"), "config": prior.get("config"),
                     "target_dir": str(target_dir) if target_dir else None, "target_recorded": recorded}


def _newest_checkpoint(run: Path) -> Path:
    for ckpt in sorted((run / "checkpoints").glob("step-??????"), reverse=True):
        if checkpoint_problem(ckpt) is None:
            return ckpt
    raise UserError(f"{run}/checkpoints holds no intact checkpoint; pass {run}/drafter or a checkpoint dir")


def _read_checkpoint(ckpt: Path, target: str | None) -> tuple[formats.LoadedDrafter, dict[str, Any]]:
    """Consolidate engine state (DeepSpeed ZeRO 0-3 or engine.pt) and rebuild the drafter config."""
    problem = checkpoint_problem(ckpt)
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
    target_dir = resolve_target(target if target is not None else recorded)
    target_cfg = target_config(target_dir)
    fmt = formats.detect_format(state)
    _precheck_target(fmt, state, target_cfg, str(ckpt))
    config = config_for_weights(fmt, state, target_cfg, where=str(ckpt))
    drafter = formats.validate_drafter(fmt, config, state, target_cfg, where=str(ckpt))
    rel = {f.relative_to(ckpt).as_posix(): meta["files"].get(f.relative_to(ckpt).as_posix()) for f in weight_files}
    return drafter._replace(files=tuple(weight_files)), {
        "source": str(ckpt.resolve()), "source_files": rel, "step": meta.get("step"), "stage": meta.get("stage"),
        "config": meta.get("config"), "target_dir": str(target_dir)}


def resolve_target(target: str | None) -> Path:
    if target is None:
        raise UserError("cannot tell which target this drafter belongs to; pass --target default|DIR")
    if target == "default":
        from ppow_plugin.host import assets
        return assets.default_target_dir(prepare=False)
    p = Path(target)
    if not (p / "config.json").is_file():
        raise UserError(f"target {target} is not a model directory with config.json; pass --target default|DIR")
    return p


def target_config(target_dir: Path) -> Any:
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


def config_for_weights(fmt: str, state: dict[str, torch.Tensor], target_cfg: Any, where: str) -> dict[str, Any]:
    """The drafter `config.json` the trainer writes for this target, sizes read off the weights."""
    from ppow_plugin.drafters import eagle3
    from ppow_plugin.host import eagle_compat  # eagle_compat: no host import, it only reads the config
    if fmt == "eagle1":
        config = eagle_compat.eagle1_config_dict(target_cfg, bias="fc.bias" in state)
        config["num_hidden_layers"] = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("layers."))
        return config
    state = formats.normalise_eagle3(dict(state), [])
    rows = {k: v.shape[0] for k, v in state.items() if v.dim() >= 1}
    try:
        cfg = eagle3.Eagle3Config.from_target_config(target_cfg, rows.get("lm_head.weight"))
        found = {"hidden_size": rows.get("norm.weight"), "intermediate_size": rows.get("midlayer.mlp.gate_proj.weight"),
                 "num_attention_heads": rows.get("midlayer.self_attn.q_proj.weight", 0) // cfg.head_dim,
                 "num_key_value_heads": rows.get("midlayer.self_attn.k_proj.weight", 0) // cfg.head_dim}
        cfg = dataclasses.replace(cfg, **{k: v for k, v in found.items() if v})
    except ValueError as exc:
        raise UserError(f"{where}: {exc}") from None
    return cfg.to_hf_dict()
