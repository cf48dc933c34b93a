"""`ppow doctor`: one screen that says whether this machine can run the plugin, and how to fix it."""

from __future__ import annotations

import platform
from importlib.metadata import PackageNotFoundError, version

from ppow_plugin.errors import UserError


def _version(dist: str) -> str | None:
    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def checks() -> list[tuple[str, bool, str, str]]:
    """(name, ok, detail, fix) rows; ok=False rows make doctor exit non-zero."""
    rows: list[tuple[str, bool, str, str]] = []
    rows.append(("python", True, platform.python_version(), ""))
    for dist, fix in [("torch", "pip install torch==2.13.0"), ("transformers", "pip install 'transformers>=5,<6'"),
                      ("safetensors", "pip install safetensors"), ("gguf", "pip install gguf")]:
        v = _version(dist)
        rows.append((dist, v is not None, v or "missing", fix))
    v = _version("deepspeed")
    rows.append(("deepspeed", v is not None, v or "missing (dist.engine=torch still works)",
                 "DS_BUILD_OPS=0 pip install deepspeed==0.19.8"))

    from ppow_plugin.host import patching
    try:
        st = patching.patch_status()
        rows.append(("eagle host", st.fully_patched, st.describe(), "ppow patch apply"))
    except UserError as exc:
        rows.append(("eagle host", False, str(exc), "pip install --no-deps eagle-llm==1.2.1 && ppow patch apply"))

    from ppow_plugin import distributed
    from ppow_plugin.config import DistCfg
    ds = distributed.dist_summary(DistCfg())
    rows.append(("device", True, f"{ds['device']} (dtype fp32/bf16 from the recipe)", ""))
    if "deepspeed_accelerator" in ds:
        rows.append(("deepspeed accelerator", True, ds["deepspeed_accelerator"], ""))

    from ppow_plugin.host import assets
    try:
        path = assets.default_target_dir(prepare=False)
        rows.append(("embedded target", True, str(path), ""))
    except UserError as exc:
        rows.append(("embedded target", False, str(exc), "ppow prepare"))
    return rows


def run() -> int:
    rows = checks()
    width = max(len(r[0]) for r in rows)
    bad = 0
    for name, ok, detail, fix in rows:
        mark = "ok " if ok else "BAD"
        print(f"[{mark}] {name:<{width}}  {detail}")
        if not ok:
            bad += 1
            print(f"      {'':<{width}}  fix: {fix}")
    print("all good" if not bad else f"{bad} problem(s) found")
    return 0 if not bad else 1
