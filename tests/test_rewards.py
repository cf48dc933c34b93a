"""Hand-computed tests for ppow_plugin.method.rewards (γ = 0.12 numbers from the PPOW method reference)."""

import math

import pytest
import torch
from torch.testing import assert_close

from ppow_plugin.method.rewards import (
    RewardBreakdown,
    counted_accept_len,
    joint_reward,
    proximity_delta,
    proximity_reward,
    speedup_reward,
)


def test_speedup_reward_hand_computed():
    k = torch.tensor([[0, 1, 2, 10]])
    expected = torch.tensor([[0.0, 1 / 1.12, 2 / 1.24, 10 / 2.2]])  # k / (0.12 k + 1)
    got = speedup_reward(k, gamma=0.12)
    assert got.dtype == torch.float32 and got.shape == (1, 4)
    assert_close(got, expected)
    assert got[0, 1].item() == pytest.approx(0.892857, abs=1e-6)
    assert got[0, 2].item() == pytest.approx(1.612903, abs=1e-6)
    assert got[0, 3].item() == pytest.approx(4.545454, abs=1e-6)


def test_speedup_reward_zero_cost_counts_tokens():
    k = torch.tensor([[0, 3], [7, 1]])
    assert_close(speedup_reward(k, gamma=0.0), k.float())


@pytest.mark.parametrize("bad", [torch.tensor([[1.0, 2.0]]), torch.tensor([[1, -1]])])
def test_speedup_reward_rejects_bad_accept_len(bad):
    with pytest.raises(ValueError, match="accept_len"):
        speedup_reward(bad, gamma=0.12)


def test_speedup_reward_rejects_negative_gamma():
    with pytest.raises(ValueError, match="gamma"):
        speedup_reward(torch.tensor([[1]]), gamma=-0.1)


def test_proximity_delta_hand_computed_with_padding():
    # B=1, G=2, K=3. Window 1's last position is padding and holds -inf garbage.
    greedy = torch.tensor([[[-0.1, -0.2, -0.3], [-0.5, -0.5, float("-inf")]]])
    drafted = torch.tensor([[[-1.1, -0.2, -2.3], [-0.5, -1.0, float("-inf")]]])
    valid = torch.tensor([[[True, True, True], [True, True, False]]])
    assert_close(proximity_delta(greedy, drafted, valid), torch.tensor([[1.0 + 0.0 + 2.0, 0.0 + 0.5]]))


def test_proximity_delta_over_the_leading_positions_only():
    greedy = torch.tensor([[[-0.1, -0.2, -0.3], [-0.5, -0.5, float("-inf")]]])
    drafted = torch.tensor([[[-1.1, -0.2, -2.3], [-0.5, -1.0, float("-inf")]]])
    valid = torch.tensor([[[True, True, True], [True, True, False]]])
    assert_close(proximity_delta(greedy, drafted, valid, positions=1), torch.tensor([[1.0, 0.0]]))
    assert_close(proximity_delta(greedy, drafted, valid, positions=2), torch.tensor([[1.0, 0.5]]))
    # more positions than the window (or padding past them) change nothing
    assert_close(proximity_delta(greedy, drafted, valid, positions=5), proximity_delta(greedy, drafted, valid))
    with pytest.raises(ValueError, match="positions"):
        proximity_delta(greedy, drafted, valid, positions=0)


def test_proximity_delta_fully_padded_window_and_noise_clamp():
    greedy = torch.tensor([[[-0.5, -0.5], [float("nan"), 0.0]]])
    drafted = torch.tensor([[[-0.5 + 1e-7, -0.5], [1.0, 0.0]]])  # drafted == greedy up to float noise
    valid = torch.tensor([[[True, True], [False, False]]])
    assert torch.equal(proximity_delta(greedy, drafted, valid), torch.zeros(1, 2))


def test_proximity_reward_only_for_first_token_rejections():
    k = torch.tensor([[0, 0, 3], [0, 1, 0]])
    delta = torch.tensor([[0.5, 2.5, 0.1], [2.0, 0.1, 1.999]])
    # k=0 & Δ<ε -> η; k=0 & Δ>=ε -> 0 (Δ == ε is not "<"); k>0 -> 0 however small Δ is.
    expected = torch.tensor([[0.5, 0.0, 0.0], [0.0, 0.0, 0.5]])
    assert torch.equal(proximity_reward(k, delta, eta=0.5, epsilon=2.0), expected)


@pytest.mark.parametrize(
    "eta, epsilon, match", [(-0.1, 1.0, "eta"), (0.5, 0.0, "epsilon"), (0.5, -1.0, "epsilon")]
)
def test_proximity_reward_validation(eta, epsilon, match):
    with pytest.raises(ValueError, match=match):
        proximity_reward(torch.tensor([[0]]), torch.tensor([[0.0]]), eta=eta, epsilon=epsilon)


def test_joint_reward_edge_cases():
    # Row 0: everything accepted (K=10), first token rejected near the target, rejected far from it.
    # Row 1: one token accepted with Δ=0 (no bonus: R_dist needs k=0), two, and k=0 near.
    k = torch.tensor([[10, 0, 0], [1, 2, 0]])
    delta = torch.tensor([[0.0, 0.3, 5.0], [0.0, 0.0, 1.0]])
    out = joint_reward(k, delta, gamma=0.12, eta=0.8, epsilon=2.0)
    assert isinstance(out, RewardBreakdown)
    assert_close(out.speedup, torch.tensor([[10 / 2.2, 0.0, 0.0], [1 / 1.12, 2 / 1.24, 0.0]]))
    assert_close(out.proximity, torch.tensor([[0.0, 0.8, 0.0], [0.0, 0.0, 0.8]]))
    assert_close(out.total, out.speedup + out.proximity)
    # The terms never overlap.
    assert not bool(((out.speedup != 0) & (out.proximity != 0)).any())


def test_joint_reward_weights_scale_each_term():
    k = torch.tensor([[2, 0]])
    delta = torch.tensor([[0.0, 0.0]])
    out = joint_reward(k, delta, gamma=0.12, eta=1.0, epsilon=1.0, speedup_weight=0.5, proximity_weight=0.25)
    assert_close(out.total, torch.tensor([[0.5 * 2 / 1.24, 0.25]]))
    assert math.isclose(out.proximity[0, 1].item(), 0.25)


def test_counted_accept_len_caps_at_the_tree_depth():
    k = torch.tensor([[0, 3, 5, 7, 10]])
    assert counted_accept_len(k, 5).tolist() == [[0, 3, 5, 5, 5]]
    assert counted_accept_len(k, None) is k
    # Capped, a window accepted to 10 earns what one accepted to 5 earns; uncapped it earns more.
    capped = speedup_reward(counted_accept_len(k, 5), 0.12)
    assert capped[0, 4] == capped[0, 2]
    assert speedup_reward(k, 0.12)[0, 4] > capped[0, 4]
    with pytest.raises(ValueError, match="cap"):
        counted_accept_len(k, 0)
    with pytest.raises(ValueError, match="integer"):
        counted_accept_len(k.float(), 5)
