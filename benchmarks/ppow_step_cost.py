"""PPOW wall time per training sequence vs an SFT step on the same sequences, and peak memory.

    .venv/bin/python benchmarks/ppow_step_cost.py [--sequences 6] [--max-len 384] [--drafter DIR]

Targets (issue 4): PPOW ≤ 3x the SFT step time per sequence; peak RSS ≤ 6 GB. Each stage runs in its
own subprocess (so peak RSS is per stage) on the same sequences, with the first sequence as warm-up,
through the trainer's own optimizer step. Three stages: SFT, PPOW as trained (ppo_epochs = 1, update
through the sampling pass) and PPOW with `loss.reuse_sampling_pass=false` (re-scores the windows, as
ppo_epochs > 1 must), so the saving of that shortcut is measured in the same run.
The ratio is measured in one run; absolute times on a shared 2-core machine are noisy.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time


def measure(stage: str, drafter: str | None, sequences: int, max_len: int, recipe: str, out: str) -> dict:
    from ppow_plugin.training import trainer
    from ppow_plugin.config import load_config

    over = [f"stage={stage.split('-')[0]}", f"data.max_len={max_len}", "dist.engine=torch",
            f"run.output_dir={out}", "run.max_steps=1000", "optim.grad_accum=1", "data.micro_batch=1",
            f"loss.reuse_sampling_pass={stage != 'ppow-rescore'}"]
    if drafter:
        over.append(f"model.drafter={drafter}")
    t = trainer.Trainer(load_config(recipe, over))
    t.setup()
    samples = [t.data.next() for _ in range(sequences + 1)]
    times, tokens = [], 0
    for i, sample in enumerate(samples):
        start = time.perf_counter()
        t._optimizer_step([sample])
        if i > 0:  # the first sequence is warm-up
            times.append(time.perf_counter() - start)
            tokens += len(sample.input_ids)
    if stage == "sft" and drafter is None:
        t.export_drafter(f"{out}/drafter")
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return {"stage": stage, "s_per_seq": sum(times) / len(times), "tokens": tokens, "peak_rss_gb": peak_gb}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sequences", type=int, default=6)
    ap.add_argument("--max-len", type=int, default=384)
    ap.add_argument("--drafter", default="assets/drafters/smollm2-135m-eagle1-sft-gen")
    ap.add_argument("--recipe", default="recipes/smollm2/135M_eagle1_ppow.yaml")
    ap.add_argument("--child", nargs=2, metavar=("STAGE", "OUT"))
    args = ap.parse_args()
    if args.child:
        stage, out = args.child
        print(json.dumps(measure(stage, args.drafter if stage != "sft" else None, args.sequences,
                                 args.max_len, args.recipe, out)))
        return
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for stage in ("sft", "ppow", "ppow-rescore"):
            cmd = [sys.executable, __file__, "--child", stage, f"{tmp}/{stage}", "--sequences", str(args.sequences),
                   "--max-len", str(args.max_len), "--drafter", args.drafter, "--recipe", args.recipe]
            line = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
            results[stage] = json.loads(line)
    sft, ppow, rescore = results["sft"], results["ppow"], results["ppow-rescore"]
    ratio = ppow["s_per_seq"] / sft["s_per_seq"]
    print(f"SFT  step: {sft['s_per_seq']:.2f} s/sequence, peak RSS {sft['peak_rss_gb']:.2f} GB")
    print(f"PPOW step: {ppow['s_per_seq']:.2f} s/sequence, peak RSS {ppow['peak_rss_gb']:.2f} GB")
    print(f"PPOW step, re-scoring (loss.reuse_sampling_pass=false): {rescore['s_per_seq']:.2f} s/sequence "
          f"({rescore['s_per_seq'] / sft['s_per_seq']:.2f}x SFT), peak RSS {rescore['peak_rss_gb']:.2f} GB")
    print(f"PPOW/SFT time ratio: {ratio:.2f}x (target <= 3x: {'met' if ratio <= 3 else 'MISSED'}); "
          f"PPOW peak RSS target <= 6 GB: {'met' if ppow['peak_rss_gb'] <= 6 else 'MISSED'}")


if __name__ == "__main__":
    main()
