"""Simulated dynamic trees (EAGLE-3): drafted only at the roots the cycle walk reads, and only as deep as
their accepted length is still open.

The T = 0 walk (`simulate.walk_cycles`) reads accept[i] only at the roots it visits: root 0, then root
i + accept[i] + 1 after root i, about 1/τ of all positions. `dynamic_accept_lengths` (the reference) drafts a
full tree at every position; `walked_accept_lengths` gives the walk a `LazyAccept` instead, which drafts a
root's tree when the walk first reads it, batched with the next roots of the walk predicted from there
(`next_roots`), and `tree_accepts` stops growing a tree once its accepted length is decided:

- at T = 0 a node is accepted iff it and its ancestors are kept and each holds the target's next greedy
  token, so only the greedy path's nodes matter (siblings hold distinct tokens). `follow_greedy_path`
  tracks its deepest drafted node per tree;
- once that node has left the frontier (or no child of it holds the next greedy token), the path cannot
  grow, and once no frontier node scores above it, no later candidate can push a path node out of the
  kept top `total_tokens` either: later candidates score at most their frontier parent (log-probs are
  <= 0, also in floating point) and lose ties to shallower nodes (`build_tree`'s order). Then
  `build_tree` + `greedy_path` on the candidates drafted so far give the full tree's accepted length.
  A root whose first level misses the next greedy token is decided before any drafter step (0).

A guess steers the batches, never a result: every value the walk reads is drafted by the reference's own
functions (`tree_draft`, `build_tree`, `greedy_path`). Bit for bit so where a drafter row is computed the
same whichever rows share its batch: on the CPU with one torch thread (checked against the reference on the
committed drafters: tests/test_simulate_walk.py); with several threads, or on a GPU, a small batch may round
differently in the last bit (docs/evaluation.md, "Simulated acceptance").
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from ppow_plugin.evaluation import tree_decode, tree_draft

ROOT_CHUNK = 32     # roots per batched drafter pass (bounds memory: chunk × nodes × sequence)


# --- pure: which roots to draft ------------------------------------------------------------------------


def hit_runs(hits: Sequence[bool], cap: int) -> list[int]:
    """runs[p] = how many of hits[p], hits[p+1], ... are True in a row, at most `cap`."""
    runs, run = [0] * len(hits), 0
    for p in range(len(hits) - 1, -1, -1):
        run = min(run + 1, cap) if hits[p] else 0
        runs[p] = run
    return runs


def next_roots(start: int, known: dict[int, int], guess: Sequence[int], n_roots: int, limit: int) -> list[int]:
    """The next roots to draft: the unknown ones on the walk predicted from `start`.

    Args:
        start: the root the walk reads now (unknown).
        known: accept[j] of every root j drafted so far.
        guess: [n_roots] an estimate of accept[j] for every root (0: a first-level miss, decided without a
            drafter step, so it does not count toward `limit`).
        n_roots: roots 0 .. n_roots - 1 exist.
        limit: at most this many roots with guess > 0 (plus `start`).
    Returns:
        ascending root indices, `start` first.
    """
    out, j, used = [], start, 0
    while j < n_roots and (used < limit or j == start):
        if j in known:
            j += known[j] + 1
            continue
        out.append(j)
        used += guess[j] > 0
        j += max(int(guess[j]), 0) + 1
    return out


class LazyAccept:
    """accept[i] for i < n_roots, drafted on first read in batches along the predicted walk.

    Args:
        guess: [n_roots] estimate of accept (`next_roots`).
        draft: roots (ascending list) -> their accepted drafts (same order).
        batch: `next_roots`' limit.
    Attributes:
        drafted: roots passed to `draft`; calls: `draft` calls.
    """

    def __init__(self, guess: Sequence[int], n_roots: int, draft: Callable[[list[int]], list[int]], batch: int):
        self.known: dict[int, int] = {}
        self.guess, self.n_roots, self.draft, self.batch = guess, n_roots, draft, batch
        self.drafted = self.calls = 0

    def __len__(self) -> int:
        return self.n_roots

    def __getitem__(self, i: int) -> int:
        if not 0 <= i < self.n_roots:
            raise IndexError(f"root {i} outside 0 .. {self.n_roots - 1}")
        if i not in self.known:
            roots = next_roots(i, self.known, self.guess, self.n_roots, self.batch)
            values = self.draft(roots)
            if len(values) != len(roots):
                raise AssertionError(f"draft returned {len(values)} values for {len(roots)} roots")
            self.known.update(zip(roots, map(int, values)))
            self.drafted += len(roots)
            self.calls += 1
        return self.known[i]


# --- the greedy path through a growing tree ------------------------------------------------------------


class GreedyPath(NamedTuple):
    node: Tensor   # [B] int64 candidate id of the deepest drafted node on the greedy path (-1: the root)
    score: Tensor  # [B] float32 its cumulative log-prob (0 at the root)
    open: Tensor   # [B] bool it is in the frontier: the path may grow at the next level


def follow_greedy_path(g: tree_draft.Growth, greedy: Tensor, path: GreedyPath) -> GreedyPath:
    """`path` extended by `g`'s newest level: the child of its node that holds the next greedy token.

    Args:
        greedy: [B, depth + 1] int64 the greedy tokens after each root.
    """
    tokens, parent, score = g.tokens[-1], g.parent[-1], g.score[-1]               # [B, C_level]
    first_id = sum(t.shape[1] for t in g.tokens[:-1])
    match = (parent == path.node[:, None]) & (tokens == greedy[:, g.level, None]) & path.open[:, None]
    found, col = match.any(1), match.long().argmax(1)
    node = torch.where(found, first_id + col, path.node)
    return GreedyPath(node, torch.where(found, score.gather(1, col[:, None])[:, 0], path.score),
                      found & (g.frontier == node[:, None]).any(1))


def decided(g: tree_draft.Growth, path: GreedyPath) -> Tensor:
    """[B] bool: the greedy path cannot grow and no later candidate can outrank its nodes (module doc)."""
    return ~path.open & (g.f_score.max(1).values <= path.score)


# --- drafting -------------------------------------------------------------------------------------------


def tree_accepts(drafter, seq: Any, roots: Tensor, tree, early: bool = True) -> list[int]:
    """Accepted drafts of the decoder's dynamic tree at each of `roots` ([n] sequence positions), one batch.

    Args:
        seq: a `simulate.Sequencer` (ids [T], the teacher-forced pass's out_features [T-1, H], kv, logits).
        tree: depth / top_k / total_tokens.
        early: stop growing each tree once its accepted length is decided (`decided`); False grows every
            tree to full depth (the reference).
    """
    ids, past, dev = seq.ids.cpu(), seq.dpass.out_features.shape[0], seq.ids.device  # trees are built on the CPU
    roots = roots.to(dev)
    visible = torch.arange(past, device=dev)[None] < roots[:, None]        # [n, T-1] pairs before each root
    g = tree_draft.start_trees(drafter, seq.dpass.kv, visible, seq.dpass.out_features[roots - 1],
                               seq.logits[roots - 1], roots, tree.top_k)
    greedy = seq.ids[roots[:, None] + torch.arange(1, tree.depth + 2, device=dev)]  # [n, depth + 1]
    n = roots.numel()
    path = GreedyPath(torch.full((n,), -1, dtype=torch.long, device=dev), torch.zeros(n, device=dev),
                      torch.ones(n, dtype=torch.bool, device=dev))
    rows, out = torch.arange(n, device=dev), [0] * n                        # rows: g's rows in `roots`
    while True:
        path = follow_greedy_path(g, greedy, path)
        done = torch.full((rows.numel(),), g.level == tree.depth, dtype=torch.bool, device=dev)
        if early:
            done |= decided(g, path)
        if done.any():
            idx = done.nonzero()[:, 0]
            cand = [x[idx].cpu() for x in tree_draft.candidates(g)]
            for j, r in enumerate(rows[idx].tolist()):
                root = int(roots[r])
                t = tree_decode.build_tree(int(ids[root]), *(x[j] for x in cand), tree.total_tokens)
                out[r] = tree_decode.greedy_path(t, ids[root + t.depth + 1])[1]  # target's next token per node
            keep = (~done).nonzero()[:, 0]
            if keep.numel() == 0:
                return out
            g, path, rows, greedy = tree_draft.take_rows(g, keep), GreedyPath(*(x[keep] for x in path)), \
                rows[keep], greedy[keep]
        g = tree_draft.grow(drafter, g)


def dynamic_accept_lengths(drafter, seq: Any, roots: Tensor, tree) -> Tensor:
    """[R] accepted drafts of the dynamic tree at EVERY root, full trees of `ROOT_CHUNK` roots per batch
    (the reference for `walked_accept_lengths`)."""
    out = [a for chunk in roots.split(ROOT_CHUNK) for a in tree_accepts(drafter, seq, chunk, tree, early=False)]
    return torch.tensor(out, dtype=torch.long, device="cpu")  # per-root counts: read on the CPU


def walked_accept_lengths(drafter, seq: Any, roots: Tensor, tree) -> LazyAccept:
    """[R] accepted drafts of the dynamic tree at `roots`, drafted when the walk reads them (module doc).

    The guess for root r: how many teacher-forced rows in a row from r - 1 have the next greedy token among
    their top-k drafts (free: the teacher-forced logits exist; the tree's first level reads row r - 1).
    """
    children, _ = tree_draft.root_children(seq.logits, drafter.d2t, tree.top_k)    # [T-1, k], row p: x_{p+2}
    hits = (children[:-1] == seq.ids[2:children.shape[0] + 1, None]).any(1).tolist() + [False]
    runs = hit_runs(hits, tree.depth + 1)
    guess = [runs[r - 1] for r in roots.tolist()]
    return LazyAccept(guess, roots.numel(), lambda idx: tree_accepts(drafter, seq, roots[idx], tree), ROOT_CHUNK)


__all__ = ["GreedyPath", "LazyAccept", "ROOT_CHUNK", "decided", "dynamic_accept_lengths", "follow_greedy_path",
           "hit_runs", "next_roots", "tree_accepts", "walked_accept_lengths"]
