"""SFT levers (issue 14): `sft.vocab_rows`, EAGLE-1's reduced-vocabulary soft CE. Tiny target; ~20 s."""

import json

import numpy as np
import pytest

from ppow_plugin import patching
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
