"""The exact expected reward (`expected.py`) is the G -> infinity limit of the sampled estimator on the data path.

A toy data path (V = 7, K = 3, four starts, one of them running past the sequence's end, two rows where the
target's argmax is not the data token): the gradient of −mean E[R] with respect to the drafter's data-path
logits, against the mean policy gradient of G windows per start drawn, verified and rewarded the way
`dense_step` does it (`advantage_scale: none`, `ratio_mode: token`, `credit: accepted_prefix`).
"""

import torch
import torch.nn.functional as F

from ppow_plugin.method import dense, expected, losses, rewards

V, K, TEMP, GAMMA, ETA, EPS = 7, 3, 0.8, 0.12, 1.0, 3.5


def _toy():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, V, (10,), generator=g)
    seq_logits = torch.randn(10, V, generator=g)
    seq_logits[torch.arange(9), ids[1:]] += 3.0  # the target's own answer: its argmax is the next token ...
    seq_logits[4, ids[5]] -= 6.0  # ... except at two rows (near-ties of real data)
    seq_logits[6, ids[7]] -= 6.0
    starts = torch.tensor([1, 3, 5, 8])  # the last window runs past the end (rows 8, 9, 10 > T-1)
    data_t, exists = dense.data_tokens(ids, starts, K)
    data = torch.where(exists, data_t, -1)
    logits = torch.randn(4, K, V, generator=g) + 1.5 * F.one_hot(data_t, V) * exists[..., None]
    return ids, seq_logits, starts, data, logits.requires_grad_()


def _expected_grad(ids, seq_logits, starts, data, logits, proximity_weight=1.0, depth_one_only=False):
    pos = starts[:, None] + torch.arange(K)
    last = ids.numel() - 1
    greedy = torch.where(pos <= last, seq_logits.argmax(-1)[pos.clamp(max=last)], -1)
    near = expected.near_first_mask(seq_logits[starts], torch.arange(V), EPS)
    logp = F.log_softmax(logits / TEMP, -1)
    if depth_one_only:  # a wrong estimator: no window ever goes past its first token (the deeper terms dropped)
        data = torch.full_like(data, -1)
    ex = expected.expected_reward(logp, data, greedy, near, GAMMA, ETA, proximity_weight=proximity_weight)
    (grad,) = torch.autograd.grad(-ex.total.mean(), logits)
    return grad, ex


def _sampled_grad(ids, seq_logits, starts, data, logits, group_size, gen):
    logp = F.log_softmax(logits / TEMP, -1)
    w = dense.sampled_windows(logits, starts, ids, seq_logits, data, group_size, TEMP, lambda t: t, gen)
    k = rewards.counted_accept_len(w.accept_len, None)
    delta = rewards.proximity_delta(w.target_greedy_lp, w.target_draft_lp, w.valid_mask, 1)
    rw = rewards.joint_reward(k, delta, GAMMA, ETA, EPS)
    adv = losses.group_advantages(rw.total, scale="none")
    credited = losses.credit_mask(k, w.valid_mask, "accepted_prefix", 1)
    pol, _ = losses.policy_loss(w.logprobs, w.logprobs.detach(), adv, credited, 0.2, "token")
    (grad,) = torch.autograd.grad(pol, logits)
    del logp
    return grad, rw


def _cos(a, b):
    return float(F.cosine_similarity(a.flatten(), b.flatten(), dim=0))


def test_expected_reward_is_the_mean_of_the_sampled_reward():
    ids, seq_logits, starts, data, logits = _toy()
    _, ex = _expected_grad(ids, seq_logits, starts, data, logits)
    _, rw = _sampled_grad(ids, seq_logits, starts, data, logits, 200_000, torch.Generator().manual_seed(1))
    torch.testing.assert_close(rw.total.mean(1), ex.total.detach(), atol=0.01, rtol=0.01)
    torch.testing.assert_close(rw.proximity.mean(1), ex.proximity.detach(), atol=0.005, rtol=0.02)
    assert float(ex.proximity.detach().mean()) > 0.05 and float(ex.speedup.detach()[0]) > 0.3  # both terms matter


def test_sampled_policy_gradient_converges_to_the_expected_gradient():
    ids, seq_logits, starts, data, logits = _toy()
    exact, _ = _expected_grad(ids, seq_logits, starts, data, logits)
    gen = torch.Generator().manual_seed(2)
    cos = {G: _cos(_sampled_grad(ids, seq_logits, starts, data, logits, G, gen)[0], exact) for G in (8, 512, 65_536)}
    assert cos[8] < cos[512] < cos[65_536] and cos[65_536] > 0.995, cos
    big = _sampled_grad(ids, seq_logits, starts, data, logits, 65_536, gen)[0]
    # Can fail: an estimator without the R_dist term, or without the depths past the first, is another gradient
    no_dist, _ = _expected_grad(ids, seq_logits, starts, data, logits, proximity_weight=0.0)
    no_chain, _ = _expected_grad(ids, seq_logits, starts, data, logits, depth_one_only=True)
    assert _cos(big, no_dist) < 0.9 and _cos(big, no_chain) < 0.9, (_cos(big, no_dist), _cos(big, no_chain))
