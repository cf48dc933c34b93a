"""Trainer smoke and equivalence tests on a tiny random target (CPU, fp32, seconds each)."""

import json

import pytest
import torch

from ppow_plugin.drafters import formats
from ppow_plugin.host import patching
from ppow_plugin.training import trainer
from ppow_plugin.config import load_config
from tiny import overrides, run_trainer

if patching.patch_status().state != "patched":
    pytest.skip("the EAGLE host is not installed and patched (`ppow patch apply`)", allow_module_level=True)


def run(tmp_path, stage, **extra):
    return run_trainer(tmp_path, stage, **extra)


def assert_trained(t, before, target_before):
    after = t.drafter.state_dict()
    trainable = {n for n, p in t.drafter.named_parameters() if p.requires_grad}
    assert trainable, "drafter has trainable parameters"
    for name in trainable:
        assert not torch.equal(before[name], after[name]), f"{name} did not change"
    assert torch.equal(before["embed_tokens.weight"], after["embed_tokens.weight"]), "embeddings are frozen"
    for name, value in t.target.state_dict().items():
        assert torch.equal(target_before[name], value), f"target {name} changed"


def test_sft_smoke(tmp_path):
    t, before, target_before, out = run(tmp_path, "sft")
    assert_trained(t, before, target_before)
    lines = [json.loads(x) for x in (tmp_path / "run-sft" / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 3 and all(map(lambda r: r["loss"] is not None and r["loss"] > 0, lines))
    config, state = formats.load_drafter_dir(out)
    assert "embed_tokens.weight" not in state and "fc.weight" in state


def test_sft_loss_goes_down(tmp_path):
    t, *_ = run(tmp_path, "sft", **{"run.max_steps": 30, "optim.lr": 3e-3, "data.max_len": 64})
    lines = [json.loads(x)["loss"] for x in (tmp_path / "run-sft" / "metrics.jsonl").read_text().splitlines()]
    assert sum(lines[-5:]) / 5 < 0.85 * sum(lines[:5]) / 5, lines


@pytest.fixture
def sft_drafter(tmp_path):
    _, _, _, out = run(tmp_path, "sft", **{"run.max_steps": 2})
    return out


@pytest.mark.parametrize("engine", ["torch", "deepspeed"])
def test_ppow_smoke(tmp_path, sft_drafter, engine):
    t, before, target_before, out = run(tmp_path, "ppow", engine=engine, **{"model.drafter": sft_drafter,
                                                                             "run.output_dir": tmp_path / f"ppow-{engine}"})
    assert_trained(t, before, target_before)
    rows = [json.loads(x) for x in (tmp_path / f"ppow-{engine}" / "metrics.jsonl").read_text().splitlines()]
    for key in ("reward", "accept_len", "kl", "policy_loss", "clip_frac"):
        assert all(r[key] is not None for r in rows), key
    for key in ("zero_adv_frac", "r_dist_rate", "credit_frac"):  # shares of groups / windows / tokens
        assert all(0 <= r[key] <= 1 for r in rows), key
    assert all(0 <= r["accept_len"] <= 4 for r in rows)


def test_ppow_needs_a_drafter(tmp_path):
    from ppow_plugin.errors import UserError
    t = trainer.Trainer(load_config(None, overrides(tmp_path, "ppow")))
    with pytest.raises(UserError, match="model.drafter"):
        t.setup()


def test_existing_run_is_not_overwritten(tmp_path):
    from ppow_plugin.errors import UserError
    run(tmp_path, "sft", **{"run.max_steps": 1})
    t = trainer.Trainer(load_config(None, overrides(tmp_path, "sft")))
    with pytest.raises(UserError, match="run.resume=true"):
        t.setup()


@pytest.mark.parametrize("stage", ["sft", "ppow"])
def test_resume_equals_uninterrupted(tmp_path, sft_drafter, stage):
    extra = {"model.drafter": sft_drafter} if stage == "ppow" else {}
    straight, *_ = run(tmp_path, stage, **extra, **{"run.max_steps": 4, "run.output_dir": tmp_path / "straight"})
    run(tmp_path, stage, **extra, **{"run.max_steps": 2, "run.save_every": 2, "run.output_dir": tmp_path / "split"})
    resumed, *_ = run(tmp_path, stage, **extra, **{"run.max_steps": 4, "run.save_every": 2, "run.resume": True,
                                                   "run.output_dir": tmp_path / "split"})
    a, b = straight.drafter.state_dict(), resumed.drafter.state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume"


def test_max_minutes_is_the_runs_budget_across_a_resume(tmp_path, monkeypatch):
    """run.max_minutes counts the training time of the whole run: the checkpoint carries `train_s`, and a
    resumed run stops once the run's total passes the budget (can fail: restart the clock on resume, and the
    resumed run trains to max_steps)."""
    import time
    from types import SimpleNamespace
    out, calls = tmp_path / "split", iter(range(10**6))
    # the first segment's clock runs 30 s per reading: two steps take about a minute of "training"
    monkeypatch.setattr(trainer, "time", SimpleNamespace(time=lambda: 30.0 * next(calls)))
    run(tmp_path, "sft", **{"run.max_steps": 2, "run.save_every": 2, "run.output_dir": out})
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and 0 < rows[0]["train_s"] < rows[1]["train_s"]
    first = rows[1]["train_s"]
    assert first >= 60.0
    monkeypatch.setattr(trainer, "time", time)  # the real clock: the resumed segment takes milliseconds
    run(tmp_path, "sft", **{"run.max_steps": 10, "run.save_every": 2, "run.max_minutes": 0.9 * first / 60,
                            "run.resume": True, "run.output_dir": out})
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3], "the resumed run stops after one step: the budget is spent"
    assert first < rows[-1]["train_s"] < first + 30, "train_s goes on from the checkpoint's"


def test_decay_over_minutes_sets_each_steps_lr_from_the_training_time_before_it(tmp_path, monkeypatch):
    """optim.decay_over=minutes: step i's lr is the cosine at (train_s after step i-1) / run.max_minutes, so a
    slower run decays per step faster and ends its decay with its time (can fail: without the trainer's
    engine.set_time the lr follows the step count, 0.5 (1 + cos(pi i / max_steps)))."""
    import math
    from types import SimpleNamespace
    calls = iter(range(10**6))
    monkeypatch.setattr(trainer, "time", SimpleNamespace(time=lambda: 30.0 * next(calls)))  # 30 s a reading
    out = tmp_path / "timed"
    run(tmp_path, "sft", **{"run.max_steps": 4, "run.save_every": 4, "run.output_dir": out, "run.max_minutes": 10,
                            "optim.lr": 1.0e-3, "optim.schedule": "cosine", "optim.warmup_steps": 0,
                            "optim.decay_over": "minutes"})
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    before = [0.0] + [r["train_s"] for r in rows[:-1]]
    want = [1.0e-3 * 0.5 * (1 + math.cos(math.pi * t / 600)) for t in before]
    assert [r["lr"] for r in rows] == pytest.approx(want, rel=1e-9)
    by_step = [1.0e-3 * 0.5 * (1 + math.cos(math.pi * i / 4)) for i in range(4)]
    assert max(abs(a - b) for a, b in zip(want, by_step)) > 1e-4, "the test must tell time from steps"


def test_grad_cosine_reaches_metrics_from_the_second_step(tmp_path):
    """run.grad_cosine=true: grad_cos_prev in every step's row but the first, a cosine; absent by default."""
    out = tmp_path / "cos"
    run(tmp_path, "sft", **{"run.max_steps": 3, "run.save_every": 3, "run.output_dir": out, "run.grad_cosine": True})
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert ["grad_cos_prev" in r for r in rows] == [False, True, True]
    assert all(-1.0 <= r["grad_cos_prev"] <= 1.0 and r["grad_cos_prev"] != 0.0 for r in rows[1:])


@pytest.mark.parametrize("resample_tries", [0, 2])
def test_reusing_the_sampling_pass_equals_re_scoring(tmp_path, sft_drafter, resample_tries):
    """ppo_epochs = 1: updating through the sampling pass's graph gives the update of the re-score path
    (same rollouts, same losses, same weights), with grad_accum = 2 so samples are prepared one at a time;
    also when flat groups are redrawn (their graphs are spliced into the first draw's)."""
    runs = {}
    for reuse in (True, False):
        t, before, *_ = run(tmp_path, "ppow", **{"model.drafter": sft_drafter, "optim.grad_accum": 2,
                                                 "loss.reuse_sampling_pass": reuse,
                                                 "rollout.resample_tries": resample_tries,
                                                 "run.output_dir": tmp_path / f"reuse-{reuse}"})
        rows = [json.loads(x) for x in (tmp_path / f"reuse-{reuse}" / "metrics.jsonl").read_text().splitlines()]
        runs[reuse] = (t.drafter.state_dict(), rows, before)
        # the tiny drafter's groups are nearly all flat: each round redraws most prefixes (can fail: 0 = none)
        assert (max(r["redrawn_per_prefix"] for r in rows) > 0.5) == (resample_tries > 0)
    (fused, fused_rows, before), (rescored, rescored_rows, _) = runs[True], runs[False]
    for a, b in zip(fused_rows, rescored_rows):
        for key in ("loss", "reward", "accept_len", "kl", "policy_loss", "distill"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), key
    for k in fused:
        torch.testing.assert_close(fused[k], rescored[k], rtol=1e-5, atol=1e-7)
    assert any(not torch.equal(fused[k], before[k]) for k in fused)  # it did train


@pytest.mark.parametrize("family", [{}, {"model.drafter_type": "eagle3", "model.draft_vocab_size": 64}],
                         ids=["eagle1", "eagle3"])
def test_ppow_verified_on_its_generated_data_trains_as_with_the_tree_and_reads_the_feature_cache(
        tmp_path, family, monkeypatch):
    """rollout.verify=data on the target's own greedy answers: the same k, rewards and losses as the tree
    verification (up to the float noise of a tree forward vs the sequence pass), and with data.feature_cache the
    target does not run at all once the cache is filled (a hit trains exactly as the miss that filled it)."""
    from ppow_plugin.data import datasets, generate

    monkeypatch.setenv("PPOW_CACHE", str(tmp_path / "cache"))
    *_, sft_drafter = run(tmp_path, "sft", **family, **{"run.max_steps": 2})
    prompts = generate.first_turn_prompts(datasets.load_jsonl_conversations(tmp_path / "convs.jsonl"), 0.0)
    generate.generate(tmp_path / "target", prompts, generate.GenSettings(max_new_tokens=40, batch_size=4),
                      num_prompts=12, source="test", heldout_fraction=0.0, out_dir=tmp_path / "gen")
    common = {**family, "model.drafter": sft_drafter, "data.dataset": "generated", "data.path": tmp_path / "gen",
              "run.max_steps": 4}
    arms = {"tree": {}, "data": {"rollout.verify": "data"},
            "fill": {"rollout.verify": "data", "data.feature_cache": True},
            "cached": {"rollout.verify": "data", "data.feature_cache": True}}
    rows = {}
    for name, extra in arms.items():
        run(tmp_path, "ppow", **common, **extra, **{"run.output_dir": tmp_path / name})
        rows[name] = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    for a, b in zip(rows["tree"], rows["data"], strict=True):
        assert a["accept_len"] == b["accept_len"] and a["r_dist_rate"] == b["r_dist_rate"]
        for key in ("loss", "reward", "kl", "distill", "policy_loss"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key
    assert rows["cached"][-1]["feature_cache_hits"] == 4 and rows["fill"][-1]["feature_cache_misses"] == 4
    assert [r["loss"] for r in rows["cached"]] == [r["loss"] for r in rows["fill"]]
