"""Team sharing through a DVC remote: what one clone computed, another restores without running."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from .test_pipeline import SMALL, _edit_params, _ran, _sh, copy_project, stage_names

pytestmark = pytest.mark.e2e

# test_pipeline's SMALL cut to one label fraction and one method: sharing needs every stage
# kind once, not the whole matrix.
ONE = {**SMALL, "split": {"fractions": [10]}, "semi": {**SMALL["semi"], "methods": ["cpi_pwa"]}}


@pytest.fixture(scope="module")
def team(tmp_path_factory):
    """Clone A ran the pipeline, pushed outputs + run-cache and committed dvc.lock (README's
    team workflow); clone B is a fresh git clone of A."""
    root = tmp_path_factory.mktemp("team")
    a = copy_project(root / "a")
    _edit_params(a, ONE)
    _sh(a, "dvc", "remote", "add", "-d", "team", str(root / "remote"))
    _sh(a, "git", "add", "-A")
    _sh(a, "git", "commit", "-qm", "project")
    _sh(a, "dvc", "repro")
    _sh(a, "dvc", "push", "--run-cache")
    _sh(a, "git", "add", "dvc.lock")
    _sh(a, "git", "commit", "-qm", "results")
    b = clone(a, root / "b")
    return a, b


def clone(a: Path, dest: Path) -> Path:
    _sh(dest.parent, "git", "clone", "-q", str(a), str(dest))
    return dest


def tree(path: Path) -> dict[str, bytes]:
    return {str(f.relative_to(path)): f.read_bytes() for f in sorted(path.rglob("*")) if f.is_file()}


def test_clone_restores_everything_without_running(team):
    a, b = team
    out = _sh(b, "dvc", "repro", "--pull")
    assert _ran(out) == set(), f"stages ran in the clone: {_ran(out)}"
    for path in ("data/anns.json", "data/split/10.json", "data/metrics/split.json"):
        assert (b / path).read_bytes() == (a / path).read_bytes()
    assert "Data and pipelines are up to date" in _sh(b, "dvc", "repro")


def test_changed_training_param_in_fresh_clone_trains_again_and_fetches_the_rest(team, tmp_path):
    """A teammate changes semi.lr and runs `dvc repro --pull`: only the teacher-student stages
    and those after them run; everything upstream, the proposals included, comes from the remote."""
    a, _ = team
    c = clone(a, tmp_path / "c")
    lr = yaml.safe_load((c / "params.yaml").read_text())["semi"]["lr"]
    _edit_params(c, {"semi": {"lr": lr / 2}})
    out = _sh(c, "dvc", "repro", "--pull")
    ran = _ran(out)
    names = stage_names(c)
    after = {s for s in names if s.split("@")[0] in ("train_semi", "evaluate_semi", "report")}
    assert {s for s in names if s.startswith("train_semi@")}, "no teacher-student stage in dvc.yaml"
    assert ran == after, f"ran {sorted(ran)}, expected {sorted(after)}"
    assert "propose" not in ran
    assert tree(c / "data/proposals.zarr") == tree(a / "data/proposals.zarr"), (
        "the store must come from the remote"
    )
    for path in ("data/anns.json", "data/split/10.json", "data/burn_in/10/model.pt"):
        assert (c / path).read_bytes() == (a / path).read_bytes(), path
    trained = sorted(s.split("@")[1] for s in ran if s.startswith("train_semi@"))
    for cell in trained:
        method, fraction = cell.rsplit("-", 1)
        model = f"data/train_semi/{method}/{fraction}/model.pt"
        assert (c / model).read_bytes() != (a / model).read_bytes(), f"{model} did not change with semi.lr"
    assert "Data and pipelines are up to date" in _sh(c, "dvc", "repro")
