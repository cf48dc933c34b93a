"""Training: the `Trainer` that orchestrates SFT and PPOW runs; one unit per stage step (`sft_step`,
`ppow_step`, and `dense_step` for windows at every position); the target's pass shared by both
(`target_passes`); checkpoints and resume (`checkpoints`); the checks `train` and `validate` share before
any weight loads (`preflight`); the run directory and its lock (`rundir`); the memory / DeepSpeed plan (`plan`).

May import: every layer below it (`evaluation`, `data`, `drafters`, `method`, `host`, the top-level base
modules). Only `ppow_plugin.cli` imports it.
"""
