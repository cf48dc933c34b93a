"""`ppow export | plan`: a drafter out to a serving format; per-device memory and the DeepSpeed config."""

from __future__ import annotations

from ppow_plugin.cli.eval_commands import check_out


def cmd_export(args) -> int:
    from ppow_plugin import outputs
    from ppow_plugin.drafters import export
    check_out(args, {"SRC": args.source, "--target": outputs.target_input(args.target),
                      "--eval-report": args.eval_report}, flag="output")
    out, drafter = export.export(args.source, args.out, args.format, target=args.target, force=args.force,
                                 min_tau=args.min_tau, eval_report=args.eval_report, verifier=args.verifier,
                                 dtype=args.dtype)
    print(drafter.describe())
    print(f"exported {args.format} drafter to {out}")
    return 0


def add_export_command(sub) -> None:
    """ppow export (issue 6); docs/export.md."""
    sp = sub.add_parser("export", help="write a drafter in a format EAGLE / vLLM / SGLang load")
    sp.add_argument("source", help="run dir (newest intact checkpoint), checkpoints/step-N dir, or drafter dir")
    sp.add_argument("out", help="output dir (written atomically)")
    sp.add_argument("--format", required=True, choices=["eagle1", "eagle1-compact", "eagle3", "speculators"])
    sp.add_argument("--target", default=None,
                    help="'default' or a target dir (default: the checkpoint's recorded target)")
    sp.add_argument("--verifier", default=None, metavar="NAME",
                    help="the target as the serving machine finds it (Hugging Face id, or a path there), written "
                         "as given (default: the hub id of a known target family; docs/export.md)")
    sp.add_argument("--dtype", default=None, choices=["fp32", "fp16", "bf16"],
                    help="dtype of the exported weights (default: the source's)")
    sp.add_argument("--force", action="store_true", help="replace a non-empty out dir; export despite --min-tau")
    sp.add_argument("--min-tau", type=float, default=None, help="refuse when the eval report's tau is lower")
    sp.add_argument("--eval-report", default=None,
                    help="`ppow eval` report.json of these same weights; its tau goes to ppow_meta.json")
    sp.set_defaults(fn=cmd_export)


def cmd_plan(args) -> int:
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


def add_plan_command(sub) -> None:
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
    sp.set_defaults(fn=cmd_plan)
