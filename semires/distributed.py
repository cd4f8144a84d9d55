"""torchrun helpers: one process per device, gloo on CPU and nccl on CUDA.

A stage runs the same code with one process or many. Under ``torchrun`` the environment
carries ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``; without it the process is rank 0 of 1 and no
process group is created. :func:`relaunch_under_torchrun` lets a plain ``semires <stage>``
start itself under torchrun when ``SEMIRES_NPROC`` asks for several processes, so the
process count never appears in dvc.yaml's ``cmd`` (DVC would record it as a dependency).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from semires.errors import SemiresError

NPROC_ENV = "SEMIRES_NPROC"


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def requested_nproc() -> int:
    """Processes asked for through ``SEMIRES_NPROC`` (default 1)."""
    raw = os.environ.get(NPROC_ENV, "1")
    try:
        n = int(raw)
    except ValueError:
        n = 0
    if n < 1:
        raise SemiresError(f"{NPROC_ENV}={raw!r}: expected a positive integer (processes per machine)")
    return n


def under_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def relaunch_under_torchrun(argv: Sequence[str] | None = None) -> bool:
    """Re-run this command under ``torchrun --standalone`` if ``SEMIRES_NPROC`` > 1.

    Returns False (do nothing) when already under torchrun or when one process is asked
    for; otherwise runs the child processes, waits, and exits with their status.
    """
    n = requested_nproc()
    if under_torchrun() or n == 1:
        return False
    args = list(sys.argv[1:] if argv is None else argv)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={n}",
        "-m",
        "stages.cli",
        *args,
    ]
    raise SystemExit(subprocess.call(cmd))


def init(prefer_cuda: bool = True) -> DistInfo:
    """Join the process group if under torchrun; pick this process's device."""
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", 0))
    cuda = prefer_cuda and torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local % torch.cuda.device_count())
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo", device_id=device if cuda else None)
    return DistInfo(rank=rank, world_size=world, local_rank=local, device=device)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_ok(ok: bool) -> bool:
    """True on every rank iff ``ok`` is True on every rank (so all ranks fail together)."""
    if not dist.is_initialized():
        return ok
    t = torch.tensor([0 if ok else 1], dtype=torch.int64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return int(t.item()) == 0


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_sum(values: list[int]) -> list[int]:
    """Element-wise sum of ``values`` over all ranks (``values`` itself without a group)."""
    if not dist.is_initialized():
        return list(values)
    t = torch.tensor(values, dtype=torch.int64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return [int(v) for v in t.tolist()]
