"""Cost and gradient signal of PPOW's estimators, on the same sequences, in one run (issue 27).

    PYTHONPATH=. .venv/bin/python benchmarks/ppow_dense.py RECIPE [--sequences 8] [--threads 1] [--json OUT]
        [--starts N ...] [--starts-deep-vocab] [--no-policy-only] [--set KEY=VALUE ...]

One trainer (the recipe with `rollout.verify=data`, `data.feature_cache=true`, the plain torch engine, and the
--set overrides) computes, for each arm and each of the same --sequences sequences, one step's loss and its
gradient (no optimizer step, so every arm sees the same weights; arms interleaved sequence by sequence):
  today      rollout.positions=adaw: `prefixes_per_sequence` ADAW starts x G windows, drafted and verified each
  dense      rollout.positions=all, loss.estimator=sampled: G windows at every start, from one data-path unroll
  expected   rollout.positions=all, loss.estimator=expected: the exact expected reward at every start
  expected+sft  the same with loss.sft_weight=1 (the SFT loss on the same unroll), at every start, at every
             start with loss.deep_vocab_rows=4096 (depths >= 2 over 4096 frequent tokens plus the sequence's own),
             and at N starts chosen by ADAW (rollout.positions=N) for each N of --starts (default 32), with
             --starts-deep-vocab also with loss.deep_vocab_rows=4096
  sft        the recipe's SFT loss (stage=sft) on the cached target pass: a cached SFT step
Each PPOW arm runs twice: with the recipe's anchors (β·KL, ω·distill) and with the policy term alone
(kl_beta=0, distill_weight=0; --no-policy-only leaves these out). Printed per arm: seconds per sequence
(target pass from the cache, the step's forward and backward), windows per second (windows whose reward the step uses: n·G sampled, n expected), and
the gradient's signal-to-noise over the sequences: the mean pairwise cosine of the per-sequence gradients and
|mean gradient| / mean |gradient| (pure noise: 1/sqrt(sequences)); then every arm's step time over the cached
SFT step's and its windows per second over today's. The cache is filled before timing.
With --draw-noise it runs only the policy-term arms, twice each per sequence, and prints how much two draws
of the same sequence's gradient agree: sampling noise alone, apart from how much sequences differ.
Also counted, in the today arm: windows whose k-th accepted token is not the data's (the mislabelled row k+1
that `dense.rows_on_data` masks).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time


def grad_signal(grads) -> dict:
    """Mean pairwise cosine and |mean| / mean |g| of per-sequence gradient vectors (a list of [P] tensors)."""
    import torch

    g = torch.stack(grads).double()  # [S, P]
    norms = g.norm(dim=1)
    unit = g / norms.clamp_min(1e-30)[:, None]
    cos = unit @ unit.T
    s = g.shape[0]
    pairwise = (cos.sum() - cos.diagonal().sum()) / (s * (s - 1))
    return {"mean_pairwise_cosine": float(pairwise), "mean_norm_ratio": float(g.mean(0).norm() / norms.mean()),
            "noise_ratio": 1 / math.sqrt(s), "mean_grad_norm": float(norms.mean())}


class Arm:
    """One arm's settings (dotted cfg fields set on the live config while it runs) and what it measured."""

    def __init__(self, name: str, settings: dict):
        self.name, self.settings = name, settings
        self.grads, self.seconds, self.windows, self.mislabelled, self.stats = [], 0.0, 0, 0, []

    def _swap(self, cfg, values: dict) -> dict:
        old = {}
        for key, value in values.items():
            section, field = key.split(".") if "." in key else (None, key)
            obj = getattr(cfg, section) if section else cfg
            old[key] = getattr(obj, field)
            setattr(obj, field, value)
        return old

    def step(self, tr, sft_step, sample) -> None:
        """One sequence: the step's loss and backward under this arm's settings (timed), its gradient kept."""
        import torch

        old = self._swap(tr.cfg, self.settings)
        try:
            params = [p for p in tr.drafter.parameters() if p.requires_grad]
            start = time.perf_counter()
            keep = tr.cfg.stage == "ppow" and tr.cfg.rollout.positions == "adaw"
            stage = sft_step if tr.cfg.stage == "sft" else tr.stage
            item = stage.prepare(sample, 0, keep_graph=keep)
            result = stage.loss(item)
            for p in params:
                p.grad = None
            result.loss.backward()
            self.seconds += time.perf_counter() - start
            self.grads.append(torch.cat([p.grad.flatten() for p in params]).detach().clone())
            self.stats.append(result.stats)
            ro = item.get("rollout")
            if ro is not None:
                self.windows += ro.accept_len.numel()
                self.mislabelled += count_mislabelled(item["ids"], ro)
            else:
                self.windows += int(result.stats.get("windows", 0))
        finally:
            self._swap(tr.cfg, old)

    def row(self) -> dict:
        n = len(self.stats)
        means = {k: sum(s.get(k, 0.0) for s in self.stats) / n for k in self.stats[0]}
        row = {"arm": self.name, "settings": {k: str(v) for k, v in self.settings.items()},
               "s_per_sequence": self.seconds / n, "windows_per_sequence": self.windows / n,
               "windows_per_s": self.windows / self.seconds, **grad_signal(self.grads), "stats": means,
               "mislabelled_windows": self.mislabelled}
        print(f"{self.name:52s} {self.seconds / n:7.2f} s/seq {self.windows / self.seconds:9.1f} windows/s "
              f"cos {row['mean_pairwise_cosine']:+.4f} ratio {row['mean_norm_ratio']:.3f} "
              f"(noise {row['noise_ratio']:.3f}) |g| {row['mean_grad_norm']:.3g} "
              f"reward {means.get('reward', float('nan')):.3f} k {means.get('accept_len', float('nan')):.3f} "
              f"greedy k {means.get('greedy_accept_len', float('nan')):.3f}", flush=True)
        return row


def count_mislabelled(ids, ro) -> int:
    """Windows whose k-th accepted token (k >= 1) is not the data token: row k+1 is then not the draft's."""
    import torch

    k = ro.accept_len
    pos = (ro.starts[:, None] + k).clamp(max=ids.numel() - 1)  # index of x_{s+k}
    token = ro.draft_tokens.gather(-1, (k - 1).clamp(min=0)[..., None])[..., 0]
    return int(((k >= 1) & (token != ids[pos])).sum()) if torch.is_tensor(k) else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("recipe")
    ap.add_argument("--sequences", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--set", nargs="*", default=[], help="recipe overrides, KEY=VALUE")
    ap.add_argument("--json", help="also write the figures here")
    ap.add_argument("--draw-noise", action="store_true",
                    help="instead: the policy term of today, dense sampled and expected twice per sequence (two "
                         "draws), and the cosine between the two gradients of each sequence (1 = no sampling noise)")
    ap.add_argument("--starts", type=int, nargs="*", default=[32],
                    help="expected + sft_weight=1 arms at N ADAW starts per sequence (rollout.positions=N), each N")
    ap.add_argument("--starts-deep-vocab", action="store_true",
                    help="also each --starts arm with loss.deep_vocab_rows=4096")
    ap.add_argument("--no-policy-only", action="store_true",
                    help="leave out the policy-term-only arms (their gradient statistics; not the cost targets)")
    args = ap.parse_args()
    if args.sequences < 2:
        print("error: --sequences must be >= 2 (the signal statistics compare sequences)", file=sys.stderr)
        return 2

    import torch

    torch.set_num_threads(args.threads)
    from ppow_plugin import config
    from ppow_plugin.training import trainer
    from ppow_plugin.training.sft_step import SftStep
    from ppow_plugin.training.target_passes import sequence_tensors

    with tempfile.TemporaryDirectory(prefix="ppow-dense-") as out:
        cfg = config.load_config(args.recipe, ["rollout.verify=data", "data.feature_cache=true", "dist.engine=torch",
                                               *args.set, f"run.output_dir={out}/run"])
        if cfg.stage != "ppow":
            print("error: the recipe's stage is not ppow; pass a PPOW recipe", file=sys.stderr)
            return 2
        tr = trainer.Trainer(cfg)
        tr.setup()
        try:
            samples = [tr.data.next() for _ in range(args.sequences)]
            for sample in samples:  # fill the feature cache (a miss runs the target once)
                tr.stage.target_passes(tr.drafter, sample, *sequence_tensors(sample, tr.device))
            sft = SftStep(cfg, tr.adapter, tr.drafter, tr.stage.target_passes, tr.gen, tr.device, None)
            policy_only = {"loss.kl_beta": 0.0, "loss.distill_weight": 0.0}
            dense = {"rollout.positions": "all", "loss.estimator": "sampled"}
            expected = {"rollout.positions": "all", "loss.estimator": "expected"}
            arms = [("today (adaw, sampled)", {}), ("dense sampled (all)", dense), ("expected (all)", expected),
                    ("expected + sft_weight=1", {**expected, "loss.sft_weight": 1.0}),
                    ("expected + sft_weight=1, deep vocab 4096",
                     {**expected, "loss.sft_weight": 1.0, "loss.deep_vocab_rows": 4096}),
                    *[(f"expected ({n} ADAW starts) + sft_weight=1{', deep vocab 4096' if deep else ''}",
                       {**expected, "rollout.positions": n, "loss.sft_weight": 1.0,
                        **({"loss.deep_vocab_rows": 4096} if deep else {})})
                      for n in args.starts for deep in ((False, True) if args.starts_deep_vocab else (False,))],
                    *([] if args.no_policy_only else
                      [("today, policy term only", policy_only),
                       ("dense sampled, policy term only", {**dense, **policy_only}),
                       ("expected, policy term only", {**expected, **policy_only})]),
                    ("sft (cached step)", {"stage": "sft"})]
            if args.draw_noise:
                arms = [(f"{name}, draw {d}", settings) for name, settings in arms if "policy term only" in name
                        for d in (1, 2)]
            arms = [Arm(name, settings) for name, settings in arms]
            for i, sample in enumerate(samples):  # arms interleaved: load changes on the machine hit all alike
                for arm in arms:
                    arm.step(tr, sft, sample)
                print(f"sequence {i + 1}/{len(samples)} done", file=sys.stderr, flush=True)
            rows = [arm.row() for arm in arms]
        finally:
            tr.cleanup()
    if args.draw_noise:
        return report_draw_noise(arms, rows, args)
    by = {r["arm"]: r for r in rows}
    sft_s = by["sft (cached step)"]["s_per_sequence"]
    today = by["today (adaw, sampled)"]["windows_per_s"]
    summary = {"dense_windows_per_s_over_today": by["dense sampled (all)"]["windows_per_s"] / today,
               "expected_windows_per_s_over_today": by["expected (all)"]["windows_per_s"] / today,
               "expected_sft_step_over_cached_sft_step": by["expected + sft_weight=1"]["s_per_sequence"] / sft_s,
               "expected_sft_deep_vocab_step_over_cached_sft_step":
                   by["expected + sft_weight=1, deep vocab 4096"]["s_per_sequence"] / sft_s}
    for k, v in summary.items():
        print(f"{k}: {v:.2f}")
    summary["per_arm"] = {}
    for r in rows:  # every arm: step time over the cached SFT step's, windows per second over today's
        over_sft, over_today = r["s_per_sequence"] / sft_s, r["windows_per_s"] / today
        summary["per_arm"][r["arm"]] = {"step_over_cached_sft_step": over_sft, "windows_per_s_over_today": over_today}
        print(f"{r['arm']:48s} step / cached SFT step {over_sft:6.2f}  windows/s / today's {over_today:6.2f}")
    _write_json(args, rows, summary=summary)
    return 0


def report_draw_noise(arms, rows, args) -> int:
    """Per arm pair (draw 1, draw 2): the mean over sequences of the cosine between the two draws' gradients."""
    import torch

    pairs = {}
    for i in range(0, len(arms), 2):
        a, b = arms[i], arms[i + 1]
        cos = [float(torch.nn.functional.cosine_similarity(x.double(), y.double(), dim=0))
               for x, y in zip(a.grads, b.grads)]
        name = a.name.rsplit(", draw", 1)[0]
        pairs[name] = {"mean_cosine_between_draws": sum(cos) / len(cos), "per_sequence": cos}
        print(f"{name:42s} same sequence, two draws: mean cosine {sum(cos) / len(cos):+.4f}")
    _write_json(args, rows, draw_noise=pairs)
    return 0


def _write_json(args, rows, **results) -> None:
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": " ".join(sys.argv), "sequences": args.sequences, "threads": args.threads,
                       "arms": rows, **results}, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
