"""Training curves of runs, in numbers: the mean of each logged metric over consecutive quarters of a run.

    python scripts/curves.py RUN_DIR [RUN_DIR ...] [--keys reward,accept_len,...] [--parts 4] [--json OUT]

Reads each run's metrics.jsonl (every logged step; `sim_tau` rows are the τ probe's) and prints one markdown
table per run: rows = metrics, columns = the parts of the run by step, plus the τ probe's values by step.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

PPOW_KEYS = "reward,accept_len,zero_accept_frac,zero_adv_frac,r_dist_rate,kl,distill,clip_frac"


def quarters(rows: list[dict], key: str, parts: int) -> list[float | None]:
    """Mean of `key` over `parts` consecutive, equal slices of the rows that log it."""
    values = [r[key] for r in rows if key in r]
    if not values:
        return [None] * parts
    size = max(1, len(values) // parts)
    out = []
    for i in range(parts):
        chunk = values[i * size:(i + 1) * size] if i < parts - 1 else values[i * size:]
        out.append(sum(chunk) / len(chunk) if chunk else None)
    return out


def summarize(run: Path, keys: list[str], parts: int) -> dict:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [r["step"] for r in rows if "step" in r]
    return {"run": str(run), "steps": max(steps) if steps else 0,
            "elapsed_s": max((r.get("elapsed_s", 0.0) for r in rows), default=0.0),
            "parts": {k: quarters(rows, k, parts) for k in keys},
            "sim_tau": {r["step"]: r["sim_tau"] for r in rows if "sim_tau" in r}}


def markdown(summary: dict, parts: int) -> str:
    head = [f"{summary['run']}: {summary['steps']} steps, {summary['elapsed_s'] / 60:.0f} min", "",
            "| metric | " + " | ".join(f"part {i + 1}/{parts}" for i in range(parts)) + " |",
            "|" + "---|" * (parts + 1)]
    for key, values in summary["parts"].items():
        if any(v is not None for v in values):
            head.append(f"| {key} | " + " | ".join("n/a" if v is None else f"{v:.3f}" for v in values) + " |")
    if summary["sim_tau"]:
        head += ["", "τ probe: " + ", ".join(f"{t:.3f} at step {s}" for s, t in summary["sim_tau"].items())]
    return "\n".join(head) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--keys", default=PPOW_KEYS)
    ap.add_argument("--parts", type=int, default=4)
    ap.add_argument("--json", default=None, help="also write the summaries here")
    args = ap.parse_args()
    keys = [k for k in args.keys.split(",") if k]
    summaries = [summarize(run, keys, args.parts) for run in args.runs]
    for s in summaries:
        print(markdown(s, args.parts))
    if args.json:
        Path(args.json).write_text(json.dumps({"command": "python scripts/curves.py " + " ".join(
            str(r) for r in args.runs), "runs": summaries}, indent=2) + "\n")


if __name__ == "__main__":
    main()
