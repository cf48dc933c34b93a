"""Write a committed drafter's provenance.json from the run that trained it, with its τ check.

    python scripts/provenance.py RUN_DIR COMMITTED_DIR --what TEXT --command TEXT [--tau-prompts N]

RUN_DIR is a finished training run (metrics.jsonl, drafter/ with the fp32 weights and ppow_meta.json);
COMMITTED_DIR is `scripts/slim_drafter.py RUN_DIR/drafter COMMITTED_DIR`'s copy, without a provenance.json
yet. Recorded from the run's own files: the resolved config, the start, the data report, the steps, the
training seconds, the mean of the last 100 steps' metrics and the τ probe during training. Measured: the τ
check tests/test_committed_drafters.py re-measures, `ppow eval --simulate` on the first N MT-Bench first
turns at 128 new tokens (T = 0), of the committed fp16 weights and, for comparison, of the run's fp32 ones.
--what says in words what the drafter is and which result it belongs to; --command is the command (or
script) that trained it, as a reader would rerun it; --start names the start (a committed dir, its round).
No path of this machine is written: absolute paths are shortened (`serving_names.portable`).
"""

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ppow_plugin import cli  # noqa: E402
from ppow_plugin.host.serving_names import portable  # noqa: E402

SUMMED = ("loss", "top1_acc", "feature_loss", "token_loss", "ttt_last_acc", "multi_step_last_acc", "reward",
          "greedy_accept_len")


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def training_record(rows: list[dict]) -> dict:
    """What a run's metrics.jsonl rows say: steps, seconds, the last 100 steps' means and the τ probe.

    A resumed run logs some steps twice (from its checkpoint on): a step's rows are merged, the later values
    win."""
    by_step: dict[int, dict] = {}
    for r in rows:
        if "step" in r:
            by_step.setdefault(r["step"], {}).update(r)
    if not by_step:
        raise ValueError("no logged steps")
    last = by_step[max(by_step)]
    tail = [r for s, r in by_step.items() if s > last["step"] - 100]
    means = {k: round(sum(r[k] for r in tail if k in r) / n, 4)
             for k in SUMMED if (n := sum(k in r for r in tail))}
    return {"steps": last["step"], "train_s": round(last.get("train_s", last.get("elapsed_s", 0.0))),
            "final_metrics_mean_last_100_steps": means,
            "sim_tau_during_training_sharegpt16_128tok": {str(s): round(r["sim_tau"], 4)
                                                           for s, r in sorted(by_step.items()) if "sim_tau" in r}}


def tau_check(drafter: Path, prompts: int) -> dict:
    """`ppow eval --simulate` on the first `prompts` MT-Bench first turns: new tokens, cycles, τ."""
    shown = drafter.resolve().relative_to(ROOT) if drafter.resolve().is_relative_to(ROOT) else drafter
    command = (f"ppow eval --drafter {shown} --simulate --benchmarks mt_bench --num-prompts {prompts} "
               f"--max-new-tokens 128")
    with tempfile.TemporaryDirectory() as tmp:
        if cli.main(shlex.split(command)[1:] + ["--out", f"{tmp}/eval"]) != 0:
            fail(f"the τ check of {drafter} failed: {command}")
        overall = json.loads(Path(tmp, "eval", "report.json").read_text())["stats"]["overall"]
    return {"command": command, "new_tokens": overall["new_tokens"], "cycles": overall["cycles"],
            "tau": overall["new_tokens"] / overall["cycles"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("committed", type=Path)
    ap.add_argument("--what", required=True)
    ap.add_argument("--command", required=True)
    ap.add_argument("--start", help="the start in words (default: the run's model.drafter)")
    ap.add_argument("--tau-prompts", type=int, default=10)
    a = ap.parse_args()
    if (a.committed / "provenance.json").exists():
        fail(f"{a.committed}/provenance.json exists; a committed drafter's record is written once")
    try:
        meta = json.loads((a.run / "drafter" / "ppow_meta.json").read_text())
        record = training_record([json.loads(x) for x in (a.run / "metrics.jsonl").read_text().splitlines() if x])
        json.loads((a.committed / "ppow_meta.json").read_text())
    except (OSError, ValueError) as exc:
        fail(f"{a.run} is not a finished run with its slim copy in {a.committed} ({exc}); run "
             f"scripts/slim_drafter.py {a.run}/drafter {a.committed} first")
    commit = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"], capture_output=True,
                            text=True).stdout.strip()
    check = tau_check(a.committed, a.tau_prompts)
    check["fp32"] = {k: v for k, v in tau_check(a.run / "drafter", a.tau_prompts).items() if k != "command"}
    check["note"] = (f"first {a.tau_prompts} MT-Bench first turns, simulated T=0, the recipe's tree, fp16 weights "
                     "as committed (fp32: the run's own weights); tests/test_committed_drafters.py re-measures it")
    cfg = meta.get("config", {})
    provenance = {"what": a.what, "command": a.command, "code_commit": commit, "stage": meta.get("stage"),
                  "drafter_type": cfg.get("model", {}).get("drafter_type"),
                  "start": a.start or cfg.get("model", {}).get("drafter"), "target": meta.get("target"),
                  "data": meta.get("data"), **record, "machine": meta.get("machine"), "torch": meta.get("torch"),
                  "config": cfg, "slim": "scripts/slim_drafter.py: fp16 float weights, no embeddings",
                  "tau_check": check}
    tmp = a.committed / ".provenance.json.tmp"
    tmp.write_text(json.dumps(portable(provenance), indent=2, ensure_ascii=False) + "\n")
    tmp.replace(a.committed / "provenance.json")
    print(f"wrote {a.committed}/provenance.json: τ check {check['tau']:.4f} (fp32 {check['fp32']['tau']:.4f})")


if __name__ == "__main__":
    main()
