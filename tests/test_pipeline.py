"""End to end: the real `dvc repro` in a temporary git repository holding a copy of the project."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from .conftest import REPO

pytestmark = pytest.mark.e2e

# Small enough for CI; every stage still runs its real code.
SMALL = {
    "synth": {"num_images": 40, "image_size": [64, 80]},
    "split": {"fractions": [10, 50]},
    "burn_in": {"steps": 12, "batch_size": 4, "eval_every": 0, "checkpoint_every": 6, "log_every": 4},
    "semi": {
        "fractions": [10],
        "methods": ["cpi_pwa", "supervised"],
        "steps": 6,
        "batch_size": 4,
        "unlabeled_batch_size": 4,
        "eval_every": 0,
        "checkpoint_every": 3,
        "log_every": 2,
        "quality_samples": 16,
    },
    "evaluate": {"batch_size": 16},
}


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(
        GIT_AUTHOR_NAME="semires-test",
        GIT_AUTHOR_EMAIL="test@semires.invalid",
        GIT_COMMITTER_NAME="semires-test",
        GIT_COMMITTER_EMAIL="test@semires.invalid",
        HF_HUB_OFFLINE="1",
        DVC_NO_ANALYTICS="1",
    )
    return env


def _sh(cwd: Path, *cmd: str) -> str:
    p = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True)
    assert p.returncode == 0, f"{' '.join(cmd)} failed:\n{p.stdout}\n{p.stderr}"
    return p.stdout + p.stderr


def _ran(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


def _edit_params(repo: Path, updates: dict) -> None:
    path = repo / "params.yaml"
    params = yaml.safe_load(path.read_text())
    for sect, values in updates.items():
        params.setdefault(sect, {}).update(values)
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def copy_project(dest: Path) -> Path:
    """The project's files as a fresh clone has them (tracked and not ignored), in a new git repo."""
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.splitlines()
    for rel in files:
        src = REPO / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    _sh(dest, "git", "init", "-q")
    return dest


def stage_names(repo: Path) -> set[str]:
    """Every stage of dvc.yaml, foreach/matrix stages expanded as `dvc repro` names them."""
    out = _sh(repo, "dvc", "stage", "list", "--name-only")
    return set(out.split())


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    repo = copy_project(tmp_path_factory.mktemp("project"))
    _edit_params(repo, SMALL)
    _sh(repo, "git", "add", "-A")
    _sh(repo, "git", "commit", "-qm", "project")
    return repo


def test_repro_runs_every_stage_then_nothing(project):
    out = _sh(project, "dvc", "repro")
    assert _ran(out) == stage_names(project)
    assert (project / "data/anns.json").is_file()
    assert (project / "data/split/10.json").is_file()
    again = _sh(project, "dvc", "repro")
    assert _ran(again) == set()
    assert "Data and pipelines are up to date" in again


HEADLINE = {
    "val.oIoU",
    "val.mIoU",
    "val.student_oIoU",
    "val.student_mIoU",
    "pseudo.raw_mIoU",
    "pseudo.refined_mIoU",
}


def _flatten(d: dict, prefix: str = "") -> dict[str, float]:
    out = {}
    for k, v in d.items():
        out |= _flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v}
    return out


def metrics_table(repo: Path) -> dict[str, dict[str, float]]:
    """`dvc metrics show --json` as {file: {column: value}}."""
    shown = json.loads(_sh(repo, "dvc", "metrics", "show", "--json"))
    return {path: _flatten(m["data"]) for path, m in shown[""]["data"].items()}


def test_metrics_and_plots_show(project):
    """`dvc metrics show`: the headline only, a row per evaluated model, a handful of columns,
    a terminal's width; `dvc plots show`: the training and pseudo-label curves."""
    table = metrics_table(project)
    evaluated = {s for s in stage_names(project) if s.startswith(("evaluate@", "evaluate_semi@"))}
    assert len(table) == len(evaluated) and all(p.startswith("data/eval/") for p in table)
    assert set().union(*table.values()) <= HEADLINE
    assert set(table["data/eval/train_semi/cpi_pwa/10/metrics.json"]) == HEADLINE  # teacher, student, pseudo
    assert set(table["data/eval/train_semi/supervised/10/metrics.json"]) == {"val.oIoU", "val.mIoU"}
    text = _sh(project, "dvc", "metrics", "show")
    assert max(map(len, text.splitlines())) <= 160, text
    # `dvc plots show` still draws the training curves and the pseudo-label quality
    plots = set(json.loads(_sh(project, "dvc", "plots", "show", "--json"))["data"])
    assert {
        "data/burn_in/10/dvclive/plots/metrics/train/loss.tsv",
        "data/train_semi/cpi_pwa/10/dvclive/plots/metrics/val/mIoU.tsv",
        "data/train_semi/cpi_pwa/10/dvclive/plots/metrics/pseudo/refined_mIoU.tsv",
    } <= plots, sorted(plots)


def test_changing_split_reruns_split_and_later_only(project):
    _edit_params(project, {"split": {"seed": 1}})
    out = _sh(project, "dvc", "repro")
    ran = _ran(out)
    assert "split" in ran
    assert not ran & {"synth", "extract", "propose"}, f"upstream stages reran: {sorted(ran)}"
    assert _ran(_sh(project, "dvc", "repro")) == set()


def test_changing_a_semi_param_reruns_teacher_student_training_and_later_only(project):
    _sh(project, "git", "add", "-A")
    _sh(project, "git", "commit", "-qm", "results")
    _edit_params(project, {"semi": {"unsup_weight": 0.5}})
    ran = _ran(_sh(project, "dvc", "repro"))
    semi = {s for s in stage_names(project) if s.startswith(("train_semi@", "evaluate_semi@"))}
    assert semi <= ran
    untouched = {
        s for s in ran if s.split("@")[0] in ("synth", "extract", "split", "propose", "burn_in", "evaluate")
    }
    assert not untouched, f"stages that do not read semi.* reran: {sorted(untouched)}"
    # `dvc metrics diff` shows what moved: the teacher-student rows, nothing upstream
    moved = json.loads(_sh(project, "dvc", "metrics", "diff", "--json"))
    assert moved and all(p.startswith("data/eval/train_semi/") for p in moved), moved
