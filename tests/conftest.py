"""Shared fixtures: a small synthetic dataset in the REFER layout, generated once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from semires.refer import read_refer
from semires.synth import SynthOptions, write_dataset

REPO = Path(__file__).resolve().parents[1]
SMALL_SYNTH = SynthOptions(num_images=40, image_size=(64, 96), seed=3)


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory) -> Path:
    """A 40-image synthetic dataset: ``<root>/synthref/...`` and ``<root>/images/synthref/``."""
    root = tmp_path_factory.mktemp("refer")
    write_dataset(root, SMALL_SYNTH)
    return root


@pytest.fixture(scope="session")
def synth_anns(synth_root):
    return read_refer(synth_root, "synthref", "unc")
