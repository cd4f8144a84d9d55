"""Referring segmentation metrics, as LAVT's test script computes them.

Per expression: intersection ``I`` and union ``U`` of the predicted and true masks; its IoU
is ``I / U``, or 0 when ``U`` is 0. Over a split: overall IoU ``oIoU = ΣI / ΣU``, mean IoU
``mIoU`` = the mean of the per-expression IoUs, and ``prec@t`` = the share of expressions
whose IoU is at least ``t``. All reported in percent, as the paper's tables.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9)


def intersection_union(pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``pred``, ``target``: ``B x H x W`` bool -> ``I``, ``U``: ``B`` int64 pixel counts."""
    if pred.shape != target.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    pred, target = pred.bool().flatten(1), target.bool().flatten(1)
    inter = (pred & target).sum(1)
    union = (pred | target).sum(1)
    return inter, union


def iou(inter: torch.Tensor, union: torch.Tensor) -> torch.Tensor:
    """Per-expression IoU, ``B`` float64; 0 where the union is empty (both masks empty)."""
    inter, union = inter.double(), union.double()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.zeros_like(inter))


def summarize(
    inter: torch.Tensor, union: torch.Tensor, thresholds: Sequence[float] = THRESHOLDS
) -> dict[str, float]:
    """``{"oIoU", "mIoU", "prec@0.5", ..., "count"}`` over expressions (``I``, ``U``: ``N``)."""
    n = int(inter.numel())
    ious = iou(inter, union)
    total_u = float(union.double().sum())
    out = {
        "oIoU": 100.0 * float(inter.double().sum()) / total_u if total_u > 0 else 0.0,
        "mIoU": 100.0 * float(ious.mean()) if n else 0.0,
    }
    for t in thresholds:
        out[f"prec@{t:g}"] = 100.0 * float((ious >= t).double().mean()) if n else 0.0
    out["count"] = n
    return out
