"""Hypothesis properties of the PPOW math (small examples, no deadline: keep the suite fast on CPU)."""

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ppow_plugin.losses import group_advantages, policy_loss
from ppow_plugin.rewards import proximity_reward, speedup_reward
from ppow_plugin.windowing import select_windows, window_scores

FAST = settings(max_examples=50, deadline=None)
gammas = st.floats(min_value=0.01, max_value=2.0)


@st.composite
def int_grid(draw, max_value=200):
    b = draw(st.integers(1, 4))
    g = draw(st.integers(1, 6))
    values = draw(st.lists(st.integers(0, max_value), min_size=b * g, max_size=b * g))
    return torch.tensor(values, dtype=torch.int64).reshape(b, g)


@FAST
@given(k=int_grid(), gamma=gammas)
def test_speedup_reward_bounded_and_monotone(k, gamma):
    r = speedup_reward(k, gamma)
    assert (r >= 0).all() and (r < 1.0 / gamma).all()
    _, order = k.flatten().sort()
    assert (r.flatten()[order].diff() >= 0).all()
    assert (r[k == 0] == 0).all()


@FAST
@given(k=int_grid(max_value=3), seed=st.integers(0, 2**31 - 1), eta=st.floats(0.0, 2.0),
       epsilon=st.floats(0.01, 5.0))
def test_proximity_reward_is_zero_or_eta(k, seed, eta, epsilon):
    delta = torch.rand(k.shape, generator=torch.Generator().manual_seed(seed)) * 6.0
    r = proximity_reward(k, delta, eta, epsilon)
    eta32 = torch.tensor(eta, dtype=torch.float32)
    assert ((r == 0) | (r == eta32)).all()
    assert (r[k > 0] == 0).all()


@st.composite
def rewards_and_mask(draw):
    b = draw(st.integers(1, 4))
    g = draw(st.integers(1, 8))
    rewards = draw(st.lists(st.floats(-10, 10, width=32), min_size=b * g, max_size=b * g))
    mask = draw(st.lists(st.booleans(), min_size=b * g, max_size=b * g))
    return torch.tensor(rewards).reshape(b, g), torch.tensor(mask).reshape(b, g)


@FAST
@given(data=rewards_and_mask(), scale=st.sampled_from(["std", "none"]))
def test_advantages_zero_mean_per_group_and_zero_on_invalid(data, scale):
    rewards, valid = data
    adv = group_advantages(rewards, valid, scale=scale)
    assert torch.isfinite(adv).all()
    assert (adv[~valid] == 0).all()
    per_group = torch.where(valid, adv.double(), 0.0).sum(dim=1)
    bound = 1e-4 * valid.sum(dim=1) * (1.0 if scale == "std" else 10.0)
    assert (per_group.abs() <= bound + 1e-9).all()


@st.composite
def scored_sequence(draw):
    b = draw(st.integers(1, 4))
    t = draw(st.integers(1, 8))
    scores = draw(st.lists(st.floats(0.0, 5.0, width=32), min_size=b * t, max_size=b * t))
    mask = draw(st.lists(st.booleans(), min_size=b * t, max_size=b * t))
    return torch.tensor(scores).reshape(b, t), torch.tensor(mask).reshape(b, t)


@FAST
@given(data=scored_sequence(), window=st.integers(1, 5), n=st.integers(1, 10),
       rule=st.sampled_from(["top", "sample", "uniform"]), seed=st.integers(0, 2**31 - 1),
       temperature=st.floats(0.1, 3.0))
def test_selected_windows_start_inside_sequence_and_loss_mask(data, window, n, rule, seed, temperature):
    pos, valid = data
    scores = window_scores(pos, valid, window)
    sel = select_windows(scores, n, rule, torch.Generator().manual_seed(seed), temperature)
    t = pos.shape[1]
    assert sel.starts.shape == (pos.shape[0], n)
    assert ((sel.starts >= 0) & (sel.starts < t)).all()
    assert valid.gather(1, sel.starts)[sel.valid_mask].all()
    # Every row picks min(n, #valid starts) distinct windows.
    assert torch.equal(sel.valid_mask.sum(dim=1), valid.sum(dim=1).clamp_max(n))
    for row in range(pos.shape[0]):
        picked = sel.starts[row][sel.valid_mask[row]].tolist()
        assert len(set(picked)) == len(picked)


@FAST
@given(seed=st.integers(0, 2**31 - 1),
       shape=st.tuples(st.integers(1, 3), st.integers(1, 4), st.integers(1, 5)),
       clip_eps=st.floats(0.01, 0.5), mode=st.sampled_from(["token", "window"]),
       pad_prob=st.floats(0.0, 1.0))
def test_policy_loss_is_finite(seed, shape, clip_eps, mode, pad_prob):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(shape, generator=g) * 8.0
    new = (old + torch.randn(shape, generator=g) * 2.0).requires_grad_()
    adv = torch.randn(shape[:2], generator=g) * 3.0
    valid = torch.rand(shape, generator=g) >= pad_prob
    loss, stats = policy_loss(new, old, adv, valid, clip_eps, mode)
    loss.backward()
    assert math.isfinite(loss.item()) and torch.isfinite(new.grad).all()
    assert all(math.isfinite(s.item()) for s in stats)
