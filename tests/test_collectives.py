"""Collectives on the backend's device (issue 26): under NCCL every collective the project calls
(`distributed.all_reduce_mean`, `distributed.barrier`) uses this rank's GPU; under gloo, the CPU.

No GPU here: a stub process group reports its backend and rejects tensors on the wrong device, as NCCL does
("No backend type associated with device type cpu"). A CUDA tensor cannot be built on this machine, so
`torch.tensor(..., device=...)` is wrapped to build on the CPU and remember the device it was asked for; the stub
checks that device."""

import pytest
import torch

from ppow_plugin import distributed


class StubGroup:
    """A 2-rank process group whose other rank reports the same values (the mean is the input)."""

    def __init__(self, backend: str):
        self.backend = backend
        self.barriers = []

    def device_of(self, t: torch.Tensor) -> torch.device:
        return getattr(t, "asked_device", t.device)

    def all_reduce(self, t, op=None):
        dev = self.device_of(t)
        if (self.backend == "nccl") != (dev.type == "cuda"):
            raise RuntimeError(f"No backend type associated with device type {dev.type} ({self.backend} group)")
        t.mul_(2)  # the sum over two ranks holding the same values

    def barrier(self, device_ids=None):
        self.barriers.append(device_ids)


@pytest.fixture(params=["nccl", "gloo"])
def group(request, monkeypatch):
    stub = StubGroup(request.param)
    dist = torch.distributed
    monkeypatch.setattr(dist, "is_available", lambda: True)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: stub.backend)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(dist, "all_reduce", stub.all_reduce)
    monkeypatch.setattr(dist, "barrier", stub.barrier)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)  # set_device(cuda:3) happened (LOCAL_RANK=3)
    real_tensor = torch.tensor

    def tensor(data, *args, device=None, **kwargs):
        t = real_tensor(data, *args, **kwargs)
        t.asked_device = torch.device(device) if device is not None else t.device
        return t

    monkeypatch.setattr(torch, "tensor", tensor)
    return stub


def test_all_reduce_mean_on_the_backends_device(group):
    values = {"loss": 1.5, "accept_len": 2.25, "kl": 0.0}
    assert distributed.all_reduce_mean(values) == values


def test_barrier_names_this_ranks_gpu_under_nccl(group):
    distributed.barrier()
    assert group.barriers == [[3] if group.backend == "nccl" else None]


def test_collective_device(group):
    expected = torch.device("cuda", 3) if group.backend == "nccl" else torch.device("cpu")
    assert distributed.collective_device() == expected


def test_single_process_needs_no_group(monkeypatch):
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    assert distributed.all_reduce_mean({"loss": 1.0}) == {"loss": 1.0}
