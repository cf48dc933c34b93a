"""Typed run configuration: one YAML recipe -> one `Config`.

    cfg = load_config("recipes/smollm2/135M_ppow.yaml", ["optim.lr=1e-5", "run.max_steps=20"])

Rules:
1. Every knob is a typed dataclass field with a default and a comment; there is no `cfg.get`.
2. Unknown keys are rejected with the nearest valid name (`difflib`), values are type-checked (a float
   must be finite within float32, an int within int64: checked once, for every field, in
   `recipe_file.build`), and each
   dataclass's `__post_init__` checks the range of every one of its fields. All surface as one-line
   `UserError`s.
3. Dotted `section.field=value` overrides go through the same path as the YAML (values parsed as YAML
   scalars, so `run.max_steps=20` is an int and `model.drafter=null` is None).
4. A recipe file must be UTF-8 YAML without duplicate keys and not empty (`recipe_file.read_recipe`).
5. Relative paths in a recipe (model.target, model.drafter, data.path, reward.gamma_profile,
   run.output_dir) resolve against the current working directory; `recipe_file.input_paths` lists the
   absolute paths that `ppow validate` checks.
The PPOW objective's sections (`reward`, `loss`) live in `config_objective.py`, imported here.
Defaults marked [paper] come from PPOW (arXiv 2605.14978) as far as it is known; [default] marks our
own choice where the paper is silent (docs/algorithm.md says why).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ppow_plugin.config_objective import LossCfg, RewardCfg
from ppow_plugin.recipe_file import apply_override, build, read_recipe, require, require_text

Dtype = Literal["fp32", "bf16"]
T_MIN, T_MAX = 0.01, 100.0  # sampling temperatures: logits / T must stay finite in float32
T_RULE = f"in [{T_MIN}, {T_MAX:g}]"
SEED_MAX = 2**32 - 1  # NumPy's seed range, the narrowest of the three RNGs we seed
MAX_LEN_MAX = 1 << 20  # tokens; beyond any target's context
TREE_MAX = {"tree_depth": 64, "tree_top_k": 64, "tree_total_tokens": 1024}  # EAGLE-3's tree is 7 / 10 / 60; a
# bound keeps a typo (--depth 4294967295) from looping or allocating before any prompt is decoded


@dataclass
class ModelCfg:
    target: str = "default"  # local HF causal-LM dir, or "default" = embedded SmolLM2 (`ppow prepare`)
    drafter: str | None = None  # drafter dir to start from; None = fresh random drafter (SFT only)
    drafter_type: Literal["eagle1", "eagle3"] = "eagle1"
    drafter_bias: bool = True  # EAGLE-1 `fc.bias`; LLaMA-3 era drafters use false
    draft_vocab_size: int | None = None  # EAGLE-3 reduced vocabulary; None = full target vocabulary
    draft_vocab_samples: int = 2000  # fresh EAGLE-3: count loss-masked tokens of the first N samples

    def __post_init__(self):
        require_text(self.target, "model.target", "'default' or a model directory", optional=False)
        require_text(self.drafter, "model.drafter", "a drafter directory, or null for a fresh drafter")
        if self.draft_vocab_size is not None:
            require(self.draft_vocab_size >= 1, "model.draft_vocab_size", self.draft_vocab_size,
                     ">= 1 (or null = full)")
            require(self.drafter_type == "eagle3", "model.draft_vocab_size", self.draft_vocab_size,
                     "null for drafter_type=eagle1 (a reduced vocabulary is EAGLE-3 only)")
        require(self.draft_vocab_samples >= 1, "model.draft_vocab_samples", self.draft_vocab_samples, ">= 1")


@dataclass
class DataCfg:
    # jsonl = your own ShareGPT-style records; generated = a `ppow data generate` dir (the target's own answers)
    dataset: Literal["sharegpt", "jsonl", "generated"] = "sharegpt"
    # the .jsonl file (dataset=jsonl), or the generated dir (dataset=generated; null = the dir `ppow data generate`
    # writes with its default settings for model.target)
    path: str | None = None
    max_len: int = 512  # tokens per training sequence (longer ones are truncated)
    num_conversations: int | None = None  # use only the first N train conversations (None = all)
    heldout_fraction: float = 0.02  # share of ShareGPT kept out of training, by stable hash of the id
    micro_batch: int = 1  # sequences per micro-step
    # store each sequence's target pass (fp16) in the asset cache on first use and read it on later epochs instead
    # of running the target (feature_cache.py); false = run the target every time (online). SFT, or PPOW with
    # rollout.verify=data (no tree verification needs the target's KV cache then)
    feature_cache: bool = False

    def __post_init__(self):
        require_text(self.path, "data.path", "a .jsonl file or generated dir, or null")
        if self.dataset == "jsonl":
            require(self.path is not None, "data.path", self.path,
                     "set for data.dataset=jsonl (data.path=<file.jsonl>)")
        elif self.dataset == "sharegpt":
            require(self.path is None, "data.path", self.path,
                     "null for data.dataset=sharegpt (the bundled set); use data.dataset=jsonl to train on the file")
        require(16 <= self.max_len <= MAX_LEN_MAX, "data.max_len", self.max_len, f"in [16, {MAX_LEN_MAX}]")
        if self.num_conversations is not None:
            require(self.num_conversations >= 1, "data.num_conversations", self.num_conversations,
                     ">= 1 (or null = all)")
        require(0.0 <= self.heldout_fraction < 1.0, "data.heldout_fraction", self.heldout_fraction, "in [0, 1)")
        require(self.micro_batch >= 1, "data.micro_batch", self.micro_batch, ">= 1")


@dataclass
class SFTCfg:
    feature_weight: float = 1.0  # EAGLE-1 next-feature SmoothL1 weight
    token_weight: float = 0.1  # EAGLE-1 soft cross-entropy weight
    feature_noise: float = 0.2  # EAGLE-1 only: uniform noise width added to input features (EAGLE-1 uses U(-0.1,0.1)*2)
    ttt_steps: int = 7  # EAGLE-3 training-time-test unroll length
    ttt_decay: float = 0.8  # EAGLE-3 step weight decay^i
    # EAGLE-1 only: soft CE over the N most frequent assistant tokens (first model.draft_vocab_samples samples)
    # plus each sequence's own next tokens, renormalised, instead of the full vocabulary (the 49k-row head is
    # most of a cached SFT step on CPU); None = full vocabulary
    vocab_rows: int | None = None
    # EAGLE-1 only: HASS-style multi-step loss, re-drafting this many more tokens from the drafter's own features
    # at multi_step_starts random trained positions per sequence (0 = off; weights ttt_decay^depth)
    multi_step: int = 0
    multi_step_starts: int = 16
    # feature_weight/token_weight are the EAGLE-1 objective's; EAGLE-3 trains on the TTT soft CE alone

    def __post_init__(self):
        require(self.feature_weight >= 0, "sft.feature_weight", self.feature_weight, ">= 0")
        require(self.token_weight >= 0, "sft.token_weight", self.token_weight, ">= 0")
        if self.feature_weight == 0 and self.token_weight == 0:
            raise ValueError("sft.feature_weight and sft.token_weight are both 0: nothing to train")
        require(self.feature_noise >= 0, "sft.feature_noise", self.feature_noise, ">= 0")
        require(self.ttt_steps >= 1, "sft.ttt_steps", self.ttt_steps, ">= 1")
        require(0 < self.ttt_decay <= 1, "sft.ttt_decay", self.ttt_decay, "in (0, 1]")
        require(self.vocab_rows is None or self.vocab_rows >= 1, "sft.vocab_rows", self.vocab_rows,
                 ">= 1 (or null = full vocabulary)")
        require(self.multi_step >= 0, "sft.multi_step", self.multi_step, ">= 0 (0 = off)")
        require(self.multi_step_starts >= 1, "sft.multi_step_starts", self.multi_step_starts, ">= 1")


@dataclass
class RolloutCfg:
    group_size: int = 8  # G: windows sampled per prefix [paper]
    window: int = 10  # K: draft tokens per window [paper]
    prefixes_per_sequence: int = 4  # windows' prefixes chosen per training sequence by ADAW [default]
    temperature: float = 1.0  # drafter sampling temperature for rollouts [default]
    # target acceptance rule: greedy = T=0 match by a target tree forward; sampling = rejection sampling;
    # data = the T=0 match read off the target's pass over the sequence, no tree forward (data_verify.verify_on_data:
    # the same k wherever the accepted tokens are the data's, as on data.dataset=generated) [default: greedy]
    verify: Literal["greedy", "sampling", "data"] = "greedy"
    verify_temperature: float = 1.0  # target temperature when verify=sampling
    # 1: each group's first window is the drafter's greedy (argmax) window, a member the sampled ones are compared
    # against; off: it did not reduce zero-variance groups in a measurement (docs/algorithm.md) [default]
    greedy_members: int = 0
    # dynamic sampling: redraw (up to this many times) the windows of a prefix whose group rewards are all equal;
    # each redraw costs a drafting pass and a tree verification of those prefixes; 0 = off [default]
    resample_tries: int = 0
    # window starts: adaw = prefixes_per_sequence starts chosen by ADAW, each drafted and verified on its own;
    # all = every assistant position, N = N starts chosen by ADAW, both from one drafter unroll along the data
    # (dense rollouts, training/dense_step.py; needs verify=data) [default: adaw]
    positions: Literal["adaw", "all"] | int = "adaw"

    def __post_init__(self):
        if isinstance(self.positions, int):
            require(self.positions >= 1, "rollout.positions", self.positions, "adaw, all or a count >= 1")
        require(self.group_size >= 2, "rollout.group_size", self.group_size,
                 ">= 2 to compute group-relative advantages")
        require(self.window >= 1, "rollout.window", self.window, ">= 1")
        require(self.prefixes_per_sequence >= 1, "rollout.prefixes_per_sequence", self.prefixes_per_sequence, ">= 1")
        require(T_MIN <= self.temperature <= T_MAX, "rollout.temperature", self.temperature, T_RULE)
        require(T_MIN <= self.verify_temperature <= T_MAX, "rollout.verify_temperature", self.verify_temperature,
                 T_RULE)
        require(self.greedy_members in (0, 1), "rollout.greedy_members", self.greedy_members,
                 "0 or 1: a second greedy window would repeat the first")
        require(self.resample_tries >= 0, "rollout.resample_tries", self.resample_tries, ">= 0 (0 = no redraws)")


@dataclass
class WindowingCfg:
    rule: Literal["top", "sample", "uniform"] = "sample"  # ADAW selection after warm-up [default]
    warmup_steps: int = 10  # uniform selection before ADAW switches on (paper Fig. 4) [default]
    temperature: float = 1.0  # for rule=sample: p ∝ score^(1/temperature)

    def __post_init__(self):
        require(self.warmup_steps >= 0, "windowing.warmup_steps", self.warmup_steps, ">= 0")
        require(T_MIN <= self.temperature <= T_MAX, "windowing.temperature", self.temperature, T_RULE)


@dataclass
class OptimCfg:
    lr: float = 5e-6
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_steps: int = 0
    schedule: Literal["constant", "cosine", "linear"] = "constant"
    # what the decay runs over: `steps` (run.max_steps, reproducible) or `minutes` (the run's training time over
    # run.max_minutes: an equal-wall-time arm ends its decay when its time ends, whatever its step rate)
    decay_over: Literal["steps", "minutes"] = "steps"
    grad_clip: float = 0.5
    grad_accum: int = 1  # micro-steps per optimizer step

    def __post_init__(self):
        require(0 < self.lr <= 1, "optim.lr", self.lr, "in (0, 1]")
        require(0 <= self.weight_decay <= 1, "optim.weight_decay", self.weight_decay, "in [0, 1]")
        require(all(0 <= b < 1 for b in self.betas), "optim.betas", list(self.betas),
                 "two numbers in [0, 1), e.g. [0.9, 0.95]")
        require(self.warmup_steps >= 0, "optim.warmup_steps", self.warmup_steps, ">= 0")
        require(self.grad_clip > 0, "optim.grad_clip", self.grad_clip, "> 0 (max gradient norm)")
        require(self.grad_accum >= 1, "optim.grad_accum", self.grad_accum, ">= 1")


@dataclass
class DistCfg:
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    dtype: Dtype = "fp32"  # drafter compute/parameter dtype
    target_dtype: Dtype = "fp32"  # frozen target; bf16 is 2-4x faster on AMX CPUs
    engine: Literal["deepspeed", "torch"] = "deepspeed"  # torch = plain AdamW, no ZeRO (tests, debugging)
    zero_stage: int = 2
    seed: int = 0

    def __post_init__(self):
        require(_DEVICE.fullmatch(self.device) is not None, "dist.device", self.device,
                 "auto, cpu, cuda, cuda:N or mps")
        require(self.zero_stage in (0, 1, 2, 3), "dist.zero_stage", self.zero_stage, "0, 1, 2 or 3")
        require(0 <= self.seed <= SEED_MAX, "dist.seed", self.seed, f"in [0, {SEED_MAX}]")
        # plain AdamW on bf16 parameters keeps no fp32 master copy: an update below the bf16 spacing of a weight
        # (most of them at lr 5e-6) rounds away; DeepSpeed's bf16 mode keeps fp32 masters (what export writes)
        require(self.engine == "deepspeed" or self.dtype == "fp32", "dist.dtype", self.dtype,
                 "fp32 with dist.engine=torch (it keeps no fp32 master weights, so small bf16 updates round away); "
                 "use dist.engine=deepspeed for bf16 (fp32 masters) or dist.dtype=fp32")
        # ZeRO-0 in bf16 keeps its masters inside DeepSpeed's FP16_Optimizer, where neither the live export nor
        # `ppow export` of a checkpoint reads them (both would write the bf16 copy); ZeRO-1..3 partitions hold them
        require(self.engine == "torch" or self.dtype == "fp32" or self.zero_stage >= 1, "dist.zero_stage",
                 self.zero_stage, ">= 1 with dist.dtype=bf16 (ZeRO-0 keeps the fp32 master weights where no export "
                 "reads them); use dist.zero_stage=2")


_DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


@dataclass
class RunCfg:
    output_dir: str = "runs/default"
    max_steps: int = 100  # optimizer steps
    max_minutes: float | None = None  # stop (and save) after this much training time in the run, resumes included (τ probe not counted)
    log_every: int = 1
    save_every: int = 50
    keep_last: int = 2  # checkpoints kept on disk
    resume: bool = False  # continue from the newest good checkpoint in output_dir
    max_bad_steps: int = 10  # non-finite loss/grad steps skipped before aborting
    # log grad_cos_prev: the cosine of each step's gradient with the previous step's (one sequence each at
    # micro_batch 1: how much two sequences' gradients agree, the step's signal-to-noise; dist.engine=torch)
    grad_cosine: bool = False

    def __post_init__(self):
        require_text(self.output_dir, "run.output_dir", "a directory for the run (e.g. runs/my-run)", optional=False)
        require(self.max_steps >= 1, "run.max_steps", self.max_steps, ">= 1")
        if self.max_minutes is not None:
            require(self.max_minutes > 0, "run.max_minutes", self.max_minutes, "> 0 (or null = no time limit)")
        for name in ("log_every", "save_every", "keep_last"):
            require(getattr(self, name) >= 1, f"run.{name}", getattr(self, name), ">= 1")
        require(self.max_bad_steps >= 0, "run.max_bad_steps", self.max_bad_steps, ">= 0")


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
    # τ during training (tau_probe.py): simulated τ every N optimizer steps (0 = off) on the first
    # every_prompts prompts of each benchmark
    every_steps: int = 0
    every_prompts: int = 8
    # where `ppow eval|compare --recipe` runs the target, drafter and HF baseline (--device/--dtype win):
    # auto = this rank's GPU in bf16 when CUDA is available, else CPU fp32 (devices.resolve_placement).
    # The τ probe during training runs where training runs (dist.device, dist.target_dtype), not here.
    device: str = "auto"            # auto | cpu | cuda | cuda:N
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"

    def __post_init__(self):
        require(_DEVICE.fullmatch(self.device) is not None and self.device != "mps", "eval.device", self.device,
                 "auto, cpu, cuda or cuda:N")
        require(len(self.benchmarks) > 0 and all(b.strip() for b in self.benchmarks), "eval.benchmarks",
                 self.benchmarks, "a non-empty list, e.g. [mt_bench, humaneval, sharegpt]")
        for name in ("num_prompts", "max_new_tokens", "tree_depth", "tree_top_k", "tree_total_tokens", "every_prompts"):
            require(getattr(self, name) >= 1, f"eval.{name}", getattr(self, name), ">= 1")
        for name, top in TREE_MAX.items():
            require(getattr(self, name) <= top, f"eval.{name}", getattr(self, name), f"in [1, {top}]")
        require(self.temperature == 0 or T_MIN <= self.temperature <= T_MAX, "eval.temperature", self.temperature,
                 f"0 (greedy) or {T_RULE}")
        require(0 <= self.seed <= SEED_MAX, "eval.seed", self.seed, f"in [0, {SEED_MAX}]")
        require(self.every_steps >= 0, "eval.every_steps", self.every_steps, ">= 0 (0 = off)")


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

    def __post_init__(self):  # invariants across sections
        if self.run.grad_cosine:
            require(self.dist.engine == "torch", "run.grad_cosine", self.run.grad_cosine,
                     "false unless dist.engine=torch (ZeRO partitions the gradient)")
            require(self.stage != "ppow" or self.loss.ppo_epochs * self.loss.minibatches == 1, "run.grad_cosine",
                     self.run.grad_cosine, "false with several updates per step (loss.ppo_epochs x loss.minibatches "
                     "> 1: consecutive updates read the same sequences)")
        if self.optim.decay_over == "minutes":
            require(self.run.max_minutes is not None, "optim.decay_over", self.optim.decay_over,
                     "steps unless run.max_minutes is set (the minutes the decay runs over)")
        if self.reward.delta_positions is not None:
            require(self.reward.delta_positions <= self.rollout.window, "reward.delta_positions",
                     self.reward.delta_positions, f"<= rollout.window ({self.rollout.window})")
        if self.stage == "ppow" and self.rollout.verify == "data":  # the losses may read window rows 1..k+1 only
            require(self.data.dataset == "generated", "data.dataset", self.data.dataset,
                     "generated for rollout.verify=data (the target's own answers: its choices are the data)")
            require(self.loss.kl_positions == "accepted_prefix", "loss.kl_positions", self.loss.kl_positions,
                     "accepted_prefix for rollout.verify=data (later rows are the data's, not the draft's)")
            require(self.reward.delta_positions == 1, "reward.delta_positions", self.reward.delta_positions,
                     "1 for rollout.verify=data (later rows are the data's, not the draft's)")
        if self.stage == "ppow":
            self._check_data_path()
            require(self.loss.deep_vocab_rows is None or self.model.drafter_type == "eagle1", "loss.deep_vocab_rows",
                     self.loss.deep_vocab_rows, "null for drafter_type=eagle3 (its head is already a draft vocabulary)")
            require(not self.data.feature_cache or self.rollout.verify == "data", "data.feature_cache",
                     self.data.feature_cache, "false for PPOW unless rollout.verify=data (a tree verification "
                     "needs the target's KV cache of the sequence)")

    def _check_data_path(self) -> None:
        """rollout.positions all | N (dense rollouts), loss.estimator=expected and loss.sft_weight need each other."""
        r, lc = self.rollout, self.loss
        if r.positions == "adaw":
            require(lc.minibatches <= r.prefixes_per_sequence, "loss.minibatches", lc.minibatches,
                     f"<= rollout.prefixes_per_sequence ({r.prefixes_per_sequence}): each update takes a part of the starts")
            require(lc.estimator == "sampled", "loss.estimator", lc.estimator,
                     "sampled unless rollout.positions is all or N (the expected reward reads the data-path unroll)")
            require(lc.sft_weight == 0, "loss.sft_weight", lc.sft_weight,
                     "0 unless rollout.positions is all or N (it is computed on the data-path unroll)")
            return
        rule = f"for rollout.positions={r.positions} (windows drawn from one unroll along the data)"
        require(r.verify == "data", "rollout.verify", r.verify, f"data {rule}")
        require(r.greedy_members == 0, "rollout.greedy_members", r.greedy_members, f"0 {rule}")
        require(r.resample_tries == 0, "rollout.resample_tries", r.resample_tries, f"0 {rule}")
        if isinstance(r.positions, int):
            require(lc.minibatches <= r.positions, "loss.minibatches", lc.minibatches,
                     f"<= rollout.positions ({r.positions}): each update takes a part of the starts")


# ----------------------------------------------------------------------------------------------
# Loading


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Read a recipe YAML (or start from defaults when `path` is None) and apply dotted overrides.

    Raises:
        UserError: missing/unreadable/unparsable/empty file, duplicate or unknown key (with suggestion),
            wrong type, non-finite number, value out of range.
    """
    raw = read_recipe(Path(path)) if path is not None else {}
    for item in overrides or []:
        apply_override(raw, item)
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
