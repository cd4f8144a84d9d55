"""What every stage command shares: the --params option and turning bad input into a message."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, ParamSpec, TypeVar

import typer

from semires.errors import SemiresError

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
    """Run a stage; a :class:`SemiresError` becomes one line on stderr and exit status 2."""

    def wrap(fn: Callable[P, R]) -> Callable[P, R]:
        @functools.wraps(fn)
        def run(*args: P.args, **kwargs: P.kwargs) -> R:
            try:
                return fn(*args, **kwargs)
            except SemiresError as e:
                one_line = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
                print(f"semires {name}: error: {one_line}", file=sys.stderr)
                raise typer.Exit(2) from None

        return run

    return wrap


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
        kept = [r for r in rows if r.strip() and int(float(r.split("\t", 1)[0])) <= step]
        if len(kept) < len(rows):
            write_text(tsv, "\n".join([header, *kept]) + "\n")
