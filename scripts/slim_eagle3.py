"""Write an EAGLE-3 drafter dir small enough to commit: no embeddings, fp16 weights.

    python scripts/slim_eagle3.py SRC_DRAFTER_DIR OUT_DIR

An EAGLE-3 dir carries a frozen copy of the target's embeddings (SmolLM2: 49152 x 576 fp32 = 113 MB of a
146 MB file). Every ppow loader fills a missing `embed_tokens.weight` from the target and casts the weights to
the run's dtype (`drafters.load_eagle3_drafter`), so the committed copy leaves the embeddings out and stores
the float weights in fp16 (9.8 M weights: 19.7 MB). The rounding changes τ a little: a committed drafter's
provenance records the τ of the slim copy itself. `ppow export --format eagle3` of the slim dir writes fp32
weights again; the embeddings stay out (they are optional in the format).
"""

import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

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
    if fmt != "eagle3":
        fail(f"{src} holds an {fmt} drafter; pass an EAGLE-3 drafter dir")
    weights = {k: (v.to(torch.float16) if v.is_floating_point() else v)
               for k, v in load_file(str(src / "model.safetensors")).items() if k != formats.EMBED_KEY}
    with export.atomic_dir(out) as tmp:
        shutil.copy(src / "config.json", tmp / "config.json")
        save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        meta = json.loads((src / "ppow_meta.json").read_text()) if (src / "ppow_meta.json").exists() else {}
        meta.update(weights_sha256=export.sha256_file(tmp / "model.safetensors"),
                    slim="embed_tokens.weight left out (the target's), float weights fp16: scripts/slim_eagle3.py")
        (tmp / "ppow_meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        formats.load_drafter(tmp)  # re-read before the rename
    print(f"wrote {out}: {(out / 'model.safetensors').stat().st_size / 1e6:.1f} MB")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        fail("usage: python scripts/slim_eagle3.py SRC_DRAFTER_DIR OUT_DIR")
    main(Path(sys.argv[1]), Path(sys.argv[2]))
