"""SAM-guided pseudo-label refinement: IOM, CPI and PWA as pure, batched tensor functions.

Given, for each unlabeled sample of a batch, the teacher's foreground probability ``p``
(``B x H x W``), its hard mask ``c = p > 0.5`` and the image's mask proposals ``S``
(``B x N x H x W`` bool, padded: ``valid`` is ``B x N`` and marks the real ones):

- IOM (IoU-based Optimal Matching): the proposal with the highest IoU with ``c``; if that
  IoU is above ``iou_thresh`` it replaces ``c`` as the pseudo-label.
- CPI (Composite Parts Integration): the union of every proposal that lies mostly inside
  ``c`` (``|S n c| / |S| > inside_thresh``) or covers most of ``c``
  (``|S n c| / |c| > cover_thresh``).
- PWA (Pixel-Wise Adjustment): a sample that no proposal matches keeps ``c`` and weights
  each pixel by ``w(p) = offset - N(p; mean, var)``, low where the teacher is unsure.

Every intersection and proposal area comes from batched matrix products of the flattened
masks; the selection is tensor arithmetic. Nothing loops over single masks in Python and
nothing reads a value back to the host, so on a GPU the whole refinement is a few kernel
launches per chunk. The arithmetic is the public SemiRES code's (thresholds compared with
``>``, the first proposal wins a tie, an empty union or an empty proposal never matches).

Proposals may come bit-packed (``B x N x H x ceil(W/8)`` uint8, :mod:`semires.bits`), as
the data loader sends them. The products need them as float32, 32 times the packed bytes:
8 images x 256 proposals at 480 x 480 would be 1.9 GB. So the proposals are unpacked and
converted a chunk of them at a time (``chunk_bytes``), and the counts are added up over the
chunks: exact integers, so the result is the same for every chunk size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch

from semires.bits import unpack_bits
from semires.errors import InvalidSetting

Strategy = Literal["iom", "cpi", "none"]
STRATEGIES: tuple[str, ...] = ("iom", "cpi", "none")


@dataclass(frozen=True, kw_only=True)
class RefineConfig:
    """The method's constants; defaults are the public code's values. ``strategy`` and
    ``pwa`` come from the method's name (``cpi_pwa``), the rest is ``semi.refine`` in
    params.yaml (:data:`METHOD_FIELDS`)."""

    strategy: Strategy = "cpi"
    iou_thresh: float = 0.5  # IOM: a proposal matches above this IoU with c
    inside_thresh: float = 0.7  # CPI: |S n c| / |S| above this: S lies mostly inside c
    cover_thresh: float = 0.7  # CPI: |S n c| / |c| above this: S covers most of c
    pwa: bool = True  # weight unmatched samples per pixel (else weight 1)
    pwa_offset: float = 1.3
    pwa_mean: float = 0.5
    pwa_var: float = 0.1  # the Gaussian's variance (sigma^2), as in the public code

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise InvalidSetting("strategy", self.strategy, f"expected one of {STRATEGIES}")
        for key in ("iou_thresh", "inside_thresh", "cover_thresh"):
            v = getattr(self, key)
            if not 0 <= v < 1:
                raise InvalidSetting(key, v, "expected a threshold in [0, 1)")
        if not self.pwa_var > 0:
            raise InvalidSetting("pwa_var", self.pwa_var, "expected a positive variance, e.g. 0.1")


METHOD_FIELDS = ("strategy", "pwa")  # the fields of RefineConfig a method's name sets


class Refined(NamedTuple):
    """The refinement of a batch.

    labels:  ``B x H x W`` int64 pseudo-labels (0 background, 1 object).
    weights: ``B x H x W`` float32 per-pixel loss weights (1 where a proposal matched).
    matched: ``B`` bool, True where IOM/CPI replaced the teacher's mask.
    raw:     ``B x H x W`` int64, the teacher's own hard mask ``c``.
    """

    labels: torch.Tensor
    weights: torch.Tensor
    matched: torch.Tensor
    raw: torch.Tensor


class Overlaps(NamedTuple):
    """Counts from :func:`overlaps`.

    inter: ``B x N`` ``|S n c|``; area: ``B x N`` ``|S|``; c_area: ``B`` ``|c|``.
    """

    inter: torch.Tensor
    area: torch.Tensor
    c_area: torch.Tensor


def overlaps(
    c: torch.Tensor, proposals: torch.Tensor, blocks: int | None = None, *, chunk_bytes: int | None = None
) -> Overlaps:
    """Intersections with ``c`` and areas of all proposals, from batched products.

    c: ``B x H x W`` bool; proposals: ``B x N x H x W`` bool or bit-packed (see
    :func:`refine`). Counts are exact: float32 holds integers up to 2**24 (a 4096 x 4096
    mask) exactly, and the products are of 0/1. ``blocks``: see :func:`_overlaps` (None: the
    device's choice); ``chunk_bytes``: see :func:`refine`.
    """
    masks = _Chunks(proposals, c.shape[-1], chunk_bytes)
    return masks.overlaps(c.reshape(c.shape[0], -1), blocks)


def _flat(proposals: torch.Tensor) -> torch.Tensor:
    """``B x N x H x W`` bool -> ``B x N x P`` float32 (the operand of the batched products)."""
    return proposals.reshape(*proposals.shape[:2], -1).to(torch.float32)


CHUNK_BYTES = 128 << 20
"""Default working memory of one chunk of proposals (unpacked and as float32)."""


class _Chunks:
    """``B x N x H x W`` proposals, bool or bit-packed, handed out as ``B x k x P`` float32
    chunks of ``k`` proposals, ``k`` chosen so that a chunk's working memory (the unpacked
    bits and the float32 copy, about 6 bytes a pixel) stays within ``chunk_bytes``."""

    def __init__(self, proposals: torch.Tensor, width: int, chunk_bytes: int | None) -> None:
        self.proposals, self.width = proposals, width
        self.packed = proposals.dtype == torch.uint8
        b, n, h = proposals.shape[:3]
        self.pixels = h * width
        per_mask = max(1, b * self.pixels * (6 if self.packed else 5))
        self.k = max(1, (CHUNK_BYTES if chunk_bytes is None else chunk_bytes) // per_mask)
        self.starts = range(0, n, self.k)

    def flat(self, start: int) -> torch.Tensor:
        """Proposals ``start .. start + k``: ``B x k x P`` float32."""
        part = self.proposals[:, start : start + self.k]
        if self.packed:
            part = unpack_bits(part, self.width)
        return _flat(part)

    def select(self, index: torch.Tensor) -> torch.Tensor:
        """Proposal ``index[b]`` of each sample: ``B x H x W`` bool."""
        chosen = self.proposals[torch.arange(len(index), device=index.device), index]
        return unpack_bits(chosen, self.width) if self.packed else chosen

    def overlaps(self, c: torch.Tensor, blocks: int | None = None) -> Overlaps:
        """``c``: ``B x P`` bool; the counts of every proposal, chunk by chunk."""
        parts = [_overlaps(c, self.flat(start), blocks) for start in self.starts]
        if not parts:
            empty = torch.zeros((c.shape[0], 0), dtype=torch.float32, device=c.device)
            return Overlaps(inter=empty, area=empty, c_area=c.to(torch.float32).sum(1))
        return Overlaps(
            inter=torch.cat([p.inter for p in parts], dim=1),
            area=torch.cat([p.area for p in parts], dim=1),
            c_area=parts[0].c_area,
        )

    def cover(self, sel: torch.Tensor) -> torch.Tensor:
        """``sel``: ``B x N`` bool -> ``B x P`` float32, how many selected proposals cover
        each pixel (one product per chunk: the selection row times the chunk's masks)."""
        total = None
        for start in self.starts:
            w = sel[:, start : start + self.k].to(torch.float32)[:, None, :]  # B x 1 x k
            part = torch.bmm(w, self.flat(start))[:, 0]
            total = part if total is None else total + part
        return total


def pixel_blocks(pixels: int, device: torch.device) -> int:
    """How many blocks :func:`_overlaps` cuts the pixels into: 1 on the CPU; on a GPU the
    largest divisor of ``pixels`` up to 64."""
    if device.type == "cpu":
        return 1
    return max(g for g in range(1, 65) if pixels % g == 0)


def _overlaps(c: torch.Tensor, s: torch.Tensor, blocks: int | None = None) -> Overlaps:
    """``c``: ``B x P``; ``s``: ``B x N x P`` float32.

    One product ``S @ [c, 1]`` per sample gives ``|S n c|`` and ``|S|``. Over all ``P``
    pixels at once it has only ``N x 2`` outputs, each a sum over every pixel: a GPU then
    runs a few long sums on a few cores. In ``blocks`` blocks of pixels (batch entries of
    one product, a view: nothing is copied) it runs that many times more, shorter sums in
    parallel, and adds the partial counts; the CPU is fastest with one block.
    """
    b, n, p = s.shape
    g = pixel_blocks(p, s.device) if blocks is None else blocks
    cf = c.to(torch.float32)
    rhs = torch.stack([cf, torch.ones_like(cf)], dim=2)  # B x P x 2
    if g == 1:
        prod = torch.bmm(s, rhs)  # B x N x 2: [|S n c|, |S|]
    else:
        q = p // g
        prod = torch.stack(
            [torch.bmm(s[i].view(n, g, q).transpose(0, 1), rhs[i].view(g, q, 2)).sum(0) for i in range(b)]
        )
    return Overlaps(inter=prod[..., 0], area=prod[..., 1], c_area=cf.sum(1))


def pwa_weights(p: torch.Tensor, *, offset: float = 1.3, mean: float = 0.5, var: float = 0.1) -> torch.Tensor:
    """``w(p) = offset - exp(-(p - mean)^2 / (2 var)) / sqrt(2 pi var)``, elementwise, float32.

    With the defaults: 0.038 at p = 0.5 (the teacher is unsure), 0.939 at p in {0, 1}.
    """
    p = p.to(torch.float32)
    return offset - torch.exp(-((p - mean) ** 2) / (2 * var)) / math.sqrt(2 * math.pi * var)


def iom(ov: Overlaps, valid: torch.Tensor, thresh: float) -> tuple[torch.Tensor, torch.Tensor]:
    """IoU-based optimal matching: ``(best index B, matched B)``.

    IoU = ``|S n c| / |S u c|`` (0 where the union is empty); invalid proposals never win;
    the first proposal wins a tie, as the public code's strict ``>`` scan does.
    """
    union = ov.area + ov.c_area[:, None] - ov.inter
    iou = torch.where(union > 0, ov.inter / union.clamp_min(1), torch.zeros_like(union))
    iou = torch.where(valid, iou, torch.full_like(iou, -1.0))
    best_iou, best = iou.max(dim=1)  # max returns the first index of the maximum
    return best, best_iou > thresh


def cpi(ov: Overlaps, valid: torch.Tensor, inside: float, cover: float) -> torch.Tensor:
    """Composite parts integration: ``B x N`` bool, the proposals to unite.

    ``|S n c| / |S| > inside`` (never for an empty proposal) or
    ``|S n c| / (|c| + 1e-9) > cover`` (never for an empty ``c``).
    """
    in_c = torch.where(ov.area > 0, ov.inter / ov.area.clamp_min(1), torch.zeros_like(ov.inter)) > inside
    covers = ov.inter / (ov.c_area[:, None] + 1e-9) > cover
    return (in_c | covers) & valid


def refine(
    prob: torch.Tensor,
    proposals: torch.Tensor,
    valid: torch.Tensor,
    cfg: RefineConfig = RefineConfig(),
    *,
    chunk_bytes: int | None = None,
) -> Refined:
    """Refine a batch of teacher predictions with its proposals.

    prob: ``B x H x W`` teacher foreground probability; proposals: ``B x N x H x W`` bool,
    or bit-packed ``B x N x H x ceil(W/8)`` uint8 (:func:`semires.bits.pack_bits`);
    valid: ``B x N`` bool (False for padding). N may be 0. The proposals are worked through
    ``chunk_bytes`` at a time (default :data:`CHUNK_BYTES`; at least one proposal of every
    sample per chunk): the extra memory does not grow with N. Returns :class:`Refined`,
    the same for every chunk size and for packed or unpacked proposals.
    """
    c = prob > 0.5
    raw = c.to(torch.int64)
    b = prob.shape[0]
    if cfg.strategy == "none" or proposals.shape[1] == 0:
        matched = torch.zeros(b, dtype=torch.bool, device=prob.device)
        labels = raw
    else:
        masks = _Chunks(proposals, prob.shape[-1], chunk_bytes)
        ov = masks.overlaps(c.reshape(b, -1))
        if cfg.strategy == "iom":
            best, matched = iom(ov, valid, cfg.iou_thresh)
            chosen = masks.select(best)  # B x H x W
        else:
            sel = cpi(ov, valid, cfg.inside_thresh, cfg.cover_thresh)  # B x N
            matched = sel.any(dim=1)
            chosen = masks.cover(sel).reshape(prob.shape) > 0  # the union of the selected
        labels = torch.where(matched[:, None, None], chosen, c).to(torch.int64)
    if cfg.pwa:
        w = pwa_weights(prob, offset=cfg.pwa_offset, mean=cfg.pwa_mean, var=cfg.pwa_var)
        weights = torch.where(matched[:, None, None], torch.ones_like(w), w)
    else:
        weights = torch.ones_like(prob, dtype=torch.float32)
    return Refined(labels=labels, weights=weights, matched=matched, raw=raw)
