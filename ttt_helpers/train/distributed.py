"""Training over several processes under `torchrun`: the device of each process, the process
group, and the points where the processes wait for or agree with each other.

Without a process group (one process, WORLD_SIZE unset or 1) every function here is a no-op
or answers for this process alone.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from .config import TrainConfig


def init_distributed(config: TrainConfig) -> tuple[torch.device, bool]:
    """The device, and whether a process group was started here (under torchrun: WORLD_SIZE > 1)."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if config.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(config.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)  # one GPU per process under torchrun
    if device.type == "cuda" and device.index >= torch.cuda.device_count():
        raise ValueError(
            f"device: {device} (LOCAL_RANK={local_rank}) does not exist, this machine has "
            f"{torch.cuda.device_count()} CUDA GPU(s); start at most one process per GPU or pass device='cpu'"
        )
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        return device, True
    return device, False


def rank_and_world_size() -> tuple[int, int]:
    """This process's rank and the number of processes (0 and 1 without a process group)."""
    if not dist.is_initialized():
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def barrier() -> None:
    """Wait until every process is here."""
    if dist.is_initialized():
        dist.barrier()


def all_processes(flag: bool) -> bool:
    """Whether `flag` holds on every process (itself without a process group)."""
    if not dist.is_initialized():
        return flag
    value = torch.tensor(int(flag), device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())
