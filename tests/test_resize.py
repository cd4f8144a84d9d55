"""Resizing as the official pipeline (PIL): images bilinear on uint8, masks and proposals nearest."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from semires.data import resize_image as image_for_model
from semires.resize import nearest_index, resize_image, resize_mask

# odd sizes, shrinking and growing, and the RefCOCO case of a 427 x 640 image at 480
SHAPES = [((37, 53), 24), ((37, 53), 64), ((61, 29), 96), ((7, 300), 32), ((480, 481), 480)]


def _pil(array: np.ndarray, size: tuple[int, int], resample, mode: str | None = None) -> np.ndarray:
    im = Image.fromarray(array) if mode is None else Image.fromarray(array).convert(mode)
    return np.asarray(im.resize((size[1], size[0]), resample))


@pytest.mark.parametrize(("hw", "size"), SHAPES)
def test_images_are_pils_bilinear_resize_of_the_uint8_pixels(hw, size):
    rgb = np.random.default_rng(sum(hw)).integers(0, 256, (*hw, 3), dtype=np.uint8)
    want = _pil(rgb, (size, size), Image.Resampling.BILINEAR)
    assert np.array_equal(resize_image(rgb, size), want)
    tensor = image_for_model(rgb, size)  # what a dataset gives the model: 3 x S x S in [0, 1]
    assert torch.equal(tensor, torch.from_numpy(np.array(want)).permute(2, 0, 1).float() / 255)


@pytest.mark.parametrize(("hw", "size"), [*SHAPES, ((427, 640), 480)])
@pytest.mark.parametrize("mode", ["L", "P"])  # P: the official code's ground-truth image
def test_masks_are_pils_nearest_resize(hw, size, mode):
    mask = (np.random.default_rng(hw[0]).random(hw) > 0.5).astype(np.uint8)
    want = _pil(mask, (size, size), Image.Resampling.NEAREST, mode)
    assert np.array_equal(resize_mask(mask, (size, size)), want)
    rect = (size + 3, max(1, size - 5))  # h != w: rows and columns each by their own map
    assert np.array_equal(resize_mask(mask, rect), _pil(mask, rect, Image.Resampling.NEAREST, mode))


@pytest.mark.parametrize(("src", "dst"), [(427, 480), (640, 480), (5, 12), (33, 7)])
def test_the_torch_rule_is_interpolate_nearest(src, dst):
    grid = torch.arange(src, dtype=torch.float32).view(1, 1, src)
    want = F.interpolate(grid, size=dst, mode="nearest").view(dst).long().numpy()
    assert np.array_equal(nearest_index(src, dst, "torch"), want)


def test_pil_and_torch_nearest_differ_on_a_refcoco_sized_mask():
    """Why the rule matters: a 427 x 640 object mask at 480 x 480 differs on hundreds of pixels."""
    yy, xx = np.mgrid[0:427, 0:640]
    mask = (((yy - 200) / 120.0) ** 2 + ((xx - 300) / 170.0) ** 2 < 1).astype(np.uint8)
    pil, torch_rule = resize_mask(mask, (480, 480), "pil"), resize_mask(mask, (480, 480), "torch")
    assert int((pil != torch_rule).sum()) > 200
