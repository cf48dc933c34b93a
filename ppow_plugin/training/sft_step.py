"""One supervised micro-step (`ppow sft`, and the continued-SFT control): the target pass, then the drafter
family's SFT loss (EAGLE-1: next-feature SmoothL1 + soft CE on noised features; EAGLE-3: training-time test).

    step = SftStep(cfg, adapter, drafter, target_passes, gen, device, sft_vocab)
    item = step.prepare(sample, step_index)   # dict: ids [T], valid [T], tpass, sft_vocab
    result = step.loss(item)                  # StepResult(loss with grad, detached stats)
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ppow_plugin.config import Config
from ppow_plugin.training.target_passes import TargetPasses, sequence_tensors


class StepResult(NamedTuple):
    loss: torch.Tensor  # scalar, with grad
    stats: dict[str, float]  # detached scalars for logging


class SftStep:
    def __init__(self, cfg: Config, adapter, drafter, target_passes: TargetPasses, gen: torch.Generator,
                 device: torch.device, sft_vocab: torch.Tensor | None):
        self.cfg, self.adapter, self.drafter, self.target_passes = cfg, adapter, drafter, target_passes
        self.gen, self.device, self.sft_vocab = gen, device, sft_vocab

    def prepare(self, sample, step: int = 0, keep_graph: bool = False) -> dict:
        """The target pass over `sample` (no grad; `step` and `keep_graph` are PPOW's)."""
        ids, valid = sequence_tensors(sample, self.device)
        tpass = self.target_passes(self.drafter, sample, ids, valid)
        return {"ids": ids, "valid": valid, "tpass": tpass, "policy": None, "sft_vocab": self.sft_vocab}

    def loss(self, item: dict) -> StepResult:
        return StepResult(*self.adapter.sft_loss(self.drafter, self.target_passes.target, item, self.cfg, self.gen))
