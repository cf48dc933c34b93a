"""One PPOW micro-step: the target pass, ADAW's windows, G sampled windows per prefix verified by the target,
rewards and group advantages, then the clipped policy loss with the KL to the target (docs/algorithm.md).

    step = PpowStep(cfg, adapter, drafter, target, kv, target_passes, gen, device, gamma, reference)
    item = step.prepare(sample, step_index, keep_graph)   # dict: ids, valid, tpass, rollout, policy, ...
    result = step.loss(item, part)                         # StepResult(loss with grad, detached stats)

Several updates per rollout (`loss.ppo_epochs` x `loss.minibatches`): `prepare` draws the windows once with
their log-probs frozen; each `loss(item, (m, M))` re-scores part m of the starts under the current policy
(`method/minibatch.py`), so the PPO ratio moves after the first update and the clip bounds it.

Where we depart from the paper (details in docs/algorithm.md): window roots are data tokens (teacher
forcing), R_dist's Δ is computed along the drafted prefix, and an optional token-level soft CE to the target
on the teacher-forced sequence (loss.distill_weight) keeps the drafter anchored where no window looks.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ppow_plugin import distributed
from ppow_plugin.config import Config
from ppow_plugin.method import data_verify, dense, losses, minibatch, rewards, rollout, windowing
from ppow_plugin.training import dense_step, greedy_window
from ppow_plugin.training.sft_step import StepResult
from ppow_plugin.training.target_passes import TargetPasses, sequence_tensors


class PolicyPass(NamedTuple):
    """The drafter's passes of `prepare`, with their autograd graphs, reused by the update."""

    dpass: rollout.DraftPass    # teacher-forced pass of the sequence
    draft_logits: torch.Tensor  # [T-1, Vd] fp32
    logprobs: torch.Tensor | None  # [n, G, K] of the sampled windows (None: no window selected)
    logits: torch.Tensor | None    # [n, G, K, Vd]


class PpowStep:
    def __init__(self, cfg: Config, adapter, drafter, target, kv, target_passes: TargetPasses,
                 gen: torch.Generator, device: torch.device, gamma: float, reference=None, token_counts=None):
        """reference: the start drafter, frozen (`loss.baseline: reference`), or None; token_counts: () -> [V] counts
        of the assistant tokens (`loss.deep_vocab_rows`; called once, when first needed)."""
        self.cfg, self.adapter, self.drafter, self.target, self.kv = cfg, adapter, drafter, target, kv
        self.target_passes, self.gen, self.device, self.gamma = target_passes, gen, device, gamma
        self.reference, self.token_counts, self._counts = reference, token_counts, None

    def prepare(self, sample, step: int = 0, keep_graph: bool = False) -> dict:
        """Target pass, window selection, rollouts and verification (no grad unless `keep_graph`).

        step: the optimizer step (ADAW's warm-up rule depends on it).
        keep_graph: run the drafter's teacher-forced and sampling passes with gradients and keep them as
        `item["policy"]` for `loss` (valid while the policy is unchanged, i.e. ppo_epochs = 1).
        """
        cfg = self.cfg
        ids, valid = sequence_tensors(sample, self.device)
        tpass = self.target_passes(self.drafter, sample, ids, valid)
        item = {"ids": ids, "valid": valid, "tpass": tpass, "policy": None, "sft_vocab": None, "step": step}
        if cfg.loss.deep_vocab_rows is not None:  # depths >= 2 over the frequent tokens and the sequence's own
            if self._counts is None:
                self._counts = self.token_counts().to(self.device)
            frequent = self._counts.topk(min(cfg.loss.deep_vocab_rows, self._counts.numel())).indices
            item["deep_cols"] = torch.unique(torch.cat([frequent, ids]))
        if dense_step.uses_data_path(cfg):  # rollout.positions all | N: the data-path unroll, all in `loss`
            if updates_per_rollout(cfg) > 1:  # ... unless drawn once for several updates
                item["dense"] = dense_step.draw(self.adapter, self.drafter, self.target, item, cfg, self.gen, step)
            return item
        drafter_pass = torch.enable_grad if keep_graph else torch.no_grad
        with drafter_pass():
            feats = tpass.features.to(distributed.DTYPES[cfg.dist.dtype])
            dpass, draft_logits = self.adapter.teacher_forced(self.drafter, self.target, feats, ids)
        with torch.no_grad():
            target_logits = self.adapter.restrict(self.drafter, tpass.logits[1:])  # [T-1, Vd] like draft_logits
            pos = windowing.position_scores(target_logits[None], draft_logits.detach()[None])[0]  # i = 1..T-1
            pos_scores = torch.cat([pos.new_zeros(1), pos])  # [T], index = position
            scores = windowing.window_scores(pos_scores[None], valid[None], cfg.rollout.window)
            rule = windowing.adaw_rule_for_step(step, cfg.windowing.warmup_steps, cfg.windowing.rule)
            sel = windowing.select_windows(scores, cfg.rollout.prefixes_per_sequence, rule, self.gen,
                                           cfg.windowing.temperature)
            starts = sel.starts[0][sel.valid_mask[0]]
            item["window_score"] = windowing.score_summary(scores, torch.isfinite(scores))
        if starts.numel() == 0:
            item["rollout"] = None
            item["policy"] = PolicyPass(dpass, draft_logits, None, None) if keep_graph else None
            return item
        drawn = self._draw(ids, tpass.logits, dpass, starts, drafter_pass)
        valid_windows = torch.ones_like(drawn.tokens, dtype=torch.bool)
        if cfg.rollout.verify == "data":  # no target rows past the sequence's end
            valid_windows = data_verify.on_sequence_mask(ids.numel(), starts, *drawn.tokens.shape[1:])

        def flat_groups(d: rollout.Drawn) -> torch.Tensor:  # [n] True: every window of the group earns the same
            rw = rewards.window_rewards(d.accept_len, d.target_greedy_lp, d.target_draft_lp, valid_windows,
                                        self.cfg.reward, self.gamma)[2]
            return (losses.group_advantages(rw.total) == 0).all(dim=1)

        drawn, item["redrawn"] = rollout.redraw_flat_groups(  # dynamic sampling (rollout.resample_tries)
            drawn, starts, lambda s: self._draw(ids, tpass.logits, dpass, s, drafter_pass), flat_groups,
            cfg.rollout.resample_tries)
        if cfg.rollout.verify == "data":  # row k+1 after an accepted token that is not the data's: not read
            valid_windows = dense.rows_on_data(ids, starts, self.adapter.to_target_ids(self.drafter, drawn.tokens))
        item["rollout"] = rollout.Rollout(starts, drawn.tokens, drawn.logprobs.detach(), drawn.accept_len,
                                          drawn.target_logits, drawn.target_draft_lp, drawn.target_greedy_lp,
                                          valid_windows)
        if keep_graph:
            item["policy"] = PolicyPass(dpass, draft_logits, drawn.logprobs, drawn.logits)
        item["greedy"] = greedy_window.greedy_windows(self.adapter, self.drafter, self.target, self.kv, dpass, ids,
                                                      tpass.logits, starts, cfg, self.gamma)
        if self.reference is not None:
            item["ref_reward"] = self._reference_reward(item, starts)
        return item

    def _reference_reward(self, item: dict, starts: torch.Tensor) -> torch.Tensor:
        """[n] the frozen reference drafter's greedy-window reward at `starts` (`loss.baseline: reference`)."""
        with torch.no_grad():
            feats = item["tpass"].features.to(distributed.DTYPES[self.cfg.dist.dtype])
            dpass, _ = self.adapter.teacher_forced(self.reference, self.target, feats, item["ids"])
        return greedy_window.greedy_windows(self.adapter, self.reference, self.target, self.kv, dpass, item["ids"],
                                            item["tpass"].logits, starts, self.cfg, self.gamma).reward

    def _draw(self, ids, sequence_logits, dpass, starts, drafter_pass) -> rollout.Drawn:
        """G windows from each start, drafted (under `drafter_pass`: enable_grad keeps the graph) and verified."""
        r = self.cfg.rollout
        with drafter_pass():
            tokens, logprobs, logits = self.adapter.draft_windows(self.drafter, self.target, dpass, starts, r,
                                                                  generator=self.gen)  # drafter-vocabulary ids
        target_ids = self.adapter.to_target_ids(self.drafter, tokens)
        with torch.no_grad():
            if r.verify == "data":
                verified = data_verify.verify_on_data(ids, sequence_logits, starts, target_ids)
            else:
                verified = rollout.verify_windows(
                    self.target, self.kv, ids, starts, target_ids, r.verify, r.verify_temperature,
                    rollout.proposal_logprobs(logprobs, r.greedy_members), self.gen)
        return rollout.Drawn(tokens, logprobs, logits, *verified)

    def loss(self, item: dict, part: minibatch.Part = minibatch.WHOLE) -> StepResult:
        """Clipped group-relative policy loss + β·KL(target‖drafter) on the windows of `part` of the starts
        + ω·distillation."""
        if dense_step.uses_data_path(self.cfg):  # rollout.positions all | N: windows from one unroll along the data
            reference = None if self.reference is None else lambda s: self._reference_reward(item, s)
            return StepResult(*dense_step.data_path_loss(self.adapter, self.drafter, self.target, item, self.cfg,
                                                         self.gamma, self.gen, item["step"], part, reference))
        cfg, tpass, ids, ro, kept = self.cfg, item["tpass"], item["ids"], item["rollout"], item["policy"]
        if kept is not None and part != minibatch.WHOLE:
            raise ValueError("the kept sampling graph serves one update on all starts (prepare keep_graph=False)")
        index = None
        if ro is not None:
            index = minibatch.part_index(ro.starts.numel(), part, ro.starts.device)
            ro = minibatch.take(ro, index) if part != minibatch.WHOLE else ro
        if kept is not None:  # the graphs of prepare's passes (keep_graph)
            dpass, draft_logits = kept.dpass, kept.draft_logits
        else:
            feats = tpass.features.to(distributed.DTYPES[cfg.dist.dtype])
            dpass, draft_logits = self.adapter.teacher_forced(self.drafter, self.target, feats, ids)  # with grad
        target_logits = self.adapter.restrict(self.drafter, tpass.logits[1:])  # EAGLE-3: over the draft vocabulary
        distill, _ = losses.distill_loss(target_logits, draft_logits, item["valid"][1:])
        if ro is None or ro.starts.numel() == 0:  # no assistant position to draft from: distillation only
            return StepResult(cfg.loss.distill_weight * distill, {"distill": float(distill.detach())})
        r = cfg.rollout
        if kept is not None:
            new_lp, new_logits = kept.logprobs, kept.logits
        else:  # re-score the sampled windows under the current policy
            _, new_lp, new_logits = self.adapter.draft_windows(self.drafter, self.target, dpass, ro.starts, r,
                                                               tokens=ro.draft_tokens)
        rc = cfg.reward
        accept, delta, rw = rewards.window_rewards(ro.accept_len, ro.target_greedy_logprobs, ro.target_draft_logprobs,
                                                   ro.valid_mask, cfg.reward, self.gamma)  # accept: what decoding can accept
        baseline = item["ref_reward"][index] if self.reference is not None else None
        adv = losses.group_advantages(rw.total, scale=cfg.loss.advantage_scale, baseline=baseline)
        delta_len = rc.delta_positions or r.window
        credited = losses.credit_mask(accept, ro.valid_mask, cfg.loss.credit, delta_len, rc.accept_cap, adv)
        pol, pst = losses.policy_loss(new_lp, ro.old_logprobs, adv, credited, cfg.loss.clip_eps, cfg.loss.ratio_mode)
        V = new_logits.shape[-1]
        ro_target_logits = self.adapter.restrict(self.drafter, ro.target_logits)  # [n, G, K, Vd]
        kl_mask = losses.credit_mask(accept, ro.valid_mask, cfg.loss.kl_positions, delta_len, rc.accept_cap)
        kl, _ = losses.target_kl_loss(ro_target_logits.reshape(-1, V), new_logits.reshape(-1, V),
                                      kl_mask.reshape(-1), cfg.loss.kl_direction)
        loss = pol + cfg.loss.kl_beta * kl + cfg.loss.distill_weight * distill
        stats = {"loss": float(loss.detach()), "policy_loss": float(pol.detach()), "kl": float(kl.detach()),
                 "distill": float(distill.detach()), **dense_step.policy_stats(pst),
                 "window_score_mean": item["window_score"].get("mean", float("nan")),
                 "redrawn_per_prefix": item["redrawn"] / ro.starts.numel(),
                 "greedy_accept_len": float(item["greedy"].accept_len.float().mean()),
                 "greedy_reward": float(item["greedy"].reward.mean())}
        if baseline is not None:
            stats["ref_reward"] = float(baseline.mean())
        return StepResult(loss, stats | window_stats(ro.accept_len, accept, delta, rw, adv, credited, rc.epsilon))


def updates_per_rollout(cfg: Config) -> int:
    """Optimizer updates per drawn rollout: `loss.ppo_epochs` passes x `loss.minibatches` parts of the starts."""
    return cfg.loss.ppo_epochs * cfg.loss.minibatches


def window_stats(raw_accept, accept, delta, rw, adv, credited, epsilon: float) -> dict[str, float]:
    """Per-step window metrics (metrics.jsonl): reward parts, k, and how much signal the groups carry.

    zero_adv_frac: share of groups whose advantages are all 0 (no policy gradient from them);
    r_dist_rate: share of k = 0 windows with Δ < ε (where R_dist fires, whatever its weight);
    credit_frac: share of window tokens that carry the advantage (loss.credit).
    """
    k = accept.float()
    rejected = accept == 0
    fires = rewards.proximity_reward(accept, delta, 1.0, epsilon) > 0
    return {"reward": float(rw.total.mean()), "r_speedup": float(rw.speedup.mean()),
            "r_proximity": float(rw.proximity.mean()), "accept_len": float(k.mean()),
            "accept_len_raw": float(raw_accept.float().mean()), "tau_est": float(k.mean() + 1.0),
            "zero_accept_frac": float(rejected.float().mean()),
            "zero_adv_frac": float((adv == 0).all(dim=1).float().mean()),
            "r_dist_rate": float(fires.sum() / rejected.sum().clamp_min(1)),
            "credit_frac": float(credited.float().mean())}
