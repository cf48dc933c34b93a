"""Losses for PPOW (arXiv 2605.14978, §4.4) and the EAGLE SFT stages it starts from.

Each loss is a pure function returning `(loss, stats)`: a scalar tensor to backpropagate and a
NamedTuple of detached 0-dim tensors for logging (call `.item()` when logging, not here, to avoid a
device sync per loss). Masks are True on positions that count; masked means divide by
max(count, 1), so an all-padded batch gives loss 0 with a defined (zero) gradient.

Where we depart from (or fill gaps in) the paper:
  1. Advantages are group-relative, (R − mean_G) / (std_G + eps) with the population std over valid
     group members (GRPO/GTO style); the paper does not say whether the std is divided out, so
     `scale="none"` (mean only) is offered. Groups whose valid rewards are all equal get exactly 0.
  2. The importance ratio granularity is not given: "token" (per-token ratio, mean over valid tokens)
     or "window" (geometric mean of the token ratios over the window, GTO style, one ratio per window).
  3. The KL anchor is the frozen target (the paper's departure from GRPO); direction is not given.
     Default forward KL(P_target ‖ Q_draft) per window position, averaged over valid positions; the
     target side is detached.
  4. `distill_loss` is the optional token-level soft cross-entropy term GTO keeps; the paper does not
     say whether PPOW keeps one.
  5. `approx_kl` in PolicyStats is the k3 estimator (r − 1 − log r) per valid token, old → new.
  6. Credit assignment (`credit_mask`) is ours: the paper multiplies the window's log-probability by
     its advantage; "accepted_prefix" keeps only the tokens that decided the reward (docs/algorithm.md).
"""

from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ppow_plugin.method.windowing import kl_divergence

RatioMode = Literal["token", "window"]
Credit = Literal["window", "accepted_prefix", "signed"]
CREDITS: tuple[str, ...] = ("window", "accepted_prefix", "signed")


class PolicyStats(NamedTuple):
    clip_fraction: Tensor  # []  share of ratio units (tokens or windows) where clipping removed the gradient
    outside_fraction: Tensor  # []  share of credited tokens whose ratio (its unit's) lies outside [1-ε, 1+ε]
    ratio_mean: Tensor     # []  mean importance ratio over valid units
    approx_kl: Tensor      # []  k3 estimate of KL(old ‖ new) over valid tokens


class KLStats(NamedTuple):
    kl_mean: Tensor  # []  masked mean KL (same value as the loss, detached)
    kl_max: Tensor   # []  largest per-position KL (0 when nothing is valid)


class DistillStats(NamedTuple):
    soft_ce: Tensor   # []  masked mean soft cross-entropy
    top1_acc: Tensor  # []  share of valid positions where argmax draft == argmax target


class SFTStats(NamedTuple):
    feature_loss: Tensor  # []  masked mean SmoothL1 feature regression (unweighted)
    token_loss: Tensor    # []  masked mean soft cross-entropy (unweighted)
    top1_acc: Tensor      # []  share of valid positions where argmax draft == argmax target


class TTTStats(NamedTuple):
    per_step_loss: Tensor  # [S]  masked mean soft cross-entropy per TTT step (undecayed)
    per_step_acc: Tensor   # [S]  top-1 agreement per TTT step (0 for a step with no valid position)


def _masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of `values` where `mask` is True; 0 (with a defined gradient) when nothing is True."""
    kept = torch.where(mask, values, torch.zeros_like(values))
    return kept.sum() / mask.sum().clamp_min(1)


def _soft_cross_entropy(target_probs: Tensor, draft_logits: Tensor) -> Tensor:
    """−Σ_v p_v log q_v per position, float32; p_v = 0 entries contribute 0. Shapes (..., V) -> (...)."""
    log_q = torch.log_softmax(draft_logits.float(), dim=-1)
    p = target_probs.float()
    return -(p * log_q.masked_fill(p == 0, 0.0)).sum(dim=-1)


def _top1_agreement(draft_scores: Tensor, target_scores: Tensor) -> Tensor:
    """Share of rows where argmax agrees, as a detached 0-dim float tensor (0 for no rows)."""
    if draft_scores.shape[0] == 0:
        return draft_scores.new_zeros((), dtype=torch.float32)
    same = draft_scores.argmax(dim=-1) == target_scores.argmax(dim=-1)
    return same.float().mean().detach()


def group_advantages(
    rewards: Tensor,
    valid_mask: Tensor | None = None,
    scale: Literal["std", "none"] = "std",
    eps: float = 1e-6,
    baseline: Tensor | None = None,
) -> Tensor:
    """Group-relative advantages (R − mean_G) / (std_G + eps) over the valid members of each group, or
    R − b with a per-group baseline b (`loss.baseline: reference`, GTO: a frozen drafter's reward).

    Args:
        rewards: window rewards. Shape (B, G).
        valid_mask: True for real group members; None = all valid. Shape (B, G), bool.
        scale: "std" divides by the population std + eps; "none" only subtracts the mean.
        eps: added to the std, >= 0.
        baseline: None (the group mean), or per-group baselines, shape (B,); needs scale "none".
    Returns:
        Advantages, shape (B, G), rewards' dtype (float32 for integer rewards), detached. Exactly 0
        for invalid members; without a baseline also for groups whose valid rewards are all equal (incl. a
        single member); with one, R − b for every valid member (a flat group above b is pushed up).
    Raises:
        ValueError: unknown scale, eps < 0, or a baseline with scale "std".
    """
    if scale not in ("std", "none"):
        raise ValueError(f"scale {scale!r} must be 'std' or 'none'")
    if eps < 0:
        raise ValueError(f"eps ({eps}) must be >= 0")
    if valid_mask is None:
        valid_mask = torch.ones_like(rewards, dtype=torch.bool)
    out_dtype = rewards.dtype if rewards.is_floating_point() else torch.float32
    if baseline is not None:
        if scale != "none":
            raise ValueError("a baseline needs scale 'none' (a flat group has no std to divide by)")
        centred = rewards.detach().double() - baseline.detach().double()[:, None]
        return torch.where(valid_mask, centred, 0.0).to(out_dtype)
    r = torch.where(valid_mask, rewards.detach().double(), 0.0)
    count = valid_mask.sum(dim=1, keepdim=True).clamp_min(1)
    centred = r - r.sum(dim=1, keepdim=True) / count
    if scale == "std":
        var = torch.where(valid_mask, centred, 0.0).square().sum(dim=1, keepdim=True) / count
        centred = centred / (var.sqrt() + eps)
    # Identical rewards: force exact zeros (the mean may differ from them by rounding).
    r_max = torch.where(valid_mask, r, -torch.inf).amax(dim=1, keepdim=True)
    r_min = torch.where(valid_mask, r, torch.inf).amin(dim=1, keepdim=True)
    keep = valid_mask & (r_max > r_min)
    return torch.where(keep, centred, 0.0).to(out_dtype)


def credit_mask(accept_len: Tensor, valid_mask: Tensor, credit: Credit, proximity_positions: int = 1,
                accept_cap: int | None = None, advantages: Tensor | None = None) -> Tensor:
    """Which drafted tokens carry a window's advantage (and, as a config choice, its KL term).

    "window": every valid token. "accepted_prefix": tokens 1..min(k + 1, K), the accepted ones and the
    first rejected one, which decided k; the later tokens cannot have changed the reward. "signed": the
    same tokens split by the advantage's sign, so that no token is pushed the wrong way: an above-mean
    window (A > 0) credits its accepted tokens 1..k (never the rejected token k + 1, which the target
    refused), a below-mean window (A < 0) credits only its rejected token k + 1 (never its accepted tokens,
    which the target took). A window with k = 0 also earns (or not) R_dist from Δ over its first
    `proximity_positions` tokens, so those stay credited there under every rule.

    Args:
        accept_len: k per window, capped as the reward counts it. Shape (B, G), integer.
        valid_mask: True for real window positions. Shape (B, G, K), bool.
        credit: "window", "accepted_prefix" or "signed".
        proximity_positions: tokens R_dist's Δ reads for a k = 0 window, >= 1 (K for Δ over the window).
        accept_cap: the most tokens k counts (`rewards.counted_accept_len`); a window accepted to the cap
            was decided by its first `accept_cap` tokens. None = no cap.
        advantages: per-window advantages, shape (B, G); needed by "signed" only.
    Returns:
        valid_mask & credited, shape (B, G, K), bool.
    Raises:
        ValueError: unknown credit, proximity_positions < 1, or "signed" without advantages.
    """
    if credit not in CREDITS:
        raise ValueError(f"credit {credit!r} must be one of {', '.join(CREDITS)}")
    if proximity_positions < 1:
        raise ValueError(f"proximity_positions ({proximity_positions}) must be >= 1")
    if credit == "window":
        return valid_mask
    decided = torch.where(accept_len == 0, proximity_positions, accept_len + 1)  # [B, G]
    if accept_cap is not None:
        decided = decided.clamp(max=accept_cap)
    position = torch.arange(valid_mask.shape[-1], device=valid_mask.device)  # [K]
    in_prefix = position < decided[..., None]                                 # [B, G, K]
    if credit == "accepted_prefix":
        return valid_mask & in_prefix
    if advantages is None:
        raise ValueError("credit 'signed' needs the advantages (their sign picks the credited tokens)")
    k = accept_len[..., None]
    accepted = position < k                  # tokens 1..k
    rejected = position == k                 # token k + 1 (beyond K or the cap: no such token)
    positive = (advantages > 0)[..., None]
    signed = torch.where(positive, accepted, rejected) | (k == 0)  # k = 0: R_dist's positions, either sign
    return valid_mask & in_prefix & signed


def policy_loss(
    new_logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    valid_mask: Tensor,
    clip_eps: float,
    ratio_mode: RatioMode,
) -> tuple[Tensor, PolicyStats]:
    """PPO clipped surrogate: −mean(min(r·A, clip(r, 1 − ε, 1 + ε)·A)).

    "token": r = exp(new − old) per token, mean over valid tokens. "window": r = exp(mean over the
    window's valid tokens of (new − old)), the geometric mean of the token ratios, mean over windows
    with at least one valid token. Padded positions (and fully padded windows) contribute nothing.

    Args:
        new_logprobs: drafter log-probs of the drafted tokens, with gradient. Shape (B, G, K).
        old_logprobs: the same at sampling time. Shape (B, G, K).
        advantages: per-window advantages from `group_advantages`. Shape (B, G).
        valid_mask: True for real (non-padded) window positions. Shape (B, G, K), bool.
        clip_eps: PPO clip range ε > 0.
        ratio_mode: "token" or "window".
    Returns:
        (scalar loss, PolicyStats).
    Raises:
        ValueError: clip_eps <= 0 or unknown ratio_mode.
    """
    if clip_eps <= 0:
        raise ValueError(f"clip_eps ({clip_eps}) must be > 0")
    if ratio_mode not in ("token", "window"):
        raise ValueError(f"ratio_mode {ratio_mode!r} must be 'token' or 'window'")
    log_ratio = new_logprobs.float() - old_logprobs.detach().float()
    log_ratio = torch.where(valid_mask, log_ratio, torch.zeros_like(log_ratio))  # [B, G, K]
    adv = advantages.detach().float()
    if ratio_mode == "token":
        unit_log_ratio, unit_mask, unit_adv = log_ratio, valid_mask, adv.unsqueeze(-1)
    else:
        n_valid = valid_mask.sum(dim=-1)                                          # [B, G]
        unit_log_ratio = log_ratio.sum(dim=-1) / n_valid.clamp_min(1)
        unit_mask, unit_adv = n_valid > 0, adv
    ratio = unit_log_ratio.exp()
    clipped = ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps)
    surrogate = torch.minimum(ratio * unit_adv, clipped * unit_adv)
    loss = -_masked_mean(surrogate, unit_mask)
    with torch.no_grad():
        # Clipping removed the gradient: ratio beyond the bound on the side the advantage pushes it.
        was_clipped = (((ratio > 1.0 + clip_eps) & (unit_adv > 0))
                       | ((ratio < 1.0 - clip_eps) & (unit_adv < 0)))
        token_ratio = log_ratio.exp()
        outside = (ratio - 1.0).abs() > clip_eps  # per unit
        if ratio_mode == "window":
            outside = outside[..., None].expand_as(valid_mask)
        stats = PolicyStats(
            clip_fraction=_masked_mean(was_clipped.float(), unit_mask),
            outside_fraction=_masked_mean(outside.float(), valid_mask),
            ratio_mean=_masked_mean(ratio, unit_mask),
            approx_kl=_masked_mean(token_ratio - 1.0 - log_ratio, valid_mask),
        )
    return loss, stats


def _valid_rows(mask: Tensor, *tensors: Tensor) -> list[Tensor]:
    """Flatten (..., X) tensors to rows and keep the rows where `mask` (shape (...)) is True.

    Selecting before the math keeps garbage in padded rows (NaN / inf logits) out of values and
    gradients, and skips their cost.
    """
    flat_mask = mask.reshape(-1)
    rows = [t.reshape(flat_mask.shape[0], t.shape[-1]) for t in tensors]
    if bool(flat_mask.all()):  # nothing to drop: no [N, V] copy (nor its backward)
        return rows
    return [t[flat_mask] for t in rows]


def target_kl_loss(
    target_logits: Tensor,
    draft_logits: Tensor,
    valid_mask: Tensor,
    direction: Literal["forward", "reverse"] = "forward",
    weights: Tensor | None = None,
) -> tuple[Tensor, KLStats]:
    """KL penalty anchored to the frozen target, masked (weighted) mean over positions.

    "forward" = KL(P_target ‖ Q_draft) (default; mass-covering), "reverse" = KL(Q_draft ‖ P_target).
    The target side is detached.

    Args:
        target_logits: target next-token logits. Shape (N, V) (any leading shape works).
        draft_logits: drafter logits on the same vocabulary, with gradient. Shape (N, V).
        valid_mask: True for positions that count. Shape (N,), bool.
        direction: "forward" or "reverse".
        weights: None, or per-position weights >= 0, shape (N,): the mean becomes Σ w·KL / Σ w over valid
            positions (a row shared by several windows counts once per window: `dense.row_weights`).
    Returns:
        (scalar loss, KLStats).
    Raises:
        ValueError: unknown direction.
    """
    if direction not in ("forward", "reverse"):
        raise ValueError(f"direction {direction!r} must be 'forward' or 'reverse'")
    target, draft = _valid_rows(valid_mask, target_logits.detach(), draft_logits)
    kl = kl_divergence(target, draft) if direction == "forward" else kl_divergence(draft, target)
    if weights is None:
        loss = kl.sum() / max(kl.shape[0], 1)
    else:
        w = weights.detach().float().reshape(-1)[valid_mask.reshape(-1)]
        loss = (w * kl).sum() / w.sum().clamp_min(1e-12)
    kl_max = kl.detach().max() if kl.numel() else kl.new_zeros(())
    return loss, KLStats(kl_mean=loss.detach(), kl_max=kl_max)


def distill_loss(
    target_logits: Tensor, draft_logits: Tensor, valid_mask: Tensor
) -> tuple[Tensor, DistillStats]:
    """Token-level soft cross-entropy −Σ_v p_T(v) log q(v) to the target distribution (GTO's L_token).

    Same gradient as forward KL to the target; its value is KL + H(P_target). Target side detached.

    Args:
        target_logits: target next-token logits. Shape (N, V) (any leading shape works).
        draft_logits: drafter logits on the same vocabulary, with gradient. Shape (N, V).
        valid_mask: True for positions that count. Shape (N,), bool.
    Returns:
        (scalar loss, DistillStats).
    """
    target, draft = _valid_rows(valid_mask, target_logits.detach(), draft_logits)
    ce = _soft_cross_entropy(torch.softmax(target.float(), dim=-1), draft)
    loss = ce.sum() / max(ce.shape[0], 1)
    return loss, DistillStats(soft_ce=loss.detach(), top1_acc=_top1_agreement(draft, target))


def eagle1_sft_loss(
    pred_features: Tensor,
    target_features: Tensor,
    draft_logits: Tensor,
    target_logits: Tensor,
    loss_mask: Tensor,
    feature_weight: float,
    token_weight: float,
) -> tuple[Tensor, SFTStats]:
    """EAGLE-1 objective: w_f · SmoothL1(features) + w_t · soft-CE(target dist, draft), masked means.

    The feature loss is SmoothL1 (beta 1) averaged over H, then over valid positions. Targets
    (features and logits) are detached. EAGLE-1's own weights are w_f = 1.0, w_t = 0.1.

    Args:
        pred_features: drafter output features. Shape (B, T, H).
        target_features: target hidden states the drafter should predict (aligned). Shape (B, T, H).
        draft_logits: LM-head logits of pred_features. Shape (B, T, V).
        target_logits: target next-token logits (aligned). Shape (B, T, V).
        loss_mask: True for positions that count. Shape (B, T), bool.
        feature_weight: w_f.
        token_weight: w_t.
    Returns:
        (scalar loss, SFTStats).
    """
    draft, target = _valid_rows(loss_mask, draft_logits, target_logits.detach())
    feature_loss = feature_regression(pred_features, target_features, loss_mask)
    token_loss = _soft_cross_entropy(torch.softmax(target.float(), dim=-1), draft).sum() / max(draft.shape[0], 1)
    loss = feature_weight * feature_loss + token_weight * token_loss
    stats = SFTStats(feature_loss=feature_loss.detach(), token_loss=token_loss.detach(),
                     top1_acc=_top1_agreement(draft, target))
    return loss, stats


def feature_regression(pred_features: Tensor, target_features: Tensor, loss_mask: Tensor) -> Tensor:
    """EAGLE-1's next-feature loss: SmoothL1 (beta 1) averaged over H, then over the positions of `loss_mask`.

    Shapes: pred_features, target_features (..., H) (target detached); loss_mask (...) bool. Returns a scalar.
    """
    pred, feat_target = _valid_rows(loss_mask, pred_features, target_features.detach())
    per_pos = F.smooth_l1_loss(pred.float(), feat_target.float(), reduction="none").mean(dim=-1)
    return per_pos.sum() / max(pred.shape[0], 1)


def ttt_sft_loss(
    step_draft_logits: list[Tensor],
    step_target_probs: list[Tensor],
    step_masks: list[Tensor],
    decay: float,
) -> tuple[Tensor, TTTStats]:
    """EAGLE-3 training-time-test loss: Σ_i decay^i · (masked mean soft-CE at unrolled step i).

    Target probabilities are used as given (EAGLE-3 builds them over the draft vocabulary); they are
    not renormalised.

    Args:
        step_draft_logits: per TTT step, drafter logits over the draft vocabulary. S × shape (B, T, Vd).
        step_target_probs: per step, target probabilities over the draft vocabulary. S × (B, T, Vd).
        step_masks: per step, True for positions that count. S × shape (B, T), bool.
        decay: step weight base, > 0 (EAGLE-3: 0.8).
    Returns:
        (scalar loss, TTTStats).
    Raises:
        ValueError: empty or mismatched lists, or decay <= 0.
    """
    n_steps = len(step_draft_logits)
    if n_steps == 0 or len(step_target_probs) != n_steps or len(step_masks) != n_steps:
        raise ValueError("ttt_sft_loss needs equally long, non-empty lists of logits, probs and masks, "
                         f"got {n_steps}, {len(step_target_probs)}, {len(step_masks)}")
    if decay <= 0:
        raise ValueError(f"decay ({decay}) must be > 0")
    losses, accs = [], []
    for logits, probs, mask in zip(step_draft_logits, step_target_probs, step_masks):
        draft, target = _valid_rows(mask, logits, probs.detach())
        ce = _soft_cross_entropy(target, draft)
        losses.append(ce.sum() / max(ce.shape[0], 1))
        accs.append(_top1_agreement(draft, target))
    weights = torch.tensor([decay ** i for i in range(n_steps)], device=losses[0].device)
    per_step = torch.stack(losses)
    stats = TTTStats(per_step_loss=per_step.detach(), per_step_acc=torch.stack(accs))
    return (weights * per_step).sum(), stats
