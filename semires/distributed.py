"""torchrun helpers: one process per device, gloo on CPU and nccl on CUDA.

A stage runs the same code with one process or many. Under ``torchrun`` the environment
carries ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``; without it the process is rank 0 of 1 and no
process group is created. :func:`relaunch_under_torchrun` lets a plain ``semires <stage>``
start itself under torchrun when ``SEMIRES_NPROC`` asks for several processes, so the
process count never appears in dvc.yaml's ``cmd`` (DVC would record it as a dependency).

The processes of one run die together. torchrun starts every worker in a session of its
own, so killing the launcher's process group (a terminal's Ctrl-C, a job scheduler) would
leave the workers running, holding GPUs and writing outputs. Here the launcher runs
torchrun through this module (``python -m semires.distributed``), which asks the kernel to
kill torchrun when the launcher ends, and every worker asks the same of torchrun
(``PR_SET_PDEATHSIG``, Linux): the whole tree follows its launcher within milliseconds. A
worker that fails with a :class:`SemiresError` has printed its one line; torchrun's own
report of the failure (a traceback of its agent) is left out.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from semires.errors import SemiresError

NPROC_ENV = "SEMIRES_NPROC"
LAUNCHER_ENV = "SEMIRES_LAUNCHER_PID"  # torchrun's parent: the `semires <stage>` that relaunched itself
AGENT_ENV = "SEMIRES_AGENT_PID"  # the workers' parent: torchrun, started by that launcher
_PR_SET_PDEATHSIG = 1


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


def launched_worker() -> bool:
    """True in a worker that :func:`relaunch_under_torchrun` started (its launcher holds the
    run's lock and checked its outputs)."""
    return under_torchrun() and AGENT_ENV in os.environ


def die_with_parent(parent: int | None = None) -> None:
    """Have the kernel SIGKILL this process when its parent process ends (Linux only).

    ``parent``: the pid the parent should have. If it has already ended (this process was
    handed to another parent before the request took effect), end now.
    """
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    if parent is not None and os.getppid() != parent:
        os.kill(os.getpid(), signal.SIGKILL)


def relaunch_under_torchrun(argv: Sequence[str] | None = None) -> bool:
    """Re-run this command under ``torchrun --standalone`` if ``SEMIRES_NPROC`` > 1.

    Returns False (do nothing) when already under torchrun or when one process is asked
    for; otherwise runs the child processes, waits, and exits with their status. A worker
    (already under torchrun) is set to die with torchrun here.
    """
    n = requested_nproc()
    if under_torchrun():
        agent = os.environ.get(AGENT_ENV)
        die_with_parent(int(agent) if agent else None)
        return False
    if n == 1:
        return False
    args = list(sys.argv[1:] if argv is None else argv)
    cmd = [
        sys.executable,
        "-m",
        "semires.distributed",  # torchrun, tied to this process (see the module docstring)
        "--standalone",
        f"--nproc-per-node={n}",
        "-m",
        "stages.cli",
        *args,
    ]
    raise SystemExit(subprocess.call(cmd, env={**os.environ, LAUNCHER_ENV: str(os.getpid())}))


def _signal_name(code: int) -> str:
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit status {code}"


def run_torchrun(argv: Sequence[str]) -> int:
    """torchrun with ``argv``, as the launcher's child: dies with the launcher, passes its
    own pid to the workers (so that they die with it), and reports a failed worker in one
    line (none when the worker exited with status 2: it printed its own error)."""
    launcher = os.environ.get(LAUNCHER_ENV)
    die_with_parent(int(launcher) if launcher else None)
    os.environ[AGENT_ENV] = str(os.getpid())
    # what torchrun sets itself for several workers, but without its four-line warning
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    # the agent logs every failure with a traceback of its own; the worker's line says it all
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    try:
        run(parse_args(list(argv)))
    except ChildFailedError as e:
        codes = {rank: f.exitcode for rank, f in e.failures.items()}
        if 2 in codes.values():
            return 2
        # the first failure, not a worker torchrun stopped (SIGTERM) because of it
        rank = min((r for r, c in codes.items() if c != -signal.SIGTERM), default=min(codes))
        print(
            f"semires: worker {rank} (pid {e.failures[rank].pid}) ended with {_signal_name(codes[rank])} "
            "(its output is above); the other workers were stopped",
            file=sys.stderr,
        )
        return 1
    except SignalException as e:
        return 128 + int(e.sigval)
    return 0


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


def average_buffers(module: torch.nn.Module) -> None:
    """Average ``module``'s floating-point buffers (BatchNorm statistics) over all ranks, in
    place, so that every rank holds the same (nothing without a process group).

    Each rank's BatchNorm layers update their statistics from its own share of the batch;
    an EMA teacher that follows them would differ from rank to rank. SyncBatchNorm (CUDA
    only) makes the statistics the same by itself; on the CPU the teacher's statistics are
    averaged after each step instead (the running mean is then exactly the global batch's;
    the running variance the mean of the ranks' variances)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    bufs = [b for b in module.buffers() if b.is_floating_point()]
    if not bufs:
        return
    flat = torch.cat([b.reshape(-1) for b in bufs])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    torch._foreach_copy_(
        bufs, [c.view_as(b) for c, b in zip(flat.split([b.numel() for b in bufs]), bufs, strict=True)]
    )


def sync_batchnorm(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``module`` with its BatchNorm layers as SyncBatchNorm where that runs (several
    processes on CUDA), as the official scripts convert student, teacher and burn-in model;
    the module itself otherwise. State dict keys stay the same."""
    if not dist.is_initialized() or dist.get_world_size() == 1 or device.type != "cuda":
        return module
    return torch.nn.SyncBatchNorm.convert_sync_batchnorm(module)


def batchnorm_synced(module: torch.nn.Module) -> bool:
    """True when every BatchNorm of ``module`` is a SyncBatchNorm (or it has none)."""
    norms = [m for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    return all(isinstance(m, torch.nn.SyncBatchNorm) for m in norms)


if __name__ == "__main__":
    raise SystemExit(run_torchrun(sys.argv[1:]))
