"""Where training runs: the device, and this process's place in a torchrun job.

Started by ``torchrun``, every process trains on its own batches (batch_size is per process) under
DistributedDataParallel, one GPU per process, and only rank 0 writes: checkpoints, config.json, the training summary,
TensorBoard events and preview grids. Without torchrun a run is one process, rank 0 of 1, and nothing here
communicates.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel


@dataclass(frozen=True)
class Distributed:
    """Where this process stands in a torchrun job (one process, rank 0 of 1, without torchrun)."""

    rank: int = 0  # this process's place among all processes
    world_size: int = 1  # processes training together
    local_rank: int = 0  # this process's place on its host: the GPU it trains on

    @classmethod
    def from_env(cls) -> "Distributed":
        """torchrun's environment: RANK, WORLD_SIZE, LOCAL_RANK (MASTER_ADDR/PORT are read by init_process_group)."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        return cls(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(name: str) -> torch.device:
    """A TrainConfig.device name as a torch device: "auto" is CUDA when torch sees a GPU, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ValueError(f"device {name!r} is not a torch device (use auto, cpu or cuda)") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but this torch build sees no CUDA GPU")
    return device


def training_device(name: str, world: Distributed) -> torch.device:
    """The device this process trains on: under torchrun on CUDA, the GPU of its local rank."""
    device = resolve_device(name)
    if world.world_size > 1 and device.type == "cuda":
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    if device.type == "cuda":  # every step has the same shapes: cuDNN times its kernels once and keeps the fastest
        torch.backends.cudnn.benchmark = True
    return device


@contextlib.contextmanager
def process_group(world: Distributed, device: torch.device) -> Iterator[None]:
    """The job's process group for the duration of the block (NCCL between GPUs, gloo between CPU processes)."""
    if world.world_size == 1:
        yield
        return
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    try:
        yield
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def wrap(module: nn.Module, world: Distributed, device: torch.device) -> nn.Module:
    """The module behind DistributedDataParallel when distributed (its gradients all-reduced in backward), else
    itself."""
    if world.world_size == 1:
        return module
    return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)


def all_agree(flag: bool, world: Distributed, device: torch.device) -> bool:
    """True on every process once any process says so (ranks must stop at the same step)."""
    if world.world_size == 1:
        return flag
    value = torch.tensor([float(flag)], device=device)  # the training device: NCCL reduces CUDA tensors only
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def barrier(world: Distributed) -> None:
    """Every process waits here for all the others (a no-op in one process)."""
    if world.world_size > 1:
        dist.barrier()
