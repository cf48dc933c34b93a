"""Hypothesis properties: the PPOW math (small examples, no deadline: keep the suite fast on CPU), and bad input
to every config field and every CLI flag (issue 16)."""

import argparse
import contextlib
import dataclasses
import importlib
import io
import json
import math
import os
import types
import typing
from pathlib import Path

import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ppow_plugin import cli, distributed
from ppow_plugin.training import plan
from ppow_plugin.config import Config, load_config
from ppow_plugin.errors import UserError
from ppow_plugin.method.losses import group_advantages, policy_loss
from ppow_plugin.method.rewards import proximity_reward, speedup_reward
from ppow_plugin.method.windowing import select_windows, window_scores

FAST = settings(max_examples=50, deadline=None)
gammas = st.floats(min_value=0.01, max_value=2.0)


@st.composite
def int_grid(draw, max_value=200):
    b = draw(st.integers(1, 4))
    g = draw(st.integers(1, 6))
    values = draw(st.lists(st.integers(0, max_value), min_size=b * g, max_size=b * g))
    return torch.tensor(values, dtype=torch.int64).reshape(b, g)


@FAST
@given(k=int_grid(), gamma=gammas)
def test_speedup_reward_bounded_and_monotone(k, gamma):
    r = speedup_reward(k, gamma)
    assert (r >= 0).all() and (r < 1.0 / gamma).all()
    _, order = k.flatten().sort()
    assert (r.flatten()[order].diff() >= 0).all()
    assert (r[k == 0] == 0).all()


@FAST
@given(k=int_grid(max_value=3), seed=st.integers(0, 2**31 - 1), eta=st.floats(0.0, 2.0),
       epsilon=st.floats(0.01, 5.0))
def test_proximity_reward_is_zero_or_eta(k, seed, eta, epsilon):
    delta = torch.rand(k.shape, generator=torch.Generator().manual_seed(seed)) * 6.0
    r = proximity_reward(k, delta, eta, epsilon)
    eta32 = torch.tensor(eta, dtype=torch.float32)
    assert ((r == 0) | (r == eta32)).all()
    assert (r[k > 0] == 0).all()


@st.composite
def rewards_and_mask(draw):
    b = draw(st.integers(1, 4))
    g = draw(st.integers(1, 8))
    rewards = draw(st.lists(st.floats(-10, 10, width=32), min_size=b * g, max_size=b * g))
    mask = draw(st.lists(st.booleans(), min_size=b * g, max_size=b * g))
    return torch.tensor(rewards).reshape(b, g), torch.tensor(mask).reshape(b, g)


@FAST
@given(data=rewards_and_mask(), scale=st.sampled_from(["std", "none"]))
def test_advantages_zero_mean_per_group_and_zero_on_invalid(data, scale):
    rewards, valid = data
    adv = group_advantages(rewards, valid, scale=scale)
    assert torch.isfinite(adv).all()
    assert (adv[~valid] == 0).all()
    per_group = torch.where(valid, adv.double(), 0.0).sum(dim=1)
    bound = 1e-4 * valid.sum(dim=1) * (1.0 if scale == "std" else 10.0)
    assert (per_group.abs() <= bound + 1e-9).all()


@st.composite
def scored_sequence(draw):
    b = draw(st.integers(1, 4))
    t = draw(st.integers(1, 8))
    scores = draw(st.lists(st.floats(0.0, 5.0, width=32), min_size=b * t, max_size=b * t))
    mask = draw(st.lists(st.booleans(), min_size=b * t, max_size=b * t))
    return torch.tensor(scores).reshape(b, t), torch.tensor(mask).reshape(b, t)


@FAST
@given(data=scored_sequence(), window=st.integers(1, 5), n=st.integers(1, 10),
       rule=st.sampled_from(["top", "sample", "uniform"]), seed=st.integers(0, 2**31 - 1),
       temperature=st.floats(0.1, 3.0))
def test_selected_windows_start_inside_sequence_and_loss_mask(data, window, n, rule, seed, temperature):
    pos, valid = data
    scores = window_scores(pos, valid, window)
    sel = select_windows(scores, n, rule, torch.Generator().manual_seed(seed), temperature)
    t = pos.shape[1]
    assert sel.starts.shape == (pos.shape[0], n)
    assert ((sel.starts >= 0) & (sel.starts < t)).all()
    assert valid.gather(1, sel.starts)[sel.valid_mask].all()
    # Every row picks min(n, #valid starts) distinct windows.
    assert torch.equal(sel.valid_mask.sum(dim=1), valid.sum(dim=1).clamp_max(n))
    for row in range(pos.shape[0]):
        picked = sel.starts[row][sel.valid_mask[row]].tolist()
        assert len(set(picked)) == len(picked)


@FAST
@given(seed=st.integers(0, 2**31 - 1),
       shape=st.tuples(st.integers(1, 3), st.integers(1, 4), st.integers(1, 5)),
       clip_eps=st.floats(0.01, 0.5), mode=st.sampled_from(["token", "window"]),
       pad_prob=st.floats(0.0, 1.0))
def test_policy_loss_is_finite(seed, shape, clip_eps, mode, pad_prob):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(shape, generator=g) * 8.0
    new = (old + torch.randn(shape, generator=g) * 2.0).requires_grad_()
    adv = torch.randn(shape[:2], generator=g) * 3.0
    valid = torch.rand(shape, generator=g) >= pad_prob
    loss, stats = policy_loss(new, old, adv, valid, clip_eps, mode)
    loss.backward()
    assert math.isfinite(loss.item()) and torch.isfinite(new.grad).all()
    assert all(math.isfinite(s.item()) for s in stats)


# -- bad input anywhere (issue 16): every config field and every CLI flag ---------------------------------
# Each example runs `ppow` in-process. Allowed outcomes: exit 0, or exit 2 with exactly one `error:` line;
# a traceback (any other exception) fails. Fields and flags are enumerated from the dataclasses and from the
# argparse parser, so fields and flags added later are fuzzed too.

ROOT = Path(__file__).parents[1]
RECIPE = str(ROOT / "recipes/smollm2/135M_eagle1_ppow.yaml")
DRAFTER = str(ROOT / "assets/drafters/smollm2-135m-eagle1-sft-gen")
# ~0.2 s an example on 2 busy cores; PPOW_FUZZ_EXAMPLES=2000 for a longer hunt
FUZZ = settings(max_examples=int(os.environ.get("PPOW_FUZZ_EXAMPLES", 120)), deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])


def config_fields() -> list[tuple[str, typing.Any]]:
    """(dotted name, type) of every recipe field, read from the dataclasses."""
    out = [("stage", typing.get_type_hints(Config)["stage"])]
    for section in dataclasses.fields(Config):
        if dataclasses.is_dataclass(section.default_factory):
            hints = typing.get_type_hints(section.default_factory)
            out += [(f"{section.name}.{f.name}", hints[f.name]) for f in dataclasses.fields(section.default_factory)]
    return out


def _literals(tp) -> list[str]:
    """The allowed words of a Literal field (also inside `X | None`), to mix valid values into the junk."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return [w for a in typing.get_args(tp) for w in _literals(a)]
    return [str(a) for a in typing.get_args(tp)] if typing.get_origin(tp) is typing.Literal else []


EDGES = ["nan", ".nan", "inf", "-.inf", "1e400", "-1", "0", "-0.0", "1", "0.5", "0.999", "1.0", "2", "16", "1e-30",
         "4294967295", "4294967296", str(10**400), "true", "null", "~", "", " ", "[]", "[2, 3]", "[0.9, 0.95]",
         "[0.9, nan]", "[1, 2, 3]", "{}", "{a: 1}", "tpu", "cuda", "cuda:1", "cuda:x", "default", "x", "'1e-5'",
         "[mt_bench]", "[]", "['']", "{", "]", ": x", "a: b: c", "- 1", "!!python/object/apply:os.getcwd []",
         "&a [*a]", "{a: 1, a: 2}", "\x00", "é", "x" * 300]  # 300: a file name too long for the OS
junk = st.one_of(st.sampled_from(EDGES), st.integers(-2**70, 2**70).map(str),
                 st.floats(allow_nan=True, allow_infinity=True).map(repr), st.text(max_size=12))
FIELDS = config_fields()


@st.composite
def overrides(draw):
    items = []
    for _ in range(draw(st.integers(1, 3))):
        name, tp = draw(st.sampled_from(FIELDS))
        value = draw(st.one_of(junk, st.sampled_from(_literals(tp) or ["x"])))
        items.append(f"{name}={value}")
    return items


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    """`ppow ARGV` in-process: (exit code, stdout, stderr); exceptions other than SystemExit propagate."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main(argv)
        except SystemExit as exc:  # argparse
            code = exc.code if isinstance(exc.code, int) else 2
    return code, out.getvalue(), err.getvalue()


def assert_clean_outcome(code: int, err: str) -> None:
    assert code in (0, 2), (code, err)
    if code == 2:
        lines = [x for x in err.splitlines() if "error:" in x]
        assert len(lines) == 1, err
        assert "Traceback" not in err


def consume(cfg: Config) -> None:
    """What training does first with these values: nothing here may raise or give a non-finite number."""
    torch.optim.AdamW([torch.zeros(1, requires_grad=True)], lr=cfg.optim.lr, betas=cfg.optim.betas,
                      weight_decay=cfg.optim.weight_decay)
    if cfg.dist.device != "auto":
        torch.device(cfg.dist.device)
    np.random.seed(cfg.dist.seed)
    np.random.seed(cfg.eval.seed)
    k = torch.tensor([[0, 1, cfg.rollout.window]])
    r = speedup_reward(k, cfg.reward.gamma) * cfg.reward.speedup_weight + cfg.reward.proximity_weight * \
        proximity_reward(k, torch.zeros(1, 3), cfg.reward.eta, cfg.reward.epsilon)
    assert torch.isfinite(r).all() and r.abs().sum() > 0  # some window earns a reward
    a = plan.TargetArch(hidden_size=8, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=4, intermediate_size=16,
                        vocab_size=32 if cfg.model.draft_vocab_size is None else max(32, cfg.model.draft_vocab_size))
    rows = plan.plan_memory(cfg, a).rows
    assert all(math.isfinite(v) and v >= 0 for v in rows.values()) and math.isfinite(plan.step_seconds(cfg, a))
    json.dumps(distributed.deepspeed_config(cfg, 1), allow_nan=False)


@FUZZ
@given(items=overrides())
def test_config_fields_junk_and_out_of_range_values(items, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(["validate", "--no-path-check", RECIPE, *items])
    assert_clean_outcome(code, err)
    if code == 0:
        consume(load_config(RECIPE, items))
    assert list(tmp_path.iterdir()) == []


def test_every_field_with_every_edge_value():
    # The deterministic sweep under the random one: each field x each edge value, refused or usable.
    usable = 0
    for name, _ in FIELDS:
        for text in EDGES:
            try:
                cfg = load_config(None, [f"{name}={text}"])
            except UserError as exc:
                assert "\n" not in str(exc)
                continue
            consume(cfg)
            usable += 1
    assert 0 < usable < len(FIELDS) * len(EDGES) / 2


# CLI flags. Commands that load models or change files get their work function replaced by `Reached`
# (raised once the handler has checked its flags; counts as success); validate and plan run for real.
class Reached(Exception):
    pass


WORK = {  # subcommand -> the (module, function) its handler calls after checking its flags
    "validate": [], "plan": [],
    "sft": [("eagle_compat", "require_host"), ("trainer", "main")],
    "train": [("eagle_compat", "require_host"), ("trainer", "main")],
    "prepare": [("assets", "prepare_target")],
    "patch": [("patching", "apply_patches"), ("patching", "revert_patches"), ("patching", "patch_status")],
    "doctor": [("doctor", "run")],
    "eval": [("evaluate", "evaluate")], "compare": [("evaluate", "compare")],
    "profile": [("profile", "profile")], "export": [("export", "export")],
    "data": [("datasets", "load_sharegpt"), ("datasets", "load_jsonl_conversations")],  # `data generate` reads prompts first
}


def subcommands() -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def _placeholder(action: argparse.Action, tmp: Path) -> list[str]:
    """A plausible value for a required argument, so that the fuzzed flag is what gets checked."""
    if action.choices:
        return [str(next(iter(action.choices)))]
    value = {"recipe": RECIPE, "drafter": DRAFTER, "drafters": DRAFTER, "source": DRAFTER}.get(action.dest,
                                                                                           str(tmp / "new"))
    return [value]


@st.composite
def command_lines(draw, tmp: Path):
    name, sub = draw(st.sampled_from(sorted(subcommands().items())))
    argv = [name]
    for a in sub._actions:
        if not a.option_strings and a.nargs not in ("*", "?"):  # a required positional: junk one time in 5
            argv += [draw(junk)] if draw(st.integers(0, 4)) == 0 else _placeholder(a, tmp)
        elif not a.option_strings:  # optional positionals (recipe overrides): sometimes junk
            argv += draw(st.lists(junk, max_size=1))
        elif a.required:
            argv += [a.option_strings[0], *_placeholder(a, tmp)]
    flags = [a for a in sub._actions if a.option_strings and not isinstance(a, argparse._HelpAction)]
    for a in draw(st.lists(st.sampled_from(flags), min_size=1, max_size=3)) if flags else []:
        argv.append(a.option_strings[-1])
        if a.nargs != 0:
            choices = [str(c) for c in a.choices or []]
            argv.append(draw(st.one_of(junk, st.sampled_from(choices or ["1"]))))
    return argv


def test_every_subcommand_has_its_work_stubbed():
    missing = set(subcommands()) - set(WORK)
    assert not missing, f"add the work function(s) of {sorted(missing)} to WORK in tests/test_properties.py"


@FUZZ
@given(data=st.data())
def test_cli_flags_junk_and_out_of_range_values(data, tmp_path, monkeypatch):
    def reached(*args, **kwargs):
        raise Reached
    for calls in WORK.values():
        for module, fn in calls:
            monkeypatch.setattr(importlib.import_module(f"ppow_plugin.{module}"), fn, reached)
    monkeypatch.chdir(tmp_path)
    argv = data.draw(command_lines(tmp_path))
    try:
        code, _, err = run_cli(argv)
    except Reached:
        code, err = 0, ""
    assert_clean_outcome(code, err)
    assert list(tmp_path.iterdir()) == [], argv
