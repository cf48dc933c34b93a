"""The LR schedule (`distributed.lr_at`) by hand: warm-up, decay, and its horizon in optimizer steps."""

import math

import pytest


def test_lr_schedule_spans_every_optimizer_step_of_the_run():
    """cosine over max_steps trainer steps; with ppo_epochs = 2 there are 2 optimizer steps per trainer step,
    so the last one is still above 0 and the midpoint lands at trainer step max_steps / 2 (lr / 2)."""
    from ppow_plugin.config import load_config
    from ppow_plugin.distributed import lr_at, total_optimizer_steps
    cfg = load_config(None, ["stage=ppow", "run.max_steps=10", "loss.ppo_epochs=2", "optim.lr=1.0",
                             "optim.warmup_steps=0", "optim.schedule=cosine"])
    total = total_optimizer_steps(cfg)
    assert total == 20
    assert lr_at(10, cfg.optim, total) == pytest.approx(0.5)  # halfway through the run, not its end
    assert lr_at(19, cfg.optim, total) > 0 and lr_at(20, cfg.optim, total) == pytest.approx(0.0)
    assert lr_at(0, cfg.optim, total) == 1.0
    sft = load_config(None, ["stage=sft", "run.max_steps=10", "loss.ppo_epochs=2"])
    assert total_optimizer_steps(sft) == 10  # SFT makes one pass per step whatever loss.ppo_epochs says
    parts = load_config(None, ["stage=ppow", "run.max_steps=10", "loss.ppo_epochs=2", "loss.minibatches=2"])
    assert total_optimizer_steps(parts) == 40  # one update per part of the starts, per pass
    warm = load_config(None, ["optim.warmup_steps=4", "optim.lr=1.0", "optim.schedule=linear"]).optim
    assert [lr_at(s, warm, 8) for s in (0, 3, 4, 6, 8)] == pytest.approx([0.25, 1.0, 1.0, 0.5, 0.0])


def test_decay_over_minutes_follows_the_time_fraction_not_the_step():
    """optim.decay_over=minutes: after the warm-up (still in steps) the decay's progress is the given fraction of
    run.max_minutes, clipped to [0, 1]; refused without run.max_minutes; the step-based horizon is unchanged."""
    from ppow_plugin.config import load_config
    from ppow_plugin.distributed import lr_at
    from ppow_plugin.errors import UserError
    cfg = load_config(None, ["optim.lr=1.0", "optim.schedule=cosine", "optim.warmup_steps=2",
                             "optim.decay_over=minutes", "run.max_minutes=10", "run.max_steps=100"]).optim
    assert lr_at(0, cfg, 100, time_frac=0.9) == pytest.approx(0.5)  # warming up: the step decides
    assert lr_at(50, cfg, 100, time_frac=0.5) == pytest.approx(0.5)
    assert lr_at(3, cfg, 100, time_frac=0.5) == pytest.approx(0.5)  # not the step's 0.99
    assert lr_at(3, cfg, 100, time_frac=1.7) == pytest.approx(0.0) and lr_at(3, cfg, 100, time_frac=0.0) == 1.0
    assert lr_at(3, cfg, 100) == pytest.approx(0.5 * (1 + math.cos(math.pi / 98)))
    with pytest.raises(UserError, match=r"optim.decay_over .* must be steps unless run.max_minutes is set"):
        load_config(None, ["optim.decay_over=minutes"])


def test_grad_cosine_is_the_cosine_of_consecutive_updates_gradients():
    """run.grad_cosine: the engine's grad_cos is cos(this update's gradient, the previous one's), before the
    clip (g2 = 100 x its direction: the clip to 0.5 must not matter), None at the first update and after one
    without gradients; refused with DeepSpeed and with several updates per PPOW step."""
    import torch
    from ppow_plugin import distributed
    from ppow_plugin.config import load_config
    from ppow_plugin.errors import UserError
    cfg = load_config(None, ["dist.engine=torch", "run.grad_cosine=true", "optim.lr=1.0e-3"])
    module = torch.nn.Linear(2, 1, bias=False)
    engine = distributed.Engine(module, cfg, distributed.DistInfo(0, 1, 0))

    def update(grad):
        module.weight.grad = None if grad is None else torch.tensor([grad])
        engine.micro_step += 1
        engine.step()
        return engine.grad_cos
    assert update([1.0, 0.0]) is None
    assert update([100.0, 100.0]) == pytest.approx(2 ** -0.5)
    assert update([0.0, -3.0]) == pytest.approx(-(2 ** -0.5))  # against [1, 1], not the clipped copy
    assert update(None) is None and update([0.0, 1.0]) == pytest.approx(-1.0)  # the last gradient seen: [0, -3]
    off = distributed.Engine(torch.nn.Linear(2, 1), load_config(None, ["dist.engine=torch"]), distributed.DistInfo(0, 1, 0))
    off.module.weight.grad = torch.ones(1, 2)
    off.micro_step += 1
    off.step()
    assert off.grad_cos is None
    with pytest.raises(UserError, match="run.grad_cosine .* must be false unless dist.engine=torch"):
        load_config(None, ["run.grad_cosine=true", "dist.engine=deepspeed"])
    with pytest.raises(UserError, match="several updates per step"):
        load_config(None, ["run.grad_cosine=true", "dist.engine=torch", "stage=ppow", "loss.ppo_epochs=2"])
