"""Teacher-forced passes, grouped window rollouts and batched speculative verification.

Conventions (docs/glossary.md):
- A training sequence x_0..x_{T-1}. The target's feature f_i and distribution P_i = p(x_{i+1} | x_<=i).
- The EAGLE-1 drafter reads pairs (f_i, x_{i+1}) at position i and predicts f_{i+1}; the target's
  lm_head turns that into Q_{i+1}. So `draft_logits[i]` (aligned) and `target_logits[i]` both predict x_{i+1}.
- A window starting at s: the prefix is x_0..x_s, where x_s plays EAGLE's *root* (the token the target
  itself emitted last). The drafter drafts d_1..d_K for x_{s+1}..x_{s+K}: d_1 ~ Q_s from the
  teacher-forced pass, then each step feeds its own predicted feature back (EAGLE-style).
- Verification: all G windows of a start form one tree (root + G chains of K) verified by ONE target
  forward over the host's KV cache of the prefix, with the host's tree-attention mask. The accepted
  length k counts draft tokens (bonus excluded). On data the target generated greedily the tree is not
  needed: `data_verify.verify_on_data` reads greedy acceptance off the target's pass over the sequence.

EAGLE-3 (`drafters.Eagle3Adapter`) uses the same alignment with fused features and its own head over a
draft vocabulary: `draft_windows` takes its step function and `d2t`, samples draft ids and feeds the
drafter their target ids.

Departures / choices (docs/algorithm.md): windows are chains of length K (not trees); the root is the
data token (teacher forcing), not a target sample; starts of one sequence are verified in descending order
so each tree overwrites only KV slots that later (shorter) prefixes never read.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor


class TargetPass(NamedTuple):
    features: Tensor  # [T, H] target features f_i (EAGLE-1: final-norm hidden states; EAGLE-3: [T, 3H] fused)
    logits: Tensor  # [T, V] target logits, row i predicts x_{i+1}
    hidden: Tensor | None = None  # [T, H] final-norm hidden states, the lm_head input (EAGLE-1: = features)


class DraftPass(NamedTuple):
    out_features: Tensor  # [T-1, H] drafter outputs; row i = predicted f_{i+1} (EAGLE-3: its own hidden state)
    kv: tuple  # drafter cache, nested tuples of [1, kv_heads, T-1, head_dim] (EAGLE-1: per layer (k, v))


class Rollout(NamedTuple):
    starts: Tensor  # [n] int64 window starts s (root index)
    draft_tokens: Tensor  # [n, G, K] int64 sampled draft windows (drafter-vocabulary ids; EAGLE-3: map by d2t)
    old_logprobs: Tensor  # [n, G, K] float drafter log-probs at sampling time
    accept_len: Tensor  # [n, G] int64 accepted draft tokens, bonus excluded
    target_logits: Tensor  # [n, G, K, V] target logits at each window position (drafted prefix)
    target_draft_logprobs: Tensor  # [n, G, K] log p_T(d_j | prefix, d_<j)
    target_greedy_logprobs: Tensor  # [n, G, K] max_v log p_T(v | prefix, d_<j)
    valid_mask: Tensor  # [n, G, K] bool True = real window position


class Drawn(NamedTuple):
    """Drafted and verified windows of n prefixes; logprobs/logits keep the drafter's graph when drawn with it."""

    tokens: Tensor  # [n, G, K] int64 drafter-vocabulary ids
    logprobs: Tensor  # [n, G, K] drafter log-probs at the rollout temperature
    logits: Tensor  # [n, G, K, Vd] drafter logits
    accept_len: Tensor  # [n, G] int64
    target_logits: Tensor  # [n, G, K, V]
    target_draft_lp: Tensor  # [n, G, K] log p_T(d_j | prefix, d_<j)
    target_greedy_lp: Tensor  # [n, G, K] max_v log p_T(v | prefix, d_<j)


def redraw_flat_groups(drawn: Drawn, starts: Tensor, draw, flat_groups, tries: int) -> tuple[Drawn, int]:
    """Dynamic sampling: redraw the groups whose windows all earn the same reward, up to `tries` times.

    Such a group has zero advantages and gives no policy gradient. Each round redraws every group that is
    still flat and takes the redraw whatever it earns; a group still flat after `tries` rounds stays so.

    Args:
        drawn: the first draw of every prefix.
        starts: [n] int64 window starts, aligned with drawn's first dimension.
        draw: starts [m] -> Drawn for those prefixes (a fresh draw).
        flat_groups: Drawn -> [n] bool, True where the group's rewards are all equal.
        tries: rounds, >= 0 (0 returns `drawn` unchanged).
    Returns:
        (drawn with redrawn groups in place, number of group redraws made).
    """
    redrawn = 0
    for _ in range(tries):
        flat = flat_groups(drawn).nonzero()[:, 0]
        if flat.numel() == 0:
            break
        again = draw(starts[flat])
        drawn = Drawn(*(t.index_copy(0, flat, a) for t, a in zip(drawn, again)))
        redrawn += flat.numel()
    return drawn, redrawn


# ----------------------------------------------------------------------------------------------
# Pure acceptance rules


def greedy_accept_len(draft_tokens: Tensor, target_logits: Tensor) -> Tensor:
    """Accepted prefix length under greedy (T=0) verification.

    Args:
        draft_tokens: [..., K] int64 drafted tokens.
        target_logits: [..., K, V] target logits at each window position (given the drafted prefix).
    Returns:
        [...] int64: number of leading draft tokens equal to the target's argmax.
    """
    match = (draft_tokens == target_logits.argmax(-1)).long()
    return match.cumprod(-1).sum(-1)


def sampling_accept_len(target_logprobs: Tensor, draft_logprobs: Tensor, uniforms: Tensor) -> Tensor:
    """Accepted prefix length under speculative (rejection) sampling: accept d_j iff u_j < p(d_j)/q(d_j).

    Args:
        target_logprobs: [..., K] log p_T(d_j) under the (temperature-warped) target.
        draft_logprobs: [..., K] log q(d_j) under the drafter's sampling distribution.
        uniforms: [..., K] U(0,1) draws.
    Returns:
        [...] int64 accepted lengths.
    """
    ratio = (target_logprobs - draft_logprobs).clamp(max=0.0).exp()
    return (uniforms < ratio).long().cumprod(-1).sum(-1)


def tree_layout(group_size: int, window: int) -> tuple[Tensor, Tensor, Tensor]:
    """Static tree of one root and `group_size` chains of `window` tokens (node 0 = root).

    Returns:
        tree_mask: [L, L] float, 1 where node r may attend node c (itself, the root, its chain ancestors).
        depth: [L] int64 position offset of each node from the root.
        parent: [G, K] int64 node whose target logits verify window token (g, j).
    """
    n = 1 + group_size * window
    mask = torch.zeros(n, n)
    mask[:, 0] = 1.0
    depth = torch.zeros(n, dtype=torch.long)
    parent = torch.zeros(group_size, window, dtype=torch.long)
    for g in range(group_size):
        base = 1 + g * window
        for j in range(window):
            node = base + j
            mask[node, base:node + 1] = 1.0
            depth[node] = j + 1
            parent[g, j] = 0 if j == 0 else node - 1
    return mask, depth, parent


# ----------------------------------------------------------------------------------------------
# Model passes (no optimisation state, no device choice: tensors arrive on the right device)


def target_forward(target, input_ids: Tensor, kv=None, feature_layers: tuple[int, ...] | None = None) -> TargetPass:
    """Teacher-forced pass of the host target over one sequence; fills `kv` when given.

    Args:
        target: host KV Llama (`eagle_compat.load_host_target`).
        input_ids: [1, T] int64.
        kv: host KV cache list (length reset to 0 by the caller) or None.
        feature_layers: None = EAGLE-1 features (final-norm hidden states); else EAGLE-3 features, the
            decoder-layer inputs at these `hidden_states` indices concatenated low -> high ([T, 3H]).
    """
    with torch.no_grad():
        out = target.model(input_ids=input_ids, past_key_values=kv, return_dict=True,
                           output_hidden_states=feature_layers is not None)
        last = out.last_hidden_state  # [1, T, H]
        logits = target.lm_head(last)
        hidden = last
        if feature_layers is not None:
            hidden = torch.cat([out.hidden_states[i] for i in feature_layers], dim=-1)  # [1, T, 3H]
    return TargetPass(features=hidden[0], logits=logits[0].float(), hidden=last[0])


def draft_forward(drafter, features: Tensor, input_ids: Tensor) -> DraftPass:
    """Teacher-forced drafter pass over pairs (f_i, x_{i+1}), i = 0..T-2, keeping its KV cache.

    Args:
        features: [T, H] target features (already noised by the caller if wanted).
        input_ids: [T] int64 sequence.
    """
    feats = features[None, :-1].to(_dtype(drafter))
    out, kv = drafter(feats, input_ids=input_ids[None, 1:], use_cache=True)
    return DraftPass(out_features=out[0], kv=kv)


def eagle1_step(drafter, feat: Tensor, tok: Tensor, kv: tuple, position_ids: Tensor,
                attention_mask: Tensor) -> tuple[Tensor, tuple]:
    """One cached host EAGLE-1 drafter step: pairs (feat [N, 1, H], tok [N]) -> (next feat [N, 1, H], kv).

    `attention_mask` is [N, S+1] bool over the cache plus the new position.
    """
    return drafter(feat, input_ids=tok[:, None], past_key_values=kv, position_ids=position_ids,
                   attention_mask=attention_mask, use_cache=True)


def uniform(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> Tensor:
    """U[0, 1) of `shape` on `device`, drawn on the generator's own device: the trainer's CPU generator
    (same stream on every device) stays usable for CUDA tensors, where `torch.rand(..., device="cuda",
    generator=cpu_gen)` raises."""
    where = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=where).to(device)


def sample_categorical(logp: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """One draw per row from softmax-normalised log-probs [N, V] -> [N] int64, by inverse CDF.

    Same distribution as `torch.multinomial(logp.exp(), 1)`, about 20x cheaper on CPU for a 49k vocabulary
    (one cumsum and a binary search instead of multinomial's per-row setup). Zero-probability ids are
    never drawn: the search returns the first id whose cumulative mass exceeds u.
    """
    cdf = logp.detach().float().exp().cumsum(-1)  # [N, V]
    u = uniform((logp.shape[0], 1), generator, logp.device) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True)[:, 0].clamp_(max=logp.shape[-1] - 1)


def draft_windows(drafter, head, dpass: DraftPass, starts: Tensor, group_size: int, window: int,
                  temperature: float, tokens: Tensor | None = None,
                  generator: torch.Generator | None = None, step=eagle1_step,
                  d2t: Tensor | None = None, greedy_members: int = 0,
                  logprobs: bool = True, prefix_cache=None) -> tuple[Tensor, Tensor | None, Tensor]:
    """Draft (or re-score) G windows of K tokens from each start, feeding the drafter its own features.

    With `tokens=None` it samples; with `tokens` given it re-scores those tokens (the policy-update pass
    when ppo_epochs > 1). Both run the identical computation, so with ppo_epochs = 1 the trainer samples
    with gradients enabled and updates through this pass directly (`loss.reuse_sampling_pass`).

    Args:
        dpass: teacher-forced drafter pass of the sequence.
        starts: [n] int64 roots s (1 <= s <= T-1).
        tokens: [n, G, K] int64 windows to score (drafter-vocabulary ids), or None to sample.
        step: one cached drafter step with the signature of `eagle1_step` (EAGLE-3: `drafters.eagle3_step`).
        d2t: EAGLE-3 reduced vocabulary map; sampled draft ids are fed back as target ids
            draft + d2t[draft] (the drafter's embedding is over the target vocabulary). None = identity.
        greedy_members: when sampling, the first this-many members of each group take the drafter's
            argmax at every step instead of a sample (a window the group is measured against; see
            `proposal_logprobs` for verifying it). Ignored when re-scoring `tokens`.
        logprobs: False (only with `tokens`): skip log q at `temperature` (returned as None); for callers that
            read only the logits (the data-path unroll, `multi_step_loss`), it saves a [N, V] log-softmax per depth.
        prefix_cache: (dpass.kv, N) -> the cache the first `step` reads: `shared_prefix_cache` (default: the EAGLE-1
            host drafter, patch 0007, reads the prefix once for all N rows) or `expand_cache` (the prefix broadcast
            to N rows, which the attention copies per row: EAGLE-3's drafter). Same numbers up to float rounding.
    Returns:
        tokens [n, G, K] (drafter-vocabulary ids), logprobs [n, G, K] (log q at `temperature`; None if not asked),
        logits [n, G, K, Vd] (raw, over the drafter's vocabulary).
    """
    if not logprobs and tokens is None:
        raise ValueError("logprobs=False needs tokens: sampling draws from log q")
    n = starts.numel()
    rows = n * group_size
    past = dpass.out_features.shape[0]  # T-1 teacher-forced positions
    feat = dpass.out_features[starts - 1]  # [n, H] predicted f_s
    feat = feat.repeat_interleave(group_size, 0)[:, None]  # [N, 1, H]
    # Row r may attend teacher-forced positions < s (its own prefix) plus its own drafted steps.
    pos = torch.arange(past, device=starts.device)
    prefix_ok = (pos[None] < starts[:, None]).repeat_interleave(group_size, 0)  # [N, past]
    kv = (prefix_cache or shared_prefix_cache)(dpass.kv, rows)
    s_rows = starts.repeat_interleave(group_size)  # [N]
    greedy_row = (torch.arange(rows, device=starts.device) % group_size) < greedy_members  # [N]
    out_tokens, out_logprobs, out_logits = [], [], []
    for j in range(window):
        logits = head(feat[:, 0]).float()  # [N, V]
        if tokens is None:
            logp = F.log_softmax(logits / temperature, dim=-1)
            tok = sample_categorical(logp, generator)
            if greedy_members:
                tok = torch.where(greedy_row, logp.argmax(-1), tok)
        else:
            tok = tokens.reshape(rows, window)[:, j]
            logp = F.log_softmax(logits / temperature, dim=-1) if logprobs else None
        out_tokens.append(tok)
        if logp is not None:
            out_logprobs.append(logp.gather(-1, tok[:, None])[:, 0])
        out_logits.append(logits)
        if j == window - 1:
            break
        # Next step: pair (predicted f_{s+j}, d_{j+1}) at position s+j.
        mask = torch.cat([prefix_ok, torch.ones(rows, j + 1, dtype=torch.bool, device=starts.device)], 1)
        tok_in = tok if d2t is None else tok + d2t[tok]  # the drafter embeds target ids
        feat, kv = step(drafter, feat, tok_in, kv, (s_rows + j)[:, None], mask)
    shape = (n, group_size, window)
    return (torch.stack(out_tokens, 1).reshape(shape),
            torch.stack(out_logprobs, 1).reshape(shape) if logprobs else None,
            torch.stack(out_logits, 1).reshape(*shape, -1))


def proposal_logprobs(sampling_logprobs: Tensor, greedy_members: int) -> Tensor:
    """log q of each drafted token under the rule that proposed it, for `verify=sampling`.

    Sampled members were drawn from q; the first `greedy_members` members of each group were chosen
    deterministically (argmax), so their proposal has q(d) = 1 and speculative sampling accepts them
    with probability p(d) (log q = 0).

    Args:
        sampling_logprobs: drafter log-probs of the drafted tokens at the rollout temperature. [n, G, K].
        greedy_members: leading greedy members per group, 0 <= greedy_members <= G.
    Returns:
        [n, G, K] log-probs, detached.
    """
    member = torch.arange(sampling_logprobs.shape[1], device=sampling_logprobs.device)
    greedy = (member < greedy_members)[None, :, None]
    return torch.where(greedy, torch.zeros_like(sampling_logprobs), sampling_logprobs).detach()


def verify_windows(target, kv, input_ids: Tensor, starts: Tensor, draft_tokens: Tensor,
                   verify: str, verify_temperature: float, draft_logprobs: Tensor,
                   generator: torch.Generator | None = None):
    """Verify every window with one target tree forward per start, over the prefix's cached KV.

    `kv` must hold the teacher-forced KV of `input_ids` (from `target_forward`); trees are run for
    starts in descending order, so each overwrites only cache slots >= its own start. The slots the trees
    overwrote are restored afterwards, so the cache again holds the sequence and windows can be verified
    again (a redraw, `rollout.resample_tries`).

    Args:
        input_ids: [T] int64 sequence (roots are input_ids[s]).
        starts: [n] int64; draft_tokens: [n, G, K]; draft_logprobs: [n, G, K] (for verify=sampling).
    Returns:
        accept_len [n, G], target_logits [n, G, K, V], target log-probs of the drafts [n, G, K],
        greedy (max) target log-probs [n, G, K].
    """
    n, G, K = draft_tokens.shape
    tree_mask, depth, parent = tree_layout(G, K)
    tree_mask = tree_mask.to(input_ids.device)[None, None]
    depth, parent = depth.to(input_ids.device), parent.to(input_ids.device)
    logits_out = [None] * n
    order = torch.argsort(starts, descending=True).tolist()
    start_of = starts.tolist()  # one device->host copy for the loop, not one per prefix
    first = min(start_of)
    saved = [[cache.data.narrow(2, first, input_ids.numel() - first).clone() for cache in layer] for layer in kv]
    with torch.no_grad():
        for i in order:
            s = start_of[i]
            _set_kv_length(kv, s)
            nodes = torch.cat([input_ids[s:s + 1], draft_tokens[i].reshape(-1)])[None]  # [1, L]
            target.model.tree_mask = tree_mask
            try:
                hidden = target.model(input_ids=nodes, past_key_values=kv, position_ids=(s + depth)[None])[0]
            finally:
                target.model.tree_mask = None
            logits = target.lm_head(hidden[0]).float()  # [L, V]
            logits_out[i] = logits[parent]  # [G, K, V]
        for layer, layer_saved in zip(kv, saved):
            for cache, part in zip(layer, layer_saved):
                cache.data.narrow(2, first, part.shape[2]).copy_(part)
        _set_kv_length(kv, input_ids.numel())
    target_logits = torch.stack(logits_out)  # [n, G, K, V]
    if verify == "greedy":
        target_logp = F.log_softmax(target_logits, -1)
        accept = greedy_accept_len(draft_tokens, target_logits)
    else:
        target_logp = F.log_softmax(target_logits / verify_temperature, -1)
        uniforms = uniform(tuple(draft_tokens.shape), generator, draft_tokens.device)
        draft_target_lp = target_logp.gather(-1, draft_tokens[..., None])[..., 0]
        accept = sampling_accept_len(draft_target_lp, draft_logprobs, uniforms)
    tgt_draft = target_logp.gather(-1, draft_tokens[..., None])[..., 0]
    tgt_greedy = target_logp.max(-1).values
    return accept, target_logits, tgt_draft, tgt_greedy


def expand_cache(kv, rows: int):
    """Broadcast a batch-1 cache (nested tuples of [1, ...] tensors) to `rows` rows without copying (the drafter's
    attention then copies it per row: `cat` with each new position)."""
    if isinstance(kv, Tensor):
        return kv.expand(rows, *kv.shape[1:])
    return tuple(expand_cache(x, rows) for x in kv)


def shared_prefix_cache(kv, rows: int) -> tuple:
    """The host EAGLE-1 drafter's cache for `rows` rows drafting after one shared prefix (patch 0007).

    Args:
        kv: the teacher-forced pass's cache, per layer (k, v) [1, Hkv, P, d].
    Returns:
        per layer (k, v, own_k, own_v): the prefix once, and each row's own positions, [rows, Hkv, 0, d] (none yet;
        every step appends one). The attention reads the prefix with one matmul per kv head for all rows.
    """
    return tuple((k, v, k.new_zeros(rows, k.shape[1], 0, k.shape[3]), v.new_zeros(rows, v.shape[1], 0, v.shape[3]))
                 for k, v in kv)


def _set_kv_length(kv, length: int) -> None:
    for layer in kv:
        for cache in layer:
            cache.current_length.fill_(length)


def _dtype(module) -> torch.dtype:
    return next(module.parameters()).dtype
