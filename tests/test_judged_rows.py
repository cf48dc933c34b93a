"""`dense.judged_rows`: the target rows a data-path step reads, the only ones the feature cache computes for it
(`TargetPasses`). Everything the step reads from the target's logits is the same when the other rows are 0."""

import torch

from ppow_plugin.method import data_verify, dense, expected


def test_judged_rows_hand_built():
    valid = torch.tensor([0, 1, 1, 0, 0, 0, 1, 0, 0, 0], dtype=torch.bool)
    want = torch.tensor([0, 1, 1, 1, 1, 0, 1, 1, 1, 0], dtype=torch.bool)
    assert torch.equal(dense.judged_rows(valid, 3), want)
    assert torch.equal(dense.judged_rows(valid, 1), valid)


def test_the_step_reads_only_judged_rows():
    """Verification on the data (k, the target's log-probs: sampled windows, the greedy window, the KL rows
    s..s+K-1), R_dist's near set at s, and the teacher-forced rows (distillation, ADAW) equal with the logits
    outside `judged_rows` zeroed, as the cache leaves them. Red with one depth fewer in `judged_rows`."""
    g = torch.Generator().manual_seed(0)
    T, V, K, G = 40, 30, 4, 64
    valid = torch.zeros(T, dtype=torch.bool)
    valid[3:12] = valid[20:29] = valid[33:39] = True  # turns, the last one ending 1 row before the sequence
    ids = torch.randint(0, V, (T,), generator=g)
    logits = torch.randn(T, V, generator=g) * 3
    rows = dense.judged_rows(valid, K)
    cut = torch.where(rows[:, None], logits, torch.zeros_like(logits))
    starts = dense.valid_starts(valid)
    data, exists = dense.data_tokens(ids, starts, K)
    tokens = torch.where(torch.rand(len(starts), G, K, generator=g) < 0.5, data[:, None],
                         torch.randint(0, V, (len(starts), G, K), generator=g))  # windows that stay on the data
    for full, part in zip(data_verify.verify_on_data(ids, logits, starts, tokens),
                          data_verify.verify_on_data(ids, cut, starts, tokens)):
        assert torch.equal(full, part)
    pos = (starts[:, None] + torch.arange(K)).clamp(max=T - 1)  # the KL's and the expected reward's rows
    inside = starts[:, None] + torch.arange(K) <= T - 1
    assert torch.equal(logits[pos][inside], cut[pos][inside])
    vocab = torch.arange(V)
    assert torch.equal(expected.near_first_mask(logits[starts], vocab, 0.5),
                       expected.near_first_mask(cut[starts], vocab, 0.5))
    assert torch.equal(logits[1:][valid[1:]], cut[1:][valid[1:]])  # `dense_step._read_rows` of the target
