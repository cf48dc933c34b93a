"""`ppow eval` / `ppow compare`: acceptance length τ and wall-clock speedup of an EAGLE-1 or EAGLE-3 drafter.

    ppow eval --drafter runs/sft/drafter --benchmarks mt_bench --num-prompts 80 --out eval/sft
    ppow compare runs/sft/drafter runs/ppow/drafter --names sft,ppow --num-prompts 80 --out eval/cmp

Per prompt, in one process: the host's `eagenerate` (static tree `mc_sim_7b_63`, via
`eagle_compat.host_generate`), then plain autoregressive decoding of the same target with HF `generate`
(KV cache, greedy or sampling) on a separate `AutoModelForCausalLM` copy. EAGLE-3 drafter dirs (detected by
`formats.load_drafter`) are decoded instead with our dynamic tree (`tree_decode.generate_eagle3`, `--depth`,
`--top-k`, `--total-tokens`) over the host target, with the same accounting. Each decoded turn becomes a
`PromptRecord`; what counts (kept tokens, counted cycles, τ, acceptance rates, tokens/s) and the written
report.json / summary.md / PNGs are `eval_report.py`'s (counting rules there and in docs/evaluation.md).

Where we depart from EAGLE's evaluation scripts (`gen_ea_answer_*`, `speed.py`):
1. Overshoot and post-EOS tokens are not counted (EAGLE counts them); `tau_host` keeps EAGLE's number.
2. The baseline is HF `generate`, not the host's `naive_generate` (argmax-only in eagle-llm 1.2.1, and
   built on the code under test); it also gives an independent losslessness check at T = 0.
3. Speeds are ratios of sums over a benchmark, not means of per-question speeds; baseline tokens are
   counted as ids, not by re-tokenizing text. One warm-up per path instead of three.
"""

from __future__ import annotations

import math
import platform
import random
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from ppow_plugin import devices, outputs
from ppow_plugin.evaluation import eval_report, simulate, tree_decode
from ppow_plugin.evaluation.decode_positions import (MARGIN_TOKENS, decode_margin, kv_positions,
                                                     turn_lengths, format_turns as _format)
from ppow_plugin.evaluation.inputs import drafter_format, host_drafter_dir, resolve_target, weights_sha256
from ppow_plugin.host import eagle_compat
from ppow_plugin.data.eval_prompts import (  # noqa: F401  (re-exported: evaluate.EvalPrompt, ...)
    ALL_BENCHMARKS, BENCHMARKS, EvalPrompt, load_prompts, read_prompt_file, resolve_benchmarks)
from ppow_plugin.errors import UserError

WARMUP_TOKENS = 8
BASELINE = "HF transformers generate() on an AutoModelForCausalLM copy of the target (KV cache, {dtype}, {device})"

# --- inputs: benchmarks, prompts, drafter/target fit -----------------------------------------------


# EvalPrompt, BENCHMARKS, ALL_BENCHMARKS, resolve_benchmarks, load_prompts, read_prompt_file: eval_prompts.py


# --- decoding --------------------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class Eagle3Tree(NamedTuple):
    """Dynamic-tree sizes for EAGLE-3 drafters (`tree_decode.generate_eagle3`; EAGLE's defaults)."""
    depth: int = 7              # expansion levels after the root's children: up to depth + 1 drafts per cycle
    top_k: int = 10             # children per expanded node and frontier width
    total_tokens: int = 60      # draft nodes kept per tree


class _Decoders(NamedTuple):
    ea_model: Any               # host EaModel (None for an EAGLE-3 drafter)
    baseline: Any               # HF AutoModelForCausalLM
    tokenizer: Any
    eos_token_id: int | None
    max_positions: int          # the target's context
    eagle3: Any = None          # (host target, Eagle3Drafter, host KV cache) for an EAGLE-3 drafter
    tree: Eagle3Tree = Eagle3Tree()
    device: torch.device = torch.device("cpu")  # where every model above runs (prompt ids are moved there)
    positions: int | None = None  # what the target's KV cache holds (`kv_positions`); None: the context

    @property
    def margin(self) -> int:
        """Positions past prompt + max_new_tokens that the last cycle's tree and overshoot may use."""
        return decode_margin(self.tree if self.eagle3 is not None else None)


def _baseline_generate(dec: _Decoders, ids: torch.Tensor, temperature: float, max_new_tokens: int) -> list[int]:
    sampling = ({"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0}
                if temperature > 1e-5 else {"do_sample": False})
    out = dec.baseline.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                eos_token_id=dec.eos_token_id, pad_token_id=dec.eos_token_id, **sampling)
    return out[0, ids.shape[1]:].tolist()


def _host_generate(dec: _Decoders, ids: torch.Tensor, temperature: float, max_new_tokens: int):
    if dec.eagle3 is not None:  # same output fields as HostGenerateResult
        target, drafter, kv = dec.eagle3
        return tree_decode.generate_eagle3(target, drafter, ids, max_new_tokens, temperature, *dec.tree,
                                           eos_token_id=dec.eos_token_id, kv_cache=kv)
    max_length = min(ids.shape[1] + max_new_tokens + MARGIN_TOKENS, dec.max_positions)
    return eagle_compat.host_generate(dec.ea_model, ids, temperature=temperature,
                                      max_new_tokens=max_new_tokens, max_length=max_length)


def _decode_turn(dec: _Decoders, prompt: EvalPrompt, turn_id: str, ids: torch.Tensor, temperature: float,
                 max_new_tokens: int, seed: int) -> tuple[eval_report.PromptRecord, list[int]]:
    seed_everything(seed)
    devices.synchronize(dec.device)  # on a GPU both timings wait for their own kernels, and only for those
    start = time.perf_counter()
    host = _host_generate(dec, ids, temperature, max_new_tokens)
    devices.synchronize(dec.device)
    eagle_seconds = time.perf_counter() - start
    seed_everything(seed)
    start = time.perf_counter()
    base_tokens = _baseline_generate(dec, ids, temperature, max_new_tokens)
    devices.synchronize(dec.device)
    baseline_seconds = time.perf_counter() - start

    kept = eval_report.truncate_generation(host.output_ids[0, ids.shape[1]:].tolist(), host.accept_lengths,
                               dec.eos_token_id, max_new_tokens)
    base_kept = base_tokens[: eval_report.kept_length(base_tokens, dec.eos_token_id, max_new_tokens)]
    mismatch = eval_report.first_mismatch(kept.tokens, base_kept) if temperature <= 1e-5 else None
    record = eval_report.PromptRecord(prompt.benchmark, turn_id, ids.shape[1], len(kept.tokens), kept.cycles,
                          kept.accept_lengths, host.new_tokens, host.cycles, eagle_seconds,
                          len(base_kept), baseline_seconds, mismatch)
    return record, kept.tokens


def _decode_prompt(dec: _Decoders, prompt: EvalPrompt, temperature: float, max_new_tokens: int,
                   seed: int) -> list[eval_report.PromptRecord]:
    """All turns of one prompt; a later turn sees the EAGLE answers to the earlier ones."""
    records, answers = [], []
    for t in range(len(prompt.turns)):
        ids = _format(dec.tokenizer, prompt.turns[: t + 1], answers).to(dec.device)
        if ids.shape[1] + max_new_tokens + dec.margin > dec.max_positions:
            break  # does not fit the target's context: skipped
        if dec.positions is not None and ids.shape[1] + max_new_tokens + dec.margin > dec.positions:
            raise UserError(f"turn {t + 1} of prompt {prompt.prompt_id} has {ids.shape[1]} tokens, more than the "
                            f"KV cache sized for this evaluation ({dec.positions} positions) allows with "
                            f"--max-new-tokens {max_new_tokens}; drop --both-turns or raise --max-new-tokens")
        turn_id = prompt.prompt_id if len(prompt.turns) == 1 else f"{prompt.prompt_id}/turn{t + 1}"
        record, tokens = _decode_turn(dec, prompt, turn_id, ids, temperature, max_new_tokens, seed * 1000 + t)
        records.append(record)
        answers.append(dec.tokenizer.decode(tokens, skip_special_tokens=True))
    return records


def _load_decoders(target_dir: Path, drafter_dir: Path, scratch: Path, fmt: str = "eagle1",
                   tree: Eagle3Tree = Eagle3Tree(), place: devices.Placement = devices.CPU_FP32,
                   prompts: Sequence[EvalPrompt] = (), max_new_tokens: int = 0) -> _Decoders:
    """The EAGLE decoder and the HF baseline, both in `place.dtype` on `place.device`. The target's KV cache
    and rotary tables hold what `prompts` reach (`kv_positions`; no prompts: the full context). The HF
    baseline's cache grows with each decode (transformers' dynamic cache): nothing to size."""
    from transformers import AutoTokenizer

    from ppow_plugin.data import continuations
    baseline = continuations.hf_model(target_dir, place)
    tokenizer = AutoTokenizer.from_pretrained(str(target_dir))
    max_positions = int(baseline.config.max_position_embeddings)
    positions = kv_positions(turn_lengths(tokenizer, prompts, max_new_tokens), max_new_tokens,
                             decode_margin(tree if fmt == "eagle3" else None), max_positions) if prompts else None
    if fmt == "eagle3":
        from ppow_plugin.drafters import adapters
        target = eagle_compat.load_host_target(target_dir, place.dtype, place.device, positions)
        drafter = adapters.load_eagle3_drafter(drafter_dir, target, place.dtype).to(place.device).eval()
        return _Decoders(None, baseline, tokenizer, tokenizer.eos_token_id, max_positions,
                         (target, drafter, eagle_compat.new_kv_cache(target, positions)), tree, place.device, positions)
    host_dir = host_drafter_dir(drafter_dir, baseline.get_input_embeddings().weight, scratch)
    ea_model = eagle_compat.load_ea_model(target_dir, host_dir, place.dtype, place.device, positions)
    return _Decoders(ea_model, baseline, tokenizer, tokenizer.eos_token_id, max_positions, device=place.device,
                     positions=positions)


def _tree_depth(dec: _Decoders) -> int:
    """Most draft tokens one cycle can accept."""
    if dec.eagle3 is not None:
        return dec.tree.depth + 1
    return max(len(path) for path in eagle_compat.default_tree_choices())


def _tree_text(dec: _Decoders) -> str:
    if dec.eagle3 is None:
        return "host default mc_sim_7b_63 (25 draft nodes + root, depth 5)"
    t = dec.tree
    return f"EAGLE-3 dynamic tree (depth {t.depth}, top-k {t.top_k}, {t.total_tokens} draft nodes + root)"


def evaluate(target_dir: str | Path, drafter_dir: str | Path, benchmarks: str | Sequence[str] = ALL_BENCHMARKS,
             num_prompts: int = 80, temperature: float = 0.0, max_new_tokens: int = 128, seed: int = 0,
             out_dir: str | Path | None = None, both_turns: bool = False,
             prompts: Sequence[EvalPrompt] | None = None, progress: bool = True,
             tree: Eagle3Tree = Eagle3Tree(), simulate: bool = False, sim_tree=None,
             per_depth: bool = False, placement: devices.Placement | None = None) -> eval_report.EvalReport:
    """Decode every prompt with EAGLE and with the baseline, interleaved (or simulate, T = 0 only);
    aggregate; optionally write.

    Args:
        target_dir: "default" or a local HF Llama directory.
        drafter_dir: an EAGLE-1 drafter, compact (model.safetensors, no embeddings) or host layout.
        benchmarks: names from BENCHMARKS, a list or a comma-separated string.
        num_prompts: prompts per benchmark (the first ones, so subsets are nested).
        temperature: 0 = greedy (then EAGLE must equal the baseline); > 0 samples (seeded per prompt).
        max_new_tokens: budget per turn; overshoot and post-EOS tokens are not counted.
        seed: turn t of prompt i (0-based) decodes with seed `(seed + i) * 1000 + t`, on both paths.
        out_dir: if given, report.json, summary.md and PNG plots are written there (atomically).
        both_turns: MT-Bench second turns too, after the model's own first answer.
        prompts: an explicit prompt list (overrides benchmarks/num_prompts; `compare` shares one).
        tree: dynamic-tree sizes, used only for EAGLE-3 drafters.
        simulate: replay decoding on the target's cached greedy continuation (`simulate.py`): same τ and
            acceptance as decoding at T = 0, no timing, no baseline, first turns only.
        sim_tree: with `simulate`, a `simulate.StaticTree` (e.g. `simulate.chain(4)`) instead of the
            decoder's tree.
        per_depth: with `simulate`, also top-1 / top-3 acceptance at each draft depth
            (`simulate.topk_by_depth`, in settings["topk_by_depth"]; costs about one more simulation).
        placement: device and dtype of the target, drafter and baseline (`devices.resolve_placement`);
            None resolves `auto` here (a GPU in bf16 when CUDA is available, else CPU fp32).
    Returns:
        eval_report.EvalReport (per-benchmark and "overall" BenchStats, per-prompt records).
    Raises:
        UserError: drafter and target do not fit, unknown benchmark, empty prompt set, max_new_tokens < 1.
    """
    from tqdm import tqdm

    if max_new_tokens < 1:
        raise UserError(f"--max-new-tokens {max_new_tokens} must be >= 1")
    if temperature < 0 or not math.isfinite(temperature):
        raise UserError(f"--temperature {temperature} must be a finite number >= 0")
    if simulate and temperature > 1e-5:
        raise UserError(f"--simulate replays greedy decoding; it needs --temperature 0 (got {temperature})")
    if simulate and both_turns:
        raise UserError("--simulate measures first turns only; drop --both-turns (or drop --simulate)")
    if sim_tree is not None and not simulate:
        raise UserError("--chain applies to --simulate only; add --simulate")
    if per_depth and not simulate:
        raise UserError("--per-depth applies to --simulate only; add --simulate")
    if tree.depth < 0 or tree.top_k < 1 or tree.total_tokens < 1:
        raise UserError(f"EAGLE-3 tree sizes --depth {tree.depth} --top-k {tree.top_k} --total-tokens "
                        f"{tree.total_tokens}: need depth >= 0 and top-k, total-tokens >= 1")
    # prompt checks (names, counts) before the target is prepared or any model is read
    prompts = list(prompts) if prompts is not None else load_prompts(benchmarks, num_prompts, both_turns)
    target_dir, drafter_dir = resolve_target(target_dir), Path(drafter_dir)
    fmt = drafter_format(target_dir, drafter_dir)
    if not prompts:
        raise UserError("the prompt set is empty; pass a positive --num-prompts")
    eagle_compat.require_host()
    place = placement or devices.resolve_placement()
    if simulate:
        return _simulated(target_dir, drafter_dir, fmt, prompts, max_new_tokens, seed, out_dir, progress,
                          sim_tree or (tree if fmt == "eagle3" else None), per_depth, place)
    with tempfile.TemporaryDirectory(prefix="ppow-eval-") as scratch:
        dec = _load_decoders(target_dir, drafter_dir, Path(scratch), fmt, tree, place, prompts, max_new_tokens)
        _warm_up(dec, prompts[0], temperature, seed)
        records: list[eval_report.PromptRecord] = []
        bar = tqdm(prompts, desc=f"eval {drafter_dir.name}", unit="prompt", disable=not progress)
        for i, prompt in enumerate(bar):
            records += _decode_prompt(dec, prompt, temperature, max_new_tokens, seed + i)
            tau = eval_report.ratio(sum(r.new_tokens for r in records), sum(r.cycles for r in records))
            bar.set_postfix(tau=f"{tau:.2f}")
    if not records:
        raise UserError(f"every prompt is longer than the target's context minus --max-new-tokens "
                        f"{max_new_tokens}; lower --max-new-tokens")
    settings = _settings(target_dir, drafter_dir, prompts, records, temperature, max_new_tokens, seed, both_turns,
                         place)
    settings.update(tree=_tree_text(dec), drafter_type=fmt, mode="decode",  # the weight hash ties the report
                    drafter_weights_sha256=weights_sha256(drafter_dir))     # to the drafter
    report = eval_report.build_report(records, settings, _tree_depth(dec), temperature)
    if out_dir is not None:
        with outputs.atomic_dir(Path(out_dir)) as tmp:
            eval_report.write_report(report, tmp)
    return report


def _simulated(target_dir: Path, drafter_dir: Path, fmt: str, prompts: Sequence[EvalPrompt], max_new_tokens: int,
               seed: int, out_dir, progress: bool, tree, per_depth: bool, place: devices.Placement
               ) -> eval_report.EvalReport:
    """`evaluate(..., simulate=True)`: cached greedy continuations, then `simulate.simulate_records`."""
    from transformers import AutoTokenizer

    from ppow_plugin.data import continuations
    tokenizer = AutoTokenizer.from_pretrained(str(target_dir))
    target = eagle_compat.load_host_target(target_dir, place.dtype, place.device)
    drafter = simulate.load_drafter(fmt, drafter_dir, target)  # in the target's dtype, on its device
    tree = tree if tree is not None else simulate.host_tree()
    length = simulate.continuation_length(max_new_tokens, tree)
    ids, keys = [], []
    for p in prompts:
        x = _format(tokenizer, p.turns[:1], [])[0].tolist()
        if len(x) + length <= target.config.max_position_embeddings:  # else skipped, as in decoding
            ids.append(x)
            keys.append((p.benchmark, p.prompt_id))
    if not ids:
        raise UserError(f"every prompt is longer than the target's context minus --max-new-tokens "
                        f"{max_new_tokens}; lower --max-new-tokens")
    layers = drafter.cfg.feature_layer_ids if fmt == "eagle3" else None
    start = time.perf_counter()
    conts, cost = continuations.load_continuations(target_dir, target, ids, length, layers, progress, place)
    cache_seconds = time.perf_counter() - start
    start = time.perf_counter()
    records = simulate.simulate_records(fmt, drafter, target, conts, keys, max_new_tokens, tree,
                                        tokenizer.eos_token_id, progress)
    settings = _settings(target_dir, drafter_dir, prompts, records, 0.0, max_new_tokens, seed, False, place)
    settings.update(mode="simulate", drafter_type=fmt, tree=simulate.tree_text(tree),
                    drafter_weights_sha256=weights_sha256(drafter_dir),
                    baseline="none (simulated)", simulate_seconds=time.perf_counter() - start,
                    continuation_cache={**cost, "load_or_build_s": cache_seconds, "length": length})
    if per_depth:
        depth = simulate.tree_depth(tree)
        settings["topk_by_depth"] = {"depth": depth, "benchmarks": simulate.topk_by_depth(
            fmt, drafter, target, conts, [b for b, _ in keys], max_new_tokens, depth, tokenizer.eos_token_id)}
    report = eval_report.build_report(records, settings, simulate.tree_depth(tree), 0.0)
    if out_dir is not None:
        with outputs.atomic_dir(Path(out_dir)) as tmp:
            eval_report.write_report(report, tmp)
    return report


def simulate_tau(drafter_dir: str | Path, target_dir: str | Path = "default", benchmarks: str = "mt_bench",
                 num_prompts: int = 80, max_new_tokens: int = 128, tree=None, progress: bool = False) -> float:
    """Simulated τ (kept tokens / counted cycles, as `ppow eval`) of a drafter dir on benchmark prompts.

    Args:
        tree: None = what `ppow eval` uses (EAGLE-1: the host's static tree; EAGLE-3: the default dynamic
            tree), or a `simulate.StaticTree` (e.g. `simulate.chain(5)`) or an `Eagle3Tree`.
    """
    report = evaluate(target_dir, drafter_dir, benchmarks, num_prompts, max_new_tokens=max_new_tokens,
                      progress=progress, simulate=True, sim_tree=tree)
    return report.overall.tau


def _warm_up(dec: _Decoders, prompt: EvalPrompt, temperature: float, seed: int) -> None:
    """One untimed short decode per path (allocates the host KV cache, warms kernels)."""
    ids = _format(dec.tokenizer, prompt.turns[:1], []).to(dec.device)
    if ids.shape[1] + WARMUP_TOKENS + dec.margin <= (dec.positions or dec.max_positions):
        seed_everything(seed)
        _host_generate(dec, ids, temperature, WARMUP_TOKENS)
        _baseline_generate(dec, ids, temperature, WARMUP_TOKENS)


def _settings(target_dir: Path, drafter_dir: Path, prompts: Sequence[EvalPrompt],
              records: Sequence[eval_report.PromptRecord], temperature: float, max_new_tokens: int, seed: int,
              both_turns: bool, place: devices.Placement) -> dict[str, Any]:
    import transformers

    import ppow_plugin
    turns = sum(len(p.turns) for p in prompts)
    return {"target": str(target_dir), "drafter": str(drafter_dir), "temperature": temperature,
            "max_new_tokens": max_new_tokens, "seed": seed, "both_turns": both_turns,
            "benchmarks": list(dict.fromkeys(p.benchmark for p in prompts)),
            "prompts": len(prompts), "turns_decoded": len(records), "turns_skipped_too_long": turns - len(records),
            "tree": "host default mc_sim_7b_63 (25 draft nodes + root, depth 5)",
            "baseline": BASELINE.format(**place.describe()), **place.describe(),
            "tau_formula": "sum(kept new tokens) / sum(counted cycles), bonus token included",
            "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
            "versions": {"ppow_plugin": ppow_plugin.__version__, "torch": torch.__version__,
                         "transformers": transformers.__version__, "eagle_llm": eagle_compat.host_version()}}


# --- compare ---------------------------------------------------------------------------------------


def compare(target_dir: str | Path, drafter_dirs: Sequence[str | Path], names: Sequence[str] | None = None,
            benchmarks: str | Sequence[str] = ALL_BENCHMARKS, num_prompts: int = 80, temperature: float = 0.0,
            max_new_tokens: int = 128, seed: int = 0, out_dir: str | Path | None = None,
            both_turns: bool = False, progress: bool = True, tree: Eagle3Tree = Eagle3Tree(),
            simulate: bool = False, sim_tree=None, prompts: Sequence[EvalPrompt] | None = None,
            per_depth: bool = False, placement: devices.Placement | None = None
            ) -> dict[str, eval_report.EvalReport]:
    """Evaluate several drafters on one prompt list with one protocol; write compare.md/.json/.png and
    one report subdirectory per drafter into `out_dir` (atomically).

    Raises:
        UserError: names do not match the drafters, or any `evaluate` error.
    """
    if not drafter_dirs:
        raise UserError("compare needs at least one drafter directory")
    names = list(names) if names else [Path(d).name for d in drafter_dirs]
    if len(names) != len(drafter_dirs) or len(set(names)) != len(names):
        raise UserError(f"--names needs {len(drafter_dirs)} distinct names (got {names}); one per drafter")
    prompts = list(prompts) if prompts is not None else load_prompts(benchmarks, num_prompts, both_turns)
    target_dir = resolve_target(target_dir)
    for d in drafter_dirs:  # fail before any decoding
        drafter_format(target_dir, Path(d))
    placement = placement or devices.resolve_placement()  # once, for every drafter
    reports = {name: evaluate(target_dir, d, temperature=temperature, max_new_tokens=max_new_tokens, seed=seed,
                              both_turns=both_turns, prompts=prompts, progress=progress, tree=tree,
                              simulate=simulate, sim_tree=sim_tree, per_depth=per_depth, placement=placement)
               for name, d in zip(names, drafter_dirs)}
    if out_dir is not None:
        with outputs.atomic_dir(Path(out_dir)) as tmp:
            eval_report.write_compare(reports, tmp)
    return reports
