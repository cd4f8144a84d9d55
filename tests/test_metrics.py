"""Metrics against examples computed by hand."""

from __future__ import annotations

import pytest
import torch

from semires.metrics import intersection_union, iou, summarize


def _mask(rows: list[str]) -> torch.Tensor:
    return torch.tensor([[c == "#" for c in r] for r in rows])


def test_intersection_and_union_of_4x4_masks():
    pred = _mask(["##..", "##..", "....", "...."])  # 4 pixels
    gt = _mask([".##.", ".##.", "....", "...."])  # 4 pixels, 2 shared
    inter, union = intersection_union(pred[None], gt[None])
    assert inter.tolist() == [2] and union.tolist() == [6]
    assert iou(inter, union).tolist() == pytest.approx([1 / 3])


def test_empty_union_counts_as_zero_iou():
    assert iou(torch.tensor([0, 3]), torch.tensor([0, 4])).tolist() == [0.0, 0.75]


def test_overall_and_mean_iou_differ_as_by_hand():
    # expression 1: I=1, U=4 (IoU .25); expression 2: I=9, U=10 (IoU .9); expression 3: empty (IoU 0)
    inter, union = torch.tensor([1, 9, 0]), torch.tensor([4, 10, 0])
    m = summarize(inter, union)
    assert m["oIoU"] == pytest.approx(100 * 10 / 14)
    assert m["mIoU"] == pytest.approx(100 * (0.25 + 0.9 + 0) / 3)
    assert m["count"] == 3


def test_precision_thresholds_are_inclusive():
    # IoUs 0.5, 0.6, 0.7, 0.8, 0.9, 1.0 exactly
    inter = torch.tensor([5, 6, 7, 8, 9, 10])
    union = torch.full((6,), 10)
    m = summarize(inter, union)
    assert [m[f"prec@{t}"] for t in (0.5, 0.6, 0.7, 0.8, 0.9)] == pytest.approx(
        [100, 100 * 5 / 6, 100 * 4 / 6, 100 * 3 / 6, 100 * 2 / 6]
    )


def test_shape_mismatch_is_refused():
    with pytest.raises(ValueError, match="differ in shape"):
        intersection_union(torch.zeros(1, 4, 4, dtype=torch.bool), torch.zeros(1, 4, 5, dtype=torch.bool))
