"""Chat tokenization and training iteration: conversations from `datasets` become training samples.

Training text goes through the target tokenizer's *own* chat template, and the loss mask is found by
rendering growing message prefixes, so no role-header string is hard-coded here.

Usage (the training stream that reads these is `training_set`):
    sample = tokenize_conversation(tokenizer, conv, max_len)   # TokenizedSample(id, input_ids [T], loss_mask [T])

Where we depart from EAGLE's data preparation (`ge_data`), beyond what `datasets` lists: every training
conversation is tokenized once at start (`scan_conversations`): ones whose loss mask is empty within
max_len, or on which the chat template fails, are dropped and counted in a `DataReport` instead of failing
the run; only when none is left is it an error.
"""

import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from ppow_plugin.data.datasets import Conversation, Message
from ppow_plugin.host import integrity
from ppow_plugin.host.assets import cache_dir
from ppow_plugin.errors import UserError

log = logging.getLogger(__name__)


class TokenizedSample(NamedTuple):
    conversation_id: str
    input_ids: Tensor  # [T] int64, T <= max_len
    loss_mask: Tensor  # [T] bool, True = assistant content or its end-of-turn token


class Batch(NamedTuple):
    input_ids: Tensor  # [B, T] int64, right-padded with the pad id
    loss_mask: Tensor  # [B, T] bool, False on padding
    attention_mask: Tensor  # [B, T] bool, True = real token


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
            blob = integrity.read_json(path)
            return [convs[i] for i in blob["used"]], DataReport(**blob["report"])
        except (integrity.Damaged, KeyError, TypeError, IndexError) as exc:  # scan again and overwrite
            integrity.warn_rebuilding("data-scan cache entry", path, exc)
    used, report = scan_conversations(convs, tokenizer, max_len, progress)
    kept = {id(c) for c in used}
    blob = {"used": [i for i, c in enumerate(convs) if id(c) in kept], "report": report._asdict()}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        integrity.write_json(path, blob)  # atomic (concurrent ranks write the same content), with its digest
    except OSError as exc:  # a cache is an optimisation: never fail a run over it
        log.warning("could not cache the data scan in %s: %s", path, exc)
    return used, report


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


def response_sample(conversation_id: str, ids, prompt_len: int, max_len: int) -> TokenizedSample:
    """One generated sequence as training sees it: ids cut to max_len, loss mask = the response. This is also
    the address of its feature-cache entry (`gen_features.store` writes there)."""
    x = torch.from_numpy(np.asarray(ids[:max_len]).astype(np.int64))
    return TokenizedSample(conversation_id, x, torch.arange(len(x)) >= prompt_len)
