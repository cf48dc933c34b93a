"""Fill the feature cache of a training run before timing it: every sequence's target pass, stored as the run
would store it on first use (`data.feature_cache: true`), so runs compared at equal wall time all start with a
warm cache instead of the first ones paying the target's passes inside their minutes.

    python scripts/fill_features.py SHARD NSHARDS RECIPE OVERRIDE...    # e.g. 0 2 and 1 2 side by side

RECIPE and OVERRIDEs are the run's own (`ppow sft` / `ppow train`; run.output_dir is replaced by a temporary
dir). SHARD/NSHARDS: this process fills the sequences i with i % NSHARDS == SHARD. Prints how many it stored
and how many were already there.
"""

from __future__ import annotations

import sys
import tempfile

from ppow_plugin.config import load_config
from ppow_plugin.errors import UserError
from ppow_plugin.training.target_passes import TargetPasses, sequence_tensors
from ppow_plugin.training.trainer import Trainer


def main(argv: list[str]) -> int:
    if len(argv) < 3 or not (argv[0].isdigit() and argv[1].isdigit()) or int(argv[0]) >= int(argv[1]):
        print("error: usage: fill_features.py SHARD NSHARDS RECIPE OVERRIDE... (0 <= SHARD < NSHARDS)",
              file=sys.stderr)
        return 2
    shard, nshards, recipe, overrides = int(argv[0]), int(argv[1]), argv[2], argv[3:]
    with tempfile.TemporaryDirectory() as tmp:
        try:
            cfg = load_config(recipe, [*overrides, f"run.output_dir={tmp}/run", "eval.every_steps=0"])
        except UserError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        if not cfg.data.feature_cache:
            print("error: the run does not use the feature cache; add data.feature_cache=true", file=sys.stderr)
            return 2
        trainer = Trainer(cfg)
        trainer.setup()
        cache, stored, present = trainer.features, 0, 0
        passes = TargetPasses(cfg, trainer.adapter, trainer.target, trainer.kv, cache)
        for i, sample in enumerate(trainer.data.samples):
            if i % nshards != shard:
                continue
            if cache.has(sample):
                present += 1
                continue
            ids, _ = sequence_tensors(sample, trainer.device)
            cache.put(sample, passes.run_target(trainer.drafter, ids))  # what a run's miss stores
            stored += 1
        print(f"feature cache {cache.root}: {stored} stored, {present} already there (shard {shard}/{nshards})")
        trainer.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
