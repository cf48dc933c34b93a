"""Minibatches over window starts: several PPO updates per rollout (`loss.ppo_epochs`, `loss.minibatches`).

A step's rollout (n starts x G windows, their log-probs frozen at drawing time) is split into M parts by
start, interleaved (start i goes to part i mod M), so each part spans the whole sequence. Each update takes
one part; from the second update on the policy is not the one that drew the windows, the PPO ratio moves
away from 1 and the clip bounds how far an update pushes it. Pure functions.
"""

from __future__ import annotations

from typing import NamedTuple, TypeVar

import torch
from torch import Tensor

Part = tuple[int, int]  # (m, M): the m-th of M parts, 0 <= m < M
WHOLE: Part = (0, 1)
T = TypeVar("T", bound=NamedTuple)


def part_index(n: int, part: Part, device: torch.device | None = None) -> Tensor:
    """[n_m] int64 the starts (0..n-1) of part m of M: i with i mod M = m (all of them for M = 1)."""
    m, parts = part
    if not 0 <= m < parts:
        raise ValueError(f"part {m} of {parts} does not exist")
    return torch.arange(m, n, parts, device=device)


def take(rows: T, index: Tensor) -> T:
    """The rows `index` of every field of a NamedTuple of tensors with a leading start dimension [n, ...]."""
    return type(rows)(*(field[index] for field in rows))
