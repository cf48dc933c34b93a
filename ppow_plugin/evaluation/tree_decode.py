"""EAGLE-2/3-style dynamic-tree speculative decoding with an EAGLE-3 drafter and the host target.

Evaluation only (no gradients). One cycle:
  1. Draft a tree from the drafter's last committed position (`draft_tree`): top-k children of the
     root, then `depth` levels that expand each of the k best frontier nodes by their top-k children,
     scored by cumulative drafter log-prob; keep the global top `total_tokens` nodes plus the root.
  2. Verify: ONE host-target forward over the tree on top of the target's KV cache, with the tree
     attention mask set on `target.model.tree_mask` (as rollout.verify_windows does).
  3. Accept: greedy, the host's `evaluate_posterior` rule (`greedy_path`, T = 0), or the target-preserving sibling rule
     (T > 0, `sample_accept`).
  4. Commit root + accepted drafts, compact the target KV cache onto the accepted path, extend the
     drafter's (committed-only) KV cache with the new (feature, next token) pairs.

Accounting is the host's: a cycle commits `accept_len + 1` tokens (the root sampled by the previous
cycle plus the accepted drafts), so new_tokens == sum(accept_lengths) + cycles and tau = new_tokens / cycles.

Choices / departures:
  1. Generation stops once new_tokens >= max_new_tokens (the host stops on >) or a committed token is
     EOS; like the host, tokens committed in the same cycle after an EOS are kept in the output.
  2. Candidate ranking ties are broken by depth, then creation order, so every kept node's parent is
     kept (a child's cumulative log-prob never exceeds its parent's).
  3. At T > 0 acceptance uses the EAGLE `main` rule (child x accepted with probability p(x) under the
     temperature-scaled target, rejected children zeroed and p renormalised, siblings tried in drafter
     order, the next root drawn from what remains). It never reads drafter probabilities, so the output
     distribution is the target's whatever the drafter does. No top-p/top-k warping.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from ppow_plugin.host import eagle_compat
from ppow_plugin.drafters.eagle3 import DraftKV, Eagle3Drafter, target_features
from ppow_plugin.evaluation.tree_draft import Candidates, draft_candidates, root_children  # noqa: F401 (re-exported)


class DraftTree(NamedTuple):
    tokens: Tensor     # [N+1] int64 target ids; node 0 = root; parents precede children
    parent: Tensor     # [N+1] int64 parent node index, -1 for the root
    depth: Tensor      # [N+1] int64 position offset from the root
    score: Tensor      # [N+1] float32 cumulative drafter log-prob (root 0)
    tree_mask: Tensor  # [N+1, N+1] float32 1 where node r may attend node c (ancestors and itself)
    retrieve: Tensor   # [n_leaves, D+1] int64 node indices of each root→leaf path, padded with -1


class Eagle3Output(NamedTuple):
    output_ids: Tensor          # [1, P + new_tokens] int64 prompt followed by every committed token
    new_tokens: int             # tokens committed after the prompt (may overshoot max_new_tokens)
    cycles: int                 # draft/verify cycles = target tree forwards
    accept_lengths: list[int]   # per cycle: accepted draft tokens, bonus excluded


# ----------------------------------------------------------------------------------------------
# Pure tree construction and acceptance


def build_tree(root_token: int, cand_tokens: Tensor, cand_parent: Tensor, cand_score: Tensor,
               cand_depth: Tensor, total_tokens: int) -> DraftTree:
    """Keep the `total_tokens` best candidates (plus the root) and lay them out as a tree.

    Args:
        root_token: target id of the root.
        cand_tokens: [C] int64 target ids of all drafted candidates.
        cand_parent: [C] int64 index of each candidate's parent candidate, -1 = the root.
        cand_score: [C] float cumulative drafter log-prob (never above the parent's).
        cand_depth: [C] int64 depth (root children = 1).
        total_tokens: how many draft nodes to keep.
    """
    c = cand_tokens.numel()
    order = torch.arange(c)
    order = order[torch.sort(cand_depth[order], stable=True).indices]
    order = order[torch.sort(-cand_score[order].float(), stable=True).indices]
    kept = order[:min(total_tokens, c)]
    kept = kept[torch.sort(cand_depth[kept] * c + kept).indices]  # parents before children
    node_of = torch.full((c,), -1, dtype=torch.long)
    node_of[kept] = torch.arange(1, kept.numel() + 1)
    par = cand_parent[kept]
    parent = torch.cat([torch.tensor([-1]), torch.where(par < 0, torch.zeros_like(par), node_of[par.clamp(min=0)])])
    if (parent[1:] < 0).any():
        raise AssertionError("draft tree lost a parent node; candidate scores must not exceed their parent's")
    n = kept.numel() + 1
    depth = torch.cat([torch.zeros(1, dtype=torch.long), cand_depth[kept].long()])
    mask = torch.zeros(n, n)
    mask[0, 0] = 1.0
    for d in range(1, int(depth.max()) + 1):  # a node's row: its parent's (one depth up) plus itself
        nodes = (depth == d).nonzero()[:, 0]
        mask[nodes] = mask[parent[nodes]]
        mask[nodes, nodes] = 1.0
    has_child = torch.zeros(n, dtype=torch.bool)
    has_child[parent[1:]] = True
    leaves = (~has_child).nonzero()[:, 0]
    ancestors = torch.where(mask[leaves] > 0, torch.arange(n), n).sort(1).values[:, :int(depth.max()) + 1]
    retrieve = torch.where(ancestors < n, ancestors, -1)  # ancestors in node order = root→leaf order, -1 padded
    tokens = torch.cat([torch.tensor([root_token]), cand_tokens[kept]])
    score = torch.cat([torch.zeros(1), cand_score[kept].float()])
    return DraftTree(tokens, parent, depth, score, mask, retrieve)


def greedy_path(tree: DraftTree, target_next: Tensor) -> tuple[Tensor, int]:
    """Longest root→leaf prefix whose every draft equals the target's choice at its parent (T = 0).

    The host's `evaluate_posterior` rule with the argmax taken out, so the decoder (`greedy_accept`, the
    target's argmax per node) and the simulation (`simulate.py`, the greedy continuation) share it. Ties
    between equally long paths go to the first one in `retrieve` order, as in the host.

    Args:
        target_next: [N+1] int64 the target's next token after each node (after its root→node prefix).
    Returns:
        path: [a+1] int64 accepted node indices (root first); a: accepted drafts.
    """
    idx = tree.retrieve.clamp(min=0)
    candidates = torch.where(tree.retrieve >= 0, tree.tokens[idx], torch.full_like(idx, -1))  # -1 never matches
    lengths = (candidates[:, 1:] == target_next[idx[:, :-1]]).long().cumprod(1).sum(1)  # [n_leaves]
    a = int(lengths.max())
    best = int(lengths.argmax()) if a > 0 else 0
    return tree.retrieve[best, :a + 1], a


def greedy_accept(tree: DraftTree, logits: Tensor) -> tuple[Tensor, int, Tensor]:
    """`greedy_path` against the target's argmax at every node.

    Args:
        logits: [N+1, V] target logits at every tree node.
    Returns:
        path: [a+1] int64 accepted node indices (root first); a: accepted drafts; next_logits [V] at the
        last accepted node (its argmax is the next root).
    """
    path, a = greedy_path(tree, logits.argmax(-1))
    return path, a, logits[path[-1]]


def sample_accept(tree: DraftTree, logits: Tensor, temperature: float,
                  generator: torch.Generator | None = None) -> tuple[Tensor, int, int]:
    """Target-preserving tree acceptance at temperature > 0 (module doc, item 3).

    Sampling runs on CPU (one [V] row per tree level), so a CPU `generator` works for any device.

    Args:
        logits: [N+1, V] target logits at every tree node.
    Returns:
        path [a+1] node indices on `logits.device` (root first), a, and the next root token (drawn from
        the residual).
    """
    node, path = 0, [0]
    parent, tokens, score = tree.parent.cpu(), tree.tokens.cpu(), tree.score.cpu()
    while True:
        p = torch.softmax(logits[node].float().cpu() / temperature, dim=-1)
        children = (parent == node).nonzero()[:, 0]
        children = children[torch.sort(-score[children], stable=True).indices]
        moved = False
        for child in children.tolist():
            tok = int(tokens[child])
            if torch.rand((), generator=generator) < p[tok]:
                node, moved = child, True
                path.append(child)
                break
            p[tok] = 0.0
            if p.sum() <= 0:  # all remaining mass was on rejected children: cannot happen unless p(x) == 1
                break
            p = p / p.sum()
        if not moved:
            nxt = int(torch.multinomial(p, 1, generator=generator)) if p.sum() > 0 else int(logits[node].argmax())
            return torch.tensor(path, device=logits.device), len(path) - 1, nxt


# ----------------------------------------------------------------------------------------------
# Drafting


def draft_tree(drafter: Eagle3Drafter, kv: DraftKV, last_hidden: Tensor, last_logits: Tensor, root_token: int,
               root_pos: int, depth: int, top_k: int, total_tokens: int) -> DraftTree:
    """The decoder's tree for one root: `draft_candidates` (B = 1) laid out by `build_tree`.

    Args:
        kv: drafter cache of the committed pairs, length `root_pos` (read only).
        last_hidden: [H] drafter out_hidden at the last committed pair.
        last_logits: [Vd] drafter logits there (predict the root's child).
        root_pos: sequence position of the root (= committed tokens before it).
    """
    dev = last_hidden.device
    visible = torch.ones(1, kv[0].shape[2], dtype=torch.bool, device=dev)
    cand = draft_candidates(drafter, kv, visible, last_hidden[None], last_logits[None],
                            torch.tensor([root_pos], device=dev), depth, top_k)
    return build_tree(root_token, *(x[0].cpu() for x in cand), total_tokens)  # tree bookkeeping is tiny: CPU


# ----------------------------------------------------------------------------------------------
# The generation loop


def _target_pass(target: nn.Module, ids: Tensor, kv, layer_ids, position_ids: Tensor | None = None,
                 tree_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Host target forward (optionally a tree) -> (logits [T, V] fp32, fused features [1, T, 3H_t])."""
    target.model.tree_mask = None if tree_mask is None else tree_mask[None, None]
    try:
        out = target.model(input_ids=ids, past_key_values=kv, position_ids=position_ids,
                           output_hidden_states=True, return_dict=True)
    finally:
        target.model.tree_mask = None
    return target.lm_head(out.last_hidden_state[0]).float(), target_features(out.hidden_states, layer_ids)


def _drafter_extend(drafter: Eagle3Drafter, kv: DraftKV | None, feats: Tensor, next_ids: Tensor):
    """Append committed pairs (feats [1, m, 3H_t], next_ids [m]) -> (kv, last out_hidden [H], last logits [Vd])."""
    out, logits, kv = drafter(feats.to(drafter.fc.weight.dtype), next_ids[None], past_kv=kv)
    return kv, out[0, -1], logits[0, -1]


def _pick_root(logits: Tensor, temperature: float, generator: torch.Generator | None) -> int:
    if temperature <= 0:
        return int(logits.argmax())
    return int(torch.multinomial(torch.softmax(logits.float().cpu() / temperature, -1), 1, generator=generator))


def positions_needed(prompt_len: int, max_new_tokens: int, depth: int, total_tokens: int) -> int:
    """Target KV positions one `generate_eagle3` call can reach: P + M + depth + total_tokens + 2 (a last cycle
    starts below P + M and appends its total_tokens + 1 tree nodes; depth + 1 more covers the overshoot)."""
    return prompt_len + max_new_tokens + depth + total_tokens + 2


@torch.no_grad()
def generate_eagle3(target: nn.Module, drafter: Eagle3Drafter, input_ids: Tensor, max_new_tokens: int,
                    temperature: float = 0.0, depth: int = 7, top_k: int = 10, total_tokens: int = 60,
                    eos_token_id: int | None = None, generator: torch.Generator | None = None,
                    kv_cache: list | None = None) -> Eagle3Output:
    """Speculative decoding of one prompt with an EAGLE-3 drafter and a dynamic draft tree.

    Args:
        target: host KV Llama (`eagle_compat.load_host_target`), on the same device as the drafter.
        drafter: `Eagle3Drafter` built for this target (its feature layer ids are read from its config).
        input_ids: prompt [1, P] int64.
        max_new_tokens: stop once at least this many tokens are committed (the last cycle may overshoot
            by up to depth + 1).
        temperature: 0 = greedy (output == the target's greedy decoding); > 0 samples, target-preserving.
        depth: expansion levels after the root's children (max draft length depth + 1).
        top_k: children per expanded node and frontier width.
        total_tokens: draft nodes kept per tree (the tree has total_tokens + 1 nodes with the root).
        eos_token_id: stop after a cycle that commits this token.
        generator: CPU RNG for sampling (sampling draws happen on CPU).
        kv_cache: a host cache from `eagle_compat.new_kv_cache(target, positions)` to reuse (it is reset),
            holding at least `positions_needed(...)` positions; None = a fresh one of exactly that size.
    Returns:
        Eagle3Output; new_tokens == sum(accept_lengths) + cycles.
    Raises:
        ValueError: batch != 1, bad tree sizes, or the run could exceed the target's or the cache's positions.
    """
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"generate_eagle3 decodes one sequence: input_ids must be [1, P], got {tuple(input_ids.shape)}")
    if depth < 0 or top_k < 1 or total_tokens < 1 or top_k > drafter.cfg.draft_vocab_size:
        raise ValueError(f"bad tree sizes depth={depth}, top_k={top_k}, total_tokens={total_tokens}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens ({max_new_tokens}) must be >= 1")
    prompt_len = input_ids.shape[1]
    need = positions_needed(prompt_len, max_new_tokens, depth, total_tokens)
    kv = kv_cache if kv_cache is not None else eagle_compat.new_kv_cache(target, need)
    if need > min(target.config.max_position_embeddings, eagle_compat.kv_positions(kv)):
        raise ValueError(f"prompt ({prompt_len}) + max_new_tokens ({max_new_tokens}) + tree needs {need} positions; "
                         f"the target has {target.config.max_position_embeddings}, its KV cache "
                         f"{eagle_compat.kv_positions(kv)}")
    eagle_compat.reset_kv(kv)
    layer_ids = drafter.cfg.feature_layer_ids
    logits, feats = _target_pass(target, input_ids, kv, layer_ids)
    root = _pick_root(logits[-1], temperature, generator)
    dkv, last_hidden, last_logits = _drafter_extend(drafter, None, feats, torch.cat([input_ids[0, 1:], input_ids.new_tensor([root])]))
    n = prompt_len
    committed: list[int] = []
    accept_lengths: list[int] = []
    while True:
        tree = draft_tree(drafter, dkv, last_hidden, last_logits, root, n, depth, top_k, total_tokens)
        tree = DraftTree(*(t.to(input_ids.device) for t in tree))
        logits, feats = _target_pass(target, tree.tokens[None], kv, layer_ids, (n + tree.depth)[None], tree.tree_mask)
        if temperature <= 0:
            path, a, next_logits = greedy_accept(tree, logits)
            next_root = int(next_logits.argmax())
        else:
            path, a, next_root = sample_accept(tree, logits, temperature, generator)
        for layer in kv:  # move the accepted nodes' target KV to slots n .. n+a
            for cache in layer:
                cache.copy(n + path, n)
        new = tree.tokens[path]  # [a+1] root + accepted drafts
        committed += new.tolist()
        accept_lengths.append(a)
        assert dkv[0].shape[2] == n, "the drafter cache must hold exactly the committed pairs"
        dkv, last_hidden, last_logits = _drafter_extend(drafter, dkv, feats[:, path],
                                                        torch.cat([new[1:], new.new_tensor([next_root])]))
        n += a + 1
        root = next_root
        if len(committed) >= max_new_tokens or (eos_token_id is not None and eos_token_id in new.tolist()):
            break
    output = torch.cat([input_ids, input_ids.new_tensor(committed)[None]], dim=1)
    return Eagle3Output(output, len(committed), len(accept_lengths), accept_lengths)


__all__ = ["Candidates", "DraftTree", "Eagle3Output", "build_tree", "draft_candidates", "draft_tree",
           "generate_eagle3", "greedy_accept", "greedy_path", "positions_needed", "root_children", "sample_accept"]
