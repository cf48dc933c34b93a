"""PPOW's loss from one drafter unroll along the data (`rollout.positions: all | N`, issue 27).

    loss, stats = dense_step.data_path_loss(adapter, drafter, target, item, cfg, gamma, gen, step)

The trainer calls this instead of its rollout path when `uses_data_path(cfg)`. One step: the teacher-forced
pass (ADAW scores when `positions: N`, the distillation term), the drafter's K-step unroll along the data
from every chosen start (`adapter.data_path`), then either
- `loss.estimator: sampled`: G windows per start drawn from the unroll's distributions and verified on the
  data (`dense.sampled_windows`), fed to the same rewards, group advantages, credit masks and PPO loss as
  the rollout path; or
- `loss.estimator: expected`: the exact expected reward of a window from each start (`expected.py`),
  maximised: loss = −mean_s E[R](s);
plus β·KL(P_target ‖ Q) on the rows the losses read (each data-path row weighted by how many windows read
it, or by the probability that one does), ω·distillation, and `loss.sft_weight`·(the SFT loss on the same
unroll). Config requires `rollout.verify: data` (the target's own answers), so no tree verification runs.

Several updates per rollout (`loss.ppo_epochs`, `loss.minibatches`, sampled estimator): `draw` runs the unroll
once without a graph and stores the starts and windows with their log-probs (`item["dense"]`); each update
re-runs the unroll on its part of the starts and scores the stored windows under the current policy, so the
PPO ratio is new / drawn. With one update the draw and the update share one unroll (no stored rollout).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ppow_plugin import distributed
from ppow_plugin.method import dense, expected, losses, minibatch, rewards, windowing


class DenseRollout(NamedTuple):
    """A step's dense windows drawn once (`draw`) for several updates; `windows` is detached."""

    starts: Tensor  # [n] int64
    windows: dense.DenseWindows  # [n, G, K] each; logprobs: log q at drawing time (the PPO ratio's old side)
    score: dict  # ADAW's score summary ({} for positions: all)


SELECT_READ_ROWS = 0.75  # `_rows_kl` selects the read rows when at most this share of them is read


def uses_data_path(cfg) -> bool:
    """True when PPOW's windows come from the data-path unroll rather than per-start rollouts."""
    return cfg.stage == "ppow" and cfg.rollout.positions != "adaw"


def choose_starts(cfg, valid: Tensor, target_logits: Tensor, draft_logits: Tensor, gen: torch.Generator,
                  step: int) -> tuple[Tensor, dict]:
    """Window starts: every valid position (`positions: all`) or N of them chosen by ADAW (`positions: N`).

    Args:
        valid: [T] bool; target_logits, draft_logits: [m, Vd] teacher-forced, at the rows `_read_rows(valid)` (row i
            predicts x_{i+2}): ADAW's window score reads only the valid positions' scores.
    Returns:
        (starts [n] int64 ascending, ADAW score summary or {}).
    """
    if cfg.rollout.positions == "all":
        return dense.valid_starts(valid), {}
    with torch.no_grad():
        pos = windowing.position_scores(target_logits[None], draft_logits.detach()[None])[0]  # [m]
        pos_scores = pos.new_zeros(valid.shape)  # [T], index = position; read by window_scores only where valid
        pos_scores[1:][valid[1:]] = pos
        scores = windowing.window_scores(pos_scores[None], valid[None], cfg.rollout.window)
        rule = windowing.adaw_rule_for_step(step, cfg.windowing.warmup_steps, cfg.windowing.rule)
        sel = windowing.select_windows(scores, cfg.rollout.positions, rule, gen, cfg.windowing.temperature)
    starts = sel.starts[0][sel.valid_mask[0]]
    return starts[starts >= 1].sort().values, windowing.score_summary(scores, torch.isfinite(scores))


def _teacher_forced(adapter, drafter, target, item: dict, cfg, rows: Tensor | None = None):
    """-> (DraftPass, draft logits [T-1, Vd], target logits over the draft vocabulary [T-1, Vd]); with `rows` ([m]
    int64 teacher-forced rows) only those rows' logits, [m, Vd] each: the head skips the others."""
    feats = item["tpass"].features.to(distributed.DTYPES[cfg.dist.dtype])
    dpass, draft_logits = adapter.teacher_forced(drafter, target, feats, item["ids"], rows=rows)
    target_logits = item["tpass"].logits[1:]
    return dpass, draft_logits, adapter.restrict(drafter, target_logits if rows is None else target_logits[rows])


def _read_rows(valid: Tensor) -> Tensor:
    """[m] the teacher-forced rows i with valid[i+1] (x_{i+2} trained), ascending: the only rows a dense step reads
    (distillation, the SFT's soft CE, depth 1 of every start s = i+1, ADAW's scores at the valid positions)."""
    return torch.nonzero(valid[1:])[:, 0]


def _first_rows(valid: Tensor, starts: Tensor) -> Tensor:
    """[n] the index in `_read_rows(valid)` of each start's teacher-forced row s-1 (starts are valid positions)."""
    return valid[1:].long().cumsum(0)[starts - 1] - 1


def _data_ids(adapter, drafter, ids: Tensor, starts: Tensor, K: int) -> Tensor:
    """[n, K] the data tokens after each start as drafter ids (-1: outside its vocabulary or past the end)."""
    data_target, exists = dense.data_tokens(ids, starts, K)
    return torch.where(exists, adapter.to_draft_ids(drafter, data_target), -1)


def draw(adapter, drafter, target, item: dict, cfg, gen: torch.Generator, step: int) -> DenseRollout:
    """The step's starts and G windows per start, drawn from one unroll without a graph (several updates)."""
    tpass, ids, valid = item["tpass"], item["ids"], item["valid"]
    with torch.no_grad():
        dpass, draft_logits, target_logits = _teacher_forced(adapter, drafter, target, item, cfg, _read_rows(valid))
        starts, score = choose_starts(cfg, valid, target_logits, draft_logits, gen, step)
        K, r = cfg.rollout.window, cfg.rollout
        path = adapter.data_path(drafter, target, dpass, draft_logits, tpass, ids, valid, starts, K, cfg, sft=False,
                                 first_rows=_first_rows(valid, starts))
        w = dense.sampled_windows(path.logits, starts, ids, tpass.logits, _data_ids(adapter, drafter, ids, starts, K),
                                  r.group_size, r.temperature, lambda t: adapter.to_target_ids(drafter, t), gen)
    return DenseRollout(starts, w, score)


def data_path_loss(adapter, drafter, target, item: dict, cfg, gamma: float, gen: torch.Generator, step: int,
                   part: minibatch.Part = minibatch.WHOLE,
                   reference: Callable[[Tensor], Tensor] | None = None) -> tuple[Tensor, dict[str, float]]:
    """The PPOW loss of one sequence (`item` from `PpowStep.prepare`: ids, valid, tpass, step; `dense` when the
    windows were drawn for several updates) from its data-path unroll, on the starts of `part`.

    reference: starts [n] -> the reference drafter's greedy-window reward [n] (`loss.baseline: reference`).
    """
    tpass, ids, valid = item["tpass"], item["ids"], item["valid"]
    # with grad, at the rows the step reads (`_read_rows`)
    dpass, draft_logits, target_logits = _teacher_forced(adapter, drafter, target, item, cfg, _read_rows(valid))
    every = torch.ones_like(draft_logits[:, 0], dtype=torch.bool)  # the rows are the valid ones already
    distill, _ = losses.distill_loss(target_logits, draft_logits, every)
    stored = item.get("dense")
    starts, score = (stored.starts, stored.score) if stored is not None else choose_starts(
        cfg, valid, target_logits, draft_logits, gen, step)
    index = minibatch.part_index(starts.numel(), part, starts.device)
    starts = starts[index]
    if starts.numel() == 0:  # no assistant position to draft from: distillation only
        return cfg.loss.distill_weight * distill, {"distill": float(distill.detach())}
    K, lc, r = cfg.rollout.window, cfg.loss, cfg.rollout
    path = adapter.data_path(drafter, target, dpass, draft_logits, tpass, ids, valid, starts, K, cfg,
                             sft=lc.sft_weight > 0, soft_ce=distill, cols=item.get("deep_cols"),
                             first_rows=_first_rows(valid, starts))
    data_ids = _data_ids(adapter, drafter, ids, starts, K)
    to_target = lambda t: adapter.to_target_ids(drafter, t)
    if lc.estimator == "sampled":
        if stored is None:  # one update: drawn from this unroll, the ratio is 1
            w = dense.sampled_windows(path.logits, starts, ids, tpass.logits, data_ids, r.group_size, r.temperature,
                                      to_target, gen)
            old = w.logprobs.detach()
        else:  # the stored windows, scored under the current policy
            w = minibatch.take(stored.windows, index)
            old = w.logprobs
            logp = F.log_softmax(path.logits.float() / r.temperature, -1)
            w = w._replace(logprobs=dense.gather_depths(logp, w.tokens))
        base = None if reference is None else reference(starts)
        pol, read, stats = _sampled(w, old, cfg, gamma, base)
    else:
        pol, read, stats = _expected(path, starts, ids, tpass.logits, data_ids, adapter, drafter, cfg, gamma)
    kl = _read_rows_kl(adapter, drafter, tpass.logits, path, starts, read, lc.kl_direction)
    loss = pol + lc.kl_beta * kl + lc.distill_weight * distill
    if path.sft is not None:
        loss = loss + lc.sft_weight * path.sft
        stats.update(sft_loss=float(path.sft.detach()), **path.sft_stats)
    greedy_k = dense.greedy_accept_len(path.logits, starts, ids, tpass.logits, to_target if path.cols is None else
                                       lambda t: torch.cat([path.first.argmax(-1)[:, None, None], path.cols[t[..., 1:]]],
                                                           -1))
    stats.update(loss=float(loss.detach()), policy_loss=float(pol.detach()), kl=float(kl.detach()),
                 distill=float(distill.detach()), starts=float(starts.numel()),
                 greedy_accept_len=float(rewards.counted_accept_len(greedy_k, cfg.reward.accept_cap).float().mean()),
                 window_score_mean=score.get("mean", float("nan")))
    return loss, stats


def _sampled(w: dense.DenseWindows, old_logprobs: Tensor, cfg, gamma, baseline: Tensor | None):
    """Dense sampled windows (`w.logprobs` under the current policy, with grad; `old_logprobs` [n, G, K] at drawing
    time; `baseline` [n] or None = the group mean) -> (policy loss, [n, K] KL row weights, stats)."""
    r, lc, rc = cfg.rollout, cfg.loss, cfg.reward
    accept, delta, rw = rewards.window_rewards(w.accept_len, w.target_greedy_lp, w.target_draft_lp, w.valid_mask,
                                               cfg.reward, gamma)
    adv = losses.group_advantages(rw.total, scale=lc.advantage_scale, baseline=baseline)
    delta_len = rc.delta_positions or r.window
    credited = losses.credit_mask(accept, w.valid_mask, lc.credit, delta_len, rc.accept_cap, adv)
    pol, pst = losses.policy_loss(w.logprobs, old_logprobs, adv, credited, lc.clip_eps, lc.ratio_mode)
    read = dense.row_weights(losses.credit_mask(accept, w.valid_mask, lc.kl_positions, delta_len, rc.accept_cap))
    rejected = accept == 0
    fires = rejected & (delta < rc.epsilon)
    stats = {"reward": float(rw.total.mean()), "r_speedup": float(rw.speedup.mean()),
             "r_proximity": float(rw.proximity.mean()), "accept_len": float(accept.float().mean()),
             "zero_adv_frac": float((adv == 0).all(dim=1).float().mean()),
             "r_dist_rate": float(fires.sum() / rejected.sum().clamp_min(1)),
             "credit_frac": float(credited.float().mean()), "windows": float(accept.numel()),
             **policy_stats(pst)}
    if baseline is not None:
        stats["ref_reward"] = float(baseline.mean())
    return pol, read, stats


def policy_stats(pst: losses.PolicyStats) -> dict[str, float]:
    """The PPO ratio's metrics: clip_frac (units whose gradient the clip removed), ratio_out_frac (credited tokens
    whose ratio lies outside [1 − ε, 1 + ε]), ratio (mean), approx_kl (old → new); all 0 / 1 with one update."""
    return {"clip_frac": float(pst.clip_fraction), "ratio_out_frac": float(pst.outside_fraction),
            "ratio": float(pst.ratio_mean), "approx_kl": float(pst.approx_kl)}


def _column_of(cols: Tensor, ids: Tensor) -> Tensor:
    """Index of each id in the ascending `cols` [C], -1 where absent (ids -1 stay -1)."""
    at = torch.searchsorted(cols, ids.clamp(min=0)).clamp(max=cols.numel() - 1)
    return torch.where((cols[at] == ids) & (ids >= 0), at, -1)


def _expected(path, starts, ids, seq_logits, data_ids, adapter, drafter, cfg, gamma):
    """Exact expected reward (over `path.cols` at depths >= 2 when set) -> (−mean E[R], [n, K] KL row weights
    P(row read), stats)."""
    rc, K, T = cfg.reward, path.logits.shape[1], cfg.rollout.temperature
    last = ids.numel() - 1
    pos = starts[:, None] + torch.arange(K, device=ids.device)  # [n, K] the target row judging depth j
    greedy = torch.where(pos <= last, adapter.to_draft_ids(drafter, seq_logits.argmax(-1)[pos.clamp(max=last)]), -1)
    width = (path.logits if path.cols is None else path.first).shape[-1]
    vocab_ids = adapter.to_target_ids(drafter, torch.arange(width, device=ids.device))
    near = expected.near_first_mask(seq_logits[starts], vocab_ids, rc.epsilon)
    logp = F.log_softmax(path.logits.float() / T, -1)
    first = None
    if path.cols is not None:  # depth 1 over the whole vocabulary, depths >= 2 over cols (renormalised there)
        first = (F.log_softmax(path.first.float() / T, -1), greedy[:, 0], data_ids[:, 0])
        data_ids, greedy = _column_of(path.cols, data_ids), _column_of(path.cols, greedy)
    ex = expected.expected_reward(logp, data_ids, greedy, near, gamma, rc.eta, rc.accept_cap, rc.speedup_weight,
                                  rc.proximity_weight, first)
    stats = {"reward": float(ex.total.detach().mean()), "r_speedup": float(ex.speedup.detach().mean()),
             "r_proximity": float(ex.proximity.detach().mean()),
             "accept_len": float(ex.reach.detach().sum(1).mean()), "windows": float(starts.numel())}
    return -ex.total.mean(), ex.read, stats


def _read_rows_kl(adapter, drafter, seq_logits, path, starts, read, direction) -> Tensor:
    """KL to the target on the data-path rows the losses read, each weighted by `read` ([n, K], 0 = unread); with
    `path.cols`, depth 1 over the whole vocabulary and depths >= 2 over cols (both sides renormalised there)."""
    if path.cols is None:
        return _rows_kl(adapter, drafter, seq_logits, path.logits, starts, read, direction)[0]
    deep, deep_w = _rows_kl(adapter, drafter, seq_logits[:, path.cols], path.logits[:, 1:], starts + 1, read[:, 1:],
                            direction)
    one, one_w = _rows_kl(adapter, drafter, seq_logits, path.first[:, None], starts, read[:, :1], direction)
    return (one * one_w + deep * deep_w) / (one_w + deep_w).clamp_min(1e-12)


def _rows_kl(adapter, drafter, seq_logits, logits, starts, read, direction) -> tuple[Tensor, Tensor]:
    """-> (weighted mean KL over the [n, K] rows of `logits` [n, K, V] from `starts`, the weights' sum).

    Only the rows with read > 0 count. When at most `SELECT_READ_ROWS` of the n·K rows are read (the sampled
    estimator reads about half), those rows are selected before the [rows, V] work; selecting costs an [n, K, V]
    zero-fill in the backward, about the KL on a quarter of the rows, so a mostly read `read` (the expected
    estimator's probabilities) is computed whole with weight 0 on the unread rows. Same value and gradient either
    way up to float rounding (tests/test_dense_step.py).
    """
    K, V = logits.shape[1], logits.shape[-1]
    pos = (starts[:, None] + torch.arange(K, device=starts.device)).clamp(max=seq_logits.shape[0] - 1)  # [n, K]
    i, j = torch.nonzero(read > 0, as_tuple=True)  # [r] each: the read rows
    if i.numel() <= SELECT_READ_ROWS * read.numel():
        target, draft, weights = seq_logits[pos[i, j]], logits[i, j], read[i, j]  # [r, V], [r, V], [r]
    else:  # every row, unread ones weighted 0 (finite logits both sides); a row past the end (clamped) has weight 0
        target, draft, weights = seq_logits[pos.reshape(-1)], logits.reshape(-1, V), read.reshape(-1)
    kl, _ = losses.target_kl_loss(adapter.restrict(drafter, target), draft,
                                  torch.ones_like(weights, dtype=torch.bool), direction, weights=weights)
    return kl, read.sum()
