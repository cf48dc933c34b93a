"""`ppow eval | compare | profile`: the evaluation commands, their shared flags and the recipe's `eval:` section."""

from __future__ import annotations

import argparse
import dataclasses

from ppow_plugin.errors import UserError


def add_placement_flags(sp: argparse.ArgumentParser, default: str | None = "auto") -> None:
    """--device / --dtype: where the target (drafter, HF baseline) runs; `devices.resolve_placement`."""
    sp.add_argument("--device", default=default, help="auto (this rank's GPU if CUDA is available, else cpu), "
                    "cpu, cuda or cuda:N" + ("" if default else "; default: the recipe's eval.device, else auto"))
    sp.add_argument("--dtype", default=default, choices=["auto", "fp32", "bf16", "fp16"],
                    help="auto = bf16 on a GPU, fp32 on the CPU" + ("" if default else " (or the recipe's eval.dtype)"))


def placement(args):
    """The device and dtype of --device/--dtype, resolved once here and passed down."""
    from ppow_plugin import devices
    return devices.resolve_placement(args.device, args.dtype)


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
    add_placement_flags(sp, default=None)


def _eval_settings(args):
    """(target, eval settings, placement): command-line flags over the recipe's `model.target` / `eval.*` over
    defaults; the device and dtype resolved once, here."""
    from ppow_plugin import devices
    from ppow_plugin.config import EvalCfg, load_config
    cfg = load_config(args.recipe, []) if args.recipe else None
    base = cfg.eval if cfg else EvalCfg()
    flags = {  # EvalCfg field: (command-line flag, value or None)
        "benchmarks": ("--benchmarks", args.benchmarks.split(",") if args.benchmarks is not None else None),
        "num_prompts": ("--num-prompts", args.num_prompts), "max_new_tokens": ("--max-new-tokens", args.max_new_tokens),
        "temperature": ("--temperature", args.temperature), "seed": ("--seed", args.seed),
        "tree_depth": ("--depth", args.depth), "tree_top_k": ("--top-k", args.top_k),
        "tree_total_tokens": ("--total-tokens", args.total_tokens),
        "device": ("--device", args.device), "dtype": ("--dtype", args.dtype)}
    given = {k: v for k, (_, v) in flags.items() if v is not None}
    try:
        settings = dataclasses.replace(base, **given)
    except ValueError as exc:  # EvalCfg's own bounds; name the flag that set the field
        name = next((k for k in given if str(exc).startswith(f"eval.{k} ")), None)
        raise UserError((f"{flags[name][0]} {flags[name][1]}: " if name else "") + str(exc)) from None
    target = args.target or (cfg.model.target if cfg else "default")
    names = tuple("--" + k if getattr(args, k) is not None else f"eval.{k}" for k in ("device", "dtype"))
    return target, settings, devices.resolve_placement(settings.device, settings.dtype, names)


def check_out(args, inputs: dict, kind: str = "dir", flag: str = "--out") -> None:
    from ppow_plugin import outputs
    outputs.check_output(args.out, inputs, args.force, flag, kind)


CHAIN_MAX = 256  # --chain D: the static tree has D paths of 1..D tokens (D(D+1)/2 ids); the hosts' trees are 5-8 deep


def _sim_args(args) -> dict:
    """--simulate / --chain / --prompts as evaluate() keywords (the prompt file is read here: bad lines fail early)."""
    from ppow_plugin.data import eval_prompts
    from ppow_plugin.evaluation import simulate
    if args.chain is not None and not 1 <= args.chain <= CHAIN_MAX:
        raise UserError(f"--chain {args.chain}: must be in [1, {CHAIN_MAX}] drafts (a chain needs at least 1; "
                        f"its tree holds D paths of up to D tokens, so D is bounded)")
    if args.prompts and (args.benchmarks is not None or args.num_prompts is not None):
        given = "--benchmarks" if args.benchmarks is not None else "--num-prompts"
        raise UserError(f"--prompts {args.prompts} replaces the benchmarks: every line of it is a prompt, so "
                        f"{given} has nothing to select; drop {given} (or shorten the file)")
    prompts = eval_prompts.read_prompt_file(args.prompts, args.both_turns) if args.prompts else None
    return {"simulate": args.simulate, "prompts": prompts, "per_depth": args.per_depth,
            "sim_tree": simulate.chain(args.chain) if args.chain is not None else None}


def cmd_eval(args) -> int:
    from ppow_plugin import outputs
    from ppow_plugin.evaluation import eval_report, evaluate
    target, ev, place = _eval_settings(args)
    check_out(args, {"--drafter": args.drafter, "--target": outputs.target_input(target), "--recipe": args.recipe,
                      "--prompts": args.prompts})
    report = evaluate.evaluate(target, args.drafter, ev.benchmarks, ev.num_prompts, ev.temperature,
                               ev.max_new_tokens, ev.seed, out_dir=args.out, both_turns=args.both_turns,
                               tree=_tree(ev), placement=place, **_sim_args(args))
    print(eval_report.summary_markdown(report))
    print(f"report written to {args.out}")
    return 0


def _tree(ev):
    from ppow_plugin.evaluation import evaluate
    return evaluate.Eagle3Tree(ev.tree_depth, ev.tree_top_k, ev.tree_total_tokens)


def cmd_compare(args) -> int:
    from ppow_plugin import outputs
    from ppow_plugin.evaluation import eval_report, evaluate
    target, ev, place = _eval_settings(args)
    check_out(args, {"--target": outputs.target_input(target), "--recipe": args.recipe,
                      **{f"drafter #{i}": d for i, d in enumerate(args.drafters, 1)}})
    names = [n.strip() for n in args.names.split(",")] if args.names else None
    reports = evaluate.compare(target, args.drafters, names, ev.benchmarks, ev.num_prompts,
                               ev.temperature, ev.max_new_tokens, ev.seed, out_dir=args.out,
                               both_turns=args.both_turns, tree=_tree(ev), placement=place, **_sim_args(args))
    print(eval_report.compare_markdown(reports))
    print(f"comparison written to {args.out}")
    return 0


def cmd_profile(args) -> int:
    from ppow_plugin import outputs
    from ppow_plugin.evaluation import profile
    check_out(args, {"--drafter": args.drafter, "--target": outputs.target_input(args.target),
                      "--eval-report": args.eval_report}, kind="file")
    try:
        sizes = [int(n) for n in args.tree_sizes.split(",") if n.strip()]
    except ValueError:
        raise UserError(f"--tree-sizes {args.tree_sizes!r}: must be comma-separated integers, e.g. 1,4,8") from None
    result = profile.profile(args.target, args.drafter, args.repeats, sizes, args.prefix_len,
                             eval_report=args.eval_report, seed=args.seed, placement=placement(args))
    print(profile.format_profile(result))
    print(f"profile written to {profile.write_profile(result, args.out)}")
    return 0


def _out_flags(sp: argparse.ArgumentParser, default: str, holds: str) -> None:
    sp.add_argument("--out", default=default,
                    help=f"output dir for {holds} (default: ./{default}); an existing non-empty one needs --force")
    sp.add_argument("--force", action="store_true", help="replace a non-empty --out dir")


def add_eval_commands(sub) -> None:
    """ppow eval | compare | profile (issue 5)."""
    sp = sub.add_parser("eval", help="tau, acceptance and speedup of a drafter vs plain decoding")
    sp.add_argument("--drafter", required=True, help="EAGLE-1 (compact or host layout) or EAGLE-3 drafter dir")
    _out_flags(sp, "eval-report", "report.json, summary.md and PNGs")
    _eval_flags(sp)
    sp.set_defaults(fn=cmd_eval)
    sp = sub.add_parser("compare", help="evaluate several drafters under one protocol")
    sp.add_argument("drafters", nargs="+", help="drafter dirs; the first is the reference")
    sp.add_argument("--names", default=None, help="comma-separated names, one per drafter (default: dir names)")
    _out_flags(sp, "compare-report", "compare.md, compare.png and one report dir per drafter")
    _eval_flags(sp)
    sp.set_defaults(fn=cmd_compare)
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
    add_placement_flags(sp)
    sp.set_defaults(fn=cmd_profile)
