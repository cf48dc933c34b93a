"""Simulated EAGLE-3 evaluation: the walked path (`tree_walk`, the default) against the every-root reference.

    python benchmarks/sim_eagle3_speed.py [--drafters assets/drafters/smollm2-135m-eagle3-sft-gen,...] \
        [--num-prompts 10] [--max-new-tokens 128] [--benchmarks mt_bench] [--out sim_eagle3_speed.json]

Both paths run in this one process on the same prompts, prompt by prompt and in alternating order (so both
see the same machine load), on the embedded target's cached continuations (`ppow compare --simulate`'s
inputs: the eval tree 7 / 10 / 60, the `generate_eagle3` stop rule). Prints per drafter the wall and CPU
seconds per prompt of each path, their ratio, whether every prompt's cycles (accept lengths and committed
tokens) are identical, and how many roots the walked path drafted (and grew past the first level) of the
roots the reference drafts. With `--eagle1 DIR` also the EAGLE-1 simulation's seconds per prompt, for scale.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from ppow_plugin import devices
from ppow_plugin.data import continuations
from ppow_plugin.evaluation import evaluate, simulate, tree_walk
from ppow_plugin.host import eagle_compat

DRAFTERS = "assets/drafters/smollm2-135m-eagle3-sft-gen,assets/drafters/smollm2-135m-eagle3-sft-converged"


def _timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--drafters", default=DRAFTERS, help="comma-separated EAGLE-3 drafter dirs")
    ap.add_argument("--eagle1", default=None, help="an EAGLE-1 drafter dir to time on the same prompts")
    ap.add_argument("--benchmarks", default="mt_bench")
    ap.add_argument("--num-prompts", type=int, default=10)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--out", default=None, help="also write the figures as JSON here")
    args = ap.parse_args()
    place = devices.resolve_placement()
    target_dir = evaluate.resolve_target("default")
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(target_dir))
    target = eagle_compat.load_host_target(target_dir, place.dtype, place.device)
    prompts = evaluate.load_prompts(args.benchmarks, args.num_prompts)
    ids = [evaluate._format(tok, p.turns[:1], [])[0].tolist() for p in prompts]
    tree, eos, budget = evaluate.Eagle3Tree(), tok.eos_token_id, args.max_new_tokens
    figures = {"device": place.tag, "torch_threads": torch.get_num_threads(), "prompts": len(ids),
               "benchmarks": args.benchmarks, "max_new_tokens": budget, "tree": list(tree), "drafters": {}}
    for path in args.drafters.split(","):
        drafter = simulate.load_drafter("eagle3", Path(path), target)
        conts, _ = continuations.load_continuations(target_dir, target, ids, simulate.continuation_length(budget, tree),
                                                    drafter.cfg.feature_layer_ids, place=place)
        rows = []
        with torch.no_grad():
            for i, cont in enumerate(conts):
                seq = simulate.teacher_forced("eagle3", drafter, target, cont)
                roots = simulate._roots(cont, budget, eos)
                tokens = cont.ids[cont.prompt_len:].tolist()

                def reference():
                    return simulate.simulate_one("eagle3", drafter, target, cont, budget, tree, eos, "ppow",
                                                 every_root=True)

                def walked():
                    return simulate.simulate_one("eagle3", drafter, target, cont, budget, tree, eos, "ppow")

                runs = {}
                for name, fn in ((("reference", reference), ("walked", walked)) if i % 2 == 0
                                 else (("walked", walked), ("reference", reference))):
                    runs[name] = _timed(fn)
                lazy = tree_walk.walked_accept_lengths(drafter, seq, roots, tree)  # once more, for its counts
                simulate.walk_cycles(lazy, tokens, eos, budget, "ppow")
                rows.append({"prompt": prompts[i].prompt_id, "roots": roots.numel(), "drafted": lazy.drafted,
                             "grown": sum(lazy.guess[j] > 0 for j in lazy.known), "batches": lazy.calls,
                             "identical": runs["walked"][0] == runs["reference"][0],
                             "new_tokens": runs["walked"][0].new_tokens, "cycles": len(runs["walked"][0].accept_lengths),
                             **{f"{n}_{k}_s": runs[n][j] for n in runs for j, k in ((1, "wall"), (2, "cpu"))}})
                print(f"{Path(path).name} prompt {rows[-1]['prompt']}: reference {rows[-1]['reference_wall_s']:.2f} s, "
                      f"walked {rows[-1]['walked_wall_s']:.2f} s, identical {rows[-1]['identical']}", flush=True)
        total = {k: sum(r[k] for r in rows) for k in ("roots", "drafted", "grown", "reference_wall_s",
                                                      "reference_cpu_s", "walked_wall_s", "walked_cpu_s")}
        figures["drafters"][Path(path).name] = {
            "per_prompt": rows, "all_identical": all(r["identical"] for r in rows),
            "reference_wall_s_per_prompt": total["reference_wall_s"] / len(rows),
            "walked_wall_s_per_prompt": total["walked_wall_s"] / len(rows),
            "ratio_wall": total["reference_wall_s"] / total["walked_wall_s"],
            "ratio_cpu": total["reference_cpu_s"] / total["walked_cpu_s"],
            "roots": total["roots"], "roots_drafted": total["drafted"], "roots_grown_past_level_0": total["grown"]}
        d = figures["drafters"][Path(path).name]
        print(f"{Path(path).name}: reference {d['reference_wall_s_per_prompt']:.2f} s/prompt, walked "
              f"{d['walked_wall_s_per_prompt']:.2f} s/prompt: {d['ratio_wall']:.1f}x wall, {d['ratio_cpu']:.1f}x CPU; "
              f"cycles identical on {sum(r['identical'] for r in rows)} of {len(rows)} prompts; trees grown at "
              f"{total['grown']} of {total['roots']} roots")
    if args.eagle1:
        drafter = simulate.load_drafter("eagle1", Path(args.eagle1), target)
        conts, _ = continuations.load_continuations(target_dir, target, ids, simulate.continuation_length(
            budget, simulate.host_tree()), None, place=place)
        _, wall, cpu = _timed(lambda: [simulate.simulate_one("eagle1", drafter, target, c, budget, simulate.host_tree(),
                                                              eos, "host") for c in conts])
        figures["eagle1"] = {"drafter": args.eagle1, "wall_s_per_prompt": wall / len(conts),
                             "cpu_s_per_prompt": cpu / len(conts)}
        print(f"EAGLE-1 {Path(args.eagle1).name}: {wall / len(conts):.2f} s/prompt wall, {cpu / len(conts):.2f} CPU")
    figures["command"] = "python benchmarks/sim_eagle3_speed.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v not in (None, False) and k != "out")
    if args.out:
        Path(args.out).write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
