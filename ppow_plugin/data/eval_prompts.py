"""What `ppow eval` / `ppow compare` measure on: benchmark prompt sets and users' own JSONL prompt files.

    prompts = load_prompts(["mt_bench", "humaneval"], num_prompts=80)
    prompts = read_prompt_file("my_traffic.jsonl")     # {"turns": [...]} or {"prompt": "..."} per line

A prompt is an `EvalPrompt` (benchmark name, id, user turns). Benchmarks: MT-Bench (first turns, or both
with `both_turns`), HumanEval (the problem prompt as the user message), held-out ShareGPT first turns.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

from ppow_plugin.data import datasets
from ppow_plugin.errors import UserError


class EvalPrompt(NamedTuple):
    benchmark: str
    prompt_id: str
    turns: tuple[str, ...]  # user turns answered in order (several only for MT-Bench --both-turns)


def _mt_bench(n: int, both_turns: bool) -> list[EvalPrompt]:
    return [EvalPrompt("mt_bench", str(q.question_id), tuple(q.turns) if both_turns else tuple(q.turns[:1]))
            for q in datasets.load_mt_bench()[:n]]


def _humaneval(n: int, both_turns: bool) -> list[EvalPrompt]:
    return [EvalPrompt("humaneval", p.task_id, (p.prompt,)) for p in datasets.load_humaneval()[:n]]


def _sharegpt(n: int, both_turns: bool) -> list[EvalPrompt]:
    """First user turns of held-out ShareGPT conversations (`datasets.split_of`, default fraction), file order."""
    prompts = []
    for conv in datasets.load_sharegpt():
        if len(prompts) == n:
            break
        if datasets.split_of(conv.id) == "heldout":
            first = next(m.content for m in conv.messages if m.role == "user")
            prompts.append(EvalPrompt("sharegpt", conv.id, (first,)))
    return prompts


BENCHMARKS: dict[str, Callable[[int, bool], list[EvalPrompt]]] = {
    "mt_bench": _mt_bench, "humaneval": _humaneval, "sharegpt": _sharegpt}
ALL_BENCHMARKS = ",".join(BENCHMARKS)


def resolve_benchmarks(spec: str | Sequence[str]) -> list[str]:
    """"mt_bench,humaneval" -> ["mt_bench", "humaneval"] (order kept, duplicates dropped).

    Raises:
        UserError: an unknown name (with the nearest known one), or no name at all.
    """
    names = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    if not names:
        raise UserError(f"no benchmark given; pass --benchmarks with some of {', '.join(BENCHMARKS)}")
    for name in names:
        if name not in BENCHMARKS:
            near = difflib.get_close_matches(name, list(BENCHMARKS), n=1, cutoff=0.4)
            hint = f"did you mean {near[0]}?" if near else f"choose from {', '.join(BENCHMARKS)}"
            raise UserError(f"unknown benchmark {name!r}; {hint}")
    return list(dict.fromkeys(names))


def load_prompts(benchmarks: Sequence[str], num_prompts: int, both_turns: bool = False,
                 flag: str = "--num-prompts ") -> list[EvalPrompt]:
    """The first `num_prompts` prompts of each benchmark, in benchmark order.

    flag: how the user set num_prompts, for the messages ("--num-prompts ", or "eval.every_prompts=" for
        training's τ probe).
    Raises:
        UserError: num_prompts < 1, more than a benchmark has (never capped silently), or the set is empty.
    """
    if num_prompts < 1:
        raise UserError(f"{flag}{num_prompts} selects no prompt; pass a positive number")
    chosen = {name: BENCHMARKS[name](num_prompts, both_turns) for name in resolve_benchmarks(benchmarks)}
    short = {name: len(got) for name, got in chosen.items() if len(got) < num_prompts}
    fixes = [f"pass {flag}{min(short.values())} or fewer"] if short and min(short.values()) > 0 else []
    fixes += [f"leave out {', '.join(short)}"] if short and len(short) < len(chosen) else []
    if fixes:
        have = ", ".join(f"{name} has {n}" for name, n in short.items())
        raise UserError(f"{flag}{num_prompts} is more prompts than there are ({have}): {' or '.join(fixes)}")
    prompts = [p for got in chosen.values() for p in got]
    if not prompts:
        raise UserError(f"benchmarks {', '.join(benchmarks)} gave no prompt; check the datasets (ppow doctor)")
    return prompts


def read_prompt_file(path: str | Path, both_turns: bool = False) -> list[EvalPrompt]:
    """Prompts from a JSONL file: FastChat/EAGLE question lines (`{"turns": [...]}`, optional
    `question_id`) or `{"prompt": "..."}` lines (optional `id`). The benchmark name is the file's stem.

    Args:
        both_turns: keep every turn of a `turns` line (else the first only, like MT-Bench).
    Raises:
        UserError: a missing/empty file, or a line that is not a JSON object with a non-empty "turns" list
            of strings or a "prompt" string (the message names the line number).
    """
    p = Path(path)
    if not p.exists():
        raise UserError(f"--prompts {p} does not exist; pass a JSONL file with one {{\"prompt\": ...}} per line")
    prompts, first_line = [], {}
    for n, obj in datasets.jsonl_records(p, "--prompts ", 'with one {"prompt": ...} per line'):
        turns = obj.get("turns") if isinstance(obj, dict) else None
        text = obj.get("prompt") if isinstance(obj, dict) else None
        if isinstance(turns, list) and turns and all(isinstance(t, str) and t for t in turns):
            pid = str(obj.get("question_id", obj.get("id", n)))
            prompts.append(EvalPrompt(p.stem, pid, tuple(turns) if both_turns else tuple(turns[:1])))
        elif isinstance(text, str) and text:
            prompts.append(EvalPrompt(p.stem, str(obj.get("id", n)), (text,)))
        else:
            raise UserError(f'{p}:{n}: expected {{"turns": ["..."]}} or {{"prompt": "..."}} with non-empty text')
        pid = prompts[-1].prompt_id
        if pid in first_line:  # records and the paired statistics of `compare` match prompts by id
            raise UserError(f"{p}:{n}: id {pid!r} is also the id of line {first_line[pid]}; give every prompt "
                            "its own id (or leave the ids out: the line number is used)")
        first_line[pid] = n
    if not prompts:
        raise UserError(f"--prompts {p} has no prompt; write one JSON object per line")
    return prompts
