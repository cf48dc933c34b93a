"""The exact expected window reward on the data path (`loss.estimator: expected`): no sampling.

Under `rollout.verify=data` a window from start s is accepted at depth j iff its token d_j is the target's
argmax g_j after the prefix, and it goes on to depth j+1 only while d_j is also the data token x_j
(`data_verify.verify_on_data`); every state on the way is the data path's, whose drafter distribution q_j the
data-path unroll holds (`dense.py`). So, with q at the rollout temperature,

    P(k >= j) = q_j(g_j) · Π_{i<j} q_i(x_i)·1[x_i = g_i]        (= Π_{i<=j} q_i(x_i) on the target's own answers)
    E[R_speedup] = Σ_j P(k >= j) · (R(j) − R(j−1)),   R(j) = w_s · min(j, cap) / (min(j, cap)·γ + 1)
    E[R_dist]    = w_p · η · Σ_{v ≠ g_1, Δ_1(v) < ε} q_1(v),   Δ_1(v) = max log p_T − log p_T(v) at row s

(R_dist is paid only at k = 0, i.e. d_1 ≠ g_1, on Δ over the first position: `reward.delta_positions: 1`,
which `Config` requires under `verify: data`.) This is the expectation of exactly the reward the sampled
estimator draws (`rewards.joint_reward` of `verify_on_data`'s k), so maximising it is the same objective:
its gradient is the G → ∞ limit of the sampled policy gradient with `advantage_scale: none` and
`ratio_mode: token` (tests/test_expected.py checks the limit by Monte Carlo). It is ours, not the paper's.

Pure tensor functions.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from ppow_plugin.method import rewards


class ExpectedReward(NamedTuple):
    total: Tensor  # [n] E[R] per start, with the unroll's graph
    speedup: Tensor  # [n] E[w_s · R_speedup]
    proximity: Tensor  # [n] E[w_p · R_dist]
    reach: Tensor  # [n, K] P(k >= j), j = 1..K (with graph)
    read: Tensor  # [n, K] detached P(the losses read row j and it is a data-prefix row): the KL weights


def _prob_of(logp: Tensor, *ids: Tensor) -> list[Tensor]:
    """q(ids) for each of `ids` ([n, K] each; -1 = an id q cannot draw: probability 0) from logp [n, K, V], read
    with one gather (one [n, K, V] gradient buffer in the backward, not one per id tensor)."""
    index = torch.stack(ids, -1)  # [n, K, m]
    q = logp.gather(-1, index.clamp(min=0)).exp()
    return list(torch.where(index >= 0, q, torch.zeros_like(q)).unbind(-1))


def expected_reward(logp: Tensor, data_ids: Tensor, greedy_ids: Tensor, near_first: Tensor, gamma: float,
                    eta: float, accept_cap: int | None = None, speedup_weight: float = 1.0,
                    proximity_weight: float = 1.0, first: tuple[Tensor, Tensor, Tensor] | None = None
                    ) -> ExpectedReward:
    """E[R] of a window from each start, under greedy verification on the data.

    Args:
        logp: [n, K, V] drafter log-probs at the rollout temperature along the data path (depth j drafts
            x_{s+j+1}, 0-based), with grad.
        data_ids: [n, K] int64 the data tokens in the drafter's vocabulary; -1 where outside it or past the end.
        greedy_ids: [n, K] int64 the target's argmax at each depth's row, in the drafter's vocabulary; -1 where
            outside it or where the row lies past the sequence's end.
        near_first: [n, V] bool, Δ_1(v) < ε at the first depth (R_dist's set).
        gamma, eta: as `rewards.joint_reward`; accept_cap: the most tokens k counts (None = K).
        first: None, or (first_logp [n, V1], greedy_first [n], data_first [n]): depth 1 read from its own
            vocabulary (`loss.deep_vocab_rows`: `logp` and the ids hold a reduced vocabulary at depths >= 2, where
            `logp[:, 0]` and the ids' column 0 are then not read; `near_first` is over V1).
    Returns:
        ExpectedReward.
    """
    K = logp.shape[1]
    cap = K if accept_cap is None else min(accept_cap, K)
    q_greedy, q_data = _prob_of(logp, greedy_ids, data_ids)  # [n, K]; q_greedy = P(d_j accepted | the data prefix)
    same = data_ids == greedy_ids
    first_q, greedy_first = logp[:, 0].exp(), greedy_ids[:, :1]  # [n, V], [n, 1]
    if first is not None:
        first_logp, greedy_first, data_first = first[0], first[1][:, None], first[2][:, None]
        q_greedy_1, q_data_1 = _prob_of(first_logp[:, None], greedy_first, data_first)
        q_greedy, q_data = torch.cat([q_greedy_1, q_greedy[:, 1:]], 1), torch.cat([q_data_1, q_data[:, 1:]], 1)
        same = torch.cat([data_first == greedy_first, same[:, 1:]], 1)
        first_q = first_logp.exp()
    carry = q_data * same  # accepted and on the data: the window goes on
    ones = torch.ones_like(carry[:, :1])
    prefix = torch.cat([ones, carry[:, :-1]], 1).cumprod(1)  # [n, K] P(d_<j accepted and the data's)
    reach = prefix * q_greedy  # P(k >= j)
    depth = torch.arange(K + 1, device=logp.device).clamp(max=cap)
    r = speedup_weight * rewards.speedup_reward(depth, gamma)  # [K+1] R(min(j, cap))
    speedup = (reach * (r[1:] - r[:-1])).sum(1)
    not_greedy = torch.arange(first_q.shape[-1], device=logp.device)[None] != greedy_first
    proximity = proximity_weight * eta * (first_q * (near_first & not_greedy)).sum(1)
    read = prefix.detach() * (torch.arange(K, device=logp.device) < cap)  # rows 2..min(k+1, cap)
    read[:, 0] = 1.0  # the first row: always (k + 1 >= 1, and R_dist's Δ at k = 0)
    return ExpectedReward(speedup + proximity, speedup, proximity, reach, read)


def near_first_mask(target_logits: Tensor, vocab_ids: Tensor, epsilon: float) -> Tensor:
    """R_dist's set at the first depth: the drafter ids v whose Δ_1(v) = max log p_T − log p_T(v) < ε.

    Args:
        target_logits: [n, V] the target's logits at each start's row (full vocabulary).
        vocab_ids: [Vd] int64 the target id of each drafter id (EAGLE-1: arange(V)).
        epsilon: > 0, nats.
    Returns:
        [n, Vd] bool.
    """
    logp = torch.log_softmax(target_logits.float(), -1)
    delta = logp.max(-1, keepdim=True).values - logp[:, vocab_ids]
    return delta.clamp_min(0.0) < epsilon
