"""EAGLE-3's reduced draft vocabulary: which target ids the drafter's head covers, and the maps between them.

    d2t, t2d = build_vocab_map(token_counts, draft_vocab_size)   # [Vd] offsets, [V] membership
    target_ids = draft_to_target_ids(draft_ids, d2t)
    soft_labels = map_target_probs_to_draft(target_logits, t2d)   # [..., Vd]

Draft order is ascending target id, as in the published EAGLE-3 checkpoints (`d2t`/`t2d` buffers).
"""

from __future__ import annotations

import torch
from torch import Tensor


def draft_to_target_ids(draft_ids: Tensor, d2t: Tensor) -> Tensor:
    """Map draft-vocabulary ids to target ids: target = draft + d2t[draft]. Any shape, int64."""
    return draft_ids + d2t[draft_ids]


def build_vocab_map(token_counts: Tensor, draft_vocab_size: int) -> tuple[Tensor, Tensor]:
    """The reduced draft vocabulary: the `draft_vocab_size` most frequent target ids, in ascending order.

    Ties in count keep the lower target id (stable sort), so the map is deterministic.

    Args:
        token_counts: [V] counts of target ids (e.g. over loss-masked training tokens).
        draft_vocab_size: Vd, 1 <= Vd <= V.
    Returns:
        d2t: [Vd] int64 with used[i] = i + d2t[i]; t2d: [V] bool, True for ids in the draft vocabulary.
    """
    vocab = token_counts.numel()
    if not 1 <= draft_vocab_size <= vocab:
        raise ValueError(f"draft_vocab_size ({draft_vocab_size}) must be in [1, {vocab}]")
    order = torch.sort(-token_counts.double(), stable=True).indices
    used = order[:draft_vocab_size].sort().values.long()  # [Vd] ascending target ids
    d2t = used - torch.arange(draft_vocab_size, dtype=torch.long, device=used.device)
    t2d = torch.zeros(vocab, dtype=torch.bool, device=used.device)
    t2d[used] = True
    return d2t, t2d


def map_target_probs_to_draft(target_logits: Tensor, t2d: Tensor, renormalize: bool = True) -> Tensor:
    """Target distribution over the draft vocabulary (soft labels for TTT).

    Args:
        target_logits: [..., V] target logits.
        t2d: [V] bool draft-vocabulary membership (draft order = ascending target id).
        renormalize: True (EAGLE-3): softmax of the restricted logits, sums to 1. False: the full-vocab
            probabilities of the draft ids, summing to the draft vocabulary's mass (<= 1).
    Returns:
        [..., Vd] float32 probabilities.
    """
    logits = target_logits.float()
    if renormalize:
        return torch.softmax(logits[..., t2d], dim=-1)
    return torch.softmax(logits, dim=-1)[..., t2d]


def draft_label_mask(target_logits: Tensor, t2d: Tensor) -> Tensor:
    """[...] bool: the target's argmax is in the draft vocabulary (EAGLE-3 drops other positions from TTT)."""
    return t2d[target_logits.argmax(-1)]
