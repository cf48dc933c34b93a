"""PPOW from the data-path unroll (`dense_step.py`) in the trainer: both families, both estimators, the SFT term."""

import json

import pytest
import torch

from ppow_plugin.config import load_config
from ppow_plugin.errors import UserError
from ppow_plugin.host import patching
from tiny import run_trainer

if patching.patch_status().state != "patched":
    pytest.skip("the EAGLE host is not installed and patched (`ppow patch apply`)", allow_module_level=True)

FAMILIES = {"eagle1": {}, "eagle3": {"model.drafter_type": "eagle3", "model.draft_vocab_size": 64}}


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    """A tiny target, an SFT drafter of each family and the target's own answers to train PPOW on."""
    from ppow_plugin.data import datasets, generate

    tmp = tmp_path_factory.mktemp("dense")
    drafters = {name: run_trainer(tmp, "sft", **fam, **{"run.max_steps": 2, "run.output_dir": tmp / f"sft-{name}"})[3]
                for name, fam in FAMILIES.items()}
    prompts = generate.first_turn_prompts(datasets.load_jsonl_conversations(tmp / "convs.jsonl"), 0.0)
    generate.generate(tmp / "target", prompts, generate.GenSettings(max_new_tokens=40, batch_size=4),
                      num_prompts=8, source="test", heldout_fraction=0.0, out_dir=tmp / "gen")
    return tmp, drafters


@pytest.mark.parametrize("family,extra", [
    ("eagle1", {"loss.estimator": "sampled", "rollout.positions": "all"}),
    ("eagle1", {"loss.estimator": "expected", "rollout.positions": 3, "loss.sft_weight": 0.5}),
    ("eagle3", {"loss.estimator": "sampled", "rollout.positions": "all", "loss.sft_weight": 0.5}),
    ("eagle3", {"loss.estimator": "expected", "rollout.positions": "all"}),
], ids=["eagle1-sampled-all", "eagle1-expected-3-sft", "eagle3-sampled-all-sft", "eagle3-expected-all"])
def test_ppow_on_the_data_path_trains_every_parameter(generated, family, extra):
    tmp, drafters = generated
    name = f"{family}-{extra['loss.estimator']}-{extra['rollout.positions']}"
    t, before, target_before, _ = run_trainer(
        tmp, "ppow", **FAMILIES[family], **extra, **{
            "model.drafter": drafters[family], "data.dataset": "generated", "data.path": tmp / "gen",
            "rollout.verify": "data", "run.max_steps": 3, "run.output_dir": tmp / name, "windowing.warmup_steps": 0})
    trainable = [n for n, p in t.drafter.named_parameters() if p.requires_grad]
    after = t.drafter.state_dict()
    assert trainable and all(not torch.equal(before[n], after[n]) for n in trainable)
    assert all(torch.equal(v, target_before[k]) for k, v in t.target.state_dict().items())
    rows = [json.loads(x) for x in (tmp / name / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3
    for row in rows:
        assert {"reward", "accept_len", "greedy_accept_len", "kl", "distill", "windows"} <= row.keys()
        assert ("sft_loss" in row) == (extra.get("loss.sft_weight", 0) > 0)
        if extra["rollout.positions"] == 3:
            assert row["starts"] <= 3
        else:  # every assistant position of the sequence
            assert row["starts"] > 3
        expected_windows = row["starts"] * (4 if extra["loss.estimator"] == "sampled" else 1)
        assert row["windows"] == expected_windows


@pytest.mark.parametrize("overrides,needs", [
    (["rollout.positions=all"], "rollout.verify"),
    (["loss.estimator=expected"], "loss.estimator"),
    (["loss.sft_weight=0.5"], "loss.sft_weight"),
    (["rollout.positions=all", "rollout.verify=data", "data.dataset=generated", "rollout.resample_tries=2"],
     "rollout.resample_tries"),
    (["rollout.positions=all", "rollout.verify=data", "data.dataset=generated", "loss.ppo_epochs=2"],
     "loss.ppo_epochs"),
    (["rollout.positions=0"], "rollout.positions"),
])
def test_the_data_path_settings_are_refused_without_what_they_need(overrides, needs):
    with pytest.raises(UserError, match=needs):
        load_config(None, overrides)
