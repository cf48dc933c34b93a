"""Hand-computed tests for ppow_plugin.method.losses."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.testing import assert_close

from ppow_plugin.method.losses import (
    credit_mask,
    distill_loss,
    eagle1_sft_loss,
    group_advantages,
    policy_loss,
    target_kl_loss,
    ttt_sft_loss,
)

LN = math.log
NAN = float("nan")


# --- advantages -----------------------------------------------------------------------------------

def test_group_advantages_hand_computed():
    rewards = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    std = math.sqrt(1.25)  # population std of 1..4 around 2.5
    expected = torch.tensor([[-1.5, -0.5, 0.5, 1.5]]) / std
    assert_close(group_advantages(rewards, eps=0.0), expected)
    assert_close(group_advantages(rewards, scale="none"), torch.tensor([[-1.5, -0.5, 0.5, 1.5]]))


def test_group_advantages_identical_rewards_are_exactly_zero():
    rewards = torch.tensor([[0.1, 0.1, 0.1], [0.0, 0.0, 0.0], [0.7, 0.7, 0.2]])
    valid = torch.tensor([[True, True, True], [True, True, True], [True, True, False]])
    assert torch.equal(group_advantages(rewards, valid), torch.zeros(3, 3))


def test_group_advantages_masked_members_and_fully_padded_row():
    rewards = torch.tensor([[1.0, 5.0, 100.0], [NAN, NAN, NAN], [2.0, 9.0, 9.0]])
    valid = torch.tensor([[True, True, False], [False, False, False], [True, False, False]])
    # Row 0: mean 3, std 2 over the two valid members. Row 1: nothing valid. Row 2: a single member.
    expected = torch.tensor([[-1.0, 1.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    assert_close(group_advantages(rewards, valid, eps=0.0), expected)


def test_group_advantages_validation():
    with pytest.raises(ValueError, match="scale"):
        group_advantages(torch.zeros(1, 2), scale="rank")
    with pytest.raises(ValueError, match="eps"):
        group_advantages(torch.zeros(1, 2), eps=-1.0)


# --- policy loss ----------------------------------------------------------------------------------
# One prefix, two windows of two tokens, clip 0.2.
# Window 0, A = +1: token ratios 1.5 (clipped to 1.2) and 0.9.
# Window 1, A = -1: token ratios 0.5 (clipped to 0.8) and 1.1.

def _case():
    old = torch.zeros(1, 2, 2)
    new = torch.tensor([[[LN(1.5), LN(0.9)], [LN(0.5), LN(1.1)]]], requires_grad=True)
    adv = torch.tensor([[1.0, -1.0]])
    valid = torch.ones(1, 2, 2, dtype=torch.bool)
    return new, old, adv, valid


def test_policy_loss_token_mode_clips_on_both_sides():
    new, old, adv, valid = _case()
    loss, stats = policy_loss(new, old, adv, valid, clip_eps=0.2, ratio_mode="token")
    # min(rA, clip(r)A) = [1.2, 0.9] for A>0 and [-0.8, -1.1] for A<0; mean over 4 tokens.
    assert_close(loss, torch.tensor(-(1.2 + 0.9 - 0.8 - 1.1) / 4))
    loss.backward()
    # Clipped tokens get no gradient; the others get -(1/4) * r * A.
    assert_close(new.grad, torch.tensor([[[0.0, -0.25 * 0.9], [0.0, 0.25 * 1.1]]]))
    assert_close(stats.clip_fraction, torch.tensor(0.5))
    assert_close(stats.outside_fraction, torch.tensor(0.5))  # 1.5 and 0.5 lie outside [0.8, 1.2]
    assert_close(stats.ratio_mean, torch.tensor(1.0))
    assert not stats.ratio_mean.requires_grad


def test_policy_loss_window_mode_differs_from_token_mode():
    new, old, adv, valid = _case()
    loss, stats = policy_loss(new, old, adv, valid, clip_eps=0.2, ratio_mode="window")
    r0, r1 = math.sqrt(1.5 * 0.9), math.sqrt(0.5 * 1.1)  # geometric means: 1.1619 (inside), 0.7416 (clipped)
    assert_close(loss, torch.tensor(-(r0 * 1.0 + 0.8 * -1.0) / 2))
    token_loss, _ = policy_loss(new, old, adv, valid, clip_eps=0.2, ratio_mode="token")
    assert abs(loss.item() - token_loss.item()) > 0.1
    assert_close(stats.clip_fraction, torch.tensor(0.5))
    assert_close(stats.outside_fraction, torch.tensor(0.5))  # window 1 (r1 = 0.74): both its tokens
    assert_close(stats.ratio_mean, torch.tensor((r0 + r1) / 2))


@pytest.mark.parametrize("mode", ["token", "window"])
def test_policy_loss_padding_contributes_nothing(mode):
    new, old, adv, valid = _case()
    reference, _ = policy_loss(new, old, adv, valid, clip_eps=0.2, ratio_mode=mode)
    # Add a second prefix whose windows are fully padded and hold garbage.
    new2 = torch.cat([new.detach(), torch.full((1, 2, 2), -math.inf)]).requires_grad_()
    old2 = torch.cat([old, torch.full((1, 2, 2), NAN)])
    adv2 = torch.cat([adv, torch.tensor([[5.0, -5.0]])])
    valid2 = torch.cat([valid, torch.zeros(1, 2, 2, dtype=torch.bool)])
    loss, stats = policy_loss(new2, old2, adv2, valid2, clip_eps=0.2, ratio_mode=mode)
    assert_close(loss, reference)
    loss.backward()
    assert torch.isfinite(new2.grad).all() and (new2.grad[1] == 0).all()
    assert torch.isfinite(stats.approx_kl)


def test_policy_loss_padded_token_inside_window():
    # One window, A = 1: tokens r = 1.1 and a padded one. Both modes reduce to ratio 1.1.
    new = torch.tensor([[[LN(1.1), 7.0]]])
    old = torch.zeros(1, 1, 2)
    valid = torch.tensor([[[True, False]]])
    for mode in ("token", "window"):
        loss, _ = policy_loss(new, old, torch.ones(1, 1), valid, clip_eps=0.2, ratio_mode=mode)
        assert_close(loss, torch.tensor(-1.1))


@pytest.mark.parametrize("mode", ["token", "window"])
def test_policy_loss_all_padded_batch_is_zero_with_defined_grad(mode):
    new = torch.full((2, 3, 4), NAN, requires_grad=True)
    padded = torch.zeros(2, 3, 4, dtype=torch.bool)
    loss, stats = policy_loss(new, torch.zeros(2, 3, 4), torch.ones(2, 3), padded,
                              clip_eps=0.2, ratio_mode=mode)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(new.grad, torch.zeros(2, 3, 4))
    assert stats.clip_fraction.item() == 0.0


def test_policy_loss_approx_kl():
    new = torch.tensor([[[LN(2.0), 0.0]]])
    _, stats = policy_loss(new, torch.zeros(1, 1, 2), torch.ones(1, 1), torch.ones(1, 1, 2, dtype=torch.bool),
                           clip_eps=0.2, ratio_mode="token")
    assert_close(stats.approx_kl, torch.tensor((2.0 - 1.0 - LN(2.0)) / 2))  # k3 of r=2 and r=1
    same, _ = policy_loss(torch.zeros(1, 1, 2), torch.zeros(1, 1, 2), torch.ones(1, 1),
                          torch.ones(1, 1, 2, dtype=torch.bool), clip_eps=0.2, ratio_mode="token")
    assert same.item() == -1.0  # r = 1: loss = -A


def test_policy_loss_validation():
    new, old, adv, valid = _case()
    with pytest.raises(ValueError, match="clip_eps"):
        policy_loss(new, old, adv, valid, clip_eps=0.0, ratio_mode="token")
    with pytest.raises(ValueError, match="ratio_mode"):
        policy_loss(new, old, adv, valid, clip_eps=0.2, ratio_mode="sequence")


# --- KL to the target and distillation ------------------------------------------------------------

def _two_rows_and_padding():
    # Row 0: P = [0.5, 0.5], Q = [0.25, 0.75]. Row 1: P == Q. Row 2: padding with NaN garbage.
    target = torch.tensor([[0.5, 0.5], [0.9, 0.1], [NAN, NAN]]).log()
    draft = torch.tensor([[0.25, 0.75], [0.9, 0.1], [NAN, NAN]]).log().requires_grad_()
    valid = torch.tensor([True, True, False])
    return target, draft, valid


def test_target_kl_loss_forward_and_reverse():
    target, draft, valid = _two_rows_and_padding()
    target.requires_grad_()
    forward, stats = target_kl_loss(target, draft, valid)
    kl_pq = 0.5 * LN(0.5 / 0.25) + 0.5 * LN(0.5 / 0.75)
    assert_close(forward, torch.tensor(kl_pq / 2))  # row 1 has KL 0
    assert_close(stats.kl_max, torch.tensor(kl_pq))
    forward.backward()
    assert target.grad is None and torch.isfinite(draft.grad).all()
    reverse, _ = target_kl_loss(target, draft, valid, direction="reverse")
    assert_close(reverse, torch.tensor((0.25 * LN(0.25 / 0.5) + 0.75 * LN(0.75 / 0.5)) / 2))


def test_target_kl_loss_zero_when_equal_and_empty_mask():
    logits = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    loss, _ = target_kl_loss(logits, logits.clone(), torch.tensor([True, True]))
    assert abs(loss.item()) < 1e-6
    draft = logits.clone().requires_grad_()
    empty, stats = target_kl_loss(logits, draft, torch.tensor([False, False]))
    empty.backward()
    assert empty.item() == 0.0 and stats.kl_max.item() == 0.0 and torch.equal(draft.grad, torch.zeros(2, 3))
    with pytest.raises(ValueError, match="direction"):
        target_kl_loss(logits, logits, torch.tensor([True, True]), direction="symmetric")


def test_distill_loss_hand_computed():
    target = torch.tensor([[0.75, 0.25], [0.2, 0.8], [NAN, NAN]]).log()
    draft = torch.tensor([[0.25, 0.75], [0.4, 0.6], [NAN, NAN]]).log().requires_grad_()
    loss, stats = distill_loss(target, draft, torch.tensor([True, True, False]))
    ce0 = -(0.75 * LN(0.25) + 0.25 * LN(0.75))
    ce1 = -(0.2 * LN(0.4) + 0.8 * LN(0.6))
    assert_close(loss, torch.tensor((ce0 + ce1) / 2))
    assert_close(stats.top1_acc, torch.tensor(0.5))  # row 0 disagrees, row 1 agrees
    loss.backward()
    assert torch.isfinite(draft.grad).all()


# --- SFT losses -----------------------------------------------------------------------------------

def test_eagle1_sft_loss_hand_computed():
    pred = torch.tensor([[[0.0, 0.0], [1.0, 1.0], [9.0, 9.0]]], requires_grad=True)
    feats = torch.tensor([[[0.5, 2.0], [1.0, 1.0], [0.0, 0.0]]])
    draft = torch.tensor([[[0.25, 0.75], [0.5, 0.5], [1.0, 0.0]]]).log()
    target = torch.tensor([[[0.75, 0.25], [0.5, 0.5], [0.0, 1.0]]]).log()
    mask = torch.tensor([[True, True, False]])
    loss, stats = eagle1_sft_loss(pred, feats, draft, target, mask, feature_weight=1.0, token_weight=0.1)
    # SmoothL1 (beta 1): |0.5| -> 0.125, |2| -> 1.5; position 0 mean 0.8125, position 1 zero.
    feature = (0.8125 + 0.0) / 2
    token = (-(0.75 * LN(0.25) + 0.25 * LN(0.75)) + LN(2.0)) / 2
    assert_close(stats.feature_loss, torch.tensor(feature))
    assert_close(stats.token_loss, torch.tensor(token))
    assert_close(loss, torch.tensor(feature + 0.1 * token))
    assert_close(stats.top1_acc, torch.tensor(0.5))  # position 1 is a tie: argmax 0 == 0
    loss.backward()
    assert (pred.grad[0, 2] == 0).all()


def test_ttt_sft_loss_decays_steps_and_handles_an_empty_step():
    probs = torch.tensor([[[0.75, 0.25], [0.5, 0.5]]])
    draft0 = torch.tensor([[[0.25, 0.75], [0.5, 0.5]]]).log().requires_grad_()
    draft1 = torch.tensor([[[0.75, 0.25], [NAN, NAN]]]).log()
    empty = torch.zeros(1, 2, 2)
    masks = [torch.tensor([[True, True]]), torch.tensor([[True, False]]), torch.tensor([[False, False]])]
    loss, stats = ttt_sft_loss([draft0, draft1, empty], [probs, probs, probs], masks, decay=0.8)
    step0 = (-(0.75 * LN(0.25) + 0.25 * LN(0.75)) + LN(2.0)) / 2
    step1 = -(0.75 * LN(0.75) + 0.25 * LN(0.25))
    assert_close(stats.per_step_loss, torch.tensor([step0, step1, 0.0]))
    assert_close(stats.per_step_acc, torch.tensor([0.5, 1.0, 0.0]))
    assert_close(loss, torch.tensor(step0 + 0.8 * step1))
    loss.backward()
    assert torch.isfinite(draft0.grad).all()


def test_ttt_sft_loss_validation():
    x = torch.zeros(1, 1, 2)
    m = torch.ones(1, 1, dtype=torch.bool)
    with pytest.raises(ValueError, match="non-empty"):
        ttt_sft_loss([], [], [], decay=0.8)
    with pytest.raises(ValueError, match="non-empty"):
        ttt_sft_loss([x], [x, x], [m], decay=0.8)
    with pytest.raises(ValueError, match="decay"):
        ttt_sft_loss([x], [x], [m], decay=0.0)


# --- credit assignment ----------------------------------------------------------------------------
# One prefix, four windows of K = 3 with k = 0, 1, 2, 3 (the last fully accepted); window 2's last
# position is padding.

def _credit_case():
    accept = torch.tensor([[0, 1, 2, 3]])
    valid = torch.ones(1, 4, 3, dtype=torch.bool)
    valid[0, 2, 2] = False
    return accept, valid


def test_credit_mask_hand_computed():
    accept, valid = _credit_case()
    expected = torch.tensor([[[1, 0, 0], [1, 1, 0], [1, 1, 0], [1, 1, 1]]], dtype=torch.bool)
    assert torch.equal(credit_mask(accept, valid, "accepted_prefix"), expected)
    # "window" is every valid token, as before the credit choice existed.
    assert torch.equal(credit_mask(accept, valid, "window"), valid)
    # Δ over two positions decides R_dist for the k = 0 window: both stay credited there only.
    expected[0, 0, 1] = True
    assert torch.equal(credit_mask(accept, valid, "accepted_prefix", proximity_positions=2), expected)
    # k capped at 2 (a depth-2 tree): the window accepted to the cap was decided by its first 2 tokens.
    capped = torch.tensor([[[1, 0, 0], [1, 1, 0], [1, 1, 0], [1, 1, 0]]], dtype=torch.bool)
    assert torch.equal(credit_mask(accept.clamp(max=2), valid, "accepted_prefix", accept_cap=2), capped)


def test_signed_credit_splits_the_prefix_by_the_advantage_sign():
    accept, valid = _credit_case()
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0]])
    # A > 0: accepted tokens 1..k only (k = 0 keeps R_dist's first position); A < 0: the rejected token
    # k + 1 only (window 3 is fully accepted: it has no rejected token, so nothing).
    expected = torch.tensor([[[1, 0, 0], [1, 0, 0], [0, 0, 0], [0, 0, 0]]], dtype=torch.bool)
    assert torch.equal(credit_mask(accept, valid, "signed", advantages=adv), expected)
    adv = torch.tensor([[-1.0, -1.0, 1.0, 1.0]])
    expected = torch.tensor([[[1, 0, 0], [0, 1, 0], [1, 1, 0], [1, 1, 1]]], dtype=torch.bool)
    assert torch.equal(credit_mask(accept, valid, "signed", advantages=adv), expected)
    # It is always a subset of accepted_prefix (the tokens that decided k).
    assert not (expected & ~credit_mask(accept, valid, "accepted_prefix")).any()
    with pytest.raises(ValueError, match="advantages"):
        credit_mask(accept, valid, "signed")


def test_signed_credit_never_raises_a_rejected_token():
    # Window 0: k = 1, above the mean (A = +1); window 1: k = 0, below (A = -1). Token mode, ratios 1.
    # Under "signed" the rejected second token of window 0 gets no gradient; under "accepted_prefix" its
    # gradient is negative, i.e. the step raises the probability of a token the target refused.
    accept = torch.tensor([[1, 0]])
    valid = torch.ones(1, 2, 3, dtype=torch.bool)
    adv = torch.tensor([[1.0, -1.0]])
    grads = {}
    for credit in ("signed", "accepted_prefix"):
        new = torch.zeros(1, 2, 3, requires_grad=True)
        mask = credit_mask(accept, valid, credit, advantages=adv)
        loss, _ = policy_loss(new, torch.zeros(1, 2, 3), adv, mask, clip_eps=0.2, ratio_mode="token")
        loss.backward()
        grads[credit] = new.grad
    assert grads["signed"][0, 0, 1] == 0 and grads["signed"][0, 0, 0] < 0 and grads["signed"][0, 1, 0] > 0
    assert grads["accepted_prefix"][0, 0, 1] < 0  # can fail: the old rule pushes the rejected token up


def test_credit_mask_validation():
    accept, valid = _credit_case()
    with pytest.raises(ValueError, match="credit"):
        credit_mask(accept, valid, "prefix")
    with pytest.raises(ValueError, match="proximity_positions"):
        credit_mask(accept, valid, "window", proximity_positions=0)


def test_accepted_prefix_credit_leaves_later_tokens_without_gradient():
    # Window 0 (k = 0, A = +1) and window 1 (k = 2, A = -1) of K = 3, token mode, ratios 1: the loss is
    # -(A_0 * 1 + A_1 * 3) / 4 credited tokens, and the gradient of each credited token is -A / 4.
    accept = torch.tensor([[0, 2]])
    valid = torch.ones(1, 2, 3, dtype=torch.bool)
    adv = torch.tensor([[1.0, -1.0]])
    new = torch.zeros(1, 2, 3, requires_grad=True)
    loss, _ = policy_loss(new, torch.zeros(1, 2, 3), adv, credit_mask(accept, valid, "accepted_prefix"),
                          clip_eps=0.2, ratio_mode="token")
    loss.backward()
    assert_close(loss, torch.tensor(-(1.0 - 3.0) / 4))
    assert_close(new.grad, torch.tensor([[[-0.25, 0.0, 0.0], [0.25, 0.25, 0.25]]]))
    # Can fail: with "window" credit the rejected window's later tokens get gradient too.
    new.grad = None
    loss, _ = policy_loss(new, torch.zeros(1, 2, 3), adv, credit_mask(accept, valid, "window"),
                          clip_eps=0.2, ratio_mode="token")
    loss.backward()
    assert_close(new.grad, torch.full((1, 2, 3), 1 / 6) * torch.tensor([-1.0, 1.0])[None, :, None])


def test_accepted_prefix_credit_in_window_mode_averages_the_credited_tokens():
    # Window ratio = geometric mean over the credited tokens only: log-ratios [ln 1.1, ln 5, ln 5] with
    # k = 0 give r = 1.1 (unclipped at ε = 0.2); with "window" credit r = (1.1·25)^(1/3) ≈ 3.02 is clipped.
    accept = torch.tensor([[0, 0]])
    valid = torch.ones(1, 2, 3, dtype=torch.bool)
    new = torch.log(torch.tensor([[[1.1, 5.0, 5.0], [1.0, 1.0, 1.0]]]))
    adv = torch.tensor([[1.0, -1.0]])
    loss, stats = policy_loss(new, torch.zeros(1, 2, 3), adv, credit_mask(accept, valid, "accepted_prefix"),
                              clip_eps=0.2, ratio_mode="window")
    assert_close(loss, torch.tensor(-(1.1 - 1.0) / 2))
    assert_close(stats.clip_fraction, torch.tensor(0.0))
    loss, stats = policy_loss(new, torch.zeros(1, 2, 3), adv, credit_mask(accept, valid, "window"),
                              clip_eps=0.2, ratio_mode="window")
    assert_close(loss, torch.tensor(-(1.2 - 1.0) / 2))
    assert_close(stats.clip_fraction, torch.tensor(0.5))


def test_kl_on_the_accepted_prefix_skips_positions_after_the_rejection():
    # Two windows of K = 2; window 0 k = 0, window 1 k = 2. The target is one-hot-ish on token 0; the
    # drafter is uniform at the credited positions and far off at window 0's second (uncredited) one.
    target = torch.tensor([[[[5.0, 0.0], [5.0, 0.0]], [[5.0, 0.0], [5.0, 0.0]]]])  # [1, 2, 2, V=2]
    draft = torch.zeros(1, 2, 2, 2)
    draft[0, 0, 1] = torch.tensor([0.0, 9.0])
    valid = torch.ones(1, 2, 2, dtype=torch.bool)
    mask = credit_mask(torch.tensor([[0, 2]]), valid, "accepted_prefix")
    kl, _ = target_kl_loss(target.reshape(-1, 2), draft.reshape(-1, 2), mask.reshape(-1))
    p = torch.softmax(torch.tensor([5.0, 0.0]), -1)
    kl_uniform = (p * (p.log() - math.log(0.5))).sum()
    assert_close(kl, kl_uniform)  # three credited positions, all uniform drafts
    full, _ = target_kl_loss(target.reshape(-1, 2), draft.reshape(-1, 2), valid.reshape(-1))
    assert full > kl + 1.0  # can fail: the window-wide KL also sees the far-off position


# --- the policy term is alive (KL and distillation weights 0) -------------------------------------
# A softmax policy over V = 4 tokens per position, K = 2, G = 4 windows of one prefix. One SGD step on
# the policy loss alone (as the trainer with loss.kl_beta = loss.distill_weight = 0).

_WINDOWS = torch.tensor([[[0, 1], [2, 3], [1, 1], [3, 0]]])  # [1, G, K]


def _window_logprobs(logits: Tensor) -> Tensor:
    """logits [K, V] (one shared policy for the prefix) -> log π of each window's tokens, [1, G, K]."""
    logp = torch.log_softmax(logits, -1)
    return logp[torch.arange(2), _WINDOWS[0]][None]


def _one_step(rewards: Tensor, credit: str = "accepted_prefix", lr: float = 0.5):
    torch.manual_seed(0)
    logits = torch.randn(2, 4).requires_grad_()
    before = _window_logprobs(logits).detach()
    accept = torch.tensor([[1, 0, 0, 0]])
    valid = torch.ones(1, 4, 2, dtype=torch.bool)
    adv = group_advantages(rewards)
    loss, _ = policy_loss(_window_logprobs(logits), before, adv, credit_mask(accept, valid, credit),
                          clip_eps=0.2, ratio_mode="window")
    loss.backward()
    grad = logits.grad.clone()
    with torch.no_grad():
        logits -= lr * logits.grad
    return before, _window_logprobs(logits).detach(), grad


def test_one_rewarded_window_gains_log_probability_after_a_step():
    before, after, _ = _one_step(torch.tensor([[0.893, 0.0, 0.0, 0.0]]))  # R_speedup(1) for window 0 only
    gain = (after - before).sum(-1)[0]  # change of each window's log-probability
    assert gain[0] > 0.05
    assert (gain[1:] < gain[0]).all()


def test_equal_rewards_give_exactly_zero_policy_gradient():
    _, _, grad = _one_step(torch.full((1, 4), 0.5))
    assert torch.equal(grad, torch.zeros_like(grad))
    # Can fail: one different reward makes the gradient non-zero.
    _, _, grad = _one_step(torch.tensor([[0.5, 0.5, 0.5, 0.6]]))
    assert grad.abs().max() > 1e-3


def test_the_update_direction_flips_with_the_advantage():
    before, up, grad_up = _one_step(torch.tensor([[1.0, 0.0, 0.0, 0.0]]))
    _, down, grad_down = _one_step(torch.tensor([[-1.0, 0.0, 0.0, 0.0]]))
    assert (up - before).sum(-1)[0, 0] > 0 > (down - before).sum(-1)[0, 0]
    # Rewards [1, 0, 0, 0] and [-1, 0, 0, 0] give exactly negated advantages, so exactly opposite gradients.
    cos = F.cosine_similarity(grad_up.flatten(), grad_down.flatten(), dim=0)
    assert cos < -0.99
