"""Data-parallel training under ``torchrun`` (or ``accelerate launch``): one process per GPU, or per CPU slot.

    torchrun --nproc-per-node 4 --no-python flywheel train reward --dataset ... --recipe configs/...

A launcher sets ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK``; :func:`setup` reads them, joins the process group
(NCCL on GPUs, gloo on CPU) and picks the device. Without them (the plain ``flywheel train ...``) it is a
world of one and every helper here is a no-op, so the trainers have one code path.

What the trainers do with it: every rank holds the whole model wrapped in DistributedDataParallel (gradients
are averaged in ``backward``); a step's global batch (the recipe's ``batch_size`` / ``rollout_batch``) is cut
into one slice per rank, so a run has the same step count and, up to floating point, the same updates at any
world size; statistics that steer training (reward whitening, advantage whitening, the KL controller's
measurement) are reduced over all ranks; only rank 0 talks to MLflow, writes checkpoints and registers models.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as tdist

from training.config import DEVICES


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def shard(self, items: Any) -> Any:
        """This rank's slice of a global batch (a list, array or tensor): every ``world``-th item from ``rank``."""
        return items[self.rank::self.world] if self.active else items

    def wrap(self, model: torch.nn.Module, find_unused_parameters: bool = False) -> torch.nn.Module:
        """The model as the update step calls it: DistributedDataParallel when there are several ranks.
        ``find_unused_parameters`` for models with trainable weights outside the loss's graph (a backbone's
        pooler the reward model does not use)."""
        if not self.active:
            return model
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=find_unused_parameters)

    def mean(self, values: torch.Tensor) -> torch.Tensor:
        """Element-wise mean over ranks (each rank passes the same shape)."""
        if not self.active:
            return values
        out = values.detach().to(self._comm_device(), torch.float64).clone()
        tdist.all_reduce(out)
        return (out / self.world).to(values.device, values.dtype)

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        if not self.active:
            return values
        out = values.detach().to(self._comm_device(), torch.float64).clone()
        tdist.all_reduce(out)
        return out.to(values.device, values.dtype)

    def gather(self, values: torch.Tensor) -> torch.Tensor:
        """The ranks' 1-D tensors (same length on every rank) in global-batch order (undoing :meth:`shard`)."""
        if not self.active:
            return values
        parts = [torch.empty_like(values, device=self._comm_device()) for _ in range(self.world)]
        tdist.all_gather(parts, values.detach().to(self._comm_device()).contiguous())
        return torch.stack(parts, 1).reshape(-1).to(values.device)

    def barrier(self) -> None:
        if self.active:
            tdist.barrier()

    def _comm_device(self) -> torch.device:
        return self.device if tdist.get_backend() == "nccl" else torch.device("cpu")


def pick_device(preference: str, local_rank: int = 0) -> torch.device:
    """``auto``: this rank's GPU when CUDA is available, else the CPU; ``cpu`` / ``cuda`` force one."""
    if preference not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {preference!r}")
    if preference == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("the recipe asks for device: cuda, but torch sees no CUDA device")
    if preference == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def setup(device: str = "auto") -> Dist:
    """The process's place in the launcher's world, with the process group joined (once) when it has several."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device, local_rank)
    if world > 1 and not tdist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        # ranks > 0 wait at a barrier while rank 0 evaluates and registers: allow that more than the 10-30 min default
        tdist.init_process_group("nccl" if dev.type == "cuda" else "gloo", rank=rank, world_size=world,
                                 timeout=timedelta(hours=2))
    return Dist(rank, world, local_rank, dev)


def optimizer_to(opt: torch.optim.Optimizer, device: torch.device) -> None:
    """Move an optimizer's state (a resumed checkpoint's moments, loaded on the CPU) to the model's device;
    step counters stay where they are (Adam keeps them on the CPU)."""
    for state in opt.state.values():
        for k, v in state.items():
            if torch.is_tensor(v) and k != "step":
                state[k] = v.to(device)


def teardown() -> None:
    """Leave the process group (at the end of a command run under torchrun)."""
    if tdist.is_available() and tdist.is_initialized():
        tdist.destroy_process_group()


def check_divisible(name: str, value: int, world: int) -> None:
    if value % world:
        raise ValueError(f"{name}={value} must be a multiple of the number of processes ({world}): each rank "
                         f"takes an equal slice of the global batch")
