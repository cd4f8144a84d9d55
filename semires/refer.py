"""Reading the REFER layout (RefCOCO, RefCOCO+, RefCOCOg, RefCLEF and the synthetic set).

The layout, as the REFER toolkit expects it::

    <refer_root>/<dataset>/instances.json     COCO-style images, annotations, categories
    <refer_root>/<dataset>/refs(<split_by>).p  a pickled list of ref dicts

The refs pickle is read with a restricted unpickler that builds plain containers, strings
and numbers only: a pickle that asks to import anything is refused, never executed. The
published pickles were written by Python 2, whose strings are bytes: each is decoded on its
own, as UTF-8 or, failing that, as Latin-1 (one sentence in another encoding does not cost
the file); a string that is neither (control bytes: not text) is an error naming its ref.
Masks are built exactly as the REFER API's ``getMask`` builds them (the union of the
annotation's polygons, or its RLE, crowd annotations included).

What the files say is checked where a mistake would otherwise pass silently: image and
annotation ids are unique, a referenced annotation's box is four finite numbers with a
non-negative corner and size, and an image's ``file_name`` stays inside the image folder.
"""

from __future__ import annotations

import io
import json
import math
import pickle
from collections.abc import Mapping
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from pycocotools import mask as mask_utils

from semires.annotations import Annotations, RefRecord
from semires.errors import SemiresError

# The split schemes each dataset is published with.
SPLITS_BY: dict[str, tuple[str, ...]] = {
    "refcoco": ("unc", "google"),
    "refcoco+": ("unc",),
    "refcocog": ("umd", "google"),
    "refclef": ("unc", "berkeley"),
    "synthref": ("unc",),
}

_REF_KEYS = ("ref_id", "ann_id", "image_id", "split", "sentences", "category_id")


def check_dataset(dataset: str, split_by: str) -> None:
    """Raise unless ``dataset`` is known and published with the ``split_by`` scheme."""
    if dataset not in SPLITS_BY:
        raise SemiresError(
            f"unknown dataset {dataset!r}; use one of {', '.join(SPLITS_BY)} (dataset.name in params.yaml)"
        )
    if split_by not in SPLITS_BY[dataset]:
        raise SemiresError(
            f"{dataset} has no {split_by!r} split; use one of {', '.join(SPLITS_BY[dataset])} "
            "(dataset.split_by in params.yaml)"
        )


def refer_paths(refer_root: str | Path, dataset: str, split_by: str) -> tuple[Path, Path]:
    """``(refs pickle, instances.json)`` of a dataset in the REFER layout."""
    folder = Path(refer_root) / dataset
    return folder / f"refs({split_by}).p", folder / "instances.json"


class _Refused(pickle.UnpicklingError):
    pass


class _PlainUnpickler(pickle.Unpickler):
    """Builds lists, dicts, tuples, strings and numbers; refuses every global lookup."""

    def find_class(self, module: str, name: str) -> Any:
        raise _Refused(f"it asks to import {module}.{name}")


def load_refs_pickle(path: str | Path) -> list[dict[str, Any]]:
    """Read a REFER refs pickle with the restricted unpickler and check its shape."""
    path = Path(path)
    if not path.is_file():
        raise SemiresError(
            f"{path}: refs pickle not found; put the REFER files under dataset.refer_root "
            "(see README, 'Real RefCOCO')"
        )
    data = path.read_bytes()
    try:
        # Python 2's strings come back as bytes, decoded one by one below
        refs = _PlainUnpickler(io.BytesIO(data), encoding="bytes").load()
    except _Refused as e:
        raise SemiresError(
            f"{path}: refused to read this pickle ({e}); a REFER refs file holds only "
            "lists, dicts, strings and numbers — replace it with the original refs file"
        ) from e
    except Exception as e:  # truncated or not a pickle at all
        raise SemiresError(
            f"{path}: not a readable pickle ({type(e).__name__}: {e}); replace it with the "
            "original REFER refs file"
        ) from e
    if not isinstance(refs, list) or not refs:
        raise SemiresError(
            f"{path}: not a REFER refs pickle (expected a non-empty list of ref dicts, got "
            f"{type(refs).__name__}); replace it with the original refs file"
        )
    refs = [_decoded(path, i, ref) for i, ref in enumerate(refs)]
    for i, ref in enumerate(refs):
        missing = [k for k in _REF_KEYS if not isinstance(ref, dict) or k not in ref]
        if missing:
            raise SemiresError(
                f"{path}: entry {i} is not a REFER ref (missing {', '.join(missing)}); "
                "replace it with the original refs file"
            )
        sents = ref["sentences"]
        if not isinstance(sents, list) or not all(
            isinstance(s, dict) and ("raw" in s or "sent" in s) for s in sents
        ):
            raise SemiresError(
                f"{path}: ref {ref['ref_id']} has malformed sentences (expected dicts with "
                "'raw'/'sent'); replace it with the original refs file"
            )
    return refs


# Text has no control characters but tab and newlines: bytes that decode to others are not
# a sentence in some encoding, but something else (binary data, a damaged file).
_CONTROL = {c for c in range(0x20) if c not in (0x09, 0x0A, 0x0D)} | {0x7F} | set(range(0x80, 0xA0))


def _text(raw: bytes) -> str | None:
    """A Python 2 string: UTF-8 if it is, else Latin-1 if that gives text, else None."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
        return None if any(ord(c) in _CONTROL for c in text) else text


def _decoded(path: Path, index: int, ref: Any) -> Any:
    """Entry ``index`` of a refs pickle with every byte string decoded by :func:`_text`."""

    def walk(value: Any) -> Any:
        if isinstance(value, bytes):
            text = _text(value)
            if text is None:
                raise _NotText(value)
            return text
        if isinstance(value, list):
            return [walk(v) for v in value]
        if isinstance(value, tuple):
            return tuple(walk(v) for v in value)
        if isinstance(value, dict):
            return {walk(k): walk(v) for k, v in value.items()}
        return value

    try:
        return walk(ref)
    except _NotText as e:
        name = f"entry {index}"
        if isinstance(ref, dict):
            ref_id = ref.get("ref_id", ref.get(b"ref_id"))
            if isinstance(ref_id, int):
                name = f"ref {ref_id}"
        raise SemiresError(
            f"{path}: {name} holds a string that is neither UTF-8 nor Latin-1 text ({e.args[0][:40]!r}); "
            "fix that string or replace the file with the original refs file"
        ) from None


class _NotText(Exception):
    pass


def load_instances(path: str | Path) -> dict[str, Any]:
    """Read a COCO-style ``instances.json`` and check the parts REFER uses."""
    path = Path(path)
    if not path.is_file():
        raise SemiresError(
            f"{path}: instances file not found; put the REFER files under dataset.refer_root "
            "(see README, 'Real RefCOCO')"
        )
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SemiresError(
            f"{path}: not valid JSON ({e}); replace it with the original instances.json"
        ) from e
    for key in ("images", "annotations"):
        if not isinstance(obj, dict) or not isinstance(obj.get(key), list):
            raise SemiresError(
                f"{path}: not a COCO instances file (no {key!r} list); replace it with the "
                "original instances.json"
            )
    return obj


def ann_to_rle(segmentation: Any, height: int, width: int, *, where: str) -> dict[str, Any]:
    """One compressed RLE for an annotation's segmentation, as REFER's ``getMask`` unions it.

    ``segmentation`` is a list of polygons (flat ``[x0, y0, x1, y1, ...]`` lists), an
    uncompressed RLE (``counts`` a list, as COCO stores crowd regions) or a compressed one.
    """
    if isinstance(segmentation, list):
        polys = segmentation
        if not polys:
            raise SemiresError(f"{where}: empty polygon list; fix or drop this annotation")
        for poly in polys:
            if (
                not isinstance(poly, list)
                or len(poly) < 6
                or len(poly) % 2
                or not all(isinstance(v, int | float) and math.isfinite(v) for v in poly)
            ):
                raise SemiresError(
                    f"{where}: malformed polygon (need an even number >= 6 of finite "
                    "coordinates); fix or drop this annotation"
                )
        rles = mask_utils.frPyObjects(polys, height, width)
    elif isinstance(segmentation, dict) and "counts" in segmentation and "size" in segmentation:
        size = list(segmentation["size"])
        if size != [height, width]:
            raise SemiresError(
                f"{where}: RLE size {size} does not match the image's {[height, width]}; fix this annotation"
            )
        counts = segmentation["counts"]
        if isinstance(counts, list):
            if sum(counts) != height * width or any((not isinstance(c, int)) or c < 0 for c in counts):
                raise SemiresError(
                    f"{where}: uncompressed RLE counts do not add up to {height}x{width} "
                    "pixels; fix this annotation"
                )
            rles = [mask_utils.frPyObjects(segmentation, height, width)]
        elif isinstance(counts, str | bytes):
            rles = [{"size": size, "counts": counts.encode() if isinstance(counts, str) else counts}]
        else:
            raise SemiresError(f"{where}: RLE counts must be a list or a string; fix this annotation")
    else:
        raise SemiresError(f"{where}: segmentation is neither polygons nor an RLE; fix this annotation")
    try:
        merged = mask_utils.merge(rles, intersect=False) if len(rles) > 1 else rles[0]
        area = int(mask_utils.area(merged))
    except Exception as e:  # pycocotools raises on corrupt compressed counts
        raise SemiresError(f"{where}: corrupt RLE ({e}); fix this annotation") from e
    if area == 0:
        raise SemiresError(f"{where}: the segmentation covers no pixel; fix or drop this annotation")
    counts = merged["counts"]
    return {"size": [height, width], "counts": counts.decode() if isinstance(counts, bytes) else counts}


def _sentence_text(sent: Mapping[str, Any]) -> str:
    return str(sent.get("raw", sent.get("sent", ""))).strip()


def _unique_ids(entries: list[Any], what: str, path: Path) -> dict[int, Any]:
    """``{id: entry}``, or an error naming an id that two entries share (a later one would
    silently replace the earlier: refs would point at another image or object)."""
    out: dict[int, Any] = {}
    for entry in entries:
        try:
            key = int(entry["id"])
        except (KeyError, TypeError, ValueError):
            raise SemiresError(
                f"{path}: an entry of {what!r} has no integer id ({str(entry)[:80]}); "
                "replace it with the original instances.json"
            ) from None
        if key in out:
            raise SemiresError(
                f"{path}: {what} id {key} appears twice; ids must be unique (a later entry would replace "
                "the first): replace it with the original instances.json"
            )
        out[key] = entry
    return out


def check_file_name(name: Any, where: str) -> str:
    """``name`` as a path inside the image folder, or an error: an absolute path or a ``..``
    would read a file outside ``dataset.image_dir`` (one DVC does not track)."""
    if not isinstance(name, str) or not name.strip():
        raise SemiresError(f"{where}: file_name {name!r} is not a file name; fix this image entry")
    posix, windows = PurePosixPath(name), PureWindowsPath(name)
    if (
        posix.is_absolute()
        or windows.is_absolute()
        or windows.drive
        or ".." in posix.parts
        or ".." in windows.parts
    ):
        raise SemiresError(
            f"{where}: file_name {name!r} points outside dataset.image_dir (an absolute path or '..'); "
            "file names must be relative to the image folder: fix this image entry"
        )
    return name


def check_bbox(bbox: Any, where: str) -> tuple[float, float, float, float]:
    """A COCO box ``[x, y, w, h]``: four finite numbers, ``x, y >= 0``, ``w, h >= 0``."""
    ok = (
        isinstance(bbox, list | tuple)
        and len(bbox) == 4
        and all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in bbox)
        and min(bbox) >= 0
    )
    if not ok:
        raise SemiresError(
            f"{where}: bbox {bbox!r} is not [x, y, width, height] of finite, non-negative numbers; "
            "fix or drop this annotation"
        )
    return tuple(float(v) for v in bbox)  # type: ignore[return-value]


def read_refer(refer_root: str | Path, dataset: str, split_by: str) -> Annotations:
    """Every ref of ``dataset`` (split scheme ``split_by``) with its image, sentences and mask."""
    check_dataset(dataset, split_by)
    refs_path, inst_path = refer_paths(refer_root, dataset, split_by)
    refs = load_refs_pickle(refs_path)
    inst = load_instances(inst_path)
    images = _unique_ids(inst["images"], "images", inst_path)
    anns = _unique_ids(inst["annotations"], "annotations", inst_path)
    seen_refs: set[int] = set()
    records: list[RefRecord] = []
    for ref in refs:
        where = f"{refs_path.name} ref {ref['ref_id']}"
        if int(ref["ref_id"]) in seen_refs:
            raise SemiresError(
                f"{refs_path}: ref id {ref['ref_id']} appears twice; replace it with the original refs file"
            )
        seen_refs.add(int(ref["ref_id"]))
        ann = anns.get(int(ref["ann_id"]))
        if ann is None:
            raise SemiresError(
                f"{where}: annotation {ref['ann_id']} is not in {inst_path}; the refs and "
                "instances files come from different releases"
            )
        image = images.get(int(ref["image_id"]))
        if image is None:
            raise SemiresError(
                f"{where}: image {ref['image_id']} is not in {inst_path}; the refs and "
                "instances files come from different releases"
            )
        h, w = int(image["height"]), int(image["width"])
        file_name = check_file_name(image.get("file_name"), f"{inst_path} image {image['id']}")
        ann_where = f"{inst_path.name} annotation {ann['id']}"
        rle = ann_to_rle(ann.get("segmentation"), h, w, where=ann_where)
        sentences = tuple(_sentence_text(s) for s in ref["sentences"])
        sent_ids = tuple(int(s.get("sent_id", i)) for i, s in enumerate(ref["sentences"]))
        raw_bbox = ann.get("bbox")
        bbox = check_bbox(raw_bbox, ann_where) if raw_bbox else tuple(mask_utils.toBbox(rle).tolist())
        records.append(
            RefRecord(
                ref_id=int(ref["ref_id"]),
                ann_id=int(ref["ann_id"]),
                image_id=int(ref["image_id"]),
                file_name=file_name,
                height=h,
                width=w,
                split=str(ref["split"]),
                category_id=int(ref["category_id"]),
                bbox=bbox,
                sentences=sentences,
                sent_ids=sent_ids,
                mask=rle,
            )
        )
    return Annotations(dataset=dataset, split_by=split_by, refs=records)
