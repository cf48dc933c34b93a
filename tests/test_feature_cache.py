"""Feature cache (`data.feature_cache`): SFT from cached target passes equals online SFT up to fp16 rounding,
the cache is really read, and it is invalidated by a change of target, data or max_len. ~25 s in all."""

import json

import numpy as np
import pytest
import torch

from ppow_plugin.data import feature_cache
from ppow_plugin.host import integrity, patching
from ppow_plugin.method.rollout import TargetPass
from tiny import make_target, run_trainer

if patching.patch_status().state != "patched":
    pytest.skip("the EAGLE host is not installed and patched (`ppow patch apply`)", allow_module_level=True)

# fp16 keeps 11 significant bits; on the tiny target the cached loss is within 2e-7 (relative) of the online one.
RTOL = 1e-4


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PPOW_CACHE", str(tmp_path / "cache"))


def losses(tmp_path, name):
    rows = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows], rows


@pytest.mark.parametrize("drafter_type", ["eagle1", "eagle3"])
def test_sft_from_cache_equals_online(tmp_path, drafter_type):
    kw = {"model.drafter_type": drafter_type, "run.max_steps": 4}
    run_trainer(tmp_path, "sft", **kw, **{"run.output_dir": tmp_path / "online"})
    run_trainer(tmp_path, "sft", **kw, **{"data.feature_cache": True, "run.output_dir": tmp_path / "fill"})
    run_trainer(tmp_path, "sft", **kw, **{"data.feature_cache": True, "run.output_dir": tmp_path / "cached"})
    online, _ = losses(tmp_path, "online")
    filled, _ = losses(tmp_path, "fill")
    cached, rows = losses(tmp_path, "cached")
    assert rows[-1]["feature_cache_hits"] == 4 and rows[-1]["feature_cache_misses"] == 0
    np.testing.assert_allclose(cached, online, rtol=RTOL)
    assert cached == filled  # a miss trains on the same fp16-rounded pass a later hit reads

    # the cache is what the cached run reads: features in reversed order give a different loss (not a
    # rescaling: EAGLE-3's RMSNorm would undo it)
    for path in (tmp_path / "cache" / "features").rglob("*.npz"):  # rewritten with a matching digest
        arrays = integrity.load_npz(path)
        arrays["features"] = np.ascontiguousarray(arrays["features"][::-1])
        integrity.save_npz(path, arrays)
    run_trainer(tmp_path, "sft", **kw, **{"data.feature_cache": True, "run.output_dir": tmp_path / "reversed"})
    flipped, _ = losses(tmp_path, "reversed")
    gap, noise = np.abs(np.subtract(flipped, online)).max(), np.abs(np.subtract(cached, online)).max()
    print(f"max |loss - online|: cached {noise:.2e}, reversed features {gap:.2e}")
    assert gap > 5 * noise


def fake_pass(t, h=8):
    return TargetPass(features=torch.randn(t, h), logits=torch.zeros(t, 4), hidden=torch.randn(t, h))


def test_cache_is_invalidated_by_target_data_and_max_len(tmp_path):
    a, b = make_target(tmp_path / "a", layers=2), make_target(tmp_path / "b", layers=2, seed=1)
    head = torch.nn.Linear(8, 4, bias=False)

    def sample(ids):
        return type("S", (), {"input_ids": torch.tensor(ids), "loss_mask": torch.tensor([False, True, True])})

    cache = feature_cache.FeatureCache.open(a, "eagle1", None, max_len=64)
    s = sample([5, 6, 7])
    assert cache.get(s, head) is None
    tp = fake_pass(3)
    cache.put(s, tp)
    got = cache.get(s, head)
    assert got is not None and torch.equal(got.features, tp.features.half().float())  # same key: a hit
    assert feature_cache.FeatureCache.open(a, "eagle1", None, max_len=64).get(s, head) is not None
    assert feature_cache.FeatureCache.open(b, "eagle1", None, max_len=64).get(s, head) is None  # target
    assert feature_cache.FeatureCache.open(a, "eagle1", None, max_len=32).get(s, head) is None  # max_len
    assert feature_cache.FeatureCache.open(a, "eagle3", (2, 1, 1), max_len=64).get(s, head) is None  # features
    assert cache.get(sample([5, 6, 8]), head) is None  # data
    masked = sample([5, 6, 7])
    masked.loss_mask = torch.tensor([False, False, True])
    assert cache.get(masked, head) is None  # loss mask
