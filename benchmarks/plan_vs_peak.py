"""`ppow plan` against the measured peak memory of `ppow sft` / `ppow train` on CPU (issue 26: within 25 %).

    PYTHONPATH=. OMP_NUM_THREADS=1 .venv/bin/python benchmarks/plan_vs_peak.py [--shapes llama-3.1-8b/4,vicuna-13b]

Shapes, both from tests/test_rehearsal.py with its smoke overrides (fp32, torch engine, CPU): `llama-3.1-8b/4` =
its default shrunk shape (Llama-3.1-8B's config with hidden, heads and MLP width / 4, 5 layers, the full 128256
vocabulary, EAGLE-3 drafter); `vicuna-13b` = its full-width shape (Vicuna-13B at width 5120, 2 layers, vocabulary
32000, EAGLE-1 drafter). PPOW runs at max_len 128 with 2 prefixes x 4 windows of 4 so the rollout terms show. Each
stage runs through the CLI in a fresh process (one thread) that records its peak RSS; the plan is computed for
the same recipe and overrides on 1 device. A CPU process also holds the Python/torch/transformers/host
libraries, which no GPU plan counts: a process that imports the same modules and loads nothing gives that
baseline, and the ratio is plan / (peak - baseline), with the peak taken over set-up and the training steps (up
to the first checkpoint); the whole command's peak (checkpoint and export included) is printed too. Prints one
JSON line per stage and a table.
Needs ~12 GB of free memory for vicuna-13b (its fp32 target is 3.8 GB, the drafter with AdamW 6.6 GB).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

# Peak resident memory = VmHWM of /proc/self/status, not getrusage's ru_maxrss: Linux carries ru_maxrss across
# exec, so a child started by a big parent (this script builds the target) reports at least the parent's RSS.
HWM = "int(next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM:')))"
# one CLI command in this process; writes its peak resident memory (KiB) next to it: over the whole command, and
# over set-up + training steps alone (read when the first checkpoint starts: the checkpoint and the export then
# hold 2-3 CPU copies of the drafter's state, host memory that no device plan counts)
WRAPPER = ("import json, sys\nfrom ppow_plugin import cli\nfrom ppow_plugin.training import trainer\ncode, seen = 1, {}\n"
           "save = trainer.Trainer.save_checkpoint\n"
           f"def first_save(self):\n    seen.setdefault('train_peak_kib', {HWM})\n    return save(self)\n"
           "trainer.Trainer.save_checkpoint = first_save\n"
           "try:\n    code = cli.main(sys.argv[2:])\nfinally:\n"
           f"    json.dump({{'rc': code, 'peak_rss_kib': {HWM}, **seen}}, open(sys.argv[1], 'w'))\nsys.exit(code)\n")
# the same imports a training process makes, nothing loaded
BASELINE = ("import json, sys, torch, transformers, tokenizers\nfrom ppow_plugin import cli\nfrom ppow_plugin.training import "
            "trainer\nfrom ppow_plugin.host import eagle_compat\nfrom ppow_plugin.drafters import adapters\nimport eagle.model.modeling_llama_kv, eagle.model.cnets\n"
            f"json.dump({{'peak_rss_kib': {HWM}}}, open(sys.argv[1], 'w'))\n")
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
       "TOKENIZERS_PARALLELISM": "false"}
# name: (tests/test_rehearsal.py family, width divisor): its default shrunk shape and its full-width shape
SHAPES = {"llama-3.1-8b/4": ("llama-3.1-8b", 4), "vicuna-13b": ("vicuna-13b", 1)}
# PPOW at a size where the rollout graph and the verification tree show (the tests' smoke sizes hide them)
PPOW_SIZES = {"data.max_len": 128, "rollout.group_size": 4, "rollout.window": 4, "rollout.prefixes_per_sequence": 2}


def peak_bytes(code: str, args: list[str], work: Path, name: str) -> tuple[int, int]:
    """(peak over the whole command, peak over set-up + training steps) in bytes; equal for the baseline."""
    stats = work / f"{name}.json"
    proc = subprocess.run([sys.executable, "-c", code, str(stats), *args], cwd=work, env=ENV,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{name} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    stats = json.loads(stats.read_text())
    return stats["peak_rss_kib"] * 1024, stats.get("train_peak_kib", stats["peak_rss_kib"]) * 1024


def planned_bytes(recipe: str, overrides: list[str], target: Path) -> tuple[float, dict]:
    from ppow_plugin.host import target_arch
    from ppow_plugin.training import plan
    from ppow_plugin.config import load_config
    cfg = load_config(recipe, overrides)
    arch, _ = target_arch.load_target_arch(cfg, str(target))
    p = plan.plan_memory(cfg, arch, 1)
    return p.total_gb * plan.GB, p.rows


def shape_runs(name: str, work: Path) -> tuple[Path, list[tuple[str, list[str]]]]:
    """(target dir, [(stage, CLI args)]) for one shape; the target and data are built in `work`."""
    kv = lambda d: [f"{k}={v}" for k, v in d.items()]  # noqa: E731
    import test_rehearsal as r
    family_name, divisor = SHAPES[name]
    family = r.FAMILIES[family_name]._replace(width_divisor=divisor)
    target = work / "target"
    config = r.build_target(family, target)
    data = r.write_conversations(work / "convs.jsonl", config["vocab_size"])
    common = {**r.SMOKE, "model.target": str(target), "data.path": str(data), "run.save_every": 100}
    sft = {**common, "stage": "sft", "model.drafter": "null", "run.output_dir": str(work / "sft")}
    ppow = {**common, **r.PPOW_SMOKE, **PPOW_SIZES, "model.drafter": str(work / "sft" / "drafter"),
            "run.output_dir": str(work / "ppow")}
    return target, [("sft", ["sft", str(ROOT / family.sft), *kv(sft)]),
                    ("train", ["train", str(ROOT / family.ppow), *kv(ppow)])]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default=",".join(SHAPES))
    args = ap.parse_args()
    results = []
    for name in args.shapes.split(","):
        with tempfile.TemporaryDirectory(prefix=f"plan-vs-peak-{name.replace('/', '-')}-") as tmp:
            work = Path(tmp)
            target, runs = shape_runs(name, work)
            baseline, _ = peak_bytes(BASELINE, [], work, "baseline")
            for stage, cli_args in runs:
                whole, training = peak_bytes(WRAPPER, cli_args, work, stage)
                planned, rows = planned_bytes(cli_args[1], cli_args[2:], target)
                row = {"shape": name, "stage": stage, "plan_gb": round(planned / 1e9, 3),
                       "train_peak_gb": round(training / 1e9, 3), "command_peak_gb": round(whole / 1e9, 3),
                       "baseline_gb": round(baseline / 1e9, 3),
                       "ratio": round(planned / max(training - baseline, 1), 3),
                       "ratio_whole_command": round(planned / max(whole - baseline, 1), 3),
                       "plan_rows_gb": {k: round(v, 4) for k, v in rows.items()}}
                print(json.dumps(row), flush=True)
                results.append(row)
    print(f"\n{'shape':15s} {'stage':6s} {'plan GB':>8s} {'train peak - base':>18s} {'plan/that':>10s} "
          f"{'command peak - base':>20s} {'plan/that':>10s}")
    for r in results:
        print(f"{r['shape']:15s} {r['stage']:6s} {r['plan_gb']:8.3f} {r['train_peak_gb'] - r['baseline_gb']:18.3f} "
              f"{r['ratio']:10.2f} {r['command_peak_gb'] - r['baseline_gb']:20.3f} {r['ratio_whole_command']:10.2f}")


if __name__ == "__main__":
    main()
