"""Simulated acceptance at temperature 0: what EAGLE decoding would do, without decoding.

    ppow eval --drafter DIR --simulate [--benchmarks ...] [--prompts FILE]
    tau = evaluate.simulate_tau("runs/sft/drafter", benchmarks="mt_bench", num_prompts=80)

At T = 0 the decoder commits exactly the target's greedy continuation (`continuations.py`), so a cycle
whose root is new token i accepts a number a_i of drafts that depends only on the continuation, the
target's features of it and the drafter. We compute a_i for every root position with a few batched
drafter passes, then replay the decoder cycle by cycle (`walk_cycles`): root i, accepted drafts
i+1..i+a_i, bonus token i+a_i+1 = next root. Counting then goes through the same `truncate_generation`
as real decoding, so τ is the same number a decode would report.

What the drafter sees, as in the decoders: committed pairs (target feature f_j, token x_{j+1}) for every
position before the root (EAGLE-1 `cnets.Model.topK_genrate` / our `tree_decode.generate_eagle3`); the
root's children come from the drafter's output at the last committed pair; deeper nodes read the
drafter's own output of their parent, at rotary position root + depth - 1, attending the committed
prefix, their ancestors and themselves. A teacher-forced pass over the whole sequence gives every
root's committed state at once; prefix masks keep each root to its own past.

Trees:
1. Dynamic (EAGLE-3 drafters, as `ppow eval`): `tree_decode.draft_candidates` + `build_tree` +
   `greedy_path`, the decoder's own functions, batched over roots. The kept set depends on every
   drafted node's score, so a root's tree is drafted level by level until its accepted length cannot
   change, and only at the roots the walk reads (`tree_walk`); `every_root=True` drafts the full tree at
   every root (the reference, equal root by root: tests/test_simulate_walk.py).
2. Static (EAGLE-1 drafters: the host's `mc_sim_7b_63`; `chain(d)`: a plain chain of depth d). A static
   tree's node set does not depend on the drafter, so only the nodes on the greedy path can be accepted:
   we draft the greedy path itself (`rollout.draft_windows` re-scoring the continuation, one row per
   root) and read each true token's rank among its parent's top-10 drafts (`TOPK`, the host's); the
   accepted depth is the longest prefix of ranks that is a path of the tree.

Exactness and its limit: the features and logits here come from one full forward and one batched
drafter pass instead of the decoder's incremental, tree-masked ones. Equal in exact arithmetic; in fp32
a near-tie between two drafts (or two target tokens) can resolve differently. tests/test_simulate.py
compares with the decoders cycle by cycle; docs/evaluation.md has the tolerance and the measured rate.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any, NamedTuple

import torch
from torch import Tensor

from ppow_plugin.data import continuations
from ppow_plugin.drafters import adapters
from ppow_plugin.evaluation import eval_report, tree_walk
from ppow_plugin.host import eagle_compat
from ppow_plugin.method import rollout

TOPK = 10           # children the host drafts per static-tree node (eagle/model/cnets.py `top_k`)
MARGIN = 16         # continuation tokens past max_new_tokens: roots up to max_new_tokens need depth + 2 more

# Stop rules after a cycle that commits `new` tokens in all: the host's eagenerate stops once
# new > max_new_tokens, our generate_eagle3 once new >= max_new_tokens (counting then cuts both alike).
STOP_RULES: dict[str, Callable[[int, int], bool]] = {"host": lambda new, budget: new > budget,
                                                     "ppow": lambda new, budget: new >= budget}


class StaticTree(NamedTuple):
    """A static draft tree as paths of top-k ranks (the host's format, e.g. `mc_sim_7b_63`)."""
    choices: tuple[tuple[int, ...], ...]

    @property
    def depth(self) -> int:
        return max(len(c) for c in self.choices)


def chain(depth: int) -> StaticTree:
    """A plain chain of `depth` drafts: the drafter's top-1 at every step."""
    return StaticTree(tuple((0,) * d for d in range(1, depth + 1)))


def host_tree() -> StaticTree:
    """The EAGLE-1 host's default static tree `mc_sim_7b_63` (25 nodes, depth 5)."""
    return StaticTree(tuple(tuple(c) for c in eagle_compat.default_tree_choices()))


class Cycles(NamedTuple):
    accept_lengths: list[int]   # per cycle the decoder runs: accepted drafts, bonus excluded
    new_tokens: int             # tokens it commits (overshoot past the budget and past EOS included)


# --- pure: the cycle walk and static-tree acceptance ----------------------------------------------


def walk_cycles(accept: Sequence[int], tokens: Sequence[int], eos_token_id: int | None, max_new_tokens: int,
                stop: str = "host") -> Cycles:
    """Replay the decoder at T = 0: the cycle rooted at new token i commits tokens i .. i + accept[i].

    Args:
        accept: accept[i] = accepted drafts of a cycle whose root is new token i (defined up to the last
            root the walk can reach: max_new_tokens, or the first EOS if earlier).
        tokens: the greedy continuation (new tokens only).
        eos_token_id: stop after a cycle that commits it (None: never).
        stop: "host" (eagenerate: stop once new > max_new_tokens) or "ppow" (generate_eagle3: >=).
    Returns:
        Cycles: the accept lengths of every cycle run and the tokens committed.
    """
    over = STOP_RULES[stop]
    new, lengths = 0, []
    while True:
        a = int(accept[new])
        lengths.append(a)
        block = tokens[new:new + a + 1]
        new += a + 1
        if (eos_token_id is not None and eos_token_id in block) or over(new, max_new_tokens):
            return Cycles(lengths, new)


def static_accept(ranks: Tensor, tree: StaticTree) -> Tensor:
    """Accepted drafts per root on a static tree, from the ranks of the true tokens.

    Args:
        ranks: [R, D] int64, ranks[r, j] = rank of the greedy token at depth j+1 among the top-`TOPK`
            drafts of its parent (the true path's node at depth j), -1 if not among them.
    Returns:
        [R] int64 longest j such that ranks[r, :j] is a path of the tree.
    """
    paths = set(tree.choices)
    out = []
    for row in ranks.tolist():
        a = 0
        while a < len(row) and row[a] >= 0 and tuple(row[:a + 1]) in paths:
            a += 1
        out.append(a)
    return torch.tensor(out, dtype=torch.long)


def true_ranks(logits: Tensor, true_ids: Tensor, d2t: Tensor | None) -> Tensor:
    """Rank of each true token among the top-`TOPK` drafts of a row ([..., Vd] logits, [...] target ids) or -1."""
    top = logits.topk(TOPK, dim=-1).indices  # [..., TOPK] draft ids, best first
    if d2t is not None:
        top = top + d2t[top]
    hit = top == true_ids[..., None]
    return torch.where(hit.any(-1), hit.long().argmax(-1), torch.full_like(true_ids, -1))


# --- drafter passes -------------------------------------------------------------------------------


class Sequencer(NamedTuple):
    """One prompt's greedy sequence and the drafter's teacher-forced pass over it, on the drafter's device."""
    ids: Tensor            # [T] int64 prompt + continuation
    dpass: Any             # rollout.DraftPass: out_features [T-1, H] (row j = after pair (f_j, x_{j+1})), kv
    logits: Tensor | None  # [T-1, Vd] drafter logits (EAGLE-3 only; EAGLE-1 applies the head per root)


def teacher_forced(fmt: str, drafter, target, cont: continuations.Continuation) -> Sequencer:
    """The drafter's pass over a cached continuation (CPU, fp32 features), moved to its device and dtype."""
    param = next(drafter.parameters())
    feats, ids = cont.features.to(param.device, param.dtype), cont.ids.to(param.device)
    if fmt == "eagle1":  # the head runs later on the rows that need it (49 k-row head: the main cost)
        return Sequencer(ids, rollout.draft_forward(drafter, feats, ids), None)
    dpass, logits = adapters.ADAPTERS[fmt].teacher_forced(drafter, target, feats, ids)
    return Sequencer(ids, dpass, logits)


def _head_and_step(fmt: str, drafter, target):
    """The drafter's head (features -> logits over its vocabulary) and its one-token cached step."""
    if fmt == "eagle3":
        return (lambda h: drafter.lm_head(drafter.norm(h))), adapters.eagle3_step
    return (lambda h: target.lm_head(h.to(target.lm_head.weight.dtype))), rollout.eagle1_step


def draft_greedy_path(fmt: str, drafter, target, seq: Sequencer, roots: Tensor, depth: int, on_depth) -> None:
    """Drafts the greedy path after each root, depth by depth, as the decoders' drafter step does.

    Row r feeds the true tokens after root r one at a time (the drafter step `rollout.draft_windows` uses,
    with its prefix mask). At depth j+1, `on_depth(j, rows [m] root indices, ranks [m])` gets the rank of
    each live row's true token among its top-`TOPK` drafts (-1: not among them) and returns the positions
    (into `rows`) of the rows to draft further; the rest leave the batch.
    """
    head, step = _head_and_step(fmt, drafter, target)
    d2t = getattr(drafter, "d2t", None)
    dev = seq.ids.device
    roots = roots.to(dev)
    true = seq.ids[roots[:, None] + torch.arange(1, depth + 1, device=dev)]  # [R, D] greedy tokens after each root
    past = seq.dpass.out_features.shape[0]
    rows = torch.arange(roots.numel(), device=dev)                           # rows still drafted
    feat = seq.dpass.out_features[roots - 1][:, None]                        # [m, 1, H] after the last committed pair
    kv = _rows(seq.dpass.kv, torch.zeros_like(rows))
    prefix = torch.arange(past, device=dev)[None] < roots[:, None]           # [m, past]
    for j in range(depth):
        keep = on_depth(j, rows, true_ranks(head(feat[:, 0]).float(), true[rows, j], d2t))
        if j == depth - 1 or not keep:
            return
        keep_t = torch.tensor(keep, device=dev)
        rows, feat, kv, prefix = rows[keep_t], feat[keep_t], _rows(kv, keep_t), prefix[keep_t]
        mask = torch.cat([prefix, torch.ones(len(keep), j + 1, dtype=torch.bool, device=dev)], 1)
        feat, kv = step(drafter, feat, true[rows, j], kv, (roots[rows] + j)[:, None], mask)  # target ids, both families


def static_accept_lengths(fmt: str, drafter, target, seq: Sequencer, roots: Tensor, tree: StaticTree) -> Tensor:
    """[R] accepted drafts of a static tree at each root position (sequence indices).

    A row is dropped as soon as its path leaves the tree, so the 49 k-row head runs only where a node
    could still be accepted.
    """
    paths = set(tree.choices)
    accept = torch.zeros(roots.numel(), dtype=torch.long)
    ranks: list[list[int]] = [[] for _ in range(roots.numel())]

    def on_tree_path(j: int, rows: Tensor, rank: Tensor) -> list[int]:
        keep = []
        for i, (r, k) in enumerate(zip(rows.tolist(), rank.tolist())):  # depth j+1 among parent's top-10
            if k >= 0 and tuple(ranks[r] + [k]) in paths:
                ranks[r].append(k)
                accept[r] = j + 1
                keep.append(i)
        return keep

    draft_greedy_path(fmt, drafter, target, seq, roots, tree.depth, on_tree_path)
    return accept


def depth_ranks(fmt: str, drafter, target, seq: Sequencer, roots: Tensor, depth: int) -> Tensor:
    """[R, D] rank of the true token at each draft depth among the drafter's top-`TOPK` (-1: not among
    them), every row drafted to depth D along the greedy path whatever it drafted before (a chain)."""
    out = torch.full((roots.numel(), depth), -1, dtype=torch.long)

    def every_row(j: int, rows: Tensor, rank: Tensor) -> list[int]:
        out[rows.cpu(), j] = rank.cpu()
        return list(range(rows.numel()))

    draft_greedy_path(fmt, drafter, target, seq, roots, depth, every_row)
    return out


def _rows(kv, idx: Tensor):
    """Rows `idx` of a nested-tuple cache of [B, ...] tensors (B = 1 broadcasts)."""
    if isinstance(kv, Tensor):
        return kv.expand(idx.numel(), *kv.shape[1:]) if kv.shape[0] == 1 else kv[idx]
    return tuple(_rows(x, idx) for x in kv)


def accept_lengths(fmt: str, drafter, target, seq: Sequencer, roots: Tensor, tree,
                   every_root: bool = False) -> Sequence[int]:
    """Accepted drafts at each root (entry i: root `roots[i]`). A dynamic tree is drafted lazily, only at the
    roots the walk reads and only as deep as needed (`tree_walk.walked_accept_lengths`), unless `every_root`
    (the reference, `tree_walk.dynamic_accept_lengths`: every root, full trees)."""
    if isinstance(tree, StaticTree):
        return static_accept_lengths(fmt, drafter, target, seq, roots, tree).tolist()
    if fmt != "eagle3":
        raise ValueError("dynamic trees need an EAGLE-3 drafter (the EAGLE-1 host drafts static trees)")
    if every_root:
        return tree_walk.dynamic_accept_lengths(drafter, seq, roots, tree).tolist()
    return tree_walk.walked_accept_lengths(drafter, seq, roots, tree)


# --- one prompt, many prompts ---------------------------------------------------------------------


def tree_depth(tree) -> int:
    """Most drafts one cycle can accept."""
    return tree.depth if isinstance(tree, StaticTree) else tree.depth + 1


def tree_text(tree) -> str:
    """How a report names the simulated tree."""
    if isinstance(tree, StaticTree):
        if tree.choices == chain(tree.depth).choices:
            return f"chain of depth {tree.depth} (top-1 drafts)"
        host = "host default mc_sim_7b_63, " if tree == host_tree() else ""
        return f"static tree ({host}{len(tree.choices)} draft nodes + root, depth {tree.depth})"
    return f"EAGLE-3 dynamic tree (depth {tree.depth}, top-k {tree.top_k}, {tree.total_tokens} draft nodes + root)"


def continuation_length(max_new_tokens: int, tree) -> int:
    return max_new_tokens + max(MARGIN, tree_depth(tree) + 3)


@torch.no_grad()
def simulate_one(fmt: str, drafter, target, cont: continuations.Continuation, max_new_tokens: int, tree,
                 eos_token_id: int | None, stop: str, every_root: bool = False, seq: Sequencer | None = None
                 ) -> Cycles:
    """The decoder's cycles on one prompt (see the module doc); `every_root`: `accept_lengths`' reference;
    `seq`: the drafter's `teacher_forced` pass over `cont` when the caller already has it."""
    seq = seq if seq is not None else teacher_forced(fmt, drafter, target, cont)
    roots = _roots(cont, max_new_tokens, eos_token_id)
    accept = accept_lengths(fmt, drafter, target, seq, roots, tree, every_root)
    return walk_cycles(accept, cont.ids[cont.prompt_len:].tolist(), eos_token_id, max_new_tokens, stop)


def _roots(cont: continuations.Continuation, max_new_tokens: int, eos_token_id: int | None) -> Tensor:
    """Sequence positions a cycle can root at: the prompt's last token up to the budget or the first EOS."""
    new = cont.ids[cont.prompt_len:].tolist()
    last = max_new_tokens
    if eos_token_id is not None and eos_token_id in new[:max_new_tokens]:
        last = new.index(eos_token_id)
    return torch.arange(cont.prompt_len, cont.prompt_len + last + 1)


@torch.no_grad()
def topk_by_depth(fmt: str, drafter, target, conts: Sequence[continuations.Continuation],
                  benchmarks: Sequence[str], max_new_tokens: int, depth: int, eos_token_id: int | None
                  ) -> dict[str, dict]:
    """Top-1 / top-3 acceptance at each draft depth, per benchmark and "overall".

    Every root position of every continuation (as `simulate_one` roots cycles) is drafted as a chain of
    `depth` along the greedy path; at depth d the rate is the share of roots whose true token is the
    drafter's top-1 (top-3) there, given the true tokens before it: EAGLE's "acceptance at depth d" with
    every earlier draft forced right. -> {bench: {"roots": n, "top1": [D], "top3": [D]}}.
    """
    sums: dict[str, Tensor] = {}
    counts: dict[str, int] = {}
    for cont, bench in zip(conts, benchmarks):
        ranks = depth_ranks(fmt, drafter, target, teacher_forced(fmt, drafter, target, cont),
                            _roots(cont, max_new_tokens, eos_token_id), depth)        # [R, D]
        hits = torch.stack([(ranks == 0).sum(0), ((ranks >= 0) & (ranks < 3)).sum(0)])  # [2, D]
        for key in (bench, "overall"):
            sums[key] = sums.get(key, 0) + hits
            counts[key] = counts.get(key, 0) + ranks.shape[0]
    return {k: {"roots": counts[k], "top1": (sums[k][0] / counts[k]).tolist(),
                "top3": (sums[k][1] / counts[k]).tolist()} for k in sums}


@torch.no_grad()
def chain_accept_mean(fmt: str, drafter, target, conts: Sequence[continuations.Continuation], max_new_tokens: int,
                      depth: int, eos_token_id: int | None, seqs: Sequence[Sequencer] | None = None) -> float:
    """Mean accepted drafts of a greedy chain of `depth` over every root of every continuation (each position a
    cycle could root at, not only those the decoder's walk reads): the greedy-window k on that text. `seqs`:
    the drafter's `teacher_forced` pass over each continuation when the caller already has them."""
    accepted, roots = 0, 0
    for i, cont in enumerate(conts):
        seq = seqs[i] if seqs is not None else teacher_forced(fmt, drafter, target, cont)
        starts = _roots(cont, max_new_tokens, eos_token_id)
        accept = static_accept_lengths(fmt, drafter, target, seq, starts, chain(depth))
        accepted, roots = accepted + int(accept.sum()), roots + accept.numel()
    return accepted / max(1, roots)


def simulate_records(fmt: str, drafter, target, conts: Sequence[continuations.Continuation],
                     prompt_keys: Sequence[tuple[str, str]], max_new_tokens: int, tree, eos_token_id: int | None,
                     progress: bool = False, seqs: Sequence[Sequencer] | None = None
                     ) -> list[eval_report.PromptRecord]:
    """One `PromptRecord` per continuation (benchmark, prompt id from `prompt_keys`); no timing fields.

    The decoder stop rule is the host's for EAGLE-1 drafters and ours for EAGLE-3 ones; kept tokens and
    counted cycles are cut by `eval_report.truncate_generation`, as for real decoding. No baseline runs.
    `seqs`: the drafter's `teacher_forced` pass over each continuation, when the caller already has them.
    """
    from tqdm import tqdm

    stop = "ppow" if fmt == "eagle3" else "host"
    records = []
    bar = tqdm(list(zip(conts, prompt_keys)), desc="simulate", unit="prompt", disable=not progress)
    for i, (cont, (bench, pid)) in enumerate(bar):
        cyc = simulate_one(fmt, drafter, target, cont, max_new_tokens, tree, eos_token_id, stop,
                           seq=seqs[i] if seqs is not None else None)
        new = cont.ids[cont.prompt_len:cont.prompt_len + cyc.new_tokens].tolist()
        kept = eval_report.truncate_generation(new, cyc.accept_lengths, eos_token_id, max_new_tokens)
        records.append(eval_report.PromptRecord(bench, pid, cont.prompt_len, len(kept.tokens), kept.cycles,
                                                kept.accept_lengths, cyc.new_tokens, len(cyc.accept_lengths),
                                                0.0, 0, 0.0, None))  # no timing: tokens/s read n/a
        tau = eval_report.ratio(sum(r.new_tokens for r in records), sum(r.cycles for r in records))
        bar.set_postfix(tau=f"{tau:.2f}")
    return records


def load_drafter(fmt: str, drafter_dir: Path, target):
    """The drafter module for simulation, in the target's dtype on its device: EAGLE-3 ours, EAGLE-1 the
    host's class with the target's embeddings."""
    weight = target.lm_head.weight
    if fmt == "eagle3":
        return adapters.load_eagle3_drafter(drafter_dir, target, weight.dtype).to(weight.device).eval()
    cfg = SimpleNamespace(model=SimpleNamespace(drafter=str(drafter_dir), drafter_bias=_has_bias(drafter_dir)))
    return adapters.ADAPTERS["eagle1"].build(cfg, target, None, weight.dtype).to(weight.device).eval()


def _has_bias(drafter_dir: Path) -> bool:
    import json
    return bool(json.loads((Path(drafter_dir) / "config.json").read_text()).get("bias", True))


__all__ = ["Cycles", "StaticTree", "chain", "depth_ranks", "host_tree", "simulate_records",
           "static_accept", "topk_by_depth", "true_ranks", "walk_cycles"]
