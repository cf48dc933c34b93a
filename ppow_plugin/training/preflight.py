"""The checks `ppow sft|train` runs before it loads any target weight, also run by `ppow validate`.

    preflight.check(cfg)     # UserError (one line naming the fix) or None; reads configs, tokenizer files,
                             # the warm-start drafter (~17 MB) and the generated data's shards, no target weight

So `validate` says "ok" only for a recipe `train` would start on: the target directory has a config and a
tokenizer, the warm-start drafter is of the recipe's family (an EAGLE-3 drafter with an EAGLE-1 recipe is
refused here, not after the target has loaded), family-only settings match the family, and generated data
is a generation dir whose provenance and shards verify (`data.shards.check_generated`), and the τ probe
(`eval.every_steps`) has its `eval.every_prompts` prompts.
"""

from __future__ import annotations

from pathlib import Path

from ppow_plugin.errors import UserError


def check(cfg) -> None:
    """Raise `UserError` for what `Trainer.setup` would refuse later; `cfg` is a `config.Config`.

    Paths that do not exist are left to `recipe_file.input_paths` (validate's `--no-path-check`)."""
    target = _target_dir(cfg.model.target)
    if cfg.stage == "ppow" and cfg.model.drafter is None:
        raise UserError("stage=ppow starts from a drafter: set model.drafter=<drafter dir> "
                        "(e.g. assets/drafters/smollm2-135m-eagle1-sft-gen), or use stage=sft to train one")
    if cfg.sft.vocab_rows is not None and cfg.stage == "sft" and cfg.model.drafter_type != "eagle1":
        raise UserError("sft.vocab_rows is for EAGLE-1 drafters; EAGLE-3 has its own draft vocabulary "
                        "(model.draft_vocab_size): unset sft.vocab_rows")
    if cfg.model.drafter is not None and Path(cfg.model.drafter).is_dir():
        _check_drafter(cfg, target)
    if cfg.data.dataset == "generated" and cfg.data.path is not None and Path(cfg.data.path).exists():
        from ppow_plugin.data import shards
        shards.check_generated(cfg.data.path)
    if cfg.eval.every_steps:  # the τ probe's prompts (train reads them after loading the target)
        from ppow_plugin.data import eval_prompts
        eval_prompts.load_prompts(cfg.eval.benchmarks, cfg.eval.every_prompts, flag="eval.every_prompts=")


def _target_dir(target: str) -> Path | None:
    """The target dir when it is there to check (config.json and tokenizer), else None."""
    from ppow_plugin.host import assets
    if target == "default":
        out = assets.cache_dir() / "targets" / assets.SMOLLM2_135M.name
        return out if (out / "config.json").is_file() else None  # prepared on first use otherwise
    p = Path(target)
    if not p.exists():
        return None
    if not (p / "config.json").is_file():
        raise UserError(f"model.target={target} is not a model directory with config.json; "
                        "use 'default' or a local HF causal-LM directory")
    assets.require_tokenizer(p, "model.target=")
    return p


def _check_drafter(cfg, target: Path | None) -> None:
    """The warm-start drafter reads strictly (keys, shapes, sizes against the target) and is of the recipe's family."""
    from ppow_plugin.drafters import formats
    loaded = formats.load_drafter(cfg.model.drafter, target)
    want = cfg.model.drafter_type
    if loaded.format != want:
        raise UserError(f"model.drafter={cfg.model.drafter} holds an {loaded.format} drafter but the recipe says "
                        f"model.drafter_type={want}; set model.drafter_type={loaded.format} or pass an "
                        f"{'EAGLE-1' if want == 'eagle1' else 'EAGLE-3'} drafter dir")
