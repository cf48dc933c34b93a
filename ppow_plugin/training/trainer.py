"""The one trainer for both stages: supervised warm start (`ppow sft`) and PPOW (`ppow train`).

    ppow sft   recipes/smollm2/135M_sft.yaml
    ppow train recipes/smollm2/135M_ppow.yaml run.max_steps=20

`Trainer.train()` reads top to bottom: batch -> target pass -> (SFT loss | rollout -> rewards ->
advantages -> PPOW loss) -> backward/step -> log -> checkpoint. Both stages share the engine
(DeepSpeed ZeRO or plain torch), checkpointing, resume and export.

Where we depart from the paper (details in docs/algorithm.md):
1. Two drafter families behind `adapters.ADAPTERS` (`model.drafter_type`): the host's EAGLE-1 drafter
   (features = final hidden states, logits through the target's lm_head) and our EAGLE-3 drafter (the
   paper's; fused layer features, own lm_head over a draft vocabulary, KL/distillation against the
   target restricted to that vocabulary).
2. Window roots are data tokens (teacher forcing), and R_dist's Δ is computed along the drafted prefix.
3. An optional token-level soft-CE to the target on the teacher-forced sequence (loss.distill_weight)
   keeps the drafter anchored on positions no window covers.
"""

from __future__ import annotations

import json
import math
import platform
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

import ppow_plugin
from ppow_plugin import devices, distributed, outputs
from ppow_plugin.config import Config, config_to_dict
from ppow_plugin.data import feature_cache
from ppow_plugin.data.training_set import TrainingData, build_training_samples
from ppow_plugin.drafters import adapters
from ppow_plugin.errors import DiskFull, UserError, is_disk_full
from ppow_plugin.host import eagle_compat
from ppow_plugin.training import checkpoints, plan, rundir
from ppow_plugin.training.ppow_step import PpowStep, updates_per_rollout
from ppow_plugin.training.sft_step import SftStep
from ppow_plugin.training.target_passes import TargetPasses


class Trainer:
    """setup() -> train() -> cleanup(); save_checkpoint() is called by train()."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.out_dir = Path(cfg.run.output_dir)
        self.step = 0
        self.bad_steps = 0

    # ------------------------------------------------------------------------------------------
    # setup
    def setup(self) -> None:
        """Load and check everything; on bad input nothing is left in run.output_dir."""
        cfg = self.cfg
        self.device = distributed.get_device(cfg.dist.device)
        self.dist = distributed.init_process_group(self.device)
        distributed.seed_everything(cfg.dist.seed + self.dist.rank)
        created = self._check_output_dir()
        try:
            self._load()
        except BaseException:
            rundir.remove_created_dirs(self.out_dir, created)
            raise
        if self.dist.is_main:
            self._tidy_run_dir()
            self._write_run_file("data_report.json", json.dumps(self.data_report._asdict(), indent=2) + "\n")

    def _tidy_run_dir(self) -> None:
        """What an interrupted earlier attempt left: its temp dirs, and metrics rows past the resumed step."""
        stale = rundir.remove_stale_temps(self.out_dir)
        if stale:
            print(f"removed what an interrupted run left: {', '.join(stale)}", file=sys.stderr)
        aside = rundir.cut_history(self.out_dir, self.step)
        if aside is not None:
            print(f"{rundir.METRICS_NAME} cut back to step {self.step}; the earlier rows are in {aside.name}",
                  file=sys.stderr)

    def _load(self) -> None:
        cfg = self.cfg
        self.target_dir = _resolve_target(cfg.model.target)
        positions = plan.target_positions(cfg)  # KV cache and rotary tables: what this run reaches, not the context
        self.target = eagle_compat.load_host_target(self.target_dir, distributed.DTYPES[cfg.dist.target_dtype],
                                                    self.device, positions)
        self.kv = eagle_compat.new_kv_cache(self.target, positions)
        self.adapter = adapters.ADAPTERS[cfg.model.drafter_type]  # EAGLE-1 vs EAGLE-3 differences
        samples, self.data_report = build_training_samples(cfg.data, self.target_dir, progress=self.dist.is_main)
        if self.dist.is_main:
            print(f"data: {self.data_report.summary()}", file=sys.stderr)
        drafter = self._build_drafter(samples)
        self.engine = distributed.Engine(drafter, cfg, self.dist)
        self.drafter = self.engine.module
        self.features = self._open_feature_cache()
        self.sft_vocab = self._sft_vocab(samples)
        self.gamma = _resolve_gamma(cfg)
        self.data = TrainingData(samples, seed=cfg.dist.seed, rank=self.dist.rank, world_size=self.dist.world_size)
        self.gen = torch.Generator(device="cpu").manual_seed(cfg.dist.seed * 7919 + self.dist.rank)
        self.tau_probe = None  # simulated τ during training (eval.every_steps; logic in tau_probe.py)
        if cfg.eval.every_steps and self.dist.is_main:
            from ppow_plugin.evaluation import tau_probe
            layers = self.drafter.cfg.feature_layer_ids if cfg.model.drafter_type == "eagle3" else None
            self.tau_probe = tau_probe.TauProbe(cfg, self.target, self.target_dir, cfg.model.drafter_type, layers)
        passes = TargetPasses(cfg, self.adapter, self.target, self.kv, self.features)
        self.stage = (SftStep(cfg, self.adapter, self.drafter, passes, self.gen, self.device, self.sft_vocab)
                      if cfg.stage == "sft" else
                      PpowStep(cfg, self.adapter, self.drafter, self.target, self.kv, passes, self.gen, self.device,
                               self.gamma, self._reference(samples),
                               lambda: adapters.count_loss_tokens(samples, cfg.model.draft_vocab_samples,
                                                                  self.target.config.vocab_size)))
        self.train_s = 0.0  # training seconds of the whole run so far (resumes included; τ-probe time excluded)
        if cfg.run.resume:
            self._resume()

    def _check_output_dir(self) -> Path | None:
        """Refuse to overwrite a run or someone else's files; probe that we can write. Returns the topmost
        dir it created."""
        outputs.check_run_dir(self.out_dir, outputs.run_inputs(self.cfg), self.cfg.run.resume)
        created = next((p for p in reversed([self.out_dir, *self.out_dir.parents]) if not p.exists()), None)
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            probe = self.out_dir / f".write-probe-{self.dist.rank}"
            probe.write_text("ok")
            probe.unlink()
        except OSError as exc:
            rundir.remove_created_dirs(self.out_dir, created)
            raise UserError(f"run.output_dir {self.out_dir} is not writable ({exc.strerror}); choose another") from None
        return created

    def _reference(self, samples) -> torch.nn.Module | None:
        """loss.baseline=reference: the start drafter (model.drafter, read again: step 0's weights on a resume too),
        frozen, in eval mode; None otherwise."""
        if self.cfg.stage != "ppow" or self.cfg.loss.baseline != "reference":
            return None
        return self._build_drafter(samples).eval().requires_grad_(False)

    def _open_feature_cache(self) -> feature_cache.FeatureCache | None:
        """data.feature_cache (SFT; PPOW with rollout.verify=data, `Config`): passes stored once, read back later."""
        cfg = self.cfg
        if not cfg.data.feature_cache:
            return None
        layers = self.drafter.cfg.feature_layer_ids if cfg.model.drafter_type == "eagle3" else None
        place = devices.Placement(self.device, distributed.DTYPES[cfg.dist.target_dtype])  # where the target runs
        return feature_cache.FeatureCache.open(self.target_dir, cfg.model.drafter_type, layers, cfg.data.max_len, place)

    def _sft_vocab(self, samples) -> torch.Tensor | None:
        """sft.vocab_rows: the [N] ids of the most frequent assistant tokens (EAGLE-1's reduced SFT loss)."""
        cfg = self.cfg
        if cfg.sft.vocab_rows is None or cfg.stage != "sft":
            return None
        if cfg.model.drafter_type != "eagle1":
            raise UserError("sft.vocab_rows is for EAGLE-1 drafters; EAGLE-3 has its own draft vocabulary "
                            "(model.draft_vocab_size): unset sft.vocab_rows")
        vocab = self.target.config.vocab_size
        counts = adapters.count_loss_tokens(samples, cfg.model.draft_vocab_samples, vocab)
        return counts.topk(min(cfg.sft.vocab_rows, vocab)).indices.sort().values.to(self.device)

    def _build_drafter(self, samples) -> torch.nn.Module:
        """Fresh (SFT) or warm-started drafter; a fresh EAGLE-3 one gets its draft vocabulary from `samples`."""
        cfg = self.cfg
        if cfg.model.drafter is None and cfg.stage == "ppow":
            raise UserError("PPOW needs a supervised drafter to start from: set model.drafter "
                            "(e.g. the committed assets/drafters/smollm2-135m-eagle1-sft-gen)")
        drafter = self.adapter.build(cfg, self.target, samples, distributed.DTYPES[cfg.dist.dtype])
        return drafter.to(self.device)

    # ------------------------------------------------------------------------------------------
    # train
    def train(self) -> Path:
        cfg = self.cfg
        start_time = time.time()
        probe = self.tau_probe  # rank 0 only; its time (probe.seconds) is measurement, not training
        train_s_before = self.train_s  # run.max_minutes is the run's budget: a resume goes on with what is left
        if probe is not None and self.step == 0:  # the start's τ, the curve's first point
            row = {"step": 0, "train_s": 0.0, **probe.measure(0, self.drafter)}
            self._write_run_file("metrics.jsonl", json.dumps(row) + "\n", mode="a")
        # closed on errors too, so the CLI's `error:` line starts a line of its own
        with _progress(cfg.run.max_steps, self.step, self.dist.is_main) as pbar:
            while self.step < cfg.run.max_steps:
                samples = [self.data.next() for _ in range(cfg.optim.grad_accum * cfg.data.micro_batch)]
                self.engine.set_time(self.train_s)
                stats = self._optimizer_step(samples)
                self.step += 1
                # the ranks' mean: every rank stops at the same step (run.max_minutes) and sets the same lr
                # (optim.decay_over=minutes); one rank breaking alone would leave the others in a collective
                measuring = probe.seconds if probe else 0.0
                self.train_s = distributed.all_reduce_mean(
                    {"train_s": train_s_before + time.time() - start_time - measuring})["train_s"]
                stats.update(step=self.step, lr=self.engine.lr, elapsed_s=time.time() - start_time,
                             train_s=self.train_s, **(self.features.stats() if self.features else {}))
                if probe is not None and probe.due(self.step):
                    stats.update(probe.measure(self.step, self.drafter))
                self._log(stats, pbar)
                if self.step % cfg.run.save_every == 0:
                    self.save_checkpoint()
                if cfg.run.max_minutes is not None and self.train_s > 60 * cfg.run.max_minutes:
                    break
        if self.step % cfg.run.save_every != 0:
            self.save_checkpoint()
        if self.tau_probe is not None:
            self.tau_probe.plot(self.out_dir / "sim_tau.png")
        return self.export_drafter(self.out_dir / "drafter")

    def _optimizer_step(self, samples: list) -> dict[str, float]:
        """grad_accum micro-steps (PPOW: collect rollouts first, then ppo_epochs passes over them, each in
        loss.minibatches updates on a part of every sequence's starts)."""
        ppow = self.cfg.stage == "ppow"
        epochs, parts = (self.cfg.loss.ppo_epochs, self.cfg.loss.minibatches) if ppow else (1, 1)
        if ppow and updates_per_rollout(self.cfg) == 1 and self.cfg.loss.reuse_sampling_pass:
            # one sample at a time, its rollout graph kept for the update (memory of one sample, not grad_accum)
            prepared = (self.stage.prepare(sample, self.step, keep_graph=True) for sample in samples)
        else:
            prepared = [self.stage.prepare(sample, self.step) for sample in samples]  # target pass + rollouts
        totals: dict[str, float] = {}
        for _, m in ((e, m) for e in range(epochs) for m in range(parts)):
            for item in prepared:
                result = self.stage.loss(item, (m, parts)) if ppow else self.stage.loss(item)
                loss = result.loss
                if not torch.isfinite(loss):
                    self._count_bad_step("loss")
                    loss = sum(p.sum() * 0.0 for p in self.drafter.parameters() if p.requires_grad)
                self.engine.backward(loss)
                if self.engine.micro_step % self.engine.grad_accum == 0 and not self.engine.grads_finite():
                    self._count_bad_step("gradient")
                    self.engine.zero_grad()
                self.engine.step()
                for k, v in result.stats.items():
                    totals[k] = totals.get(k, 0.0) + v / (len(samples) * epochs * parts)
        if self.engine.grad_cos is not None:
            totals["grad_cos_prev"] = self.engine.grad_cos
        return distributed.all_reduce_mean(totals)

    def _count_bad_step(self, what: str) -> None:
        self.bad_steps += 1
        if self.bad_steps > self.cfg.run.max_bad_steps:
            raise RuntimeError(f"{self.bad_steps} steps had a non-finite {what}; aborting "
                               "(lower optim.lr, use dist.dtype=fp32, or raise run.max_bad_steps)")

    # ------------------------------------------------------------------------------------------
    # logging, checkpoints, export
    def _log(self, stats: dict[str, float], pbar) -> None:
        if not self.dist.is_main:
            return
        keys = ("loss", "reward", "accept_len", "zero_adv_frac", "r_dist_rate", "kl", "top1_acc", "sim_tau")
        pbar.set_postfix({k: f"{stats[k]:.3g}" for k in keys if k in stats}, refresh=False)
        pbar.update(1)
        if self.step % self.cfg.run.log_every == 0 or "sim_tau" in stats:
            row = json.dumps({k: _jsonable(v) for k, v in stats.items()})
            self._write_run_file("metrics.jsonl", row + "\n", mode="a")

    def _write_run_file(self, name: str, text: str, mode: str = "w") -> None:
        path = self.out_dir / name
        try:
            with open(path, mode) as f:
                f.write(text)
        except OSError as exc:
            if is_disk_full(exc, path):
                raise DiskFull(f"disk full while writing {path}: free space on that disk, then rerun with "
                               "run.resume=true (the checkpoints are intact)") from None
            raise

    def save_checkpoint(self) -> Path:
        return checkpoints.save(self.out_dir, self.step, self.engine, self._trainer_state(), self._meta, self.dist,
                                self.cfg.run.keep_last)

    def _trainer_state(self) -> dict:
        return {"step": self.step, "bad_steps": self.bad_steps, "data": self.data.state_dict(),
                "python_rng": random.getstate(), "numpy_rng": np.random.get_state(),
                "torch_rng": torch.get_rng_state(), "gen": self.gen.get_state(),
                "engine_steps": (self.engine.micro_step, self.engine.opt_step), "train_s": self.train_s}

    def _resume(self) -> None:
        st = checkpoints.load_newest(self.out_dir, self.engine, self.dist.rank)
        if st is None:
            return
        self.step, self.bad_steps = st["step"], st["bad_steps"]
        self.data.load_state_dict(st["data"])
        random.setstate(st["python_rng"])
        np.random.set_state(st["numpy_rng"])
        torch.set_rng_state(st["torch_rng"])
        self.gen.set_state(st["gen"])
        self.engine.micro_step, self.engine.opt_step = st["engine_steps"]
        self.train_s = st.get("train_s", 0.0)  # checkpoints from before it was recorded: the clock restarts
        self.engine._set_lr()

    def _meta(self) -> dict:
        import transformers
        return {"plugin_version": ppow_plugin.__version__, "step": self.step, "stage": self.cfg.stage,
                "config": config_to_dict(self.cfg), "host": eagle_compat.host_version(),
                "torch": torch.__version__, "transformers": transformers.__version__,
                "python": platform.python_version(), "machine": platform.machine(),
                "target": str(self.target_dir), "gamma": self.gamma, "data": self.data_report._asdict()}

    def drafter_state(self) -> dict[str, torch.Tensor]:
        return self.engine.full_state_dict()

    def export_drafter(self, out: Path) -> Path:
        """The drafter in the format it is read back in (EAGLE-1: compact; EAGLE-3: eagle3), by rank 0."""
        state = self.drafter_state()
        if self.dist.is_main:
            try:
                self.adapter.export(out, state, self.drafter, self.target, self.cfg, self._meta())
            except DiskFull:
                kept = "the previous drafter there is unchanged" if out.exists() else "no drafter was written"
                raise DiskFull(f"disk full while writing the drafter to {out}; {kept} and the checkpoints are "
                               "intact: free space on that disk, then rerun with run.resume=true to export "
                               "(or `ppow export <run dir> <dir elsewhere>`)") from None
        distributed.barrier()
        return out

    def cleanup(self) -> None:
        distributed.shutdown()


def _resolve_target(target: str, name: str = "model.target=") -> Path:
    """The target directory `target` names ("default" prepares SmolLM2); `name` is how the user gave it
    ("model.target=" in a recipe, "--target " on the command line)."""
    from ppow_plugin.host import assets
    if target == "default":
        return assets.default_target_dir(prepare=True)
    p = Path(target)
    if not (p / "config.json").is_file():
        raise UserError(f"{name}{target} is not a model directory with config.json; "
                        "use 'default' or a local HF causal-LM directory")
    assets.require_tokenizer(p, name)
    return p


def _resolve_gamma(cfg: Config) -> float:
    if cfg.reward.gamma_profile is None:
        return cfg.reward.gamma
    p = Path(cfg.reward.gamma_profile)
    try:
        gamma = float(json.loads(p.read_text())["gamma"])
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError):
        raise UserError(f"reward.gamma_profile={p} is not a `ppow profile` JSON with a 'gamma' field; "
                        "run `ppow profile` or unset reward.gamma_profile") from None
    if not math.isfinite(gamma) or gamma < 0:
        raise UserError(f"reward.gamma_profile={p} holds gamma={gamma}; re-run `ppow profile`")
    return gamma


def _progress(total: int, initial: int, enabled: bool):
    from tqdm import tqdm
    return tqdm(total=total, initial=initial, disable=not enabled, dynamic_ncols=True, desc="train")


def _jsonable(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def main(cfg: Config) -> Path:
    trainer = Trainer(cfg)
    trainer.setup()
    try:
        return trainer.train()
    finally:
        trainer.cleanup()
