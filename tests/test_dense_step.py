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
    (["rollout.positions=all", "rollout.verify=data", "data.dataset=generated", "loss.estimator=expected",
      "loss.ppo_epochs=2"], "loss.ppo_epochs"),
    (["rollout.positions=all", "rollout.verify=data", "data.dataset=generated", "loss.estimator=expected",
      "loss.minibatches=2"], "loss.minibatches"),
    (["rollout.prefixes_per_sequence=4", "loss.minibatches=5"], "loss.minibatches"),
    (["rollout.positions=3", "rollout.verify=data", "data.dataset=generated", "loss.minibatches=4"],
     "loss.minibatches"),
    (["loss.minibatches=0"], "loss.minibatches"),
    (["loss.baseline=reference"], "loss.advantage_scale"),
    (["loss.baseline=reference", "loss.advantage_scale=none", "loss.estimator=expected"], "loss.baseline"),
    (["loss.baseline=median"], "loss.baseline"),
    (["rollout.positions=all", "rollout.verify=data", "data.dataset=generated", "loss.deep_vocab_rows=4096"],
     "loss.deep_vocab_rows"),
    (["rollout.positions=all", "rollout.verify=data", "data.dataset=generated", "loss.estimator=expected",
      "loss.deep_vocab_rows=4096", "model.drafter_type=eagle3"], "loss.deep_vocab_rows"),
    (["rollout.positions=0"], "rollout.positions"),
])
def test_the_data_path_settings_are_refused_without_what_they_need(overrides, needs):
    with pytest.raises(UserError, match=needs):
        load_config(None, overrides)


# ----------------------------------------------------------------------------------------------
# Several updates per rollout (loss.ppo_epochs, loss.minibatches), the greedy window's k, the reference baseline

PATHS = {"adaw": {}, "dense": {"rollout.positions": "all"}}


def _ppow_trainer(tmp, drafters, name, **extra):
    """A tiny PPOW trainer on the generated answers, set up (one step trained, so the cache and step are warm)."""
    t, *_ = run_trainer(tmp, "ppow", **{"model.drafter": drafters["eagle1"], "data.dataset": "generated",
                                        "data.path": tmp / "gen", "rollout.verify": "data", "run.max_steps": 1,
                                        "run.output_dir": tmp / name, "windowing.warmup_steps": 0, **extra})
    return t


def _capture_policy_inputs(monkeypatch):
    """Record every `losses.policy_loss` call's (new log-probs with their .grad kept, old, advantages, mask)."""
    from ppow_plugin.method import losses

    calls, real = [], losses.policy_loss

    def spy(new, old, adv, mask, *args):
        new.retain_grad()
        calls.append((new, old, adv, mask, args))
        return real(new, old, adv, mask, *args)

    monkeypatch.setattr(losses, "policy_loss", spy)
    return calls


@pytest.mark.parametrize("path", PATHS)
def test_one_update_on_a_stored_rollout_equals_the_single_pass_step(generated, path, monkeypatch):
    """ppo_epochs = minibatches = 1 keeps today's step; the several-updates machinery (windows drawn once, log-probs
    frozen, re-scored on a part) given one part of one gives that step exactly: same loss, same gradient."""
    from ppow_plugin.training import ppow_step

    tmp, drafters = generated
    t = _ppow_trainer(tmp, drafters, f"one-update-{path}", **PATHS[path])
    sample = t.data.next()
    grads = {}
    for arm in ("single", "stored"):
        t.gen.manual_seed(1234)
        monkeypatch.setattr(ppow_step, "updates_per_rollout", lambda cfg: 1 if arm == "single" else 2)
        item = t.stage.prepare(sample, 5, keep_graph=arm == "single" and path == "adaw")
        result = t.stage.loss(item, (0, 1))
        t.drafter.zero_grad()
        result.loss.backward()
        grads[arm] = (result.loss.detach(), [p.grad.clone() for p in t.drafter.parameters() if p.requires_grad])
        assert result.stats["ratio"] == 1.0 and result.stats["ratio_out_frac"] == 0.0
    torch.testing.assert_close(grads["single"][0], grads["stored"][0], rtol=1e-6, atol=1e-9)
    for a, b in zip(grads["single"][1], grads["stored"][1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("path", PATHS)
def test_the_second_update_moves_the_ratio_and_the_clip_bounds_it(generated, path, monkeypatch):
    """ppo_epochs = 2, minibatches = 2 at a large lr (a crafted case): the first update's ratio is 1; after it the
    policy has moved, so a later update's ratio is not 1, some credited tokens' ratios leave [1 − ε, 1 + ε] and
    the clip removes their gradient: d loss / d log q is exactly 0 for a token past the clip on its advantage's
    side, and not 0 for the tokens inside. (Can fail: with the clip disabled the clipped tokens get a gradient.)"""
    tmp, drafters = generated
    t = _ppow_trainer(tmp, drafters, f"two-updates-{path}", **PATHS[path], **{
        "loss.ppo_epochs": 2, "loss.minibatches": 2, "loss.ratio_mode": "token", "optim.lr": 0.03,
        "rollout.temperature": 3.0, "reward.epsilon": 1.0, "rollout.prefixes_per_sequence": 4,
        "rollout.group_size": 8})
    calls = _capture_policy_inputs(monkeypatch)
    item = t.stage.prepare(t.data.next(), 5)
    seen = []
    for update, part in enumerate([(0, 2), (1, 2), (0, 2), (1, 2)]):
        result = t.stage.loss(item, part)
        t.engine.backward(result.loss)
        t.engine.step()
        seen.append(result.stats)
        new, old, adv, mask, (eps, _) = calls[-1]
        ratio = (new.detach() - old).exp()
        if update == 0:
            assert torch.equal(ratio[mask], torch.ones_like(ratio[mask]))
            continue
        past = mask & (((ratio > 1 + eps) & (adv[..., None] > 0)) | ((ratio < 1 - eps) & (adv[..., None] < 0)))
        inside = mask & ((ratio - 1).abs() < eps) & (adv[..., None] != 0)
        assert past.any() and inside.any(), f"update {update}: nothing past the clip"
        assert (new.grad[past] == 0).all()
        assert (new.grad[inside] != 0).all()
    assert seen[0]["ratio_out_frac"] == 0 and seen[0]["clip_frac"] == 0
    assert all(s["ratio"] != 1.0 and s["ratio_out_frac"] > 0 and s["clip_frac"] > 0 for s in seen[1:])


def test_several_updates_per_step_in_the_trainer_log_the_clip_and_the_greedy_k(generated):
    tmp, drafters = generated
    for path, extra in PATHS.items():
        t = _ppow_trainer(tmp, drafters, f"trainer-updates-{path}", **extra, **{
            "loss.ppo_epochs": 2, "loss.minibatches": 2, "run.max_steps": 2, "optim.lr": 0.03})
        assert t.engine.opt_step == 2 * 2 * 2  # ppo_epochs x minibatches optimizer updates per trainer step
        rows = [json.loads(x) for x in (tmp / f"trainer-updates-{path}" / "metrics.jsonl").read_text().splitlines()]
        for row in rows:
            assert {"clip_frac", "ratio_out_frac", "ratio", "greedy_accept_len"} <= row.keys()
            assert row["ratio_out_frac"] > 0 and row["ratio"] != 1.0


def _unroll_greedy_k(t, item, starts):
    """k of the argmax window of the data-path unroll (`dense.greedy_accept_len`), computed apart from `greedy_window`."""
    from ppow_plugin.method import dense
    from ppow_plugin.training import dense_step

    with torch.no_grad():
        dpass, draft_logits, _ = dense_step._teacher_forced(t.adapter, t.drafter, t.target, item, t.cfg)
        path = t.adapter.data_path(t.drafter, t.target, dpass, draft_logits, item["tpass"], item["ids"],
                                   item["valid"], starts, t.cfg.rollout.window, t.cfg, sft=False)
    return dense.greedy_accept_len(path.logits, starts, item["ids"], item["tpass"].logits, lambda x: x), path


def test_the_greedy_k_of_todays_path_is_the_greedy_window_of_the_data_path_unroll(generated):
    """The sampled (non-dense) path logs the greedy window's k at its starts (`greedy_accept_len`): drafted one
    member at a time (`greedy_window`), it equals the argmax window of the data-path unroll verified on the data
    (computed another way), on the step's items and on a crafted one where the data after a start is the drafter's
    own greedy chain and the target agrees (k = K there). Can fail: verified one position off."""
    from ppow_plugin.training import greedy_window

    tmp, drafters = generated
    t = _ppow_trainer(tmp, drafters, "greedy-k")
    K, checked = t.cfg.rollout.window, 0
    for _ in range(3):
        item = t.stage.prepare(t.data.next(), 5)
        ro = item["rollout"]
        if ro is None:
            continue
        assert torch.equal(item["greedy"].accept_len, _unroll_greedy_k(t, item, ro.starts)[0])
        assert t.stage.loss(item).stats["greedy_accept_len"] == float(item["greedy"].accept_len.float().mean())
        checked += 1
    assert checked >= 2
    s = int(ro.starts.min())
    ids, logits = item["ids"].clone(), item["tpass"].logits.clone()
    for j in range(K):  # x_{s+j+1} := the drafter's argmax at depth j+1 fed the crafted data
        crafted = {**item, "ids": ids}
        ids[s + 1 + j] = _unroll_greedy_k(t, crafted, torch.tensor([s]))[1].logits[0, j].argmax()
    logits[s:s + K] = -10.0
    logits[torch.arange(s, s + K), ids[s + 1:s + 1 + K]] = 10.0  # the target's choice at row s+j is x_{s+j+1}
    crafted = {**item, "ids": ids, "tpass": item["tpass"]._replace(logits=logits)}
    starts = torch.tensor([s])
    dpass = t.adapter.teacher_forced(t.drafter, t.target, crafted["tpass"].features, ids)[0]
    g = greedy_window.greedy_windows(t.adapter, t.drafter, t.target, t.kv, dpass, ids, logits, starts, t.cfg, t.gamma)
    assert g.accept_len.tolist() == [K] == _unroll_greedy_k(t, crafted, starts)[0].tolist()


@pytest.mark.parametrize("path", PATHS)
def test_the_reference_baseline_is_the_frozen_start_drafters_greedy_reward(generated, path, monkeypatch):
    """loss.baseline=reference: after steps that move the drafter, the reference still holds the start drafter's
    weights, and the advantages are R − (the start drafter's greedy-window reward at the same start), computed
    here from a fresh copy of the start drafter. (Can fail: the reference as the live drafter.)"""
    from ppow_plugin.method import dense, losses
    from ppow_plugin.training import greedy_window

    tmp, drafters = generated
    t = _ppow_trainer(tmp, drafters, f"reference-{path}", **PATHS[path], **{
        "loss.baseline": "reference", "loss.advantage_scale": "none", "run.max_steps": 3, "optim.lr": 0.01})
    start = t._build_drafter(None)
    ref = t.stage.reference
    assert all(torch.equal(a, b) for a, b in zip(ref.state_dict().values(), start.state_dict().values()))
    assert any(not torch.equal(a, b) for a, b in zip(t.drafter.state_dict().values(), start.state_dict().values()))
    seen, real = [], losses.group_advantages
    monkeypatch.setattr(losses, "group_advantages", lambda r, **kw: seen.append((r, kw)) or real(r, **kw))
    item = t.stage.prepare(t.data.next(), 5)
    t.stage.loss(item)
    (reward, kw), = seen
    starts = item["rollout"].starts if path == "adaw" else dense.valid_starts(item["valid"])
    with torch.no_grad():
        feats = item["tpass"].features
        dpass, _ = t.adapter.teacher_forced(start, t.target, feats, item["ids"])
    want = greedy_window.greedy_windows(t.adapter, start, t.target, t.kv, dpass, item["ids"], item["tpass"].logits,
                                        starts, t.cfg, t.gamma).reward
    assert torch.equal(kw["baseline"], want)
    adv = real(reward, scale="none", baseline=want)
    assert torch.equal(adv, reward - want[:, None])
    live = greedy_window.greedy_windows(t.adapter, t.drafter, t.target, t.kv,
                                        t.adapter.teacher_forced(t.drafter, t.target, feats, item["ids"])[0],
                                        item["ids"], item["tpass"].logits, starts, t.cfg, t.gamma).reward
    assert not torch.equal(live, want)  # the drafter moved: a live baseline would differ


def test_a_deep_vocabulary_holding_every_token_gives_the_whole_vocabulary_step(generated):
    """loss.deep_vocab_rows (EAGLE-1, expected): with every token in the columns the step equals the whole-vocabulary
    step (loss and gradient: the column indices, their map back to the fed tokens, depth 1 apart, the KL split by
    depth); with a few columns it differs. Can fail: columns read one off, or the unroll fed shifted tokens."""
    from ppow_plugin.method import dense

    tmp, drafters = generated
    t = _ppow_trainer(tmp, drafters, "deep-vocab", **{"rollout.positions": "all", "loss.estimator": "expected",
                                                      "loss.sft_weight": 0.5})
    sample = t.data.next()
    out = {}
    for rows in (None, 10 ** 6, 8):
        t.cfg.loss.deep_vocab_rows = rows
        item = t.stage.prepare(sample, 5)
        assert ("deep_cols" in item) == (rows is not None)
        result = t.stage.loss(item)
        t.drafter.zero_grad()
        result.loss.backward()
        out[rows] = (result.loss.detach(), torch.cat([p.grad.flatten() for p in t.drafter.parameters()
                                                      if p.requires_grad]), result.stats)
    assert out[10 ** 6][2]["reward"] == pytest.approx(out[None][2]["reward"], rel=1e-5)
    assert out[10 ** 6][2]["greedy_accept_len"] == out[None][2]["greedy_accept_len"]
    torch.testing.assert_close(out[10 ** 6][0], out[None][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out[10 ** 6][1], out[None][1], rtol=1e-4, atol=1e-6)
    assert abs(out[8][2]["reward"] - out[None][2]["reward"]) > 1e-4
    # the unroll itself (the tiny drafter's deeper depths weigh little in the loss): the columns' logits are the
    # whole vocabulary's at those ids, at every depth >= 2, fed the same data tokens
    from ppow_plugin.training import dense_step

    item = t.stage.prepare(sample, 5)
    starts = dense.valid_starts(item["valid"])
    cols = torch.unique(torch.cat([torch.arange(0, 128, 3), item["ids"]]))
    with torch.no_grad():
        dpass, draft_logits, _ = dense_step._teacher_forced(t.adapter, t.drafter, t.target, item, t.cfg)
        args = (t.drafter, t.target, dpass, draft_logits, item["tpass"], item["ids"], item["valid"], starts, 4, t.cfg)
        whole, part = t.adapter.data_path(*args, sft=False), t.adapter.data_path(*args, sft=False, cols=cols)
    torch.testing.assert_close(part.logits[:, 1:], whole.logits[:, 1:, cols], rtol=1e-5, atol=1e-5)
    assert torch.equal(part.first, whole.logits[:, 0]) and torch.equal(part.logits[:, 0], whole.logits[:, 0, cols])
