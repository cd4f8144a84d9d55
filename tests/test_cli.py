"""The stage commands through typer's runner, as DVC runs them."""

import json
import pickle
import shutil

import pytest
import yaml
from typer.testing import CliRunner

from stages.cli import app

from .conftest import REPO

runner = CliRunner()


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["synth"].update(num_images=30, image_size=[64, 80])
    params["split"]["fractions"] = [10, 50]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _run(*args):
    return runner.invoke(app, list(args))


def test_help_lists_every_stage():
    out = _run("--help").output
    for cmd in ("synth", "extract", "split"):
        assert cmd in out


def test_synth_extract_split(workdir):
    r = _run("synth", "--out", "data/refer")
    assert r.exit_code == 0, r.output
    assert (workdir / "data/refer/synthref/refs(unc).p").is_file()
    r = _run("extract", "--out", "data/anns.json")
    assert r.exit_code == 0, r.output
    assert "train:" in r.output and "sentences" in r.output
    r = _run(
        "split", "--anns", "data/anns.json", "--out", "data/split", "--summary", "data/metrics/split.json"
    )
    assert r.exit_code == 0, r.output
    ten = json.loads((workdir / "data/split/10.json").read_text())
    fifty = json.loads((workdir / "data/split/50.json").read_text())
    assert set(ten["labeled"]) < set(fifty["labeled"])
    summary = json.loads((workdir / "data/metrics/split.json").read_text())
    assert summary["10"]["labeled"]["images"] == len(ten["labeled"])
    assert not list(workdir.rglob("*.tmp")), "no temporary file left behind"


def _bad_params(workdir, **split):
    params = yaml.safe_load((workdir / "params.yaml").read_text())
    params["split"].update(split)
    (workdir / "params.yaml").write_text(yaml.safe_dump(params))


def test_bad_input_is_one_line_exit_2_and_keeps_outputs(workdir):
    assert _run("synth").exit_code == 0
    assert _run("extract").exit_code == 0
    assert _run("split").exit_code == 0
    outputs = ["data/anns.json", "data/split/10.json", "data/split/50.json", "data/metrics/split.json"]
    before = {p: (workdir / p).read_bytes() for p in outputs}

    _bad_params(workdir, fractions=[10, 150])
    r = _run("split")
    assert r.exit_code == 2
    assert "semires split: error: params.yaml: split.fractions[1] = 150.0" in r.output
    assert "Traceback" not in r.output

    refs = workdir / "data/refer/synthref/refs(unc).p"
    refs.write_bytes(pickle.dumps({"not": "refs"}))
    r = _run("extract")
    assert r.exit_code == 2 and "not a REFER refs pickle" in r.output

    shutil.rmtree(workdir / "data/refer/synthref")
    r = _run("extract")
    assert r.exit_code == 2 and "refs pickle not found" in r.output

    _bad_params(workdir, fractions=[10], files={10: "missing.json"})
    r = _run("split")
    assert r.exit_code == 2 and "missing.json: split file not found" in r.output

    after = {p: (workdir / p).read_bytes() for p in outputs}
    assert after == before, "a failed stage leaves earlier outputs as they were"
    assert not list(workdir.rglob("*.tmp"))


def test_split_from_a_semires_file(workdir):
    assert _run("synth").exit_code == 0
    assert _run("extract").exit_code == 0
    anns = json.loads((workdir / "data/anns.json").read_text())
    train = sorted({r["image_id"] for r in anns["refs"] if r["split"] == "train"})
    entries = [{"iid": i, "mask_id": 0, "refs": ["x"]} for i in train[:3]]
    (workdir / "paper.json").write_text(json.dumps({"train": entries, "val": []}))
    _bad_params(workdir, fractions=[10, 50], files={10: "paper.json"})
    r = _run("split")
    assert r.exit_code == 0, r.output
    ten = json.loads((workdir / "data/split/10.json").read_text())
    assert ten["labeled"] == train[:3] and ten["source"] == "paper.json" and ten["seed"] is None


@pytest.mark.parametrize("command", ["synth", "extract", "split"])
def test_a_data_stage_runs_without_importing_torch(command):
    """`dvc repro` starts a process per stage: the data stages leave torch and transformers
    unimported, and the console script runs the named command from its module alone."""
    import subprocess
    import sys

    code = (
        "import sys; from stages.cli import main\n"
        f"try:\n    main([{command!r}, '--help'])\nexcept SystemExit as e:\n    assert e.code == 0, e.code\n"
        "print(sorted(m for m in ('torch', 'transformers', 'stages.burn_in') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.splitlines()[-1] == "[]", out.stdout
    assert f"Usage: semires {command}" in out.stdout
