"""Feature cache (`data.feature_cache`): SFT from cached target passes equals online SFT up to fp16 rounding,
the cache is really read, and it is invalidated by a change of target, data or max_len. ~25 s in all."""

import json

import numpy as np
import pytest
import torch

from ppow_plugin import devices
from ppow_plugin.data import feature_cache
from ppow_plugin.host import integrity, patching
from ppow_plugin.method.rollout import TargetPass
from tiny import make_target, run_trainer

if patching.patch_status().state != "patched":
    pytest.skip("the EAGLE host is not installed and patched (`ppow patch apply`)", allow_module_level=True)

# fp16 keeps 11 significant bits; on the tiny target the cached loss is within 2e-7 (relative) of the online one.
RTOL = 1e-4
CPU = devices.CPU_FP32


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

    cache = feature_cache.FeatureCache.open(a, "eagle1", None, max_len=64, place=CPU)
    s = sample([5, 6, 7])
    assert cache.get(s, head) is None and not cache.has(s)
    tp = fake_pass(3)
    cache.put(s, tp)
    assert cache.has(s) and not cache.has(sample([5, 6, 8]))  # what scripts/fill_features.py skips
    got = cache.get(s, head)
    assert got is not None and torch.equal(got.features, tp.features.half().float())  # same key: a hit
    assert feature_cache.FeatureCache.open(a, "eagle1", None, max_len=64, place=CPU).get(s, head) is not None
    assert feature_cache.FeatureCache.open(b, "eagle1", None, max_len=64, place=CPU).get(s, head) is None  # target
    assert feature_cache.FeatureCache.open(a, "eagle1", None, max_len=32, place=CPU).get(s, head) is None  # max_len
    assert feature_cache.FeatureCache.open(a, "eagle3", (2, 1, 1), max_len=64, place=CPU).get(s, head) is None  # features
    assert cache.get(sample([5, 6, 8]), head) is None  # data
    masked = sample([5, 6, 7])
    masked.loss_mask = torch.tensor([False, False, True])
    assert cache.get(masked, head) is None  # loss mask


def test_each_device_and_dtype_reads_only_its_own_entries(tmp_path):
    """A bf16 target's features are not an fp32 target's: entries are kept apart per device type and dtype
    (`devices.Placement.cache_folder`, as the continuation cache). Can fail: with one folder for every
    placement (drop `place.cache_folder`), the bf16 and cuda caches below hit the fp32 entry."""
    a = make_target(tmp_path / "a", layers=2)
    head = torch.nn.Linear(8, 4, bias=False)
    s = type("S", (), {"input_ids": torch.tensor([5, 6, 7]), "loss_mask": torch.tensor([False, True, True])})
    places = {"fp32": CPU, "bf16": devices.Placement(torch.device("cpu"), torch.bfloat16),
              "cuda": devices.Placement(torch.device("cuda", 0), torch.bfloat16)}  # nothing is allocated on it
    caches = {name: feature_cache.FeatureCache.open(a, "eagle1", None, 64, place) for name, place in places.items()}
    passes = {name: fake_pass(3) for name in places}
    caches["fp32"].put(s, passes["fp32"])
    assert caches["bf16"].get(s, head) is None and caches["cuda"].get(s, head) is None
    caches["bf16"].put(s, passes["bf16"])
    for name in ("fp32", "bf16"):  # each reads back what it wrote, not the other's
        assert torch.equal(caches[name].get(s, head).features, passes[name].features.half().float())
    assert caches["cuda"].get(s, head) is None
    assert caches["bf16"].root == caches["fp32"].root / "cpu-bf16" and caches["cuda"].root.name == "cuda-bf16"


def test_the_default_fp32_cache_is_where_it_always_was(tmp_path):
    """CPU fp32 (the default on a machine without a GPU) keeps the folder of the caches users already have,
    `<cache>/features/<target name>-<key>/`: no silent rebuild. Can fail: a subfolder for fp32 too."""
    from ppow_plugin.host.assets import cache_dir, target_fingerprint
    a = make_target(tmp_path / "a", layers=2)
    key = feature_cache.cache_key(target_fingerprint(a), "eagle1", None, 64)  # the key the old code used
    old = feature_cache.FeatureCache(cache_dir() / "features" / f"a-{key}", eagle3=False)
    s = type("S", (), {"input_ids": torch.tensor([5, 6, 7]), "loss_mask": torch.tensor([False, True, True])})
    tp = fake_pass(3)
    old.put(s, tp)  # an entry written before caches were kept per device and dtype
    cache = feature_cache.FeatureCache.open(a, "eagle1", None, 64, CPU)
    assert cache.root == old.root
    assert torch.equal(cache.get(s, torch.nn.Linear(8, 4, bias=False)).features, tp.features.half().float())


def test_sft_with_a_bf16_target_does_not_read_fp32_features(tmp_path):
    """End to end: the trainer opens the cache of its target's placement (dist.device, dist.target_dtype).
    Can fail: open the trainer's cache with CPU fp32 whatever the target dtype (then the bf16 run hits)."""
    kw = {"run.max_steps": 2, "data.feature_cache": True}
    run_trainer(tmp_path, "sft", **kw, **{"run.output_dir": tmp_path / "fp32"})
    run_trainer(tmp_path, "sft", **kw, **{"dist.target_dtype": "bf16", "run.output_dir": tmp_path / "bf16"})
    run_trainer(tmp_path, "sft", **kw, **{"dist.target_dtype": "bf16", "run.output_dir": tmp_path / "bf16b"})
    counts = {n: (r[-1]["feature_cache_hits"], r[-1]["feature_cache_misses"])
              for n in ("fp32", "bf16", "bf16b") for r in [losses(tmp_path, n)[1]]}
    assert counts == {"fp32": (0, 2), "bf16": (0, 2), "bf16b": (2, 0)}, counts
    (root,) = (tmp_path / "cache" / "features").iterdir()
    assert len(list((root / "cpu-bf16").rglob("*.npz"))) == 2
    assert len([p for p in root.rglob("*.npz") if "cpu-bf16" not in p.parts]) == 2  # fp32: the old place
