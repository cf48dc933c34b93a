"""Adaptive Divergence-Aware Windowing (ADAW, PPOW arXiv 2605.14978): which windows to train on.

Each position t gets v_t = C(P_t) · KL(P_t ‖ Q_t), with P_t the target's and Q_t the drafter's next-token
distribution and C(P) = 1 − H(P) / log|V| the target's normalised confidence. A window's score is the
mean v_t over its positions, and training windows are picked from the scores (`select_windows`).
Pure tensor functions; the generator is passed in, so selection is reproducible.

Where we depart from (or fill gaps in) the paper:
  1. Scores use teacher-forced target and draft logits (no extra target pass). The paper does not say
     whether they are teacher-forced or on-policy, nor how often they are recomputed.
  2. A window starting at s covers positions [s, s + K) ∩ [0, T); near the sequence end it is shorter
     and is scored on the positions that exist. Positions outside the loss mask are left out of the
     mean, and a window may only *start* at a valid position.
  3. Selection rule is a choice: "top" (n highest scores), "sample" (without replacement ∝
     score^(1/temperature)) or "uniform". The paper does not give one.
  4. ADAW is switched on after a warm-up of uniform selection (`adaw_rule_for_step`), reading Fig. 4
     as a curriculum; the switch point is a recipe field.
  5. P and Q must share one vocabulary: for a reduced-vocabulary drafter (EAGLE-3 `d2t`) the caller
     maps the target logits onto the draft vocabulary first.
"""

import math
from typing import Literal, NamedTuple

import torch
from torch import Tensor

SelectionRule = Literal["top", "sample", "uniform"]
SELECTION_RULES: tuple[str, ...] = ("top", "sample", "uniform")


class WindowSelection(NamedTuple):
    """Chosen window starts per row; slots beyond a row's candidates are invalid."""

    starts: Tensor      # [B, n] int64  window start positions (0 where not valid)
    valid_mask: Tensor  # [B, n] bool   True = a real selected window


def _entropy_terms(logp: Tensor) -> Tensor:
    """p · log p elementwise with 0 · log 0 = 0 (and no NaN in forward or backward)."""
    p = logp.exp()
    return p * logp.masked_fill(p == 0, 0.0)


def target_confidence(target_logits: Tensor) -> Tensor:
    """Normalised confidence C(P) = 1 − H(P) / log V of the distribution softmax(target_logits).

    Args:
        target_logits: logits over V >= 2 entries; -inf entries are allowed. Shape (..., V).
    Returns:
        Confidence in [0, 1] (1 for one-hot, 0 for uniform), shape (...), float32.
    Raises:
        ValueError: V < 2 (log V would be 0).
    """
    vocab = target_logits.shape[-1]
    if vocab < 2:
        raise ValueError(f"target_confidence needs a vocabulary of at least 2 entries, got {vocab}")
    logp = torch.log_softmax(target_logits.float(), dim=-1)
    entropy = -_entropy_terms(logp).sum(dim=-1)
    return (1.0 - entropy / math.log(vocab)).clamp(0.0, 1.0)


def kl_divergence(p_logits: Tensor, q_logits: Tensor) -> Tensor:
    """Forward KL(P ‖ Q) = Σ_v p_v (log p_v − log q_v) per position, from logits.

    The single implementation of KL in the package (losses.py imports it). Computed in float32;
    entries with p_v = 0 contribute 0, and q_v = 0 where p_v > 0 gives +inf. Not clamped, so it may be
    a few ulps below 0 when P == Q.

    Args:
        p_logits: logits of P. Shape (..., V).
        q_logits: logits of Q over the same vocabulary. Shape (..., V).
    Returns:
        KL per position, shape (...), float32.
    """
    logp = torch.log_softmax(p_logits.float(), dim=-1)
    logq = torch.log_softmax(q_logits.float(), dim=-1)
    p = logp.exp()
    # Mask the log-ratio (not the product) so p = 0 entries give neither NaN values nor NaN gradients.
    log_ratio = (logp - logq).masked_fill(p == 0, 0.0)
    return (p * log_ratio).sum(dim=-1)


def position_scores(target_logits: Tensor, draft_logits: Tensor, chunk_size: int = 256) -> Tensor:
    """ADAW per-position score v_t = C(P_t) · KL(P_t ‖ Q_t), without gradient.

    Works on `chunk_size` positions at a time so the float32 copies stay at O(B · chunk_size · V)
    however long the sequence (V can be 50k–150k).

    Args:
        target_logits: target next-token logits, aligned with draft_logits. Shape (B, T, V).
        draft_logits: drafter next-token logits. Shape (B, T, V).
        chunk_size: positions per chunk, >= 1.
    Returns:
        Scores >= 0, shape (B, T), float32, detached.
    Raises:
        ValueError: mismatched shapes or chunk_size < 1.
    """
    if target_logits.shape != draft_logits.shape:
        raise ValueError(f"target_logits {tuple(target_logits.shape)} and draft_logits "
                         f"{tuple(draft_logits.shape)} must have the same shape (B, T, V)")
    if chunk_size < 1:
        raise ValueError(f"chunk_size ({chunk_size}) must be >= 1")
    chunks = []
    with torch.no_grad():
        for start in range(0, target_logits.shape[1], chunk_size):
            p = target_logits[:, start:start + chunk_size]
            q = draft_logits[:, start:start + chunk_size]
            chunks.append(target_confidence(p) * kl_divergence(p, q).clamp_min(0.0))
    if not chunks:  # T == 0
        return target_logits.new_zeros(target_logits.shape[:2], dtype=torch.float32)
    return torch.cat(chunks, dim=1)


def window_scores(pos_scores: Tensor, valid_mask: Tensor, window: int) -> Tensor:
    """Score of the window starting at each position: mean v_t over its valid positions.

    Window s covers [s, min(s + window, T)); positions with valid_mask False are left out of the mean.
    Prefix sums are taken in float64 so differences of long cumulative sums stay accurate.

    Args:
        pos_scores: per-position scores from `position_scores`. Shape (B, T).
        valid_mask: True where a position is in the loss mask (not padding / prompt). Shape (B, T), bool.
        window: K, the window length, >= 1.
    Returns:
        Window scores, shape (B, T), float32; -inf where the start is not valid (a valid start
        always has at least one valid position, itself).
    Raises:
        ValueError: window < 1 or mismatched shapes.
    """
    if window < 1:
        raise ValueError(f"window ({window}) must be >= 1")
    if pos_scores.shape != valid_mask.shape:
        raise ValueError(f"pos_scores {tuple(pos_scores.shape)} and valid_mask "
                         f"{tuple(valid_mask.shape)} must have the same shape (B, T)")
    values = torch.where(valid_mask, pos_scores.double(), 0.0)  # padding may hold inf / NaN
    zero_col = values.new_zeros(values.shape[0], 1)
    sums = torch.cat([zero_col, values.cumsum(dim=1)], dim=1)                 # [B, T+1]
    counts = torch.cat([zero_col, valid_mask.double().cumsum(dim=1)], dim=1)  # [B, T+1]
    seq_len = values.shape[1]
    starts = torch.arange(seq_len, device=values.device)
    ends = (starts + window).clamp_max(seq_len)
    window_sum = sums[:, ends] - sums[:, starts]
    window_count = counts[:, ends] - counts[:, starts]
    mean = window_sum / window_count.clamp_min(1.0)
    keep = valid_mask & (window_count > 0)
    return torch.where(keep, mean, -math.inf).float()


def _selection_keys(scores: Tensor, candidate: Tensor, rule: str, generator: torch.Generator,
                    temperature: float) -> tuple[Tensor, Tensor]:
    """(tier, key) per position; selection takes the highest tier, then the highest key within it.

    Tiers: 2 = positive sampling weight, 1 = candidate with zero weight, 0 = not a candidate.
    Sampling without replacement uses the Gumbel-top-n trick: log w + Gumbel noise.
    """
    if rule == "top":
        return candidate.long(), torch.where(candidate, scores.double(), 0.0)
    uniform = torch.rand(scores.shape, generator=generator, dtype=torch.float64,
                         device=generator.device).to(scores.device)
    gumbel = -torch.log(-torch.log(uniform.clamp(1e-300, 1.0 - 1e-16)))
    if rule == "uniform":
        return candidate.long(), torch.where(candidate, gumbel, 0.0)
    # "sample": weight = score^(1/temperature) in log space (no overflow); negative scores weigh 0.
    positive = candidate & (scores > 0)
    log_weight = torch.where(positive, scores.double(), 1.0).log() / temperature
    tier = candidate.long() + positive.long()
    return tier, torch.where(positive, log_weight + gumbel, torch.where(candidate, gumbel, 0.0))


def select_windows(
    scores: Tensor,
    n: int,
    rule: SelectionRule,
    generator: torch.Generator,
    temperature: float = 1.0,
) -> WindowSelection:
    """Pick n window starts per row from window scores.

    Candidates are positions with a finite score. "top": the n highest (ties → lower position).
    "sample": n without replacement with probability ∝ score^(1/temperature); zero (or negative)
    scores are drawn only after every positive one, uniformly, so an all-zero row is uniform among
    its candidates. "uniform": n uniformly without replacement. Rows with fewer than n candidates get
    valid_mask False (and start 0) on the extra slots. Deterministic given the generator's state.

    Args:
        scores: window scores from `window_scores`, -inf where a window may not start. Shape (B, T).
        n: windows per row, >= 1.
        rule: "top", "sample" or "uniform".
        generator: random source (consumed by "sample" and "uniform"); any device.
        temperature: > 0; only "sample" uses it. Lower = greedier.
    Returns:
        WindowSelection(starts [B, n] int64, valid_mask [B, n] bool).
    Raises:
        ValueError: unknown rule, n < 1 or temperature <= 0.
    """
    if rule not in SELECTION_RULES:
        raise ValueError(f"rule {rule!r} must be one of {SELECTION_RULES}")
    if n < 1:
        raise ValueError(f"n ({n}) must be >= 1")
    if temperature <= 0:
        raise ValueError(f"temperature ({temperature}) must be > 0")
    candidate = torch.isfinite(scores)
    tier, key = _selection_keys(scores, candidate, rule, generator, temperature)
    # Two stable sorts = sort by (tier desc, key desc, position asc).
    by_key = torch.sort(key, dim=1, descending=True, stable=True).indices
    by_tier = torch.sort(tier.gather(1, by_key), dim=1, descending=True, stable=True).indices
    order = by_key.gather(1, by_tier)[:, :n]                       # [B, min(n, T)]
    valid = candidate.gather(1, order)
    starts = torch.where(valid, order, 0)
    missing = n - order.shape[1]
    if missing > 0:  # n > T
        starts = torch.cat([starts, starts.new_zeros(starts.shape[0], missing)], dim=1)
        valid = torch.cat([valid, valid.new_zeros(valid.shape[0], missing)], dim=1)
    return WindowSelection(starts=starts, valid_mask=valid)


def adaw_rule_for_step(step: int, warmup_steps: int, rule: str) -> str:
    """Selection rule at a training step: "uniform" for steps < warmup_steps, then `rule`.

    The curriculum switch-on of the paper's Fig. 4 (reward dips and KL rises right after ADAW starts).

    Raises:
        ValueError: unknown rule.
    """
    if rule not in SELECTION_RULES:
        raise ValueError(f"rule {rule!r} must be one of {SELECTION_RULES}")
    return "uniform" if step < warmup_steps else rule


def score_summary(scores: Tensor, valid: Tensor) -> dict[str, float]:
    """Logging summary of the finite scores where `valid` is True.

    Args:
        scores: any scores (e.g. window scores). Shape (B, T).
        valid: True where a score should count. Shape (B, T), bool.
    Returns:
        {"mean", "p50", "p90", "max", "count"}; the statistics are NaN when no score counts.
    """
    kept = scores[valid & torch.isfinite(scores)].detach().double()
    if kept.numel() == 0:
        nan = float("nan")
        return {"mean": nan, "p50": nan, "p90": nan, "max": nan, "count": 0.0}
    quantiles = torch.quantile(kept, kept.new_tensor([0.5, 0.9]))
    return {"mean": kept.mean().item(), "p50": quantiles[0].item(), "p90": quantiles[1].item(),
            "max": kept.max().item(), "count": float(kept.numel())}
