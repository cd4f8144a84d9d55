"""The ``semires`` command: one subcommand per DVC stage."""

from __future__ import annotations

import typer

from stages.burn_in import burn_in
from stages.evaluate import evaluate
from stages.extract import extract
from stages.import_checkpoint import import_checkpoint
from stages.propose import propose
from stages.report import report
from stages.split import split
from stages.synth import synth
from stages.train_semi import train_semi_command

app = typer.Typer(
    name="semires",
    help="Semi-supervised referring expression segmentation with SAM-refined pseudo-labels. "
    "Each command is one stage of dvc.yaml; `dvc repro` runs them in order.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.command("synth")(synth)
app.command("extract")(extract)
app.command("split")(split)
app.command("propose")(propose)
app.command("burn-in")(burn_in)
app.command("train-semi")(train_semi_command)
app.command("evaluate")(evaluate)
app.command("report")(report)
app.command("import-checkpoint")(import_checkpoint)

if __name__ == "__main__":
    app()
