"""Hand-computed tests for ppow_plugin.method.windowing (ADAW)."""

import math

import pytest
import torch
from torch.testing import assert_close

from ppow_plugin.method.windowing import (
    WindowSelection,
    adaw_rule_for_step,
    kl_divergence,
    position_scores,
    score_summary,
    select_windows,
    target_confidence,
    window_scores,
)

INF = float("inf")
LN2 = math.log(2.0)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --- confidence and KL ----------------------------------------------------------------------------

def test_confidence_one_hot_is_one_and_uniform_is_zero():
    logits = torch.tensor([
        [5.0, -INF, -INF, -INF],   # exact one-hot
        [0.0, 0.0, 0.0, 0.0],      # uniform
        [0.0, 0.0, -INF, -INF],    # half/half over 4: H = ln 2, C = 1 - ln2/ln4 = 0.5
        [100.0, 0.0, 0.0, 0.0],    # one-hot up to float precision
    ])
    assert_close(target_confidence(logits), torch.tensor([1.0, 0.0, 0.5, 1.0]))


def test_confidence_needs_two_entries():
    with pytest.raises(ValueError, match="at least 2"):
        target_confidence(torch.zeros(3, 1))


def test_kl_hand_computed_and_zero_when_equal():
    p = torch.tensor([0.5, 0.5]).log()
    q = torch.tensor([0.25, 0.75]).log()
    assert_close(kl_divergence(p, q), torch.tensor(0.5 * math.log(2.0) + 0.5 * math.log(0.5 / 0.75)))
    assert_close(kl_divergence(q, p), torch.tensor(0.25 * math.log(0.5) + 0.75 * math.log(1.5)))
    same = torch.tensor([[1.0, -2.0, 0.5], [3.0, 3.0, 3.0]])
    assert_close(kl_divergence(same, same), torch.zeros(2))


def test_kl_zero_probability_entries_are_finite_with_finite_gradients():
    p = torch.tensor([[0.0, -INF, 0.0]])
    q = torch.tensor([[0.0, 1.0, -1.0]], requires_grad=True)
    kl = kl_divergence(p, q)
    assert torch.isfinite(kl).all()
    kl.sum().backward()
    assert torch.isfinite(q.grad).all()
    # Reverse direction: the zero-probability entry sits in the second argument -> infinite KL.
    assert kl_divergence(q.detach(), p).item() == INF


def test_position_scores_hand_computed():
    # Position 0: target half/half over 4 (C = 0.5), draft uniform: KL = ln 2  -> v = 0.5 ln 2.
    # Position 1: draft == target -> v = 0. Position 2: target uniform (C = 0) -> v = 0.
    target = torch.tensor([[[0.0, 0.0, -INF, -INF], [2.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]])
    draft = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [2.0, 1.0, 0.0, 0.0], [5.0, 0.0, 0.0, 0.0]]])
    scores = position_scores(target, draft)
    assert scores.shape == (1, 3) and scores.dtype == torch.float32
    assert_close(scores, torch.tensor([[0.5 * LN2, 0.0, 0.0]]))


def test_position_scores_chunking_matches_and_has_no_grad():
    g = _gen(1)
    target = torch.randn(2, 5, 7, generator=g, dtype=torch.bfloat16)
    draft = torch.randn(2, 5, 7, generator=g, requires_grad=True)
    whole = position_scores(target, draft.to(torch.bfloat16))
    assert not whole.requires_grad and whole.dtype == torch.float32
    assert_close(position_scores(target, draft.to(torch.bfloat16), chunk_size=2), whole)
    assert (whole >= 0).all()


# --- window scores --------------------------------------------------------------------------------

def test_window_scores_all_valid_and_window_at_sequence_end():
    pos = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0]])
    valid = torch.ones(1, 5, dtype=torch.bool)
    # The last window only has position 4 left in the sequence.
    assert_close(window_scores(pos, valid, window=2), torch.tensor([[1.5, 2.5, 3.5, 4.5, 5.0]]))
    # A window longer than the sequence uses what exists.
    assert_close(window_scores(pos, valid, window=9), torch.tensor([[3.0, 3.5, 4.0, 4.5, 5.0]]))


def test_window_scores_mask_holes_and_fully_padded_row():
    pos = torch.tensor([[1.0, 2.0, float("nan"), 4.0, 5.0], [INF, INF, INF, INF, INF]])
    valid = torch.tensor([[True, True, False, True, True], [False] * 5])
    got = window_scores(pos, valid, window=3)
    # s=0: mean(1, 2); s=1: mean(2, 4) (position 2 masked); s=2: invalid start; s=3: mean(4, 5); s=4: 5.
    expected = torch.tensor([[1.5, 3.0, -INF, 4.5, 5.0], [-INF] * 5])
    assert_close(got, expected)


def test_window_scores_validation():
    with pytest.raises(ValueError, match="window"):
        window_scores(torch.zeros(1, 3), torch.ones(1, 3, dtype=torch.bool), window=0)
    with pytest.raises(ValueError, match="same shape"):
        window_scores(torch.zeros(1, 3), torch.ones(1, 4, dtype=torch.bool), window=2)


# --- selection ------------------------------------------------------------------------------------

def test_select_top_ties_go_to_lower_position_and_short_rows_are_padded():
    scores = torch.tensor([[1.0, 3.0, 3.0, -INF, 2.0], [-INF] * 5, [0.0, -INF, 0.0, 0.0, 0.0]])
    sel = select_windows(scores, n=4, rule="top", generator=_gen())
    assert isinstance(sel, WindowSelection)
    assert sel.starts.dtype == torch.int64 and sel.valid_mask.dtype == torch.bool
    assert sel.starts.tolist() == [[1, 2, 4, 0], [0, 0, 0, 0], [0, 2, 3, 4]]
    assert sel.valid_mask.tolist() == [[True, True, True, True], [False] * 4, [True] * 4]


def test_select_n_larger_than_sequence():
    scores = torch.tensor([[2.0, -INF, 1.0]])
    sel = select_windows(scores, n=5, rule="top", generator=_gen())
    assert sel.starts.tolist() == [[0, 2, 0, 0, 0]]
    assert sel.valid_mask.tolist() == [[True, True, False, False, False]]


@pytest.mark.parametrize("rule", ["top", "sample", "uniform"])
def test_select_never_returns_invalid_start_and_is_deterministic(rule):
    scores = torch.tensor([[0.3, -INF, 0.1, 0.0, -INF, 0.7], [-INF, 0.2, -INF, -INF, 0.0, -INF]])
    a = select_windows(scores, n=3, rule=rule, generator=_gen(7))
    b = select_windows(scores, n=3, rule=rule, generator=_gen(7))
    assert torch.equal(a.starts, b.starts) and torch.equal(a.valid_mask, b.valid_mask)
    assert a.valid_mask.tolist() == [[True] * 3, [True, True, False]]
    for row in range(2):
        picked = a.starts[row][a.valid_mask[row]]
        assert torch.isfinite(scores[row, picked]).all()
        assert len(set(picked.tolist())) == len(picked)  # without replacement


def test_select_sample_is_proportional_to_score_power():
    rows = 4000
    scores = torch.tensor([[1.0, 3.0, -INF]]).expand(rows, 3)
    first = select_windows(scores, n=1, rule="sample", generator=_gen(0)).starts[:, 0]
    assert abs((first == 1).float().mean().item() - 0.75) < 0.03           # 3 / (1 + 3)
    cold = select_windows(scores, n=1, rule="sample", generator=_gen(0), temperature=0.5).starts[:, 0]
    assert abs((cold == 1).float().mean().item() - 0.9) < 0.02             # 9 / (1 + 9)


def test_select_sample_all_zero_row_is_uniform_and_zeros_come_last():
    rows = 3000
    zeros = torch.tensor([[0.0, 0.0, -INF, 0.0]]).expand(rows, 4)
    first = select_windows(zeros, n=1, rule="sample", generator=_gen(3)).starts[:, 0]
    counts = torch.bincount(first, minlength=4).float() / rows
    assert counts[2] == 0
    assert_close(counts[[0, 1, 3]], torch.full((3,), 1 / 3), atol=0.04, rtol=0)
    mixed = torch.tensor([[0.0, 0.5, 0.0, 0.0]])
    assert select_windows(mixed, n=2, rule="sample", generator=_gen(3)).starts[0, 0].item() == 1


def test_select_uniform_ignores_scores():
    rows = 3000
    scores = torch.tensor([[100.0, 0.001, -INF]]).expand(rows, 3)
    first = select_windows(scores, n=1, rule="uniform", generator=_gen(5)).starts[:, 0]
    assert abs((first == 0).float().mean().item() - 0.5) < 0.04


def test_select_validation():
    scores = torch.zeros(1, 3)
    with pytest.raises(ValueError, match="rule"):
        select_windows(scores, n=1, rule="best", generator=_gen())
    with pytest.raises(ValueError, match="n"):
        select_windows(scores, n=0, rule="top", generator=_gen())
    with pytest.raises(ValueError, match="temperature"):
        select_windows(scores, n=1, rule="sample", generator=_gen(), temperature=0.0)


def test_adaw_rule_for_step_switches_after_warmup():
    assert [adaw_rule_for_step(s, 2, "top") for s in range(4)] == ["uniform", "uniform", "top", "top"]
    assert adaw_rule_for_step(0, 0, "sample") == "sample"
    with pytest.raises(ValueError, match="rule"):
        adaw_rule_for_step(0, 1, "softmax")


def test_score_summary_hand_computed():
    scores = torch.tensor([[1.0, 2.0, 3.0, -INF], [4.0, float("nan"), 100.0, 5.0]])
    valid = torch.tensor([[True, True, True, True], [True, True, False, True]])
    s = score_summary(scores, valid)  # counted: 1, 2, 3, 4, 5
    assert s == pytest.approx({"mean": 3.0, "p50": 3.0, "p90": 4.6, "max": 5.0, "count": 5.0})
    empty = score_summary(scores, torch.zeros_like(valid))
    assert empty["count"] == 0 and math.isnan(empty["mean"])
