"""Datasets, the step sampler and augmentations, on a small synthetic dataset."""

from __future__ import annotations

import gzip
import json
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, default_collate

from semires.bits import pack_bits
from semires.blur import box_blur, gaussian_blur
from semires.data import (
    ColourJitter,
    Compose,
    ExpressionDataset,
    GaussianBlur,
    HorizontalFlip,
    ImageCache,
    Sample,
    StepSampler,
    View,
    make_loader,
    swap_left_right,
    to_unit,
)
from semires.errors import SemiresError
from semires.model.text import TextTokenizer
from semires.refer import read_refer
from semires.synth import SynthOptions, write_dataset
from semires.train import to_device


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("refer")
    write_dataset(root, SynthOptions(num_images=12, seed=3))
    anns = read_refer(root, "synthref", "unc")
    tok = TextTokenizer.build_wordpiece([s for r in anns.refs for s in r.sentences])
    return anns, root / "images" / "synthref", tok


def make(synth, refs=None, **kw) -> ExpressionDataset:
    anns, image_dir, tok = synth
    return ExpressionDataset(
        anns.refs if refs is None else refs, image_dir, tok, image_size=32, max_tokens=12, **kw
    )


def test_every_expression_is_an_item(synth):
    ds = make(synth)
    anns = synth[0]
    assert len(ds) == sum(len(r.sentences) for r in anns.refs)
    seen = {(ds[i].ref_id, ds[i].sent_id) for i in range(len(ds))}
    assert seen == {(r.ref_id, s) for r in anns.refs for s in r.sent_ids}


def test_sample_fields_and_collation(synth):
    ds = make(synth)
    s = ds[0]
    assert s.image.shape == (3, 32, 32) and s.image.dtype == torch.uint8  # pixels travel
    on_device = to_device(default_collate([s]), torch.device("cpu")).image[0]
    assert on_device.dtype == torch.float32 and torch.equal(on_device, s.image.float() / 255)
    assert torch.equal(ds.image(ds.refs[0]), on_device)  # [0, 1], not normalised: the model does that
    jittered = make(synth, transform=ColourJitter(0.4, 0.4, 0.4))[0]  # transforms work on [0, 1]
    assert jittered.image.dtype == torch.float32 and 0 <= jittered.image.min() <= jittered.image.max() <= 1
    assert s.mask.shape == (32, 32) and set(s.mask.unique().tolist()) <= {0, 1}
    assert s.input_ids.shape == s.attention_mask.shape == (12,)
    batch = next(iter(DataLoader(ds, batch_size=3)))
    assert isinstance(batch, Sample) and batch.image.shape == (3, 3, 32, 32) and len(batch.sentence) == 3


def test_mask_is_resized_as_pils_nearest_from_the_ref(synth):
    from PIL import Image

    ds = make(synth)
    ref = ds.refs[0]
    full = ref.decode_mask()
    want = np.asarray(Image.fromarray(full.view(np.uint8)).resize((32, 32), Image.NEAREST))
    assert torch.equal(ds[0].mask, torch.from_numpy(want.astype(np.int64)))
    assert torch.equal(ds.full_mask(0), torch.from_numpy(full))


def test_step_sampler_is_a_function_of_seed_and_step(synth):
    ds = make(synth)
    a = list(StepSampler(ds, batch_size=4, total_steps=10, seed=1))
    b = list(StepSampler(ds, batch_size=4, total_steps=10, seed=1, start_step=6))
    assert a[24:] == b  # resuming at step 6 yields the same keys as the uninterrupted run
    assert a != list(StepSampler(ds, batch_size=4, total_steps=10, seed=2))


def test_step_sampler_covers_every_ref_each_epoch_and_splits_ranks(synth):
    ds = make(synth)
    n = len(ds.refs)
    keys = list(StepSampler(ds, batch_size=n, total_steps=1, seed=0))
    assert sorted(ds.pairs[k][0] for k, _ in keys) == list(range(n))
    r0 = list(StepSampler(ds, batch_size=2, total_steps=3, seed=0, rank=0, world_size=2))
    r1 = list(StepSampler(ds, batch_size=2, total_steps=3, seed=0, rank=1, world_size=2))
    both = list(StepSampler(ds, batch_size=4, total_steps=3, seed=0))
    for step in range(3):
        assert r0[2 * step : 2 * step + 2] + r1[2 * step : 2 * step + 2] == both[4 * step : 4 * step + 4]


def test_sampler_draws_different_sentences_of_a_ref(synth):
    ds = make(synth)
    multi = [i for i, r in enumerate(ds.refs) if len(r.sentences) > 1]
    assert multi
    keys = list(StepSampler(ds, batch_size=len(ds.refs), total_steps=40, seed=0))
    sents = {ds.pairs[k][1] for k, _ in keys if ds.pairs[k][0] == multi[0]}
    assert len(sents) > 1


def test_no_labeled_refs_is_a_clear_error(synth):
    ds = make(synth, refs=[])
    with pytest.raises(SemiresError, match="no labeled refs"):
        StepSampler(ds, batch_size=2, total_steps=2, seed=0)


@pytest.mark.parametrize(
    ("sentence", "flipped"),
    [
        ("Left guy", "Right guy"),
        ("guy on the left.", "guy on the right."),
        ("far left, kid", "far right, kid"),
        ("LEFTMOST zebra", "RIGHTMOST zebra"),
        ("left-most  bowl;right-most cup", "right-most  bowl;left-most cup"),
        ("bottomright corner, farleft guy", "bottomleft corner, farright guy"),
        ("bright shirt on the right", "bright shirt on the left"),  # bright is no side
        ("upright piano leftover cake left", "upright piano leftover cake right"),
    ],
)
def test_flip_rewrites_sides_in_real_sentences(sentence, flipped):
    assert swap_left_right(sentence) == flipped and swap_left_right(flipped) == sentence


def test_flip_on_every_sentence_of_the_refcoco_split_file():
    """Every distinct sentence of the SemiRES RefCOCO 1 % file: flipping twice gives it back,
    and no side survives a flip: each word's "left"s become "right"s and back, but for the
    two words of the file where the letters mean no side."""
    path = Path(__file__).parent / "data" / "refcoco_1pct_sentences.json.gz"
    sentences = json.loads(gzip.decompress(path.read_bytes()))["sentences"]
    assert len(sentences) == 15222
    sided = 0
    for s in sentences:
        f = swap_left_right(s)
        assert swap_left_right(f) == s, s
        words, flipped = re.findall(r"[A-Za-z]+|[^A-Za-z]+", s), re.findall(r"[A-Za-z]+|[^A-Za-z]+", f)
        assert len(words) == len(flipped), s
        for w, v in zip(words, flipped, strict=True):
            lw, lv = w.lower(), v.lower()
            if lw in ("bright", "upright") or ("left" not in lw and "right" not in lw):
                assert v == w, (s, w)
            else:
                assert lv == "".join(
                    {"left": "right", "right": "left"}.get(p, p) for p in re.split(r"(left|right)", lw)
                )
                sided += 1
    assert sided > 6000  # about half the sentences name a side


def test_flip_swaps_left_and_right_and_moves_masks_with_the_image():
    assert swap_left_right("the shape left of the leftmost circle on the right") == (
        "the shape right of the rightmost circle on the left"
    )
    img = torch.rand(3, 4, 5)
    props = torch.rand(2, 4, 5) > 0.5
    view = View(img, {"gt": torch.eye(4, 5)}, "the left square", packed={"proposals": pack_bits(props)})
    out = HorizontalFlip(p=1.0)(view, torch.Generator().manual_seed(0))
    assert torch.equal(out.image, img.flip(-1)) and out.sentence == "the right square"
    assert all(torch.equal(out.masks[k], view.masks[k].flip(-1)) for k in view.masks)
    assert torch.equal(out.packed["proposals"], pack_bits(props.flip(-1)))


def test_augmentation_is_seeded_by_the_sampler_key(synth):
    ds = make(synth, transform=Compose([HorizontalFlip(0.5), ColourJitter(0.4, 0.4, 0.4)]))
    a, b = ds[(0, 123)], ds[(0, 123)]
    assert torch.equal(a.image, b.image) and a.sentence == b.sentence
    images = {tuple(ds[(0, s)].image.flatten()[:5].tolist()) for s in range(5)}
    assert len(images) > 1


def test_missing_image_names_the_file(synth, tmp_path):
    anns, _, tok = synth
    ds = ExpressionDataset(anns.refs, tmp_path, tok, image_size=32, max_tokens=12)
    with pytest.raises(SemiresError, match=r"image not found; check dataset.image_dir"):
        ds[0]


def test_image_cache_keeps_at_most_its_budget_least_recently_used_out():
    cache = ImageCache(max_bytes=3000)
    images = {i: torch.full((10, 10, 10), i, dtype=torch.uint8).numpy() for i in range(5)}  # 1000 B
    for i in range(3):
        cache.put(i, images[i])
    cache.get(0)  # 0 is now the most recent, 1 the least
    cache.put(3, images[3])
    assert cache.get(1) is None and cache.get(0) is not None and cache.bytes == 3000 and len(cache) == 3
    cache.put(9, torch.zeros(40, 40, 3, dtype=torch.uint8).numpy())  # larger than the budget
    assert cache.get(9) is None and cache.bytes <= 3000
    assert ImageCache(0).get(0) is None


def test_items_are_the_same_with_or_without_the_image_cache(synth):
    plain, cached = make(synth), make(synth, cache_mb=0.05)  # room for a few small images
    for i in range(len(plain)):
        a, b = plain[i], cached[i]
        assert torch.equal(a.image, b.image) and torch.equal(a.mask, b.mask)
    assert 0 < cached.cache.bytes <= 0.05 * 2**20 and len(plain.cache) == 0


def test_loader_workers_give_the_batches_of_the_main_process(synth):
    ds = make(synth, transform=Compose([HorizontalFlip(0.5), ColourJitter(0.4, 0.4, 0.4)]))

    def batches(workers):
        sampler = StepSampler(ds, batch_size=3, total_steps=4, seed=7)
        loader = make_loader(
            ds, batch_size=3, sampler=sampler, device=torch.device("cpu"), num_workers=workers
        )
        return list(loader)

    for a, b in zip(batches(0), batches(2), strict=True):
        assert torch.equal(a.image, b.image) and torch.equal(a.mask, b.mask) and a.sentence == b.sentence


def _rgb_view(seed: int, h: int = 21, w: int = 27) -> View:
    rgb = torch.randint(0, 256, (3, h, w), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    return View(image=rgb.float() / 255)


@pytest.mark.parametrize("sigma", [(1.0, 1.0), (0.1, 2.0)])
def test_blur_is_pils_gaussian_blur_of_the_uint8_image(sigma):
    from PIL import Image, ImageFilter

    view = _rgb_view(1)
    for seed in range(4):
        out = GaussianBlur(p=1.0, sigma=sigma)(view, torch.Generator().manual_seed(seed))
        draws = torch.rand(2, generator=torch.Generator().manual_seed(seed))  # p, then the radius
        radius = sigma[0] + (sigma[1] - sigma[0]) * draws[1].item()
        pixels = (view.image * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        want = np.array(Image.fromarray(pixels).filter(ImageFilter.GaussianBlur(radius=radius)))
        assert torch.equal(out.image, torch.from_numpy(want).permute(2, 0, 1).float() / 255)
    assert GaussianBlur(0.0, (1.0, 1.0))(view, torch.Generator().manual_seed(0)) is view


def test_blur_of_uint8_pixels_stays_uint8_and_equals_the_blur_of_their_unit_image():
    view = _rgb_view(2)
    pixels = View(image=(view.image * 255).round().to(torch.uint8))
    for seed in range(3):
        a = GaussianBlur(1.0, (0.1, 2.0))(pixels, torch.Generator().manual_seed(seed)).image
        b = GaussianBlur(1.0, (0.1, 2.0))(view, torch.Generator().manual_seed(seed)).image
        assert a.dtype == torch.uint8 and a.shape == pixels.image.shape
        assert torch.equal(to_unit(a), b)


@pytest.mark.parametrize("hw", [(48, 64), (7, 5), (1, 9), (3, 2)])
def test_box_blur_gives_pils_gaussian_blur_pixel_for_pixel(hw):
    """The torch blur (what the training device runs) against the library, radii from none
    to wider than the image (every edge case of PIL's box passes)."""
    from PIL import Image, ImageFilter

    rng = np.random.default_rng(hw[0])
    for sigma in [1.0, 0.1, 0.5, 0.77, 1.3, 2.0, 3.3, 7.5, 50.0, *rng.uniform(0.1, 2.0, 6)]:
        pixels = rng.integers(0, 256, (*hw, 3), dtype=np.uint8)
        want = np.array(Image.fromarray(pixels).filter(ImageFilter.GaussianBlur(radius=float(sigma))))
        tensor = torch.from_numpy(pixels).permute(2, 0, 1)
        assert torch.equal(box_blur(tensor, sigma), torch.from_numpy(want).permute(2, 0, 1)), sigma
        assert torch.equal(gaussian_blur(tensor, sigma), box_blur(tensor, sigma))
    with pytest.raises(TypeError, match="uint8"):
        gaussian_blur(torch.zeros(3, 4, 4), 1.0)


def test_a_deferred_blur_records_its_radius_and_leaves_the_pixels():
    view = View(image=(_rgb_view(4).image * 255).round().to(torch.uint8), defer_blur=True)
    blur = GaussianBlur(1.0, (0.1, 2.0))
    deferred = blur(view, torch.Generator().manual_seed(3))
    done = blur(replace(view, defer_blur=False), torch.Generator().manual_seed(3))
    assert deferred.image is view.image and 0.1 <= deferred.blur <= 2.0
    assert torch.equal(gaussian_blur(view.image, deferred.blur), done.image)


def test_jitter_codes_make_the_jittered_images_a_loader_made_before():
    """A loader ships ``code`` (9 numbers) instead of the strong view; ``apply_codes`` on the
    batch, where the model runs, gives what jittering each image in the loader gave."""
    jit = ColourJitter(0.25, 0.25, 0.25, 0.25, p=0.5, random_order=True)
    images = torch.stack([_rgb_view(s).image for s in range(6)])
    codes = torch.stack([jit.code(torch.Generator().manual_seed(s)) for s in range(6)])
    assert codes.dtype == torch.float64 and codes.shape == (6, 9)
    assert 0 < int(codes[:, 0].sum()) < 6  # some jittered, some not (p=0.5)
    got = ColourJitter.apply_codes(images, codes)
    for s in range(6):
        want = jit(View(image=images[s]), torch.Generator().manual_seed(s)).image
        assert torch.equal(got[s], want)
    assert not codes[:, 0].any() or not torch.equal(got, images)
    none = torch.zeros(6, 9, dtype=torch.float64)  # no jitter: the images themselves
    assert ColourJitter.apply_codes(images, none) is images


def test_blur_and_jitter_apply_with_their_probability():
    view = _rgb_view(0)
    blurred = sum(
        GaussianBlur(0.5, (1.0, 1.0))(view, torch.Generator().manual_seed(s)) is not view for s in range(200)
    )
    jittered = sum(
        ColourJitter(0.4, 0.4, 0.4, p=0.5).draw(torch.Generator().manual_seed(s)) is not None
        for s in range(200)
    )
    assert 70 < blurred < 130 and 70 < jittered < 130
    assert all(
        ColourJitter(0.4, 0.4, 0.4).draw(torch.Generator().manual_seed(s)) is not None for s in range(50)
    )


def test_jitter_draws_torchvisions_ranges_and_order():
    jit = ColourJitter(0.25, 0.25, 0.25, 0.25, random_order=True)
    orders = set()
    for s in range(300):
        order, f = jit.draw(torch.Generator().manual_seed(s))
        orders.add(tuple(order))
        assert sorted(order) == [0, 1, 2, 3]
        assert all(0.75 <= x <= 1.25 for x in f[:3]) and -0.25 <= f[3] <= 0.25
    assert len(orders) == 24  # every order of the four adjustments
    fixed = ColourJitter(0.25, 0.25, 0.25, 0.25)
    assert {tuple(fixed.draw(torch.Generator().manual_seed(s))[0]) for s in range(20)} == {(0, 1, 2, 3)}


def test_jitter_applies_the_adjustments_as_torchvisions_color_jitter():
    """A transcription of torchvision's ColorJitter.forward, given its drawn order and factors."""
    from torchvision.transforms import functional as TF1

    img = _rgb_view(3).image
    for order, f in (([2, 0, 3, 1], [0.8, 1.2, 0.9, 0.1]), ([0, 1, 2, 3], [1.1, 0.76, 1.24, -0.2])):
        want = img
        for fn_id in order:
            if fn_id == 0:
                want = TF1.adjust_brightness(want, f[0])
            elif fn_id == 1:
                want = TF1.adjust_contrast(want, f[1])
            elif fn_id == 2:
                want = TF1.adjust_saturation(want, f[2])
            else:
                want = TF1.adjust_hue(want, f[3])
        torch.testing.assert_close(ColourJitter.apply(img, order, f), want)
