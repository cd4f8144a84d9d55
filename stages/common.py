"""What every stage command shares: the --params option, turning bad input and faults of the
machine into a message, and one run at a time per scratch folder."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import json
import os
import shutil
import socket
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Annotated, ParamSpec, TypeVar

import typer

from semires.atomic import WriteError, as_write_error
from semires.errors import CollectiveError, SemiresError

P = ParamSpec("P")
R = TypeVar("R")

ParamsOption = Annotated[Path, typer.Option("--params", help="The params file to read.")]
DEFAULT_PARAMS = Path("params.yaml")
# Options several stages share (defaults are the paths dvc.yaml uses)
AnnsOption = Annotated[Path, typer.Option("--anns", help="Annotation file from `extract`.")]
LiveOption = Annotated[Path, typer.Option("--live", help="DVCLive folder (metrics.json, plots/).")]
ScratchOption = Annotated[
    Path, typer.Option("--scratch", help="Where partial runs live (git- and DVC-ignored).")
]
ResumeOption = Annotated[
    bool, typer.Option("--resume", help="Continue a killed run of the same inputs if one is in --scratch.")
]


def stage_command(name: str) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Run a stage; a :class:`SemiresError`, or a write the machine refused (a full disk, a
    read-only folder), becomes one line on stderr and exit status 2. Of an error that every
    process of a distributed run raised together (:class:`CollectiveError`), rank 0 prints
    the line and the others exit quietly."""

    def wrap(fn: Callable[P, R]) -> Callable[P, R]:
        @functools.wraps(fn)
        def run(*args: P.args, **kwargs: P.kwargs) -> R:
            try:
                return fn(*args, **kwargs)
            except SemiresError as e:
                if not (isinstance(e, CollectiveError) and os.environ.get("RANK", "0") != "0"):
                    _print_error(name, e)
                raise typer.Exit(2) from None
            except (OSError, shutil.Error) as e:
                fault = as_write_error(e)
                if fault is None:
                    raise
                _print_error(name, fault)
                raise typer.Exit(2) from None

        return run

    return wrap


def _print_error(stage: str, e: BaseException) -> None:
    one_line = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
    print(f"semires {stage}: error: {one_line}", file=sys.stderr, flush=True)


def check_writable(folder: Path) -> None:
    """Write a byte in ``folder`` (in the nearest folder above it that exists, where it is
    still to be made), or fail naming it: a stage checks its output folders before hours of
    work rather than at the end. Nothing is left behind, not even a folder."""
    there = folder
    while not there.exists() and there != there.parent:
        there = there.parent
    try:
        if not there.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(there))
        fd, name = tempfile.mkstemp(prefix=".semires-write-check.", dir=there)
        try:
            os.write(fd, b"x")
        finally:
            os.close(fd)
            os.unlink(name)
    except OSError as e:
        fault = as_write_error(e, folder)
        if fault is None:
            raise SemiresError(
                f"{folder}: cannot write to this folder ({e.strerror or e}); fix it and rerun"
            ) from e
        raise fault from e


@contextlib.contextmanager
def exclusive_run(stage: str, scratch: Path, outputs: Sequence[Path]) -> Iterator[None]:
    """One run of ``stage`` at a time per scratch folder, with its output folders writable.

    Before any work, ``scratch`` and the folder of every path in ``outputs`` must take a
    write (one line names the first that does not). Then the run holds an exclusive lock
    on ``scratch/.lock`` until it ends: a second run with the same scratch folder would
    race it (resume the same partial work, delete it under the first, move outputs into
    place twice), so it is refused with one line naming the holder. A worker started by
    :func:`semires.distributed.relaunch_under_torchrun` skips both (its launcher did them
    and holds the lock for the whole run); under a bare torchrun (several machines) the
    first process of each machine checks the folders and rank 0 holds the lock (the
    machines share the scratch folder: they write one store). A write fault the machine
    raises during the run without naming a file (a full disk under a logger's open file) is
    reported with these folders.
    """
    from semires import distributed  # only the stages that run under torchrun import torch here

    folders = [scratch, *dict.fromkeys(p.parent for p in outputs)]
    launched = distributed.launched_worker()
    lock, fd = scratch / ".lock", None
    if not launched and int(os.environ.get("LOCAL_RANK", "0")) == 0:
        for folder in folders:
            check_writable(folder)
    if not launched and int(os.environ.get("RANK", "0")) == 0:
        scratch.mkdir(parents=True, exist_ok=True)
        fd = _lock(lock, stage)
    try:
        yield
    except OSError as e:
        fault = as_write_error(e)
        if fault is None or e.filename is not None:
            raise
        raise WriteError(
            f"{', '.join(map(str, folders))}: a write failed ({e.strerror}); free space on that disk "
            "(or make the folders writable) and rerun"
        ) from e
    finally:
        if fd is not None:
            with contextlib.suppress(OSError):
                lock.unlink()  # before the unlock: a run that opens the file now finds it gone
            os.close(fd)


def _lock(path: Path, stage: str) -> int:
    """An exclusive ``flock`` on ``path`` (held until the returned descriptor is closed or the
    process ends, however it ends), or a :class:`SemiresError` naming the holder. The file
    is removed when a run ends, so a lock taken on a file no longer at ``path`` is taken
    again on the new one."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode("utf-8", "replace").strip() or "a process"
            os.close(fd)
            raise SemiresError(
                f"{path.parent}: another `semires {stage}` run ({holder}) is using this scratch folder; "
                "wait for it to end or stop it (or give this run its own --scratch)"
            ) from None
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the run that held it ended and removed it meanwhile
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
    return fd


def log(stage: str, message: str) -> None:
    print(f"[{stage}] {message}", flush=True)


def open_live(directory: Path, *, resume: bool, checkpoint: Path | None = None):
    """A DVCLive logger writing metrics and plots to ``directory`` (no dvc.yaml, no experiment).

    Resuming from ``checkpoint``, the rows a killed run logged after that checkpoint's step
    are dropped first: the resumed run logs those steps again, and the plots would show them
    twice. DVCLive 3 reads the git HEAD when it starts and fails in a repository without a
    commit yet (a fresh ``git init``); metrics are still worth writing there, so it then
    logs to files only.
    """
    from dvclive import Live
    from scmrepo.exceptions import SCMError

    from semires.train import checkpoint_step

    step = checkpoint_step(checkpoint) if resume and checkpoint is not None else None
    if step is not None:
        drop_rows_after(directory / "plots" / "metrics", step)
    summary = directory / "metrics.json"
    if resume and summary.is_file():
        try:
            json.loads(summary.read_text(encoding="utf-8"))
        except ValueError:  # a run killed while DVCLive rewrote it: the next log writes it again
            summary.unlink()

    class _Live(Live):
        def _init_dvc(self) -> None:
            try:
                super()._init_dvc()
            except SCMError:  # no commit: nothing to compare with or save an experiment to
                self._dvc_repo = None
                self._save_dvc_exp = False
                self._dvc_file = self._init_dvc_file()

    return _Live(str(directory), resume=resume, save_dvc_exp=False, dvcyaml=False)


def drop_rows_after(metrics_dir: Path, step: int) -> None:
    """Keep only the rows up to ``step`` in every DVCLive ``.tsv`` under ``metrics_dir``."""
    from semires.atomic import write_text

    for tsv in sorted(metrics_dir.rglob("*.tsv")):
        header, *rows = tsv.read_text(encoding="utf-8").splitlines()
        kept = [r for r in rows if _step_of(r) is not None and _step_of(r) <= step]
        if len(kept) < len(rows):
            write_text(tsv, "\n".join([header, *kept]) + "\n")


def _step_of(row: str) -> int | None:
    """The step of a DVCLive ``.tsv`` row; None for a row a killed run left cut short."""
    try:
        return int(float(row.split("\t", 1)[0])) if "\t" in row else None
    except ValueError:
        return None
