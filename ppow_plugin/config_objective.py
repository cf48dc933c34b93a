"""The PPOW objective's config sections, `reward` and `loss` (re-exported by `config`; the rules there apply).

Defaults marked [paper] come from PPOW (arXiv 2605.14978) as far as it is known; [default] marks our own choice
where the paper is silent (docs/algorithm.md says why).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ppow_plugin.recipe_file import require, require_text


@dataclass
class RewardCfg:
    gamma: float = 0.12  # drafter/target cost ratio [paper]; overridden by gamma_profile when set
    gamma_profile: str | None = None  # JSON written by `ppow profile`; its measured gamma wins
    eta: float = 0.5  # proximity bonus size; < R_speedup(1) so "close" never beats "1 accepted" [default]
    epsilon: float = 4.0  # proximity threshold on Δ, nats; calibrated on measured first-position Δ [default]
    delta_positions: int | None = 1  # Δ summed over the first N window positions; None = all K [default]
    # most draft tokens k counts; set it to the evaluation tree's depth (EAGLE-1 mc_sim_7b_63: 5, EAGLE-3:
    # eval.tree_depth + 1) so the reward counts what decoding counts; None = rollout.window [default]
    accept_cap: int | None = None
    speedup_weight: float = 1.0
    proximity_weight: float = 1.0  # 0 disables R_dist (ablation)

    def __post_init__(self):
        require(0 <= self.gamma <= 10, "reward.gamma", self.gamma, "in [0, 10] (drafter step / target step)")
        require_text(self.gamma_profile, "reward.gamma_profile", "a `ppow profile` JSON, or null")
        require(self.eta >= 0, "reward.eta", self.eta, ">= 0")
        require(self.epsilon > 0, "reward.epsilon", self.epsilon, "> 0")
        if self.delta_positions is not None:
            require(self.delta_positions >= 1, "reward.delta_positions", self.delta_positions,
                     ">= 1 (or null = the window)")
        if self.accept_cap is not None:
            require(self.accept_cap >= 1, "reward.accept_cap", self.accept_cap, ">= 1 (or null = rollout.window)")
        require(self.speedup_weight >= 0, "reward.speedup_weight", self.speedup_weight, ">= 0")
        require(self.proximity_weight >= 0, "reward.proximity_weight", self.proximity_weight, ">= 0")
        if self.speedup_weight == 0 and self.proximity_weight == 0:
            raise ValueError("reward.speedup_weight and reward.proximity_weight are both 0: every reward is 0")


@dataclass
class LossCfg:
    clip_eps: float = 0.2  # PPO clip range [default]
    ratio_mode: Literal["token", "window"] = "window"  # window = geometric mean over the window [default]
    # tokens that carry the advantage: accepted_prefix = 1..min(k+1, K), the ones that decided k; window = all K;
    # signed = A > 0: the accepted 1..k only, A < 0: the rejected k+1 only (losses.credit_mask)
    credit: Literal["window", "accepted_prefix", "signed"] = "accepted_prefix"  # [default]
    kl_positions: Literal["window", "accepted_prefix"] = "accepted_prefix"  # window positions the KL term sees [default]
    advantage_scale: Literal["std", "none"] = "std"  # divide by group std (GRPO) or only centre
    kl_beta: float = 0.05  # β: KL to the *target* on window positions [default]
    kl_direction: Literal["forward", "reverse"] = "forward"  # forward = KL(P_target ‖ Q_draft)
    distill_weight: float = 0.1  # optional token-level soft-CE to the target on the sequence [default]
    ppo_epochs: int = 1  # passes over each rollout batch [default]
    # optimizer updates per pass: the rollout's starts split into this many parts (interleaved); after the first
    # update the policy differs from the one that drew the windows, so the PPO ratio moves and the clip bounds it.
    # ppo_epochs x minibatches updates per trainer step; sampled estimator only [default: 1]
    minibatches: int = 1
    # what a window's reward is compared with: group = the mean of its G windows (GRPO); reference = the greedy
    # window's reward of the start drafter, frozen at step 0, at the same start (GTO's debiasing; needs
    # advantage_scale none and the sampled estimator) [default: group]
    baseline: Literal["group", "reference"] = "group"
    # ppo_epochs = 1: keep the graph of the sampling pass and update through it (the policy equals the sampling
    # policy, so a re-score would recompute the same numbers); False re-scores as ppo_epochs > 1 must.
    reuse_sampling_pass: bool = True
    # sampled = G windows per start, group-relative advantages, PPO-clip; expected = the exact expected window
    # reward on the data path, maximised (no sampling; needs rollout.positions all or N; method/expected.py) [default]
    estimator: Literal["sampled", "expected"] = "sampled"
    # weight of the SFT loss computed on the same unroll (EAGLE-1: feature regression + soft CE; EAGLE-3: the
    # training-time test); needs rollout.positions all or N; 0 = off
    sft_weight: float = 0.0
    # EAGLE-1, estimator=expected: at depths >= 2 of the data-path unroll the head computes only the N most frequent
    # assistant tokens (first model.draft_vocab_samples samples) plus the sequence's own, q renormalised over them;
    # depth 1 stays whole. An approximation (benchmarks/deep_vocab.py); null = the whole vocabulary [default]
    deep_vocab_rows: int | None = None

    def __post_init__(self):
        require(0 < self.clip_eps < 1, "loss.clip_eps", self.clip_eps, "in (0, 1)")
        require(self.kl_beta >= 0, "loss.kl_beta", self.kl_beta, ">= 0")
        require(self.distill_weight >= 0, "loss.distill_weight", self.distill_weight, ">= 0")
        require(self.ppo_epochs >= 1, "loss.ppo_epochs", self.ppo_epochs, ">= 1")
        require(self.minibatches >= 1, "loss.minibatches", self.minibatches, ">= 1")
        if self.baseline == "reference":
            require(self.advantage_scale == "none", "loss.advantage_scale", self.advantage_scale,
                     "none for loss.baseline=reference (a group of equal rewards has no std to divide by)")
            require(self.estimator == "sampled", "loss.baseline", self.baseline,
                     "group for loss.estimator=expected (the exact expectation needs no baseline)")
        if self.deep_vocab_rows is not None:
            require(self.deep_vocab_rows >= 1, "loss.deep_vocab_rows", self.deep_vocab_rows, ">= 1 (or null = whole)")
            require(self.estimator == "expected", "loss.deep_vocab_rows", self.deep_vocab_rows,
                     "null unless loss.estimator=expected (sampled windows draw from the whole vocabulary)")
        if self.estimator == "expected":  # E[R] is exact under the current policy: no sampled ratio to clip
            for name in ("ppo_epochs", "minibatches"):
                require(getattr(self, name) == 1, f"loss.{name}", getattr(self, name),
                         "1 for loss.estimator=expected (no sampled ratio for a clip to bound; use estimator=sampled)")
        require(self.sft_weight >= 0, "loss.sft_weight", self.sft_weight, ">= 0")
