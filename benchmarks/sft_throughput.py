"""Assistant tokens per second of `ppow sft` online vs from the feature cache, same sequences, one run.

    PYTHONPATH=. .venv/bin/python benchmarks/sft_throughput.py [--sequences 8] [--data DIR] [--recipe R] \
        [k=v ...]

Target (issue 14): cached ≥ 2.5x online. Two trainers are built from the same recipe (online:
`data.feature_cache=false`; cached: `true`), so they see the same sequences in the same order from the same initial weights. The
cached trainer first fills the cache for those sequences (timed: "fill", one target pass + write each;
the first epoch costs fill + a cached step), then the two run their optimizer steps interleaved sequence by
sequence (so load changes on a shared machine hit both alike), after one warm-up step each. Tokens counted
are loss-masked (assistant) tokens. Both trainers take identical steps, so their losses are compared too
(they differ only by the fp16 rounding of the cached features).
--data DIR trains on a `ppow data generate` dir instead of the recipe's data. Extra k=v are overrides.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch


def build(recipe: str, overrides: list[str], out: str, cached: bool):
    """A set-up Trainer for `recipe` (+ overrides) with the feature cache on or off."""
    from ppow_plugin.training import trainer
    from ppow_plugin.config import load_config

    over = [*overrides, f"data.feature_cache={str(cached).lower()}", "dist.engine=torch", f"run.output_dir={out}",
            "run.max_steps=100000", "optim.grad_accum=1", "data.micro_batch=1"]
    t = trainer.Trainer(load_config(recipe, over))
    t.setup()
    return t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sequences", type=int, default=8)
    ap.add_argument("--recipe", default="recipes/smollm2/135M_eagle1_sft.yaml")
    ap.add_argument("--data", default=None, help="a `ppow data generate` dir (default: the recipe's data)")
    ap.add_argument("--out", default=None, help="write the JSON result here too")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    over = list(args.overrides)
    if args.data:
        over += ["data.dataset=generated", f"data.path={args.data}"]
    from ppow_plugin.data import feature_cache

    with tempfile.TemporaryDirectory() as tmp:
        online = build(args.recipe, over, f"{tmp}/online", False)
        cached = build(args.recipe, over, f"{tmp}/cached", True)
        samples = [online.data.next() for _ in range(args.sequences + 1)]
        assert all(cached.data.next().conversation_id == s.conversation_id for s in samples)
        for s in samples:  # entries an earlier run left for these sequences would make the fill free
            cached.features._path(feature_cache.sample_digest(s.input_ids, s.loss_mask)).unlink(missing_ok=True)
        start = time.perf_counter()
        for s in samples:  # fill: one target pass + write per sequence
            ids = torch.as_tensor(s.input_ids)
            cached.stage.target_passes(cached.drafter, s, ids, torch.zeros_like(torch.as_tensor(s.loss_mask)))
        fill_s = time.perf_counter() - start
        times, loss = {"online": 0.0, "cached": 0.0}, {"online": [], "cached": []}
        for i, s in enumerate(samples):
            for name, t in (("online", online), ("cached", cached)):
                step_start = time.perf_counter()
                loss[name].append(t._optimizer_step([s])["loss"])
                if i > 0:  # the first sequence is warm-up
                    times[name] += time.perf_counter() - step_start
    tokens = sum(int(s.loss_mask.sum()) for s in samples[1:])
    fill_tokens = tokens + int(samples[0].loss_mask.sum())
    rel = max(abs(a - b) / abs(a) for a, b in zip(loss["online"], loss["cached"]))
    result = {"recipe": args.recipe, "overrides": over, "sequences": args.sequences, "assistant_tokens": tokens,
              "online_tokens_per_s": tokens / times["online"], "cached_tokens_per_s": tokens / times["cached"],
              "fill_tokens_per_s": fill_tokens / fill_s, "cached_over_online": times["online"] / times["cached"],
              "cache_hits": cached.features.hits, "max_rel_loss_diff": rel, "target_ratio": 2.5}
    print(json.dumps(result, indent=2))
    print(f"cached/online = {result['cached_over_online']:.2f}x (target >= 2.5x)")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
