"""Typed run configuration: one YAML recipe -> one `Config`.

    cfg = load_config("recipes/smollm2/135M_ppow.yaml", ["optim.lr=1e-5", "run.max_steps=20"])

Rules:
1. Every knob is a typed dataclass field with a default and a comment; there is no `cfg.get`.
2. Unknown keys are rejected with the nearest valid name (`difflib`), values are type-checked, and
   `__post_init__` checks invariants. All of these surface as one-line `UserError`s.
3. Dotted `section.field=value` overrides go through the same path as the YAML (values parsed as YAML
   scalars, so `run.max_steps=20` is an int and `model.drafter=null` is None).
Defaults marked [paper] come from PPOW (arXiv 2605.14978) as far as it is known; [default] marks our
own choice where the paper is silent (docs/algorithm.md says why).
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from ppow_plugin.errors import UserError

Dtype = Literal["fp32", "bf16"]


@dataclass
class ModelCfg:
    target: str = "default"  # local HF causal-LM dir, or "default" = embedded SmolLM2 (`ppow prepare`)
    drafter: str | None = None  # drafter dir to start from; None = fresh random drafter (SFT only)
    drafter_type: Literal["eagle1", "eagle3"] = "eagle1"
    drafter_bias: bool = True  # EAGLE-1 `fc.bias`; LLaMA-3 era drafters use false
    draft_vocab_size: int | None = None  # EAGLE-3 reduced vocabulary; None = full target vocabulary
    draft_vocab_samples: int = 2000  # fresh EAGLE-3: count loss-masked tokens of the first N samples

    def __post_init__(self):
        if self.draft_vocab_size is not None and self.draft_vocab_size < 1:
            raise ValueError(f"model.draft_vocab_size ({self.draft_vocab_size}) must be >= 1 (or null = full)")
        if self.draft_vocab_samples < 1:
            raise ValueError(f"model.draft_vocab_samples ({self.draft_vocab_samples}) must be >= 1")


@dataclass
class DataCfg:
    dataset: Literal["sharegpt", "jsonl"] = "sharegpt"  # jsonl = your own ShareGPT-style records
    path: str | None = None  # the .jsonl file for dataset=jsonl
    max_len: int = 512  # tokens per training sequence (longer ones are truncated)
    num_conversations: int | None = None  # use only the first N train conversations (None = all)
    heldout_fraction: float = 0.02  # share of ShareGPT kept out of training, by stable hash of the id
    micro_batch: int = 1  # sequences per micro-step

    def __post_init__(self):
        if self.max_len < 16:
            raise ValueError(f"data.max_len ({self.max_len}) must be >= 16")
        if not 0.0 <= self.heldout_fraction < 1.0:
            raise ValueError(f"data.heldout_fraction ({self.heldout_fraction}) must be in [0, 1)")
        if self.micro_batch < 1:
            raise ValueError(f"data.micro_batch ({self.micro_batch}) must be >= 1")


@dataclass
class SFTCfg:
    feature_weight: float = 1.0  # EAGLE-1 next-feature SmoothL1 weight
    token_weight: float = 0.1  # EAGLE-1 soft cross-entropy weight
    feature_noise: float = 0.2  # EAGLE-1 only: uniform noise width added to input features (EAGLE-1 uses U(-0.1,0.1)*2)
    ttt_steps: int = 7  # EAGLE-3 training-time-test unroll length
    ttt_decay: float = 0.8  # EAGLE-3 step weight decay^i
    # feature_weight/token_weight are the EAGLE-1 objective's; EAGLE-3 trains on the TTT soft CE alone

    def __post_init__(self):
        if self.feature_weight < 0 or self.token_weight < 0:
            raise ValueError("sft.feature_weight and sft.token_weight must be >= 0")
        if self.feature_weight == 0 and self.token_weight == 0:
            raise ValueError("sft.feature_weight and sft.token_weight are both 0: nothing to train")
        if self.ttt_steps < 1:
            raise ValueError(f"sft.ttt_steps ({self.ttt_steps}) must be >= 1")
        if self.ttt_decay <= 0:
            raise ValueError(f"sft.ttt_decay ({self.ttt_decay}) must be > 0")


@dataclass
class RolloutCfg:
    group_size: int = 8  # G: windows sampled per prefix [paper]
    window: int = 10  # K: draft tokens per window [paper]
    prefixes_per_sequence: int = 4  # windows' prefixes chosen per training sequence by ADAW [default]
    temperature: float = 1.0  # drafter sampling temperature for rollouts [default]
    verify: Literal["greedy", "sampling"] = "greedy"  # target acceptance rule: T=0 match or rejection sampling
    verify_temperature: float = 1.0  # target temperature when verify=sampling

    def __post_init__(self):
        if self.group_size < 2:
            raise ValueError(f"rollout.group_size ({self.group_size}) must be >= 2 "
                             "to compute group-relative advantages")
        if self.window < 1:
            raise ValueError(f"rollout.window ({self.window}) must be >= 1")
        if self.prefixes_per_sequence < 1:
            raise ValueError(f"rollout.prefixes_per_sequence ({self.prefixes_per_sequence}) must be >= 1")
        if self.temperature <= 0 or self.verify_temperature <= 0:
            raise ValueError("rollout.temperature and rollout.verify_temperature must be > 0")


@dataclass
class WindowingCfg:
    rule: Literal["top", "sample", "uniform"] = "sample"  # ADAW selection after warm-up [default]
    warmup_steps: int = 10  # uniform selection before ADAW switches on (paper Fig. 4) [default]
    temperature: float = 1.0  # for rule=sample: p ∝ score^(1/temperature)

    def __post_init__(self):
        if self.warmup_steps < 0:
            raise ValueError(f"windowing.warmup_steps ({self.warmup_steps}) must be >= 0")
        if self.temperature <= 0:
            raise ValueError(f"windowing.temperature ({self.temperature}) must be > 0")


@dataclass
class RewardCfg:
    gamma: float = 0.12  # drafter/target cost ratio [paper]; overridden by gamma_profile when set
    gamma_profile: str | None = None  # JSON written by `ppow profile`; its measured gamma wins
    eta: float = 0.5  # proximity bonus size; < R_speedup(1) so "close" never beats "1 accepted" [default]
    epsilon: float = 2.0  # proximity threshold on Δ, nats [default]
    delta_positions: int | None = None  # Δ summed over the first N window positions; None = all K [default]
    speedup_weight: float = 1.0
    proximity_weight: float = 1.0  # 0 disables R_dist (ablation)

    def __post_init__(self):
        if self.gamma < 0:
            raise ValueError(f"reward.gamma ({self.gamma}) must be >= 0")
        if self.eta < 0 or self.epsilon <= 0:
            raise ValueError("reward.eta must be >= 0 and reward.epsilon > 0")
        if self.delta_positions is not None and self.delta_positions < 1:
            raise ValueError(f"reward.delta_positions ({self.delta_positions}) must be >= 1 (or null = the window)")


@dataclass
class LossCfg:
    clip_eps: float = 0.2  # PPO clip range [default]
    ratio_mode: Literal["token", "window"] = "window"  # window = geometric mean over the window [default]
    advantage_scale: Literal["std", "none"] = "std"  # divide by group std (GRPO) or only centre
    kl_beta: float = 0.05  # β: KL to the *target* on window positions [default]
    kl_direction: Literal["forward", "reverse"] = "forward"  # forward = KL(P_target ‖ Q_draft)
    distill_weight: float = 0.1  # optional token-level soft-CE to the target on the sequence [default]
    ppo_epochs: int = 1  # policy updates per rollout batch
    # ppo_epochs = 1: keep the graph of the sampling pass and update through it (the policy equals the sampling
    # policy, so a re-score would recompute the same numbers); False re-scores as ppo_epochs > 1 must.
    reuse_sampling_pass: bool = True

    def __post_init__(self):
        if not 0 < self.clip_eps < 1:
            raise ValueError(f"loss.clip_eps ({self.clip_eps}) must be in (0, 1)")
        if self.kl_beta < 0 or self.distill_weight < 0:
            raise ValueError("loss.kl_beta and loss.distill_weight must be >= 0")
        if self.ppo_epochs < 1:
            raise ValueError(f"loss.ppo_epochs ({self.ppo_epochs}) must be >= 1")


@dataclass
class OptimCfg:
    lr: float = 5e-6
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_steps: int = 0
    schedule: Literal["constant", "cosine", "linear"] = "constant"
    grad_clip: float = 0.5
    grad_accum: int = 1  # micro-steps per optimizer step

    def __post_init__(self):
        if self.lr <= 0:
            raise ValueError(f"optim.lr ({self.lr}) must be > 0")
        if self.grad_accum < 1:
            raise ValueError(f"optim.grad_accum ({self.grad_accum}) must be >= 1")
        if self.warmup_steps < 0:
            raise ValueError(f"optim.warmup_steps ({self.warmup_steps}) must be >= 0")


@dataclass
class DistCfg:
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    dtype: Dtype = "fp32"  # drafter compute/parameter dtype
    target_dtype: Dtype = "fp32"  # frozen target; bf16 is 2-4x faster on AMX CPUs
    engine: Literal["deepspeed", "torch"] = "deepspeed"  # torch = plain AdamW, no ZeRO (tests, debugging)
    zero_stage: int = 2
    seed: int = 0

    def __post_init__(self):
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"dist.zero_stage ({self.zero_stage}) must be 0, 1, 2 or 3")


@dataclass
class RunCfg:
    output_dir: str = "runs/default"
    max_steps: int = 100  # optimizer steps
    max_minutes: float | None = None  # stop early (and save) after this wall time
    log_every: int = 1
    save_every: int = 50
    keep_last: int = 2  # checkpoints kept on disk
    resume: bool = False  # continue from the newest good checkpoint in output_dir
    max_bad_steps: int = 10  # non-finite loss/grad steps skipped before aborting

    def __post_init__(self):
        if self.max_steps < 1:
            raise ValueError(f"run.max_steps ({self.max_steps}) must be >= 1")
        if self.save_every < 1 or self.log_every < 1 or self.keep_last < 1:
            raise ValueError("run.save_every, run.log_every and run.keep_last must be >= 1")


@dataclass
class EvalCfg:
    # Read by `ppow eval|compare --recipe`; command-line flags override each field.
    benchmarks: list[str] = field(default_factory=lambda: ["mt_bench", "humaneval", "sharegpt"])
    num_prompts: int = 80           # per benchmark (the first N)
    max_new_tokens: int = 128
    temperature: float = 0.0
    seed: int = 0
    # EAGLE-3 dynamic draft tree (EAGLE-3 paper: 7 / 10 / 60); EAGLE-1 drafters use the host's static tree.
    tree_depth: int = 7
    tree_top_k: int = 10
    tree_total_tokens: int = 60

    def __post_init__(self):
        for name in ("num_prompts", "max_new_tokens", "tree_depth", "tree_top_k", "tree_total_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"eval.{name} ({getattr(self, name)}) must be >= 1")


@dataclass
class Config:
    stage: Literal["sft", "ppow"] = "ppow"
    model: ModelCfg = field(default_factory=ModelCfg)
    data: DataCfg = field(default_factory=DataCfg)
    sft: SFTCfg = field(default_factory=SFTCfg)
    rollout: RolloutCfg = field(default_factory=RolloutCfg)
    windowing: WindowingCfg = field(default_factory=WindowingCfg)
    reward: RewardCfg = field(default_factory=RewardCfg)
    loss: LossCfg = field(default_factory=LossCfg)
    optim: OptimCfg = field(default_factory=OptimCfg)
    dist: DistCfg = field(default_factory=DistCfg)
    run: RunCfg = field(default_factory=RunCfg)
    eval: EvalCfg = field(default_factory=EvalCfg)


# ----------------------------------------------------------------------------------------------
# Loading


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Read a recipe YAML (or start from defaults when `path` is None) and apply dotted overrides.

    Raises:
        UserError: missing/unparsable file, unknown key (with suggestion), wrong type, bad value.
    """
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise UserError(f"recipe {p} does not exist; pass a YAML file (see recipes/)")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise UserError(f"recipe {p} is not valid YAML: {str(exc).splitlines()[0]}") from None
        if not isinstance(raw, dict):
            raise UserError(f"recipe {p} must be a mapping of sections, got {type(raw).__name__}")
    for item in overrides or []:
        _apply_override(raw, item)
    return build(Config, raw, prefix="")


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Plain-dict view (tuples as lists) for meta.json and `ppow validate`."""
    def conv(v):
        if isinstance(v, tuple):
            return [conv(x) for x in v]
        if isinstance(v, list):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        return v
    return conv(dataclasses.asdict(cfg))


def _apply_override(raw: dict, item: str) -> None:
    if "=" not in item:
        raise UserError(f"override {item!r} must look like section.field=value")
    key, _, text = item.partition("=")
    parts = key.strip().split(".")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    node = raw
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise UserError(f"override {item!r}: {part} is not a section")
    node[parts[-1]] = value


def build(cls: type, raw: Any, prefix: str) -> Any:
    """Build dataclass `cls` from a raw mapping, strictly."""
    where = prefix.rstrip(".") or "recipe"
    if not isinstance(raw, dict):
        raise UserError(f"{where} must be a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; valid keys: {', '.join(names)}"
            raise UserError(f"unknown config key '{prefix}{key}'{hint}")
        kwargs[key] = _coerce(hints[key], value, f"{prefix}{key}")
    try:
        return cls(**kwargs)
    except ValueError as exc:
        raise UserError(str(exc)) from None


def _coerce(tp: Any, value: Any, name: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return build(tp, value if value is not None else {}, prefix=f"{name}.")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(arg, value, name)
            except UserError as exc:
                errors.append(str(exc))
        raise UserError(errors[0])
    if origin is Literal:
        if value not in args:
            close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise UserError(f"{name} must be one of {', '.join(map(str, args))}, got {value!r}{hint}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise UserError(f"{name} must be a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise UserError(f"{name} must have {len(args)} items, got {len(value)}")
            return tuple(_coerce(a, v, f"{name}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
        inner = args[0] if args else Any
        items = [_coerce(inner, v, f"{name}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise UserError(f"{name} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"{name} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            # YAML reads "1e-5" (no dot) as a string; accept numeric strings.
            try:
                return float(value)
            except (TypeError, ValueError):
                raise UserError(f"{name} must be a number, got {value!r}") from None
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise UserError(f"{name} must be a string, got {value!r}")
        return value
    raise TypeError(f"config field {name} has unsupported type {tp}")
