import io
import json
import os
import pickle
import shutil
import struct
from pathlib import Path

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


class _Python2Pickler(pickle._Pickler):
    """Writes ``bytes`` as Python 2 wrote its ``str``: SHORT_BINSTRING / BINSTRING opcodes."""

    dispatch = pickle._Pickler.dispatch.copy()

    def _save_py2_str(self, obj: bytes) -> None:
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = _save_py2_str


def python2_pickle(obj) -> bytes:
    """``obj`` pickled as by Python 2 (protocol 2): its ``bytes`` are Python 2 strings."""
    out = io.BytesIO()
    _Python2Pickler(out, protocol=2).dump(obj)
    return out.getvalue()


def _py2_ref(ref_id: int, raw: bytes) -> dict:
    return {
        b"ref_id": ref_id, b"ann_id": 1, b"image_id": 9, b"split": b"train", b"category_id": 1,
        b"file_name": b"COCO_train2014_000000000009_1.jpg", b"sent_ids": [0],
        b"sentences": [{b"raw": raw, b"sent": raw.lower(), b"sent_id": 0, b"tokens": raw.lower().split()}],
    }  # fmt: skip


def test_python2_pickle_with_one_latin1_sentence_decodes_each_string_on_its_own(tmp_path):
    path = tmp_path / "refs(unc).p"
    refs = [
        _py2_ref(0, "the naïve man".encode()),  # UTF-8, as most
        _py2_ref(1, "the café sign".encode("latin-1")),  # one Latin-1 sentence
        _py2_ref(2, b"plain ascii"),
    ]
    path.write_bytes(python2_pickle(refs))
    got = load_refs_pickle(path)
    assert [r["sentences"][0]["raw"] for r in got] == ["the naïve man", "the café sign", "plain ascii"]
    assert got[1]["sentences"][0]["tokens"] == ["the", "café", "sign"]
    assert got[0]["split"] == "train" and got[0]["file_name"].endswith(".jpg") and got[2]["ref_id"] == 2


def test_a_string_that_is_no_text_names_its_ref(tmp_path):
    path = tmp_path / "refs(unc).p"
    path.write_bytes(python2_pickle([_py2_ref(0, b"fine"), _py2_ref(7, b"\x89PNG\r\n\x1a\n\x00\x00")]))
    with pytest.raises(SemiresError) as e:
        load_refs_pickle(path)
    assert str(e.value) == (
        f"{path}: ref 7 holds a string that is neither UTF-8 nor Latin-1 text "
        "(b'\\x89PNG\\r\\n\\x1a\\n\\x00\\x00'); fix that string or replace the file with the "
        "original refs file"
    )


def _spoiled_instances(tmp_path, synth_root, spoil) -> Path:
    shutil.copytree(synth_root / "synthref", tmp_path / "synthref")
    path = tmp_path / "synthref" / "instances.json"
    inst = json.loads(path.read_text())
    spoil(inst)
    path.write_text(json.dumps(inst))
    return path


def _first_ref(synth_root) -> tuple[int, int]:
    """(image id, annotation id) of the first ref of the synthetic set."""
    refs = load_refs_pickle(synth_root / "synthref" / "refs(unc).p")
    return int(refs[0]["image_id"]), int(refs[0]["ann_id"])


def _image(inst, image_id):
    return next(im for im in inst["images"] if im["id"] == image_id)


def _ann(inst, ann_id):
    return next(a for a in inst["annotations"] if a["id"] == ann_id)


@pytest.mark.parametrize(
    ("case", "message"),
    [
        (
            "duplicate image id",
            "{inst}: images id {image} appears twice; ids must be unique (a later entry would replace the "
            "first): replace it with the original instances.json",
        ),
        (
            "duplicate annotation id",
            "{inst}: annotations id {ann} appears twice; ids must be unique (a later entry would replace "
            "the first): replace it with the original instances.json",
        ),
        (
            "file_name with ..",
            "{inst} image {image}: file_name '../../secret.jpg' points outside dataset.image_dir (an "
            "absolute path or '..'); file names must be relative to the image folder: fix this image entry",
        ),
        (
            "absolute file_name",
            "{inst} image {image}: file_name '/etc/passwd' points outside dataset.image_dir (an absolute "
            "path or '..'); file names must be relative to the image folder: fix this image entry",
        ),
        (
            "NaN bbox",
            "instances.json annotation {ann}: bbox [1.0, nan, 3.0, 4.0] is not [x, y, width, height] of "
            "finite, non-negative numbers; fix or drop this annotation",
        ),
        (
            "negative bbox",
            "instances.json annotation {ann}: bbox [1.0, 2.0, -3.0, 4.0] is not [x, y, width, height] of "
            "finite, non-negative numbers; fix or drop this annotation",
        ),
    ],
)
def test_ids_boxes_and_file_names_that_would_pass_silently_are_named(tmp_path, synth_root, case, message):
    image, ann = _first_ref(synth_root)

    def spoil(inst):
        if case == "duplicate image id":
            other = next(im for im in inst["images"] if im["id"] != image)
            inst["images"].append({**other, "id": image})
        elif case == "duplicate annotation id":
            inst["annotations"].append({**_ann(inst, ann)})
        elif case == "file_name with ..":
            _image(inst, image)["file_name"] = "../../secret.jpg"
        elif case == "absolute file_name":
            _image(inst, image)["file_name"] = "/etc/passwd"
        elif case == "NaN bbox":
            _ann(inst, ann)["bbox"] = [1.0, float("nan"), 3.0, 4.0]
        else:
            _ann(inst, ann)["bbox"] = [1.0, 2.0, -3.0, 4.0]

    inst = _spoiled_instances(tmp_path, synth_root, spoil)
    with pytest.raises(SemiresError) as e:
        read_refer(tmp_path, "synthref", "unc")
    assert str(e.value) == message.format(inst=inst, image=image, ann=ann)


def test_a_ref_id_written_twice_is_named(tmp_path, synth_root):
    shutil.copytree(synth_root / "synthref", tmp_path / "synthref")
    path = tmp_path / "synthref" / "refs(unc).p"
    refs = load_refs_pickle(path)
    path.write_bytes(pickle.dumps([*refs, refs[0]]))
    with pytest.raises(SemiresError) as e:
        read_refer(tmp_path, "synthref", "unc")
    assert str(e.value) == (
        f"{path}: ref id {refs[0]['ref_id']} appears twice; replace it with the original refs file"
    )
