"""Shared fixtures: a small synthetic dataset in the REFER layout, generated once per session."""

from __future__ import annotations

import contextlib
import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from semires.refer import read_refer
from semires.synth import SynthOptions, write_dataset

REPO = Path(__file__).resolve().parents[1]
SMALL_SYNTH = SynthOptions(num_images=40, image_size=(64, 96), seed=3)


@contextlib.contextmanager
def script_module(name: str) -> Iterator[ModuleType]:
    """``scripts/<name>.py`` imported as module ``name`` for the duration of the block."""
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while it executes
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(name, None)


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory) -> Path:
    """A 40-image synthetic dataset: ``<root>/synthref/...`` and ``<root>/images/synthref/``."""
    root = tmp_path_factory.mktemp("refer")
    write_dataset(root, SMALL_SYNTH)
    return root


@pytest.fixture(scope="session")
def synth_anns(synth_root):
    return read_refer(synth_root, "synthref", "unc")


# The longest files first: with `pytest -n 2 --dist loadfile` (make test) each worker starts
# on one of them and the short files fill in around them. Order within a file is kept.
LONGEST_FIRST = ("test_pipeline.py", "test_sharing.py", "test_faults.py", "test_sweep.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        name = item.path.name
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: each file keeps its own order
