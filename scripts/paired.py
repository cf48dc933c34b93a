"""Paired τ tables across `ppow compare` outputs, against any drafter, and the real-decoding check.

    python scripts/paired.py table --reference cst --out OUT/vs-cst.md [--pooled] [--drafters A,B] CMP_DIR ...
    python scripts/paired.py agree REAL_CMP_DIR SIM_CMP_DIR [SIM_CMP_DIR ...]
    python scripts/paired.py depths CMP_DIR            # a compare run with --per-depth: one table, all drafters

`ppow compare` gives each drafter's τ change against its first drafter only. Issue 28 also wants every
arm against continued SFT (arm 1), and the drafters of one table may come from several compares (the
ablations are trained after the main arms). `table` reads each compare's per-drafter report.json (one
record per prompt: kept tokens and cycles), pairs prompts by (benchmark, prompt id) and writes, per
benchmark, τ of every drafter and its change against --reference with a paired 95 % bootstrap interval
(`intervals.paired_relative_interval`, what `ppow compare` uses). A drafter name seen in two compares must
have the same records on the prompts both hold (it is the same drafter simulated twice: checked).
`agree`: for every drafter of a real-decoding compare, its T = 0 mismatches and whether each prompt's
cycles equal the simulation's (the same drafter name in SIM_CMP_DIR); exit 1 on any difference.
`depths`: the top-1 / top-3 acceptance per draft depth of every drafter of a `--per-depth` compare (each
report.json's settings.topk_by_depth), in one table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ppow_plugin.evaluation import intervals


def load(dirs: list[Path]) -> dict[str, dict[tuple[str, str], dict]]:
    """{drafter name: {(benchmark, prompt id): record}} over the compare dirs (subdir = drafter name), in the
    order of each compare.json (else by name)."""
    out: dict[str, dict[tuple[str, str], dict]] = {}
    for d in dirs:
        cmp = d / "compare.json"  # its drafters in the compare's order (the reference first)
        names = list(json.loads(cmp.read_text())["drafters"]) if cmp.exists() else []
        for rep in sorted(d.glob("*/report.json"), key=lambda p: (names + [p.parent.name]).index(p.parent.name)):
            records = {(r["benchmark"], r["prompt_id"]): r for r in json.loads(rep.read_text())["prompts"]}
            mine = out.setdefault(rep.parent.name, {})
            for key, r in records.items():
                if key in mine and (mine[key]["new_tokens"], mine[key]["cycles"]) != (r["new_tokens"], r["cycles"]):
                    raise SystemExit(f"error: {rep.parent.name} {key} differs between compares ({rep})")
                mine[key] = r
    return out


def table(reports: dict[str, dict[tuple[str, str], dict]], reference: str, pooled: bool = False) -> str:
    """Per benchmark (and, with `pooled`, one more column over all their prompts together) τ of each drafter
    and its paired change against `reference`."""
    if reference not in reports:
        raise SystemExit(f"error: no drafter named {reference!r}; have: {', '.join(reports)}")
    ref = reports[reference]
    benches = list(dict.fromkeys(b for b, _ in ref)) + (["all"] if pooled else [])
    lines = [f"τ, and change vs {reference} (paired 95 % bootstrap over the prompts both decoded)", "",
             "| drafter | " + " | ".join(f"{b}" for b in benches) + " |", "|---|" + "---|" * len(benches)]
    for name, recs in reports.items():
        cells = []
        for b in benches:
            keys = [k for k in ref if (pooled and b == "all" or k[0] == b) and k in recs]
            if not keys:
                cells.append("")
                continue
            tau = sum(recs[k]["new_tokens"] for k in keys) / sum(recs[k]["cycles"] for k in keys)
            if name == reference:
                cells.append(f"{tau:.3f} ({len(keys)})")
                continue
            iv = intervals.paired_relative_interval(
                [ref[k]["new_tokens"] for k in keys], [ref[k]["cycles"] for k in keys],
                [recs[k]["new_tokens"] for k in keys], [recs[k]["cycles"] for k in keys])
            cells.append(f"{tau:.3f}: {iv.percent()}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def agree(real: dict[str, dict[tuple[str, str], dict]], sim: dict[str, dict[tuple[str, str], dict]]) -> list[str]:
    """One line per drafter; a line starting 'DIFF' where decoding and simulation disagree."""
    lines = []
    for name, recs in real.items():
        mism = sum(r["mismatch_at"] is not None for r in recs.values())
        paired = [k for k in recs if k in sim.get(name, {})]
        differ = [k for k in paired if recs[k]["cycles"] != sim[name][k]["cycles"]]
        ok = mism == 0 and not differ and len(paired) == len(recs)  # a prompt not simulated is not checked
        lines.append(f"{'ok' if ok else 'DIFF'} {name}: {len(recs)} prompts, {mism} T = 0 mismatches, cycles equal "
                     f"to the simulation on {len(paired) - len(differ)} / {len(recs)}"
                     + (f"; differ: {differ[:5]}" if differ else "")
                     + (f"; not simulated: {len(recs) - len(paired)}" if len(paired) < len(recs) else ""))
    return lines


def depths(cmp_dir: Path) -> str:
    names = list(json.loads((cmp_dir / "compare.json").read_text())["drafters"])
    rows, depth = [], 0
    for name in names:
        by = json.loads((cmp_dir / name / "report.json").read_text())["settings"].get("topk_by_depth")
        if by is None:
            raise SystemExit(f"error: {cmp_dir / name}/report.json has no per-depth figures (run with --per-depth)")
        depth = by["depth"]
        for bench, st in by["benchmarks"].items():
            if bench != "overall" or len(by["benchmarks"]) > 2:
                rows.append(f"| {name} | {bench} | {st['roots']} | "
                            + " | ".join(f"{a:.2f} / {b:.2f}" for a, b in zip(st["top1"], st["top3"])) + " |")
    head = ["Top-1 / top-3 acceptance at each draft depth (`--per-depth`)", "",
            "| drafter | benchmark | roots | " + " | ".join(f"depth {i + 1}" for i in range(depth)) + " |",
            "|---|---|---|" + "---|" * depth]
    return "\n".join(head + rows) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("table")
    t.add_argument("dirs", nargs="+", type=Path)
    t.add_argument("--reference", required=True)
    t.add_argument("--out", type=Path, default=None)
    t.add_argument("--pooled", action="store_true", help="one more column: all the benchmarks' prompts together")
    t.add_argument("--drafters", default="", help="NAME,NAME...: only these rows, in this order (the reference too)")
    a = sub.add_parser("agree")
    a.add_argument("real", type=Path)
    a.add_argument("sim", nargs="+", type=Path)
    d = sub.add_parser("depths")
    d.add_argument("dir", type=Path)
    d.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if args.cmd == "depths":
        text = depths(args.dir)
        print(text)
        if args.out:
            args.out.write_text(text)
        return
    if args.cmd == "table":
        reports = load(args.dirs)
        if args.drafters:
            names = args.drafters.split(",")
            missing = [n for n in names if n not in reports]
            if missing:
                raise SystemExit(f"error: no drafter named {', '.join(missing)}; have: {', '.join(reports)}")
            reports = {n: reports[n] for n in names}
        text = table(reports, args.reference, args.pooled)
        print(text)
        if args.out:
            args.out.write_text(text)
        return
    lines = agree(load([args.real]), load(args.sim))
    print("\n".join(lines))
    sys.exit(1 if any(line.startswith("DIFF") for line in lines) else 0)


if __name__ == "__main__":
    main()
