"""The one trainer for both stages: supervised warm start (`ppow sft`) and PPOW (`ppow train`).

    ppow sft   recipes/smollm2/135M_sft.yaml
    ppow train recipes/smollm2/135M_ppow.yaml run.max_steps=20

`Trainer.train()` reads top to bottom: batch -> target pass -> (SFT loss | rollout -> rewards ->
advantages -> PPOW loss) -> backward/step -> log -> checkpoint. Both stages share the engine
(DeepSpeed ZeRO or plain torch), checkpointing, resume and export.

Where we depart from the paper (details in docs/algorithm.md):
1. Two drafter families behind `drafters.ADAPTERS` (`model.drafter_type`): the host's EAGLE-1 drafter
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
import shutil
import sys
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

import ppow_plugin
from ppow_plugin import (dense, dense_step, distributed, drafter_source, drafters, eagle_compat, export, feature_cache,
                         losses, outputs, rewards, rollout, rundir, windowing)
from ppow_plugin.config import Config, config_to_dict
from ppow_plugin.data import TrainingData, build_training_samples
from ppow_plugin.errors import DiskFull, UserError, is_disk_full


class PolicyPass(NamedTuple):
    """The drafter's passes of `_prepare`, with their autograd graphs, reused by the PPOW update."""

    dpass: rollout.DraftPass    # teacher-forced pass of the sequence
    draft_logits: torch.Tensor  # [T-1, Vd] fp32
    logprobs: torch.Tensor | None  # [n, G, K] of the sampled windows (None: no window selected)
    logits: torch.Tensor | None    # [n, G, K, Vd]


class StepResult(NamedTuple):
    loss: torch.Tensor  # scalar, with grad
    stats: dict[str, float]  # detached scalars for logging


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
        self.target = eagle_compat.load_host_target(self.target_dir, distributed.DTYPES[cfg.dist.target_dtype])
        self.target.to(self.device)
        self.kv = eagle_compat.new_kv_cache(self.target)
        self.adapter = drafters.ADAPTERS[cfg.model.drafter_type]  # EAGLE-1 vs EAGLE-3 differences
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
            from ppow_plugin import tau_probe
            layers = self.drafter.cfg.feature_layer_ids if cfg.model.drafter_type == "eagle3" else None
            self.tau_probe = tau_probe.TauProbe(cfg, self.target, self.target_dir, cfg.model.drafter_type, layers)
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

    def _open_feature_cache(self) -> feature_cache.FeatureCache | None:
        """data.feature_cache (SFT; PPOW with rollout.verify=data, `Config`): passes stored once, read back later."""
        cfg = self.cfg
        if not cfg.data.feature_cache:
            return None
        layers = self.drafter.cfg.feature_layer_ids if cfg.model.drafter_type == "eagle3" else None
        return feature_cache.FeatureCache.open(self.target_dir, cfg.model.drafter_type, layers, cfg.data.max_len)

    def _sft_vocab(self, samples) -> torch.Tensor | None:
        """sft.vocab_rows: the [N] ids of the most frequent assistant tokens (EAGLE-1's reduced SFT loss)."""
        cfg = self.cfg
        if cfg.sft.vocab_rows is None or cfg.stage != "sft":
            return None
        if cfg.model.drafter_type != "eagle1":
            raise UserError("sft.vocab_rows is for EAGLE-1 drafters; EAGLE-3 has its own draft vocabulary "
                            "(model.draft_vocab_size): unset sft.vocab_rows")
        vocab = self.target.config.vocab_size
        counts = drafters.count_loss_tokens(samples, cfg.model.draft_vocab_samples, vocab)
        return counts.topk(min(cfg.sft.vocab_rows, vocab)).indices.sort().values.to(self.device)

    def _build_drafter(self, samples) -> torch.nn.Module:
        """Fresh (SFT) or warm-started drafter; a fresh EAGLE-3 one gets its draft vocabulary from `samples`."""
        cfg = self.cfg
        if cfg.model.drafter is None and cfg.stage == "ppow":
            raise UserError("PPOW needs a supervised drafter to start from: set model.drafter "
                            "(e.g. the committed assets/drafters/smollm2-135m-eagle1-sft)")
        drafter = self.adapter.build(cfg, self.target, samples, distributed.DTYPES[cfg.dist.dtype])
        return drafter.to(self.device)

    # ------------------------------------------------------------------------------------------
    # train
    def train(self) -> Path:
        cfg = self.cfg
        start_time = time.time()
        probe_s = 0.0  # τ-probe time: measurement, not training, so run.max_minutes does not count it
        # closed on errors too, so the CLI's `error:` line starts a line of its own
        with _progress(cfg.run.max_steps, self.step, self.dist.is_main) as pbar:
            while self.step < cfg.run.max_steps:
                samples = [self.data.next() for _ in range(cfg.optim.grad_accum * cfg.data.micro_batch)]
                stats = self._optimizer_step(samples)
                self.step += 1
                stats.update(step=self.step, lr=self.engine.lr, elapsed_s=time.time() - start_time,
                             **(self.features.stats() if self.features else {}))
                if self.tau_probe is not None and self.tau_probe.due(self.step):
                    probe_start = time.time()
                    stats["sim_tau"] = self.tau_probe.measure(self.step, self.drafter)
                    probe_s += time.time() - probe_start
                    stats["probe_s"] = probe_s
                self._log(stats, pbar)
                if self.step % cfg.run.save_every == 0:
                    self.save_checkpoint()
                if cfg.run.max_minutes is not None and time.time() - start_time - probe_s > 60 * cfg.run.max_minutes:
                    break
        if self.step % cfg.run.save_every != 0:
            self.save_checkpoint()
        if self.tau_probe is not None:
            self.tau_probe.plot(self.out_dir / "sim_tau.png")
        return self.export_drafter(self.out_dir / "drafter")

    def _optimizer_step(self, samples: list) -> dict[str, float]:
        """grad_accum micro-steps (PPOW: collect rollouts first, then ppo_epochs updates on them)."""
        epochs = self.cfg.loss.ppo_epochs if self.cfg.stage == "ppow" else 1
        if self.cfg.stage == "ppow" and epochs == 1 and self.cfg.loss.reuse_sampling_pass:
            # one sample at a time, its rollout graph kept for the update (memory of one sample, not grad_accum)
            prepared = (self._prepare(sample, keep_graph=True) for sample in samples)
        else:
            prepared = [self._prepare(sample) for sample in samples]  # target pass + rollouts (no grad)
        totals: dict[str, float] = {}
        for _ in range(epochs):
            for item in prepared:
                result = self._sft_loss(item) if self.cfg.stage == "sft" else self._ppow_loss(item)
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
                    totals[k] = totals.get(k, 0.0) + v / (len(samples) * epochs)
        return distributed.all_reduce_mean(totals)

    def _count_bad_step(self, what: str) -> None:
        self.bad_steps += 1
        if self.bad_steps > self.cfg.run.max_bad_steps:
            raise RuntimeError(f"{self.bad_steps} steps had a non-finite {what}; aborting "
                               "(lower optim.lr, use dist.dtype=fp32, or raise run.max_bad_steps)")

    # ------------------------------------------------------------------------------------------
    # phases
    def _prepare(self, sample, keep_graph: bool = False) -> dict:
        """Target pass (fills the KV cache) and, for PPOW, window selection + rollouts + verification.

        keep_graph: run the drafter's teacher-forced and sampling passes with gradients and keep them as
        `item["policy"]` for `_ppow_loss` (valid while the policy is unchanged, i.e. ppo_epochs = 1).
        """
        ids = torch.as_tensor(sample.input_ids, dtype=torch.long, device=self.device)
        mask = torch.as_tensor(sample.loss_mask, dtype=torch.bool, device=self.device)
        # aligned[i] for i in 1..T-1: position i predicts x_{i+1}; train where x_{i+1} is assistant text.
        valid = torch.zeros_like(mask)
        valid[1:-1] = mask[2:]
        tpass = self._target_pass(sample, ids, valid)
        item = {"ids": ids, "valid": valid, "tpass": tpass, "policy": None, "sft_vocab": self.sft_vocab}
        if self.cfg.stage == "sft" or dense_step.uses_data_path(self.cfg):  # the data path: all in the loss
            return item
        drafter_pass = torch.enable_grad if keep_graph else torch.no_grad
        with drafter_pass():
            feats = tpass.features.to(distributed.DTYPES[self.cfg.dist.dtype])
            dpass, draft_logits = self.adapter.teacher_forced(self.drafter, self.target, feats, ids)
        with torch.no_grad():
            target_logits = self.adapter.restrict(self.drafter, tpass.logits[1:])  # [T-1, Vd] like draft_logits
            pos = windowing.position_scores(target_logits[None], draft_logits.detach()[None])[0]  # i = 1..T-1
            pos_scores = torch.cat([pos.new_zeros(1), pos])  # [T], index = position
            scores = windowing.window_scores(pos_scores[None], valid[None], self.cfg.rollout.window)
            rule = windowing.adaw_rule_for_step(self.step, self.cfg.windowing.warmup_steps, self.cfg.windowing.rule)
            sel = windowing.select_windows(scores, self.cfg.rollout.prefixes_per_sequence, rule, self.gen,
                                           self.cfg.windowing.temperature)
            starts = sel.starts[0][sel.valid_mask[0]]
            item["window_score"] = windowing.score_summary(scores, torch.isfinite(scores))
        if starts.numel() == 0:
            item["rollout"] = None
            item["policy"] = PolicyPass(dpass, draft_logits, None, None) if keep_graph else None
            return item
        drawn = self._draw(ids, tpass.logits, dpass, starts, drafter_pass)
        valid_windows = torch.ones_like(drawn.tokens, dtype=torch.bool)
        if self.cfg.rollout.verify == "data":  # no target rows past the sequence's end
            valid_windows = rollout.on_sequence_mask(ids.numel(), starts, *drawn.tokens.shape[1:])

        def flat_groups(d: rollout.Drawn) -> torch.Tensor:  # [n] True: every window of the group earns the same
            rw = self._window_rewards(d.accept_len, d.target_greedy_lp, d.target_draft_lp, valid_windows)[2]
            return (losses.group_advantages(rw.total) == 0).all(dim=1)

        drawn, item["redrawn"] = rollout.redraw_flat_groups(  # dynamic sampling (rollout.resample_tries)
            drawn, starts, lambda s: self._draw(ids, tpass.logits, dpass, s, drafter_pass), flat_groups,
            self.cfg.rollout.resample_tries)
        if self.cfg.rollout.verify == "data":  # row k+1 after an accepted token that is not the data's: not read
            valid_windows = dense.rows_on_data(ids, starts, self.adapter.to_target_ids(self.drafter, drawn.tokens))
        item["rollout"] = rollout.Rollout(starts, drawn.tokens, drawn.logprobs.detach(), drawn.accept_len,
                                          drawn.target_logits, drawn.target_draft_lp, drawn.target_greedy_lp,
                                          valid_windows)
        if keep_graph:
            item["policy"] = PolicyPass(dpass, draft_logits, drawn.logprobs, drawn.logits)
        return item

    def _draw(self, ids, sequence_logits, dpass, starts, drafter_pass) -> rollout.Drawn:
        """G windows from each start, drafted (under `drafter_pass`: enable_grad keeps the graph) and verified."""
        r = self.cfg.rollout
        with drafter_pass():
            tokens, logprobs, logits = self.adapter.draft_windows(self.drafter, self.target, dpass, starts, r,
                                                                  generator=self.gen)  # drafter-vocabulary ids
        target_ids = self.adapter.to_target_ids(self.drafter, tokens)
        with torch.no_grad():
            if r.verify == "data":
                verified = rollout.verify_on_data(ids, sequence_logits, starts, target_ids)
            else:
                verified = rollout.verify_windows(
                    self.target, self.kv, ids, starts, target_ids, r.verify, r.verify_temperature,
                    rollout.proposal_logprobs(logprobs, r.greedy_members), self.gen)
        return rollout.Drawn(tokens, logprobs, logits, *verified)

    def _window_rewards(self, accept_len, greedy_lp, draft_lp, valid) -> tuple:
        """-> (k as decoding counts it [n, G], Δ [n, G], RewardBreakdown) under the recipe's reward."""
        rc = self.cfg.reward
        accept = rewards.counted_accept_len(accept_len, rc.accept_cap)
        delta = rewards.proximity_delta(greedy_lp, draft_lp, valid, rc.delta_positions)
        return accept, delta, rewards.joint_reward(accept, delta, self.gamma, rc.eta, rc.epsilon, rc.speedup_weight,
                                                   rc.proximity_weight)

    def _target_pass(self, sample, ids: torch.Tensor, valid: torch.Tensor) -> rollout.TargetPass:
        """The target's pass over one sequence, from the feature cache when it is on (no target layer runs).

        A miss runs the target, stores the pass and then uses its fp16-rounded copy, so a step computes the same
        whether its sequence was cached before or not (resume stays bit-exact). Cached SFT passes carry logits
        only at `valid` positions (the only ones SFT reads), or none when the adapter's SFT loss recomputes them;
        PPOW reads every row (windows, ADAW, `rollout.verify_on_data`)."""
        if self.cfg.stage == "ppow":
            rows = None
        else:
            rows = valid if self.adapter.sft_reads_target_logits else torch.zeros_like(valid)
        if self.features is not None:
            cached = self.features.get(sample, self.target.lm_head, rows)
            if cached is not None:
                return cached
        eagle_compat.reset_kv(self.kv)
        tpass = self.adapter.target_pass(self.drafter, self.target, ids, self.kv)
        if self.features is None:
            return tpass
        self.features.put(sample, tpass)
        return feature_cache.cached_target_pass(tpass.features.half(), tpass.hidden.half(), self.target.lm_head, rows)

    def _sft_loss(self, item: dict) -> StepResult:
        """EAGLE-1: next-feature SmoothL1 + soft CE on noised features; EAGLE-3: training-time test."""
        return StepResult(*self.adapter.sft_loss(self.drafter, self.target, item, self.cfg, self.gen))

    def _ppow_loss(self, item: dict) -> StepResult:
        if dense_step.uses_data_path(self.cfg):  # rollout.positions all | N: windows from one unroll along the data
            return StepResult(*dense_step.data_path_loss(self.adapter, self.drafter, self.target, item, self.cfg,
                                                         self.gamma, self.gen, self.step))
        cfg, tpass, ids, ro, kept = self.cfg, item["tpass"], item["ids"], item["rollout"], item["policy"]
        if kept is not None:  # the graphs of _prepare's passes (keep_graph)
            dpass, draft_logits = kept.dpass, kept.draft_logits
        else:
            feats = tpass.features.to(distributed.DTYPES[cfg.dist.dtype])
            dpass, draft_logits = self.adapter.teacher_forced(self.drafter, self.target, feats, ids)  # with grad
        target_logits = self.adapter.restrict(self.drafter, tpass.logits[1:])  # EAGLE-3: over the draft vocabulary
        distill, _ = losses.distill_loss(target_logits, draft_logits, item["valid"][1:])
        if ro is None:  # no assistant position to draft from: distillation only
            return StepResult(cfg.loss.distill_weight * distill, {"distill": float(distill.detach())})
        r = cfg.rollout
        if kept is not None:
            new_lp, new_logits = kept.logprobs, kept.logits
        else:  # re-score the sampled windows under the current policy
            _, new_lp, new_logits = self.adapter.draft_windows(self.drafter, self.target, dpass, ro.starts, r,
                                                               tokens=ro.draft_tokens)
        rc = cfg.reward
        accept, delta, rw = self._window_rewards(ro.accept_len, ro.target_greedy_logprobs, ro.target_draft_logprobs,
                                                 ro.valid_mask)  # accept: what decoding can accept
        adv = losses.group_advantages(rw.total, scale=cfg.loss.advantage_scale)
        delta_len = rc.delta_positions or r.window
        credited = losses.credit_mask(accept, ro.valid_mask, cfg.loss.credit, delta_len, rc.accept_cap, adv)
        pol, pst = losses.policy_loss(new_lp, ro.old_logprobs, adv, credited, cfg.loss.clip_eps, cfg.loss.ratio_mode)
        V = new_logits.shape[-1]
        ro_target_logits = self.adapter.restrict(self.drafter, ro.target_logits)  # [n, G, K, Vd]
        kl_mask = losses.credit_mask(accept, ro.valid_mask, cfg.loss.kl_positions, delta_len, rc.accept_cap)
        kl, _ = losses.target_kl_loss(ro_target_logits.reshape(-1, V), new_logits.reshape(-1, V),
                                      kl_mask.reshape(-1), cfg.loss.kl_direction)
        loss = pol + cfg.loss.kl_beta * kl + cfg.loss.distill_weight * distill
        stats = {"loss": float(loss.detach()), "policy_loss": float(pol.detach()), "kl": float(kl.detach()),
                 "distill": float(distill.detach()), "clip_frac": float(pst.clip_fraction),
                 "ratio": float(pst.ratio_mean), "window_score_mean": item["window_score"].get("mean", float("nan")),
                 "redrawn_per_prefix": item["redrawn"] / ro.starts.numel()}
        return StepResult(loss, stats | _window_stats(ro.accept_len, accept, delta, rw, adv, credited, rc.epsilon))

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
        """Atomic checkpoint dir with engine state, trainer state (RNG, data position) and meta.json.

        Written as `step-N.tmp` and renamed when complete; if a write fails (e.g. the disk is full) the
        `.tmp` dir is removed, older checkpoints are untouched and a full disk is a one-line `DiskFull`.
        """
        final = self.out_dir / "checkpoints" / f"step-{self.step:06d}"
        tmp = final.with_name(final.name + ".tmp")
        try:
            if self.dist.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
            distributed.barrier()
            self.engine.save(tmp)
            # Per rank: data position and RNG streams differ between ranks.
            torch.save(self._trainer_state(), tmp / f"trainer_state_rank{self.dist.rank}.pt")
            distributed.barrier()
            if self.dist.is_main:
                meta = self._meta() | {"files": {p.relative_to(tmp).as_posix(): export.sha256_file(p)
                                                 for p in sorted(tmp.rglob("*")) if p.is_file()}}
                (tmp / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        except Exception as exc:
            full = is_disk_full(exc, tmp)  # before the partial files are deleted
            shutil.rmtree(tmp, ignore_errors=True)
            if not full:
                raise
            older = sorted(p.name for p in final.parent.glob("step-??????") if p != final)
            kept = f"{older[-1]} is intact" if older else "there is no earlier checkpoint"
            raise DiskFull(f"disk full while writing checkpoint {final.name} in {final.parent}; the partial copy "
                           f"was removed and {kept}: free space on that disk (or move the run to a bigger one "
                           "and point run.output_dir there), then rerun with run.resume=true") from None
        if self.dist.is_main:
            export.replace_dir(tmp, final)
            self._rotate_checkpoints()
        distributed.barrier()
        return final

    def _rotate_checkpoints(self) -> None:
        ckpts = sorted((self.out_dir / "checkpoints").glob("step-??????"))
        for old in ckpts[:-self.cfg.run.keep_last]:
            shutil.rmtree(old, ignore_errors=True)

    def _trainer_state(self) -> dict:
        return {"step": self.step, "bad_steps": self.bad_steps, "data": self.data.state_dict(),
                "python_rng": random.getstate(), "numpy_rng": np.random.get_state(),
                "torch_rng": torch.get_rng_state(), "gen": self.gen.get_state(),
                "engine_steps": (self.engine.micro_step, self.engine.opt_step)}

    def _resume(self) -> None:
        for ckpt in sorted((self.out_dir / "checkpoints").glob("step-??????"), reverse=True):
            problem = drafter_source.checkpoint_problem(ckpt)
            if problem:
                print(f"warning: skipping checkpoint {ckpt.name}: {problem}", file=sys.stderr)
                continue
            self.engine.load(ckpt)
            st = torch.load(ckpt / f"trainer_state_rank{self.dist.rank}.pt", map_location="cpu", weights_only=False)
            self.step, self.bad_steps = st["step"], st["bad_steps"]
            self.data.load_state_dict(st["data"])
            random.setstate(st["python_rng"])
            np.random.set_state(st["numpy_rng"])
            torch.set_rng_state(st["torch_rng"])
            self.gen.set_state(st["gen"])
            self.engine.micro_step, self.engine.opt_step = st["engine_steps"]
            self.engine._set_lr()
            print(f"resumed from {ckpt} at step {self.step}", file=sys.stderr)
            return
        print(f"no usable checkpoint in {self.out_dir / 'checkpoints'}; starting fresh", file=sys.stderr)

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


def _window_stats(raw_accept, accept, delta, rw, adv, credited, epsilon: float) -> dict[str, float]:
    """Per-step window metrics (metrics.jsonl): reward parts, k, and how much signal the groups carry.

    zero_adv_frac: share of groups whose advantages are all 0 (no policy gradient from them);
    r_dist_rate: share of k = 0 windows with Δ < ε (where R_dist fires, whatever its weight);
    credit_frac: share of window tokens that carry the advantage (loss.credit).
    """
    k = accept.float()
    rejected = accept == 0
    fires = rewards.proximity_reward(accept, delta, 1.0, epsilon) > 0
    return {"reward": float(rw.total.mean()), "r_speedup": float(rw.speedup.mean()),
            "r_proximity": float(rw.proximity.mean()), "accept_len": float(k.mean()),
            "accept_len_raw": float(raw_accept.float().mean()), "tau_est": float(k.mean() + 1.0),
            "zero_accept_frac": float(rejected.float().mean()),
            "zero_adv_frac": float((adv == 0).all(dim=1).float().mean()),
            "r_dist_rate": float(fires.sum() / rejected.sum().clamp_min(1)),
            "credit_frac": float(credited.float().mean())}


def _resolve_target(target: str) -> Path:
    if target == "default":
        from ppow_plugin import assets
        return assets.default_target_dir(prepare=True)
    p = Path(target)
    if not (p / "config.json").is_file():
        raise UserError(f"model.target={target} is not a model directory with config.json; "
                        "use 'default' or a local HF causal-LM directory")
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
