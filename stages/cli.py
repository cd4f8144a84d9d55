"""The ``semires`` command: one subcommand per DVC stage.

A stage runs in a process of its own (``dvc repro`` starts one per stage), so :func:`main`
imports only the module of the command it runs: `extract`, `split` or `report` never pay
for torch's and transformers' imports (seconds per process). ``app``, every command at once,
is what ``semires --help`` shows and what tests drive through typer's runner.
"""

from __future__ import annotations

import functools
import importlib
import sys
from collections.abc import Sequence

import typer

# command -> (module, function), in the order `semires --help` lists them
COMMANDS: dict[str, tuple[str, str]] = {
    "synth": ("stages.synth", "synth"),
    "extract": ("stages.extract", "extract"),
    "split": ("stages.split", "split"),
    "propose": ("stages.propose", "propose"),
    "burn-in": ("stages.burn_in", "burn_in"),
    "train-semi": ("stages.train_semi", "train_semi_command"),
    "evaluate": ("stages.evaluate", "evaluate"),
    "report": ("stages.report", "report"),
    "predict": ("stages.predict", "predict"),
    "import-checkpoint": ("stages.import_checkpoint", "import_checkpoint"),
}

HELP = (
    "Semi-supervised referring expression segmentation with SAM-refined pseudo-labels. "
    "Each command but predict and import-checkpoint is one stage of dvc.yaml; `dvc repro` runs them "
    "in order. `semires predict` segments your own images with a trained model; `semires "
    "import-checkpoint` turns an official LAVT / SemiRES checkpoint into a semires one."
)


def build(names: Sequence[str]) -> typer.Typer:
    """A ``semires`` app with the commands ``names`` (importing their modules only)."""
    cli = typer.Typer(
        name="semires", help=HELP, no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False
    )

    @cli.callback()
    def _group() -> None:  # a group even with one command: `semires burn-in ...` as always
        pass

    for name in names:
        module, function = COMMANDS[name]
        cli.command(name)(getattr(importlib.import_module(module), function))
    return cli


@functools.cache
def _full() -> typer.Typer:
    return build(list(COMMANDS))


def __getattr__(name: str) -> typer.Typer:
    if name == "app":  # every command: `from stages.cli import app`
        return _full()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def main(argv: Sequence[str] | None = None) -> None:
    """The console script: the named command's module alone, else every command (help, a typo)."""
    args = list(sys.argv[1:] if argv is None else argv)
    names = [args[0]] if args and args[0] in COMMANDS else list(COMMANDS)
    build(names)(args=args, prog_name="semires")


if __name__ == "__main__":
    main()
