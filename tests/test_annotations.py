import json

import numpy as np
import pytest

from semires import annotations
from semires.annotations import decode_rle, encode_mask
from semires.errors import SemiresError


def test_round_trip_keeps_every_field(tmp_path, synth_anns):
    path = tmp_path / "anns.json"
    annotations.save(path, synth_anns)
    back = annotations.load(path)
    assert back == synth_anns
    for a, b in zip(synth_anns.refs[:20], back.refs[:20], strict=True):
        np.testing.assert_array_equal(a.decode_mask(), b.decode_mask())


def test_rle_round_trip():
    rng = np.random.default_rng(0)
    m = rng.random((13, 7)) > 0.5
    np.testing.assert_array_equal(decode_rle(encode_mask(m)), m)


def test_images_and_counts(synth_anns):
    train = synth_anns.images("train")
    assert set(train) == set(synth_anns.image_ids("train"))
    name, h, w = next(iter(train.values()))
    assert name.endswith(".jpg") and h > 0 and w > 0
    c = synth_anns.counts(synth_anns.in_split("train"))
    assert c.images == len(train) and c.sentences >= c.refs


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("{not json", "not valid JSON"),
        ('{"refs": []}', "not a semires annotation file"),
        ('{"format": "semires-annotations", "version": 99, "refs": []}', "format version 99"),
        (
            '{"format": "semires-annotations", "version": 1, "dataset": "x", "split_by": "y", "refs": [{}]}',
            "malformed ref record",
        ),
    ],
)
def test_bad_annotation_files(tmp_path, text, needle):
    path = tmp_path / "anns.json"
    path.write_text(text)
    with pytest.raises(SemiresError, match=needle):
        annotations.load(path)


def test_missing_annotation_file(tmp_path):
    with pytest.raises(SemiresError, match="run `semires extract`"):
        annotations.load(tmp_path / "nope.json")


def test_file_is_one_ref_per_line(tmp_path, synth_anns):
    path = tmp_path / "anns.json"
    annotations.save(path, synth_anns)
    lines = path.read_text().splitlines()
    assert len(lines) == len(synth_anns.refs) + 2
    assert json.loads(path.read_text())["dataset"] == "synthref"


def test_image_list_round_trip_and_bad_files(tmp_path, synth_anns):
    path = tmp_path / "train_images.json"
    annotations.save_images(path, synth_anns, "train")
    dataset, images = annotations.load_images(path)
    assert dataset == "synthref" and images == synth_anns.images("train")
    assert list(images) == sorted(images)
    path.write_text('{"format": "semires-annotations"}')
    with pytest.raises(SemiresError, match="not a semires image list"):
        annotations.load_images(path)
    with pytest.raises(SemiresError, match="image list not found"):
        annotations.load_images(tmp_path / "nope.json")
