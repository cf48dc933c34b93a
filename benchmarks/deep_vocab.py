"""How exact a reduced vocabulary at depths >= 2 of the data-path unroll would be (issue 27's cost), in one run.

    PYTHONPATH=. .venv/bin/python benchmarks/deep_vocab.py RECIPE [--sequences 8] [--rows 1024 4096 16384]
        [--threads 1] [--json OUT] [--set KEY=VALUE ...]

The dense step's time is the drafter's full-vocabulary head at K depths for every start (`benchmarks/ppow_dense.py`,
docs/algorithm.md). A head over N columns C at depths >= 2 (the N most frequent assistant tokens of the first
`model.draft_vocab_samples` samples plus the sequence's own tokens, as `sft.vocab_rows` does for SFT) would cut
that head by V / |C| there, but renormalises q over C. On the recipe's sequences (`rollout.verify=data`, the
feature cache, every start, the recipe's temperature) this prints, per N: the drafter's probability mass
outside C at depths >= 2 (mean and 99th percentile over (start, depth)), and the relative change of the exact
expected reward E[R] (`method/expected.py`) and of its gradient (cosine, relative norm) when depths >= 2 are
renormalised over C; plus the time of the head forward over V and over C columns on the same rows, measured
here. No optimizer step; nothing is built into the trainer.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("recipe")
    ap.add_argument("--sequences", type=int, default=8)
    ap.add_argument("--rows", type=int, nargs="+", default=[1024, 4096, 16384])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--set", nargs="*", default=[], help="recipe overrides, KEY=VALUE")
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args()

    import torch
    import torch.nn.functional as F

    torch.set_num_threads(args.threads)
    from ppow_plugin import config
    from ppow_plugin.drafters import adapters
    from ppow_plugin.method import dense, expected
    from ppow_plugin.training import trainer
    from ppow_plugin.training.target_passes import sequence_tensors

    with tempfile.TemporaryDirectory(prefix="deep-vocab-") as out:
        cfg = config.load_config(args.recipe, ["rollout.verify=data", "data.feature_cache=true", "dist.engine=torch",
                                               "rollout.positions=all", *args.set, f"run.output_dir={out}/run"])
        if cfg.model.drafter_type != "eagle1":
            print("error: this measures the EAGLE-1 head (the full target vocabulary); pass an eagle1 recipe",
                  file=sys.stderr)
            return 2
        tr = trainer.Trainer(cfg)
        tr.setup()
        try:
            V = tr.target.config.vocab_size
            counts = adapters.count_loss_tokens(tr.data.samples, cfg.model.draft_vocab_samples, V)
            rank = counts.argsort(descending=True)
            acc = {n: {"mass": [], "er": [], "cos": [], "norm": [], "t_full": 0.0, "t_cols": 0.0} for n in args.rows}
            for i in range(args.sequences):
                sample = tr.data.next()
                ids, valid = sequence_tensors(sample, tr.device)
                tpass = tr.stage.target_passes(tr.drafter, sample, ids, valid)
                starts = dense.valid_starts(valid)
                with torch.no_grad():
                    dpass, draft_logits = tr.adapter.teacher_forced(tr.drafter, tr.target, tpass.features, ids)
                    path = tr.adapter.data_path(tr.drafter, tr.target, dpass, draft_logits, tpass, ids, valid, starts,
                                                cfg.rollout.window, cfg, sft=False)
                logits = path.logits.detach()  # [n, K, V]
                K = logits.shape[1]
                last = ids.numel() - 1
                pos = starts[:, None] + torch.arange(K)
                greedy = torch.where(pos <= last, tpass.logits.argmax(-1)[pos.clamp(max=last)], -1)
                data, exists = dense.data_tokens(ids, starts, K)
                data = torch.where(exists, data, -1)
                near = expected.near_first_mask(tpass.logits[starts], torch.arange(V), cfg.reward.epsilon)
                rc = cfg.reward

                def reward(z):  # E[R] summed over starts, and its gradient w.r.t. the logits
                    z = z.clone().requires_grad_()
                    logp = F.log_softmax(z / cfg.rollout.temperature, -1)
                    total = expected.expected_reward(logp, data, greedy, near, tr.gamma, rc.eta, rc.accept_cap,
                                                     rc.speedup_weight, rc.proximity_weight).total.sum()
                    total.backward()
                    return float(total.detach()), z.grad.flatten()

                full_r, full_g = reward(logits)
                q = F.softmax(logits[:, 1:] / cfg.rollout.temperature, -1)  # depths >= 2
                hidden = torch.randn(logits.shape[0] * (K - 1), tr.target.lm_head.weight.shape[1])
                for n in args.rows:
                    cols = torch.unique(torch.cat([rank[:n], ids]))
                    inside = torch.zeros(V, dtype=torch.bool)
                    inside[cols] = True
                    acc[n]["mass"].append((1 - q[..., inside].sum(-1)).flatten())
                    cut = logits.clone()
                    cut[:, 1:, ~inside] = -torch.inf
                    r, g = reward(cut)
                    acc[n]["er"].append(abs(r - full_r) / abs(full_r))
                    acc[n]["cos"].append(float(F.cosine_similarity(g, full_g, dim=0)))
                    acc[n]["norm"].append(float(g.norm() / full_g.norm()))
                    with torch.no_grad():  # the head forward on the depth >= 2 rows: all V columns vs C's
                        t0 = time.perf_counter()
                        tr.target.lm_head(hidden)
                        t1 = time.perf_counter()
                        hidden @ tr.target.lm_head.weight[cols].T
                        t2 = time.perf_counter()
                    acc[n]["t_full"] += t1 - t0
                    acc[n]["t_cols"] += t2 - t1
                print(f"sequence {i + 1}/{args.sequences}: {starts.numel()} starts", file=sys.stderr, flush=True)
        finally:
            tr.cleanup()
    rows = []
    for n, a in acc.items():
        mass = torch.cat(a["mass"])
        row = {"rows": n, "mass_outside_mean": float(mass.mean()), "mass_outside_p99": float(mass.quantile(0.99)),
               "expected_reward_rel_change": sum(a["er"]) / len(a["er"]),
               "gradient_cosine": sum(a["cos"]) / len(a["cos"]), "gradient_norm_ratio": sum(a["norm"]) / len(a["norm"]),
               "head_time_full_over_cols": a["t_full"] / a["t_cols"]}
        rows.append(row)
        print(f"N={n:6d}: mass outside C at depths >= 2 mean {row['mass_outside_mean']:.4f} "
              f"p99 {row['mass_outside_p99']:.4f}; E[R] rel. change {row['expected_reward_rel_change']:.4f}; "
              f"gradient cosine {row['gradient_cosine']:.4f}, norm ratio {row['gradient_norm_ratio']:.3f}; "
              f"head forward full / C {row['head_time_full_over_cols']:.1f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": " ".join(sys.argv), "sequences": args.sequences, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
