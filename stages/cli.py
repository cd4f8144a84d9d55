"""The ``semires`` command: one subcommand per DVC stage."""

from __future__ import annotations

import typer

from stages.burn_in import burn_in
from stages.evaluate import evaluate
from stages.extract import extract
from stages.import_checkpoint import import_checkpoint
from stages.predict import predict
from stages.propose import propose
from stages.report import report
from stages.split import split
from stages.synth import synth
from stages.train_semi import train_semi_command

app = typer.Typer(
    name="semires",
    help="Semi-supervised referring expression segmentation with SAM-refined pseudo-labels. "
    "Each command but predict and import-checkpoint is one stage of dvc.yaml; `dvc repro` runs them "
    "in order. `semires predict` segments your own images with a trained model; `semires "
    "import-checkpoint` turns an official LAVT / SemiRES checkpoint into a semires one.",
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
app.command("predict")(predict)
app.command("import-checkpoint")(import_checkpoint)

if __name__ == "__main__":
    app()
