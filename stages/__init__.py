"""The DVC stages of semires: one module per stage of dvc.yaml, each one typer command.

A stage parses params.yaml (through :mod:`stages.params`), reads its inputs, calls the
``semires`` library and writes its outputs atomically. No method code lives here.
"""
