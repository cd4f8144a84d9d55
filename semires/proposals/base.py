"""What every mask-proposal backend returns, and the interface it implements.

A backend turns one RGB image into a set of class-agnostic binary masks (SAM's "automatic
mask generation"). The masks may overlap; each carries the scores its backend reports.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from semires.images import read_rgb

ATTR_FIELDS = ("predicted_iou", "stability_score", "area", "x", "y", "w", "h")


@dataclass(frozen=True)
class Proposals:
    """The masks of one image.

    ``masks``: ``N x H x W`` bool, at the image's own resolution.
    ``predicted_iou``, ``stability_score``: ``N`` float32, the backend's own quality scores
    (NaN where a backend has none). ``area``: ``N`` float32, pixels in each mask.
    ``bbox``: ``N x 4`` float32, ``x, y, w, h`` of each mask's bounding box (SAM's XYWH).
    """

    masks: np.ndarray
    predicted_iou: np.ndarray
    stability_score: np.ndarray
    area: np.ndarray
    bbox: np.ndarray

    def __len__(self) -> int:
        return int(self.masks.shape[0])

    @classmethod
    def from_masks(
        cls,
        masks: np.ndarray,
        predicted_iou: np.ndarray | None = None,
        stability_score: np.ndarray | None = None,
    ) -> Proposals:
        """Build from ``N x H x W`` bool masks; area and box are computed from the masks."""
        masks = np.asarray(masks, dtype=bool)
        n = masks.shape[0]
        nan = np.full(n, np.nan, np.float32)
        return cls(
            masks=masks,
            predicted_iou=nan.copy() if predicted_iou is None else np.asarray(predicted_iou, np.float32),
            stability_score=nan.copy()
            if stability_score is None
            else np.asarray(stability_score, np.float32),
            area=masks.sum(axis=(1, 2), dtype=np.int64).astype(np.float32),
            bbox=mask_boxes(masks),
        )

    def attrs(self) -> np.ndarray:
        """``N x 7`` float32: the columns of :data:`ATTR_FIELDS`."""
        return np.concatenate(
            [
                self.predicted_iou[:, None],
                self.stability_score[:, None],
                self.area[:, None],
                self.bbox.reshape(-1, 4),
            ],
            axis=1,
        ).astype(np.float32)

    def select(self, index: np.ndarray) -> Proposals:
        return Proposals(
            masks=self.masks[index],
            predicted_iou=self.predicted_iou[index],
            stability_score=self.stability_score[index],
            area=self.area[index],
            bbox=self.bbox[index],
        )


def mask_boxes(masks: np.ndarray) -> np.ndarray:
    """``N x H x W`` bool -> ``N x 4`` float32 ``x, y, w, h`` boxes (zeros for an empty mask).

    Same convention as segment-anything's XYWH output: ``w = x_max - x_min`` (inclusive
    pixel indices, so a one-pixel mask has ``w = 0``).
    """
    n = masks.shape[0]
    out = np.zeros((n, 4), np.float32)
    if n == 0:
        return out
    cols = masks.any(axis=1)  # N x W
    rows = masks.any(axis=2)  # N x H
    nonempty = cols.any(axis=1)
    w_, h_ = masks.shape[2], masks.shape[1]
    x0 = np.argmax(cols, axis=1)
    x1 = w_ - 1 - np.argmax(cols[:, ::-1], axis=1)
    y0 = np.argmax(rows, axis=1)
    y1 = h_ - 1 - np.argmax(rows[:, ::-1], axis=1)
    out[:, 0], out[:, 1], out[:, 2], out[:, 3] = x0, y0, x1 - x0, y1 - y0
    out[~nonempty] = 0
    return out


def cap(props: Proposals, max_masks: int) -> Proposals:
    """Keep at most ``max_masks`` masks: the highest ``predicted_iou`` first, then the highest
    ``stability_score`` (NaN counts as lowest), then the largest area, then the backend's
    order. The kept masks stay in the backend's order."""
    if len(props) <= max_masks:
        return props
    iou = np.nan_to_num(props.predicted_iou.astype(np.float64), nan=-np.inf)
    stab = np.nan_to_num(props.stability_score.astype(np.float64), nan=-np.inf)
    order = np.lexsort((np.arange(len(props)), -props.area.astype(np.float64), -stab, -iou))
    return props.select(np.sort(order[:max_masks]))


class Backend(Protocol):
    """A mask generator: ``backend(image)`` with ``image`` ``H x W x 3`` uint8 RGB."""

    name: str
    calls: int  # how many images it was called on

    def config(self) -> dict[str, Any]:
        """What made the masks (backend name, model, checkpoint sha256, settings); JSON-able.

        Two backends with equal configs produce the same masks for the same image."""
        ...

    def __call__(self, image: np.ndarray) -> Proposals: ...


_SHA_CACHE: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file, streamed; cached per process by (path, size, mtime)."""
    path = Path(path)
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _SHA_CACHE:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while block := f.read(1 << 22):
                h.update(block)
        _SHA_CACHE[key] = h.hexdigest()
    return _SHA_CACHE[key]


def read_image(path: str | os.PathLike) -> tuple[np.ndarray, str]:
    """``(H x W x 3 uint8 RGB, sha256 of the file)``; a missing or undecodable file is a
    :class:`SemiresError` naming it."""
    image, data = read_rgb(path)
    return image, hashlib.sha256(data).hexdigest()
