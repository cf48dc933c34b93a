"""Simulated vs real evaluation: the same drafter and prompts through `ppow eval` and `ppow eval --simulate`.

    python benchmarks/eval_speed.py --drafter assets/drafters/smollm2-135m-eagle1-sft-gen --num-prompts 80 \
        --max-new-tokens 128 [--benchmarks mt_bench] [--out eval_speed.json]

Prints: the one-time cost of building the greedy-continuation cache (generation + target features), the wall
time of the simulated evaluation with a warm cache and of real decoding (`evaluate`, EAGLE + the HF baseline,
as `ppow eval` runs it; the EAGLE-only share is printed too), their ratio, both τ, and how many prompts
have identical cycles in both (exactness). Target (issue 13): simulation >= 20x faster than real decoding.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from ppow_plugin.data import continuations
from ppow_plugin.evaluation import evaluate, inputs
from ppow_plugin.host import assets


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--drafter", default="assets/drafters/smollm2-135m-eagle1-sft-gen")
    ap.add_argument("--target", default="default")
    ap.add_argument("--benchmarks", default="mt_bench")
    ap.add_argument("--num-prompts", type=int, default=80)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--fresh-cache", action="store_true", help="delete this target's continuation cache first")
    ap.add_argument("--out", default=None, help="also write the figures as JSON here")
    args = ap.parse_args()
    target_dir = inputs.resolve_target(args.target)
    if args.fresh_cache:
        shutil.rmtree(assets.cache_dir() / "simulate" / continuations.target_fingerprint(target_dir),
                      ignore_errors=True)
    common = dict(benchmarks=args.benchmarks, num_prompts=args.num_prompts, max_new_tokens=args.max_new_tokens,
                  progress=True)
    start = time.perf_counter()
    first = evaluate.evaluate(target_dir, args.drafter, simulate=True, **common)  # builds what is missing
    first_s = time.perf_counter() - start
    start = time.perf_counter()
    sim = evaluate.evaluate(target_dir, args.drafter, simulate=True, **common)    # warm cache
    sim_s = time.perf_counter() - start
    start = time.perf_counter()
    real = evaluate.evaluate(target_dir, args.drafter, **common)
    real_s = time.perf_counter() - start
    eagle_s = sum(r.eagle_seconds for r in real.records)
    by_id = {(r.benchmark, r.prompt_id): r for r in real.records}
    same = sum(by_id.get((r.benchmark, r.prompt_id)) is not None
               and by_id[(r.benchmark, r.prompt_id)].accept_lengths == r.accept_lengths for r in sim.records)
    cache = first.settings["continuation_cache"]
    figures = {
        "prompts": len(sim.records), "max_new_tokens": args.max_new_tokens, "benchmarks": args.benchmarks,
        "cache_build_s": cache["generate_s"] + cache["features_s"], "cache_generated": cache["generated"],
        "first_simulated_eval_s": first_s, "simulated_eval_s": sim_s, "simulate_only_s": sim.settings["simulate_seconds"],
        "real_eval_s": real_s, "real_eagle_only_s": eagle_s, "ratio_real_over_simulated": real_s / sim_s,
        "ratio_eagle_only_over_simulated": eagle_s / sim_s, "tau_simulated": sim.overall.tau,
        "tau_real": real.overall.tau, "prompts_identical_cycles": same,
        "real_mismatches_vs_hf_greedy": real.overall.mismatches,
        "command": "python benchmarks/eval_speed.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v not in (None, False) and k != "out")}
    print(f"one-time continuation cache: {figures['cache_build_s']:.0f} s for {cache['generated']} new prompts")
    print(f"simulated eval (warm cache): {sim_s:.1f} s; real decoding: {real_s:.1f} s (EAGLE part {eagle_s:.1f} s)")
    print(f"ratio real / simulated: {real_s / sim_s:.1f}x (EAGLE part only: {eagle_s / sim_s:.1f}x); target >= 20x")
    print(f"tau simulated {sim.overall.tau:.4f}, real {real.overall.tau:.4f}; identical cycles on {same} of "
          f"{len(sim.records)} prompts; real decoding vs HF greedy: {real.overall.mismatches} mismatching prompts")
    if args.out:
        Path(args.out).write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
