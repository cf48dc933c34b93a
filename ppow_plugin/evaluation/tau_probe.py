"""τ during training: simulated acceptance of the drafter being trained on a fixed held-out prompt slice.

    ppow train recipe.yaml eval.every_steps=50 eval.every_prompts=8

Every `eval.every_steps` optimizer steps (0 = off) the trainer asks `TauProbe.measure` for the simulated
τ (`simulate.py`, T = 0, `eval.max_new_tokens`, the tree `ppow eval` uses) of its current drafter on the
first `eval.every_prompts` prompts of each of `eval.benchmarks` (MT-Bench and HumanEval are never trained
on; ShareGPT prompts come from the held-out split). The value goes to metrics.jsonl as `sim_tau` and to
the progress bar, with `heldout_k`: the greedy-window k (a chain of `rollout.window` drafts) at every
position of the same continuations (`simulate.chain_accept_mean`), the training's `greedy_accept_len` on
text it never saw; `plot` draws τ against the step into the run directory at the end. The greedy
continuations are built once (cached across runs), so each measurement costs only drafter passes.
Everything runs where training runs: the trainer's target (dist.device, dist.target_dtype) makes the
continuations (cached apart per device type and dtype, `continuations.cache_root`) and the drafter, on its
own device and dtype, is simulated there.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import torch

from ppow_plugin.data import continuations
from ppow_plugin.evaluation import evaluate, simulate


class TauProbe:
    """Owns the held-out slice and the history of (step, τ); the trainer only calls due/measure/plot."""

    def __init__(self, cfg, target, target_dir: Path, fmt: str, feature_layers):
        from transformers import AutoTokenizer

        ev = cfg.eval
        self.every, self.fmt, self.target, self.max_new = ev.every_steps, fmt, target, ev.max_new_tokens
        self.window = cfg.rollout.window
        self.tree = (evaluate.Eagle3Tree(ev.tree_depth, ev.tree_top_k, ev.tree_total_tokens) if fmt == "eagle3"
                     else simulate.host_tree())
        tok = AutoTokenizer.from_pretrained(str(target_dir))
        self.eos = tok.eos_token_id
        prompts = evaluate.load_prompts(ev.benchmarks, ev.every_prompts, flag="eval.every_prompts=")
        ids = [evaluate._format(tok, p.turns[:1], [])[0].tolist() for p in prompts]
        self.keys = [(p.benchmark, p.prompt_id) for p in prompts]
        self.conts, self.build_cost = continuations.load_continuations(
            target_dir, target, ids, max(simulate.continuation_length(self.max_new, t)
                                         for t in (self.tree, simulate.chain(self.window))), feature_layers)
        self.history: list[tuple[int, float]] = []
        self.seconds = 0.0  # time spent measuring: not training, so run.max_minutes does not count it

    def due(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    def measure(self, step: int, drafter: torch.nn.Module) -> dict[str, float]:
        """{"sim_tau", "heldout_k", "probe_s": seconds measuring so far} of a frozen copy of `drafter` (training
        state untouched); τ is recorded in the history."""
        start = time.time()
        frozen = copy.deepcopy(drafter).eval()
        with torch.no_grad():  # one teacher-forced pass per prompt serves both measures
            seqs = [simulate.teacher_forced(self.fmt, frozen, self.target, c) for c in self.conts]
            records = simulate.simulate_records(self.fmt, frozen, self.target, self.conts, self.keys, self.max_new,
                                                self.tree, self.eos, seqs=seqs)
            k = simulate.chain_accept_mean(self.fmt, frozen, self.target, self.conts, self.max_new, self.window,
                                           self.eos, seqs=seqs)
        tau = sum(r.new_tokens for r in records) / max(1, sum(r.cycles for r in records))
        self.history.append((step, tau))
        self.seconds += time.time() - start
        return {"sim_tau": tau, "heldout_k": k, "probe_s": self.seconds}

    def plot(self, path: Path) -> Path | None:
        """τ against the optimizer step as a PNG (None when nothing was measured)."""
        if not self.history:
            return None
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(5, 3.2))
        steps, taus = zip(*self.history)
        ax.plot(steps, taus, marker="o")
        ax.set(xlabel="optimizer step", ylabel="simulated τ (T = 0)",
               title=f"held-out slice: {len(self.conts)} prompts, {self.max_new} new tokens")
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path
