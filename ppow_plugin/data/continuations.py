"""The target's greedy continuations and features, generated once and cached: what `simulate.py` replays.

At temperature 0 speculative decoding commits exactly the target's greedy tokens, so what a drafter
would do is fixed once the greedy continuation is known. For each prompt (token ids after the chat
template) this module makes:

1. the greedy continuation of `length` tokens, generated batched with an HF copy of the target (left
   padding, KV cache). EOS does not stop it: a decoder's last cycle can accept drafts past an EOS, and
   verifying them needs the target's choices there;
2. the target features over prompt + continuation from ONE forward of the host target (the model the
   decoders verify with): EAGLE-1 the final-norm hidden states, EAGLE-3 the fused decoder-layer inputs.

Both are cached under `cache_dir()/simulate/<target fingerprint>/` for a CPU fp32 target, or in a
subfolder named by device type and dtype (`cuda-bf16/`, `cpu-bf16/`, ...: a bf16 target's greedy tokens
and features differ from fp32's at near-ties, so the two never mix; `cache_root`). One entry per prompt,
keyed by the prompt ids (so by the prompt text, the chat template and the tokenizer), the length and, for
features, the feature layers. Entries are stored on the CPU (features as fp32); the simulation moves them
to its device. Each entry records the sha256 of its tensors; a damaged one is rebuilt with one `warning:`
line naming it (`integrity`). The fingerprint reads the target's config and the size, head and tail of
every weight file. Entries are written atomically (temporary file + rename), so concurrent runs at worst
redo work.

Where this can differ from a real decode: the continuation is generated with other kernels and batch
shapes than the decoder's tree forwards. Where the target's top two logits are within float rounding
(a near-tie) the two can pick different tokens; docs/evaluation.md gives the measured rate.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor

from ppow_plugin import devices
from ppow_plugin.host import assets, integrity
from ppow_plugin.method import rollout

CACHE_FORMAT = 1
GEN_BATCH = 16  # prompts per batched greedy generation (sorted by length, so padding stays small)


class Continuation(NamedTuple):
    ids: Tensor        # [P + M] int64 prompt followed by the target's greedy continuation
    prompt_len: int    # P
    features: Tensor   # [P + M, F] float32 target features (F = H for EAGLE-1, 3·H for EAGLE-3)


def target_fingerprint(target_dir: Path) -> str:
    """sha256 over config.json and the name, size, first and last MiB of every weight file (fast, not a full hash)."""
    h = hashlib.sha256(f"ppow-target-v{CACHE_FORMAT}".encode())
    h.update((target_dir / "config.json").read_bytes())
    for f in sorted(target_dir.iterdir()):
        if f.suffix in (".safetensors", ".bin", ".pt"):
            size = f.stat().st_size
            h.update(f"{f.name}:{size}".encode())
            with f.open("rb") as fh:
                h.update(fh.read(1 << 20))
                fh.seek(max(0, size - (1 << 20)))
                h.update(fh.read(1 << 20))
    return h.hexdigest()[:24]


def _entry_key(prompt_ids: Sequence[int], length: int) -> str:
    return hashlib.sha256(json.dumps([CACHE_FORMAT, length, list(prompt_ids)]).encode()).hexdigest()[:32]


def _feature_kind(feature_layers: Sequence[int] | None) -> str:
    return "final" if feature_layers is None else "layers-" + "-".join(str(i) for i in feature_layers)


def _save(tensors: dict[str, Tensor], path: Path) -> None:
    integrity.save_safetensors(path, tensors)  # atomic, with the content digest `_load` checks


def _load(path: Path) -> dict[str, Tensor] | None:
    """A cache entry, verified; None when absent or damaged (then rebuilt, with one `warning:` line)."""
    try:
        return integrity.load_safetensors(path)
    except FileNotFoundError:
        return None
    except integrity.Damaged as exc:
        integrity.warn_rebuilding("continuation-cache entry", path, exc)
        return None


def cached_step(model, cache, **inputs):
    """One forward of an HF causal LM with its KV cache -> (output, updated cache), whatever this
    transformers names the argument (`cache` in 5.x from 5.2x on; `past_key_values`, deprecated there, before)."""
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    out = model(**inputs, **{name: cache}, use_cache=True)
    return out, getattr(out, "cache", None) if name == "cache" else out.past_key_values


@torch.no_grad()
def greedy_batches(model, prompts: Sequence[Sequence[int]], length: int, pad_id: int,
                   batch_size: int = GEN_BATCH) -> Iterator[tuple[list[int], list[list[int]]]]:
    """`length` greedy tokens after each prompt (EOS does not stop), batched with left padding, shortest
    prompts first (little padding); yielded batch by batch so a caller can store each as it is made.

    Args:
        model: an HF causal LM (`AutoModelForCausalLM`), eval mode; the batches are built on its device.
        prompts: token id lists.
    Yields:
        (indices into `prompts`, one list of `length` ids per index).
    """
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        width = max(len(prompts[i]) for i in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long, device=model.device)
        mask = torch.zeros(len(chunk), width, dtype=torch.long, device=model.device)
        for row, i in enumerate(chunk):
            ids[row, width - len(prompts[i]):] = torch.tensor(list(prompts[i]), device=model.device)
            mask[row, width - len(prompts[i]):] = 1
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        cache, step_ids, generated = None, ids, []
        for _ in range(length):
            o, cache = cached_step(model, cache, input_ids=step_ids, attention_mask=mask, position_ids=pos)
            nxt = o.logits[:, -1].argmax(-1)  # [b]
            generated.append(nxt)
            step_ids, pos = nxt[:, None], pos[:, -1:] + 1
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        yield chunk, torch.stack(generated, 1).tolist()


def target_features(target, ids: Tensor, feature_layers: Sequence[int] | None) -> Tensor:
    """[T, F] fp32 features, on the CPU, of one full forward of the host target over `ids` [T] (no KV cache;
    run on the target's device)."""
    layers = None if feature_layers is None else tuple(feature_layers)
    ids = ids.to(target.lm_head.weight.device)
    return rollout.target_forward(target, ids[None], None, feature_layers=layers).features.float().cpu()


def load_continuations(target_dir: Path, target, prompts: Sequence[Sequence[int]], length: int,
                       feature_layers: Sequence[int] | None, progress: bool = False,
                       place: devices.Placement | None = None) -> tuple[list[Continuation], dict[str, float]]:
    """Cached continuations with features for every prompt; missing entries are built and stored.

    Args:
        target_dir: the target's HF directory (fingerprinted; its HF copy generates missing continuations).
        target: the host target (`eagle_compat.load_host_target(target_dir)`), for the features.
        prompts: prompt token id lists.
        length: greedy tokens after each prompt.
        feature_layers: None for EAGLE-1 features, else the EAGLE-3 drafter's `feature_layer_ids`.
        place: where and in which dtype `target` runs (None: read from `target`); the HF copy that generates
            runs there too, and the entries are kept apart per device type and dtype (`cache_root`).
    Returns:
        the continuations in prompt order, and the build cost in seconds
        ({"generate_s", "features_s", "generated", "featurized"}; zeros when everything was cached).
    """
    from tqdm import tqdm

    weight = target.lm_head.weight
    place = place or devices.Placement(weight.device, weight.dtype)
    if (place.device.type, place.dtype) != (weight.device.type, weight.dtype):
        raise ValueError(f"the host target runs {weight.dtype} on {weight.device}, not {place.tag}")
    root = cache_root(target_dir, place)
    keys = [_entry_key(p, length) for p in prompts]
    kind = _feature_kind(feature_layers)
    cost = {"generate_s": 0.0, "features_s": 0.0, "generated": 0, "featurized": 0}
    ids = {}
    for i, key in enumerate(keys):
        entry = _load(root / f"{key}.ids.safetensors")
        if entry is not None and entry["ids"].numel() == len(prompts[i]) + length:
            ids[i] = entry["ids"]
    missing = [i for i in range(len(prompts)) if i not in ids]
    if missing:
        start = time.perf_counter()
        batches = greedy_batches(hf_model(target_dir, place), [prompts[i] for i in missing], length,
                                 pad_id=int(target.config.pad_token_id or 0), batch_size=GEN_BATCH)
        for chunk, tails in tqdm(batches, desc="greedy continuations", unit="batch", disable=not progress,
                                 total=-(-len(missing) // GEN_BATCH)):
            for j, tail in zip(chunk, tails):  # stored batch by batch: an interrupted build resumes
                i = missing[j]
                ids[i] = torch.tensor(list(prompts[i]) + tail, dtype=torch.long)
                _save({"ids": ids[i]}, root / f"{keys[i]}.ids.safetensors")
        cost.update(generate_s=time.perf_counter() - start, generated=len(missing))
    out = []
    start = time.perf_counter()
    for i in tqdm(range(len(prompts)), desc="target features", unit="prompt", disable=not progress):
        path = root / f"{keys[i]}.{kind}.safetensors"
        entry = _load(path)
        if entry is None or entry["features"].shape[0] != ids[i].numel():
            entry = {"features": target_features(target, ids[i], feature_layers)}
            _save(entry, path)
            cost["featurized"] += 1
        out.append(Continuation(ids[i], len(prompts[i]), entry["features"]))
    if cost["featurized"]:
        cost["features_s"] = time.perf_counter() - start
    return out, cost


def cache_root(target_dir: Path, place: devices.Placement) -> Path:
    """The continuation cache of this target run in `place`: CPU fp32 entries where they always were, every
    other device type and dtype in its own subfolder (`cuda-bf16`, `cpu-bf16`, ...)."""
    return place.cache_folder(assets.cache_dir() / "simulate" / target_fingerprint(target_dir))


def hf_model(target_dir: Path, place: devices.Placement):
    """The target as an HF `AutoModelForCausalLM` in `place.dtype` on `place.device`, eval mode: what
    generates the continuations and, in `ppow eval`, the timed baseline."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(str(target_dir), dtype=place.dtype,
                                                 **devices.direct_load(place.device))
    return model.to(place.device).eval()
