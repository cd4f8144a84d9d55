"""An offline proposal backend that needs no weights: classical graph-based segmentation.

This is NOT SAM. It stands in for SAM where no checkpoint can be had (the embedded synthetic
default, tests): Felzenszwalb-Huttenlocher graph segmentation (scikit-image) at several
scales gives regions from fine to coarse; every region above a minimum area is a candidate,
and at the finest scales regions of nearly the same mean colour are also offered together
as one candidate (a group of separate same-coloured parts, such as a crowd of dots). Near
duplicates across scales are dropped. Candidates overlap, like SAM's.

It has no learned quality estimate: ``predicted_iou`` is NaN. ``stability_score`` is a
heuristic, not SAM's: the share of scales at which the region (or a region with IoU above
``dedupe_iou`` with it) is found. Object outlines persist across scales; texture fragments
merge into larger regions at coarse scales.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy.sparse.csgraph import connected_components
from skimage.segmentation import felzenszwalb

from semires.proposals.base import Proposals

NAME = "felzenszwalb-multiscale"
DESCRIPTION = "classical graph-based segmentation (scikit-image felzenszwalb), not SAM"


@dataclass(frozen=True)
class OfflineSettings:
    """``scales``: Felzenszwalb ``scale`` values (larger = coarser regions). ``sigma``: its
    pre-smoothing. ``min_area``: smallest region in pixels. ``group_scales``: scales whose
    same-colour regions are also offered as a union; ``colour_delta``: largest distance of
    mean RGB colours (0-255) for two regions to count as the same colour. ``dedupe_iou``:
    a candidate whose IoU with an earlier one exceeds it is dropped. ``max_group_share``:
    unions larger than this share of the image are not offered."""

    scales: tuple[float, ...] = (50.0, 200.0, 800.0)
    sigma: float = 0.5
    min_area: int = 10
    group_scales: tuple[float, ...] = (50.0,)
    colour_delta: float = 30.0
    dedupe_iou: float = 0.9
    max_group_share: float = 0.3


class FelzenszwalbMultiscale:
    """The offline backend. ``backend(image)``: ``H x W x 3`` uint8 -> :class:`Proposals`."""

    name = NAME

    def __init__(self, settings: OfflineSettings | None = None) -> None:
        self.settings = settings or OfflineSettings()
        self.calls = 0

    def config(self) -> dict[str, Any]:
        s = asdict(self.settings)
        s = {k: list(v) if isinstance(v, tuple) else v for k, v in sorted(s.items())}
        return {"backend": NAME, "description": DESCRIPTION, "checkpoint_sha256": None, "settings": s}

    def __call__(self, image: np.ndarray) -> Proposals:
        self.calls += 1
        s = self.settings
        h, w = image.shape[:2]
        pixels = image.reshape(-1, 3).astype(np.float64)
        candidates: list[np.ndarray] = []
        level: list[int] = []  # the scale index each candidate came from
        for li, scale in enumerate(s.scales):
            seg = felzenszwalb(image, scale=scale, sigma=s.sigma, min_size=s.min_area)
            n = int(seg.max()) + 1
            flat = seg.ravel()
            count = np.bincount(flat, minlength=n)
            for v in np.flatnonzero(count >= s.min_area):
                candidates.append(seg == v)
                level.append(li)
            if scale in s.group_scales and n > 1:
                mean = np.stack([np.bincount(flat, pixels[:, c], minlength=n) for c in range(3)], 1)
                mean /= np.maximum(count, 1)[:, None]
                near = np.linalg.norm(mean[:, None] - mean[None], axis=-1) < s.colour_delta
                ncomp, comp = connected_components(near, directed=False)
                for c in range(ncomp):
                    members = np.flatnonzero(comp == c)
                    if len(members) > 1 and count[members].sum() < s.max_group_share * h * w:
                        candidates.append(np.isin(seg, members))
                        level.append(li)
        if not candidates:
            return Proposals.from_masks(np.zeros((0, h, w), bool))
        masks = np.stack(candidates)
        keep, stability = _dedupe(masks, np.array(level), len(s.scales), s.dedupe_iou)
        return Proposals.from_masks(masks[keep], stability_score=stability)


def _dedupe(
    masks: np.ndarray, level: np.ndarray, levels: int, max_iou: float
) -> tuple[np.ndarray, np.ndarray]:
    """Drop each of ``masks`` (``N x H x W`` bool) whose IoU with an earlier kept one exceeds
    ``max_iou``. Returns the kept indices ``K`` and, for each, the share of the ``levels``
    scales (``level``: ``N`` scale index per mask) holding a mask that similar to it."""
    f = masks.reshape(len(masks), -1).astype(np.float32)
    inter = f @ f.T
    area = np.diag(inter)
    similar = inter / np.maximum(area[:, None] + area[None] - inter, 1) > max_iou  # N x N
    keep: list[int] = []
    for i in range(len(masks)):
        if not keep or not similar[i, keep].any():
            keep.append(i)
    kept = np.array(keep, dtype=np.int64)
    onehot = np.eye(levels, dtype=bool)[level]  # N x levels
    found = (similar[kept].astype(np.float32) @ onehot.astype(np.float32)) > 0  # K x levels
    return kept, found.mean(axis=1).astype(np.float32)
