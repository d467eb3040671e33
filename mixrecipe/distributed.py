"""Process-group plumbing for the runner: which device and rank this process is, and sums across ranks.

Launched by ``torchrun`` (``WORLD_SIZE`` > 1) the ranks join one process group (nccl on GPU, gloo on
CPU); a single process runs the same code with the reductions turned into no-ops.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .config import Config, RecipeError

__all__ = [
    "DistContext", "wants_cuda", "setup_distributed", "all_sum", "all_max", "all_max_tensor",
    "gather_objects", "broadcast_buffers", "shutdown_distributed",
]


@dataclass(frozen=True)
class DistContext:
    """This process's place in the run.

    Attributes:
        rank, world, local_rank: as torchrun sets them (0, 1, 0 for one process).
        device: where this rank trains.
        enabled: whether a process group is up (world > 1).
    """

    rank: int
    world: int
    local_rank: int
    device: torch.device
    enabled: bool

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that writes files and prints."""
        return self.rank == 0


def wants_cuda(cfg: Config) -> bool:
    """Whether ``cfg.device`` (auto, cuda or cpu) puts the run on a GPU.

    Raises:
        RecipeError: device=cuda on a machine without one.
    """
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise RecipeError("device=cuda, but no CUDA device is available (use device=auto or device=cpu)")
    return cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())


def setup_distributed(cfg: Config) -> DistContext:
    """Pick the device from ``cfg.device`` and join the process group when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = wants_cuda(cfg)
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    if world > 1:
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    return DistContext(rank, world, local, device, world > 1)


def all_sum(values: list[float], d: DistContext) -> list[float]:
    """Element-wise sum over ranks, in float64 (on the run's device: nccl takes no CPU tensors)."""
    t = torch.tensor(values, dtype=torch.float64, device=d.device)
    if d.enabled:
        dist.all_reduce(t)
    return t.tolist()


def all_max(value: float, d: DistContext) -> float:
    """The largest ``value`` over ranks."""
    t = torch.tensor([value], dtype=torch.float64, device=d.device)
    if d.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def all_max_tensor(t: torch.Tensor, d: DistContext) -> torch.Tensor:
    """The element-wise maximum of ``t`` (on the run's device) over ranks, in place; ``t`` itself with one
    process."""
    if d.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def gather_objects(obj, d: DistContext) -> list:
    """Every rank's ``obj`` (picklable), in rank order, on every rank; ``[obj]`` with one process."""
    if not d.enabled:
        return [obj]
    out = [None] * d.world
    dist.all_gather_object(out, obj)
    return out


def broadcast_buffers(model: torch.nn.Module, d: DistContext) -> None:
    """Give every rank rank 0's buffers (BatchNorm running statistics drift apart per rank)."""
    if d.enabled:
        for buf in model.buffers():
            dist.broadcast(buf, src=0)


def shutdown_distributed(d: DistContext) -> None:
    """Leave the process group (after the DDP module is gone, else gloo runs abort at exit now and then)."""
    if d.enabled and dist.is_initialized():
        dist.destroy_process_group()
