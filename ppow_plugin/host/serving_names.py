"""Names an export may write: the target as the serving machine finds it, and no path of this machine.

    t = serving_target(None, "/root/.cache/ppow/targets/smollm2-135m-instruct", "default", (576, 49152))
    t.name, t.how   # "HuggingFaceTB/SmolLM2-135M-Instruct", "the ppow-prepared target smollm2-135m-instruct, ..."
    portable({"path": "/root/.cache/ppow/generated/x"})   # {"path": ".../generated/x"}

Rule: an export names its target the way the serving stack finds it, never by a path of the exporting machine
(docs/export.md, "Which target an export names"). In order:
1. `--verifier NAME`, written as given (a hub id, or a path on the serving machine the user chose).
2. The Hugging Face id of the target's family: the `_hub_id` of the packaged known config
   (`known_configs/<name>/config.json`) the target matches, tried on the target dir the export used and on
   the recipe's `model.target`:
   a. a dir built by `ppow prepare`: its `ppow_asset.json` names the assets' GGUFTarget;
   b. `default`: the embedded SmolLM2 target;
   c. a Hugging Face cache snapshot (`.../models--ORG--NAME/snapshots/REV`): `ORG/NAME` itself;
   d. the dir's last path component, or its symlink target's, lower-cased (as `ppow plan` matches known
      configs), accepted only when the sizes agree: every fingerprint field of the dir's config.json when
      it is here, else the drafter's feature width and vocabulary.
   Sizes alone never name a family: Llama-3.1-8B, DeepSeek-R1-Distill-Llama-8B and every fine-tune of
   them share them, and a wrong id serves the drafter against another model.
3. The name an earlier export recorded (its ppow_meta.json `target`) when it looks like a hub id
   (`ORG/NAME`) and is no path here: re-exporting an export keeps its name.
4. Else no name (`name` None): `for_export` refuses a speculators export (its `verifier.name_or_path` is
   what `vllm serve EXPORT` loads as the target: a placeholder would only fail there) and warns in one
   line for the other formats (their configs name no target; only ppow_meta.json does, then as null).
Everything else an export records about its origin (ppow_meta.json `source`, the recipe, the notes) goes
through `portable`.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

from ppow_plugin.errors import UserError
from ppow_plugin.host.target_arch import KNOWN_CONFIGS

ASSET_MARKER = "ppow_asset.json"  # assets.MARKER: written by `ppow prepare` into each target it builds
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # ORG/NAME
FINGERPRINT = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
               "intermediate_size", "vocab_size")


class ServingTarget(NamedTuple):
    name: str | None                   # hub id, the user's --verifier, or None (unknown)
    how: str                           # where the name came from, or why there is none (one clause)
    architectures: tuple[str, ...]     # the target's `architectures` (its config.json, else the known config)


def hub_id(known: str) -> str | None:
    """`_hub_id` of the packaged known config `known` (e.g. "smollm2-135m-instruct"), or None."""
    config = _json(KNOWN_CONFIGS / known / "config.json")
    return config.get("_hub_id") if isinstance(config.get("_hub_id"), str) else None


def serving_target(verifier: str | None, target_dir: str | None, recorded: Sequence[str | None],
                   widths: tuple[int, int]) -> ServingTarget:
    """The target name an export writes (module rule above).

    Args:
        verifier: `--verifier NAME`, or None.
        target_dir: the target dir the export used (`--target`, else the one the source records), or None.
        recorded: what the source records, in order: its ppow_meta.json `target` (a target dir of the
            training machine, or an earlier export's name), the recipe's `model.target` ("default",
            ".cache/targets/qwen3-8b"); None where absent.
        widths: (target hidden size, vocabulary) the drafter was built for: the fingerprint when the
            target's config.json is not on this machine.
    """
    local = _json(Path(target_dir) / "config.json") if target_dir else {}
    archs = tuple(local.get("architectures") or ())
    if verifier is not None:
        return ServingTarget(verifier, "--verifier", archs)
    seen = []
    for candidate in dict.fromkeys(c for c in (target_dir, *recorded) if isinstance(c, str) and c):
        found = _match(candidate, local if candidate == target_dir else {}, widths)
        if found is not None:
            name, how, known = found
            known_config = _json(KNOWN_CONFIGS / known / "config.json") if known else {}
            return ServingTarget(name, how, archs or tuple(known_config.get("architectures") or ()))
        seen.append(Path(candidate).name or candidate)
    earlier = recorded[0] if recorded else None
    if isinstance(earlier, str) and _HUB_ID.fullmatch(earlier) and not Path(earlier).exists():
        return ServingTarget(earlier, "the name the source's ppow_meta.json records", archs)
    why = f"target {' / '.join(seen)} matches no packaged known config" if seen else "the source records no target"
    return ServingTarget(None, why, archs)


def for_export(drafter_format: str, dims: Any, meta_src: dict[str, Any], fmt: str,
               verifier: str | None) -> ServingTarget:
    """`serving_target` for `ppow export` (`dims`: the drafter's `formats.Dims`; `meta_src`: what
    `drafter_source.read_source` found). No name: UserError for `speculators`; the other formats warn
    (`warn_unnamed`) after writing, so a refused export prints its one error line only."""
    recipe = ((meta_src.get("config") or {}).get("model") or {}).get("target")
    width = dims.hidden if drafter_format == "eagle1" else dims.target_hidden
    found = serving_target(verifier, meta_src.get("target_dir"), (meta_src.get("target_recorded"), recipe),
                           (width, dims.vocab))
    if found.name is None and fmt == "speculators":
        raise UserError(f"cannot name the target for the serving machine ({found.how}); pass --verifier NAME, "
                        "the target's Hugging Face id (e.g. meta-llama/Llama-3.1-8B-Instruct) or its path there")
    return found


def warn_unnamed(found: ServingTarget) -> None:
    """The one warning line of an export that names no target (printed once it is written)."""
    if found.name is None:
        print(f"warning: the export names no target ({found.how}); pass --verifier NAME to record the "
              "target's Hugging Face id in ppow_meta.json", file=sys.stderr)


def _match(candidate: str, config: dict[str, Any], widths: tuple[int, int]) -> tuple[str, str, str | None] | None:
    """(hub id, how, known config name or None) for one target path or recipe value, else None."""
    if candidate == "default":
        return _known("smollm2-135m-instruct", "the default target")
    path = Path(candidate)
    marker = _json(path / ASSET_MARKER)
    if isinstance(marker.get("target"), str):
        return _known(marker["target"], f"the ppow-prepared target {marker['target']}")
    for part in (*path.parts, *_resolved(path).parts):
        if part.startswith("models--") and len(part.split("--")) >= 3:  # HF cache: models--ORG--NAME
            org, name = part.split("--", 2)[1:]
            return f"{org}/{name}", "the Hugging Face cache folder", None
    for name in dict.fromkeys(p.name.lower() for p in (path, _resolved(path)) if p.name):
        known = _json(KNOWN_CONFIGS / name / "config.json")
        if known and _same_sizes(known, config, widths):
            return _known(name, f"the target dir name {name} (sizes checked)")
    return None


def _known(name: str, how: str) -> tuple[str, str, str] | None:
    hub = hub_id(name)
    return (hub, f"{how}, packaged known config {name}", name) if hub else None


def _same_sizes(known: dict[str, Any], config: dict[str, Any], widths: tuple[int, int]) -> bool:
    """The fingerprint: every FINGERPRINT field of the target's config.json, or without one the drafter's
    (feature width, vocabulary), equal to the known config's."""
    if config:
        return all(config.get(k) == known.get(k) for k in FINGERPRINT if known.get(k) is not None)
    return (known.get("hidden_size"), known.get("vocab_size")) == tuple(widths)


def _resolved(path: Path) -> Path:
    try:
        return path.resolve()
    except (OSError, RuntimeError):
        return path


def _json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


_ABS_PATH = re.compile(r"(?<![\w.~:/-])/[^\s'\"]*")  # an absolute POSIX path inside a string


def portable(value: Any) -> Any:
    """`value` (a str, or dicts/lists of them) without this machine's absolute paths: a path under the
    working directory becomes relative to it, any other `.../<its last two parts>` (`.../<name>` when the
    first of them is a top-level dir: `/tmp/x` -> `.../x`)."""
    if isinstance(value, dict):
        return {k: portable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [portable(v) for v in value]
    if not isinstance(value, str):
        return value

    def short(m: re.Match) -> str:
        path, cwd = Path(m.group(0)), Path.cwd()
        if path == cwd or cwd in path.parents:
            return path.relative_to(cwd).as_posix() or "."
        return ".../" + "/".join(path.parts[-2:] if len(path.parts) > 3 else path.parts[-1:])  # never a top dir
    return _ABS_PATH.sub(short, value)
