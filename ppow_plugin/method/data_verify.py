"""Greedy verification read off the target's pass over the sequence, without a tree (`rollout.verify=data`).

    accept, target_logits, draft_lp, greedy_lp = data_verify.verify_on_data(ids, sequence_logits, starts, tokens)

On data the target generated greedily, a window's tokens are accepted while they are the target's argmax after
the data prefix, whose logits the target's pass over the sequence already holds (row i predicts x_{i+1}); both
PPOW paths use it under `rollout.verify: data` (`rollout.verify_windows` is the tree verification it equals there,
tests/test_rollout.py). Conventions as `rollout.py`: a window from s drafts x_{s+1..s+K}; row s+j-1 judges token j.
Pure tensor functions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def verify_on_data(input_ids: Tensor, sequence_logits: Tensor, starts: Tensor, draft_tokens: Tensor,
                   logits: bool = True):
    """Greedy verification read off the target's pass over the sequence: no tree forward (`rollout.verify=data`).

    A drafted token d_j is accepted iff it is the target's argmax given the prefix and d_<j. While every
    accepted token is also the data token, that prefix is the data's, whose logits the sequence pass already
    holds (row s+j-1 predicts x_{s+j}). So wherever the accepted tokens are the data's, this equals
    `verify_windows(..., "greedy", ...)`: on data the target generated greedily, every window. Elsewhere a
    window stops after the first accepted token that the data does not continue with (or at the end of the
    sequence), so k is never over-counted. The target's log-softmax and argmax are computed once per distinct
    sequence row (windows from nearby starts share rows), not per (start, depth).

    Args:
        input_ids: [T] int64 sequence; sequence_logits: [T, V] the target's logits over it (row i predicts
            x_{i+1}); starts: [n] int64; draft_tokens: [n, G, K] target ids.
        logits: False: no target logits returned (None), for callers that read only the other three.
    Returns:
        as `verify_windows`: accept_len [n, G], target_logits [n, G, K, V] (a broadcast view, or None), target
        log-probs of the drafts [n, G, K], greedy target log-probs [n, G, K]. Rows past position k + 1 of a window
        hold the data path's logits, not the drafted prefix's: the losses may read rows 1..k+1 only (`config`
        checks), and rows past the sequence's end are not window positions (`on_sequence_mask`).
    """
    n, G, K = draft_tokens.shape
    rows, at = judging_rows(input_ids.numel(), starts, K)
    row_logits = sequence_logits[rows].float()  # [u, V]
    accept = accept_on_data(input_ids, row_logits.argmax(-1)[at], starts, draft_tokens)
    row_logp = F.log_softmax(row_logits, -1)  # [u, V]
    tgt_draft = row_logp[at[:, None].expand(n, G, K), draft_tokens]  # [n, G, K]
    tgt_greedy = row_logp.max(-1).values[at][:, None].expand(n, G, K)
    window_logits = row_logits[at][:, None].expand(n, G, K, -1) if logits else None
    return accept, window_logits, tgt_draft, tgt_greedy


def judging_rows(length: int, starts: Tensor, window: int) -> tuple[Tensor, Tensor]:
    """The sequence rows that judge windows from `starts`: (distinct rows [u] ascending, [n, K] index into them of
    row s+j, clamped to the last row; rows past the end are never accepted, `accept_on_data`)."""
    pos = (starts[:, None] + torch.arange(window, device=starts.device)).clamp(max=length - 1)  # [n, K]
    return torch.unique(pos, return_inverse=True)


def accept_on_data(input_ids: Tensor, target_argmax: Tensor, starts: Tensor, draft_tokens: Tensor) -> Tensor:
    """`verify_on_data`'s accepted lengths [n, G] from the target's argmax at each window row, target_argmax [n, K]
    (row s+j, clamped to the last row); draft_tokens [n, G, K] target ids."""
    K = draft_tokens.shape[-1]
    last = input_ids.numel() - 1
    pos = starts[:, None] + torch.arange(K, device=starts.device)  # [n, K]: row predicting window token j
    data = input_ids[(pos + 1).clamp(max=last)][:, None]  # [n, 1, K]: the data token at each window position
    is_data = (draft_tokens == data) & (pos + 1 <= last)[:, None]  # [n, G, K]
    accepted = draft_tokens == target_argmax[:, None]  # [n, G, K]
    on_data = torch.cat([torch.ones_like(accepted[..., :1]), is_data[..., :-1]], -1)  # d_<j is the data's prefix
    return (accepted & on_data).long().cumprod(-1).sum(-1)  # [n, G]


def on_sequence_mask(length: int, starts: Tensor, group_size: int, window: int) -> Tensor:
    """[n, G, K] bool: window positions whose target row lies inside a sequence of `length` tokens.

    `verify_on_data` has the target's logits only there; positions past the end are no window positions.
    """
    pos = starts[:, None] + torch.arange(window, device=starts.device)  # [n, K]
    return (pos <= length - 1)[:, None].expand(-1, group_size, -1)
