"""Dense rollouts (`dense.py`, `*Adapter.data_path`): windows drawn from one unroll along the data equal
today's per-start rollouts (`draft_windows` + `verify_on_data`) on the same draws, for EAGLE-1 and EAGLE-3."""

import pytest
import torch
import torch.nn.functional as F

from ppow_plugin.drafters import adapters as drafters
from ppow_plugin.drafters import draft_vocab
from ppow_plugin.host import eagle_compat, patching
from ppow_plugin.method import data_verify, dense, losses, rollout
from tiny import greedy_continuation, make_target

if patching.patch_status().state != "patched":
    pytest.skip("the EAGLE host is not installed and patched (`ppow patch apply`)", allow_module_level=True)

K, G = 4, 6


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny target with an untied random head, its greedy answer after a prompt (T = 24) and, for the
    near-tie case, the same answer with two tokens replaced (where the target's argmax is not the data)."""
    target = eagle_compat.load_host_target(make_target(tmp_path_factory.mktemp("t"), layers=6, seed=3), torch.float32)
    g = torch.Generator().manual_seed(0)
    target.lm_head.weight = torch.nn.Parameter(torch.randn(target.lm_head.weight.shape, generator=g))
    prompt = torch.randint(4, 120, (8,), generator=torch.Generator().manual_seed(5))
    answer = torch.cat([prompt, greedy_continuation(target, prompt, 16)])
    noisy = answer.clone()
    noisy[[13, 19]] = (noisy[[13, 19]] + 7) % 120 + 4
    return target, answer, noisy


def _windows(drafter_logp, data, argmax, gen):
    """Draws from the data path, with members forced to cover k = 0..K and the near-tie row: member 0 the data,
    1 the data's first two tokens, 2 the target's argmax at each depth (not the data where the data is not
    the target's answer), the rest plain draws."""
    tokens = dense.draw(drafter_logp, G, gen)
    tokens[:, 0] = data.clamp(min=0)
    tokens[:, 1, :2] = data[:, :2].clamp(min=0)
    tokens[:, 2] = argmax.clamp(min=0)
    return tokens


def _compare(adapter, drafter, target, ids, tpass, layers_eagle3: bool, temperature=0.7, shift=0):
    """Dense scoring vs `draft_windows(tokens=...)` + `verify_on_data` on the same tokens, at all starts."""
    T = ids.numel()
    valid = torch.zeros(T, dtype=torch.bool)
    valid[7:-1] = True  # x_{s+1} is the answer (starts at 8)
    feats = tpass.features
    with torch.no_grad():
        dpass, draft_logits = adapter.teacher_forced(drafter, target, feats, ids)
        starts = dense.valid_starts(valid)
        path = adapter.data_path(drafter, target, dpass, draft_logits, tpass, ids, valid, starts, K, None, sft=False)
        data_t, exists = dense.data_tokens(ids, starts, K)
        data = torch.where(exists, adapter.to_draft_ids(drafter, data_t), -1)
        last = T - 1
        pos = starts[:, None] + torch.arange(K)
        argmax = adapter.to_draft_ids(drafter, tpass.logits.argmax(-1)[pos.clamp(max=last)])
        logits = path.logits if shift == 0 else torch.roll(path.logits, shift, dims=1)  # can fail: depth offset
        logp = F.log_softmax(logits / temperature, -1)
        tokens = _windows(logp, data, argmax, torch.Generator().manual_seed(1))
        to_target = lambda t: adapter.to_target_ids(drafter, t)
        w = dense.score_windows(logp, tokens, starts, ids, tpass.logits, data, to_target)

        class R:  # the rollout fields draft_windows reads
            group_size, window, greedy_members = G, K, 0
        R.temperature = temperature
        _, ref_lp, _ = adapter.draft_windows(drafter, target, dpass, starts, R, tokens=tokens)
        ref = data_verify.verify_on_data(ids, tpass.logits, starts, to_target(tokens))
    return w, ref_lp, ref, tokens, starts, data


@pytest.mark.parametrize("family", ["eagle1", "eagle3"])
def test_dense_windows_equal_draft_windows_verified_on_the_data(setup, family):
    target, answer, noisy = setup
    torch.manual_seed(0)
    adapter = drafters.ADAPTERS[family]
    if family == "eagle1":
        drafter = eagle_compat.new_eagle1_drafter(target.config, bias=True,
                                                  embed_weight=target.model.embed_tokens.weight).eval()
    else:  # a reduced draft vocabulary holding most, not all, of the data's tokens
        drafter = drafters.new_eagle3(target, 100, torch.float32).eval()
        counts = torch.bincount(answer, minlength=128).float() * 10 + torch.rand(128)
        counts[answer[12]] = 0  # one data token the drafter cannot draw
        drafter.set_vocab_map(*draft_vocab.build_vocab_map(counts, 100))
    layers = drafter.cfg.feature_layer_ids if family == "eagle3" else None
    exact = family == "eagle1"  # EAGLE-3's unroll (ttt_unroll) batches differently from draft_windows
    for ids in (answer, noisy):
        kv = eagle_compat.new_kv_cache(target)
        eagle_compat.reset_kv(kv)
        tpass = rollout.target_forward(target, ids[None], kv, feature_layers=layers)
        w, ref_lp, ref, tokens, starts, data = _compare(adapter, drafter, target, ids, tpass, family == "eagle3")
        assert torch.equal(w.accept_len, ref[0])  # k: exactly
        # the rows today's path may read under verify=data (the trainer's mask) are the dense path's rows
        assert torch.equal(dense.rows_on_data(ids, starts, adapter.to_target_ids(drafter, tokens)), w.valid_mask)
        assert set(w.accept_len.flatten().tolist()) >= {0, 2, K}
        # every row the losses read (tokens 1..k+1, R_dist's token 1) is a dense row on the data path ...
        inside = data_verify.on_sequence_mask(ids.numel(), starts, G, K)
        read = losses.credit_mask(w.accept_len, inside, "accepted_prefix")
        k = w.accept_len[..., None]
        last_accepted = tokens.gather(-1, (k - 1).clamp(min=0)) != data[:, None].expand_as(tokens).gather(
            -1, (k - 1).clamp(min=0))  # [n, G, 1] the k-th token is not the data's (a near-tie on real data)
        mislabelled = (torch.arange(K) == k) & (k >= 1) & last_accepted & inside
        assert torch.equal(read & ~w.valid_mask, mislabelled)
        assert mislabelled.any() == (ids is noisy)
        # ... and there the drafter's log-probs and the target's log-probs equal today's path
        if exact:
            assert torch.equal(w.logprobs[w.valid_mask], ref_lp[w.valid_mask])
        else:
            torch.testing.assert_close(w.logprobs[w.valid_mask], ref_lp[w.valid_mask], atol=2e-5, rtol=2e-5)
        assert torch.equal(w.target_draft_lp[w.valid_mask], ref[2][w.valid_mask])
        assert torch.equal(w.target_greedy_lp, ref[3])
        # the mislabelled row is masked: today's path reads a state the data path does not have there
        if ids is noisy:
            assert not torch.allclose(w.logprobs[mislabelled], ref_lp[mislabelled])
        # Can fail: the unroll's depths read one off (depth j's distribution used for depth j+1)
        shifted, ref_lp, *_ = _compare(adapter, drafter, target, ids, tpass, family == "eagle3", shift=1)
        assert not torch.allclose(shifted.logprobs[shifted.valid_mask], ref_lp[shifted.valid_mask], atol=1e-3)


def test_a_row_weighted_kl_equals_the_kl_over_the_repeated_rows():
    g = torch.Generator().manual_seed(0)
    target, draft = torch.randn(5, 9, generator=g), torch.randn(5, 9, generator=g)
    counts = torch.tensor([3, 0, 1, 2, 5])  # windows that read each row (`dense.row_weights`)
    keep = counts > 0
    weighted, _ = losses.target_kl_loss(target, draft, keep, weights=counts.float())
    repeated, _ = losses.target_kl_loss(target.repeat_interleave(counts, 0), draft.repeat_interleave(counts, 0),
                                        torch.ones(int(counts.sum()), dtype=torch.bool))
    torch.testing.assert_close(weighted, repeated)
    # Can fail: the plain mean over the rows is another number
    assert not torch.allclose(losses.target_kl_loss(target, draft, keep)[0], repeated)
    read = torch.zeros(2, 3, 4, dtype=torch.bool)
    read[0, :2, 0] = read[1, 2, 1:3] = True
    assert dense.row_weights(read).tolist() == [[2, 0, 0, 0], [0, 1, 1, 0]]


@pytest.mark.parametrize("select", [1.0, 0.0], ids=["selected", "whole"])
def test_the_kl_on_the_read_rows_equals_the_kl_over_every_row_weighted_by_the_reads(select, monkeypatch):
    """`dense_step._rows_kl` selects the read rows before the [rows, V] work (at most `SELECT_READ_ROWS` of them read)
    or weights every row (unread 0): both equal the weighted KL over every data-path row, value and gradient.
    Can fail: a selected row paired with another start's or depth's target row, or with another row's weight."""
    from ppow_plugin.training import dense_step

    g = torch.Generator().manual_seed(0)
    T, n, K, V = 12, 5, 4, 9
    seq_logits = torch.randn(T, V, generator=g)
    logits = torch.randn(n, K, V, generator=g, requires_grad=True)
    starts = torch.tensor([1, 3, 4, 8, 10])  # the last start's rows 12, 13 lie past the end (clamped, weight 0)
    read = torch.zeros(n, K)
    read[:, 0] = torch.tensor([3.0, 1.0, 2.0, 5.0, 1.0])
    read[0, 1] = read[2, 1:3] = read[3, 1] = read[4, 1] = 2.0
    read[1, 3] = 0.5
    pos = (starts[:, None] + torch.arange(K)).reshape(-1).clamp(max=T - 1)
    want, _ = losses.target_kl_loss(seq_logits[pos], logits.reshape(-1, V), torch.ones(n * K, dtype=torch.bool),
                                    weights=read.reshape(-1))
    (want_grad,) = torch.autograd.grad(want, logits)
    monkeypatch.setattr(dense_step, "SELECT_READ_ROWS", select)
    got, total = dense_step._rows_kl(drafters.ADAPTERS["eagle1"], None, seq_logits, logits, starts, read, "forward")
    (got_grad,) = torch.autograd.grad(got, logits)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_grad, want_grad)
    assert float(total) == float(read.sum()) and bool((got_grad[read == 0] == 0).all())
