"""Rollouts and verification: hand-built acceptance cases, and batched tree verification / batched
drafting checked against brute force (one window at a time, full forwards, no cache) on a tiny target."""

import pytest
import torch
import torch.nn.functional as F

from ppow_plugin.host import eagle_compat, patching
from ppow_plugin.method import data_verify, losses, rollout
from tiny import greedy_continuation, make_target

if patching.patch_status().state != "patched":
    pytest.skip("the EAGLE host is not installed and patched (`ppow patch apply`)", allow_module_level=True)


def test_tree_layout_two_chains_of_two():
    mask, depth, parent = rollout.tree_layout(group_size=2, window=2)
    # nodes: 0 root | 1,2 chain 0 | 3,4 chain 1
    expected = torch.tensor([[1, 0, 0, 0, 0],
                             [1, 1, 0, 0, 0],
                             [1, 1, 1, 0, 0],
                             [1, 0, 0, 1, 0],
                             [1, 0, 0, 1, 1]], dtype=torch.float)
    torch.testing.assert_close(mask, expected)
    assert depth.tolist() == [0, 1, 2, 1, 2]
    assert parent.tolist() == [[0, 1], [0, 3]]


def test_greedy_accept_len_hand_built():
    V = 5
    argmax = torch.tensor([[1, 2, 3], [1, 2, 3], [4, 4, 4], [0, 0, 0]])  # [N, K]
    logits = F.one_hot(argmax, V).float()
    drafts = torch.tensor([[1, 2, 3],    # everything accepted
                           [1, 0, 3],    # stop at the first mismatch even if later tokens match
                           [0, 4, 4],    # first token rejected
                           [0, 0, 0]])   # all accepted
    assert rollout.greedy_accept_len(drafts, logits).tolist() == [3, 1, 0, 3]


def test_sampling_accept_len_hand_built():
    lp = torch.log
    target = lp(torch.tensor([[0.5, 0.2, 0.9], [0.1, 0.9, 0.9]]))
    draft = lp(torch.tensor([[0.25, 0.4, 0.9], [0.2, 0.1, 0.1]]))
    # ratios: [1 (capped), 0.5, 1] and [0.5, 1, 1]
    u = torch.tensor([[0.99, 0.49, 0.0], [0.51, 0.0, 0.0]])
    assert rollout.sampling_accept_len(target, draft, u).tolist() == [3, 0]
    u = torch.tensor([[0.99, 0.51, 0.0], [0.49, 0.99, 0.99]])
    assert rollout.sampling_accept_len(target, draft, u).tolist() == [1, 3]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = make_target(tmp_path_factory.mktemp("target"), layers=4, seed=3)
    target = eagle_compat.load_host_target(d, torch.float32)
    torch.manual_seed(0)
    drafter = eagle_compat.new_eagle1_drafter(target.config, bias=True,
                                              embed_weight=target.model.embed_tokens.weight).eval()
    return target, drafter


def brute_greedy(target, prefix: torch.Tensor, window: torch.Tensor):
    """Accepted length and per-position logits, one full forward per window position."""
    k, logits = None, []
    for j in range(window.numel()):
        ids = torch.cat([prefix, window[:j]])[None]
        with torch.no_grad():
            row = target.lm_head(target.model(input_ids=ids)[0])[0, -1]
        logits.append(row)
        if k is None and row.argmax() != window[j]:
            k = j
    return (window.numel() if k is None else k), torch.stack(logits)


def test_batched_tree_verification_matches_brute_force(tiny):
    target, _ = tiny
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, 120, (24,), generator=g)
    starts = torch.tensor([6, 17, 11])
    G, K = 4, 5
    drafts = torch.randint(4, 120, (3, G, K), generator=g)
    # Make some windows (partly) the target's own greedy continuation so k covers 0..K.
    for i, s in enumerate(starts.tolist()):
        greedy = greedy_continuation(target, ids[: s + 1], K)
        drafts[i, 0] = greedy
        drafts[i, 1, :2] = greedy[:2]
        drafts[i, 2, 1:] = greedy[1:]  # wrong first token: k must be 0
    kv = eagle_compat.new_kv_cache(target)
    eagle_compat.reset_kv(kv)
    rollout.target_forward(target, ids[None], kv)
    accept, t_logits, t_draft_lp, t_greedy_lp = rollout.verify_windows(
        target, kv, ids, starts, drafts, "greedy", 1.0, torch.zeros(drafts.shape))
    for i, s in enumerate(starts.tolist()):
        for gi in range(G):
            k, logits = brute_greedy(target, ids[: s + 1], drafts[i, gi])
            assert accept[i, gi].item() == k, (i, gi)
            torch.testing.assert_close(t_logits[i, gi], logits, atol=1e-4, rtol=1e-4)
        assert accept[i, 0].item() == K and accept[i, 1].item() >= 2 and accept[i, 2].item() == 0
    assert (t_greedy_lp >= t_draft_lp - 1e-6).all()
    # The host's own posterior evaluation picks the same best length for each group.
    for i in range(3):
        root = ids[starts[i]].expand(G, 1)
        candidates = torch.cat([root, drafts[i]], 1)  # [G, K+1]
        logits = torch.cat([t_logits[i], t_logits[i][:, :1]], 1)  # [G, K+1, V]; last row unused
        _, host_len, _ = eagle_compat.evaluate_posterior(logits, candidates, None, None, None, None, None, None)
        assert int(host_len) == accept[i].max().item()


def test_batched_drafting_matches_sequential_brute_force(tiny):
    target, drafter = tiny
    head = target.lm_head
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(4, 120, (20,), generator=g)
    with torch.no_grad():
        feats = target.model(input_ids=ids[None])[0][0]
        dpass = rollout.draft_forward(drafter, feats, ids)
        starts = torch.tensor([3, 15, 9])
        toks, lp, logits = rollout.draft_windows(drafter, head, dpass, starts, 2, 4, 1.0, generator=g)
        toks2, lp2, _ = rollout.draft_windows(drafter, head, dpass, starts, 2, 4, 1.0, tokens=toks)
        # logprobs=False (the data-path unroll, multi_step_loss) skips log q only: the same logits
        toks3, none, logits3 = rollout.draft_windows(drafter, head, dpass, starts, 2, 4, 1.0, tokens=toks,
                                                     logprobs=False)
    assert none is None and torch.equal(toks3, toks) and torch.equal(logits3, logits)
    torch.testing.assert_close(lp, lp2)  # sampling pass == re-scoring pass (PPO ratio starts at 1)
    assert torch.equal(toks, toks2)
    for i, s in enumerate(starts.tolist()):
        for gi in range(2):
            hidden, tokens = feats[:s], ids[1: s + 1]
            for j in range(4):
                with torch.no_grad():
                    out = drafter(hidden[None], input_ids=tokens[None])
                step_logits = head(out[0, -1])
                torch.testing.assert_close(logits[i, gi, j], step_logits, atol=1e-4, rtol=1e-4)
                hidden = torch.cat([hidden, out[0, -1:]])
                tokens = torch.cat([tokens, toks[i, gi, j: j + 1]])


def test_scoring_without_logprobs_needs_tokens():
    with pytest.raises(ValueError, match="needs tokens"):
        rollout.draft_windows(None, None, None, torch.tensor([1]), 1, 4, 1.0, logprobs=False)


def test_sample_categorical_matches_the_distribution_and_skips_zero_mass():
    from ppow_plugin.method.rollout import sample_categorical
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.5], [0.7, 0.0, 0.3, 0.0], [0.0, 0.0, 0.0, 1.0]])
    logp = probs.log().repeat(4000, 1)  # [12000, 4], -inf where p = 0
    draws = sample_categorical(logp, torch.Generator().manual_seed(0)).view(4000, 3)
    freq = torch.stack([torch.bincount(draws[:, r], minlength=4).float() / 4000 for r in range(3)])
    assert (freq[probs == 0] == 0).all()  # never an impossible id, also at the last row's edge
    torch.testing.assert_close(freq, probs, atol=0.03, rtol=0)  # 4000 draws: std <= 0.008
    again = sample_categorical(logp, torch.Generator().manual_seed(0)).view(4000, 3)
    assert torch.equal(draws, again)  # the generator alone decides


def test_greedy_member_takes_the_argmax_and_the_others_sample(tiny):
    target, drafter = tiny
    head = target.lm_head
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(4, 120, (20,), generator=g)
    with torch.no_grad():
        feats = target.model(input_ids=ids[None])[0][0]
        dpass = rollout.draft_forward(drafter, feats, ids)
        starts = torch.tensor([4, 12])
        draft = [rollout.draft_windows(drafter, head, dpass, starts, 3, 4, 1.0, generator=g, greedy_members=m)
                 for m in (1, 0)]
    for (toks, _, logits), m in zip(draft, (1, 0)):
        is_argmax = (toks == logits.argmax(-1)).all(-1)  # [n, G]: the window is greedy at every step
        assert bool(is_argmax[:, 0].all()) == (m == 1)  # can fail: without the member it samples too
        assert not is_argmax[:, 1:].all()  # the other members still sample
    lp = draft[0][1]
    proposal = rollout.proposal_logprobs(lp, 1)
    assert torch.equal(proposal[:, 0], torch.zeros_like(lp[:, 0]))
    assert torch.equal(proposal[:, 1:], lp[:, 1:])


# --- verify=sampling accepts like sequential speculative sampling (Monte Carlo) -------------------
# A Markov toy: V = 4, K = 3, target p(.|prev) a random table and the draft q(.|prev) a noisy copy of
# it (so every k from 0 to K is common), root token 0.
# The rollout drafts whole windows, then verifies them at once (`sampling_accept_len`). The reference
# drafts and verifies one token at a time and stops at the first rejection. Both give N = 20000 draws
# of k; two-sample chi-square over the K + 1 bins (3 degrees of freedom) must stay below 16.27, the
# 0.999 quantile: a correct rule fails by chance once in 1000 seeds (the seeds are fixed, so the test
# is deterministic). A wrong rule lands far above it (the can-fail variants).

_V, _K, _N = 4, 3, 20000
_CHI2_3_999 = 16.27


def _tables(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    p_logits = 1.5 * torch.randn(_V, _V, generator=g, dtype=torch.float64)
    q_logits = p_logits + torch.randn(_V, _V, generator=g, dtype=torch.float64)
    return torch.softmax(p_logits, -1), torch.softmax(q_logits, -1)


def _batched_k(p, q, proposal: str, rule: str) -> torch.Tensor:
    """The rollout's way: whole windows drafted, then `sampling_accept_len` over them."""
    g = torch.Generator().manual_seed(1)
    prev = torch.zeros(_N, dtype=torch.long)
    tokens = []
    for _ in range(_K):
        logq = q[prev].log()
        tok = rollout.sample_categorical(logq, g) if proposal == "sample" else logq.argmax(-1)
        tokens.append(tok)
        prev = tok
    tokens = torch.stack(tokens, 1)                      # [N, K]
    prevs = torch.cat([torch.zeros(_N, 1, dtype=torch.long), tokens[:, :-1]], 1)
    draft_lp = q[prevs, tokens].log()[:, None]           # [N, 1, K] (one member per group)
    if proposal == "greedy":
        draft_lp = draft_lp if rule == "temperature_q" else rollout.proposal_logprobs(draft_lp, 1)
    target_lp = p[prevs, tokens].log()[:, None]
    u = torch.rand(_N, 1, _K, generator=g, dtype=torch.float64)
    if rule == "swapped":
        return rollout.sampling_accept_len(draft_lp, target_lp, u)[:, 0]
    return rollout.sampling_accept_len(target_lp, draft_lp, u)[:, 0]


def _sequential_k(p, q, proposal: str) -> torch.Tensor:
    """Reference: speculative sampling one token at a time (draft, accept with min(1, p/q), stop)."""
    import random
    rng = random.Random(2)
    p_rows, q_rows = p.tolist(), q.tolist()
    out = []
    for _ in range(_N):
        prev, k = 0, 0
        while k < _K:
            qs = q_rows[prev]
            if proposal == "sample":
                d = rng.choices(range(_V), weights=qs)[0]
                q_d = qs[d]
            else:
                d, q_d = max(range(_V), key=qs.__getitem__), 1.0  # deterministic proposal
            if rng.random() >= min(1.0, p_rows[prev][d] / q_d):
                break
            k, prev = k + 1, d
        out.append(k)
    return torch.tensor(out)


def _chi2(a: torch.Tensor, b: torch.Tensor) -> float:
    ca = torch.bincount(a, minlength=_K + 1).double()
    cb = torch.bincount(b, minlength=_K + 1).double()
    keep = (ca + cb) > 0
    return float(((ca - cb)[keep] ** 2 / (ca + cb)[keep]).sum())


@pytest.mark.parametrize("proposal", ["sample", "greedy"])
def test_sampling_verification_matches_sequential_speculative_sampling(proposal):
    p, q = _tables()
    reference = _sequential_k(p, q, proposal)
    assert (torch.bincount(reference, minlength=_K + 1) > 0.01 * _N).all()  # every k is exercised
    assert _chi2(_batched_k(p, q, proposal, "correct"), reference) < _CHI2_3_999
    # Can fail: a wrong acceptance rule (q/p instead of p/q; or a greedy window verified as if sampled
    # from q, which over-accepts it) is detected.
    wrong = "swapped" if proposal == "sample" else "temperature_q"
    assert _chi2(_batched_k(p, q, proposal, wrong), reference) > 10 * _CHI2_3_999


def _accept_limit(cfg) -> int:
    """Most draft tokens a PPOW recipe's reward can count: min(K, reward.accept_cap)."""
    cap = cfg.reward.accept_cap
    return cfg.rollout.window if cap is None else min(cfg.rollout.window, cap)


def test_every_ppow_recipe_rewards_only_what_its_eval_tree_accepts():
    # docs/algorithm.md, "Match training to decoding": k is capped at what one decoding cycle can accept,
    # EAGLE-1 the host's static tree (mc_sim_7b_63, depth 5), EAGLE-3 eval.tree_depth + 1.
    from pathlib import Path

    from ppow_plugin.config import load_config
    recipes = sorted(Path(__file__).parents[1].glob("recipes/**/*_ppow.yaml"))
    assert recipes
    host_depth = max(len(path) for path in eagle_compat.default_tree_choices())
    for path in recipes:
        cfg = load_config(path)
        decodable = host_depth if cfg.model.drafter_type == "eagle1" else cfg.eval.tree_depth + 1
        assert _accept_limit(cfg) == decodable, path
    # Can fail: the paper's K = 10 without a cap counts tokens no tree cycle accepts.
    paper = load_config(recipes[0], ["rollout.window=10"])
    assert _accept_limit(paper) == 10 != (host_depth if paper.model.drafter_type == "eagle1"
                                          else paper.eval.tree_depth + 1)
    assert _accept_limit(load_config(recipes[0], ["rollout.window=10", "reward.accept_cap=5"])) == 5


def test_verification_leaves_the_cache_as_the_sequence_so_windows_can_be_verified_again(tiny):
    target, drafter = tiny
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(4, 120, (24,), generator=g)
    kv = eagle_compat.new_kv_cache(target)
    eagle_compat.reset_kv(kv)
    rollout.target_forward(target, ids[None], kv)
    starts = torch.tensor([5, 14])
    drafts = torch.randint(4, 120, (2, 3, 4), generator=g)
    args = ("greedy", 1.0, torch.zeros(drafts.shape))
    first = rollout.verify_windows(target, kv, ids, starts, drafts, *args)
    # A redraw verifies only the later start: its prefix covers slots the earlier start's tree wrote.
    again = rollout.verify_windows(target, kv, ids, starts[1:], drafts[1:], *args)
    torch.testing.assert_close(again[1], first[1][1:], rtol=0, atol=0)
    # Can fail: a tree forward at the earlier start without the restore corrupts the later prefix.
    rollout._set_kv_length(kv, 5)
    with torch.no_grad():
        target.model(input_ids=torch.randint(4, 120, (1, 13), generator=g), past_key_values=kv)
    rollout._set_kv_length(kv, ids.numel())
    corrupted = rollout.verify_windows(target, kv, ids, starts[1:], drafts[1:], *args)
    assert not torch.allclose(corrupted[1], first[1][1:])


def test_verification_on_the_data_equals_the_tree_on_the_targets_own_greedy_answer(tmp_path):
    target = eagle_compat.load_host_target(make_target(tmp_path, layers=4, seed=3), torch.float32)
    # An untied random head: the tied tiny target's greedy answer repeats one token, which would hide a
    # misaligned row; this one's does not.
    g = torch.Generator().manual_seed(0)
    target.lm_head.weight = torch.nn.Parameter(torch.randn(target.lm_head.weight.shape, generator=g))
    g = torch.Generator().manual_seed(5)
    prompt = torch.randint(4, 120, (8,), generator=g)
    answer = greedy_continuation(target, prompt, 18)
    assert len(set(answer.tolist())) >= 6
    ids = torch.cat([prompt, answer])  # T = 26, an answer as `gen_data` writes it
    starts, G, K = torch.tensor([7, 12, 16, 20]), 5, 5  # s + K <= T - 1: every window inside the data
    drafts = torch.randint(4, 120, (4, G, K), generator=g)
    for i, s in enumerate(starts.tolist()):
        data = ids[s + 1: s + 1 + K]
        drafts[i, 0], drafts[i, 1, :2], drafts[i, 2, 1:], drafts[i, 3, :3] = data, data[:2], data[1:], data[:3]
    kv = eagle_compat.new_kv_cache(target)
    eagle_compat.reset_kv(kv)
    tpass = rollout.target_forward(target, ids[None], kv)
    tree = rollout.verify_windows(target, kv, ids, starts, drafts, "greedy", 1.0, torch.zeros(drafts.shape))
    free = data_verify.verify_on_data(ids, tpass.logits, starts, drafts)
    assert torch.equal(free[0], tree[0])
    assert set(free[0].flatten().tolist()) >= {0, 2, 3, K}  # k spans the window
    read = losses.credit_mask(free[0], torch.ones(drafts.shape, dtype=torch.bool), "accepted_prefix")
    for a, b in zip(free[1:], tree[1:]):  # target logits, log-probs of the drafts, greedy log-probs
        torch.testing.assert_close(a[read], b[read], atol=1e-4, rtol=1e-4)

    # Can fail: on data that is not the target's answer, drafts that take the target's choice after each *data*
    # prefix are accepted by the tree at their first token only when the data continues with it; the data's
    # rows say nothing about d_2 after a d_1 the data did not take, so the window stops at k = 1 there
    # (without that rule it would read k = K). k is never over-counted.
    noisy = torch.cat([prompt, torch.randint(4, 120, (18,), generator=g)])
    eagle_compat.reset_kv(kv)
    noisy_pass = rollout.target_forward(target, noisy[None], kv)
    choice = noisy_pass.logits.argmax(-1)  # [T]: the target's token after each data prefix
    chase = torch.stack([choice[s: s + K] for s in starts.tolist()])[:, None]  # [n, 1, K]
    tree = rollout.verify_windows(target, kv, noisy, starts, chase, "greedy", 1.0, torch.zeros(chase.shape))
    free = data_verify.verify_on_data(noisy, noisy_pass.logits, starts, chase)
    off = chase[:, 0, 0] != noisy[starts + 1]  # the data does not continue with the accepted first token
    assert off.sum() >= 3 and (free[0][off] == 1).all() and (free[0] <= tree[0]).all() and (tree[0] >= 1).all()

    # A window that runs past the sequence's end stops there; the positions past it are no window positions.
    last = torch.tensor([ids.numel() - 3])
    end = torch.cat([ids[-2:], greedy_continuation(target, ids, 3)])[None, None]  # [1, 1, 5]
    assert data_verify.verify_on_data(ids, tpass.logits, last, end)[0].item() == 3
    assert data_verify.on_sequence_mask(ids.numel(), last, 1, K)[0, 0].tolist() == [True, True, True, False, False]


def test_verification_on_the_data_reads_each_distinct_row_once_with_the_per_window_numbers():
    """`verify_on_data` computes the target's log-softmax and argmax once per distinct sequence row: bit for bit the
    per-(start, depth) computation it replaced (starts that share rows, a window past the end), and with
    `logits=False` the same without the logits; `dense.greedy_accept_len` is its k of the argmax window.
    Can fail: a window row read off another row (the index into the distinct rows, or the clamp at the end)."""
    from ppow_plugin.method import dense

    g = torch.Generator().manual_seed(0)
    T, V, G, K = 14, 11, 3, 4
    ids = torch.randint(0, V, (T,), generator=g)
    seq = torch.randn(T, V, generator=g)
    starts = torch.tensor([2, 3, 4, 9, 11, 12])  # rows shared between starts; 11 and 12 run past the end
    drafts = torch.randint(0, V, (starts.numel(), G, K), generator=g)
    drafts[:, 0] = seq.argmax(-1)[(starts[:, None] + torch.arange(K)).clamp(max=T - 1)]  # the target's choices
    drafts[:2, 1, :2] = drafts[:2, 0, :2]
    ids[starts[:3] + 1] = drafts[:3, 0, 0]  # ... which the data takes at some starts: k >= 1 there
    ids[starts[:1] + 2] = drafts[:1, 0, 1]
    # the per-(start, depth) computation
    pos = (starts[:, None] + torch.arange(K)).clamp(max=T - 1)
    logits = seq[pos]  # [n, K, V]
    logp = F.log_softmax(logits, -1)
    n = starts.numel()
    want_draft = logp[:, None].expand(n, G, K, -1).gather(-1, drafts[..., None])[..., 0]
    want_greedy = logp.max(-1).values[:, None].expand(n, G, K)
    data = ids[(starts[:, None] + 1 + torch.arange(K)).clamp(max=T - 1)][:, None]
    is_data = (drafts == data) & (starts[:, None] + 1 + torch.arange(K) <= T - 1)[:, None]
    on_data = torch.cat([torch.ones_like(is_data[..., :1]), is_data[..., :-1]], -1)
    want_k = ((drafts == logits.argmax(-1)[:, None]) & on_data).long().cumprod(-1).sum(-1)
    k, tl, draft_lp, greedy_lp = data_verify.verify_on_data(ids, seq, starts, drafts)
    assert torch.equal(k, want_k) and set(k.flatten().tolist()) >= {0, 1, 2}
    assert torch.equal(draft_lp, want_draft) and torch.equal(greedy_lp, want_greedy)
    assert torch.equal(tl, logits[:, None].expand(n, G, K, V))
    k2, none, draft2, greedy2 = data_verify.verify_on_data(ids, seq, starts, drafts, logits=False)
    assert none is None and torch.equal(k2, k) and torch.equal(draft2, draft_lp) and torch.equal(greedy2, greedy_lp)
    drafter_logits = torch.zeros(n, K, V).scatter_(-1, drafts[:, 0, :, None], 1.0)  # argmax = member 0's window
    assert torch.equal(dense.greedy_accept_len(drafter_logits, starts, ids, seq, lambda t: t), k[:, 0])


def _toy_drawn(rewards: torch.Tensor) -> rollout.Drawn:
    """A Drawn whose accept_len holds the group's rewards; the other fields tag the prefix and draw."""
    n, G = rewards.shape
    tag = rewards[..., None].float().expand(n, G, 2)
    return rollout.Drawn(tag.long(), tag, tag[..., None], rewards, tag[..., None], tag, tag)


def test_redraw_flat_groups_redraws_only_flat_groups_within_the_tries():
    first = _toy_drawn(torch.tensor([[0, 0, 0], [0, 2, 0], [1, 1, 1]]))  # prefixes 0 and 2 are flat
    seen = []

    def draw(starts):  # prefix 10 varies on its second redraw, prefix 12 never does
        seen.append(starts.tolist())
        rows = {10: [[0, 0, 0], [3, 0, 0]][min(len(seen) - 1, 1)], 12: [5, 5, 5]}
        return _toy_drawn(torch.tensor([rows[s] for s in starts.tolist()]))

    def flat(d):
        return (d.accept_len == d.accept_len[:, :1]).all(dim=1)

    starts = torch.tensor([10, 11, 12])
    out, redrawn = rollout.redraw_flat_groups(first, starts, draw, flat, tries=3)
    assert seen == [[10, 12], [10, 12], [12]]  # only the still-flat prefixes, at most 3 rounds
    assert redrawn == 5
    assert out.accept_len.tolist() == [[3, 0, 0], [0, 2, 0], [5, 5, 5]]
    assert torch.equal(out.logprobs[1], first.logprobs[1])  # a prefix with variance keeps its windows
    # Can fail: without tries the flat groups stay flat (no redraw, nothing called).
    seen.clear()
    out, redrawn = rollout.redraw_flat_groups(first, starts, draw, flat, tries=0)
    assert (seen, redrawn) == ([], 0) and out is first
