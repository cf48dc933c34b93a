"""Rollouts and verification: hand-built acceptance cases, and batched tree verification / batched
drafting checked against brute force (one window at a time, full forwards, no cache) on a tiny target."""

import pytest
import torch
import torch.nn.functional as F

from ppow_plugin import eagle_compat, patching, rollout
from tiny import make_target

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
        seq = ids[: s + 1]
        for _ in range(K):
            with torch.no_grad():
                nxt = target.lm_head(target.model(input_ids=seq[None])[0])[0, -1].argmax()
            seq = torch.cat([seq, nxt[None]])
        greedy = seq[s + 1:]
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


def test_sample_categorical_matches_the_distribution_and_skips_zero_mass():
    from ppow_plugin.rollout import sample_categorical
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.5], [0.7, 0.0, 0.3, 0.0], [0.0, 0.0, 0.0, 1.0]])
    logp = probs.log().repeat(4000, 1)  # [12000, 4], -inf where p = 0
    draws = sample_categorical(logp, torch.Generator().manual_seed(0)).view(4000, 3)
    freq = torch.stack([torch.bincount(draws[:, r], minlength=4).float() / 4000 for r in range(3)])
    assert (freq[probs == 0] == 0).all()  # never an impossible id, also at the last row's edge
    torch.testing.assert_close(freq, probs, atol=0.03, rtol=0)  # 4000 draws: std <= 0.008
    again = sample_categorical(logp, torch.Generator().manual_seed(0)).view(4000, 3)
    assert torch.equal(draws, again)  # the generator alone decides
