import json
import os
import pickle
import shutil

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from semires.errors import SemiresError
from semires.refer import ann_to_rle, check_dataset, load_refs_pickle, read_refer


def _refer_getmask(ann, h, w):
    """The REFER API's getMask, as published (polygons: frPyObjects, decode, sum), with COCO's
    annToRLE for crowd RLE: the reference our masks must equal pixel for pixel."""
    seg = ann["segmentation"]
    if isinstance(seg, list) or isinstance(seg["counts"], list):
        rle = mask_utils.frPyObjects(seg, h, w)
    else:
        rle = {"size": seg["size"], "counts": seg["counts"].encode()}
    m = mask_utils.decode(rle)
    if m.ndim == 3:
        m = np.sum(m, axis=2)
    return m.astype(np.uint8) > 0


def test_masks_equal_refer_getmask_pixel_for_pixel(synth_root, synth_anns):
    inst = json.loads((synth_root / "synthref" / "instances.json").read_text())
    anns = {a["id"]: a for a in inst["annotations"]}
    kinds = set()
    for r in synth_anns.refs:
        a = anns[r.ann_id]
        kinds.add("crowd" if a["iscrowd"] else type(a["segmentation"]).__name__)
        np.testing.assert_array_equal(r.decode_mask(), _refer_getmask(a, r.height, r.width))
        assert r.decode_mask().shape == (r.height, r.width)
    assert kinds == {"list", "dict", "crowd"}


def test_records_carry_ref_fields(synth_anns):
    r = synth_anns.refs[0]
    assert r.file_name.endswith(".jpg") and r.split in {"train", "val", "testA", "testB"}
    assert len(r.bbox) == 4 and r.sentences and len(r.sentences) == len(r.sent_ids)
    counts = synth_anns.counts_by_split()
    assert sum(c.refs for c in counts.values()) == len(synth_anns.refs)


def test_overlapping_polygons_union_like_getmask():
    # two overlapping squares in one annotation: getMask sums them; the mask is their union
    polys = [[1, 1, 5, 1, 5, 5, 1, 5], [3, 3, 7, 3, 7, 7, 3, 7]]
    rle = ann_to_rle(polys, 8, 8, where="test")
    ours = mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode()}).astype(bool)
    ref = _refer_getmask({"segmentation": polys}, 8, 8)
    np.testing.assert_array_equal(ours, ref)


@pytest.mark.parametrize(
    ("seg", "needle"),
    [
        ([], "empty polygon list"),
        ([[1, 2, 3]], "malformed polygon"),
        ([[1, 1, 5, 1, float("nan"), 5]], "malformed polygon"),
        ({"size": [4, 4], "counts": [3, 2]}, "do not add up"),
        ({"size": [5, 4], "counts": [20]}, "does not match"),
        ({"size": [4, 4], "counts": 7}, "list or a string"),
        ("oops", "neither polygons nor an RLE"),
        ([[50, 50, 60, 50, 60, 60]], "covers no pixel"),
    ],
)
def test_malformed_segmentation_is_named(seg, needle):
    with pytest.raises(SemiresError, match=needle) as e:
        ann_to_rle(seg, 4, 4, where="instances.json annotation 17")
    assert "annotation 17" in str(e.value)


def test_unknown_dataset_or_split_by():
    with pytest.raises(SemiresError, match="unknown dataset 'refcocoz'"):
        check_dataset("refcocoz", "unc")
    with pytest.raises(SemiresError, match="refcocog has no 'unc' split; use one of umd, google"):
        check_dataset("refcocog", "unc")


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch /tmp/semires-pwned",))


def test_pickle_that_imports_code_is_refused_not_run(tmp_path):
    path = tmp_path / "refs(unc).p"
    path.write_bytes(pickle.dumps([{"ref_id": 1, "x": _Evil()}]))
    if os.path.exists("/tmp/semires-pwned"):
        os.remove("/tmp/semires-pwned")
    with pytest.raises(SemiresError, match=r"refused .* asks to import (posix|os)\.system"):
        load_refs_pickle(path)
    assert not os.path.exists("/tmp/semires-pwned")


@pytest.mark.parametrize(
    ("payload", "needle"),
    [
        (pickle.dumps({"not": "a list"}), "not a REFER refs pickle"),
        (pickle.dumps([{"ref_id": 1}]), "entry 0 is not a REFER ref"),
        (
            pickle.dumps(
                [
                    {
                        "ref_id": 1,
                        "ann_id": 1,
                        "image_id": 1,
                        "split": "train",
                        "category_id": 1,
                        "sentences": ["raw string"],
                    }
                ]
            ),
            "malformed sentences",
        ),
        (b"\x80\x02]q\x00(", "not a readable pickle"),
        (b"hello", "not a readable pickle"),
    ],
)
def test_not_a_refer_pickle(tmp_path, payload, needle):
    path = tmp_path / "refs(unc).p"
    path.write_bytes(payload)
    with pytest.raises(SemiresError, match=needle):
        load_refs_pickle(path)


def test_missing_files_are_named(tmp_path, synth_root):
    with pytest.raises(SemiresError, match=r"refs\(unc\)\.p: refs pickle not found"):
        read_refer(tmp_path, "synthref", "unc")
    shutil.copytree(synth_root / "synthref", tmp_path / "synthref")
    (tmp_path / "synthref" / "instances.json").unlink()
    with pytest.raises(SemiresError, match="instances.json: instances file not found"):
        read_refer(tmp_path, "synthref", "unc")


def test_refs_and_instances_from_different_releases(tmp_path, synth_root):
    shutil.copytree(synth_root / "synthref", tmp_path / "synthref")
    inst_path = tmp_path / "synthref" / "instances.json"
    inst = json.loads(inst_path.read_text())
    inst["annotations"] = inst["annotations"][1:]
    inst_path.write_text(json.dumps(inst))
    with pytest.raises(SemiresError, match="different releases"):
        read_refer(tmp_path, "synthref", "unc")


def test_python2_style_pickle_reads(tmp_path):
    # protocol 2 as the published REFER pickles, with the fields RefCOCO's refs carry
    refs = [
        {
            "sent_ids": [0],
            "file_name": "COCO_train2014_000000000009_1.jpg",
            "ann_id": 1,
            "ref_id": 0,
            "image_id": 9,
            "split": "train",
            "category_id": 1,
            "sentences": [{"tokens": ["the", "man"], "raw": "The man", "sent_id": 0, "sent": "the man"}],
        }
    ]
    path = tmp_path / "refs(unc).p"
    path.write_bytes(pickle.dumps(refs, protocol=2))
    assert load_refs_pickle(path) == refs
