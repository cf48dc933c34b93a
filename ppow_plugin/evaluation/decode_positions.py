"""How many positions one evaluation's target KV cache and rotary tables hold, decided once before decoding.

    n = kv_positions(turn_lengths(tokenizer, prompts, 128), 128, decode_margin(tree), context)
    eagle_compat.load_ea_model(..., positions=n)  /  eagle_compat.new_kv_cache(target, n)

The host preallocates its cache for the model's full context (Llama-3.1: 131 072 positions, ~17 GB in bf16 at
8B); an evaluation reaches only its longest prompt + max_new_tokens + the last cycle's tree and overshoot.
Training sizes its cache the same way (`training/plan.target_positions`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ppow_plugin.data import samples
from ppow_plugin.data.eval_prompts import EvalPrompt
from ppow_plugin.evaluation import tree_decode

MARGIN_TOKENS = 64  # room past prompt + max_new_tokens for the last cycle's tree (26 tokens) and overshoot
ANSWER_BOUND = 2  # a later turn's earlier answers, re-tokenized from text, as at most 2x their max_new_tokens


def format_turns(tokenizer, turns: Sequence[str], answers: Sequence[str]) -> torch.Tensor:
    """Prompt ids [1, P] of a conversation's next turn: the chat template over `turns` with the model's
    earlier `answers` (one fewer than the turns, or empty strings for a length bound)."""
    if len(turns) == 1:
        ids = samples.format_prompt(tokenizer, turns[0])
    else:
        messages = []
        for i, turn in enumerate(turns):
            messages.append({"role": "user", "content": turn})
            if i < len(answers):
                messages.append({"role": "assistant", "content": answers[i]})
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return torch.tensor([ids], dtype=torch.long)  # [1, P]


def decode_margin(tree=None) -> int:
    """Positions past prompt + max_new_tokens one decode may use: EAGLE-1 (`tree` None) MARGIN_TOKENS (the host
    tree's 26 nodes, overshoot <= 6); an EAGLE-3 `Eagle3Tree` depth + total_tokens + 2
    (`tree_decode.positions_needed`)."""
    return MARGIN_TOKENS if tree is None else tree_decode.positions_needed(0, 0, tree.depth, tree.total_tokens)


def kv_positions(turn_lengths: Sequence[int], max_new_tokens: int, margin: int, context: int) -> int:
    """KV-cache (and rotary-table) positions of one evaluation, decided once before decoding: the longest
    turn that fits the context + max_new_tokens + margin, at most the context (what the host allocates by itself).

    turn_lengths: prompt tokens of every turn to decode (later turns: an upper bound, `turn_lengths`).
    """
    fits = [n for n in turn_lengths if n + max_new_tokens + margin <= context]
    return min(context, max(fits, default=0) + max_new_tokens + margin)


def turn_lengths(tokenizer, prompts: Sequence[EvalPrompt], max_new_tokens: int) -> list[int]:
    """Prompt tokens of every turn `evaluate._decode_prompt` can format: turn t (0-based) with empty earlier answers,
    plus t answers of ANSWER_BOUND * max_new_tokens tokens each (they are re-tokenized from decoded text)."""
    return [format_turns(tokenizer, p.turns[:t + 1], [""] * t).shape[1] + t * ANSWER_BOUND * max_new_tokens
            for p in prompts for t in range(len(p.turns))]
