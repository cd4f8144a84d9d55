"""semires' SAM generator (post-processing on the device) against segment-anything's
SamAutomaticMaskGenerator, on the CPU with a tiny random SAM whose mask head is shaped so
that its masks differ in extent (``object_like``): the same masks and scores bit for bit in
float32; bf16 and fused attention run the same code path. The compiled implementation runs
in scripts/gpu_check.py --tiny (tests/test_gpu_check.py), against the uncompiled one."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch
from torchvision.ops.boxes import batched_nms

from semires.proposals.base import Proposals
from semires.proposals.sam import SamSettings, build_tiny_sam, object_like, sam_generator
from semires.proposals.sam_fast import FastMaskGenerator, compare_masks, sdpa_attention


def _image(h: int, w: int, seed: int) -> np.ndarray:
    """A noisy gradient with a few flat rectangles and ellipses (distinct regions)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    img = rng.uniform(0, 255, 3) * (xx / w)[..., None] + rng.uniform(0, 255, 3) * (yy / h)[..., None] / 2
    for k in range(5):
        cy, cx, ry, rx = (
            rng.uniform(0, h),
            rng.uniform(0, w),
            rng.uniform(h / 10, h / 3),
            rng.uniform(w / 10, w / 3),
        )
        inside = (
            ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1
            if k % 2
            else (abs(yy - cy) < ry) & (abs(xx - cx) < rx)
        )
        img[inside] = rng.uniform(0, 255, 3)
    return np.clip(img + rng.normal(0, 3, img.shape), 0, 255).astype(np.uint8)


IMAGES = [_image(48, 64, 0), _image(37, 53, 1)]  # a width that is no multiple of 8, too


@pytest.fixture(scope="module")
def sam() -> torch.nn.Module:
    torch.manual_seed(0)
    return object_like(build_tiny_sam())


def _same(a: Proposals, b: Proposals) -> bool:
    return a.masks.shape == b.masks.shape and all(
        np.array_equal(getattr(a, k), getattr(b, k), equal_nan=True)  # an empty mask: stability 0/0
        for k in ("masks", "predicted_iou", "stability_score", "area", "bbox")
    )


# Every path of the post-processing: the IoU threshold and NMS that suppresses (with a last
# batch smaller than the others); the stability threshold (it keeps only this model's
# whole-image masks, so NMS is off); crops (the crop-edge test, masks padded back to the
# image, NMS across crops). The second image's width is no multiple of 8.
CASES = {
    "iou-nms": (
        SamSettings(points_per_side=6, points_per_batch=20, pred_iou_thresh=0.01, stability_score_thresh=0.0),
        IMAGES[0],
    ),
    "stability": (
        SamSettings(
            points_per_side=6,
            points_per_batch=20,
            pred_iou_thresh=0.005,
            stability_score_thresh=0.01,
            box_nms_thresh=1.0,
        ),
        IMAGES[1],
    ),
    "crops": (
        SamSettings(points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.0, crop_n_layers=1),
        IMAGES[1],
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_fast_generator_returns_the_library_masks_in_fp32(sam, case):
    settings, image = CASES[case]
    library = sam_generator(copy.deepcopy(sam), settings, implementation="library")
    fast = sam_generator(copy.deepcopy(sam), settings, implementation="fast")
    assert isinstance(fast, FastMaskGenerator)
    want, got = library(image), fast(image)
    assert _same(got, want), case
    np.testing.assert_array_equal(got.area, got.masks.sum(axis=(1, 2)))
    assert len(got) >= 5  # several masks: their order and NMS are tested too


def test_candidates_follow_the_generators_rules(sam):
    """Thresholds, crop-edge test and box NMS applied to ``candidates`` keep as many masks
    as the generator (the benchmark's threshold calibration counts this way)."""
    settings = dataclasses.replace(CASES["iou-nms"][0], stability_score_thresh=0.01)
    generator = FastMaskGenerator(copy.deepcopy(sam), settings)
    with torch.inference_mode():
        c = generator.candidates(IMAGES[0])
        kept = len(generator(IMAGES[0]))
    assert len(c.predicted_iou) == 3 * settings.points_per_side**2
    keep = (c.predicted_iou > settings.pred_iou_thresh) & (
        c.stability_score >= settings.stability_score_thresh
    )
    keep &= ~c.near_edge
    sel = torch.nonzero(keep)[:, 0]
    nms = batched_nms(
        c.boxes[sel].float(), c.predicted_iou[sel], torch.zeros_like(sel), settings.box_nms_thresh
    )
    assert 0 < len(nms) == kept < len(sel) < len(c.predicted_iou)  # every filter removed some


def test_sdpa_attention_equals_the_library_attention():
    """Fused attention with the relative-position terms as its mask: the image encoder's
    function, windowed and global blocks, with nonzero relative-position tables."""
    torch.manual_seed(1)
    encoder = build_tiny_sam().image_encoder
    with torch.no_grad():
        for block in encoder.blocks:
            block.attn.rel_pos_h.normal_(0, 0.5)
            block.attn.rel_pos_w.normal_(0, 0.5)
    for block, size in zip(encoder.blocks, (4, 16), strict=True):  # window 4, then global 16 x 16
        assert block.window_size in (0, 4)
        x = torch.randn(3, size, size, 64)
        with torch.no_grad():
            torch.testing.assert_close(sdpa_attention(block.attn, x), block.attn(x), rtol=1e-5, atol=1e-5)


def test_bf16_runs_the_fast_path_with_fused_attention(sam):
    """bf16 (autocast, fused attention in the encoder) on the CPU: valid proposals, close to
    float32's masks; the library's bf16 path for comparison."""
    settings = SamSettings(
        points_per_side=6, pred_iou_thresh=0.0, stability_score_thresh=0.0, box_nms_thresh=1.0
    )
    fp32 = sam_generator(copy.deepcopy(sam), settings, implementation="library")(IMAGES[0])
    fast_model = copy.deepcopy(sam)
    fast = sam_generator(fast_model, settings, precision="bf16", implementation="fast")(IMAGES[0])
    from segment_anything.modeling.image_encoder import Attention

    attention = [m for m in fast_model.image_encoder.modules() if isinstance(m, Attention)]
    assert attention and all(m.forward.__func__ is sdpa_attention for m in attention)
    assert len(fast) >= 3
    np.testing.assert_array_equal(fast.area, fast.masks.sum(axis=(1, 2)))
    agree = compare_masks(fast.masks, fp32.masks)
    assert agree.pairs >= 3 and agree.mean_iou > 0.5, agree


def test_min_mask_region_area_is_left_to_the_library(sam):
    with pytest.raises(ValueError, match="min_mask_region_area"):
        FastMaskGenerator(sam, dataclasses.replace(SamSettings(), min_mask_region_area=10))


def test_compare_masks_pairs_by_iou():
    a = torch.zeros(3, 4, 4, dtype=torch.bool)
    a[0, :2, :2] = True  # identical to b[1]
    a[1, 2:, :] = True  # 8 pixels; b[0] has 6 of them: IoU 6/8
    a[2, 0, 3] = True  # no partner
    b = torch.zeros(2, 4, 4, dtype=torch.bool)
    b[0, 2:, 1:] = True
    b[1, :2, :2] = True
    r = compare_masks(a, b)
    assert (r.count_a, r.count_b, r.pairs, r.identical, r.differ) == (3, 2, 2, 1, 2)
    assert r.mean_iou == pytest.approx((1 + 6 / 8) / 2) and r.min_iou == pytest.approx(6 / 8)
    same = compare_masks(a.numpy(), a.numpy())
    assert same.identical == 3 and same.differ == 0 and same.min_iou == 1.0
    none = compare_masks(a[:0], b[:0])
    assert none.pairs == 0 and none.differ == 0
