"""Bootstrap confidence intervals for τ over prompts, and paired intervals for τ changes between drafters.

τ of a prompt set is a ratio of sums (Σ kept tokens / Σ counted cycles, `eval_report.summarize`), so
each resample draws prompts with replacement and recomputes that ratio; the interval is the percentile
interval of the resampled values. A drafter comparison resamples the SAME prompts for both drafters
(paired), so prompt difficulty, which moves both τ together, cancels out of the relative change.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

RESAMPLES = 2000
LEVEL = 0.95


class Interval(NamedTuple):
    value: float       # the statistic on the full prompt set
    low: float         # lower end of the LEVEL percentile interval
    high: float        # upper end
    prompts: int       # prompts resampled
    resamples: int

    def percent(self) -> str:
        """'+4.1 % [+1.9, +6.3]' for a relative change."""
        return f"{self.value * 100:+.1f} % [{self.low * 100:+.1f}, {self.high * 100:+.1f}]"

    def plain(self) -> str:
        """'1.52 [1.47, 1.58]'."""
        return f"{self.value:.2f} [{self.low:.2f}, {self.high:.2f}]"


def _draws(n: int, resamples: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))  # [resamples, n]


def _percentiles(values: np.ndarray, level: float) -> tuple[float, float]:
    lo, hi = np.nanpercentile(values, [(1 - level) / 2 * 100, (1 + level) / 2 * 100])
    return float(lo), float(hi)


def ratio_interval(num: Sequence[float], den: Sequence[float], resamples: int = RESAMPLES, seed: int = 0,
                   level: float = LEVEL) -> Interval:
    """Bootstrap interval of Σ num / Σ den over items (prompts).

    Args:
        num, den: per-prompt numerators (kept tokens) and denominators (counted cycles), same length n >= 1.
    """
    num_a, den_a = np.asarray(num, dtype=float), np.asarray(den, dtype=float)
    value = float(num_a.sum() / den_a.sum()) if den_a.sum() > 0 else float("nan")
    if num_a.size == 0:
        return Interval(value, float("nan"), float("nan"), 0, resamples)
    idx = _draws(num_a.size, resamples, seed)
    with np.errstate(invalid="ignore", divide="ignore"):
        boot = num_a[idx].sum(1) / den_a[idx].sum(1)
    return Interval(value, *_percentiles(boot, level), int(num_a.size), resamples)


def paired_relative_interval(num_ref: Sequence[float], den_ref: Sequence[float], num: Sequence[float],
                             den: Sequence[float], resamples: int = RESAMPLES, seed: int = 0,
                             level: float = LEVEL) -> Interval:
    """Paired bootstrap interval of τ / τ_ref − 1, with τ = Σ num / Σ den over the same prompts.

    Args:
        num_ref, den_ref: the reference drafter's per-prompt kept tokens and cycles.
        num, den: the other drafter's, prompt i in the same position.
    Raises:
        ValueError: the two lists differ in length (the prompts are not paired).
    """
    arrays = [np.asarray(x, dtype=float) for x in (num_ref, den_ref, num, den)]
    if len({a.size for a in arrays}) != 1:
        raise ValueError(f"paired bootstrap needs the same prompts for both drafters, got sizes "
                         f"{[a.size for a in arrays]}")
    nr, dr, n, d = arrays
    with np.errstate(invalid="ignore", divide="ignore"):
        value = float((n.sum() / d.sum()) / (nr.sum() / dr.sum()) - 1)
        if n.size == 0:
            return Interval(value, float("nan"), float("nan"), 0, resamples)
        idx = _draws(n.size, resamples, seed)
        boot = (n[idx].sum(1) / d[idx].sum(1)) / (nr[idx].sum(1) / dr[idx].sum(1)) - 1
    return Interval(value, *_percentiles(boot, level), int(n.size), resamples)
