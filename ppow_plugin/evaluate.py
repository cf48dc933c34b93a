"""`ppow eval` / `ppow compare`: acceptance length τ and wall-clock speedup of an EAGLE-1 or EAGLE-3 drafter.

    ppow eval --drafter runs/sft/drafter --benchmarks mt_bench --num-prompts 80 --out eval/sft
    ppow compare runs/sft/drafter runs/ppow/drafter --names sft,ppow --num-prompts 80 --out eval/cmp

Per prompt, in one process: the host's `eagenerate` (static tree `mc_sim_7b_63`, via
`eagle_compat.host_generate`), then plain autoregressive decoding of the same target with HF `generate`
(KV cache, greedy or sampling) on a separate `AutoModelForCausalLM` copy. EAGLE-3 drafter dirs (detected by
`export.load_drafter`) are decoded instead with our dynamic tree (`tree_decode.generate_eagle3`, `--depth`,
`--top-k`, `--total-tokens`) over the host target, with the same accounting. Counting rules (docs/evaluation.md):

- The host commits whole cycles, so its output can run past the first EOS and past `max_new_tokens`.
  Both outputs are cut at the first EOS (kept) or at `max_new_tokens`, whichever comes first
  (`truncate_generation`). A cycle counts if at least one of its tokens is kept.
- τ = Σ kept tokens / Σ counted cycles, bonus token included (one cycle commits accept_len + 1
  tokens; cycles = EAGLE's `idx + 1`). EAGLE's own figure (untruncated) is reported as `tau_host`.
- Acceptance rate at position i = fraction of counted cycles with accept_len >= i, using each cycle's
  accept_len as verified (a partly kept last cycle keeps its full accept_len).
- tokens/s = Σ kept tokens / Σ wall seconds; speedup = EAGLE tokens/s ÷ baseline tokens/s.

Where we depart from EAGLE's evaluation scripts (`gen_ea_answer_*`, `speed.py`):
1. Overshoot and post-EOS tokens are not counted (EAGLE counts them); `tau_host` keeps EAGLE's number.
2. The baseline is HF `generate`, not the host's `naive_generate` (argmax-only in eagle-llm 1.2.1, and
   built on the code under test); it also gives an independent losslessness check at T = 0.
3. Speeds are ratios of sums over a benchmark, not means of per-question speeds; baseline tokens are
   counted as ids, not by re-tokenizing text. One warm-up per path instead of three.
"""

from __future__ import annotations

import difflib
import json
import math
import platform
import random
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from ppow_plugin import data, eagle_compat, export, tree_decode
from ppow_plugin.errors import UserError

MARGIN_TOKENS = 64  # room past prompt + max_new_tokens for the last cycle's tree (26 tokens) and overshoot
WARMUP_TOKENS = 8
BASELINE = "HF transformers generate() on an AutoModelForCausalLM copy of the target (KV cache, fp32, CPU)"


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


def _ratio(num: float, den: float) -> float:
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
    mismatches: int | None      # prompts whose T = 0 output differs from the baseline; None when T > 0


def summarize(records: Sequence[PromptRecord], depth: int, greedy: bool) -> BenchStats:
    """Aggregate prompt records (ratios of sums)."""
    tokens, cycles = sum(r.new_tokens for r in records), sum(r.cycles for r in records)
    accepts = [a for r in records for a in r.accept_lengths]
    eagle_tps = _ratio(tokens, sum(r.eagle_seconds for r in records))
    base_tps = _ratio(sum(r.baseline_tokens for r in records), sum(r.baseline_seconds for r in records))
    return BenchStats(
        prompts=len(records), new_tokens=tokens, cycles=cycles, tau=_ratio(tokens, cycles),
        tau_host=_ratio(sum(r.host_new_tokens for r in records), sum(r.host_cycles for r in records)),
        accept_rates=acceptance_rates(accepts, depth), accept_hist=accept_histogram(accepts, depth),
        eagle_tokens_per_s=eagle_tps, baseline_tokens_per_s=base_tps, speedup=_ratio(eagle_tps, base_tps),
        mismatches=sum(r.mismatch_at is not None for r in records) if greedy else None)


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


# --- inputs: benchmarks, prompts, drafter/target fit -----------------------------------------------


class EvalPrompt(NamedTuple):
    benchmark: str
    prompt_id: str
    turns: tuple[str, ...]  # user turns answered in order (several only for MT-Bench --both-turns)


def _mt_bench(n: int, both_turns: bool) -> list[EvalPrompt]:
    return [EvalPrompt("mt_bench", str(q.question_id), tuple(q.turns) if both_turns else tuple(q.turns[:1]))
            for q in data.load_mt_bench()[:n]]


def _humaneval(n: int, both_turns: bool) -> list[EvalPrompt]:
    return [EvalPrompt("humaneval", p.task_id, (p.prompt,)) for p in data.load_humaneval()[:n]]


def _sharegpt(n: int, both_turns: bool) -> list[EvalPrompt]:
    """First user turns of held-out ShareGPT conversations (`data.split_of`, default fraction), file order."""
    prompts = []
    for conv in data.load_sharegpt():
        if len(prompts) == n:
            break
        if data.split_of(conv.id) == "heldout":
            first = next(m.content for m in conv.messages if m.role == "user")
            prompts.append(EvalPrompt("sharegpt", conv.id, (first,)))
    return prompts


BENCHMARKS: dict[str, Callable[[int, bool], list[EvalPrompt]]] = {
    "mt_bench": _mt_bench, "humaneval": _humaneval, "sharegpt": _sharegpt}
ALL_BENCHMARKS = ",".join(BENCHMARKS)


def resolve_benchmarks(spec: str | Sequence[str]) -> list[str]:
    """"mt_bench,humaneval" -> ["mt_bench", "humaneval"] (order kept, duplicates dropped).

    Raises:
        UserError: an unknown name (with the nearest known one), or no name at all.
    """
    names = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    if not names:
        raise UserError(f"no benchmark given; pass --benchmarks with some of {', '.join(BENCHMARKS)}")
    for name in names:
        if name not in BENCHMARKS:
            near = difflib.get_close_matches(name, list(BENCHMARKS), n=1, cutoff=0.4)
            hint = f"did you mean {near[0]}?" if near else f"choose from {', '.join(BENCHMARKS)}"
            raise UserError(f"unknown benchmark {name!r}; {hint}")
    return list(dict.fromkeys(names))


def load_prompts(benchmarks: Sequence[str], num_prompts: int, both_turns: bool = False) -> list[EvalPrompt]:
    """The first `num_prompts` prompts of each benchmark, in benchmark order.

    Raises:
        UserError: num_prompts < 1 or the set is empty.
    """
    if num_prompts < 1:
        raise UserError(f"--num-prompts {num_prompts} selects no prompt; pass a positive number")
    prompts = [p for name in resolve_benchmarks(benchmarks) for p in BENCHMARKS[name](num_prompts, both_turns)]
    if not prompts:
        raise UserError(f"benchmarks {', '.join(benchmarks)} gave no prompt; check the datasets (ppow doctor)")
    return prompts


def read_config(path: Path, what: str) -> dict[str, Any]:
    if not (path / "config.json").is_file():
        raise UserError(f"{what} {path} has no config.json; pass a model directory")
    try:
        return json.loads((path / "config.json").read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{path / 'config.json'} is not valid JSON ({exc.msg})") from None


def _attention_shape(cfg: dict[str, Any], where: str) -> dict[str, int]:
    try:
        heads = int(cfg["num_attention_heads"])
        return {"hidden_size": int(cfg["hidden_size"]), "vocab_size": int(cfg["vocab_size"]),
                "num_attention_heads": heads,
                "num_key_value_heads": int(cfg.get("num_key_value_heads") or heads),
                "head_dim": int(cfg.get("head_dim") or int(cfg["hidden_size"]) // heads)}
    except (KeyError, TypeError, ValueError) as exc:
        raise UserError(f"{where}/config.json lacks a usable Llama field ({exc}); is it a Llama config?") from None


def check_fit(target_cfg: dict[str, Any], drafter_cfg: dict[str, Any], target_where: str = "target",
              drafter_where: str = "drafter") -> None:
    """Check from the two config.json dicts that an EAGLE-1 drafter was built for this target.

    Raises:
        UserError: an EAGLE-3 drafter, or a differing hidden size, vocabulary or attention shape.
    """
    if "draft_vocab_size" in drafter_cfg or "target_hidden_size" in drafter_cfg:
        raise UserError(f"{drafter_where} is an EAGLE-3 drafter; the eagle-llm 1.2.1 host evaluates only "
                        "EAGLE-1 drafters (train one with a stage=sft recipe)")
    want, got = _attention_shape(target_cfg, target_where), _attention_shape(drafter_cfg, drafter_where)
    bad = [f"{k} {got[k]} vs target {want[k]}" for k in want if got[k] != want[k]]
    if bad:
        raise UserError(f"drafter {drafter_where} does not fit target {target_where} ({'; '.join(bad)}); "
                        "pass the target the drafter was trained for")


def resolve_target(target: str | Path) -> Path:
    """"default" -> the prepared SmolLM2 target; else a local directory with config.json."""
    if str(target) == "default":
        from ppow_plugin import assets
        return assets.default_target_dir(prepare=True)
    path = Path(target)
    read_config(path, "--target")
    return path


def host_drafter_dir(drafter_dir: Path, embed_weight: torch.Tensor, scratch: Path) -> Path:
    """A directory the host can load: `drafter_dir` itself if it is a host layout with embeddings, else
    a host layout written into `scratch` with the target's embeddings (compact dirs have none)."""
    config, state = export.load_drafter_dir(drafter_dir)
    if config.get("bias", True) != ("fc.bias" in state):
        raise UserError(f"{drafter_dir}: config.json says bias={config.get('bias', True)} but the weights "
                        f"{'lack' if 'fc.bias' not in state else 'have'} fc.bias; re-export the drafter")
    if (drafter_dir / "pytorch_model.bin").is_file() and export.EMBED_KEY in state:
        return drafter_dir
    state.pop(export.EMBED_KEY, None)  # EAGLE-1 drafters share the target's (frozen) embeddings
    return export.write_host_eagle1(scratch / "host_drafter", state, config, embed_weight)


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
    max_positions: int
    eagle3: Any = None          # (host target, Eagle3Drafter, host KV cache) for an EAGLE-3 drafter
    tree: Eagle3Tree = Eagle3Tree()

    @property
    def margin(self) -> int:
        """Positions past prompt + max_new_tokens that the last cycle's tree and overshoot may use."""
        return MARGIN_TOKENS if self.eagle3 is None else self.tree.depth + self.tree.total_tokens + 2


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


def _format(tokenizer, turns: Sequence[str], answers: Sequence[str]) -> torch.Tensor:
    if len(turns) == 1:
        ids = data.format_prompt(tokenizer, turns[0])
    else:
        messages = []
        for i, turn in enumerate(turns):
            messages.append({"role": "user", "content": turn})
            if i < len(answers):
                messages.append({"role": "assistant", "content": answers[i]})
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return torch.tensor([ids], dtype=torch.long)  # [1, P]


def _decode_turn(dec: _Decoders, prompt: EvalPrompt, turn_id: str, ids: torch.Tensor, temperature: float,
                 max_new_tokens: int, seed: int) -> tuple[PromptRecord, list[int]]:
    seed_everything(seed)
    start = time.perf_counter()
    host = _host_generate(dec, ids, temperature, max_new_tokens)
    eagle_seconds = time.perf_counter() - start
    seed_everything(seed)
    start = time.perf_counter()
    base_tokens = _baseline_generate(dec, ids, temperature, max_new_tokens)
    baseline_seconds = time.perf_counter() - start

    kept = truncate_generation(host.output_ids[0, ids.shape[1]:].tolist(), host.accept_lengths,
                               dec.eos_token_id, max_new_tokens)
    base_kept = base_tokens[: kept_length(base_tokens, dec.eos_token_id, max_new_tokens)]
    mismatch = first_mismatch(kept.tokens, base_kept) if temperature <= 1e-5 else None
    record = PromptRecord(prompt.benchmark, turn_id, ids.shape[1], len(kept.tokens), kept.cycles,
                          kept.accept_lengths, host.new_tokens, host.cycles, eagle_seconds,
                          len(base_kept), baseline_seconds, mismatch)
    return record, kept.tokens


def _decode_prompt(dec: _Decoders, prompt: EvalPrompt, temperature: float, max_new_tokens: int,
                   seed: int) -> list[PromptRecord]:
    """All turns of one prompt; a later turn sees the EAGLE answers to the earlier ones."""
    records, answers = [], []
    for t in range(len(prompt.turns)):
        ids = _format(dec.tokenizer, prompt.turns[: t + 1], answers)
        if ids.shape[1] + max_new_tokens + dec.margin > dec.max_positions:
            break  # does not fit the target's context (and the host's preallocated KV cache): skipped
        turn_id = prompt.prompt_id if len(prompt.turns) == 1 else f"{prompt.prompt_id}/turn{t + 1}"
        record, tokens = _decode_turn(dec, prompt, turn_id, ids, temperature, max_new_tokens, seed * 1000 + t)
        records.append(record)
        answers.append(dec.tokenizer.decode(tokens, skip_special_tokens=True))
    return records


def _load_decoders(target_dir: Path, drafter_dir: Path, scratch: Path, fmt: str = "eagle1",
                   tree: Eagle3Tree = Eagle3Tree()) -> _Decoders:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    baseline = AutoModelForCausalLM.from_pretrained(str(target_dir), dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(target_dir))
    max_positions = int(baseline.config.max_position_embeddings)
    if fmt == "eagle3":
        from ppow_plugin import drafters
        target = eagle_compat.load_host_target(target_dir)
        drafter = drafters.load_eagle3_drafter(drafter_dir, target).eval()
        return _Decoders(None, baseline, tokenizer, tokenizer.eos_token_id, max_positions,
                         (target, drafter, eagle_compat.new_kv_cache(target)), tree)
    host_dir = host_drafter_dir(drafter_dir, baseline.get_input_embeddings().weight, scratch)
    ea_model = eagle_compat.load_ea_model(target_dir, host_dir)
    return _Decoders(ea_model, baseline, tokenizer, tokenizer.eos_token_id, max_positions)


def drafter_format(target_dir: Path, drafter_dir: Path) -> str:
    """"eagle1" or "eagle3", read by `export.load_drafter` (which checks an EAGLE-3 dir against the target).

    EAGLE-1 dirs are then checked by `check_fit` and the host loader, with their own messages, as before.
    Raises:
        UserError: an EAGLE-3 dir that is unreadable or does not fit the target, or an EAGLE-1 misfit.
    """
    target_cfg, drafter_cfg = read_config(target_dir, "--target"), read_config(drafter_dir, "--drafter")
    looks_eagle3 = ("draft_vocab_size" in drafter_cfg or "target_hidden_size" in drafter_cfg
                    or "LlamaForCausalLMEagle3" in (drafter_cfg.get("architectures") or []))
    try:
        fmt = export.load_drafter(drafter_dir, target_cfg).format
    except UserError:
        if looks_eagle3:
            raise
        fmt = "eagle1"
    if fmt == "eagle1":
        check_fit(target_cfg, drafter_cfg, str(target_dir), str(drafter_dir))
    return fmt


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
             tree: Eagle3Tree = Eagle3Tree()) -> EvalReport:
    """Decode every prompt with EAGLE and with the baseline, interleaved; aggregate; optionally write.

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
    Returns:
        EvalReport (per-benchmark and "overall" BenchStats, per-prompt records).
    Raises:
        UserError: drafter and target do not fit, unknown benchmark, empty prompt set, max_new_tokens < 1.
    """
    from tqdm import tqdm

    if max_new_tokens < 1:
        raise UserError(f"--max-new-tokens {max_new_tokens} must be >= 1")
    if temperature < 0 or not math.isfinite(temperature):
        raise UserError(f"--temperature {temperature} must be a finite number >= 0")
    if tree.depth < 0 or tree.top_k < 1 or tree.total_tokens < 1:
        raise UserError(f"EAGLE-3 tree sizes --depth {tree.depth} --top-k {tree.top_k} --total-tokens "
                        f"{tree.total_tokens}: need depth >= 0 and top-k, total-tokens >= 1")
    if prompts is None:  # cheap checks before the target is prepared or any dataset is read
        benchmarks = resolve_benchmarks(benchmarks)
        if num_prompts < 1:
            raise UserError(f"--num-prompts {num_prompts} selects no prompt; pass a positive number")
    target_dir, drafter_dir = resolve_target(target_dir), Path(drafter_dir)
    fmt = drafter_format(target_dir, drafter_dir)
    prompts = list(prompts) if prompts is not None else load_prompts(benchmarks, num_prompts, both_turns)
    if not prompts:
        raise UserError("the prompt set is empty; pass a positive --num-prompts")
    eagle_compat.require_host()
    with tempfile.TemporaryDirectory(prefix="ppow-eval-") as scratch:
        dec = _load_decoders(target_dir, drafter_dir, Path(scratch), fmt, tree)
        _warm_up(dec, prompts[0], temperature, seed)
        records: list[PromptRecord] = []
        bar = tqdm(prompts, desc=f"eval {drafter_dir.name}", unit="prompt", disable=not progress)
        for i, prompt in enumerate(bar):
            records += _decode_prompt(dec, prompt, temperature, max_new_tokens, seed + i)
            bar.set_postfix(tau=f"{_ratio(sum(r.new_tokens for r in records), sum(r.cycles for r in records)):.2f}")
    if not records:
        raise UserError(f"every prompt is longer than the target's context minus --max-new-tokens "
                        f"{max_new_tokens}; lower --max-new-tokens")
    settings = _settings(target_dir, drafter_dir, prompts, records, temperature, max_new_tokens, seed, both_turns)
    settings.update(tree=_tree_text(dec), drafter_type=fmt)
    report = build_report(records, settings, _tree_depth(dec), temperature)
    if out_dir is not None:
        with export.atomic_dir(Path(out_dir)) as tmp:
            write_report(report, tmp)
    return report


def _warm_up(dec: _Decoders, prompt: EvalPrompt, temperature: float, seed: int) -> None:
    """One untimed short decode per path (allocates the host KV cache, warms kernels)."""
    ids = _format(dec.tokenizer, prompt.turns[:1], [])
    if ids.shape[1] + WARMUP_TOKENS + dec.margin <= dec.max_positions:
        seed_everything(seed)
        _host_generate(dec, ids, temperature, WARMUP_TOKENS)
        _baseline_generate(dec, ids, temperature, WARMUP_TOKENS)


def _settings(target_dir: Path, drafter_dir: Path, prompts: Sequence[EvalPrompt], records: Sequence[PromptRecord],
              temperature: float, max_new_tokens: int, seed: int, both_turns: bool) -> dict[str, Any]:
    import transformers

    import ppow_plugin
    turns = sum(len(p.turns) for p in prompts)
    return {"target": str(target_dir), "drafter": str(drafter_dir), "temperature": temperature,
            "max_new_tokens": max_new_tokens, "seed": seed, "both_turns": both_turns,
            "benchmarks": list(dict.fromkeys(p.benchmark for p in prompts)),
            "prompts": len(prompts), "turns_decoded": len(records), "turns_skipped_too_long": turns - len(records),
            "tree": "host default mc_sim_7b_63 (25 draft nodes + root, depth 5)", "baseline": BASELINE,
            "tau_formula": "sum(kept new tokens) / sum(counted cycles), bonus token included",
            "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
            "versions": {"ppow_plugin": ppow_plugin.__version__, "torch": torch.__version__,
                         "transformers": transformers.__version__, "eagle_llm": eagle_compat.host_version()}}


def build_report(records: Sequence[PromptRecord], settings: dict[str, Any], depth: int,
                 temperature: float) -> EvalReport:
    greedy = temperature <= 1e-5
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
    lines = [f"# {kind} evaluation: {Path(s['drafter']).name}", "",
             f"- target `{s['target']}`, drafter `{s['drafter']}`",
             f"- temperature {s['temperature']}, max_new_tokens {s['max_new_tokens']}, seed {s['seed']}, "
             f"{s['prompts']} prompts ({s['turns_decoded']} turns decoded, {s['turns_skipped_too_long']} too long)",
             f"- tree: {s['tree']}; baseline: {s['baseline']}; torch threads: {s['torch_threads']}",
             f"- τ = {s['tau_formula']}; τ_host = EAGLE's untruncated new_tokens / (idx + 1)", "",
             f"| benchmark | prompts | tokens | cycles | τ | τ_host | {acc_cols} | EAGLE tok/s | baseline tok/s "
             f"| speedup | mismatches |",
             "|" + "---|" * (10 + depth)]
    for name, b in report.stats.items():
        rates = " | ".join(_fmt(r) for r in b.accept_rates)
        lines.append(f"| {name} | {b.prompts} | {b.new_tokens} | {b.cycles} | {_fmt(b.tau)} | {_fmt(b.tau_host)} "
                     f"| {rates} | {_fmt(b.eagle_tokens_per_s, '.1f')} | {_fmt(b.baseline_tokens_per_s, '.1f')} "
                     f"| {_fmt(b.speedup)}× | {'n/a (T > 0)' if b.mismatches is None else b.mismatches} |")
    lines += ["", "CPU wall-clock timings of a small model: speedups here do not predict GPU serving speedups.",
              "See docs/evaluation.md for the counting rules."]
    return "\n".join(lines) + "\n"


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


# --- compare ---------------------------------------------------------------------------------------


def _relative(value: float, reference: float) -> str:
    return f" ({(value / reference - 1) * 100:+.1f}%)" if reference and math.isfinite(reference) else ""


def compare_markdown(reports: dict[str, EvalReport]) -> str:
    """τ and speedup per benchmark per drafter, with the relative change vs the first drafter."""
    first = next(iter(reports.values()))
    benches = list(first.stats)
    lines = ["| drafter | " + " | ".join(f"{b} τ | {b} speedup" for b in benches) + " |",
             "|---|" + "---|---|" * len(benches)]
    for name, rep in reports.items():
        cells = []
        for b in benches:
            mine, ref = rep.stats[b], first.stats[b]
            tau_rel = "" if rep is first else _relative(mine.tau, ref.tau)
            speed_rel = "" if rep is first else _relative(mine.speedup, ref.speedup)
            cells.append(f"{_fmt(mine.tau)}{tau_rel} | {_fmt(mine.speedup)}×{speed_rel}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    s = first.settings
    lines += ["", f"Same prompts and settings for every drafter: T={s['temperature']}, max_new_tokens="
              f"{s['max_new_tokens']}, seed {s['seed']}, {s['prompts']} prompts; relative change vs "
              f"{next(iter(reports))}. Baseline: {s['baseline']}, re-timed per drafter."]
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


def compare(target_dir: str | Path, drafter_dirs: Sequence[str | Path], names: Sequence[str] | None = None,
            benchmarks: str | Sequence[str] = ALL_BENCHMARKS, num_prompts: int = 80, temperature: float = 0.0,
            max_new_tokens: int = 128, seed: int = 0, out_dir: str | Path | None = None,
            both_turns: bool = False, progress: bool = True, tree: Eagle3Tree = Eagle3Tree()) -> dict[str, EvalReport]:
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
    benchmarks = resolve_benchmarks(benchmarks)
    if num_prompts < 1:
        raise UserError(f"--num-prompts {num_prompts} selects no prompt; pass a positive number")
    target_dir = resolve_target(target_dir)
    for d in drafter_dirs:  # fail before any decoding
        drafter_format(target_dir, Path(d))
    prompts = load_prompts(benchmarks, num_prompts, both_turns)
    reports = {name: evaluate(target_dir, d, temperature=temperature, max_new_tokens=max_new_tokens, seed=seed,
                              both_turns=both_turns, prompts=prompts, progress=progress, tree=tree)
               for name, d in zip(names, drafter_dirs)}
    if out_dir is not None:
        with export.atomic_dir(Path(out_dir)) as tmp:
            for name, rep in reports.items():
                (tmp / name).mkdir()
                write_report(rep, tmp / name)
            (tmp / "compare.md").write_text(compare_markdown(reports))
            (tmp / "compare.json").write_text(json.dumps(
                {name: {b: asdict(s) for b, s in rep.stats.items()} for name, rep in reports.items()}, indent=2) + "\n")
            plot_compare(reports, tmp / "compare.png")
    return reports
