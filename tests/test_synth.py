import json
import pickle

import numpy as np
from PIL import Image

from semires.synth import COLOURS, SynthOptions, _candidates, _make_objects, write_dataset

from .conftest import SMALL_SYNTH


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_other_seed_other_data(tmp_path, synth_root):
    write_dataset(tmp_path / "a", SMALL_SYNTH)
    assert _files(tmp_path / "a") == _files(synth_root)
    write_dataset(tmp_path / "b", SynthOptions(num_images=40, image_size=(64, 96), seed=4))
    assert _files(tmp_path / "b") != _files(synth_root)


def test_refer_layout_and_every_kind_of_segmentation(synth_root):
    inst = json.loads((synth_root / "synthref" / "instances.json").read_text())
    refs = pickle.loads((synth_root / "synthref" / "refs(unc).p").read_bytes())
    assert len(inst["images"]) == 40
    for im in inst["images"]:
        with Image.open(synth_root / "images" / "synthref" / im["file_name"]) as img:
            assert img.size == (im["width"], im["height"])
            assert 64 <= im["width"] <= 96 and 64 <= im["height"] <= 96
    segs = [a["segmentation"] for a in inst["annotations"]]
    assert any(isinstance(s, list) for s in segs), "some polygons"
    assert any(isinstance(s, dict) and isinstance(s["counts"], str) for s in segs), "some compressed RLE"
    crowd = [a for a in inst["annotations"] if a["iscrowd"]]
    assert crowd and all(isinstance(a["segmentation"]["counts"], list) for a in crowd)
    assert {r["split"] for r in refs} == {"train", "val", "testA", "testB"}
    for r in refs:
        assert 1 <= len(r["sentences"]) <= 3
        assert r["sent_ids"] == [s["sent_id"] for s in r["sentences"]]
    # refs of one image share its split; several refs per image on average
    by_image = {}
    for r in refs:
        by_image.setdefault(r["image_id"], set()).add(r["split"])
    assert all(len(s) == 1 for s in by_image.values())
    assert len(refs) / len(by_image) > 2


def test_every_expression_names_exactly_one_object():
    rng = np.random.default_rng(0)
    checked = 0
    for _ in range(30):
        objs = _make_objects(rng, 96, 96, SynthOptions())
        for text, pred, _w in _candidates(objs, 96, 96):
            hits = [o for o in objs if pred(o)]
            if len(hits) == 1:
                checked += 1
                o = hits[0]
                # an expression that names a colour or a shape names the right one
                words = set(text.split())
                assert not (words & set(COLOURS)) or o.colour in words or "dots" in words or "shape" in words
    assert checked > 100


def test_expressions_need_the_sentence(synth_anns):
    """Most images hold objects that share a shape or a colour, so one word does not name them."""
    ambiguous = 0
    images = synth_anns.refs_by_image()
    for refs in images.values():
        cats = [r.category_id for r in refs]
        ambiguous += len(set(cats)) < len(cats)
    assert ambiguous / len(images) > 0.2
    sentences = [s for r in synth_anns.refs for s in r.sentences]
    spatial = [
        s for s in sentences if any(w in s for w in ("left", "right", "top", "bottom", "above", "below"))
    ]
    assert len(spatial) / len(sentences) > 0.1
