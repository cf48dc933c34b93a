"""The greedy window from each start and its reward: what T = 0 decoding sees of a chain draft.

    g = greedy_window.greedy_windows(adapter, drafter, target, kv, dpass, ids, sequence_logits, starts, cfg, gamma)

Used twice (issue 27): the current drafter's greedy k at the step's starts, logged beside the sampled reward
(`greedy_accept_len` in metrics.jsonl; the dense path reads it off its unroll instead, `dense.greedy_accept_len`),
and the frozen reference drafter's greedy-window reward, the baseline of `loss.baseline: reference` (GTO, arXiv
2509.22134). The window is the drafter's argmax at every depth, drafted as the rollouts are
(`adapter.draft_windows`, one member) and verified as they are (`rollout.verify`; a tree verification is run
greedy, the T = 0 protocol), then rewarded by the step's reward (`rewards.window_rewards`). No gradient.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import NamedTuple

import torch
from torch import Tensor

from ppow_plugin.method import data_verify, dense, rewards, rollout


class GreedyWindows(NamedTuple):
    accept_len: Tensor  # [n] int64 k as decoding counts it (reward.accept_cap)
    reward: Tensor  # [n] float the window's reward (rewards.joint_reward)


def greedy_windows(adapter, drafter, target, kv, dpass: rollout.DraftPass, ids: Tensor, sequence_logits: Tensor,
                   starts: Tensor, cfg, gamma: float) -> GreedyWindows:
    """The greedy window of `drafter` (teacher-forced pass `dpass`) from each of `starts` [n], verified and rewarded.

    Args:
        kv: the target's KV cache holding `ids` (tree verification; unused under `rollout.verify: data`);
        ids: [T]; sequence_logits: [T, V] the target's logits over the sequence.
    """
    r = cfg.rollout
    one = SimpleNamespace(group_size=1, window=r.window, temperature=r.temperature, greedy_members=1)
    with torch.no_grad():  # every member greedy: the generator's draws are discarded (its own, not the trainer's)
        tokens, _, _ = adapter.draft_windows(drafter, target, dpass, starts, one,
                                             generator=torch.Generator().manual_seed(0))
        target_ids = adapter.to_target_ids(drafter, tokens)  # [n, 1, K]
        if r.verify == "data":
            accept, _, draft_lp, greedy_lp = data_verify.verify_on_data(ids, sequence_logits, starts, target_ids)
            valid = dense.rows_on_data(ids, starts, target_ids)
        else:
            accept, _, draft_lp, greedy_lp = rollout.verify_windows(
                target, kv, ids, starts, target_ids, "greedy", 1.0, torch.zeros(target_ids.shape, device=ids.device))
            valid = torch.ones_like(target_ids, dtype=torch.bool)
    accept, _, rw = rewards.window_rewards(accept, greedy_lp, draft_lp, valid, cfg.reward, gamma)
    return GreedyWindows(accept[:, 0], rw.total[:, 0])
