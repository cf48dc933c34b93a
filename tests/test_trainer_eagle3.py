"""EAGLE-3 in the trainer: SFT (training-time test) and PPOW smoke, resume, export round trip, reduced
draft vocabulary through d2t. Tiny 6-layer random target (tests/tiny.py), CPU, fp32, seconds each."""

import json

import pytest
import torch
from safetensors.torch import load_file

from ppow_plugin.drafters import adapters, draft_vocab, eagle3, export, formats
from ppow_plugin.host import patching
from ppow_plugin.method import rollout
from ppow_plugin.training import ppow_step, trainer
from ppow_plugin.config import RolloutCfg, load_config
from tiny import overrides, run_trainer

if patching.patch_status().state != "patched":
    pytest.skip("the EAGLE host is not installed and patched (`ppow patch apply`)", allow_module_level=True)

E3 = {"model.drafter_type": "eagle3", "model.draft_vocab_size": 64, "sft.ttt_steps": 3, "data.max_len": 64}


def run(tmp_path, stage, **extra):
    return run_trainer(tmp_path, stage, **{**E3, **extra})


def metrics(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_trained(t, before, target_before):
    after = t.drafter.state_dict()
    trainable = {n for n, p in t.drafter.named_parameters() if p.requires_grad}
    assert trainable == set(after) - {"embed_tokens.weight", "d2t", "t2d"}
    for name in trainable:
        assert not torch.equal(before[name], after[name]), f"{name} did not change"
    for name in ("embed_tokens.weight", "d2t", "t2d"):
        assert torch.equal(before[name], after[name]), f"{name} changed in training"
    for name, value in t.target.state_dict().items():
        assert torch.equal(target_before[name], value), f"target {name} changed"


@pytest.fixture(scope="module")
def sft_drafter(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e3sft")
    _, _, _, out = run(tmp, "sft", **{"run.max_steps": 2})
    return out


def test_eagle3_sft_smoke_loss_goes_down(tmp_path):
    t, before, target_before, out = run(tmp_path, "sft", **{"run.max_steps": 20, "optim.lr": 3e-3})
    assert_trained(t, before, target_before)
    losses = [r["loss"] for r in metrics(tmp_path / "run-sft")]
    assert len(losses) == 20 and all(x is not None and x > 0 for x in losses)
    # the random tiny target is nearly uniform, so the soft CE floor is about sum_k 0.8^k log 64 = 10.1:
    # require a clear absolute drop towards it, not a relative one
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.15, losses
    # the draft vocabulary is the 64 most frequent assistant tokens of the training data, and it is reduced
    counts = adapters.count_loss_tokens(t.data.samples, 2000, t.drafter.cfg.vocab_size)
    d2t, t2d = draft_vocab.build_vocab_map(counts, 64)
    assert torch.equal(t.drafter.d2t, d2t) and torch.equal(t.drafter.t2d, t2d) and d2t.any()


def test_eagle3_export_roundtrip_gives_identical_outputs(tmp_path):
    t, *_ = run(tmp_path, "sft")
    out = tmp_path / "run-sft" / "drafter"
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLMEagle3"] and config["draft_vocab_size"] == 64
    loaded = formats.load_drafter(out, t.target.config)
    assert loaded.format == "eagle3" and not loaded.notes
    assert set(loaded.state) == set(t.drafter.state_dict())  # exactly the EAGLE-3 keys (+ embeddings)
    assert loaded.state["d2t"].dtype == torch.int64 and loaded.state["t2d"].dtype == torch.bool
    again = adapters.load_eagle3_drafter(out, t.target)
    for k, v in t.drafter.state_dict().items():
        assert torch.equal(v, again.state_dict()[k]), k
    feats = torch.randn(1, 9, 3 * 64)
    ids = torch.randint(0, 128, (1, 9))
    with torch.no_grad():
        for a, b in zip(t.drafter.eval()(feats, ids)[:2], again.eval()(feats, ids)[:2]):
            assert torch.equal(a, b)
    # ppow export from the run's checkpoint writes the same eagle3 layout
    dst, _ = export.export(tmp_path / "run-sft", tmp_path / "exported", "eagle3")
    assert torch.equal(formats.load_drafter(dst).state["d2t"], loaded.state["d2t"])
    # one drafter, one config: its newest checkpoint and the trainer's drafter dir export byte-identical configs
    ckpt = sorted((tmp_path / "run-sft" / "checkpoints").glob("step-*"))[-1]
    written = load_file(str(dst / "model.safetensors"))
    for i, src in enumerate((ckpt, out)):
        other, _ = export.export(src, tmp_path / f"exported-{i}", "eagle3")
        assert (other / "config.json").read_bytes() == (dst / "config.json").read_bytes()
        again = load_file(str(other / "model.safetensors"))
        assert set(again) == set(written) and all(torch.equal(v, written[k]) for k, v in again.items())


@pytest.mark.parametrize("engine", ["torch", "deepspeed"])
def test_eagle3_ppow_smoke(tmp_path, sft_drafter, engine):
    t, before, target_before, out = run(tmp_path, "ppow", engine=engine, **{
        "model.drafter": sft_drafter, "model.draft_vocab_size": "null", "run.output_dir": tmp_path / f"ppow-{engine}"})
    assert_trained(t, before, target_before)
    assert torch.equal(t.drafter.d2t, formats.load_drafter(sft_drafter).state["d2t"])  # kept from the warm start
    rows = metrics(tmp_path / f"ppow-{engine}")
    for key in ("reward", "accept_len", "kl", "policy_loss", "distill"):
        assert all(r[key] is not None for r in rows), key
    assert all(0 <= r["accept_len"] <= 4 for r in rows)
    assert formats.load_drafter(out).format == "eagle3"
    # `ppow export` from the engine checkpoint (DeepSpeed ZeRO-2 or engine.pt) keeps the vocabulary map
    dst, _ = export.export(tmp_path / f"ppow-{engine}", tmp_path / "exported", "eagle3")
    exported = formats.load_drafter(dst).state
    assert torch.equal(exported["d2t"], t.drafter.d2t) and torch.equal(exported["t2d"], t.drafter.t2d)


def test_eagle3_warm_start_refuses_another_vocab_size(tmp_path, sft_drafter):
    from ppow_plugin.errors import UserError
    t = trainer.Trainer(load_config(None, overrides(tmp_path, "ppow", **{**E3, "model.drafter": sft_drafter,
                                                                          "model.draft_vocab_size": 32})))
    with pytest.raises(UserError, match="draft_vocab_size"):
        t.setup()


def test_eagle3_resume_equals_uninterrupted(tmp_path):
    straight, *_ = run(tmp_path, "sft", **{"run.max_steps": 4, "run.output_dir": tmp_path / "straight"})
    run(tmp_path, "sft", **{"run.max_steps": 2, "run.save_every": 2, "run.output_dir": tmp_path / "split"})
    resumed, *_ = run(tmp_path, "sft", **{"run.max_steps": 4, "run.save_every": 2, "run.resume": True,
                                          "run.output_dir": tmp_path / "split"})
    a, b = straight.drafter.state_dict(), resumed.drafter.state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume"


def test_target_pass_features_are_hf_layer_inputs(tmp_path):
    """The host KV Llama's hidden_states are HF's: the fused features equal HF hidden_states[2, L//2, L-3]."""
    from transformers import LlamaForCausalLM

    t = trainer.Trainer(load_config(None, overrides(tmp_path, "sft", **E3)))
    t.setup()
    ids = torch.randint(4, 128, (12,))
    tpass = t.adapter.target_pass(t.drafter, t.target, ids, None)
    hf = LlamaForCausalLM.from_pretrained(str(t.target_dir)).eval()
    with torch.no_grad():
        out = hf(ids[None], output_hidden_states=True)
    want = torch.cat([out.hidden_states[i][0] for i in (2, 3, 3)], -1)
    torch.testing.assert_close(tpass.features, want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(tpass.logits, out.logits[0], atol=1e-4, rtol=1e-4)


def test_reduced_vocab_rollouts_are_verified_as_target_ids(tmp_path, monkeypatch):
    """Hand-built map: draft id i <-> target id 100 + i. Every token the drafter is fed back and every
    token verification sees is a target id in 100..127; the rollout keeps draft ids for re-scoring."""
    t = trainer.Trainer(load_config(None, overrides(tmp_path, "sft", **{**E3, "model.draft_vocab_size": 28})))
    t.setup()
    used = torch.arange(100, 128)
    t2d = torch.zeros(128, dtype=torch.bool)
    t2d[used] = True
    t.drafter.set_vocab_map(used - torch.arange(28), t2d)
    t.cfg.stage = "ppow"  # the same drafter and target through the PPOW step
    step = ppow_step.PpowStep(t.cfg, t.adapter, t.drafter, t.target, t.kv, t.stage.target_passes, t.gen, t.device,
                              t.gamma)
    fed, verified = [], []
    t.drafter.register_forward_pre_hook(lambda m, args: fed.append(args[1].clone()) if args[1].shape[1] == 1 else None)
    real_verify = rollout.verify_windows
    monkeypatch.setattr(rollout, "verify_windows", lambda *a, **k: verified.append(a[4].clone()) or real_verify(*a, **k))
    item = step.prepare(t.data.next())
    ro = item["rollout"]
    assert ro is not None and verified and fed
    assert ro.draft_tokens.max() < 28  # draft vocabulary ids
    assert torch.equal(verified[0], ro.draft_tokens + 100)
    assert all(((f >= 100) & (f < 128)).all() for f in fed)  # window steps embed target ids
    assert step.loss(item).loss.isfinite()


def test_eagle3_draft_windows_match_ttt_unroll(tmp_path):
    """Re-scoring the data tokens as a window from start s gives the TTT unroll's row s-1 at every step
    (same positions and attention), so SFT trains exactly what rollouts sample."""
    t = trainer.Trainer(load_config(None, overrides(tmp_path, "sft", **{**E3, "model.draft_vocab_size": "null"})))
    t.setup()
    ids = torch.as_tensor(t.data.next().input_ids[:24])
    tpass = t.adapter.target_pass(t.drafter, t.target, ids, None)
    s, k = 10, 3
    with torch.no_grad():
        dpass, _ = t.adapter.teacher_forced(t.drafter, t.target, tpass.features, ids)
        steps = eagle3.ttt_unroll(t.drafter, tpass.features[None], torch.cat([ids[1:], ids.new_zeros(1)])[None], k)
        window = ids[s + 1: s + 1 + k].expand(1, 2, k)  # d_j = x_{s+j}
        _, _, logits = t.adapter.draft_windows(t.drafter, t.target, dpass, torch.tensor([s]),
                                               RolloutCfg(group_size=2, window=k), tokens=window)
    for j in range(k):
        torch.testing.assert_close(logits[0, 1, j], steps[j][0, s - 1], atol=1e-5, rtol=1e-5)
