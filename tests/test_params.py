import pytest
import yaml

from semires.errors import SemiresError
from stages.params import DatasetParams, section
from stages.split import SplitParams
from stages.synth import SynthParams

from .conftest import REPO


def _write(tmp_path, data):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_shipped_params_are_valid():
    for name, cls in (("synth", SynthParams), ("dataset", DatasetParams), ("split", SplitParams)):
        section(REPO / "params.yaml", name, cls)


@pytest.mark.parametrize(
    ("sect", "cls", "value", "needle"),
    [
        (
            "split",
            SplitParams,
            {"fractions": [1, 150]},
            r"split\.fractions\[1\] = 150\.0: expected a percentage",
        ),
        ("split", SplitParams, {"fractions": [0]}, r"split\.fractions\[0\] = 0\.0"),
        ("split", SplitParams, {"fractions": "5"}, r"split\.fractions = '5': expected a list"),
        ("split", SplitParams, {"fractions": [5, 5]}, "each percentage once"),
        ("split", SplitParams, {"seed": 1.5}, r"split\.seed = 1\.5: expected an integer"),
        ("split", SplitParams, {"seed": True}, r"split\.seed = True: expected an integer"),
        ("split", SplitParams, {"fractions": [1], "files": {2: "x.json"}}, r"split\.files\.2"),
        ("split", SplitParams, {"fraction": [1]}, r"unknown key split\.fraction; known keys of split"),
        ("split", SplitParams, [1, 2], "split = \\[1, 2\\]: expected a mapping"),
        ("dataset", DatasetParams, {"name": "coco"}, r"dataset\.name = 'coco': expected one of refcoco"),
        (
            "dataset",
            DatasetParams,
            {"name": "refcoco+", "split_by": "google"},
            r"dataset\.split_by = 'google': refcoco\+ is published with unc",
        ),
        ("synth", SynthParams, {"image_size": [128, 64]}, r"synth\.image_size = \[128, 64\]"),
        ("synth", SynthParams, {"image_size": [64]}, r"synth\.image_size = \[64\]: expected a list of 2"),
        (
            "synth",
            SynthParams,
            {"crowd_share": 2},
            r"synth\.crowd_share = 2\.0: expected a share in \[0, 1\]",
        ),
        ("synth", SynthParams, {"num_images": "many"}, r"synth\.num_images = 'many': expected an integer"),
    ],
)
def test_bad_values_name_the_key(tmp_path, sect, cls, value, needle):
    path = _write(tmp_path, {sect: value})
    with pytest.raises(SemiresError, match=needle):
        section(path, sect, cls)


def test_missing_section_takes_defaults(tmp_path):
    assert section(_write(tmp_path, {"other": {}}), "split", SplitParams) == SplitParams()


def test_unreadable_params_file(tmp_path):
    with pytest.raises(SemiresError, match="params file not found"):
        section(tmp_path / "nope.yaml", "split", SplitParams)
    bad = tmp_path / "bad.yaml"
    bad.write_text("split: [unclosed\n")
    with pytest.raises(SemiresError, match="not valid YAML"):
        section(bad, "split", SplitParams)
