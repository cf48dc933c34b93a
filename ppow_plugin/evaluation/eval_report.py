"""τ accounting and evaluation reports: what counts, aggregated per benchmark, rendered as JSON, Markdown and PNG.

`evaluate.py` decodes; this module turns each decoded turn into a `PromptRecord`, aggregates records into
`BenchStats` (`summarize`, `build_report`) and writes `ppow eval` / `ppow compare` outputs (`write_report`,
`summary_markdown`, `plot_report`, `compare_markdown`, `plot_compare`). Counting rules (docs/evaluation.md):

- The host commits whole cycles, so its output can run past the first EOS and past `max_new_tokens`.
  Both outputs are cut at the first EOS (kept) or at `max_new_tokens`, whichever comes first
  (`truncate_generation`). A cycle counts if at least one of its tokens is kept.
- τ = Σ kept tokens / Σ counted cycles, bonus token included (one cycle commits accept_len + 1
  tokens; cycles = EAGLE's `idx + 1`). EAGLE's own figure (untruncated) is reported as `tau_host`.
- Acceptance rate at position i = fraction of counted cycles with accept_len >= i, using each cycle's
  accept_len as verified (a partly kept last cycle keeps its full accept_len).
- tokens/s = Σ kept tokens / Σ wall seconds; speedup = EAGLE tokens/s ÷ baseline tokens/s.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from ppow_plugin.evaluation import intervals


# --- pure accounting -------------------------------------------------------------------------------


class KeptGeneration(NamedTuple):
    tokens: list[int]           # kept new tokens: cut after the first EOS (included) or at max_new_tokens
    cycles: int                 # cycles with at least one kept token
    accept_lengths: list[int]   # accept_len (bonus excluded) of those cycles, as verified
    last_cycle_kept: int        # tokens of the last counted cycle that survive the cut (0 if no cycle)


def kept_length(tokens: Sequence[int], eos_token_id: int | None, max_new_tokens: int) -> int:
    """Number of new tokens kept: up to and including the first EOS, at most `max_new_tokens`."""
    limit = min(len(tokens), max_new_tokens)
    for i in range(limit):
        if tokens[i] == eos_token_id:
            return i + 1
    return limit


def truncate_generation(new_tokens: Sequence[int], accept_lengths: Sequence[int], eos_token_id: int | None,
                        max_new_tokens: int) -> KeptGeneration:
    """Cut one `eagenerate` output to what counts, and the cycles that produced it.

    Cycle c commits accept_lengths[c] + 1 tokens (its accepted drafts plus the root sampled by the
    previous verification), so the committed tokens are the concatenation of those blocks.

    Args:
        new_tokens: every token the host committed after the prompt (may overshoot and pass EOS).
        accept_lengths: per cycle, accepted draft tokens, bonus excluded.
        eos_token_id: generation stops after this id (None: never).
        max_new_tokens: the requested budget.
    Raises:
        ValueError: the tokens are not the concatenation of the cycles' blocks.
    """
    blocks = [a + 1 for a in accept_lengths]
    if sum(blocks) != len(new_tokens):
        raise ValueError(f"{len(new_tokens)} tokens but cycles commit {sum(blocks)} (Σ accept_len + cycles)")
    keep = kept_length(new_tokens, eos_token_id, max_new_tokens)
    cycles, committed = 0, 0
    while committed < keep:
        committed += blocks[cycles]
        cycles += 1
    last = keep - (committed - blocks[cycles - 1]) if cycles else 0
    return KeptGeneration(list(new_tokens[:keep]), cycles, list(accept_lengths[:cycles]), last)


def acceptance_rates(accept_lengths: Sequence[int], depth: int) -> list[float]:
    """[P(accept_len >= i) for i in 1..depth] over cycles; zeros when there is no cycle."""
    n = len(accept_lengths)
    return [sum(a >= i for a in accept_lengths) / n if n else 0.0 for i in range(1, depth + 1)]


def accept_histogram(accept_lengths: Sequence[int], depth: int) -> list[int]:
    """Cycle counts by accept_len 0..depth."""
    counts = [0] * (depth + 1)
    for a in accept_lengths:
        counts[min(a, depth)] += 1
    return counts


def first_mismatch(a: Sequence[int], b: Sequence[int]) -> int | None:
    """Index of the first difference between two token lists (a length difference counts), else None."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def ratio(num: float, den: float) -> float:
    """num / den; NaN when den <= 0 (no cycle, no second timed)."""
    return num / den if den > 0 else float("nan")


# --- records and reports ---------------------------------------------------------------------------


class PromptRecord(NamedTuple):
    benchmark: str
    prompt_id: str              # e.g. "81" (MT-Bench), "81/turn2" with --both-turns, "HumanEval/0"
    prompt_tokens: int
    new_tokens: int             # kept (see truncate_generation)
    cycles: int                 # counted cycles
    accept_lengths: list[int]   # per counted cycle
    host_new_tokens: int        # as the host reports them (overshoot and post-EOS included)
    host_cycles: int
    eagle_seconds: float
    baseline_tokens: int        # kept baseline tokens
    baseline_seconds: float
    mismatch_at: int | None     # T = 0: first position where EAGLE != baseline; None = identical


@dataclass
class BenchStats:
    prompts: int
    new_tokens: int
    cycles: int
    tau: float                  # Σ kept tokens / Σ counted cycles, bonus included
    tau_host: float             # Σ host new_tokens / Σ host cycles (EAGLE's untruncated figure)
    accept_rates: list[float]   # P(accept_len >= i), i = 1..depth
    accept_hist: list[int]      # cycles with accept_len = 0..depth
    eagle_tokens_per_s: float
    baseline_tokens_per_s: float
    speedup: float
    mismatches: int | None      # prompts whose T = 0 output differs from the baseline; None when T > 0 or simulated
    tau_ci: list[float] | None = None  # 95 % bootstrap interval of τ over prompts [low, high]
    ci_resamples: int = 0


def summarize(records: Sequence[PromptRecord], depth: int, greedy: bool) -> BenchStats:
    """Aggregate prompt records (ratios of sums); τ gets a bootstrap interval over the records (prompts).

    Args:
        greedy: count baseline mismatches (real decoding at T = 0); False gives None.
    """
    tokens, cycles = sum(r.new_tokens for r in records), sum(r.cycles for r in records)
    ci = intervals.ratio_interval([r.new_tokens for r in records], [r.cycles for r in records])
    accepts = [a for r in records for a in r.accept_lengths]
    eagle_tps = ratio(tokens, sum(r.eagle_seconds for r in records))
    base_tps = ratio(sum(r.baseline_tokens for r in records), sum(r.baseline_seconds for r in records))
    return BenchStats(
        prompts=len(records), new_tokens=tokens, cycles=cycles, tau=ratio(tokens, cycles),
        tau_host=ratio(sum(r.host_new_tokens for r in records), sum(r.host_cycles for r in records)),
        accept_rates=acceptance_rates(accepts, depth), accept_hist=accept_histogram(accepts, depth),
        eagle_tokens_per_s=eagle_tps, baseline_tokens_per_s=base_tps, speedup=ratio(eagle_tps, base_tps),
        mismatches=sum(r.mismatch_at is not None for r in records) if greedy else None,
        tau_ci=[ci.low, ci.high], ci_resamples=ci.resamples)


@dataclass
class EvalReport:
    settings: dict[str, Any]
    stats: dict[str, BenchStats]          # per benchmark, plus "overall"
    records: list[PromptRecord] = field(default_factory=list)

    @property
    def overall(self) -> BenchStats:
        return self.stats["overall"]

    def to_dict(self) -> dict[str, Any]:
        return {"settings": self.settings, "stats": {k: asdict(v) for k, v in self.stats.items()},
                "prompts": [r._asdict() for r in self.records]}


def build_report(records: Sequence[PromptRecord], settings: dict[str, Any], depth: int,
                 temperature: float) -> EvalReport:
    greedy = temperature <= 1e-5 and settings.get("mode", "decode") == "decode"
    names = list(dict.fromkeys(r.benchmark for r in records))
    stats = {name: summarize([r for r in records if r.benchmark == name], depth, greedy) for name in names}
    stats["overall"] = summarize(records, depth, greedy)
    return EvalReport(settings, stats, list(records))


# --- outputs ---------------------------------------------------------------------------------------


def _fmt(x: float, spec: str = ".2f") -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def summary_markdown(report: EvalReport) -> str:
    s = report.settings
    depth = len(report.overall.accept_rates)
    acc_cols = " | ".join(f"acc≥{i}" for i in range(1, depth + 1))
    kind = "EAGLE-3" if s.get("drafter_type") == "eagle3" else "EAGLE-1"
    simulated = s.get("mode") == "simulate"
    mode = ("simulated (exact T = 0 replay of the decoder on the cached greedy continuation; no wall-clock "
            "timing, no baseline)" if simulated else "real decoding (EAGLE and the baseline, timed)")
    lines = [f"# {kind} evaluation: {Path(s['drafter']).name}", "", f"- mode: {mode}",
             f"- target `{s['target']}`, drafter `{s['drafter']}`",
             f"- temperature {s['temperature']}, max_new_tokens {s['max_new_tokens']}, seed {s['seed']}, "
             f"{s['prompts']} prompts ({s['turns_decoded']} turns decoded, {s['turns_skipped_too_long']} too long)",
             f"- device {s.get('device', 'cpu')}, dtype {s.get('dtype', 'fp32')} (target, drafter and baseline)",
             f"- tree: {s['tree']}; baseline: {s['baseline']}; torch threads: {s['torch_threads']}",
             f"- τ = {s['tau_formula']}; τ_host = EAGLE's untruncated new_tokens / (idx + 1); "
             f"[95 % bootstrap interval over prompts, {report.overall.ci_resamples} resamples]", "",
             f"| benchmark | prompts | tokens | cycles | τ | τ_host | {acc_cols} | EAGLE tok/s | baseline tok/s "
             f"| speedup | mismatches |",
             "|" + "---|" * (10 + depth)]
    for name, b in report.stats.items():
        rates = " | ".join(_fmt(r) for r in b.accept_rates)
        checked = "n/a (simulated)" if simulated else "n/a (T > 0)" if b.mismatches is None else b.mismatches
        lines.append(f"| {name} | {b.prompts} | {b.new_tokens} | {b.cycles} | {_tau_text(b)} | {_fmt(b.tau_host)} "
                     f"| {rates} | {_fmt(b.eagle_tokens_per_s, '.1f')} | {_fmt(b.baseline_tokens_per_s, '.1f')} "
                     f"| {_fmt(b.speedup)}× | {checked} |")
    if report.overall.mismatches:
        lines += ["", mismatch_note(report.overall.mismatches, report.overall.prompts, s)]
    if "topk_by_depth" in s:
        lines += ["", *depth_table(s["topk_by_depth"])]
    if s.get("device", "cpu") == "cpu":
        lines += ["", "CPU wall-clock timings: speedups here do not predict GPU serving speedups."]
    lines += ["", "See docs/evaluation.md for the counting rules."]
    return "\n".join(lines) + "\n"


def mismatch_note(mismatches: int, turns: int, settings: dict) -> str:
    """The line a report prints when EAGLE's greedy output differs from the baseline's (never hidden)."""
    where = f"{settings.get('dtype', 'fp32')} on {settings.get('device', 'cpu')}"
    return (f"**{mismatches} of {turns} turns differ from the baseline's greedy output ({where}).** In fp32 this "
            "is a bug or a rare near-tie; in bf16/fp16 two logits within rounding of each other (a near-tie) are "
            "broken differently by the tree and the plain forward: docs/evaluation.md, \"Exactness on a GPU\".")


def depth_table(by_depth: dict) -> list[str]:
    """Markdown lines: top-1 / top-3 acceptance at each draft depth (`simulate.topk_by_depth`)."""
    depth = by_depth["depth"]
    lines = ["Top-1 / top-3 acceptance at each draft depth (every root of the greedy continuation drafted as a "
             "chain, earlier drafts forced right):", "",
             "| benchmark | roots | " + " | ".join(f"depth {d}" for d in range(1, depth + 1)) + " |",
             "|" + "---|" * (depth + 2)]
    for name, row in by_depth["benchmarks"].items():
        cells = " | ".join(f"{a:.2f} / {b:.2f}" for a, b in zip(row["top1"], row["top3"]))
        lines.append(f"| {name} | {row['roots']} | {cells} |")
    return lines


def _tau_text(b: BenchStats) -> str:
    """'1.52 [1.47, 1.58]' (τ and its bootstrap interval)."""
    if not b.tau_ci:
        return _fmt(b.tau)
    return f"{_fmt(b.tau)} [{_fmt(b.tau_ci[0])}, {_fmt(b.tau_ci[1])}]"


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_report(report: EvalReport, out_dir: Path) -> list[Path]:
    plt = _plt()
    names = [n for n in report.stats if n != "overall"] + ["overall"]
    depth = len(report.overall.accept_rates)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    width = 0.8 / len(names)
    for j, name in enumerate(names):
        hist = report.stats[name].accept_hist
        total = max(sum(hist), 1)
        ax.bar([i + j * width for i in range(depth + 1)], [h / total for h in hist], width, label=name)
    ax.set(xlabel="accepted draft tokens per cycle (bonus excluded)", ylabel="fraction of cycles",
           xticks=[i + 0.4 - width / 2 for i in range(depth + 1)], xticklabels=range(depth + 1))
    ax.legend(fontsize=8)
    fig.tight_layout()
    hist_path = out_dir / "accept_hist.png"
    fig.savefig(hist_path, dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 3.5))
    taus = [report.stats[n].tau for n in names]
    ax.bar(names, taus, color="tab:blue")
    for x, tau in enumerate(taus):
        ax.text(x, tau, _fmt(tau), ha="center", va="bottom", fontsize=8)
    ax.set(ylabel="τ (tokens per cycle, bonus included)", title="acceptance length per benchmark")
    fig.tight_layout()
    tau_path = out_dir / "tau.png"
    fig.savefig(tau_path, dpi=100)
    plt.close(fig)
    return [hist_path, tau_path]


def write_report(report: EvalReport, out_dir: Path) -> None:
    """report.json, summary.md, accept_hist.png, tau.png into an existing directory."""
    (out_dir / "report.json").write_text(json.dumps(report.to_dict(), indent=2, allow_nan=True) + "\n")
    (out_dir / "summary.md").write_text(summary_markdown(report))
    plot_report(report, out_dir)


# --- compare outputs -------------------------------------------------------------------------------


def _relative(value: float, reference: float) -> str:
    return f" ({(value / reference - 1) * 100:+.1f}%)" if reference and math.isfinite(reference) else ""


def paired_tau_changes(reports: dict[str, EvalReport]) -> dict[str, dict[str, intervals.Interval]]:
    """Per drafter (all but the first) and benchmark (plus "overall"): τ / τ_ref − 1 with a paired bootstrap
    interval over the prompts both decoded (matched by benchmark and prompt id)."""
    ref_name, ref = next(iter(reports.items()))
    out = {}
    for name, rep in reports.items():
        if name == ref_name:
            continue
        mine = {(r.benchmark, r.prompt_id): r for r in rep.records}
        if len(mine) != len(rep.records) or len({(r.benchmark, r.prompt_id) for r in ref.records}) != len(ref.records):
            raise ValueError("paired statistics need one record per (benchmark, prompt id); the reports repeat one")
        pairs = [(r, mine[(r.benchmark, r.prompt_id)]) for r in ref.records if (r.benchmark, r.prompt_id) in mine]
        out[name] = {}
        for bench in ref.stats:
            sel = [(a, b) for a, b in pairs if bench == "overall" or a.benchmark == bench]
            out[name][bench] = intervals.paired_relative_interval(
                [a.new_tokens for a, _ in sel], [a.cycles for a, _ in sel],
                [b.new_tokens for _, b in sel], [b.cycles for _, b in sel])
    return out


def compare_markdown(reports: dict[str, EvalReport]) -> str:
    """τ (with its interval) and speedup per benchmark per drafter; τ change vs the first drafter with a
    paired bootstrap interval."""
    first = next(iter(reports.values()))
    benches = list(first.stats)
    changes = paired_tau_changes(reports)
    simulated = first.settings.get("mode") == "simulate"
    lines = ["| drafter | " + " | ".join(f"{b} τ | {b} speedup" for b in benches) + " |",
             "|---|" + "---|---|" * len(benches)]
    for name, rep in reports.items():
        cells = []
        for b in benches:
            mine, ref = rep.stats[b], first.stats[b]
            tau_rel = f" ({changes[name][b].percent()})" if name in changes else ""
            speed = "n/a (simulated)" if simulated else f"{_fmt(mine.speedup)}×" + (
                "" if rep is first else _relative(mine.speedup, ref.speedup))
            cells.append(f"{_tau_text(mine)}{tau_rel} | {speed}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    s = first.settings
    n_res = next((iv.resamples for ch in changes.values() for iv in ch.values()), first.overall.ci_resamples)
    n_pairs = next((ch["overall"].prompts for ch in changes.values()), first.overall.prompts)
    lines += ["", f"Mode: {'simulated (exact T = 0 replay)' if simulated else 'real decoding'}. Same prompts and "
              f"settings for every drafter: T={s['temperature']}, max_new_tokens={s['max_new_tokens']}, seed "
              f"{s['seed']}, {s['prompts']} prompts. τ [95 % bootstrap interval over prompts]; (τ change vs "
              f"{next(iter(reports))} [paired 95 % bootstrap interval], {n_pairs} paired prompts overall, "
              f"{n_res} resamples)." + ("" if simulated else f" Baseline: {s['baseline']}, re-timed per drafter.")]
    return "\n".join(lines) + "\n"


def plot_compare(reports: dict[str, EvalReport], path: Path) -> None:
    plt = _plt()
    benches = list(next(iter(reports.values())).stats)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    width = 0.8 / len(reports)
    for ax, metric, label in ((axes[0], "tau", "τ"), (axes[1], "speedup", "speedup ×")):
        for j, (name, rep) in enumerate(reports.items()):
            ax.bar([i + j * width for i in range(len(benches))],
                   [getattr(rep.stats[b], metric) for b in benches], width, label=name)
        ax.set(ylabel=label, xticks=[i + 0.4 - width / 2 for i in range(len(benches))], xticklabels=benches)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_compare(reports: dict[str, EvalReport], out_dir: Path) -> None:
    """One report subdirectory per drafter, compare.md, compare.json, compare.png into an existing directory."""
    for name, rep in reports.items():
        (out_dir / name).mkdir()
        write_report(rep, out_dir / name)
    (out_dir / "compare.md").write_text(compare_markdown(reports))
    changes = paired_tau_changes(reports)
    blob = {name: {b: asdict(s) for b, s in rep.stats.items()} for name, rep in reports.items()}
    for name, per_bench in changes.items():
        for b, iv in per_bench.items():
            blob[name][b]["tau_change_vs_reference"] = {**iv._asdict(), "text": iv.percent(),
                                                        "reference": next(iter(reports)), "paired": True}
    (out_dir / "compare.json").write_text(json.dumps(
        {"mode": next(iter(reports.values())).settings.get("mode", "decode"), "drafters": blob}, indent=2) + "\n")
    plot_compare(reports, out_dir / "compare.png")
