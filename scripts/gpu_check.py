"""Every GPU check and benchmark of the project in one call, within a time budget.

    python scripts/gpu_check.py [--device cuda] [--budget-s 420] [--out gpu.json] [--tiny]

Three sections, each against the public SemiRES code's way of doing the same work:

1. refinement (``semires.refine.refine``, IOM and CPI with PWA) on a batch of 8 teacher
   masks with 100 proposals each at 480 x 480, bit-packed as the loader sends them, against
   the per-mask Python loop on the unpacked masks: outputs must be identical, and on CUDA
   the batched path runs under
   ``torch.cuda.set_sync_debug_mode("error")`` (any host sync is a failure);
2. SAM proposals: a randomly initialised ViT-H ``SamAutomaticMaskGenerator`` (library
   defaults) on synthetic 640 x 480 images through our one-call-per-image path (the ``sam``
   backend's call, cap, packing and scratch file), beside the public way: SAM once per
   referred object (2.5 calls per image, as RefCOCO) and one JSON of run-length lists per
   object. Also the library's GPU setting: ``proposals.precision: bf16`` (image encoder and
   mask decoder under bf16 autocast; CUDA only here) with a larger ``points_per_batch``;
3. the teacher-student step (``semires.semi.semi_step``) of the ``paper`` LAVT (Swin-B,
   480 x 480, a random BERT-base) on 8 labeled + 8 unlabeled samples with 100 proposals
   each: samples/s and model FLOP utilisation, beside a step written the public way (fp32,
   ``gc.collect()`` and ``torch.cuda.empty_cache()`` every step, the per-mask loop). A step
   that runs out of GPU memory is measured again at half the batch (reported; the ratio is
   per sample). On CUDA the implicit host syncs of one ``semi_step`` are counted (for
   information).

Each section gets a share of ``--budget-s`` (model builds included) and stops early,
reporting how many iterations it ran; ``--sections`` runs a subset. ``--tiny`` shrinks
everything to CPU sizes (the tiny LAVT at 64 px, the tiny SAM, a few images and proposals)
so the test suite runs every path except the CUDA-only ones. The last lines printed are a
markdown table; ``--out`` also writes every figure as JSON. Exit status: 0 (targets missed
or not), 1 when a correctness check fails (outputs differ, a host sync was detected, a
non-finite loss), 2 when a section raised.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the repository is copied, not installed, on the GPU machine
    sys.path.insert(0, str(ROOT))

# Dense bf16 tensor-core peak (FLOP/s) by device name, for model FLOP utilisation.
PEAK_BF16 = {"H100": 989e12, "H200": 989e12}
# Share of the budget each section may use (model builds included); unused time rolls over.
SHARES = {"refine": 0.10, "sam": 0.50, "train": 0.40}
TARGETS = {"refine_speedup": 20.0, "sam_images_per_s": 5.0, "train_speedup": 3.0}


@dataclasses.dataclass(frozen=True)
class Sizes:
    refine_batch: int = 8
    refine_masks: int = 100
    refine_size: int = 480
    refine_iters: int = 50  # at most, batched; the loop gets a fifth
    sam_model: str = "vit_h"
    sam_image_hw: tuple[int, int] = (480, 640)
    sam_images: int = 300  # at most, for ours and for the variant
    sam_public_images: int = 100  # at most
    sam_points_per_side: int | None = None  # None: the library default
    sam_loose: bool = False  # thresholds at 0, so that junk masks pass (tiny: exercise every path)
    variant_points_per_batch: int = 256
    model_preset: str = "paper"
    labeled: int = 8
    unlabeled: int = 8
    step_masks: int = 100
    steps: int = 30  # at most, ours; the public-style step gets half
    step_warmup: int = 2  # untimed steps before ours; the public-style step gets one fewer

    @classmethod
    def tiny(cls) -> Sizes:
        return cls(
            refine_batch=3,
            refine_masks=12,
            refine_size=32,
            refine_iters=5,
            sam_model="tiny",
            sam_image_hw=(48, 64),
            sam_images=3,
            sam_public_images=2,
            sam_points_per_side=4,
            sam_loose=True,
            variant_points_per_batch=8,
            model_preset="tiny",
            labeled=2,
            unlabeled=2,
            step_masks=6,
            steps=1,
            step_warmup=1,
        )


def sibling(name: str):
    """Another script of this folder as a module (by path: ``scripts`` is no package)."""
    import importlib.util

    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(f"{name}.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def log(section: str, msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {section}: {msg}", flush=True)


# --- timing --------------------------------------------------------------------------------


class Clock:
    """Per-iteration timing: CUDA events on a GPU (each iteration waited for), else wall time."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def once(self, fn: Callable[[], Any]) -> float:
        """Seconds of one call of ``fn``, its device work included."""
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t

    def repeat(self, fn: Callable[[], Any], *, warmup: int, max_iters: int, deadline: float) -> list[float]:
        """Per-call seconds: ``warmup`` untimed calls, then at least one and up to ``max_iters``
        timed ones while time is left before ``deadline`` (a ``perf_counter`` value)."""
        for _ in range(warmup):
            fn()
        self.sync()
        times: list[float] = []
        while not times or (len(times) < max_iters and time.perf_counter() < deadline):
            times.append(self.once(fn))
        return times


# --- 1. refinement -------------------------------------------------------------------------


def loop_refine(prob: torch.Tensor, proposals: torch.Tensor, valid: torch.Tensor, cfg) -> tuple:
    """The public training code's refinement: one sample and one proposal at a time, each
    decision a Python ``if`` on a device value (a host sync per proposal on a GPU).

    Returns ``(labels, weights, matched)`` as :class:`semires.refine.Refined` holds them.
    """
    c = (prob > 0.5).long()
    labels = torch.zeros_like(c)
    matched = torch.zeros(prob.shape[0], dtype=torch.bool, device=prob.device)
    for b in range(prob.shape[0]):
        hit, top, best = False, 0.0, None
        for s in proposals[b][valid[b]].long():
            inter = (s * c[b]).sum()
            if cfg.strategy == "iom":
                union = (s + c[b] - s * c[b]).sum()
                iou = inter / union if union > 0 else 0.0
                if iou > cfg.iou_thresh and iou > top:
                    top, best = iou, s
            elif cfg.strategy == "cpi":
                area = s.sum()
                inside = inter / area if area > 0 else 0.0
                if inter / (c[b].sum() + 1e-9) > cfg.cover_thresh or inside > cfg.inside_thresh:
                    labels[b][s.bool()] = 1
                    hit = True
        if best is not None:
            labels[b][best.bool()] = 1
            hit = True
        if hit:
            matched[b] = True
        else:
            labels[b] = c[b]
    if cfg.pwa:
        sigma = cfg.pwa_var
        w = cfg.pwa_offset - (1 / (math.sqrt(2 * math.pi) * math.sqrt(sigma))) * torch.exp(
            -((prob.float() - cfg.pwa_mean) ** 2) / (2 * sigma)
        )
        weights = torch.where(matched[:, None, None], torch.ones_like(w), w)
    else:
        weights = torch.ones_like(prob, dtype=torch.float32)
    return labels, weights, matched


def blobs(shape: tuple[int, ...], size: int, device: torch.device, gen: torch.Generator) -> torch.Tensor:
    """Smooth random fields in [0, 1] of ``shape + (size, size)``: low-res noise, upsampled."""
    low = torch.rand(*shape, 6, 6, generator=gen).to(device)
    flat = low.reshape(-1, 1, 6, 6)
    up = torch.nn.functional.interpolate(flat, size=(size, size), mode="bilinear", align_corners=False)
    return up.reshape(*shape, size, size)


def refine_inputs(b: int, n: int, size: int, device: torch.device, seed: int = 0):
    """Teacher probabilities, proposals (one exact match in sample 0, a part of the mask in
    sample 1, an empty one) and validity (the last sample padded) for ``refine``."""
    gen = torch.Generator().manual_seed(seed)
    prob = blobs((b,), size, device, gen)
    props = blobs((b, n), size, device, gen) > 0.55
    props[0, 1] = prob[0] > 0.5
    props[min(1, b - 1), 2] = prob[min(1, b - 1)] > 0.7
    props[:, 3] = False
    valid = torch.ones(b, n, dtype=torch.bool, device=device)
    valid[-1, n - n // 4 :] = False
    return prob, props, valid


def section_refine(sizes: Sizes, device: torch.device, deadline: float) -> dict[str, Any]:
    from semires.bits import pack_bits
    from semires.refine import RefineConfig, refine

    b, n, s = sizes.refine_batch, sizes.refine_masks, sizes.refine_size
    prob, props, valid = refine_inputs(b, n, s, device)
    packed = pack_bits(props)  # as the data loader sends them
    clock = Clock(device)
    out: dict[str, Any] = {"batch": b, "masks": n, "size": s, "strategies": {}}
    strategies = ("iom", "cpi")
    for k, strategy in enumerate(strategies):
        cfg = RefineConfig(strategy=strategy, pwa=True)
        got = refine(prob, packed, valid, cfg)
        labels, weights, matched = loop_refine(prob, props, valid, cfg)
        identical = bool(
            torch.equal(got.labels, labels)
            and torch.equal(got.matched, matched)
            and torch.allclose(got.weights, weights, rtol=0, atol=1e-6)
        )
        no_sync: bool | None = None
        sync_error = ""
        if device.type == "cuda":
            torch.cuda.synchronize()
            try:
                torch.cuda.set_sync_debug_mode("error")  # any implicit host sync raises
                refine(prob, packed, valid, cfg)
                no_sync = True
            except RuntimeError as e:
                no_sync, sync_error = False, str(e).splitlines()[0][:200]
            finally:
                torch.cuda.set_sync_debug_mode(0)
        left = deadline - time.perf_counter()
        share = left / (len(strategies) - k)
        fast = clock.repeat(
            lambda cfg=cfg: refine(prob, packed, valid, cfg),
            warmup=3,
            max_iters=sizes.refine_iters,
            deadline=time.perf_counter() + share * 0.3,
        )
        slow = clock.repeat(
            lambda cfg=cfg: loop_refine(prob, props, valid, cfg),
            warmup=1,
            max_iters=max(1, sizes.refine_iters // 5),
            deadline=time.perf_counter() + share * 0.6,
        )
        ours_ms, loop_ms = statistics.median(fast) * 1e3, statistics.median(slow) * 1e3
        row = {
            "identical": identical,
            "no_host_sync": no_sync,
            "sync_error": sync_error,
            "matched": int(got.matched.sum()),
            "batched_ms": ours_ms,
            "loop_ms": loop_ms,
            "speedup": loop_ms / ours_ms,
            "iters_batched": len(fast),
            "iters_loop": len(slow),
        }
        out["strategies"][strategy] = row
        log(
            "refine",
            f"{strategy}: batched {ours_ms:.3f} ms ({len(fast)} iters), loop {loop_ms:.1f} ms "
            f"({len(slow)} iters), {loop_ms / ours_ms:.1f}x, identical {identical}, no host sync {no_sync}, "
            f"{row['matched']}/{b} matched",
        )
    return out


# --- 2. SAM proposals ----------------------------------------------------------------------


def synthetic_images(count: int, hw: tuple[int, int], seed: int = 0) -> list[np.ndarray]:
    """``count`` distinct ``H x W x 3`` uint8 RGB images: a smooth background, a few
    coloured ellipses and rectangles, a little noise."""
    h, w = hw
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    out = []
    for _ in range(count):
        a, b = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
        t = (xx / w * rng.uniform(0.2, 1) + yy / h * rng.uniform(0.2, 1))[..., None] / 2
        img = a * (1 - t) + b * t
        for k in range(int(rng.integers(3, 8))):
            cy, cx = rng.uniform(0, h), rng.uniform(0, w)
            ry, rx = rng.uniform(h / 20, h / 4), rng.uniform(w / 20, w / 4)
            if k % 2:
                inside = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1
            else:
                inside = (abs(yy - cy) < ry) & (abs(xx - cx) < rx)
            img[inside] = rng.uniform(0, 255, 3)
        img += rng.normal(0, 4, img.shape)
        out.append(np.clip(img, 0, 255).astype(np.uint8))
    return out


def build_sam(model_type: str, device: torch.device) -> torch.nn.Module:
    """A randomly initialised SAM of ``model_type`` from the project's registry, made on
    ``device`` (initialising ViT-H's 636 M parameters on the host would take a while)."""
    from semires.proposals.sam import registry

    build = registry()[model_type]
    try:
        with torch.device(device):
            model = build(checkpoint=None)
    except Exception as e:  # some module would not build there: build on the host instead
        log("sam", f"building on {device} failed ({type(e).__name__}: {e}); building on the host")
        model = build(checkpoint=None)
    return model.to(device).eval()


def sam_backend(model: torch.nn.Module, settings):
    """The ``sam`` backend's per-image path (``AutomaticMaskBackend.__call__``) over a model in
    memory: ``SamBackend`` itself reads weights from a checkpoint file, which a random ViT-H
    does not have (writing and hashing 2.5 GB would eat the budget)."""
    from segment_anything import SamAutomaticMaskGenerator

    from semires.proposals.sam import AutomaticMaskBackend

    backend = AutomaticMaskBackend()
    backend.generator = SamAutomaticMaskGenerator(
        model, output_mode="binary_mask", **dataclasses.asdict(settings)
    )
    backend.calls = 0
    return backend


def bf16_image_encoder(model: torch.nn.Module) -> Callable[[], None]:
    """``proposals.precision: bf16`` on a model in memory: the library's own switch
    (image encoder and mask decoder under bf16 autocast, outputs back in float32).
    Returns the undo."""
    from semires.proposals.sam import _BF16_MODULES, run_in_bf16

    device_type = next(model.parameters()).device.type
    mods = [getattr(model, n) for n in _BF16_MODULES if isinstance(getattr(model, n, None), torch.nn.Module)]
    for m in mods:
        run_in_bf16(m, device_type)
    return lambda: [vars(m).pop("forward", None) for m in mods]


def section_sam(sizes: Sizes, device: torch.device, deadline: float) -> dict[str, Any]:
    from semires.proposals.base import cap
    from semires.proposals.sam import SamSettings
    from semires.proposals.store import ImageResult, Scratch

    runs_encode = sibling("bench_proposals").runs_encode  # the public code's per-object format
    max_masks = 256  # proposals.max_masks
    settings = SamSettings()
    if sizes.sam_points_per_side is not None:
        settings = dataclasses.replace(settings, points_per_side=sizes.sam_points_per_side)
    if sizes.sam_loose:
        settings = dataclasses.replace(settings, pred_iou_thresh=0.0, stability_score_thresh=0.0)
    t = time.perf_counter()
    model = build_sam(sizes.sam_model, device)
    build_s = time.perf_counter() - t
    params = sum(p.numel() for p in model.parameters())
    log("sam", f"random {sizes.sam_model} ({params / 1e6:.1f} M params) built on {device} in {build_s:.1f} s")
    pool = synthetic_images(16, sizes.sam_image_hw)
    clock = Clock(device)
    out: dict[str, Any] = {
        "model": sizes.sam_model,
        "params": params,
        "build_s": build_s,
        "image_hw": list(sizes.sam_image_hw),
        "settings": dataclasses.asdict(settings),
        "weights": "random (masks are junk; timing only)",
    }

    def run_ours(name: str, backend, limit: int, until: float, tmp: Path) -> dict[str, Any]:
        scratch = Scratch(tmp / name)
        found: list[int] = []

        def one(i: int) -> None:
            image = pool[i % len(pool)]
            props = backend(image)
            found.append(len(props))
            scratch.save(i, ImageResult.from_proposals(cap(props, max_masks), len(props), ""))

        one(0)  # warm-up: kernels, allocator, autotuning
        clock.sync()
        found.clear()
        backend.calls = 0
        start, done, last = time.perf_counter(), 0, time.perf_counter()
        while done == 0 or (done < limit and time.perf_counter() < until):
            one(done)
            done += 1
            if time.perf_counter() - last > 10:
                last = time.perf_counter()
                log("sam", f"{name}: {done} images, {done / (last - start):.2f} images/s")
        clock.sync()
        seconds = time.perf_counter() - start
        row = {
            "images": done,
            "seconds": seconds,
            "images_per_s": done / seconds,
            "calls_per_image": backend.calls / done,
            "masks_per_image": float(np.mean(found)),
        }
        log(
            "sam",
            f"{name}: {done} images in {seconds:.1f} s = {row['images_per_s']:.2f} images/s, "
            f"{row['masks_per_image']:.1f} masks/image",
        )
        return row

    def run_public(generator, limit: int, until: float, tmp: Path) -> dict[str, Any]:
        folder = tmp / "public"
        folder.mkdir()
        calls: list[int] = []

        def one(i: int) -> None:
            image = pool[i % len(pool)]
            objects = 2 + i % 2  # RefCOCO: about 2.5 referred objects per image
            for obj in range(objects):
                records = generator.generate(image)
                rles = [runs_encode(np.asarray(r["segmentation"], bool)) for r in records]
                (folder / f"{i}_{obj}.json").write_text(json.dumps(rles))
            calls.append(objects)

        one(0)
        clock.sync()
        calls.clear()
        start, done, last = time.perf_counter(), 0, time.perf_counter()
        while done == 0 or (done < limit and time.perf_counter() < until):
            one(done)  # images in pairs: 2 then 3 objects
            one(done + 1)
            done += 2
            if time.perf_counter() - last > 10:
                last = time.perf_counter()
                log("sam", f"public-style: {done} images, {done / (last - start):.2f} images/s")
        clock.sync()
        seconds = time.perf_counter() - start
        row = {
            "images": done,
            "seconds": seconds,
            "images_per_s": done / seconds,
            "calls_per_image": sum(calls) / done,
            "json_files": sum(calls),
        }
        log(
            "sam",
            f"public-style: {done} images ({sum(calls)} SAM calls, {row['calls_per_image']:.2f}/image) in "
            f"{seconds:.1f} s = {row['images_per_s']:.2f} images/s",
        )
        return row

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        left = deadline - time.perf_counter()
        now = time.perf_counter()
        backend = sam_backend(model, settings)
        out["ours"] = run_ours("ours", backend, sizes.sam_images, now + 0.40 * left, tmp)

        # proposals.precision bf16 and a larger points_per_batch: the settings for a GPU.
        bf16 = device.type == "cuda"
        vsettings = dataclasses.replace(settings, points_per_batch=sizes.variant_points_per_batch)
        vbackend = sam_backend(model, vsettings)
        rel_err = None
        undo = lambda: None  # noqa: E731
        try:
            if bf16:  # how far the bf16 image embedding is from the float32 one
                predictor = vbackend.generator.predictor
                predictor.set_image(pool[0])
                ref = predictor.features.float()
                undo = bf16_image_encoder(model)
                predictor.set_image(pool[0])
                rel_err = float((predictor.features.float() - ref).norm() / ref.norm())
                predictor.reset_image()
                del ref
            left = deadline - time.perf_counter()
            row = run_ours("ours-variant", vbackend, sizes.sam_images, time.perf_counter() + 0.35 * left, tmp)
        finally:
            undo()
        row.update(
            bf16_image_encoder=bf16,
            points_per_batch=sizes.variant_points_per_batch,
            embedding_rel_err=rel_err,
        )
        out["variant"] = row
        if rel_err is not None:
            log("sam", f"variant: bf16 image embedding within {rel_err:.2e} (relative L2) of float32")
        out["public"] = run_public(backend.generator, sizes.sam_public_images, deadline, tmp)
    out["speedup"] = out["ours"]["images_per_s"] / out["public"]["images_per_s"]
    out["variant_speedup"] = out["variant"]["images_per_s"] / out["public"]["images_per_s"]
    return out


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# --- 3. training step ----------------------------------------------------------------------

WORDS = {
    "colour": ["red", "blue", "green", "yellow", "white", "black", "brown", "grey", "orange", "pink"],
    "thing": ["man", "woman", "dog", "cat", "car", "chair", "table", "bowl", "shirt", "umbrella", "horse"],
    "where": ["left", "right", "middle", "front", "back", "top", "bottom", "corner", "far", "near"],
}


def corpus(n: int = 400, seed: int = 0) -> list[str]:
    """Referring-expression-like sentences for a WordPiece vocabulary and for token ids."""
    rng = np.random.default_rng(seed)

    def pick(kind: str) -> str:
        return WORDS[kind][int(rng.integers(len(WORDS[kind])))]

    forms = [
        lambda: f"the {pick('colour')} {pick('thing')} on the {pick('where')}",
        lambda: f"{pick('thing')} {pick('where')} of the {pick('colour')} {pick('thing')}",
        lambda: f"{pick('where')} {pick('thing')} wearing {pick('colour')}",
        lambda: f"a {pick('colour')} {pick('thing')} next to the {pick('thing')} in the {pick('where')}",
    ]
    return [forms[int(rng.integers(len(forms)))]() for _ in range(n)]


def build_lavt(preset_name: str, device: torch.device):
    """``(spec, model)``: the preset with random weights; ``paper`` gets a random BERT-base
    (BERT-base's 30,522-token embedding; token ids from a WordPiece vocabulary of the corpus)."""
    from semires.model.build import PRESETS, ModelSpec, TextConfig, build_from_spec, small_bert_config
    from semires.model.text import TextTokenizer

    cfg = PRESETS[preset_name]
    bert_base = cfg.text is None  # BERT would come from a directory: make a random BERT-base
    if bert_base:
        base = TextConfig(
            hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072, vocab_size=30522
        )
        cfg = dataclasses.replace(cfg, text=base, pretrained=False)
    tokenizer = TextTokenizer.build_wordpiece(corpus(), cfg.text.vocab_size)
    vocab = cfg.text.vocab_size if bert_base else tokenizer.vocab_size
    spec = ModelSpec(cfg, small_bert_config(cfg, vocab).to_json_string(), tokenizer.to_str())
    return spec, build_from_spec(spec).to(device)


def step_inputs(spec, sizes: Sizes, device: torch.device, seed: int = 0):
    """A labeled batch and an unlabeled batch as plain tensors on ``device``."""
    from semires.bits import pack_bits
    from semires.data import Sample
    from semires.semi import UnlabeledSample

    gen = torch.Generator().manual_seed(seed)
    s, t = spec.config.image_size, spec.config.max_tokens
    tok = spec.make_tokenizer()
    sentences = corpus(sizes.labeled + sizes.unlabeled, seed=seed + 1)
    ids, att = tok.encode(sentences, t)
    nl, nu = sizes.labeled, sizes.unlabeled

    def meta(n: int, off: int) -> dict[str, Any]:
        r = torch.arange(off, off + n)
        return {"index": r, "ref_id": r, "sent_id": r, "image_id": r, "sentence": sentences[off : off + n]}

    lab = Sample(
        image=torch.rand(nl, 3, s, s, generator=gen).to(device),
        mask=(blobs((nl,), s, device, gen) > 0.6).long(),
        input_ids=ids[:nl].to(device),
        attention_mask=att[:nl].to(device),
        **meta(nl, 0),
    )
    weak = torch.rand(nu, 3, s, s, generator=gen).to(device)
    unl = UnlabeledSample(
        weak=weak,
        strong=(weak * 0.9 + 0.05).clamp(0, 1),
        proposals=pack_bits(blobs((nu, sizes.step_masks), s, device, gen) > 0.6),  # as the loader sends them
        valid=torch.ones(nu, sizes.step_masks, dtype=torch.bool, device=device),
        input_ids=ids[nl:].to(device),
        attention_mask=att[nl:].to(device),
        gt=(blobs((nu,), s, device, gen) > 0.6).long(),
        **meta(nu, nl),
    )
    return lab, unl


def head(batch, n: int):
    """The first ``n`` samples of a batch (every field sliced)."""
    return batch._replace(**{k: v[:n] for k, v in batch._asdict().items() if v is not None})


def public_style_step(student, teacher, lab, unl, optimizer, scheduler, *, cfg, device) -> dict[str, Any]:
    """``semi_step`` written the public code's way: float32 throughout (no autocast),
    ``gc.collect()`` and ``torch.cuda.empty_cache()`` every step, the per-mask loop refinement
    (on the proposals unpacked: the public code keeps them as bytes)."""
    from semires.bits import unpack_bits
    from semires.ema import ema_update
    from semires.refine import Refined
    from semires.semi import unsupervised_loss
    from semires.train import segmentation_loss

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    with torch.no_grad():
        t_logits = teacher(unl.weak, unl.input_ids, unl.attention_mask)
    prob = t_logits.softmax(dim=1)[:, 1]
    proposals = unpack_bits(unl.proposals, unl.weak.shape[-1])
    labels, weights, matched = loop_refine(prob, proposals, unl.valid, cfg.refine)
    refined = Refined(labels=labels, weights=weights, matched=matched, raw=(prob > 0.5).long())
    b = lab.image.shape[0]
    logits = student(
        torch.cat([lab.image, unl.strong]),
        torch.cat([lab.input_ids, unl.input_ids]),
        torch.cat([lab.attention_mask, unl.attention_mask]),
    )
    sup = segmentation_loss(logits[:b], lab.mask, cfg.class_weights)
    unsup = unsupervised_loss(logits[b:], refined, cfg.class_weights)
    loss = sup + cfg.unsup_weight * unsup
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    scheduler.step()
    ema_update(teacher, student, cfg.ema_rate)
    return {"loss": loss.detach()}


def peak_flops(device: torch.device, override_tflops: float | None) -> float | None:
    if override_tflops:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def count_host_syncs(fn: Callable[[], Any]) -> int:
    """Implicit host syncs of ``fn`` on CUDA (``set_sync_debug_mode("warn")``)."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    where = [f"{Path(w.filename).name}:{w.lineno}" for w in caught if "synchronizing" in str(w.message)]
    if where:
        log("train", f"host syncs in one semi_step at: {', '.join(where)}")
    return len(where)


def section_train(sizes: Sizes, device: torch.device, deadline: float, peak: float | None) -> dict[str, Any]:
    import copy

    from torch.utils.flop_counter import FlopCounterMode

    from semires.model.build import count_parameters
    from semires.semi import SemiConfig, semi_step
    from semires.train import make_optimizer, poly_schedule

    t = time.perf_counter()
    torch.manual_seed(0)
    spec, student = build_lavt(sizes.model_preset, device)
    student.train()
    teacher = copy.deepcopy(student).requires_grad_(False).eval()
    cfg = SemiConfig(steps=10_000, batch_size=sizes.labeled, unlabeled_batch_size=sizes.unlabeled)
    optimizer = make_optimizer(student, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = poly_schedule(optimizer, total_steps=cfg.steps, power=cfg.poly_power)
    lab, unl = step_inputs(spec, sizes, device)
    build_s = time.perf_counter() - t
    params = count_parameters(student)
    log(
        "train",
        f"{spec.config.name} LAVT ({params / 1e6:.1f} M params, {spec.config.image_size} px) built in "
        f"{build_s:.1f} s; {sizes.labeled} labeled + {sizes.unlabeled} unlabeled, "
        f"{sizes.step_masks} proposals each",
    )
    clock = Clock(device)
    out: dict[str, Any] = {
        "preset": spec.config.name,
        "image_size": spec.config.image_size,
        "params": params,
        "labeled": sizes.labeled,
        "unlabeled": sizes.unlabeled,
        "proposals": sizes.step_masks,
        "build_s": build_s,
        "weights": "random",
    }
    losses: list[torch.Tensor] = []

    def make(step: Callable[..., dict[str, Any]], nl: int, nu: int) -> Callable[[], None]:
        lab_b, unl_b = head(lab, nl), head(unl, nu)

        def fn() -> None:
            stats = step(student, teacher, lab_b, unl_b, optimizer, scheduler, cfg=cfg, device=device)
            losses.append(stats["loss"])

        return fn

    def wall(fn: Callable[[], None], warmup: int, limit: int, until: float) -> tuple[float, int, float]:
        """Seconds per step over as many steps as fit (at least one), peak memory in GiB."""
        for _ in range(warmup):
            fn()
        clock.sync()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        start, done = time.perf_counter(), 0
        while done == 0 or (done < limit and time.perf_counter() < until):
            fn()
            done += 1
        clock.sync()
        mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
        return (time.perf_counter() - start) / done, done, mem

    def measure(name: str, step, warmup: int, limit: int, until: float) -> dict[str, Any]:
        """Time ``step`` at the full batch; out of memory, at half the batch, and so on."""
        nl, nu = sizes.labeled, sizes.unlabeled
        oom: list[list[int]] = []
        while True:
            try:
                step_s, n, mem = wall(make(step, nl, nu), warmup, limit, until)
                break
            except torch.cuda.OutOfMemoryError:
                oom.append([nl, nu])
            optimizer.zero_grad(set_to_none=True)
            release(device)
            log("train", f"{name}: out of memory at {nl} + {nu} samples")
            if nl == nu == 1:
                return {"error": "out of memory at every batch size", "oom_at": oom}
            nl, nu = max(1, nl // 2), max(1, nu // 2)
        row = {
            "labeled": nl,
            "unlabeled": nu,
            "step_s": step_s,
            "steps": n,
            "samples_per_s": (nl + nu) / step_s,
            "peak_mem_gib": mem,
            "oom_at": oom,
        }
        log(
            "train",
            f"{name}: {n} steps of {nl} + {nu}, {step_s * 1e3:.1f} ms/step = {row['samples_per_s']:.1f} "
            f"samples/s, peak {mem:.1f} GiB",
        )
        return row

    left = deadline - time.perf_counter()
    out["ours"] = measure(
        "ours", semi_step, sizes.step_warmup, sizes.steps, time.perf_counter() + 0.35 * left
    )
    if "error" in out["ours"]:
        raise RuntimeError(f"semi_step: {out['ours']['error']}")
    ours = make(semi_step, out["ours"]["labeled"], out["ours"]["unlabeled"])
    with FlopCounterMode(display=False) as counter:
        ours()
    flops = counter.get_total_flops()
    per_sample = flops / (out["ours"]["labeled"] + out["ours"]["unlabeled"])
    out["flops_per_step"] = flops
    out["peak_flops"] = peak

    def utilisation(row: dict[str, Any]) -> None:
        achieved = per_sample * row["samples_per_s"]  # the public step does the same FLOPs per sample
        row["achieved_tflops"] = achieved / 1e12
        row["mfu"] = achieved / peak if peak else None

    utilisation(out["ours"])
    if device.type == "cuda":
        out["ours"]["host_syncs"] = count_host_syncs(ours)
    log(
        "train",
        f"{flops / 1e12:.2f} TFLOP/step -> {out['ours']['achieved_tflops']:.1f} TFLOP/s"
        + (f", MFU {100 * out['ours']['mfu']:.1f}% of {peak / 1e12:.0f}" if peak else ""),
    )
    out["public"] = measure(
        "public-style", public_style_step, max(0, sizes.step_warmup - 1), max(1, sizes.steps // 2), deadline
    )
    if "error" in out["public"]:  # fp32 may not fit where bf16 does: a figure, not a failure
        out["speedup"] = None
    else:
        utilisation(out["public"])
        out["speedup"] = out["ours"]["samples_per_s"] / out["public"]["samples_per_s"]
        log("train", f"ours is {out['speedup']:.1f}x the public-style step (samples/s)")
    out["finite_loss"] = bool(torch.stack([x.float() for x in losses]).isfinite().all())
    return out


# --- report --------------------------------------------------------------------------------


def fmt(x: Any, spec: str = ".2f", unit: str = "") -> str:
    if x is None:
        return "-"
    if isinstance(x, bool):
        return "pass" if x else "FAIL"
    if isinstance(x, (int, float)):
        return f"{x:{spec}}{unit}"
    return str(x)


def met(ok: bool | None) -> str:
    return "-" if ok is None else ("yes" if ok else "no")


def table(report: dict[str, Any]) -> list[str]:
    rows: list[tuple[str, str, str, str, str, str]] = []
    r = report.get("refine")
    if r and "strategies" in r:
        for name, s in r["strategies"].items():
            rows.append(
                (
                    f"refine {name}+pwa, ms/batch ({r['batch']}x{r['masks']} @ {r['size']})",
                    fmt(s["batched_ms"], ".3f"),
                    fmt(s["loop_ms"], ".1f"),
                    fmt(s["speedup"], ".1f", "x"),
                    f">= {TARGETS['refine_speedup']:.0f}x",
                    met(s["speedup"] >= TARGETS["refine_speedup"]),
                )
            )
            rows.append(
                (f"refine {name}: identical to the loop", fmt(s["identical"]), "", "", "identical", "")
            )
            rows.append(
                (f"refine {name}: no host sync", fmt(s["no_host_sync"]), "", "", "no sync (CUDA)", "")
            )
    s = report.get("sam")
    if s and "public" in s:
        target = TARGETS["sam_images_per_s"]
        for key, label in (("ours", "SAM images/s (library path)"), ("variant", "SAM images/s (variant)")):
            v = s[key]
            if key == "variant":
                precision = "bf16" if v["bf16_image_encoder"] else "fp32"
                label += f" proposals.precision {precision}, points_per_batch={v['points_per_batch']}"
            rows.append(
                (
                    f"{label}, {s['model']} random",
                    fmt(v["images_per_s"]),
                    fmt(s["public"]["images_per_s"]),
                    fmt(v["images_per_s"] / s["public"]["images_per_s"], ".1f", "x"),
                    f">= {target:.0f} images/s",
                    met(v["images_per_s"] >= target),
                )
            )
        rows.append(
            (
                "SAM masks/image, calls/image (random weights)",
                f"{fmt(s['ours']['masks_per_image'], '.1f')}, {fmt(s['ours']['calls_per_image'], '.1f')}",
                f"-, {fmt(s['public']['calls_per_image'], '.1f')}",
                "",
                "",
                "",
            )
        )
    t = report.get("train")
    if t and "ours" in t:
        pub, ours = t.get("public", {}), t["ours"]

        def at(row: dict[str, Any]) -> str:
            if "samples_per_s" not in row:
                return row.get("error", "-")[:32]
            return f"{row['samples_per_s']:.1f} ({row['labeled']}+{row['unlabeled']})"

        rows.append(
            (
                f"train step samples/s ({t['preset']} @ {t['image_size']}, labeled+unlabeled)",
                at(ours),
                at(pub),
                fmt(t.get("speedup"), ".1f", "x"),
                f">= {TARGETS['train_speedup']:.0f}x",
                met(None if t.get("speedup") is None else t["speedup"] >= TARGETS["train_speedup"]),
            )
        )
        rows.append(
            (
                f"train step MFU ({t['flops_per_step'] / 1e12:.3g} TFLOP/step, bf16 peak)",
                fmt(None if ours.get("mfu") is None else 100 * ours["mfu"], ".1f", "%"),
                fmt(None if pub.get("mfu") is None else 100 * pub["mfu"], ".1f", "%"),
                "",
                "",
                "",
            )
        )
        if "host_syncs" in ours:
            rows.append(
                ("train step: host syncs in semi_step", str(ours["host_syncs"]), "", "", "0 (info)", "")
            )
        rows.append(("train step: finite loss", fmt(t["finite_loss"]), "", "", "finite", ""))
    for name, err in report.get("errors", {}).items():
        rows.append((f"{name}: raised", err[:60], "", "", "", "FAIL"))
    head = ("check", "ours", "public-style", "ratio", "target", "met?")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def correctness(report: dict[str, Any]) -> dict[str, bool]:
    checks: dict[str, bool] = {}
    for name, s in report.get("refine", {}).get("strategies", {}).items():
        checks[f"refine_{name}_identical"] = s["identical"]
        if s["no_host_sync"] is not None:
            checks[f"refine_{name}_no_host_sync"] = s["no_host_sync"]
    if "finite_loss" in report.get("train", {}):
        checks["train_finite_loss"] = report["train"]["finite_loss"]
    return checks


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    ap.add_argument("--budget-s", type=float, default=420.0, help="total wall-clock budget, builds included")
    ap.add_argument("--out", type=Path, default=None, help="write every figure here as JSON")
    ap.add_argument("--tiny", action="store_true", help="CPU sizes: tiny models, few images and proposals")
    ap.add_argument("--sections", default="refine,sam,train", help="comma-separated subset to run")
    ap.add_argument("--sam-images", type=int, default=None, help="at most this many images (ours, variant)")
    ap.add_argument("--sam-public-images", type=int, default=None, help="at most this many (public-style)")
    ap.add_argument("--steps", type=int, default=None, help="at most this many timed training steps (ours)")
    ap.add_argument(
        "--peak-tflops", type=float, default=None, help="bf16 dense peak for MFU (default: by name)"
    )
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    t0 = time.perf_counter()
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    sizes = Sizes.tiny() if args.tiny else Sizes()
    overrides = {
        "sam_images": args.sam_images,
        "sam_public_images": args.sam_public_images,
        "steps": args.steps,
    }
    sizes = dataclasses.replace(sizes, **{k: v for k, v in overrides.items() if v is not None})
    name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu ({torch.get_num_threads()} threads)"
    )
    report: dict[str, Any] = {
        "device": name,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "tiny": args.tiny,
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "budget_s": args.budget_s,
        "sizes": dataclasses.asdict(sizes),
        "errors": {},
    }
    log("gpu_check", f"{name}, torch {torch.__version__}, budget {args.budget_s:.0f} s, tiny={args.tiny}")
    wanted = [s for s in args.sections.split(",") if s]
    total = sum(SHARES[s] for s in wanted)
    peak = peak_flops(device, args.peak_tflops)
    runs = {
        "refine": lambda end: section_refine(sizes, device, end),
        "sam": lambda end: section_sam(sizes, device, end),
        "train": lambda end: section_train(sizes, device, end, peak),
    }
    used = 0.0
    for section in wanted:
        used += SHARES[section] / total
        end = t0 + args.budget_s * used
        log(section, f"start, {end - time.perf_counter():.0f} s to go")
        try:
            report[section] = runs[section](end)
        except Exception as e:
            traceback.print_exc()
            report["errors"][section] = f"{type(e).__name__}: {e}".splitlines()[0]
        release(device)  # the section's models are gone with its frame
    report["checks"] = correctness(report)
    report["ok"] = all(report["checks"].values())
    report["elapsed_s"] = time.perf_counter() - t0
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(
        f"\n{name}, torch {torch.__version__}, {report['elapsed_s']:.0f} s of {args.budget_s:.0f} s\n",
        flush=True,
    )
    print("\n".join(table(report)), flush=True)
    if not report["ok"]:
        return 1
    return 2 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
