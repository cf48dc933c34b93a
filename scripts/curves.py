"""Training curves of runs, in numbers: the mean of each logged metric over consecutive quarters of a run.

    python scripts/curves.py RUN_DIR [RUN_DIR ...] [--keys reward,accept_len,...] [--parts 4] [--json OUT]
    python scripts/curves.py RUN_DIR [RUN_DIR ...] --per-run DIR     # + DIR/<run>.json and DIR/<run>.png

Reads each run's metrics.jsonl (every logged step; `sim_tau` rows are the τ probe's) and prints one markdown
table per run: rows = metrics, columns = the parts of the run by step, plus the τ probe's values by step.
`--per-run` writes, per run, the issue-28 curves the metrics hold (CURVES: sampled reward, greedy-window k
at the training positions and on held-out text (`heldout_k`, the τ probe's), τ probe, zero-advantage share,
R_dist rate, clip fraction, gradient signal-to-noise (`grad_cos_prev`), and the SFT arms' top-1) against
training minutes, in JSON (every logged value, the quarters, and which curves the run did
not log) and one PNG. Training minutes: the trainer's `train_s` (the run's training seconds, resumes
included, τ probe excluded: what `run.max_minutes` counts). Runs logged before `train_s` existed hold one
segment per start, each with its own clock (`elapsed_s` restarts, `probe_s` is the τ probe's time so
far); `training_minutes` adds those up the same way.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

PPOW_KEYS = "reward,accept_len,zero_accept_frac,zero_adv_frac,r_dist_rate,kl,distill,clip_frac"
# issue 28's curves: metrics.jsonl key -> what it is. Read defensively: a run logs only some of them
# (SFT arms: no reward; the expected estimator: no groups, so no zero_adv_frac, r_dist_rate or clip_frac).
CURVES = {
    "reward": "sampled (or expected) window reward",
    "greedy_accept_len": "greedy-window k (training positions)",
    "sim_tau": "τ probe (held-out prompts)",
    "heldout_k": "greedy-window k at every position of the τ probe's held-out continuations",
    "zero_adv_frac": "groups with all-zero advantage",
    "r_dist_rate": "R_dist rate (k = 0 windows)",
    "clip_frac": "PPO clip fraction",
    "grad_cos_prev": "gradient cosine with the previous step (signal-to-noise; run.grad_cosine)",
    "accept_len": "window k (sampled)",
    "top1_acc": "SFT top-1 (depth 1)",
    "multi_step_last_acc": "SFT top-1, deepest multi-step depth",
    "ttt_last_acc": "SFT top-1, last TTT step",
}


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


def read_rows(run: Path) -> list[dict]:
    """The complete rows of RUN/metrics.jsonl (a torn last line, as a killed run may leave, is skipped)."""
    rows = []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def training_minutes(rows: list[dict]) -> list[float]:
    """Cumulative training minutes at each row, without the τ probe's time: the row's `train_s` where
    logged, else over the run's segments (a new segment starts where `elapsed_s` goes down: before
    `train_s`, the trainer's clock restarted at every start)."""
    out, done, last_e, last_t, probe = [], 0.0, None, 0.0, 0.0
    for r in rows:
        if "train_s" in r:
            out.append(float(r["train_s"]) / 60)
            continue
        e = float(r.get("elapsed_s", 0.0))
        if last_e is not None and e < last_e:  # a restart: bank the previous segment's training time
            done, probe = done + last_t, 0.0
        t = e - probe  # elapsed_s is taken before this row's probe, probe_s after it
        probe = float(r.get("probe_s", probe))
        last_e, last_t = e, t
        out.append((done + t) / 60)
    return out


def curves(run: Path, parts: int) -> dict:
    """Issue 28's curves of one run: {key: [[step, training minutes, value], ...]}, the quarters, the absent."""
    rows = read_rows(run)
    mins = training_minutes(rows)
    series = {k: [[r.get("step"), round(m, 3), r[k]] for r, m in zip(rows, mins) if k in r] for k in CURVES}
    return {"run": str(run), "steps": max((r.get("step", 0) for r in rows), default=0),
            "training_minutes": round(mins[-1], 2) if mins else 0.0,
            "curves": {k: {"what": CURVES[k], "points": v, "parts": quarters(rows, k, parts)}
                       for k, v in series.items() if v},
            "absent": [k for k, v in series.items() if not v]}


def dump_curves(c: dict) -> str:
    """`curves()`'s dict as JSON with one line per top-level key and one per curve: readable, and about half the
    size of an indented dump (every number on its own line), which matters for the committed per-arm files."""
    line = lambda v: json.dumps(v, separators=(",", ":"), ensure_ascii=False)
    parts = []
    for k, v in c.items():
        if k == "curves":
            inner = ",\n".join(f" {line(name)}:{line(cv)}" for name, cv in v.items())
            parts.append(f'"curves":{{\n{inner}\n}}' if v else '"curves":{}')
        else:
            parts.append(f"{line(k)}:{line(v)}")
    return "{\n" + ",\n".join(parts) + "\n}\n"


def plot_curves(c: dict, path: Path) -> None:
    """One PNG: a panel per logged curve against training minutes (a moving mean over ~2 % of the run)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    keys = list(c["curves"])
    cols = 3
    rows = max(1, -(-len(keys) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        pts = c["curves"][key]["points"]
        x, y = [p[1] for p in pts], [p[2] for p in pts]
        ax.plot(x, y, ".-" if key == "sim_tau" or len(y) < 50 else "-", lw=0.5, ms=3, alpha=0.5)
        w = max(1, len(y) // 50)
        if w > 1:
            ax.plot(x[w - 1:], [sum(y[i - w + 1:i + 1]) / w for i in range(w - 1, len(y))], lw=1.5)
        ax.set_title(c["curves"][key]["what"], fontsize=9)
        ax.set_xlabel("training minutes", fontsize=8)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.suptitle(f"{Path(c['run']).name}: {c['steps']} steps, {c['training_minutes']:.0f} min; not logged: "
                 + (", ".join(c["absent"]) or "none"), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def summarize(run: Path, keys: list[str], parts: int) -> dict:
    rows = read_rows(run)
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
    ap.add_argument("--per-run", type=Path, default=None, help="write DIR/<run name>.json and .png per run")
    args = ap.parse_args()
    if args.per_run is not None:
        args.per_run.mkdir(parents=True, exist_ok=True)
        for run in args.runs:
            c = curves(run, args.parts)
            (args.per_run / f"{run.name}.json").write_text(dump_curves(c))
            if c["curves"]:
                plot_curves(c, args.per_run / f"{run.name}.png")
            print(f"{run.name}: {', '.join(c['curves'])}; not logged: {', '.join(c['absent']) or 'none'}")
    keys = [k for k in args.keys.split(",") if k]
    summaries = [summarize(run, keys, args.parts) for run in args.runs]
    for s in summaries:
        print(markdown(s, args.parts))
    if args.json:
        Path(args.json).write_text(json.dumps({"command": "python scripts/curves.py " + " ".join(
            str(r) for r in args.runs), "runs": summaries}, indent=2) + "\n")


if __name__ == "__main__":
    main()
