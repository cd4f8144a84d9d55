"""`semires predict` through typer's runner, and README's Python example run as written."""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from semires.model.build import prepare, preset
from semires.overlay import DIM, draw_overlay, tint_for
from semires.train import save_checkpoint
from stages.cli import app

from .conftest import REPO

runner = CliRunner()


@pytest.fixture(scope="module")
def setup(tmp_path_factory, synth_root, synth_anns):
    """A tiny teacher-student checkpoint and a folder of the synthetic val images."""
    root = tmp_path_factory.mktemp("predict")
    corpus = [s for r in synth_anns.refs for s in r.sentences]
    torch.manual_seed(0)
    spec, student = prepare(preset("tiny"), corpus=corpus)
    teacher = prepare(preset("tiny"), corpus=corpus)[1]
    save_checkpoint(root / "model.pt", spec=spec, model=student, step=3, teacher=teacher)
    refs = synth_anns.in_split("val")[:2]
    images = root / "images"
    images.mkdir()
    for r in refs:
        (images / r.file_name).write_bytes((synth_root / "images" / "synthref" / r.file_name).read_bytes())
    return root, refs


def run(*args) -> tuple[int, str]:
    res = runner.invoke(app, ["predict", *map(str, args)])
    return res.exit_code, res.output


def image_size(path) -> tuple[int, int]:
    with Image.open(path) as im:
        return im.height, im.width


def test_image_text_pairs(setup, tmp_path):
    root, refs = setup
    a, b = (root / "images" / r.file_name for r in refs)
    long = " ".join(["the red circle left of the square"] * 5)
    code, out = run(
        "--model", root / "model.pt", "--out", tmp_path / "out",
        "--image", a, "--text", refs[0].sentences[0], "--image", b, "--text", long,
    )  # fmt: skip
    assert code == 0, out
    rows = [json.loads(line) for line in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    assert [r["request"] for r in rows] == [
        {"image": str(a), "text": refs[0].sentences[0]},
        {"image": str(b), "text": long},
    ]
    assert [r["truncated"] for r in rows] == [False, True]
    for row, image in zip(rows, (a, b), strict=True):
        stem = row["mask"].removesuffix(".mask.png")
        assert re.fullmatch(r"000[12]-SYNTH_val_\d+", stem) and row["overlay"] == f"{stem}.overlay.png"
        with Image.open(tmp_path / "out" / row["mask"]) as m:
            mask = np.asarray(m)
        assert m.mode == "L" and mask.shape == image_size(image) == (row["height"], row["width"])
        assert set(np.unique(mask)) <= {0, 255} and row["area"] == int((mask == 255).sum())
        if row["area"]:
            x, y, w, h = row["bbox"]
            ys, xs = np.nonzero(mask)
            assert (x, y, w, h) == (xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1)
            assert 0.5 < row["mean_probability"] <= 1
        assert row["seconds"] > 0
        umask = os.umask(0)
        os.umask(umask)
        for name in (row["mask"], row["overlay"]):  # as readable as any new file, not private
            assert (tmp_path / "out" / name).stat().st_mode & 0o777 == 0o666 & ~umask
        ov_h, ov_w = image_size(tmp_path / "out" / row["overlay"])
        assert ov_w >= 320 and ov_h > ov_w * row["height"] / row["width"]  # enlarged, with a caption below
    assert "2 request(s) in" in out


def test_batch_file_with_paths_relative_to_it(setup, tmp_path):
    root, refs = setup
    lines = [
        {"image": f"images/{r.file_name}", "text": s, "id": k}
        for k, r in enumerate(refs)
        for s in r.sentences
    ]
    (root / "requests.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    code, out = run(
        "--model", root / "model.pt", "--batch", root / "requests.jsonl", "--out", tmp_path / "out",
        "--weights", "student", "--batch-size", "2",
    )  # fmt: skip
    assert code == 0, out
    rows = [json.loads(x) for x in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    assert [r["request"] for r in rows] == lines  # extra keys are echoed
    assert len(list((tmp_path / "out").glob("*.png"))) == 2 * len(lines)
    assert "student" in out


@pytest.mark.parametrize(
    ("content", "says"),
    [
        ('{"image": "images/a.jpg", "text": "x"}\n{"image": "a.jpg", "text": \n', "line 2: not valid JSON"),
        ('["a.jpg", "x"]\n', "line 1: a JSON list, not an object"),
        ('{"image": "a.jpg"}\n', 'line 1: "text" is missing; expected a non-empty string'),
        ('{"image": "a.jpg", "text": "   "}\n', "line 1: \"text\" is '   '"),
        ("\n\n", "no requests in the batch file"),
    ],
    ids=["json", "list", "no text", "empty text", "empty file"],
)
def test_a_malformed_batch_line_is_named_before_any_work(setup, tmp_path, content, says):
    root, _ = setup
    (tmp_path / "requests.jsonl").write_text(content)
    code, out = run(
        "--model", root / "model.pt", "--batch", tmp_path / "requests.jsonl", "--out", tmp_path / "out"
    )
    assert code == 2 and f"semires predict: error: {tmp_path / 'requests.jsonl'}" in out and says in out, out
    assert not (tmp_path / "out").exists()


def test_a_missing_image_is_found_before_any_work(setup, tmp_path):
    root, refs = setup
    lines = [
        {"image": str(root / "images" / refs[0].file_name), "text": "a"},
        {"image": "nope.jpg", "text": "b"},
    ]
    (tmp_path / "requests.jsonl").write_text("\n".join(map(json.dumps, lines)))
    code, out = run(
        "--model", root / "model.pt", "--batch", tmp_path / "requests.jsonl", "--out", tmp_path / "out"
    )
    assert (
        code == 2
        and f"requests.jsonl line 2: {tmp_path / 'nope.jpg'}: image not found; check the path" in out
    )
    assert not (tmp_path / "out").exists()


def test_requests_before_a_corrupt_image_keep_their_outputs(setup, tmp_path):
    root, refs = setup
    good = str(root / "images" / refs[0].file_name)
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    lines = [{"image": good, "text": "a"}, {"image": good, "text": "b"}, {"image": "broken.jpg", "text": "c"}]
    (tmp_path / "requests.jsonl").write_text("\n".join(map(json.dumps, lines)))
    code, out = run(
        "--model", root / "model.pt", "--batch", tmp_path / "requests.jsonl", "--out", tmp_path / "out"
    )
    assert code == 2, out
    assert "requests.jsonl line 3: " in out and "broken.jpg: not a readable image" in out, out
    assert "(2 earlier request(s) written to" in out
    rows = (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()
    assert len(rows) == 2 and len(list((tmp_path / "out").glob("*.png"))) == 4
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]  # no half-written file


@pytest.mark.parametrize(
    ("model", "args", "says"),
    [
        ("model.pt", ["--image", "{img}"], "1 --image but 0 --text; give one --text per --image"),
        ("model.pt", ["--image", "{img}", "--text", " "], "--text #1 is empty"),
        ("model.pt", [], "nothing to predict: give --image and --text"),
        ("model.pt", ["--image", "{img}", "--text", "a", "--batch", "r.jsonl"], "pairs or --batch, not both"),
        ("junk.pt", ["--image", "{img}", "--text", "a"], "junk.pt: not a readable checkpoint"),
        ("model.pt", ["--image", "{img}", "--text", "a", "--weights", "ema"], "weights 'ema': expected"),
        ("model.pt", ["--image", "{img}", "--text", "a", "--out", "{img}"], "a file, not a folder"),
    ],
    ids=["unpaired", "empty text", "nothing", "both", "not a model", "weights", "out is a file"],
)  # fmt: skip
def test_bad_command_lines_are_one_clear_line(setup, tmp_path, model, args, says):
    root, refs = setup
    (tmp_path / "junk.pt").write_text("weights? no")
    img = root / "images" / refs[0].file_name
    model = root / model if model == "model.pt" else tmp_path / model
    code, out = run("--model", model, "--out", tmp_path / "out", *(a.format(img=img) for a in args))
    assert code == 2 and "semires predict: error: " in out and says in out, out
    assert "Traceback" not in out


def readme_example() -> str:
    """The first python block of README's "Use the model" section."""
    text = (REPO / "README.md").read_text()
    section = text[text.index("\n## Use the model") :]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_example_runs_as_written(setup, tmp_path, monkeypatch):
    """The fenced block, run unchanged in a folder holding the files it names."""
    root, refs = setup
    code = readme_example()
    for path in re.findall(r'"([^"]+\.(?:pt|jpg|png))"', code):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        source = root / "model.pt" if path.endswith(".pt") else root / "images" / refs[0].file_name
        (tmp_path / path).write_bytes(source.read_bytes())
    monkeypatch.chdir(tmp_path)
    names: dict = {}
    exec(compile(code, "README.md", "exec"), names)
    h, w = image_size(root / "images" / refs[0].file_name)
    assert names["mask"].shape == (h, w) and names["mask"].dtype == bool
    assert [m.shape for m in names["masks"]] == [(h, w)] * 2


def test_overlay_tint_shows_on_any_object():
    red = np.zeros((40, 40, 3), np.uint8)
    red[..., 0] = 220
    mask = np.zeros((40, 40), bool)
    mask[10:30, 10:30] = True
    picture = np.asarray(draw_overlay(red, mask, "the red square"))
    assert picture.shape[1] == 320 and picture.shape[0] > 320  # enlarged 8x, caption strip below
    inside, outside = picture[160, 160], picture[20, 20]
    assert tint_for(np.array([220.0, 0, 0])) == (0, 255, 255)  # cyan on red
    assert inside[1] > 100 and inside[2] > 100  # the tint shows on the red square
    assert tuple(outside) == (round(220 * DIM), 0, 0)  # the rest dimmed
    assert tuple(picture[80, 120]) == (255, 255, 255)  # the outline
