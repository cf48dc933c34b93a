"""Training: the `Trainer` that orchestrates SFT and PPOW runs, the run directory and its lock (`rundir`),
and the memory / DeepSpeed plan (`plan`).

May import: every layer below it (`evaluation`, `data`, `drafters`, `method`, `host`, the top-level base
modules). Only `ppow_plugin.cli` imports it.
"""
