"""Seeding, process group and the optimisation engine (device and dtype: `devices`, re-exported here).

This is the only module that imports DeepSpeed (inside `_deepspeed_engine`), so everything else imports
without it. The DeepSpeed config is generated here from the one typed recipe; there is no second JSON.

Launch: single process as-is, or under `torchrun --nproc_per_node 2` / `deepspeed --num_gpus 2`; the
process group starts only when the launcher's environment variables (RANK, WORLD_SIZE) are present.
"""

from __future__ import annotations

import importlib.util
import math
import os
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ppow_plugin.config import Config, DistCfg, OptimCfg
# device and dtype resolution live in `devices`; these names stay importable from here (trainer, launchers)
from ppow_plugin.devices import DTYPES, get_device, local_rank  # noqa: F401
from ppow_plugin.errors import UserError

def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_process_group(device: torch.device) -> DistInfo:
    """Start torch.distributed only under a launcher (RANK/WORLD_SIZE set); gloo on CPU, nccl on CUDA."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    local = local_rank()
    if world > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        torch.distributed.init_process_group(backend=backend)
    return DistInfo(rank=rank, world_size=world, local_rank=local)


def collective_device() -> torch.device:
    """Where the tensors of this process group's collectives must live: NCCL takes CUDA tensors only (this
    rank's current GPU, made current by `get_device`); gloo takes CPU tensors. Read from the group at call time,
    because DeepSpeed starts NCCL by itself even for a single GPU."""
    if "nccl" in str(torch.distributed.get_backend()).lower():  # "nccl" or a mixed "cpu:gloo,cuda:nccl"
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _group_started() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def barrier() -> None:
    if not _group_started():
        return
    dev = collective_device()
    if dev.type == "cuda":  # NCCL's barrier otherwise guesses a GPU from the global rank
        torch.distributed.barrier(device_ids=[dev.index])
    else:
        torch.distributed.barrier()


def all_reduce_mean(values: dict[str, float]) -> dict[str, float]:
    """Average scalar metrics over ranks (no-op in a single process), on the backend's device."""
    if not _group_started():
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=collective_device())
    torch.distributed.all_reduce(t)
    t /= torch.distributed.get_world_size()
    return dict(zip(keys, t.tolist()))


def lr_at(step: int, cfg: OptimCfg, max_steps: int, time_frac: float | None = None) -> float:
    """Learning rate after `step` optimizer steps: linear warm-up, then constant / cosine / linear decay.

    The decay runs over the steps after the warm-up, or (`time_frac`, for optim.decay_over=minutes) over the
    run's time: `time_frac` is the training time so far over run.max_minutes."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    if time_frac is not None:
        frac = min(1.0, max(0.0, time_frac))
    else:
        frac = min(1.0, (step - cfg.warmup_steps) / max(1, max_steps - cfg.warmup_steps))
    if cfg.schedule == "cosine":
        return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * frac))
    return cfg.lr * (1.0 - frac)


def total_optimizer_steps(cfg: Config) -> int:
    """Optimizer steps in a full run: PPOW takes `loss.ppo_epochs` x `loss.minibatches` of them per trainer step
    (one per part of each pass over the same rollouts), so the schedule is stretched to match and does not end
    early."""
    return cfg.run.max_steps * (cfg.loss.ppo_epochs * cfg.loss.minibatches if cfg.stage == "ppow" else 1)


def deepspeed_config(cfg: Config, world_size: int) -> dict[str, Any]:
    """The DeepSpeed JSON, generated from the recipe (also printed by `ppow plan`)."""
    return {
        "train_micro_batch_size_per_gpu": cfg.data.micro_batch,
        "gradient_accumulation_steps": cfg.optim.grad_accum,
        "train_batch_size": cfg.data.micro_batch * cfg.optim.grad_accum * world_size,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": {"stage": cfg.dist.zero_stage},
        "bf16": {"enabled": cfg.dist.dtype == "bf16"},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,  # we log ourselves
        "wall_clock_breakdown": False,
    }


class Engine:
    """Optimizer + clipping + LR schedule behind one interface, for DeepSpeed or plain torch.

    `backward(loss)` accumulates; `step()` returns True when an optimizer step happened (every
    `grad_accum` micro-steps). `module` is the trainable drafter (DeepSpeed's wrapped module under ZeRO).
    """

    def __init__(self, module: torch.nn.Module, cfg: Config, dist_info: DistInfo):
        self.cfg = cfg
        self.micro_step = 0
        self.opt_step = 0
        self.time_frac: float | None = None  # optim.decay_over=minutes: the run's time over run.max_minutes
        self.grad_cos: float | None = None  # run.grad_cosine: this update's gradient . the previous one's, cosine
        self._prev_grad: torch.Tensor | None = None
        self.grad_accum = cfg.optim.grad_accum
        params = [p for p in module.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=cfg.optim.lr, betas=cfg.optim.betas,
                                weight_decay=cfg.optim.weight_decay)
        self.kind = cfg.dist.engine
        if self.kind == "deepspeed":
            self.ds, self.optimizer = _deepspeed_engine(module, opt, cfg, dist_info.world_size)
            self.module = self.ds.module
        else:
            if dist_info.world_size > 1:
                raise UserError("dist.engine=torch is single-process; use dist.engine=deepspeed under a launcher")
            self.ds, self.optimizer, self.module = None, opt, module
        self._set_lr()

    def set_time(self, train_s: float) -> None:
        """The run's training seconds so far: the decay's progress under optim.decay_over=minutes."""
        if self.cfg.optim.decay_over == "minutes":
            self.time_frac = train_s / (60 * self.cfg.run.max_minutes)
            self._set_lr()

    def _set_lr(self) -> None:
        lr = lr_at(self.opt_step, self.cfg.optim, total_optimizer_steps(self.cfg), self.time_frac)
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def backward(self, loss: torch.Tensor) -> None:
        if self.ds is not None:
            self.ds.backward(loss)  # DeepSpeed scales by 1/grad_accum itself
        else:
            (loss / self.grad_accum).backward()
        self.micro_step += 1

    def grads_finite(self) -> bool:
        """False if any local gradient is NaN/inf (checked before the optimizer step)."""
        for p in self.module.parameters():
            g = p.grad
            if g is not None and not torch.isfinite(g).all():
                return False
        return True

    def zero_grad(self) -> None:
        if self.ds is not None:
            self.ds.zero_grad()
        else:
            self.optimizer.zero_grad(set_to_none=True)

    def step(self) -> bool:
        """Optimizer step at an accumulation boundary. Returns True when one happened."""
        boundary = self.micro_step % self.grad_accum == 0
        if self.ds is not None:
            self.ds.step()  # DeepSpeed tracks the boundary and clips itself
        elif boundary:
            self.grad_cos = self._cosine_with_previous() if self.cfg.run.grad_cosine else None
            torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.cfg.optim.grad_clip)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        if boundary:
            self.opt_step += 1
            self._set_lr()
        return boundary

    def _cosine_with_previous(self) -> float | None:
        """Cosine of the gradient now (before clipping) with the previous update's; None for the first update
        and after one without gradients (a skipped non-finite step)."""
        grads = [p.grad.reshape(-1) for p in self.module.parameters() if p.grad is not None]
        if not grads:
            return None
        g = torch.cat(grads).double()
        prev, self._prev_grad = self._prev_grad, g
        if prev is None:
            return None
        return float(g @ prev / (g.norm() * prev.norm()).clamp_min(1e-300))

    # -- checkpoint state ---------------------------------------------------------------------
    def save(self, directory: Path) -> None:
        """Write model + optimizer state under `directory` (all ranks call this under DeepSpeed)."""
        if self.ds is not None:
            self.ds.save_checkpoint(str(directory), tag="engine", client_state={})
        else:
            torch.save({"module": self.module.state_dict(), "optimizer": self.optimizer.state_dict()},
                       directory / "engine.pt")

    def load(self, directory: Path) -> None:
        if self.ds is not None:
            path, _ = self.ds.load_checkpoint(str(directory), tag="engine")
            if path is None:
                raise UserError(f"checkpoint {directory} has no DeepSpeed state; was it written by engine=torch?")
        else:
            state = torch.load(directory / "engine.pt", map_location="cpu", weights_only=True)
            self.module.load_state_dict(state["module"])
            self.optimizer.load_state_dict(state["optimizer"])
        self._set_lr()

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Consolidated drafter weights on CPU, trainable ones from the optimizer's fp32 master weights.

        One rule for every export: a live run's drafter and `ppow export` of its last checkpoint
        (`consolidate_deepspeed_checkpoint`) both write the fp32 masters, not the bf16 copy the module computes
        with. engine=torch is fp32 only (Config), so its module is the master. Every rank calls this (ZeRO-3
        gathers partitions; the masters are all-reduced across the data-parallel group).
        """
        if self.ds is None:
            return _cpu_fp32(self.module.state_dict())
        if self.cfg.dist.zero_stage == 3:
            import deepspeed  # noqa: F401  (only to reach GatheredParameters; module already imported)
            params = list(self.module.parameters())
            with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
                state = _cpu_fp32(self.module.state_dict())
        else:
            state = _cpu_fp32(self.module.state_dict())
        return state | _cpu_fp32(_fp32_masters(self.module))


def _fp32_masters(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """DeepSpeed's fp32 master copy of each trainable parameter (ZeRO 1-3, bf16 optimizer), by state-dict name;
    parameters without one (ZeRO-0 in fp32: the module's weight is the master) are left out."""
    from deepspeed.utils import safe_get_full_fp32_param
    masters = {}
    for name, param in module.named_parameters():
        if param.requires_grad:
            master = safe_get_full_fp32_param(param)
            if master is not None:
                masters[name] = master
    return masters


def _cpu_fp32(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU copies, floating tensors as fp32; integer/bool buffers (EAGLE-3 d2t/t2d) keep their dtype."""
    return {k: v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype).clone()
            for k, v in state.items()}


def _deepspeed_engine(module, optimizer, cfg: Config, world_size: int):
    if importlib.util.find_spec("deepspeed") is None:
        raise UserError("dist.engine=deepspeed needs DeepSpeed: pip install 'ppow-plugin[deepspeed]' "
                        "(or set dist.engine=torch for a single process)")
    _single_process_env()
    # Imported here, not at module top: every other module must import without DeepSpeed.
    import deepspeed
    import deepspeed.ops

    # Skip the 45 s JIT build of the shared-memory comm op on CPU; gloo is used instead.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    engine, opt, _, _ = deepspeed.initialize(model=module, optimizer=optimizer,
                                             config=deepspeed_config(cfg, world_size))
    return engine, opt


def shutdown() -> None:
    """Destroy the process group and forget DeepSpeed's cached groups, so a later run in the same
    process (tests, notebooks) can start a fresh engine: DeepSpeed keeps the destroyed world group in
    module globals and the next `deepspeed.initialize` fails with "Group ... is not registered"."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    groups = sys.modules.get("deepspeed.utils.groups")  # only if DeepSpeed was ever imported
    if groups is not None:
        for name in ("_WORLD_GROUP", "_DATA_PARALLEL_GROUP", "_ZERO_PARAM_INTRA_PARALLEL_GROUP"):
            if hasattr(groups, name):
                setattr(groups, name, None)


def _single_process_env() -> None:
    """DeepSpeed wants launcher variables even for one process; provide loopback defaults."""
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")


def dist_summary(cfg: DistCfg) -> dict[str, str]:
    """What `ppow doctor` prints about device, dtype and the DeepSpeed accelerator."""
    out = {"device": str(get_device(cfg.device)), "dtype": cfg.dtype, "target_dtype": cfg.target_dtype}
    if importlib.util.find_spec("deepspeed") is None:
        out["deepspeed"] = "not installed"
    else:
        from importlib.metadata import version
        out["deepspeed"] = version("deepspeed")
        out["deepspeed_accelerator"] = "cpu (gloo)" if not torch.cuda.is_available() else "cuda"
    return out


def consolidate_deepspeed_checkpoint(directory: Path, tag: str = "engine") -> dict[str, torch.Tensor]:
    """One full state dict from a DeepSpeed checkpoint `directory/<tag>/` of any ZeRO stage (0-3), on CPU.

    Stage 0 keeps whole weights in `mp_rank_00_model_states.pt`; stages 1-3 keep the fp32 master weights
    in the ZeRO optimizer partitions, merged by DeepSpeed's `zero_to_fp32`. Frozen parameters (the EAGLE-1
    embeddings) are in the partitions only under stages 2/3, so the model-states copy fills them in for
    stage 1. Floating tensors come back as fp32; integer/bool buffers (`d2t`, `t2d`) keep their dtype.
    Only load checkpoints you trust: DeepSpeed pickles Python objects into these files.

    Raises:
        UserError: DeepSpeed missing, no tag dir, unreadable/truncated files, or a weight that could not
            be reconstructed (e.g. a ZeRO-3 checkpoint with a rank's partition missing).
    """
    tag_dir = Path(directory) / tag
    model_files = sorted(tag_dir.glob("*model_states.pt"))
    if not model_files:
        raise UserError(f"{directory} holds no DeepSpeed checkpoint (no {tag}/*model_states.pt); "
                        "pass a checkpoints/step-NNNNNN directory written by `ppow train`")
    if importlib.util.find_spec("deepspeed") is None:
        raise UserError(f"{directory} is a DeepSpeed checkpoint; reading it needs pip install 'ppow-plugin[deepspeed]'")
    import contextlib
    import io

    # Imported here, not at module top: every other module must import without DeepSpeed.
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    try:
        module = torch.load(model_files[0], map_location="cpu", weights_only=False)["module"]
    except Exception as exc:  # truncated zip/pickle data raises several types
        raise UserError(f"{model_files[0]} is unreadable or truncated ({type(exc).__name__}); "
                        "use another checkpoint") from None
    state = {k: v for k, v in module.items() if v.numel() > 0}  # ZeRO-3 leaves empty placeholders
    if any(tag_dir.glob("*_optim_states.pt")):  # ZeRO stage >= 1 (or bf16): merge the fp32 partitions
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # zero_to_fp32 prints progress
                state.update(get_fp32_state_dict_from_zero_checkpoint(str(directory), tag=tag))
        except Exception as exc:
            raise UserError(f"could not consolidate the ZeRO checkpoint {tag_dir} ({type(exc).__name__}: "
                            f"{str(exc)[:120]}); are all ranks' files present and intact?") from None
    lost = sorted(set(module) - set(state))
    if lost:
        raise UserError(f"{tag_dir}: weights {lost[:4]} could not be reconstructed; are all ranks' files present?")
    return {k: (v.detach().to(torch.float32) if v.is_floating_point() else v.detach()).contiguous()
            for k, v in state.items()}
