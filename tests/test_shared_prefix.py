"""The EAGLE-1 drafter's attention over a shared prefix (host patch 0007, `rollout.shared_prefix_cache`): the
same logits, log-probs and gradients as the prefix broadcast to every row (`rollout.expand_cache`, which the host's
attention copies per row with `cat` and `repeat_kv`), up to float rounding."""

import pytest
import torch

from ppow_plugin.host import eagle_compat, patching
from ppow_plugin.method import rollout
from tiny import make_target

if patching.patch_status().state != "patched":
    pytest.skip("the EAGLE host is not installed and patched (`ppow patch apply`)", allow_module_level=True)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny target (4 heads over 2 kv heads: the drafter's grouped attention) and a random EAGLE-1 drafter."""
    target = eagle_compat.load_host_target(make_target(tmp_path_factory.mktemp("t"), layers=4, seed=3), torch.float32)
    torch.manual_seed(0)
    drafter = eagle_compat.new_eagle1_drafter(target.config, bias=True, embed_weight=target.model.embed_tokens.weight)
    return target, drafter


def _unroll(target, drafter, ids, starts, tokens, prefix_cache):
    """One teacher-forced pass and the re-scoring unroll of `tokens` [n, G, K] from `starts`, backward through a
    fixed random function of the logits and log-probs -> (logits, log-probs, gradients of every trained
    parameter and of the input features)."""
    with torch.no_grad():
        feats = target.model(input_ids=ids[None])[0][0]
    feats.requires_grad_(True)
    drafter.zero_grad()
    dpass = rollout.draft_forward(drafter, feats, ids)
    _, lp, logits = rollout.draft_windows(drafter, target.lm_head, dpass, starts, tokens.shape[1], tokens.shape[2],
                                          0.7, tokens=tokens, prefix_cache=prefix_cache)
    weight = torch.randn(logits.shape, generator=torch.Generator().manual_seed(2))
    ((logits * weight).sum() + lp.sum()).backward()
    grads = [p.grad.clone() for p in drafter.parameters() if p.requires_grad] + [feats.grad.clone()]
    return logits.detach(), lp.detach(), grads


def test_shared_prefix_attention_equals_the_expanded_prefix(tiny):
    target, drafter = tiny
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(4, 120, (22,), generator=g)
    starts = torch.tensor([3, 15, 9, 20])  # prefixes of different lengths: the mask hides positions >= s
    tokens = torch.randint(4, 120, (4, 3, 5), generator=g)  # [n, G, K]
    shared = _unroll(target, drafter, ids, starts, tokens, rollout.shared_prefix_cache)
    copied = _unroll(target, drafter, ids, starts, tokens, rollout.expand_cache)
    torch.testing.assert_close(shared[0], copied[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(shared[1], copied[1], rtol=1e-5, atol=1e-5)
    assert len(shared[2]) == len(copied[2])
    for a, b in zip(shared[2], copied[2]):  # float rounding, relative to each gradient's scale
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * float(b.abs().max()))
    # the unroll did move through the prefix: the features' gradient reaches positions before every start
    assert shared[2][-1][:3].abs().sum() > 0


def test_the_shared_prefix_cache_keeps_the_prefix_once_and_grows_each_rows_own_positions(tiny):
    target, drafter = tiny
    ids = torch.randint(4, 120, (12,), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        dpass = rollout.draft_forward(drafter, target.model(input_ids=ids[None])[0][0], ids)
        cache = rollout.shared_prefix_cache(dpass.kv, 6)
        k, v = dpass.kv[0]
        assert cache[0][0] is k and cache[0][1] is v and cache[0][2].shape == (6, k.shape[1], 0, k.shape[3])
        mask = torch.ones(6, k.shape[2] + 1, dtype=torch.bool)
        feat = dpass.out_features[-1:].expand(6, 1, -1)
        _, nxt = rollout.eagle1_step(drafter, feat, torch.arange(6) + 4, cache, torch.full((6, 1), 11), mask)
    assert nxt[0][0] is k and nxt[0][2].shape == (6, k.shape[1], 1, k.shape[3])  # the prefix is not copied
