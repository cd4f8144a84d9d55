"""scripts/sweep.py: variants become params files, datasets are shared, the table has each figure."""

import contextlib
import io
import json
from pathlib import Path

import pytest
import yaml

from .conftest import script_module

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def sweep():
    with script_module("sweep") as module:
        yield module


def test_variant_overrides_are_yaml_values_and_unknown_sections_fail(sweep):
    base = yaml.safe_load((ROOT / "params.yaml").read_text())
    name, over, params = sweep.parse_variant(["deep", "model.depths=[1,1,2,1]", "burn_in.lr=2e-3"], base)
    assert name == "deep" and over == {"model.depths": [1, 1, 2, 1], "burn_in.lr": 2e-3}
    assert params["model"]["depths"] == [1, 1, 2, 1] and params["burn_in"]["lr"] == 2e-3
    assert base["burn_in"]["lr"] != 2e-3  # the base is not touched
    # only synth / dataset / split decide the dataset
    assert sweep.data_key(params) == sweep.data_key(base)
    _, _, other = sweep.parse_variant(["more", "synth.num_images=10"], base)
    assert sweep.data_key(other) != sweep.data_key(base)
    with pytest.raises(SystemExit, match="no section 'nodel'"):
        sweep.parse_variant(["x", "nodel.depths=[1]"], base)
    with pytest.raises(SystemExit, match="not KEY=VALUE"):
        sweep.parse_variant(["x", "burn_in.lr"], base)


@pytest.fixture(scope="module")
def ran(sweep, tmp_path_factory):
    """One sweep of three variants on one small dataset: two train, one is refused by burn-in."""
    out = tmp_path_factory.mktemp("sweep")
    small = ["synth.num_images=24", "synth.image_size=[64,72]", "burn_in.steps=3", "burn_in.eval_every=2"]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        rc = sweep.main(
            ["--out", str(out), "--jobs", "2", "--threads", "1", "--device", "cpu", "--fit-samples", "8",
             "--variant", "a", *small, "--variant", "b", *small, "model.embed_dim=16",
             "--variant", "bad", *small, "burn_in.steps=0"]
        )  # fmt: skip
    return out, rc, printed.getvalue().strip().splitlines()


def test_variants_share_one_dataset_and_are_tabulated(ran, sweep):
    out, _, table = ran
    assert len(list(out.glob("data-*"))) == 1  # one synth / extract / split for all three
    report = json.loads((out / "sweep.json").read_text())
    assert list(report) == ["a", "b", "bad"]
    for name in ("a", "b"):
        row = report[name]
        assert row["status"] == "done"
        assert 0 <= row["val/mIoU"] <= 100 and 0 <= row["train/mIoU"] <= 100 and row["train/count"] == 8
        assert [s for s, _ in row["val_curve"]] == [2, 3]
    assert report["b"]["overrides"]["model.embed_dim"] == 16
    assert yaml.safe_load((out / "b" / "params.yaml").read_text())["model"]["embed_dim"] == 16
    # the two trained variants alone would make a sweep that succeeds
    assert sweep.exit_status({name: report[name] for name in ("a", "b")}) == 0
    assert table[-3].startswith("| a |") and table[-2].startswith("| b |") and "| done |" in table[-2]


def test_a_failing_variant_is_reported_and_the_exit_status_says_so(ran):
    out, rc, table = ran
    assert rc == 1
    assert json.loads((out / "sweep.json").read_text())["bad"]["status"] == "failed (exit 2)"
    assert "burn_in.steps" in (out / "bad" / "log.txt").read_text()
    assert table[-1].startswith("| bad |") and table[-1].endswith("| failed (exit 2) |")
