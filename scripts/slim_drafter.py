"""Write a drafter dir small enough to commit: float weights in fp16, no embeddings.

    python scripts/slim_drafter.py SRC_DRAFTER_DIR OUT_DIR

Any EAGLE-1 or EAGLE-3 drafter dir `formats.load_drafter` reads (was `scripts/slim_eagle3.py`, EAGLE-3 only).
An EAGLE-3 dir carries a frozen copy of the target's embeddings (SmolLM2: 49152 x 576 fp32 = 113 MB of a
146 MB file); the trainer's EAGLE-1 dirs already leave them out. Every ppow loader fills a missing
`embed_tokens.weight` from the target and casts the weights to the run's dtype on load
(`adapters.load_eagle3_drafter`, `eagle_compat.load_drafter_weights`; the host EAGLE-1 layout the evaluator
writes is fp32, `export.write_host_eagle1`), so the committed copy leaves the embeddings out and stores the
float weights in fp16 (SmolLM2 EAGLE-1: 4.2 M weights, 8.4 MB; EAGLE-3: 9.8 M weights, 19.7 MB). The
rounding changes τ a little: a committed drafter's provenance records the τ of the slim copy itself.
`ppow export` of a slim dir keeps fp16 (the source's dtype) unless `--dtype fp32`; the embeddings are
written back only where the format needs them (`--format eagle1`).
"""

import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ppow_plugin import outputs
from ppow_plugin.drafters import export, formats
from ppow_plugin.errors import UserError


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def main(src: Path, out: Path) -> None:
    if out.exists():
        fail(f"{out} exists; choose a new output dir")
    try:
        fmt = formats.load_drafter(src).format
    except UserError as exc:
        fail(str(exc))
    if not (src / "model.safetensors").is_file():
        fail(f"{src} keeps its weights in another file than model.safetensors; export it first with "
             f"ppow export {src} OUT --format {'eagle1-compact' if fmt == 'eagle1' else 'eagle3'}")
    weights = {k: (v.to(torch.float16) if v.is_floating_point() else v)
               for k, v in load_file(str(src / "model.safetensors")).items() if k != formats.EMBED_KEY}
    with outputs.atomic_dir(out) as tmp:
        shutil.copy(src / "config.json", tmp / "config.json")
        save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        meta = json.loads((src / "ppow_meta.json").read_text()) if (src / "ppow_meta.json").exists() else {}
        meta.update(weights_sha256=export.sha256_file(tmp / "model.safetensors"),
                    slim="embed_tokens.weight left out (the target's), float weights fp16: scripts/slim_drafter.py")
        (tmp / "ppow_meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        formats.load_drafter(tmp)  # re-read before the rename
    print(f"wrote {out} ({fmt}): {(out / 'model.safetensors').stat().st_size / 1e6:.1f} MB")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        fail("usage: python scripts/slim_drafter.py SRC_DRAFTER_DIR OUT_DIR")
    main(Path(sys.argv[1]), Path(sys.argv[2]))
