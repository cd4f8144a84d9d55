"""The project's annotation records and their file format.

One JSON file per dataset holds every referred object ("ref") with its image, split, box,
sentences and mask. Masks are COCO run-length encodings (pycocotools' compressed string
form), so the file stays small and every mask decodes to exactly the pixels it was built
from. File layout::

    {
      "format": "semires-annotations", "version": 1,
      "dataset": "refcoco", "split_by": "unc",
      "refs": [
        {"ref_id": 0, "ann_id": 1, "image_id": 9, "file_name": "COCO_train2014_...jpg",
         "height": 480, "width": 640, "split": "train", "category_id": 1,
         "bbox": [x, y, w, h], "sentences": ["the man on the left", ...],
         "sent_ids": [0, ...], "mask": {"size": [480, 640], "counts": "..."}},
        ...
      ]
    }
"""

from __future__ import annotations

import json
import warnings
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from semires.atomic import atomic_path
from semires.errors import SemiresError

FORMAT = "semires-annotations"
VERSION = 1
IMAGES_FORMAT = "semires-images"


@dataclass(frozen=True)
class RefRecord:
    """One referred object: the unit a referring expression points at."""

    ref_id: int
    ann_id: int
    image_id: int
    file_name: str
    height: int
    width: int
    split: str
    category_id: int
    bbox: tuple[float, float, float, float]
    sentences: tuple[str, ...]
    sent_ids: tuple[int, ...]
    mask: Mapping[str, Any] = field(repr=False)  # COCO RLE: {"size": [h, w], "counts": str}

    def decode_mask(self) -> np.ndarray:
        """The object's mask, ``H x W`` bool at the image's own resolution."""
        return decode_rle(self.mask)


def decode_rle(rle: Mapping[str, Any]) -> np.ndarray:
    """Decode a compressed COCO RLE (counts as str or bytes) to an ``H x W`` bool array."""
    counts = rle["counts"]
    obj = {"size": list(rle["size"]), "counts": counts.encode() if isinstance(counts, str) else counts}
    return mask_utils.decode(obj).astype(bool)


def encode_mask(mask: np.ndarray) -> dict[str, Any]:
    """Encode an ``H x W`` bool array as a compressed COCO RLE with a str ``counts``."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"].decode()}


@dataclass(frozen=True)
class SplitCounts:
    images: int
    refs: int
    sentences: int


@dataclass
class Annotations:
    """All refs of one dataset (and split scheme), in a stable order (by ``ref_id``)."""

    dataset: str
    split_by: str
    refs: list[RefRecord]

    def __post_init__(self) -> None:
        self.refs = sorted(self.refs, key=lambda r: r.ref_id)

    def in_split(self, split: str) -> list[RefRecord]:
        return [r for r in self.refs if r.split == split]

    def splits(self) -> list[str]:
        """The splits present, in the conventional order (train, val, test*, then others)."""
        order = {"train": 0, "val": 1, "test": 2, "testA": 3, "testB": 4, "testC": 5}
        return sorted({r.split for r in self.refs}, key=lambda s: (order.get(s, 9), s))

    def image_ids(self, split: str | None = None) -> list[int]:
        """Sorted ids of the images that have at least one ref (in ``split`` if given)."""
        return sorted({r.image_id for r in self.refs if split is None or r.split == split})

    def refs_by_image(self, split: str | None = None) -> dict[int, list[RefRecord]]:
        out: dict[int, list[RefRecord]] = defaultdict(list)
        for r in self.refs:
            if split is None or r.split == split:
                out[r.image_id].append(r)
        return dict(out)

    def images(self, split: str | None = None) -> dict[int, tuple[str, int, int]]:
        """``image_id -> (file_name, height, width)`` for the images of ``split`` (or all)."""
        return {
            r.image_id: (r.file_name, r.height, r.width)
            for r in self.refs
            if split is None or r.split == split
        }

    def counts(self, refs: Iterable[RefRecord] | None = None) -> SplitCounts:
        refs = list(self.refs if refs is None else refs)
        return SplitCounts(
            images=len({r.image_id for r in refs}),
            refs=len(refs),
            sentences=sum(len(r.sentences) for r in refs),
        )

    def counts_by_split(self) -> dict[str, SplitCounts]:
        return {s: self.counts(self.in_split(s)) for s in self.splits()}


def save(path: str | Path, anns: Annotations) -> None:
    """Write ``anns`` to ``path`` atomically (one ref per line, so diffs stay readable)."""
    header = {"format": FORMAT, "version": VERSION, "dataset": anns.dataset, "split_by": anns.split_by}
    lines = [json.dumps(_to_json(r), separators=(",", ":")) for r in anns.refs]
    head = json.dumps(header)[:-1]
    text = head + ', "refs": [\n' + ",\n".join(lines) + "\n]}\n"
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def load(path: str | Path) -> Annotations:
    """Read an annotation file written by :func:`save`."""
    path = Path(path)
    if not path.is_file():
        raise SemiresError(
            f"{path}: annotation file not found; run `semires extract` (dvc repro extract) first"
        )
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SemiresError(f"{path}: not valid JSON ({e}); rerun `semires extract` to rebuild it") from e
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise SemiresError(
            f'{path}: not a semires annotation file (no "format": "{FORMAT}"); '
            "rebuild it with `semires extract`"
        )
    if obj.get("version") != VERSION:
        raise SemiresError(
            f"{path}: annotation format version {obj.get('version')!r}, this semires reads {VERSION}; "
            "rebuild it with `semires extract`"
        )
    try:
        refs = [_from_json(r) for r in obj["refs"]]
    except (KeyError, TypeError, ValueError) as e:
        raise SemiresError(f"{path}: malformed ref record ({e!r}); rebuild it with `semires extract`") from e
    return Annotations(dataset=obj["dataset"], split_by=obj["split_by"], refs=refs)


def _to_json(r: RefRecord) -> dict[str, Any]:
    d = asdict(r)
    d["bbox"] = list(r.bbox)
    d["sentences"] = list(r.sentences)
    d["sent_ids"] = list(r.sent_ids)
    d["mask"] = {"size": list(r.mask["size"]), "counts": r.mask["counts"]}
    return d


def _from_json(d: Mapping[str, Any]) -> RefRecord:
    return RefRecord(
        ref_id=int(d["ref_id"]),
        ann_id=int(d["ann_id"]),
        image_id=int(d["image_id"]),
        file_name=str(d["file_name"]),
        height=int(d["height"]),
        width=int(d["width"]),
        split=str(d["split"]),
        category_id=int(d["category_id"]),
        bbox=tuple(float(v) for v in d["bbox"]),
        sentences=tuple(str(s) for s in d["sentences"]),
        sent_ids=tuple(int(s) for s in d["sent_ids"]),
        mask={"size": [int(v) for v in d["mask"]["size"]], "counts": str(d["mask"]["counts"])},
    )


def split_summary(anns: Annotations) -> dict[str, dict[str, int]]:
    """``{split: {"images": .., "refs": .., "sentences": ..}}`` for printing and metrics."""
    return {s: asdict(c) for s, c in anns.counts_by_split().items()}


def save_images(path: str | Path, anns: Annotations, split: str) -> None:
    """Write the images of ``split`` (id, file name, height, width; sorted by id) atomically.

    A stage that needs the image set only (the mask proposals) depends on this file instead
    of the whole annotation file, so a change to sentences or masks does not rerun it.
    """
    images = anns.images(split)
    doc = {
        "format": IMAGES_FORMAT,
        "version": VERSION,
        "dataset": anns.dataset,
        "split_by": anns.split_by,
        "split": split,
        "images": [[i, *images[i]] for i in sorted(images)],
    }
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(doc) + "\n", encoding="utf-8")


def load_images(path: str | Path) -> tuple[str, dict[int, tuple[str, int, int]]]:
    """``(dataset, {image_id: (file_name, height, width)})`` from a file of :func:`save_images`."""
    path = Path(path)
    if not path.is_file():
        raise SemiresError(f"{path}: image list not found; run `semires extract` (dvc repro extract) first")
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
        if obj.get("format") != IMAGES_FORMAT or obj.get("version") != VERSION:
            raise ValueError(f"format {obj.get('format')!r} version {obj.get('version')!r}")
        images = {int(i): (str(f), int(h), int(w)) for i, f, h, w in obj["images"]}
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError, KeyError, TypeError, ValueError) as e:
        raise SemiresError(
            f"{path}: not a semires image list ({e}); rebuild it with `semires extract`"
        ) from e
    return str(obj["dataset"]), images


def check_image_files(anns: Annotations, image_dir: str | Path) -> int:
    """Every image of ``anns`` is a file under ``image_dir`` of the size its records give;
    returns how many were checked. Only each file's header is read (its size as stored, no
    decoding): about 0.2 ms of CPU an image, 4 s for RefCOCO's 19,994 images. An image of
    another size would otherwise be trained and scored against masks drawn for another
    picture."""
    from PIL import Image, UnidentifiedImageError

    images = anns.images()
    for image_id in sorted(images):
        name, h, w = images[image_id]
        path = Path(image_dir) / name
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # nothing is decoded here
                with Image.open(path) as im:
                    size = im.size
        except FileNotFoundError:
            raise SemiresError(
                f"{path}: image not found (image {image_id}); check dataset.image_dir"
            ) from None
        except Image.DecompressionBombError:
            continue  # too large to be read at all: the stage that decodes it says so
        except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as e:
            raise SemiresError(f"{path}: not a readable image ({e}); replace the file and rerun") from e
        if size != (w, h):
            raise SemiresError(
                f"{path}: image is {size[0]}x{size[1]}, the annotations say {w}x{h} (image {image_id}); "
                "dataset.image_dir must hold the images the annotations were made from"
            )
    return len(images)
