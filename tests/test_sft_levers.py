"""SFT levers (issue 14): `sft.vocab_rows` (EAGLE-1 reduced-vocabulary soft CE) and `sft.multi_step`
(EAGLE-1 HASS-style deeper loss). Tiny target; ~40 s."""

import json

import numpy as np
import pytest

from ppow_plugin.host import patching
from tiny import WORDS, run_trainer

if patching.patch_status().state != "patched":
    pytest.skip("the EAGLE host is not installed and patched (`ppow patch apply`)", allow_module_level=True)


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PPOW_CACHE", str(tmp_path / "cache"))


def losses(tmp_path, name, **extra):
    run_trainer(tmp_path, "sft", **{"run.output_dir": tmp_path / name, "run.max_steps": 3}, **extra)
    return [json.loads(x)["loss"] for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]


def test_vocab_rows_covering_the_vocabulary_is_the_full_loss(tmp_path):
    full = losses(tmp_path, "full")
    np.testing.assert_allclose(losses(tmp_path, "all-rows", **{"sft.vocab_rows": len(WORDS)}), full, rtol=1e-5)
    few = losses(tmp_path, "few-rows", **{"sft.vocab_rows": 4})  # 4 frequent ids + the labels: another loss
    assert np.isfinite(few).all() and not np.allclose(few, full, rtol=1e-3)
    # from the feature cache the reduced loss needs no target logits at all, and gives the same numbers
    cached = losses(tmp_path, "few-cached", **{"sft.vocab_rows": 4, "data.feature_cache": True})
    np.testing.assert_allclose(cached, few, rtol=1e-4)


def test_multi_step_adds_a_deeper_loss_that_trains(tmp_path):
    import torch

    from ppow_plugin.drafters import adapters
    from ppow_plugin.config import SFTCfg

    base = losses(tmp_path, "base")
    deep = losses(tmp_path, "deep", **{"sft.multi_step": 2, "sft.multi_step_starts": 4})
    assert base[0] != deep[0] and np.isfinite(deep).all()  # the extra term is in the loss from step 1
    rows = [json.loads(x) for x in (tmp_path / "deep" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["multi_step_loss"] > 0 for r in rows)

    # the extra term has a gradient into the drafter's predicted features (the ones fed back at depth > 1)
    t, *_ = run_trainer(tmp_path, "sft", **{"run.output_dir": tmp_path / "grad", "run.max_steps": 1})
    sample = t.data.next()
    item = t.stage.prepare(sample)
    feats = item["tpass"].features
    dpass = adapters.rollout.draft_forward(t.drafter, feats, item["ids"])
    cfg = SFTCfg(multi_step=2, multi_step_starts=4)
    loss, _ = adapters.multi_step_loss(t.drafter, t.target, dpass, item["ids"], item["valid"], item["tpass"].features,
                                       cfg, torch.Generator().manual_seed(0))
    grads = torch.autograd.grad(loss, [dpass.out_features], allow_unused=True)
    assert grads[0] is not None and grads[0].abs().sum() > 0
