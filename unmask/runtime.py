"""Where and how the computation runs: device, dtype/autocast, and DDP under torchrun."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from unmask.errors import UserError


@dataclass
class Runtime:
    device: torch.device
    dtype: torch.dtype
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def ddp(self) -> bool:
        return self.world_size > 1

    @property
    def is_master(self) -> bool:
        return self.rank == 0

    def autocast(self) -> contextlib.AbstractContextManager[None]:
        """Mixed precision on GPUs only: float32 runs (and CPU) use no autocast."""
        if self.dtype == torch.float32 or self.device.type == "cpu":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.ddp:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def barrier(self) -> None:
        if self.ddp:
            dist.barrier()

    def shutdown(self) -> None:
        if self.ddp and dist.is_initialized():
            dist.destroy_process_group()


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device={name}: CUDA is not available on this machine (use --device=cpu)")
    if name == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device=mps: MPS is not available on this machine (use --device=cpu)")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
    if dtype != torch.float32 and device.type == "cpu":
        raise UserError(f"--dtype={name} is for GPUs; use --dtype=float32 (or auto) on the CPU")
    return dtype


def init_runtime(device_name: str, dtype_name: str, backend: str) -> Runtime:
    """Single process, or one DDP process per `torchrun` worker (RANK/LOCAL_RANK/WORLD_SIZE set)."""
    if "RANK" not in os.environ:
        device = resolve_device(device_name)
        return Runtime(device=device, dtype=resolve_dtype(dtype_name, device))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    device = resolve_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend=backend)
    return Runtime(device, resolve_dtype(dtype_name, device), rank, local_rank, world_size)
