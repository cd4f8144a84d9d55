"""Logits to masks: banded bilinear upsampling equals F.interpolate's, and the mask's summary."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from semires.logits import difference, foreground, summarize, upsampled_bands


@pytest.mark.parametrize(
    ("src", "dst"),
    [
        ((64, 64), (97, 130)),
        ((64, 64), (40, 30)),
        ((16, 16), (16, 16)),
        ((8, 12), (301, 77)),
        ((64, 64), (1, 5)),
    ],
)
def test_banded_upsampling_is_f_interpolate(src, dst):
    torch.manual_seed(0)
    logits = torch.randn(2, *src) * 3
    ref = F.interpolate(logits[None], size=dst, mode="bilinear", align_corners=False)[0]
    d = difference(logits)
    bands = list(upsampled_bands(d, dst, band_pixels=200))
    assert [top for top, _ in bands] == list(range(0, dst[0], max(1, 200 // dst[1])))
    up = torch.cat([b for _, b in bands])
    assert torch.allclose(up, ref[1] - ref[0], atol=1e-4)
    clear = (ref[1] - ref[0]).abs() > 1e-4  # away from a tie, the argmax is the same
    assert torch.equal(foreground(d, dst)[clear], ref.argmax(0).bool()[clear])


def test_summary_area_box_and_probability():
    """A 4 x 4 map, upsampled to 8 x 8: foreground where the object logit wins."""
    logits = torch.zeros(2, 4, 4)
    logits[1, 1:3, 2:4] = 4.0  # object in rows 1-2, columns 2-3
    logits[0] = 1.0
    s = summarize(difference(logits), (8, 8))
    ref = F.interpolate(logits[None], size=(8, 8), mode="bilinear", align_corners=False)[0]
    mask = ref.argmax(0).bool()
    assert s.mask.dtype == bool and s.mask.shape == (8, 8) and (s.mask == mask.numpy()).all()
    ys, xs = mask.nonzero(as_tuple=True)
    assert s.area == int(mask.sum()) > 0
    assert s.bbox == (
        int(xs.min()),
        int(ys.min()),
        int(xs.max() - xs.min() + 1),
        int(ys.max() - ys.min() + 1),
    )
    assert s.score == pytest.approx(float(ref.softmax(0)[1][mask].mean()), abs=1e-6)
    empty = summarize(torch.full((4, 4), -1.0), (5, 7))
    assert empty.area == 0 and empty.bbox is None and empty.score is None and not empty.mask.any()
