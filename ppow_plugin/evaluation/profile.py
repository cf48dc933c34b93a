"""`ppow profile`: the measured drafter/target cost ratio γ, and verification cost against tree size.

    ppow profile --out profile.json                          # random EAGLE-1 drafter shaped for the target
    ppow profile --drafter runs/sft/drafter --eval-report eval/sft/report.json --repeats 5

The trainer reads `reward.gamma_profile` -> `json["gamma"]`. What is timed (batch 1, on the device and in the
dtype `--device`/`--dtype` resolve to: a GPU in bf16 when CUDA is available, else CPU fp32; this machine,
as many torch threads as `OMP_NUM_THREADS` allows), all after a prefix of `prefix_len` random tokens:
- target step: the host target (`eagle_compat.load_host_target`) forwards one token with its preallocated
  KV cache, lm_head included (one step of plain autoregressive decoding);
- drafter step: the EAGLE-1 drafter forwards one (feature, token) pair with its KV cache, then the
  target's lm_head on its output (one drafting level for one node); an EAGLE-3 drafter (detected from its
  dir) forwards one (fused feature, token) pair with its KV cache through its own draft-vocabulary head;
- verify(N): the host target forwards N tokens at once with the KV cache (causal mask; the tree mask of
  a static tree costs the same).
Every call sees the same prefix (the KV length is reset after each). One repeat = the mean over `inner`
calls; the spread (std, min, max) is over repeats. γ = mean drafter step / mean target step.

Modelled speedup of a tree of N tokens (root + N-1 draft nodes), chain approximation:
    S(N) = (1 + Σ_{i=1}^{N-1} r_i) / ((N-1)·γ + verify(N)/verify(1))
with r_i = P(accept_len >= i). From `--eval-report`: the overall acceptance rates it measured (host tree,
depth 5), extended past the measured depth with the last conditional rate r_D / r_{D-1}; without one,
r_i = α^i with α = ASSUMED_ACCEPT. Rates measured on a tree overstate what a chain of the same size
accepts, so read S(N) as a ranking of tree sizes on this hardware, not as a prediction.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ppow_plugin import devices
from ppow_plugin.drafters import formats
from ppow_plugin.host import eagle_compat
from ppow_plugin.errors import UserError
from ppow_plugin.drafters.eagle3 import Eagle3Drafter, target_features
from ppow_plugin.evaluation.inputs import drafter_format, resolve_target

DEFAULT_TREE_SIZES = (1, 4, 8, 16, 26, 32, 64)  # 26 = the host's mc_sim_7b_63 (25 nodes + root)
ASSUMED_ACCEPT = 0.6  # per-position conditional acceptance when no eval report is given


# --- pure model ------------------------------------------------------------------------------------


def spread(values: Sequence[float]) -> dict[str, Any]:
    """mean, sample std (0 for one value), min, max and the values themselves."""
    arr = np.asarray(values, dtype=np.float64)
    return {"mean": float(arr.mean()), "std": float(arr.std(ddof=1)) if len(arr) > 1 else 0.0,
            "min": float(arr.min()), "max": float(arr.max()), "per_repeat": [float(v) for v in arr]}


def extend_rates(rates: Sequence[float], length: int) -> list[float]:
    """P(accept_len >= i) for i = 1..length: the measured rates, then geometric with the last
    conditional rate r_D / r_{D-1} (r_1 alone if only one is measured)."""
    rates = [float(r) for r in rates]
    if not rates:
        raise ValueError("need at least one acceptance rate")
    prev = rates[-2] if len(rates) > 1 else 1.0
    ratio = rates[-1] / prev if prev > 0 else 0.0
    while len(rates) < length:
        rates.append(rates[-1] * ratio)
    return rates[:length]


def modelled_speedup(tree_size: int, rates: Sequence[float], gamma: float, verify_ratio: float) -> float:
    """S(N) = (1 + Σ_{i<N} r_i) / ((N-1)·γ + verify(N)/verify(1)) (module doc; chain approximation).

    Args:
        tree_size: N, tokens verified per cycle (root + N-1 drafted).
        rates: P(accept_len >= i) for i = 1..N-1 (at least N-1 values).
        gamma: drafter step / target step.
        verify_ratio: verify(N) / verify(1).
    """
    depth = tree_size - 1
    return (1.0 + sum(rates[:depth])) / (depth * gamma + verify_ratio)


# --- timing ----------------------------------------------------------------------------------------


def _per_call(fn: Callable[[], Any], inner: int, device: torch.device) -> float:
    """Seconds per call; on CUDA the queue is drained before and after (kernels run asynchronously)."""
    devices.synchronize(device)
    start = time.perf_counter()
    for _ in range(inner):
        fn()
    devices.synchronize(device)
    return (time.perf_counter() - start) / inner


def _set_length(kv: list[list[Any]], length: int) -> None:
    for layer in kv:
        for cache in layer:
            cache.current_length.fill_(length)


def _build_drafter(target: torch.nn.Module, drafter_dir: Path | None, fmt: str, dtype: torch.dtype) -> torch.nn.Module:
    """The drafter in `dtype` (on the CPU: the caller moves it to the target's device)."""
    embed = target.get_input_embeddings().weight
    if drafter_dir is None:
        return eagle_compat.new_eagle1_drafter(target.config, bias=True, embed_weight=embed, dtype=dtype).eval()
    if fmt == "eagle3":
        from ppow_plugin.drafters import adapters
        return adapters.load_eagle3_drafter(drafter_dir, target, dtype).eval()
    config, state = formats.load_drafter_dir(drafter_dir)
    drafter = eagle_compat.new_eagle1_drafter(target.config, bias=bool(config.get("bias", True)), embed_weight=embed,
                                              dtype=dtype)
    eagle_compat.load_drafter_weights(drafter, {**state, formats.EMBED_KEY: embed})
    return drafter.eval()


def _acceptance(eval_report: str | Path | None) -> tuple[list[float], str]:
    if eval_report is None:
        return [ASSUMED_ACCEPT], f"assumed: P(accept_len >= i) = {ASSUMED_ACCEPT}^i"
    try:
        rates = json.loads(Path(eval_report).read_text())["stats"]["overall"]["accept_rates"]
    except (OSError, ValueError, KeyError, TypeError):
        raise UserError(f"--eval-report {eval_report} is not a `ppow eval` report.json; "
                        "pass one or leave the flag out") from None
    if not rates:
        raise UserError(f"--eval-report {eval_report} has no acceptance rates; re-run ppow eval")
    return [float(r) for r in rates], f"measured in {eval_report}, extended geometrically past depth {len(rates)}"


def profile(target_dir: str | Path = "default", drafter_dir: str | Path | None = None, repeats: int = 5,
            tree_sizes: Sequence[int] = DEFAULT_TREE_SIZES, prefix_len: int = 256, inner: int = 10,
            eval_report: str | Path | None = None, seed: int = 0,
            placement: devices.Placement | None = None) -> dict[str, Any]:
    """Time drafter step, target step and verify(N); return the JSON-ready profile (module doc).

    `placement`: device and dtype of target and drafter (`devices.resolve_placement`; None = auto).

    Returns:
        {"gamma": float, "gamma_spread": {...}, "drafter_step_s", "target_step_s", "verify_s": {N: ...},
         "model": {..., "best_tree_size": N}, "settings": {...}}; times in seconds per call.
    Raises:
        UserError: bad counts, drafter/target mismatch, or a prefix + tree longer than the target context.
    """
    if repeats < 1 or inner < 1 or prefix_len < 2 or not tree_sizes or min(tree_sizes) < 1:
        raise UserError(f"need --repeats >= 1 (got {repeats}), inner >= 1, prefix_len >= 2 and tree sizes >= 1")
    target_dir = resolve_target(target_dir, need_tokenizer=False)
    # drafter_format checks the fit (EAGLE-1: sizes; EAGLE-3: sizes and vocabulary maps) with its own messages.
    fmt = "eagle1" if drafter_dir is None else drafter_format(target_dir, Path(drafter_dir))
    rates, rates_source = _acceptance(eval_report)
    sizes = sorted(set(int(n) for n in tree_sizes) | {1})
    place = placement or devices.resolve_placement()
    device = place.device
    target = eagle_compat.load_host_target(target_dir, place.dtype, device, prefix_len + max(sizes))
    max_pos = int(target.config.max_position_embeddings)
    if prefix_len + max(sizes) > max_pos:
        raise UserError(f"prefix {prefix_len} + tree {max(sizes)} tokens exceed the target's context {max_pos}; "
                        "lower --prefix-len or the tree sizes")
    drafter = _build_drafter(target, Path(drafter_dir) if drafter_dir is not None else None, fmt, place.dtype)
    drafter = drafter.to(device)
    timings = _time_all(target, drafter, repeats, sizes, prefix_len, inner, seed, device)
    return _assemble(timings, rates, rates_source, sizes, {
        "target": str(target_dir), "drafter": str(drafter_dir) if drafter_dir else "random EAGLE-1 (shape only)",
        "drafter_type": fmt,
        "repeats": repeats, "inner_calls": inner, "prefix_len": prefix_len, "seed": seed, **place.describe(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__})


@torch.no_grad()
def _time_all(target: torch.nn.Module, drafter: torch.nn.Module, repeats: int, sizes: Sequence[int],
              prefix_len: int, inner: int, seed: int, device: torch.device) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(seed)  # CPU stream: the same tokens on every device
    vocab = int(target.config.vocab_size)
    prefix = torch.randint(vocab, (1, prefix_len), generator=gen).to(device)            # [1, P]
    next_token = torch.randint(vocab, (1, 1), generator=gen).to(device)                 # [1, 1]
    tree = {n: torch.randint(vocab, (1, n), generator=gen).to(device) for n in sizes}   # [1, N] each
    kv = eagle_compat.new_kv_cache(target, prefix_len + max(sizes))  # what the largest verify reaches
    if isinstance(drafter, Eagle3Drafter):
        out = target.model(input_ids=prefix, past_key_values=kv, output_hidden_states=True, return_dict=True)
        features = target_features(out.hidden_states, drafter.cfg.feature_layer_ids)  # [1, P, 3H]
        # the cache covers pairs (f_0, x_1) .. (f_{P-2}, x_{P-1}); a step adds (f_{P-1}, next) on top
        _, _, drafter_kv = drafter(features[:, :-1], prefix[:, 1:])

        def drafter_step() -> None:
            drafter(features[:, -1:], next_token, past_kv=drafter_kv)  # logits over the draft vocabulary
    else:
        features = target.model(input_ids=prefix, past_key_values=kv)[0]        # [1, P, H]
        # the drafter's cache covers features f_0..f_{P-2} paired with tokens x_1..x_{P-1}
        _, drafter_kv = drafter(features[:, :-1], input_ids=prefix[:, 1:], use_cache=True)

        def drafter_step() -> None:
            out, _ = drafter(features[:, -1:], input_ids=next_token, past_key_values=drafter_kv, use_cache=True)
            target.lm_head(out)

    def target_step() -> None:
        target(input_ids=next_token, past_key_values=kv)
        _set_length(kv, prefix_len)

    def verify(n: int) -> Callable[[], None]:
        def run() -> None:
            target(input_ids=tree[n], past_key_values=kv)
            _set_length(kv, prefix_len)
        return run

    for fn in (target_step, drafter_step, *(verify(n) for n in sizes)):  # warm-up
        fn()
    out: dict[str, Any] = {"drafter": [], "target": [], "verify": {n: [] for n in sizes}}
    for _ in range(repeats):  # interleaved, so drift in machine load hits every measurement alike
        out["drafter"].append(_per_call(drafter_step, inner, device))
        out["target"].append(_per_call(target_step, inner, device))
        for n in sizes:
            out["verify"][n].append(_per_call(verify(n), inner, device))
    return out


def _assemble(timings: dict[str, Any], rates: list[float], rates_source: str, sizes: Sequence[int],
              settings: dict[str, Any]) -> dict[str, Any]:
    drafter_s, target_s = spread(timings["drafter"]), spread(timings["target"])
    gamma = drafter_s["mean"] / target_s["mean"]
    verify_s = {n: spread(timings["verify"][n]) for n in sizes}
    full_rates = extend_rates(rates, max(sizes) - 1) if max(sizes) > 1 else []
    speedups = {n: modelled_speedup(n, full_rates, gamma, verify_s[n]["mean"] / verify_s[1]["mean"]) for n in sizes}
    best = max(speedups, key=speedups.get)
    return {
        "gamma": gamma,
        "gamma_spread": spread([d / t for d, t in zip(timings["drafter"], timings["target"])]),
        "drafter_step_s": drafter_s, "target_step_s": target_s,
        "verify_s": {str(n): s for n, s in verify_s.items()},
        "model": {"formula": "S(N) = (1 + sum_{i<N} r_i) / ((N-1)*gamma + verify(N)/verify(1)), chain approximation",
                  "acceptance": rates_source, "rates": full_rates,
                  "speedup_by_tree_size": {str(n): s for n, s in speedups.items()}, "best_tree_size": best},
        "settings": settings,
    }


def format_profile(result: dict[str, Any]) -> str:
    """A few human-readable lines for the CLI."""
    g, t, d = result["gamma_spread"], result["target_step_s"], result["drafter_step_s"]
    lines = [f"target step {t['mean'] * 1e3:.2f} ms (±{t['std'] * 1e3:.2f}), drafter step {d['mean'] * 1e3:.2f} ms "
             f"(±{d['std'] * 1e3:.2f})",
             f"gamma = {result['gamma']:.4f} (per repeat: std {g['std']:.4f}, min {g['min']:.4f}, max {g['max']:.4f})",
             "tree size: verify(N)/verify(1), modelled speedup"]
    base = result["verify_s"]["1"]["mean"]
    for n, s in result["model"]["speedup_by_tree_size"].items():
        lines.append(f"  {n:>3}: {result['verify_s'][n]['mean'] / base:5.2f}  {s:.2f}x")
    lines.append(f"best modelled tree size: {result['model']['best_tree_size']} "
                 f"({result['model']['acceptance']})")
    return "\n".join(lines)


def write_profile(result: dict[str, Any], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(path)
    return path
