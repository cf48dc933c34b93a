"""How often R_dist can fire: the distribution of Δ for k = 0 windows of real rollouts.

    .venv/bin/python benchmarks/proximity_delta.py [--sequences 8] [--drafter DIR] [--recipe YAML]

Runs the trainer's own rollout phase (window selection, G x K sampling, tree verification; no update) on
`--sequences` training sequences and prints, for windows with k = 0, quantiles of Δ summed over the whole
window (the paper's reading) and over the first position only (`reward.delta_positions: 1`), and the
fraction below several ε. docs/algorithm.md ("R_dist") quotes one run.
"""

from __future__ import annotations

import argparse
import tempfile

import torch


def main() -> None:
    from ppow_plugin import rewards, trainer
    from ppow_plugin.config import load_config

    ap = argparse.ArgumentParser()
    ap.add_argument("--sequences", type=int, default=8)
    ap.add_argument("--drafter", default="assets/drafters/smollm2-135m-eagle1-sft")
    ap.add_argument("--recipe", default="recipes/smollm2/135M_eagle1_ppow.yaml")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        t = trainer.Trainer(load_config(args.recipe, [f"model.drafter={args.drafter}", "dist.engine=torch",
                                                      f"run.output_dir={tmp}"]))
        t.setup()
        whole, first, accept = [], [], []
        for _ in range(args.sequences):
            ro = t._prepare(t.data.next())["rollout"]
            if ro is None:
                continue
            args_ = (ro.target_greedy_logprobs, ro.target_draft_logprobs, ro.valid_mask)
            whole.append(rewards.proximity_delta(*args_).flatten())
            first.append(rewards.proximity_delta(*args_, positions=1).flatten())
            accept.append(ro.accept_len.flatten())
    whole_t, first_t, k = torch.cat(whole), torch.cat(first), torch.cat(accept)
    zero = k == 0
    print(f"{k.numel()} windows, {zero.float().mean():.0%} with k = 0 (K = {t.cfg.rollout.window})")
    for name, d in (("whole window", whole_t[zero]), ("first position", first_t[zero])):
        q = [f"{d.quantile(p).item():.1f}" for p in (0.1, 0.5, 0.9)]
        below = ", ".join(f"ε={e}: {(d < e).float().mean():.0%}" for e in (2, 5, 10))
        print(f"Δ over {name}: p10/p50/p90 = {'/'.join(q)} nats; Δ < ε for {below}")


if __name__ == "__main__":
    main()
