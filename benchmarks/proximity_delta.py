"""How often R_dist can fire: the distribution of Δ for k = 0 windows of real rollouts.

    .venv/bin/python benchmarks/proximity_delta.py [--sequences 8] [--drafter DIR] [--recipe YAML] [KEY=VALUE ...]

Runs the trainer's own rollout phase (window selection, G x K sampling, tree verification; no update) on
`--sequences` training sequences and prints, for windows with k = 0, quantiles of Δ summed over the whole
window (the paper's reading) and over the first position only (`reward.delta_positions: 1`), and the
fraction below several ε; then, under the recipe's reward (with the overrides), the share of groups whose
advantages are all 0 and R_dist's firing rate, as the trainer logs them. docs/algorithm.md ("R_dist",
"Groups without variance") quotes runs.
"""

from __future__ import annotations

import argparse
import tempfile

import torch


def main() -> None:
    from ppow_plugin.method import losses, rewards
    from ppow_plugin.training import trainer
    from ppow_plugin.config import load_config

    ap = argparse.ArgumentParser()
    ap.add_argument("--sequences", type=int, default=8)
    ap.add_argument("--drafter", default="assets/drafters/smollm2-135m-eagle1-sft-gen")
    ap.add_argument("--recipe", default="recipes/smollm2/135M_eagle1_ppow.yaml")
    ap.add_argument("overrides", nargs="*", help="dotted recipe overrides, e.g. rollout.greedy_members=0")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(args.recipe, [f"model.drafter={args.drafter}", "dist.engine=torch",
                                        f"run.output_dir={tmp}", *args.overrides])
        t = trainer.Trainer(cfg)
        t.setup()
        whole, first, accept, zero_adv, fired = [], [], [], [], []
        for _ in range(args.sequences):
            ro = t.stage.prepare(t.data.next(), t.step)["rollout"]
            if ro is None:
                continue
            args_ = (ro.target_greedy_logprobs, ro.target_draft_logprobs, ro.valid_mask)
            whole.append(rewards.proximity_delta(*args_).flatten())
            first.append(rewards.proximity_delta(*args_, positions=1).flatten())
            k = rewards.counted_accept_len(ro.accept_len, cfg.reward.accept_cap)
            accept.append(k.flatten())
            delta = rewards.proximity_delta(*args_, positions=cfg.reward.delta_positions)
            rw = rewards.joint_reward(k, delta, t.gamma, cfg.reward.eta, cfg.reward.epsilon,
                                      cfg.reward.speedup_weight, cfg.reward.proximity_weight)
            zero_adv.append((losses.group_advantages(rw.total) == 0).all(dim=1))
            fired.append((rewards.proximity_reward(k, delta, 1.0, cfg.reward.epsilon) > 0).flatten())
    whole_t, first_t, k = torch.cat(whole), torch.cat(first), torch.cat(accept)
    zero = k == 0
    print(f"{k.numel()} windows, {zero.float().mean():.0%} with k = 0, mean k {k.float().mean():.3f} "
          f"(K = {cfg.rollout.window}, greedy members {cfg.rollout.greedy_members}, "
          f"rollout temperature {cfg.rollout.temperature})")
    for name, d in (("whole window", whole_t[zero]), ("first position", first_t[zero])):
        q = [f"{d.quantile(p).item():.1f}" for p in (0.1, 0.25, 0.5, 0.9)]
        below = ", ".join(f"ε={e}: {(d < e).float().mean():.0%}" for e in (2, 3, 4, 5, 10))
        print(f"Δ over {name}: p10/p25/p50/p90 = {'/'.join(q)} nats; Δ < ε for {below}")
    print(f"reward (delta_positions {cfg.reward.delta_positions}, ε {cfg.reward.epsilon}, proximity weight "
          f"{cfg.reward.proximity_weight}): zero-advantage groups {torch.cat(zero_adv).float().mean():.0%}, "
          f"R_dist fires for {torch.cat(fired)[zero].float().mean():.0%} of k = 0 windows")


if __name__ == "__main__":
    main()
