"""Drafting EAGLE-3 dynamic trees, level by level, for B roots at once (`tree_decode` lays them out).

A tree grows from its root's last committed pair: the root's top-k children (`root_children`), then
`depth` levels, each expanding the k best frontier nodes (by cumulative drafter log-prob) into their top-k
children. `draft_candidates` runs every level; the steps are exposed (`start_trees`, `grow`, `take_rows`,
`candidates`) so the simulation can stop drafting a root once its result is decided (`tree_walk`) with the
very same arithmetic per level.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ppow_plugin.drafters.draft_vocab import draft_to_target_ids
from ppow_plugin.drafters.eagle3 import DraftKV, Eagle3Drafter


class Candidates(NamedTuple):
    """Drafted nodes of B dynamic trees, before `build_tree` keeps the best `total_tokens` of each."""
    tokens: Tensor  # [B, C] int64 target ids
    parent: Tensor  # [B, C] int64 candidate index of the parent, -1 = the root
    score: Tensor   # [B, C] float32 cumulative drafter log-prob
    depth: Tensor   # [B, C] int64 (root children = 1)


class Growth(NamedTuple):
    """B trees after `level` expansion levels (candidate ids count level 0's k, then k*k per level)."""
    tokens: list[Tensor]   # per level: [B, k] (level 0) or [B, k*k] int64 target ids
    parent: list[Tensor]   # same shapes, int64 candidate id of the parent (-1 = the root)
    score: list[Tensor]    # same shapes, float32 cumulative log-prob
    depth: list[Tensor]    # same shapes, int64
    frontier: Tensor       # [B, k] int64 candidate ids the next level expands
    f_hidden: Tensor       # [B, k, H] drafter output at each frontier node's parent (the root's for level 0)
    f_score: Tensor        # [B, k] float32 their scores, best first
    f_anc: Tensor          # [B, k, E] bool tree entries (of E drafted so far) each frontier node attends
    committed: Tensor      # [B, k, S] bool committed pairs each root attends
    kv: DraftKV            # [B or 1, kv_heads, S+E, head_dim] committed pairs, then the tree entries
    root_pos: Tensor       # [B] int64 sequence position of each root
    level: int


def root_children(last_logits: Tensor, d2t: Tensor, top_k: int) -> tuple[Tensor, Tensor]:
    """The k children of each root, the first level of its tree.

    Args:
        last_logits: [B, Vd] drafter logits at each root's last committed pair.
        d2t: [Vd] int64 draft-to-target offsets.
    Returns:
        target ids [B, k] int64 and cumulative log-probs [B, k] fp32, best first.
    """
    top = F.log_softmax(last_logits.float(), -1).topk(top_k)
    return draft_to_target_ids(top.indices, d2t), top.values


def start_trees(drafter: Eagle3Drafter, kv: DraftKV, visible: Tensor, last_hidden: Tensor, last_logits: Tensor,
                root_pos: Tensor, top_k: int) -> Growth:
    """Level 0 of B trees: each root's top-k children, all of them the frontier (args: `draft_candidates`)."""
    dev, (b, hidden) = last_hidden.device, last_hidden.shape
    first, first_scores = root_children(last_logits, drafter.d2t, top_k)     # [B, k] each
    return Growth([first], [torch.full((b, top_k), -1, dtype=torch.long, device=dev)], [first_scores],
                  [torch.ones(b, top_k, dtype=torch.long, device=dev)],
                  torch.arange(top_k, device=dev).expand(b, top_k),
                  last_hidden[:, None].expand(b, top_k, hidden), first_scores,
                  torch.zeros(b, top_k, 0, dtype=torch.bool, device=dev),
                  visible[:, None].expand(b, top_k, visible.shape[1]),
                  tuple(t.expand(b, *t.shape[1:]) for t in kv), root_pos, 0)


def grow(drafter: Eagle3Drafter, g: Growth) -> Growth:
    """One more level: the k frontier nodes of each tree are drafted (one drafter step of B·k rows, each
    attending its root's committed pairs, its ancestors and itself), their k·k children scored, and the
    k best children become the next frontier."""
    b, k = g.frontier.shape
    dev, level, n_cand = g.frontier.device, g.level + 1, sum(t.shape[1] for t in g.tokens)
    eye = torch.eye(k, dtype=torch.bool, device=dev).expand(b, k, k)
    anc = torch.cat([g.f_anc, eye], dim=2)                                   # [B, k, E+k]
    mask = torch.cat([g.committed, anc], dim=2)                              # [B, k, S+E+k]
    pos = (g.root_pos + level - 1)[:, None].expand(b, k)
    f_tokens = torch.cat(g.tokens, 1).gather(1, g.frontier)                  # [B, k]
    out, logits, kv = drafter(g.f_hidden, f_tokens, past_kv=g.kv, position_ids=pos, attention_mask=mask)
    child = F.log_softmax(logits.float(), -1).topk(k)                        # [B, k, k]
    cum = (g.f_score[..., None] + child.values).reshape(b, k * k)            # [B, k*k]
    best = cum.topk(k).indices                                               # [B, k] into the k*k children
    rows = best // k
    return Growth(g.tokens + [draft_to_target_ids(child.indices.reshape(b, k * k), drafter.d2t)],
                  g.parent + [g.frontier.repeat_interleave(k, dim=1)], g.score + [cum],
                  g.depth + [torch.full((b, k * k), level + 1, dtype=torch.long, device=dev)],
                  n_cand + best, out.gather(1, rows[..., None].expand(b, k, out.shape[-1])), cum.gather(1, best),
                  anc.gather(1, rows[..., None].expand(b, k, anc.shape[-1])), g.committed, kv, g.root_pos, level)


def take_rows(g: Growth, rows: Tensor) -> Growth:
    """The trees `rows` ([m] int64 indices into B) of a growth, to keep growing only those."""
    pick = lambda t: t[rows]  # noqa: E731
    return Growth(*(list(map(pick, x)) for x in (g.tokens, g.parent, g.score, g.depth)),
                  *map(pick, (g.frontier, g.f_hidden, g.f_score, g.f_anc, g.committed)),
                  tuple(map(pick, g.kv)), pick(g.root_pos), g.level)


def candidates(g: Growth) -> Candidates:
    """Every candidate drafted so far: [B, k + level·k²] each, in candidate-id order."""
    return Candidates(*(torch.cat(x, 1) for x in (g.tokens, g.parent, g.score, g.depth)))


def draft_candidates(drafter: Eagle3Drafter, kv: DraftKV, visible: Tensor, last_hidden: Tensor,
                     last_logits: Tensor, root_pos: Tensor, depth: int, top_k: int) -> Candidates:
    """Grow the dynamic trees of B roots at once, from each root's last committed pair.

    The decoder grows one tree per cycle (B = 1, `draft_tree`); the simulation (`simulate.py`) grows the
    trees of many roots of a sequence in one batch, each root seeing only its own prefix of a shared
    cache. Per level, root b's k frontier nodes attend its visible committed pairs, their own ancestors
    and themselves.

    Args:
        kv: drafter cache of committed pairs, (k, v) each [1 or B, kv_heads, S, head_dim] (read only).
        visible: [B, S] bool, True where root b may attend committed pair s (its prefix).
        last_hidden: [B, H] drafter out_hidden at each root's last committed pair.
        last_logits: [B, Vd] drafter logits there (they predict the root's children).
        root_pos: [B] int64 sequence position of each root (= committed tokens before it).
    Returns:
        Candidates, [B, top_k + depth·top_k²] each.
    """
    g = start_trees(drafter, kv, visible, last_hidden, last_logits, root_pos, top_k)
    for _ in range(depth):
        g = grow(drafter, g)
    return candidates(g)


__all__ = ["Candidates", "Growth", "candidates", "draft_candidates", "grow", "root_children", "start_trees",
           "take_rows"]
