"""torch.distributed glue: torchrun's environment, process group, DDP or FSDP wrapping.

Single process when WORLD_SIZE is unset. gloo on CPU, nccl on GPU."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel

from flexolmo_core.errors import InputError
from flexolmo_core.io.dtypes import resolve_device


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


def setup(requested_device: str = "auto") -> Dist:
    """torchrun's ranks (one process: rank 0 of 1); the first call opens the process group: NCCL when the loop
    runs on GPUs, gloo on the CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        on_gpu = requested_device != "cpu" and torch.cuda.is_available()
        backend = "nccl" if on_gpu else "gloo"
        dist.init_process_group(backend)
    return Dist(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))


def device(d: Dist, requested: str = "auto") -> torch.device:
    """This rank's device: `requested` (auto | cpu | cuda) as dtypes.resolve_device reads it, at LOCAL_RANK."""
    return resolve_device(requested, d.local_rank)


def wrap(model, d: Dist, strategy: str):
    """DDP (frozen weights are buffers; they are identical on every rank, so no buffer broadcast) or FSDP2
    (`fully_shard` per block, then the root: parameters, gradients and optimiser state are sharded)."""
    if not d.active:
        return model
    if strategy == "ddp":
        ids = [d.local_rank] if torch.cuda.is_available() else None
        return DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False)
    if strategy == "fsdp":
        for layer in model.layers:
            fully_shard(layer)
        fully_shard(model)
        return model
    raise InputError(f"distributed must be 'ddp' or 'fsdp', got {strategy!r}")


def unwrap(model):
    return getattr(model, "module", model)


def barrier(d: Dist) -> None:
    if d.active:
        dist.barrier()


def mean(value: float, d: Dist, on: torch.device | None = None) -> float:
    """The mean of `value` over ranks; the reduction runs on `on` (NCCL reduces CUDA tensors only)."""
    if not d.active:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=on)
    dist.all_reduce(t)
    return float(t) / d.world


def full_tensors(model) -> dict[str, torch.Tensor]:
    """The model's tensors under internal names, unsharded (a collective under FSDP: call on every rank)."""
    out = {}
    for name, t in unwrap(model).tensors().items():
        t = t.detach()
        out[name] = t.full_tensor() if hasattr(t, "full_tensor") else t
    return out
