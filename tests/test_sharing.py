"""Team sharing through a DVC remote: what one clone computed, another restores without running."""

from __future__ import annotations

import pytest

from .test_pipeline import SMALL, _edit_params, _ran, _sh, copy_project, stage_names

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def team(tmp_path_factory):
    """Clone A ran the pipeline and pushed outputs + run-cache; clone B is a fresh git clone of A."""
    root = tmp_path_factory.mktemp("team")
    a = copy_project(root / "a")
    _edit_params(a, SMALL)
    _sh(a, "dvc", "remote", "add", "-d", "team", str(root / "remote"))
    _sh(a, "git", "add", "-A")
    _sh(a, "git", "commit", "-qm", "project")
    _sh(a, "dvc", "repro")
    _sh(a, "dvc", "push", "--run-cache")
    _sh(a, "git", "add", "dvc.lock")
    _sh(a, "git", "commit", "-qm", "results")
    b = root / "b"
    _sh(root, "git", "clone", "-q", str(a), str(b))
    return a, b


def test_clone_restores_everything_without_running(team):
    a, b = team
    out = _sh(b, "dvc", "repro", "--pull")
    assert _ran(out) == set(), f"stages ran in the clone: {_ran(out)}"
    for path in ("data/anns.json", "data/split/10.json", "data/metrics/split.json"):
        assert (b / path).read_bytes() == (a / path).read_bytes()
    assert "Data and pipelines are up to date" in _sh(b, "dvc", "repro")


def test_changed_param_in_clone_runs_only_what_reads_it(team):
    _, b = team
    _sh(b, "dvc", "repro", "--pull")
    _edit_params(b, {"split": {"seed": 5}})
    out = _sh(b, "dvc", "repro", "--pull")
    ran = _ran(out)
    assert "split" in ran
    assert not ran & {"synth", "extract", "propose"}, f"upstream stages reran: {sorted(ran)}"
    assert ran <= stage_names(b)
