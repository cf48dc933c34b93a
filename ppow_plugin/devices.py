"""Device and dtype, resolved once at an entry point: training's `dist.device` (`get_device`, one GPU per
rank) and evaluation's `--device`/`--dtype` (`resolve_placement`: target, drafter and HF baseline together).

    place = resolve_placement("auto", "auto")   # cuda:LOCAL_RANK + bf16 with a GPU, else cpu + fp32
    model.to(place.device, place.dtype)

Everything a command then creates goes on `place.device`; nothing here allocates on a GPU except through
`torch.cuda.set_device`, which must happen before the first CUDA allocation of a rank.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any, NamedTuple

import torch

from ppow_plugin.errors import UserError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
EVAL_DTYPES = {**DTYPES, "fp16": torch.float16}  # evaluation may also run a target in fp16 (no training in it)
DTYPE_NAMES = {v: k for k, v in EVAL_DTYPES.items()}
SERVING_DTYPE = "bf16"  # what `auto` picks on a GPU: the dtype the targets are served in


class Placement(NamedTuple):
    """Where an evaluation runs the target (and drafter, HF baseline): one device, one dtype."""
    device: torch.device
    dtype: torch.dtype

    @property
    def tag(self) -> str:
        """device type and dtype, e.g. "cpu-fp32", "cuda-bf16": what cached target outputs depend on."""
        return f"{self.device.type}-{DTYPE_NAMES[self.dtype]}"

    def describe(self) -> dict[str, str]:
        return {"device": str(self.device), "dtype": DTYPE_NAMES[self.dtype]}

    def cache_folder(self, root: Path) -> Path:
        """Where a cache of target outputs made here lives under `root`: CPU fp32 entries in `root` itself
        (where they always were), every other device type and dtype in its own subfolder (`cuda-bf16`,
        `cpu-bf16`, ...), so a bf16 GPU run never reads fp32 CPU entries nor the other way round. The one rule
        for the continuation cache (`continuations.cache_root`) and the feature cache (`FeatureCache.open`)."""
        return root if self.tag == CPU_FP32.tag else root / self.tag


CPU_FP32 = Placement(torch.device("cpu"), torch.float32)  # where every exactness check runs


def resolve_placement(device: str = "auto", dtype: str = "auto", flags: tuple[str, str] = ("--device", "--dtype")
                      ) -> Placement:
    """The evaluation device and dtype, resolved once at a command's entry point.

    `auto` device: this rank's GPU when CUDA is available (as training: `get_device`), else the CPU. `auto` dtype:
    the serving dtype bf16 on a GPU (fp16 on one without bf16), fp32 elsewhere. `flags` name the two settings
    in error messages (`--device`/`--dtype`, or the recipe's `eval.device`/`eval.dtype`).

    Raises:
        UserError: an unknown name, a GPU that is not there, bf16 on a GPU without it, fp16 on the CPU.
    """
    dev_flag, dtype_flag = flags
    if dtype != "auto" and dtype not in EVAL_DTYPES:
        raise UserError(f"{_eq(dtype_flag, dtype)}: use auto, fp32, bf16 or fp16")
    dev = get_device(device, dev_flag)
    if dtype == "auto":
        dtype = "fp32" if dev.type != "cuda" else (SERVING_DTYPE if torch.cuda.is_bf16_supported() else "fp16")
    if dev.type == "cuda" and dtype == "bf16" and not torch.cuda.is_bf16_supported():
        raise UserError(f"{_eq(dtype_flag, 'bf16')}: this GPU ({torch.cuda.get_device_name(dev)}) has no bf16; "
                        f"use {_eq(dtype_flag, 'fp16')} or fp32")
    if dev.type != "cuda" and dtype == "fp16":
        raise UserError(f"{_eq(dtype_flag, 'fp16')} runs on a GPU only; on {dev.type} use {_eq(dtype_flag, 'fp32')} "
                        "or bf16")
    return Placement(dev, EVAL_DTYPES[dtype])


def get_device(name: str = "auto", flag: str = "dist.device") -> torch.device:
    """Resolve a device name once at the entry point: auto -> cuda, then mps, then cpu.

    `cuda` (and `auto` with a GPU) means this rank's GPU, `cuda:{LOCAL_RANK}` (0 without a launcher), and
    `torch.cuda.set_device` is called on it here, before anything is allocated on a GPU: otherwise every
    rank's target, CUDA context and NCCL communicator land on GPU 0. `cuda:N` pins one GPU (a single
    process; refused under a launcher with several ranks, where it would pin them all to GPU N).
    """
    if name == "auto":
        if torch.cuda.is_available():
            return _this_rank_gpu(None, name, flag)
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"{_eq(flag, name)} is not a device; use auto, cpu, cuda, cuda:N or mps")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"{_eq(flag, name)} but no CUDA device is visible; use {_eq(flag, 'cpu')} or auto")
        return _this_rank_gpu(dev.index, name, flag)
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"{_eq(flag, name)} but MPS is not available; use {_eq(flag, 'cpu')} or auto")
    return dev


def _eq(flag: str, value: str) -> str:
    """How a setting reads in a message: `dist.device=cuda` for a recipe field, `--device cuda` for a flag."""
    return f"{flag} {value}" if flag.startswith("--") else f"{flag}={value}"


def local_rank() -> int:
    """This process's rank on its node: LOCAL_RANK as torchrun and the deepspeed launcher set it (0 alone)."""
    return int(os.environ.get("LOCAL_RANK", 0))


def _this_rank_gpu(index: int | None, name: str, flag: str = "dist.device") -> torch.device:
    """cuda:`index`, or this rank's GPU when `index` is None; made the current device (`set_device`)."""
    local, count = local_rank(), torch.cuda.device_count()
    if index is None:
        # one visible GPU per process (a scheduler that sets CUDA_VISIBLE_DEVICES per rank): it is this rank's
        index = 0 if count == 1 else local
    elif int(os.environ.get("WORLD_SIZE", 1)) > 1 and index != local:
        raise UserError(f"{_eq(flag, name)} pins every rank to GPU {index}; use {_eq(flag, 'cuda')} "
                        f"(each rank takes GPU LOCAL_RANK, here {local})")
    if index >= count:
        raise UserError(f"{_eq(flag, name)}: this rank wants GPU {index} (LOCAL_RANK={local}) but {count} "
                        "GPU(s) are visible; start at most one process per visible GPU (--nproc_per_node / "
                        "--num_gpus) or check CUDA_VISIBLE_DEVICES")
    dev = torch.device("cuda", index)
    torch.cuda.set_device(dev)
    return dev


def direct_load(device: torch.device | None) -> dict[str, Any]:
    """`from_pretrained` keywords that load weights straight onto a GPU (needs accelerate; no full CPU copy
    first), else none: the caller then moves the model with `.to(device)`."""
    direct = device is not None and device.type != "cpu" and importlib.util.find_spec("accelerate") is not None
    return {"device_map": {"": str(device)}} if direct else {}


def synchronize(device: torch.device) -> None:
    """Wait for the kernels queued on `device` (CUDA runs them asynchronously): call it around a timed block."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
