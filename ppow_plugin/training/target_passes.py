"""The target's pass over one training sequence, shared by both stages' steps.

    passes = TargetPasses(cfg, adapter, target, kv, feature_cache_or_None)
    ids, valid = sequence_tensors(sample, device)   # [T] int64, [T] bool
    tpass = passes(drafter, sample, ids, valid)     # rollout.TargetPass (features, hidden, logits)
"""

from __future__ import annotations

import torch

from ppow_plugin.config import Config
from ppow_plugin.data import feature_cache
from ppow_plugin.host import eagle_compat
from ppow_plugin.method import dense, rollout
from ppow_plugin.training import dense_step


def sequence_tensors(sample, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [T], valid [T]) on `device`: valid[i] for i in 1..T-2 says position i predicts x_{i+1}, an assistant
    token the drafter is trained on (position 0 has no feature before it, T-1 no next token)."""
    ids = torch.as_tensor(sample.input_ids, dtype=torch.long, device=device)
    mask = torch.as_tensor(sample.loss_mask, dtype=torch.bool, device=device)
    valid = torch.zeros_like(mask)
    valid[1:-1] = mask[2:]
    return ids, valid


class TargetPasses:
    """The target's pass, from the feature cache when it is on (then no target layer runs).

    A miss runs the target, stores the pass and then uses its fp16-rounded copy, so a step computes the same
    whether its sequence was cached before or not (resume stays bit-exact). Cached SFT passes carry logits
    only at `valid` positions (the only ones SFT reads), or none when the adapter's SFT loss recomputes them;
    PPOW's rollout path reads every row (windows, ADAW, `data_verify.verify_on_data`); its data-path step
    (`rollout.positions: all | N`) only the valid positions and the K-1 rows after each (`dense.judged_rows`).
    """

    def __init__(self, cfg: Config, adapter, target, kv, features: feature_cache.FeatureCache | None):
        self.cfg, self.adapter, self.target, self.kv, self.features = cfg, adapter, target, kv, features

    def __call__(self, drafter, sample, ids: torch.Tensor, valid: torch.Tensor) -> rollout.TargetPass:
        if dense_step.uses_data_path(self.cfg):
            rows = dense.judged_rows(valid, self.cfg.rollout.window)
        elif self.cfg.stage == "ppow":
            rows = None
        else:
            rows = valid if self.adapter.sft_reads_target_logits else torch.zeros_like(valid)
        if self.features is not None:
            cached = self.features.get(sample, self.target.lm_head, rows)
            if cached is not None:
                return cached
        tpass = self.run_target(drafter, ids)
        if self.features is None:
            return tpass
        self.features.put(sample, tpass)
        return feature_cache.cached_target_pass(tpass.features.half(), tpass.hidden.half(), self.target.lm_head, rows)

    def run_target(self, drafter, ids: torch.Tensor) -> rollout.TargetPass:
        """The target's own pass over `ids` [T] (no cache read or written): what a miss computes and stores."""
        eagle_compat.reset_kv(self.kv)
        return self.adapter.target_pass(drafter, self.target, ids, self.kv)
