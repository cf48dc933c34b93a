"""Dense rollouts: PPOW windows at every start position, drawn from one drafter unroll along the data.

Under `rollout.verify=data` every row the losses read for a window (tokens 1..k+1) is a state on the data
path: a window's token j is judged on the prefix x_<=s, d_<j, and the losses read it only while d_<j are the
data tokens x_{s+1..s+j-1} (`data_prefix_mask`). So the G members of a start share one drafter state per
depth until they leave the data, and one K-step unroll of the drafter along the data (the caller's
`data_path_logits`, an adapter method: EAGLE-1 `rollout.draft_windows` fed the data tokens, EAGLE-3
`eagle3.ttt_unroll`) holds every distribution a rollout at any start needs. Drawing token j of each member
from depth j's stored distribution, independently, gives the joint law of sequential sampling on every token
the loss reads: token j's draw only matters when d_<j were the data's, and then its state is that one.

Conventions (`rollout.py`): a start s roots the window at x_s; depth j (1-based) drafts x_{s+j}; the target
row that judges it is s+j-1. Here depths are 0-based in tensors: `logits[:, j]` drafts x_{s+j+1}.

Pure tensor functions; the drafter runs in the caller. Tested against `rollout.draft_windows` +
`data_verify.verify_on_data` on the same draws (tests/test_dense.py).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ppow_plugin.method import data_verify, rollout


class DenseWindows(NamedTuple):
    """G windows at each of n starts, drawn from the data path's distributions."""

    tokens: Tensor  # [n, G, K] int64 drafter-vocabulary ids
    logprobs: Tensor  # [n, G, K] log q(d_j) at the rollout temperature, with the unroll's graph
    accept_len: Tensor  # [n, G] int64, verified on the data (`data_verify.verify_on_data`)
    target_draft_lp: Tensor  # [n, G, K] log p_T(d_j | data prefix)
    target_greedy_lp: Tensor  # [n, G, K] max_v log p_T(v | data prefix)
    valid_mask: Tensor  # [n, G, K] bool: a row inside the sequence whose prefix d_<j is the data's


def valid_starts(valid: Tensor) -> Tensor:
    """[n] int64 every position a window may start at: s >= 1 with x_{s+1} assistant text (`valid[s]`).

    Args:
        valid: [T] bool, valid[i] = x_{i+1} is a training position (the trainer's aligned mask).
    """
    starts = torch.nonzero(valid)[:, 0]
    return starts[starts >= 1]


def judged_rows(valid: Tensor, window: int) -> Tensor:
    """[T] bool: the target rows a data-path step can read: every valid position s (a start, and the
    teacher-forced row s-1's target, which is row s) and the rows s+1..s+K-1 that judge its deeper depths.

    Args:
        valid: [T] bool (`valid_starts`); window: K.
    """
    rows = valid.clone()
    for d in range(1, min(window, valid.numel())):
        rows[d:] |= valid[:-d]
    return rows


def data_tokens(input_ids: Tensor, starts: Tensor, window: int) -> tuple[Tensor, Tensor]:
    """The data continuation of each start and where it exists.

    Args:
        input_ids: [T] int64; starts: [n] int64; window: K.
    Returns:
        tokens [n, K] int64, tokens[:, j] = x_{s+j+1} (clamped to the last token past the end);
        exists [n, K] bool, s+j+1 <= T-1.
    """
    last = input_ids.numel() - 1
    pos = starts[:, None] + 1 + torch.arange(window, device=starts.device)  # [n, K]
    return input_ids[pos.clamp(max=last)], pos <= last


def data_prefix_mask(tokens: Tensor, data: Tensor) -> Tensor:
    """[n, G, K] bool: the drafted prefix d_<j of window token j is the data's (True at j = 1).

    Only these rows hold the drafted prefix's state in a data-path unroll and in `data_verify.verify_on_data`'s
    target rows; elsewhere a row is a data-prefix row mislabelled as the draft's. Today's path reads such a
    row k+1 when the k-th accepted token is the target's argmax but not the data token (an fp16 near-tie);
    masking it costs nothing: no later token changes that window's k.

    Args:
        tokens: [n, G, K] drafted ids; data: [n, K] the data's ids in the same vocabulary (-1: none).
    """
    same = tokens == data[:, None]  # [n, G, K]
    ones = torch.ones_like(same[..., :1])
    return torch.cat([ones, same[..., :-1]], -1).long().cumprod(-1).bool()


def rows_on_data(input_ids: Tensor, starts: Tensor, target_tokens: Tensor) -> Tensor:
    """[n, G, K] bool: the rows `data_verify.verify_on_data` holds for these windows (target ids [n, G, K]): inside
    the sequence, with a drafted prefix that is the data's. The losses may read only these."""
    data, exists = data_tokens(input_ids, starts, target_tokens.shape[-1])
    inside = data_verify.on_sequence_mask(input_ids.numel(), starts, *target_tokens.shape[1:])
    return inside & data_prefix_mask(target_tokens, torch.where(exists, data, -1))


def draw(logp: Tensor, group_size: int, generator: torch.Generator | None = None) -> Tensor:
    """G independent draws per (start, depth) from softmax-normalised log-probs, by inverse CDF.

    Args:
        logp: [n, K, V] log-probs (any graph is ignored).
    Returns:
        [n, G, K] int64 ids; zero-probability ids are never drawn (`rollout.sample_categorical`).
    """
    n, K, V = logp.shape
    cdf = logp.detach().float().reshape(n * K, V).exp().cumsum(-1)  # [nK, V]
    u = rollout.uniform((n * K, group_size), generator, logp.device) * cdf[:, -1:]
    ids = torch.searchsorted(cdf, u, right=True).clamp_(max=V - 1)  # [nK, G]
    return ids.reshape(n, K, group_size).transpose(1, 2)


def gather_depths(logp: Tensor, tokens: Tensor) -> Tensor:
    """log q of each member's token at its depth: logp [n, K, V], tokens [n, G, K] -> [n, G, K].

    Gathers on the [n·K, V] rows (no [n, G, K, V] copy, in the forward or the backward).
    """
    n, G, K = tokens.shape
    flat = logp.reshape(n * K, -1).gather(1, tokens.transpose(1, 2).reshape(n * K, G))  # [nK, G]
    return flat.reshape(n, K, G).transpose(1, 2)


def sampled_windows(logits: Tensor, starts: Tensor, input_ids: Tensor, sequence_logits: Tensor, data_ids: Tensor,
                    group_size: int, temperature: float, to_target,
                    generator: torch.Generator | None = None) -> DenseWindows:
    """Draw G windows per start from the data-path unroll and verify them on the data.

    Args:
        logits: [n, K, Vd] drafter logits along the data path (depth j drafts x_{s+j+1}), with grad.
        starts: [n] int64; input_ids: [T] int64; sequence_logits: [T, V] the target's logits over the sequence.
        data_ids: [n, K] the data tokens as drafter-vocabulary ids (-1 where outside it or past the end).
        temperature: the rollout temperature; to_target: drafter ids [..] -> target ids [..].
    Returns:
        DenseWindows; `accept_len` equals `verify_on_data` of the same tokens, and so does every row of
        `valid_mask` (tests/test_dense.py).
    """
    logp = F.log_softmax(logits.float() / temperature, -1)  # [n, K, Vd]
    return score_windows(logp, draw(logp, group_size, generator), starts, input_ids, sequence_logits, data_ids,
                         to_target)


def score_windows(logp: Tensor, tokens: Tensor, starts: Tensor, input_ids: Tensor, sequence_logits: Tensor,
                  data_ids: Tensor, to_target) -> DenseWindows:
    """Log-probs, verification and masks of given windows `tokens` [n, G, K] under the data-path log-probs
    `logp` [n, K, Vd] (the other arguments as `sampled_windows`)."""
    accept, _, tgt_draft, tgt_greedy = data_verify.verify_on_data(input_ids, sequence_logits, starts,
                                                              to_target(tokens), logits=False)
    inside = data_verify.on_sequence_mask(input_ids.numel(), starts, tokens.shape[1], tokens.shape[2])
    valid = inside & data_prefix_mask(tokens, data_ids)
    return DenseWindows(tokens, gather_depths(logp, tokens), accept, tgt_draft, tgt_greedy, valid)


def greedy_accept_len(logits: Tensor, starts: Tensor, input_ids: Tensor, sequence_logits: Tensor,
                      to_target) -> Tensor:
    """[n] k of the drafter's greedy window (argmax at each depth) verified on the data: what T = 0 decoding
    sees of a chain draft from each start."""
    tokens = logits.detach().argmax(-1)[:, None]  # [n, 1, K]
    rows, at = data_verify.judging_rows(input_ids.numel(), starts, tokens.shape[-1])
    argmax = sequence_logits[rows].argmax(-1)[at]  # [n, K]: the target's argmax, once per distinct row
    return data_verify.accept_on_data(input_ids, argmax, starts, to_target(tokens))[:, 0]


def row_weights(read: Tensor) -> Tensor:
    """Per (start, depth) count of members whose row the loss reads: [n, G, K] bool -> [n, K] float.

    Members that share a data-path row share its drafter and target distributions, so a mean over the
    n·G·K read rows equals a mean over the n·K distinct rows weighted by these counts.
    """
    return read.sum(1).float()
