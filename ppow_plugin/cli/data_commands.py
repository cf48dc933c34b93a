"""`ppow data generate`: the target answers train-split prompts (resumable shards)."""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path

from ppow_plugin.errors import UserError


def cmd_data_generate(args) -> int:
    from ppow_plugin import outputs
    from ppow_plugin.data import generate  # flags are checked before the heavier imports below
    settings = generate.GenSettings(args.temperature, args.max_new_tokens, args.max_prompt_len, args.batch_size,
                                    args.shard_size, args.seed)
    settings.check()
    if args.num_prompts < 1:
        raise UserError(f"--num-prompts ({args.num_prompts}) must be >= 1")
    if not 0.0 <= args.heldout_fraction < 1.0:
        raise UserError(f"--heldout-fraction ({args.heldout_fraction}) must be in [0, 1)")
    if args.dataset == "jsonl" and not args.path:
        raise UserError("--dataset jsonl needs --path <file.jsonl>")
    kinds = [k for k in args.features.split(",") if k] if args.features else []
    if any(k not in ("eagle1", "eagle3") for k in kinds) or len(set(kinds)) != len(kinds):
        raise UserError(f"--features {args.features!r}: give eagle1, eagle3 or eagle1,eagle3")
    if args.feature_max_len < 2:
        raise UserError(f"--feature-max-len ({args.feature_max_len}) must be >= 2 (= data.max_len of the SFT run)")
    from ppow_plugin.cli.eval_commands import placement
    place = placement(args)  # before any work: a GPU that is not there, fp16 on the CPU
    inputs = {"--target": outputs.target_input(args.target), "--path": args.path}
    if args.out is not None:  # before any work: someone else's folder, an input, `.`, a file (or under one)
        outputs.check_generation_dir(args.out, inputs)
    from ppow_plugin.data import datasets, shards
    from ppow_plugin.training import rundir
    from ppow_plugin.training.trainer import _resolve_target
    # a path: config and tokenizer checked before the prompts are read; "default" is prepared after them
    target = _resolve_target(args.target, "--target ") if args.target != "default" else None
    if args.dataset == "sharegpt":
        convs, source = datasets.load_sharegpt(), "{}=={}".format(*datasets.SHAREGPT[:2])
    else:
        convs, source = datasets.load_jsonl_conversations(args.path, "--path "), f"jsonl:{args.path}"
    target = target or _resolve_target(args.target, "--target ")  # "default": prepared on first use
    prompts = generate.first_turn_prompts(convs, args.heldout_fraction, args.seed)
    out = Path(args.out) if args.out is not None else generate.output_dir(target, source, args.heldout_fraction,
                                                                          settings)
    with rundir.RunLock(out, "--out", "generate.lock", "ppow data generate") as lock:  # one writer per dir
        args.on_interrupt = (f"the shards written so far are in {out}; continue with: "
                             f"{shlex.join(['ppow', *args.argv])}")
        try:
            generate.generate(target, prompts, settings, args.num_prompts, source, args.heldout_fraction,
                              out_dir=out, progress=True, features=kinds, feature_max_len=args.feature_max_len,
                              placement=place)
        except BaseException:
            if lock.created is not None and not any(out.glob("shard-?????.npz")):  # nothing made: leave no folder
                (out / shards.PROVENANCE).unlink(missing_ok=True)
            raise
    print(json.dumps(shards.totals(out)))
    print(f"generated data in {out} (train with data.dataset=generated data.path={out})")
    return 0


def add_data_command(sub) -> None:
    """ppow data generate (issue 14); docs/recipes.md."""
    sp = sub.add_parser("data", help="training data made by the target itself")
    dsub = sp.add_subparsers(dest="data_cmd", required=True)
    g = dsub.add_parser("generate", help="regenerate the answers to train-split first user turns with the target "
                        "(resumable: rerun the same command to continue)")
    g.add_argument("--target", default="default", help="'default' (SmolLM2) or a local HF causal-LM dir")
    g.add_argument("--dataset", choices=["sharegpt", "jsonl"], default="sharegpt", help="where the prompts come from")
    g.add_argument("--path", default=None, help="the .jsonl file for --dataset jsonl")
    g.add_argument("--heldout-fraction", type=float, default=0.02,
                   help="held-out share (never generated from); must match data.heldout_fraction of the training run")
    g.add_argument("--num-prompts", type=int, default=1000, help="prompts to answer (a larger number extends a run)")
    # = generate.GenSettings() defaults (tested): a recipe's `data.path: null` reads the dir they write
    g.add_argument("--max-new-tokens", type=int, default=160)
    g.add_argument("--max-prompt-len", type=int, default=256, help="skip prompts longer than this many tokens")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    g.add_argument("--batch-size", type=int, default=128, help="prompts per generate call")
    g.add_argument("--shard-size", type=int, default=256, help="prompts per shard file (the resumable unit)")
    g.add_argument("--seed", type=int, default=0, help="prompt order and sampling")
    g.add_argument("--out", default=None, help="output dir (default: under the asset cache, keyed by the settings)")
    g.add_argument("--features", default="", help="also store the target features of every generated sequence in "
                   "the feature cache for these drafter families (eagle1, eagle3 or eagle1,eagle3): cached SFT "
                   "then never runs the target (data.feature_cache=true)")
    g.add_argument("--feature-max-len", type=int, default=512, help="data.max_len of the SFT runs that read them")
    from ppow_plugin.cli.eval_commands import add_placement_flags
    add_placement_flags(g)
    g.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS,  # also `ppow data --verbose generate`
                   help="show every third-party warning and progress bar (hidden by default)")
    g.set_defaults(fn=cmd_data_generate)
