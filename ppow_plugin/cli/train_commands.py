"""`ppow validate | sft | train | prepare | patch | doctor`: the recipe and set-up commands."""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import sys
from pathlib import Path

from ppow_plugin.errors import UserError


def cmd_validate(args) -> int:
    from ppow_plugin.host import target_arch
    from ppow_plugin.config import config_to_dict, load_config
    from ppow_plugin.recipe_file import input_paths
    if args.print_defaults:
        return _print_defaults()
    if args.recipe is None:
        raise UserError("validate needs a recipe YAML (or --print-defaults to list every key)")
    cfg = load_config(args.recipe, args.overrides)
    if cfg.stage == "ppow" and cfg.model.drafter is None:
        raise UserError("stage=ppow starts from a drafter: set model.drafter=<drafter dir> "
                        "(e.g. assets/drafters/smollm2-135m-eagle1-sft-gen), or use stage=sft to train one")
    paths = input_paths(cfg)
    bad = [(key, p) for key, p in paths.items() if p.problem]
    if bad and not args.no_path_check:
        key, p = bad[0]
        raise UserError(f"{key}={p.value}: {p.path} {p.problem} (relative paths resolve against the current "
                        "directory); fix the path, or pass --no-path-check to check keys and values only")
    if not args.no_path_check:
        from ppow_plugin.training import preflight
        preflight.check(cfg)  # every check `train` runs before it loads target weights
    note, target = None, paths.get("model.target")
    if target is None or target.problem is None or target_arch.known_config(cfg.model.target):
        arch, note = target_arch.load_target_arch(cfg)
        target_arch.check_against_target(cfg, arch)
    print(json.dumps(config_to_dict(cfg), indent=2))
    for key, p in paths.items():
        print(f"{key}: {p.path}" + (f" ({p.problem}; not checked)" if p.problem else ""), file=sys.stderr)
    if note:
        print(note, file=sys.stderr)
    print(f"ok: {args.recipe} is a valid {cfg.stage} recipe", file=sys.stderr)
    return 0


def _print_defaults() -> int:
    """Every recipe key with its default, as a YAML recipe (`ppow validate --print-defaults`)."""
    import yaml

    from ppow_plugin.config import Config, config_to_dict
    print("# every recipe key with its default (ppow validate --print-defaults); docs/recipes.md says what each does")
    print(yaml.safe_dump(config_to_dict(Config()), sort_keys=False), end="")
    return 0


def cmd_train(args, stage: str) -> int:
    from ppow_plugin import outputs
    from ppow_plugin.training import rundir
    from ppow_plugin.config import load_config
    cfg = load_config(args.recipe, args.overrides)
    if cfg.stage != stage:
        raise UserError(f"{args.recipe} is a stage={cfg.stage} recipe; run `ppow {_STAGE_CMD[cfg.stage]}` "
                        f"or set stage={stage}")
    # someone else's folder or the run's inputs: refused before the lock file is written there (Trainer.setup
    # repeats the check under the lock, with the checkpoints-need-resume rule)
    outputs.check_run_dir(cfg.run.output_dir, outputs.run_inputs(cfg), resume=True)
    lock = rundir.lock_for_rank(cfg.run.output_dir)  # before torch loads: a second run is refused at once
    with lock or contextlib.nullcontext():  # on an error below the lock file and the dirs it made are removed
        from ppow_plugin.training import preflight
        preflight.check(cfg)  # what `validate` checks, before any weight loads
        _check_device_fits(cfg)
        args.on_interrupt = _resume_hint(args, cfg.run.output_dir)
        from ppow_plugin.host import eagle_compat
        from ppow_plugin.training import trainer
        eagle_compat.require_host()
        out = trainer.main(cfg)
    print(f"drafter written to {out}")
    return 0


def _check_device_fits(cfg) -> None:
    """On a GPU, `ppow plan`'s estimate against this GPU's memory before minutes of loading: a target larger than
    the GPU is refused, a total larger than it warned about (`plan.check_device_fits`)."""
    import torch
    if cfg.dist.device in ("cpu", "mps") or not torch.cuda.is_available():
        return
    from ppow_plugin import distributed
    from ppow_plugin.host import target_arch
    from ppow_plugin.training import plan
    try:
        arch, _ = target_arch.load_target_arch(cfg)
    except UserError:
        return  # no readable config.json: the trainer names the target problem
    device = distributed.get_device(cfg.dist.device)
    if device.type != "cuda":
        return
    total = torch.cuda.get_device_properties(device).total_memory
    warning = plan.check_device_fits(cfg, arch, int(os.environ.get("WORLD_SIZE", 1)), total / plan.GB)
    if warning:
        print(warning, file=sys.stderr)


def _resume_hint(args, run_dir: str) -> str:
    """What to print after Ctrl-C: where the checkpoints are and the exact command that continues."""
    kept = [o for o in args.overrides if not o.replace(" ", "").startswith("run.resume=")]
    command = shlex.join(["ppow", args.cmd, args.recipe, *kept, "run.resume=true"])
    return f"checkpoints so far are in {Path(run_dir) / 'checkpoints'}; continue with: {command}"


_STAGE_CMD = {"sft": "sft", "ppow": "train"}


def cmd_prepare(args) -> int:
    from ppow_plugin.host import assets
    path = assets.prepare_target(assets.TARGETS[args.target], force=args.force)
    print(f"target ready: {path}")
    if args.target != "smollm2":  # SmolLM2 recipes say model.target=default; the others name a path
        print(f"linked: {assets.link_target(path).absolute()} -> {path}")
    return 0


def cmd_patch(args) -> int:
    from ppow_plugin.host import patching
    if args.action == "apply":
        applied = patching.apply_patches()
        print("applied: " + ", ".join(applied) if applied else "already patched: nothing to do")
    elif args.action == "revert":
        reverted = patching.revert_patches()
        print("reverted: " + ", ".join(reverted) if reverted else "not patched: nothing to revert")
    status = patching.patch_status()
    print(status.describe())
    return 0 if args.action != "check" or status.fully_patched else 1


def cmd_doctor(args) -> int:
    from ppow_plugin import doctor
    return doctor.run()
