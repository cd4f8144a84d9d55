"""Refinement against the public code's per-mask loop, and by hand on 4x4 examples."""

import math

import pytest
import torch

from semires.bits import pack_bits
from semires.refine import RefineConfig, overlaps, pixel_blocks, pwa_weights, refine


def loop_reference(prob, proposals, valid, cfg):
    """The public SemiRES training scripts' refinement, one sample and one mask at a time."""
    c = (prob > 0.5).long()
    labels = torch.zeros_like(c)
    matched = torch.zeros(prob.shape[0], dtype=torch.bool)
    for b in range(prob.shape[0]):
        masks = proposals[b][valid[b]].long()
        if cfg.strategy == "iom":
            top, best = 0.0, None
            for s in masks:
                inter = (s * c[b]).sum()
                union = (s + c[b] - s * c[b]).sum()
                iou = float(inter) / float(union) if union > 0 else 0.0
                if iou > cfg.iou_thresh and iou > top:
                    top, best = iou, s
            if best is not None:
                labels[b][best.bool()] = 1
                matched[b] = True
        elif cfg.strategy == "cpi":
            for s in masks:
                inter = (s * c[b]).sum().float()
                r1 = inter / (c[b].sum() + 1e-9)
                r2 = inter / s.sum() if s.sum() > 0 else torch.tensor(0.0)
                if r1 > cfg.cover_thresh or r2 > cfg.inside_thresh:
                    labels[b][s.bool()] = 1
                    matched[b] = True
        if not matched[b]:
            labels[b] = c[b]
    sigma = cfg.pwa_var
    w = cfg.pwa_offset - (1 / (math.sqrt(2 * math.pi) * math.sqrt(sigma))) * torch.exp(
        -((prob.double() - cfg.pwa_mean) ** 2) / (2 * sigma)
    )
    weights = torch.where(matched[:, None, None], torch.ones_like(w), w).float()
    return labels, weights, matched


def _random_batch(seed, b=4, n=12, h=16, w=16):
    g = torch.Generator().manual_seed(seed)
    # blobby probabilities and proposals: thresholded smooth noise, some nested in others
    prob = torch.nn.functional.interpolate(torch.rand(b, 1, 4, 4, generator=g), size=(h, w), mode="bilinear")[
        :, 0
    ]
    base = torch.nn.functional.interpolate(torch.rand(b, n, 4, 4, generator=g), size=(h, w), mode="bilinear")
    props = base > torch.rand(b, n, 1, 1, generator=g) * 0.6 + 0.3
    props[:, 0] = prob > 0.5  # an exact match
    props[:, 1] = False  # an empty proposal
    valid = torch.rand(b, n, generator=g) > 0.2
    return prob, props, valid


@pytest.mark.parametrize("strategy", ["iom", "cpi"])
@pytest.mark.parametrize("seed", range(6))
def test_batched_equals_loop(strategy, seed):
    prob, props, valid = _random_batch(seed)
    cfg = RefineConfig(strategy=strategy)
    out = refine(prob, props, valid, cfg)
    labels, weights, matched = loop_reference(prob, props, valid, cfg)
    assert torch.equal(out.labels, labels)
    assert torch.equal(out.matched, matched)
    torch.testing.assert_close(out.weights, weights, atol=1e-6, rtol=0)
    assert torch.equal(out.raw, (prob > 0.5).long())
    # bit-packed, as the loader sends them, one proposal at a time: the same
    packed = refine(prob, pack_bits(props), valid, cfg, chunk_bytes=1)
    for a, b in zip(packed, out, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("strategy", ["iom", "cpi", "none"])
@pytest.mark.parametrize("seed", range(3))
def test_chunked_refinement_equals_the_whole_batch_exactly(strategy, seed):
    """Chunks of 1, 4 and all proposals, packed or not, a width that is no multiple of 8."""
    prob, props, valid = _random_batch(200 + seed, b=3, n=17, h=12, w=20)
    cfg = RefineConfig(strategy=strategy)
    whole = refine(prob, props, valid, cfg, chunk_bytes=1 << 40)
    four = 4 * 3 * 12 * 20 * 6  # bytes of four packed proposals of every sample (6 a pixel)
    for chunk in (1, four, 1 << 40):
        for p in (props, pack_bits(props)):
            out = refine(prob, p, valid, cfg, chunk_bytes=chunk)
            for a, b in zip(out, whole, strict=True):
                assert torch.equal(a, b), (chunk, p.dtype)
    ov_whole = overlaps(prob > 0.5, props)
    ov_chunks = overlaps(prob > 0.5, pack_bits(props), chunk_bytes=1)
    for a, b in zip(ov_chunks, ov_whole, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("strategy", ["iom", "cpi"])
def test_thresholds_are_honoured_like_the_loop(strategy):
    for seed in range(4):
        prob, props, valid = _random_batch(100 + seed, b=3, n=20)
        for t in (0.3, 0.6, 0.9):
            cfg = RefineConfig(strategy=strategy, iou_thresh=t, inside_thresh=t, cover_thresh=t)
            labels, _, matched = loop_reference(prob, props, valid, cfg)
            out = refine(prob, props, valid, cfg)
            assert torch.equal(out.labels, labels) and torch.equal(out.matched, matched)


def _m(rows):
    return torch.tensor(rows, dtype=torch.bool)


C = [[0, 0, 0, 0], [0, 1, 1, 0], [0, 1, 1, 0], [0, 0, 0, 0]]
PROB = torch.where(_m(C), 0.9, 0.1)[None]


def test_iom_by_hand():
    a = _m([[0, 0, 0, 0], [0, 1, 1, 1], [0, 1, 1, 1], [0, 0, 0, 0]])  # IoU 4/6 = 0.667
    b = _m([[0, 0, 0, 0], [0, 1, 1, 0], [0, 1, 1, 0], [0, 1, 1, 0]])  # IoU 4/6 too: the first wins
    d = _m([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]])  # IoU 1/7
    props = torch.stack([d, a, b])[None]
    out = refine(PROB, props, torch.ones(1, 3, dtype=torch.bool), RefineConfig(strategy="iom"))
    assert out.matched.tolist() == [True]
    assert torch.equal(out.labels[0], a.long())
    assert torch.equal(out.weights, torch.ones(1, 4, 4))
    # above 0.667 nothing matches: the teacher's mask stays, with PWA weights
    out = refine(
        PROB, props, torch.ones(1, 3, dtype=torch.bool), RefineConfig(strategy="iom", iou_thresh=0.7)
    )
    assert out.matched.tolist() == [False] and torch.equal(out.labels[0], _m(C).long())
    torch.testing.assert_close(out.weights, pwa_weights(PROB))


def test_cpi_by_hand():
    part1 = _m([[0, 0, 0, 0], [0, 1, 0, 0], [0, 1, 0, 0], [0, 0, 0, 0]])  # inside c: |S n c|/|S| = 1
    part2 = _m([[0, 0, 0, 0], [0, 0, 1, 1], [0, 0, 0, 0], [0, 0, 0, 0]])  # half inside: 0.5, not > 0.7
    big = _m([[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 1], [0, 0, 0, 0]])  # covers 4/4 of c: 1 > 0.7
    valid = torch.ones(1, 3, dtype=torch.bool)
    out = refine(PROB, torch.stack([part1, part2, big])[None], valid, RefineConfig(strategy="cpi"))
    assert torch.equal(out.labels[0], (part1 | big).long())
    # without the big one: only the part inside c
    out = refine(
        PROB,
        torch.stack([part1, part2, big])[None],
        torch.tensor([[True, True, False]]),
        RefineConfig(strategy="cpi"),
    )
    assert torch.equal(out.labels[0], part1.long()) and out.matched.tolist() == [True]


def test_empty_teacher_mask_and_no_proposals():
    prob = torch.full((2, 4, 4), 0.2)
    props = torch.zeros(2, 0, 4, 4, dtype=torch.bool)
    out = refine(prob, props, torch.zeros(2, 0, dtype=torch.bool), RefineConfig(strategy="cpi"))
    assert not out.matched.any() and not out.labels.any()
    props = torch.ones(2, 1, 4, 4, dtype=torch.bool)
    for strategy in ("iom", "cpi"):
        out = refine(prob, props, torch.ones(2, 1, dtype=torch.bool), RefineConfig(strategy=strategy))
        assert not out.matched.any(), "an empty c matches nothing"


def test_pwa_weight_values():
    w = pwa_weights(torch.tensor([0.5, 0.0, 1.0]))
    assert w[0].item() == pytest.approx(0.038, abs=5e-4)
    assert w[1].item() == pytest.approx(0.939, abs=5e-4) and w[2].item() == pytest.approx(0.939, abs=5e-4)
    assert torch.all(pwa_weights(torch.linspace(0, 1, 101)) > 0)


def test_overlaps_are_exact_counts():
    props = torch.ones(1, 2, 300, 300, dtype=torch.bool)
    props[0, 1, :100] = False
    c = torch.zeros(1, 300, 300, dtype=torch.bool)
    c[0, :150] = True
    ov = overlaps(c, props)
    assert ov.inter.tolist() == [[45000.0, 15000.0]]
    assert ov.area.tolist() == [[90000.0, 60000.0]] and ov.c_area.tolist() == [45000.0]


@pytest.mark.parametrize("blocks", [2, 7, 60])
def test_overlaps_in_pixel_blocks_equal_one_product(blocks):
    """The GPU's blocked product (see pixel_blocks) gives the CPU's counts, exactly."""
    g = torch.Generator().manual_seed(blocks)
    props = torch.rand(3, 9, 30, 14, generator=g) > 0.6
    c = torch.rand(3, 30, 14, generator=g) > 0.4
    one, split = overlaps(c, props, blocks=1), overlaps(c, props, blocks=blocks)
    for a, b in zip(one, split, strict=True):
        assert torch.equal(a, b)


def test_gpu_pixel_blocks_divide_the_pixels():
    assert pixel_blocks(480 * 480, torch.device("cpu")) == 1
    assert pixel_blocks(480 * 480, torch.device("cuda")) == 64
    assert pixel_blocks(479 * 479, torch.device("cuda")) == 1
    assert pixel_blocks(64 * 64, torch.device("cuda")) == 64


def test_strategy_none_keeps_teacher_labels():
    prob, props, valid = _random_batch(0)
    out = refine(prob, props, valid, RefineConfig(strategy="none", pwa=False))
    assert torch.equal(out.labels, out.raw) and torch.equal(out.weights, torch.ones_like(prob))


def test_bad_config():
    with pytest.raises(ValueError, match="strategy"):
        RefineConfig(strategy="best")
