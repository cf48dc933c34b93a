"""The files of a `ppow data generate` dir, verified, and reading them for training (`generate` writes them).

    shards = read_shards(out)                  # every shard, each checked against its recorded sha256
    samples, report = load_generated(out, max_len=512, heldout_fraction=0.02)   # what sft/train read
    check_generated(out)                       # what `ppow validate` checks (training/preflight.py)

Layout (`generate`): provenance.json (settings, target fingerprint, totals; its own sha256) and
shard-NNNNN.npz (token ids, offsets, prompt lengths, prompt index, conversation ids, wall time; the sha256
of its arrays). A damaged shard or provenance is refused with one error line naming the file and the fix
(docs/reliability.md, "Files read back").
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from ppow_plugin.data.datasets import split_of
from ppow_plugin.data.samples import DataReport, TokenizedSample, response_sample
from ppow_plugin.errors import UserError
from ppow_plugin.host import integrity

PROVENANCE = "provenance.json"


class Shard(NamedTuple):
    """One shard's generations (all arrays over its n prompts)."""

    ids: np.ndarray  # [sum of lengths] uint16 | int32: prompt + response tokens, concatenated
    offsets: np.ndarray  # [n+1] int64: sequence i is ids[offsets[i]:offsets[i+1]]
    prompt_lens: np.ndarray  # [n] int32: tokens before the response
    index: np.ndarray  # [n] int64: position in the eligible prompt order
    conversation_ids: np.ndarray  # [n] str
    wall_s: float


# --- shard files ---------------------------------------------------------------------------------


def _shard_path(out: Path, k: int) -> Path:
    return out / f"shard-{k:05d}.npz"


def shards_to_write(out: Path, n_prompts: int, shard_size: int) -> list[int]:
    """The shards a run over the first `n_prompts` eligible prompts still has to write: those absent, and
    those holding fewer prompts than they must now (the last shard of a smaller earlier run: a larger
    --num-prompts completes it, so extending a run leaves no gap)."""
    todo = []
    for k in range(-(-n_prompts // shard_size)):
        path = _shard_path(out, k)
        want = min(shard_size, n_prompts - k * shard_size)
        if not path.is_file() or len(read_shard(path).index) < want:
            todo.append(k)
    return todo


def write_shard(out: Path, k: int, shard: Shard) -> Path:
    """Write shard k atomically (temporary file, then rename) with its content digest (`integrity`)."""
    return integrity.save_npz(_shard_path(out, k), {
        "ids": shard.ids, "offsets": shard.offsets, "prompt_lens": shard.prompt_lens, "index": shard.index,
        "conversation_ids": shard.conversation_ids, "wall_s": np.float64(shard.wall_s)})


def read_shard(path: Path) -> Shard:
    """One shard, verified (its recorded sha256; older shards: the zip CRC of every array).

    Raises:
        UserError: the file is damaged (names it and the fix).
    """
    try:
        z = integrity.load_npz(path)
        return Shard(z["ids"], z["offsets"], z["prompt_lens"], z["index"], z["conversation_ids"], float(z["wall_s"]))
    except (integrity.Damaged, KeyError) as exc:
        problem = exc if isinstance(exc, integrity.Damaged) else f"no array {exc}"
        raise UserError(f"generated shard {path} is damaged ({problem}); delete it and rerun the `ppow data "
                        f"generate` that made {path.parent} (its settings are in {PROVENANCE}) to regenerate "
                        "it") from None


def read_shards(out: str | Path) -> list[Shard]:
    """All complete shards of a generation dir, in shard order, each verified (`read_shard`)."""
    return [read_shard(path) for path in sorted(Path(out).glob("shard-?????.npz"))]


def totals(out: str | Path) -> dict:
    """Prompts, tokens and wall time summed over the complete shards."""
    shards = read_shards(out)
    prompts = sum(len(s.index) for s in shards)
    prompt_tokens = sum(int(s.prompt_lens.sum()) for s in shards)
    tokens = sum(int(s.offsets[-1]) for s in shards)
    wall = sum(s.wall_s for s in shards)
    return {"shards": len(shards), "prompts": prompts, "prompt_tokens": prompt_tokens,
            "response_tokens": tokens - prompt_tokens, "wall_s": round(wall, 1),
            "response_tokens_per_s": (tokens - prompt_tokens) / wall if wall else 0.0,
            "torch_threads": torch.get_num_threads()}


def read_provenance(out: str | Path) -> dict:
    """A generation dir's provenance.json, verified (its recorded sha256, when it has one).

    Raises:
        UserError: missing or damaged (names the file and the fix; the shards are not reused without it).
    """
    path = Path(out) / PROVENANCE
    try:
        return integrity.read_json(path)
    except FileNotFoundError:
        raise UserError(f"{out} has no {PROVENANCE}: it is not a `ppow data generate` output dir") from None
    except integrity.Damaged as exc:
        raise UserError(f"{path} is damaged ({exc}); it records the settings its shards were made with, so they "
                        f"cannot be reused or checked: restore the file, or delete {out} and generate "
                        "again") from None


def write_provenance(out: Path, blob: dict) -> None:
    """provenance.json with its own sha256 (atomic)."""
    integrity.write_json(Path(out) / PROVENANCE, blob)


# --- reading for training ------------------------------------------------------------------------


def check_generated(out: str | Path | None, key: str = "data.path") -> list[Shard]:
    """The verified shards of a `ppow data generate` dir (what `ppow validate` and training both read).

    Raises:
        UserError: not a generation dir (a drafter folder also holds a provenance.json), no shard yet, or a
            damaged provenance.json or shard (naming the file and the fix).
    """
    if out is None or not (Path(out) / PROVENANCE).is_file():
        raise UserError(f"data.dataset=generated needs {key}=<a `ppow data generate` output dir>, got {out}")
    prov = read_provenance(out)
    if not {"settings", "target_sha256", "source"} <= prov.keys():
        raise UserError(f"{key}={out} is not a `ppow data generate` output dir (its {PROVENANCE} records no "
                        "generation settings); pass the --out of `ppow data generate`")
    shards = read_shards(out)
    if not shards:
        raise UserError(f"{key}={out} holds no generated shard yet; run (or resume) the `ppow data generate` "
                        "that writes there")
    return shards



class GeneratedSamples(Sequence[TokenizedSample]):
    """Generated conversations as `TokenizedSample`s: prompt tokens masked out, the response (with its
    end-of-turn token when it has one) in the loss mask, cut to `max_len` tokens."""

    def __init__(self, ids: list[np.ndarray], prompt_lens: list[int], conversation_ids: list[str], max_len: int):
        self.ids, self.prompt_lens, self.conversation_ids, self.max_len = ids, prompt_lens, conversation_ids, max_len

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i):  # int -> TokenizedSample
        return response_sample(self.conversation_ids[i], self.ids[i], self.prompt_lens[i], self.max_len)


def load_generated(out: str | Path | None, max_len: int, heldout_fraction: float, limit: int | None = None
                   ) -> tuple[GeneratedSamples, DataReport]:
    """The generated samples of a `generate` dir, for `data.dataset=generated` (`data.path` = the dir).

    Samples of conversations in the held-out split under `heldout_fraction` are dropped (they can only
    be there if the data was generated with a smaller held-out fraction). `limit` (data.num_conversations)
    keeps the first N sequences in shard order, so a training run can resume on the same data while the
    generation goes on appending shards.

    Raises:
        UserError: no dir, no shard, or no response token within max_len.
    """
    ids, prompt_lens, conv_ids, truncated, empty, leaked = [], [], [], 0, 0, 0
    for s in check_generated(out):
        for i in range(len(s.index)):
            if limit is not None and len(ids) + empty + leaked >= limit:
                break
            if split_of(str(s.conversation_ids[i]), heldout_fraction) != "train":
                leaked += 1
                continue
            seq = s.ids[s.offsets[i]:s.offsets[i + 1]]
            truncated += len(seq) > max_len
            if int(s.prompt_lens[i]) >= min(len(seq), max_len):
                empty += 1
                continue
            ids.append(seq)
            prompt_lens.append(int(s.prompt_lens[i]))
            conv_ids.append(str(s.conversation_ids[i]))
    total = len(ids) + empty + leaked
    if not ids:
        raise UserError(f"{out} holds no generated response within data.max_len={max_len} ({total} sequences); "
                        "run `ppow data generate` or raise data.max_len")
    report = DataReport(total, len(ids), truncated, empty, 0, {"heldout_split": leaked} if leaked else {}, max_len)
    return GeneratedSamples(ids, prompt_lens, conv_ids, max_len), report
