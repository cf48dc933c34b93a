"""Window-level rewards for PPOW (arXiv 2605.14978, §4.3): cost-aware speedup plus proximity bonus.

Pure tensor functions: no state, device choice, I/O or logging. The trainer calls `joint_reward` once
per rollout; the other functions are its parts and are public so they can be tested and logged alone.

Where we depart from (or fill gaps in) the paper:
  1. `accept_len` (k) counts accepted *draft* tokens and excludes the bonus/correction token. The paper
     does not say; R_dist is gated on k = 0, which only makes sense with the bonus excluded.
  2. Δ (`proximity_delta`) scores both the target-preferred token and the drafted token under the
     target conditioned on the *drafted* prefix (teacher-forced on the draft), so one target pass over
     the drafted window suffices. The paper conditions the target-preferred window on its own prefix.
     With the target-preferred token taken as the target's argmax, every term is >= 0.
  3. η and ε are not given in the paper; they are required arguments here (recipe fields).
  4. The paper gives no weights for combining the terms; `joint_reward` adds them with weights that
     default to 1.0. R_dist applies only when k = 0 (every source says so) and R_speedup(0) = 0, so the
     two terms never overlap.
"""

from typing import NamedTuple

import torch
from torch import Tensor


class RewardBreakdown(NamedTuple):
    """Per-window rewards; `total == speedup + proximity` (both already weighted)."""

    total: Tensor      # [B, G] float32
    speedup: Tensor    # [B, G] float32  speedup_weight * R_speedup
    proximity: Tensor  # [B, G] float32  proximity_weight * R_dist


def _check_accept_len(accept_len: Tensor) -> None:
    if accept_len.is_floating_point() or accept_len.is_complex():
        raise ValueError(f"accept_len must be an integer tensor, got dtype {accept_len.dtype}")
    if accept_len.numel() and bool((accept_len < 0).any()):
        raise ValueError("accept_len must be >= 0 (accepted draft tokens, bonus excluded)")


def counted_accept_len(accept_len: Tensor, cap: int | None) -> Tensor:
    """k as decoding can use it: at most `cap` draft tokens (the evaluation tree's depth), None = uncapped.

    A tree of depth D accepts at most D draft tokens per cycle, so a window accepted beyond D earns,
    in decoding, what one accepted to D earns (docs/algorithm.md, "Match training to decoding").

    Args:
        accept_len: accepted draft tokens per window. Shape (B, G), integer.
        cap: most draft tokens one decoding cycle accepts, >= 1, or None.
    Returns:
        min(k, cap), same shape and dtype.
    Raises:
        ValueError: cap < 1, or a bad accept_len.
    """
    _check_accept_len(accept_len)
    if cap is None:
        return accept_len
    if cap < 1:
        raise ValueError(f"cap ({cap}) must be >= 1 (or None = uncapped)")
    return accept_len.clamp(max=cap)


def speedup_reward(accept_len: Tensor, gamma: float) -> Tensor:
    """Cost-aware speedup reward k / (k * gamma + 1) (PPOW §4.3).

    Tokens gained per unit of draft + verify time for one cycle, with a target pass normalised to 1.
    It is 0 at k = 0, increasing and concave in k, and bounded by 1 / gamma.

    Args:
        accept_len: accepted draft tokens per window, bonus excluded. Shape (B, G), integer.
        gamma: drafter cost relative to one target forward pass, >= 0 (paper: 0.12).
    Returns:
        Rewards, shape (B, G), float32.
    Raises:
        ValueError: gamma < 0, or accept_len is not a non-negative integer tensor.
    """
    if gamma < 0:
        raise ValueError(f"gamma ({gamma}) must be >= 0: it is a relative drafter cost")
    _check_accept_len(accept_len)
    k = accept_len.float()
    return k / (k * gamma + 1.0)


def proximity_delta(greedy_logprobs: Tensor, draft_logprobs: Tensor, valid_mask: Tensor,
                    positions: int | None = None) -> Tensor:
    """Δ: how much target log-probability the drafted window gives up against the target's choice.

    Δ = Σ_{valid t} [log p_T(y_t | x, ŷ_<t) − log p_T(ŷ_t | x, ŷ_<t)], with y_t the target-preferred
    (greedy) token and ŷ_t the drafted token, both scored by the target on the drafted prefix (see the
    module notes, item 2). Float noise is clamped so Δ >= 0.

    Args:
        greedy_logprobs: target log-prob of its preferred token per window position. Shape (B, G, K).
        draft_logprobs: target log-prob of the drafted token per window position. Shape (B, G, K).
        valid_mask: True where the window position exists (not padding). Shape (B, G, K), bool.
        positions: sum over the first `positions` window positions only (None = all K). For k = 0 the
            drafted prefix has already left the target's path after position 1, so later terms mostly
            measure that divergence (docs/algorithm.md, "R_dist").
    Returns:
        Δ per window, shape (B, G), float32; 0 for a fully padded window.
    Raises:
        ValueError: positions < 1.
    """
    if positions is not None:
        if positions < 1:
            raise ValueError(f"positions ({positions}) must be >= 1 (or None = the whole window)")
        valid_mask = valid_mask & (torch.arange(valid_mask.shape[-1], device=valid_mask.device) < positions)
    diff = greedy_logprobs.float() - draft_logprobs.float()
    diff = torch.where(valid_mask, diff, torch.zeros_like(diff))  # padding may hold garbage / -inf
    return diff.sum(dim=-1).clamp_min(0.0)


def proximity_reward(accept_len: Tensor, delta: Tensor, eta: float, epsilon: float) -> Tensor:
    """Distribution-based proximity reward η · 1[Δ < ε], only for windows with k = 0 (PPOW §4.3.2).

    A binary bonus that densifies the reward: a window rejected at its first token still earns η if
    the target found it nearly as likely as its own choice.

    Args:
        accept_len: accepted draft tokens per window, bonus excluded. Shape (B, G), integer.
        delta: Δ from `proximity_delta`. Shape (B, G).
        eta: bonus magnitude, >= 0. Keep it below R_speedup(1) so a near miss never beats one token.
        epsilon: threshold on Δ in nats, > 0.
    Returns:
        Rewards in {0, η}, shape (B, G), float32.
    Raises:
        ValueError: eta < 0, epsilon <= 0, or a bad accept_len.
    """
    if eta < 0:
        raise ValueError(f"eta ({eta}) must be >= 0: it is the proximity bonus magnitude")
    if epsilon <= 0:
        raise ValueError(f"epsilon ({epsilon}) must be > 0: Δ >= 0, so Δ < ε needs a positive ε")
    _check_accept_len(accept_len)
    earns = (accept_len == 0) & (delta < epsilon)
    return earns.float() * eta


def joint_reward(
    accept_len: Tensor,
    delta: Tensor,
    gamma: float,
    eta: float,
    epsilon: float,
    speedup_weight: float = 1.0,
    proximity_weight: float = 1.0,
) -> RewardBreakdown:
    """Total PPOW window reward: w_s · R_speedup + w_p · R_dist.

    The terms never overlap: R_dist is non-zero only at k = 0, where R_speedup(0) = 0. So with unit
    weights the total is R_speedup when k > 0 and η · 1[Δ < ε] when k = 0.

    Args:
        accept_len: accepted draft tokens per window, bonus excluded. Shape (B, G), integer.
        delta: Δ from `proximity_delta`. Shape (B, G).
        gamma: drafter cost relative to one target pass, >= 0.
        eta: proximity bonus magnitude, >= 0.
        epsilon: proximity threshold in nats, > 0.
        speedup_weight: multiplier on R_speedup (paper gives none; default 1).
        proximity_weight: multiplier on R_dist (paper gives none; default 1).
    Returns:
        RewardBreakdown of (B, G) float32 tensors; `speedup` and `proximity` are the weighted terms.
    Raises:
        ValueError: as `speedup_reward` and `proximity_reward`.
    """
    speedup = speedup_weight * speedup_reward(accept_len, gamma)
    proximity = proximity_weight * proximity_reward(accept_len, delta, eta, epsilon)
    return RewardBreakdown(total=speedup + proximity, speedup=speedup, proximity=proximity)


def window_rewards(accept_len: Tensor, greedy_lp: Tensor, draft_lp: Tensor, valid: Tensor, rc, gamma: float):
    """The recipe's reward of verified windows, the one rule every PPOW path uses.

    Args:
        accept_len: [n, G] accepted draft tokens (the verification's count).
        greedy_lp, draft_lp, valid: [n, G, K] the target's log-prob of its greedy token / of the drafted token, and
            which positions exist (`proximity_delta`).
        rc: the recipe's `RewardCfg` (accept_cap, delta_positions, eta, epsilon, speedup_weight, proximity_weight).
        gamma: the drafter's cost per token relative to the target's.
    Returns:
        (k as decoding counts it [n, G], Δ [n, G], RewardBreakdown).
    """
    accept = counted_accept_len(accept_len, rc.accept_cap)
    delta = proximity_delta(greedy_lp, draft_lp, valid, rc.delta_positions)
    return accept, delta, joint_reward(accept, delta, gamma, rc.eta, rc.epsilon, rc.speedup_weight,
                                       rc.proximity_weight)
