"""Where a PPOW training step's wall time goes, and what verifying on the data saves.

    .venv/bin/python benchmarks/ppow_step_phases.py RECIPE [--steps 25] [--threads 1] [--json OUT]
        [--set KEY=VALUE ...] [--variant KEY=VALUE ...]

Runs `ppow train RECIPE` (with the --set overrides) for --steps steps through the trainer itself, with
timers around its phases: the target's pass over the sequence, the drafter's window sampling, the target's
tree verification, the loss; the rest of the optimizer step is the teacher-forced pass, window selection,
rewards, the backward and the update. With --variant, the same steps are run again in the same process
with those overrides added (e.g. `rollout.verify=data data.feature_cache=true`) and the ratio of the two
step times is printed: measured in one run, under whatever else the machine is doing.

In the first arm it also counts, for every window the tree verified, whether its accepted length k equals
the one `data_verify.verify_on_data` reads off the target's pass over the sequence (no tree), with that pass as
the target computes it and as the feature cache stores it (hidden states rounded to fp16): how often a
`verify: greedy` rollout on this data could be verified for free, exactly.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
import time


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("recipe")
    ap.add_argument("--set", nargs="*", default=[], help="recipe overrides for both arms, KEY=VALUE")
    ap.add_argument("--variant", nargs="*", default=None, help="overrides of a second arm, KEY=VALUE")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from ppow_plugin import config
    from ppow_plugin.method import data_verify, rollout
    from ppow_plugin.training import ppow_step, target_passes, trainer

    seconds: dict[str, float] = collections.defaultdict(float)
    agree = collections.Counter()
    seq = {}

    def timed(name, fn):
        def wrapper(*a, **k):
            t = time.perf_counter()
            out = fn(*a, **k)
            seconds[name] += time.perf_counter() - t
            return out
        return wrapper

    def target_pass(self, drafter, sample, ids, valid):
        tpass = timed("target pass over the sequence", original_target_pass)(self, drafter, sample, ids, valid)
        if self.cfg.rollout.verify != "data":  # the agreement check, first arm only
            head = self.target.lm_head
            with torch.no_grad():
                rounded = head(tpass.hidden.half().to(head.weight.dtype)).float()
            seq.update(ids=ids, exact=tpass.logits, fp16=rounded)
        return tpass

    def verify(target, kv, input_ids, starts, draft_tokens, *rest, **kw):
        out = timed("target tree verification", original_verify)(target, kv, input_ids, starts, draft_tokens,
                                                                  *rest, **kw)
        inside = data_verify.on_sequence_mask(input_ids.numel(), starts, *draft_tokens.shape[1:]).all(-1)  # [n, G]
        for name in ("exact", "fp16"):
            free = original_on_data(seq["ids"], seq[name], starts, draft_tokens)[0]
            agree[f"{name}_same_k"] += int(((free == out[0]) & inside).sum())
            agree[f"{name}_over"] += int(((free > out[0]) & inside).sum())
        agree["windows"] += int(inside.sum())
        return out

    original_target_pass = target_passes.TargetPasses.__call__
    original_verify = rollout.verify_windows
    original_on_data = data_verify.verify_on_data
    target_passes.TargetPasses.__call__ = target_pass
    rollout.verify_windows = verify
    ppow_step.PpowStep.loss = timed("loss (forward)", ppow_step.PpowStep.loss)
    original_step = trainer.Trainer._optimizer_step
    trainer.Trainer._optimizer_step = timed("optimizer step", original_step)

    def measure(overrides: list[str]) -> dict:
        seconds.clear()
        with tempfile.TemporaryDirectory(prefix="ppow-phases-") as out:
            cfg = config.load_config(args.recipe, overrides + [
                f"run.max_steps={args.steps}", f"run.save_every={args.steps + 1}", f"run.output_dir={out}/run"])
            if cfg.stage != "ppow":
                raise SystemExit("error: the recipe's stage is not ppow; pass a PPOW recipe")
            tr = trainer.Trainer(cfg)
            tr.setup()
            tr.adapter.draft_windows = timed("drafter samples the windows", tr.adapter.draft_windows)
            try:
                start = time.perf_counter()
                tr.train()
                wall = time.perf_counter() - start
                cache = tr.features.stats() if tr.features is not None else {}
            finally:
                tr.cleanup()
        step = seconds.pop("optimizer step")
        seconds["rest: teacher-forced pass, windows, rewards, backward, update"] = step - sum(seconds.values())
        print(f"{' '.join(overrides) or 'the recipe as is'}: {args.steps} steps, {args.threads} thread(s), "
              f"{wall / args.steps:.2f} s per step {cache or ''}")
        rows = {}
        for name, s in sorted(seconds.items(), key=lambda kv: -kv[1]):
            rows[name] = {"s_per_step": s / args.steps, "share": s / step}
            print(f"  {name:62s} {s / args.steps:6.2f} s  {100 * s / step:5.1f} %")
        return {"overrides": overrides, "s_per_step": wall / args.steps, "phases": rows, "feature_cache": cache}

    arms = [measure(args.set)]
    n = max(agree["windows"], 1)
    for name in ("exact", "fp16"):
        print(f"windows inside the sequence whose k `verify_on_data` reads off the {name} sequence pass: "
              f"{agree[name + '_same_k']} / {agree['windows']} ({100 * agree[name + '_same_k'] / n:.2f} %), "
              f"over-counted {agree[name + '_over']}")
    if args.variant is not None:
        arms.append(measure(args.set + args.variant))
        print(f"step time, second arm / first: {arms[1]['s_per_step'] / arms[0]['s_per_step']:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": " ".join(sys.argv), "steps": args.steps, "threads": args.threads, "arms": arms,
                       "verify_on_data_agreement": dict(agree)}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
