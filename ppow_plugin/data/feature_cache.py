"""Cached target features: one target pass per training sequence, read back on every later epoch.

    cache = FeatureCache.open(target_dir, drafter_type="eagle1", feature_layers=None, max_len=512)
    tpass = cache.get(sample, lm_head)          # None the first time: run the target, then
    cache.put(sample, tpass)                    # ... and every later epoch skips the target's layers

`ppow sft` with `data.feature_cache: true` does exactly this (`Trainer._target_pass`): the first epoch
costs what online SFT costs plus a write, later epochs run no target layer at all (EAGLE-1/2's `ge_data`
idea, filled lazily instead of in a separate pass). Online SFT (`data.feature_cache: false`) is unchanged.

What one entry stores (`<cache>/features/<key>/[<device>-<dtype>/]<aa>/<digest>.npz`, uncompressed, with the sha256 of its
content, `integrity.save_npz`; a damaged entry is rebuilt with one `warning:` line naming it):
    input_ids [T] int32, loss_mask [T] bool   the sequence, so an entry is checked against its sample
    features  [T, F] fp16                     what the drafter reads: EAGLE-1 the final-norm hidden state
                                              (F = H); EAGLE-3 the three fused decoder-layer inputs (F = 3H)
    hidden    [T, H] fp16 (EAGLE-3 only)      the final-norm hidden state
Label logits are not stored: they are `lm_head(hidden)` (EAGLE-1: `lm_head(features)`), one matmul with
the target's frozen head, exact up to the fp16 rounding of `hidden` (storing [T, V] logits would be 85x
larger for SmolLM2's 49k vocabulary). With greedy target-generated data the next data token is also
the argmax of these logits, so the soft labels and the data agree.

Invalidation (docs/recipes.md): the cache directory is keyed by the target's fingerprint (config,
tokenizer, weights), the drafter family and its feature layers, and data.max_len; an entry is addressed by
the sha256 of its token ids and loss mask, so changed data simply misses and is recomputed. Features of a
target run elsewhere than the CPU in fp32 (a bf16 GPU run, `--dtype bf16` on the CPU) differ from fp32's
beyond fp16 rounding and go to a subfolder named by device type and dtype (`cuda-bf16/`, as the
continuation cache: `devices.Placement.cache_folder`); CPU fp32 entries stay where they always were.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ppow_plugin import devices
from ppow_plugin.host import integrity
from ppow_plugin.host.assets import cache_dir, target_fingerprint
from ppow_plugin.method.rollout import TargetPass

FEATURE_FORMAT = 1


def sample_digest(input_ids: Tensor, loss_mask: Tensor) -> str:
    """sha256 of a sequence's token ids and loss mask: the address of its cache entry."""
    h = hashlib.sha256(torch.as_tensor(input_ids, dtype=torch.int64).numpy().tobytes())
    h.update(torch.as_tensor(loss_mask, dtype=torch.bool).numpy().tobytes())
    return h.hexdigest()


def cache_key(fingerprint: str, drafter_type: str, feature_layers: tuple[int, ...] | None, max_len: int) -> str:
    blob = json.dumps({"format": FEATURE_FORMAT, "target": fingerprint, "drafter_type": drafter_type,
                       "feature_layers": list(feature_layers or []), "max_len": max_len, "dtype": "fp16"})
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


class FeatureCache:
    """Content-addressed fp16 target features under `root` (one .npz per sequence, written atomically)."""

    def __init__(self, root: Path, eagle3: bool):
        self.root, self.eagle3 = root, eagle3
        self.hits = self.misses = 0

    @classmethod
    def open(cls, target_dir: str | Path, drafter_type: str, feature_layers: tuple[int, ...] | None,
             max_len: int, place: devices.Placement) -> "FeatureCache":
        """The cache of the target at `target_dir` run in `place` (its device type and dtype: training's
        `dist.device`/`dist.target_dtype`, `ppow data generate`'s `--device`/`--dtype`)."""
        key = cache_key(target_fingerprint(target_dir), drafter_type, feature_layers, max_len)
        root = place.cache_folder(cache_dir() / "features" / f"{Path(target_dir).resolve().name}-{key}")
        root.mkdir(parents=True, exist_ok=True)
        meta = root / "meta.json"
        if not meta.is_file():
            meta.write_text(json.dumps({"format": FEATURE_FORMAT, "target": str(Path(target_dir).resolve()),
                                        "target_sha256": target_fingerprint(target_dir),
                                        "drafter_type": drafter_type, "feature_layers": list(feature_layers or []),
                                        "max_len": max_len, "dtype": "fp16", "made_on": place.tag}, indent=2) + "\n")
        return cls(root, eagle3=drafter_type == "eagle3")

    def _path(self, digest: str) -> Path:
        return self.root / digest[:2] / f"{digest}.npz"

    def has(self, sample) -> bool:
        """Whether `sample` has an entry (its digest is checked when `get` reads it; a damaged one is rebuilt)."""
        return self._path(sample_digest(sample.input_ids, sample.loss_mask)).is_file()

    def get(self, sample, lm_head: torch.nn.Module, rows: Tensor | None = None) -> TargetPass | None:
        """The sample's cached target pass (features fp16 -> lm_head dtype; logits recomputed), or None.

        rows: [T] bool, the positions whose logits the loss reads (None = all; `cached_target_pass`)."""
        ids, mask = sample.input_ids, sample.loss_mask
        path = self._path(sample_digest(ids, mask))
        try:
            z = integrity.load_npz(path, require_digest=True)
            same = (np.array_equal(z["input_ids"], np.asarray(ids))
                    and np.array_equal(z["loss_mask"], np.asarray(mask)))
            features = torch.from_numpy(z["features"])
            hidden = torch.from_numpy(z["hidden"]) if self.eagle3 else features
        except FileNotFoundError:
            self.misses += 1
            return None
        except (integrity.Damaged, KeyError) as exc:  # a damaged entry: say so, recompute it (`put` replaces it)
            integrity.warn_rebuilding("feature-cache entry", path, exc)
            self.misses += 1
            return None
        if not same:  # a digest collision cannot happen in practice; a renamed file can
            self.misses += 1
            return None
        self.hits += 1
        return cached_target_pass(features, hidden, lm_head, rows)

    def put(self, sample, tpass: TargetPass) -> Path:
        """Store a target pass (fp16) for `sample`; atomic, so concurrent ranks may write the same entry."""
        path = self._path(sample_digest(sample.input_ids, sample.loss_mask))
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = {"input_ids": np.asarray(sample.input_ids, dtype=np.int32),
                  "loss_mask": np.asarray(sample.loss_mask, dtype=bool),
                  "features": tpass.features.detach().to("cpu", torch.float16).numpy()}
        if self.eagle3:
            arrays["hidden"] = tpass.hidden.detach().to("cpu", torch.float16).numpy()
        return integrity.save_npz(path, arrays)  # atomic, with the digest `get` checks

    def stats(self) -> dict[str, int]:
        return {"feature_cache_hits": self.hits, "feature_cache_misses": self.misses}


def cached_target_pass(features: Tensor, hidden: Tensor, lm_head: torch.nn.Module, rows: Tensor | None = None
                       ) -> TargetPass:
    """A `TargetPass` from stored fp16 features: logits = lm_head(hidden), as the target computes them.

    Args:
        features: [T, F] fp16 drafter input features.
        hidden: [T, H] fp16 final-norm hidden states (EAGLE-1: the features themselves).
        rows: [T] bool or None. Only these rows' logits are computed, the others are left 0: SFT reads the
            target's logits only where the next token is trained (`valid`), and the [V, H] head is most of
            the cost of a cached step (SmolLM2: 49k rows).
    """
    dtype, device = lm_head.weight.dtype, lm_head.weight.device
    hidden = hidden.to(device, dtype)
    with torch.no_grad():
        if rows is None:
            logits = lm_head(hidden).float()  # [T, V]
        elif not rows.any():  # nothing reads them (sft.vocab_rows): a free all-zero view
            logits = hidden.new_zeros((1, lm_head.weight.shape[0]), dtype=torch.float32).expand(hidden.shape[0], -1)
        else:
            logits = hidden.new_zeros((hidden.shape[0], lm_head.weight.shape[0]), dtype=torch.float32)  # [T, V]
            logits[rows] = lm_head(hidden[rows]).float()
    return TargetPass(features=features.to(device, dtype), logits=logits, hidden=hidden)
