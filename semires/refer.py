"""Reading the REFER layout (RefCOCO, RefCOCO+, RefCOCOg, RefCLEF and the synthetic set).

The layout, as the REFER toolkit expects it::

    <refer_root>/<dataset>/instances.json     COCO-style images, annotations, categories
    <refer_root>/<dataset>/refs(<split_by>).p  a pickled list of ref dicts

The refs pickle is read with a restricted unpickler that builds plain containers, strings
and numbers only: a pickle that asks to import anything is refused, never executed.
Masks are built exactly as the REFER API's ``getMask`` builds them (the union of the
annotation's polygons, or its RLE, crowd annotations included).
"""

from __future__ import annotations

import io
import json
import math
import pickle
from collections.abc import Mapping
from pathlib import Path
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
        # The published pickles were written by Python 2; their byte strings are ASCII/UTF-8.
        refs = _PlainUnpickler(io.BytesIO(data), encoding="utf-8").load()
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


def read_refer(refer_root: str | Path, dataset: str, split_by: str) -> Annotations:
    """Every ref of ``dataset`` (split scheme ``split_by``) with its image, sentences and mask."""
    check_dataset(dataset, split_by)
    refs_path, inst_path = refer_paths(refer_root, dataset, split_by)
    refs = load_refs_pickle(refs_path)
    inst = load_instances(inst_path)
    images = {int(im["id"]): im for im in inst["images"]}
    anns = {int(a["id"]): a for a in inst["annotations"]}
    records: list[RefRecord] = []
    for ref in refs:
        where = f"{refs_path.name} ref {ref['ref_id']}"
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
        rle = ann_to_rle(ann.get("segmentation"), h, w, where=f"{inst_path.name} annotation {ann['id']}")
        sentences = tuple(_sentence_text(s) for s in ref["sentences"])
        sent_ids = tuple(int(s.get("sent_id", i)) for i, s in enumerate(ref["sentences"]))
        bbox = ann.get("bbox") or mask_utils.toBbox(rle).tolist()
        records.append(
            RefRecord(
                ref_id=int(ref["ref_id"]),
                ann_id=int(ref["ann_id"]),
                image_id=int(ref["image_id"]),
                file_name=str(image["file_name"]),
                height=h,
                width=w,
                split=str(ref["split"]),
                category_id=int(ref["category_id"]),
                bbox=tuple(float(v) for v in bbox),
                sentences=sentences,
                sent_ids=sent_ids,
                mask=rle,
            )
        )
    return Annotations(dataset=dataset, split_by=split_by, refs=records)
