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
    from stages.burn_in import BurnInParams, ModelParams
    from stages.evaluate import EvaluateParams
    from stages.propose import ProposalsParams
    from stages.report import ReportParams
    from stages.train_semi import SemiParams

    for name, cls in (
        ("synth", SynthParams), ("dataset", DatasetParams), ("split", SplitParams),
        ("proposals", ProposalsParams), ("model", ModelParams), ("burn_in", BurnInParams),
        ("semi", SemiParams), ("evaluate", EvaluateParams), ("report", ReportParams),
    ):  # fmt: skip
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


def _raw(tmp_path, text: str):
    path = tmp_path / "params.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "other: {}\n",
            "{path}: no `burn_in` section; this stage reads it: add `burn_in:` with its keys (the shipped "
            "params.yaml lists them), or `burn_in: {{}}` for the built-in defaults",
        ),
        (
            "burnin: {steps: 10}\n",
            "{path}: no `burn_in` section (is `burnin` a misspelling of it?); this stage reads it: add "
            "`burn_in:` with its keys (the shipped params.yaml lists them), or `burn_in: {{}}` for the "
            "built-in defaults",
        ),
        (
            "burn_in:\n",
            "{path}: the `burn_in` section is empty (null); this stage reads it: give it its keys (the "
            "shipped params.yaml lists them), or write `burn_in: {{}}` for the built-in defaults",
        ),
        (
            "burn_in: {steps: 10, lr: 0.1}\nsplit: {}\nburn_in: {steps: 20}\n",
            "{path}: line 3: key burn_in is written twice (also on line 1); YAML would silently keep the "
            "last one: keep one",
        ),
        (
            "burn_in:\n  steps: 10\n  lr: 0.1\n  steps: 20\n",
            "{path}: line 4: key burn_in.steps is written twice (also on line 2); YAML would silently keep "
            "the last one: keep one",
        ),
        (
            "burn_in: {steps: 1000000000000000000000000000000}\n",
            "params.yaml: burn_in.steps = 1000000000000000000000000000000: expected 1..100,000,000 steps",
        ),
        (
            "burn_in: {log_every: 1000000000000000000000000000000}\n",
            "params.yaml: burn_in.log_every = 1000000000000000000000000000000: expected an integer in "
            "[-2**63, 2**63 - 1]",
        ),
        (
            "burn_in: {class_weights: [.inf, 1]}\n",
            "params.yaml: burn_in.class_weights[0] = inf: expected a finite number (not .nan or .inf)",
        ),
        (
            "burn_in: {lr: .nan}\n",
            "params.yaml: burn_in.lr = nan: expected a finite number (not .nan or .inf)",
        ),
        ("burn_in: {seed: -1}\n", "params.yaml: burn_in.seed = -1: expected a seed in [0, 2**32)"),
        ("burn_in: {batch_size: 100000}\n", "params.yaml: burn_in.batch_size = 100000: expected 1..4096"),
    ],
)
def test_sections_are_never_silently_replaced_by_defaults(tmp_path, text, message):
    from stages.burn_in import BurnInParams

    path = _raw(tmp_path, text)
    with pytest.raises(SemiresError) as e:
        section(path, "burn_in", BurnInParams)
    assert str(e.value) == message.format(path=path)


def test_an_empty_mapping_asks_for_the_defaults(tmp_path):
    assert section(_raw(tmp_path, "split: {}\n"), "split", SplitParams) == SplitParams()


def test_a_duplicate_key_inside_a_list_or_under_an_alias_is_named(tmp_path):
    path = _raw(tmp_path, "base: &b {seed: 1}\nsplit:\n  files: {5: a.json}\n  fractions: [5]\n  files: {}\n")
    with pytest.raises(SemiresError, match=r"line 5: key split\.files is written twice \(also on line 3\)"):
        section(path, "split", SplitParams)
    merged = _raw(tmp_path, "base: &b {seed: 1}\nsplit:\n  <<: *b\n  fractions: [5]\n")  # a merge is fine
    assert section(merged, "split", SplitParams).seed == 1


@pytest.mark.parametrize(
    ("files", "key", "expected"),
    [
        ("{5: *x9}", "split.files.5", "expected a non-empty string"),
        ("*x9", "split.files", "expected a mapping"),
    ],
)
def test_billion_laughs_is_a_short_message_with_an_excerpt(tmp_path, files, key, expected):
    """Nine levels of nine aliases stand for 9**9 strings: YAML shares them, a message must too."""
    lines = ["x0: &x0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    lines += [f"x{i}: &x{i} [{', '.join([f'*x{i - 1}'] * 9)}]" for i in range(1, 10)]
    path = _raw(tmp_path, "\n".join([*lines, "split:", "  fractions: [5]", f"  files: {files}", ""]))
    with pytest.raises(SemiresError) as e:
        section(path, "split", SplitParams)
    message = str(e.value)
    assert message.startswith(f"params.yaml: {key} = [[[...], [...], [...], [...], ...], ")
    assert message.endswith(f"...: {expected}") and len(message) < 200, message


def test_unreadable_params_file(tmp_path):
    with pytest.raises(SemiresError, match="params file not found"):
        section(tmp_path / "nope.yaml", "split", SplitParams)
    bad = tmp_path / "bad.yaml"
    bad.write_text("split: [unclosed\n")
    with pytest.raises(SemiresError, match="not valid YAML"):
        section(bad, "split", SplitParams)
