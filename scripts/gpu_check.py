"""Every GPU check and benchmark of the project in one call, within a time budget.

    python scripts/gpu_check.py [--device cuda] [--budget-s 420] [--out gpu.json] [--tiny]

Three sections, each against the public SemiRES code's way of doing the same work:

1. refinement (``semires.refine.refine``, IOM and CPI with PWA) on a batch of 8 teacher
   masks with 100 proposals each at 480 x 480, bit-packed as the loader sends them, against
   the per-mask Python loop on the unpacked masks: outputs must be identical, and on CUDA
   the batched path runs under
   ``torch.cuda.set_sync_debug_mode("error")`` (any host sync is a failure);
2. SAM proposals: a randomly initialised ViT-H whose mask head is shaped so that its
   masks look like a trained SAM's to the post-processing (``object_like``), on synthetic
   640 x 480 images at the library's default settings (32 x 32 points, 64 a batch), with
   the predicted-IoU and stability thresholds calibrated on the first image so that about
   100 masks per image survive (:func:`calibrate`; the library's 0.88 / 0.95 keep none of
   a random SAM's masks, which left the post-processing out of the measurement). Five rows
   through the per-image path of ``propose`` (generator, cap, packing, scratch file):
   segment-anything's ``SamAutomaticMaskGenerator`` ("library", before) and semires'
   generator ("fast": post-processing on the device; "fast-compiled": also
   ``torch.compile`` of the image encoder and the mask decoder), in fp32 and bf16. Each
   row: images/s, the share of time in the image encoder, the mask decoder and the
   post-processing, and the operators with the most time for one image (torch.profiler).
   The masks of the first images are compared between rows (IoU of masks paired one to
   one, count of masks that differ): fast fp32 must equal the library's fp32 bit for bit
   (a correctness check). Beside them the public way: SAM once per referred object (2.5
   calls per image, as RefCOCO) and one JSON of run-length lists per object;
3. the teacher-student step (``semires.semi.semi_step``) of the ``paper`` LAVT (Swin-B,
   480 x 480, a random BERT-base) on 8 labeled + 8 unlabeled samples (the paper's batch per
   GPU) with 100 proposals each, in variants (``--train-variants``) of the same weights:
   ``eager`` (the step as the stages ran it before ``compile`` / ``channels_last``: the
   baseline of the speed-up target), ``channels-last``, ``regional`` (``torch.compile`` of
   the repeated blocks, with channels-last) and, on request, ``full`` (the whole model as
   one graph): for each, samples/s, model FLOP utilisation, the peak memory it adds, the
   first step's seconds (compilation), host syncs per step (on CUDA
   ``set_sync_debug_mode``; for the eager variants also :class:`semires.syncs.HostSyncs`,
   which sees every operation on any device: a sync there fails the run), the losses of
   two steps from the same weights and seed against eager's (within bf16's rounding: a
   correctness check; compiled variants draw dropout's random numbers with eager's kernels,
   inductor's ``fallback_random``), and a torch.profiler profile of one step (top
   operations by self device time, and the time by phase of the step and by model region:
   BERT, Swin blocks and their window attention, PWAM and gates, decoder; printed for
   eager and the fastest variant, all in the JSON). Beside them a step written the public
   way (fp32, ``gc.collect()`` and ``torch.cuda.empty_cache()`` every step, the per-mask
   loop). A step that runs out of GPU memory is measured again at half the batch
   (reported; the ratio is per sample).

Each section gets a share of ``--budget-s`` (model builds included) and stops early,
reporting how many iterations it ran; ``--sections`` runs a subset. ``--tiny`` shrinks
everything to CPU sizes (the tiny LAVT at 64 px, the tiny SAM, a few images and proposals)
so the test suite runs every path except the CUDA-only ones (its compiled variants use the
``aot_eager`` backend: graphs captured and differentiated, no code generated). A compiled
variant compiles at its first step, which no budget cuts short: on a GPU give the run room
(``--budget-s 540``). Targets: refinement 20x the loop; SAM 5 images/s in bf16; the eager
step 3x the public-style one; the fastest variant 2.5x eager at 35 % MFU (bf16 dense peak),
with 0 host syncs per step. The profiles are printed above the last lines, a
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
SHARES = {"refine": 0.08, "sam": 0.42, "train": 0.50}
TARGETS = {
    "refine_speedup": 20.0,
    "sam_images_per_s": 5.0,
    "train_speedup": 3.0,  # eager vs the public-style step
    "train_speedup_eager": 2.5,  # the fastest variant vs eager (the step as the stages ran it)
    "train_mfu": 0.35,  # the fastest variant's model FLOP utilisation (bf16 dense peak)
}


@dataclasses.dataclass(frozen=True)
class Sizes:
    refine_batch: int = 8
    refine_masks: int = 100
    refine_size: int = 480
    refine_iters: int = 50  # at most, batched; the loop gets a fifth
    sam_model: str = "vit_h"
    sam_image_hw: tuple[int, int] = (480, 640)
    sam_images: int = 300  # at most, each row
    sam_public_images: int = 100  # at most
    sam_points_per_side: int | None = None  # None: the library default
    sam_target_masks: int = 100  # thresholds calibrated so that about this many survive
    sam_compare_images: int = 3  # images whose masks are compared between the rows
    sam_profile_images: int = 2  # images timed phase by phase, each row
    sam_compile_backend: str = "inductor"  # torch.compile backend of the fast-compiled row
    model_preset: str = "paper"
    labeled: int = 8
    unlabeled: int = 8
    step_masks: int = 100
    steps: int = 30  # at most, each variant of ours; the public-style step gets half
    step_warmup: int = 2  # untimed steps before each of ours (after 2 checked ones); public: one fewer
    train_variants: tuple[str, ...] = ("eager", "channels-last", "regional")  # of TRAIN_VARIANTS
    train_compile_backend: str = "inductor"  # torch.compile backend of the compiled variants
    profile_ops: int = 10  # operations listed per profiled step

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
            sam_target_masks=6,
            sam_compare_images=1,
            sam_profile_images=1,
            sam_compile_backend="eager",  # graph capture without code generation (inductor: minutes on a CPU)
            model_preset="tiny",
            labeled=2,
            unlabeled=2,
            step_masks=6,
            steps=1,
            step_warmup=1,
            train_compile_backend="aot_eager",  # traced and differentiated, no code generation
            profile_ops=5,
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


def calibrate(model: torch.nn.Module, image: np.ndarray, settings, target: int):
    """Generator settings under which about ``target`` masks of ``image`` survive: the
    predicted-IoU and stability thresholds are the ``q``-quantiles of the candidates' own
    scores, one ``q`` for both, found by bisection on the count after box NMS; if even
    ``q = 0`` (no threshold) keeps fewer than half of ``target`` at the library's
    ``box_nms_thresh``, NMS is relaxed to 1.0 (suppress nothing) first.

    Counts follow the generator's own rules (a threshold applies only when it is above 0;
    masks at a crop edge go). Returns ``(settings, info)``."""
    from torchvision.ops.boxes import batched_nms

    from semires.proposals.sam_fast import FastMaskGenerator

    with torch.inference_mode():
        c = FastMaskGenerator(model, settings).candidates(image)
    iou, stab = c.predicted_iou.float(), c.stability_score.float()
    finite = stab[~stab.isnan()]

    def thresholds(q: float) -> tuple[float, float]:
        ti = float(torch.quantile(iou, q)) if q > 0 else 0.0
        ts = float(torch.quantile(finite, q)) if q > 0 and len(finite) else 0.0
        return max(ti, 0.0), max(ts, 0.0)

    def kept(q: float, nms: float) -> int:
        ti, ts = thresholds(q)
        keep = ~c.near_edge
        if ti > 0:
            keep &= iou > ti
        if ts > 0:
            keep &= stab >= ts
        sel = torch.nonzero(keep)[:, 0]
        return len(batched_nms(c.boxes[sel].float(), iou[sel], torch.zeros_like(sel), nms))

    nms = settings.box_nms_thresh
    if kept(0.0, nms) < target / 2:
        nms = 1.0
    lo, hi = 0.0, 1.0  # kept(lo) >= target > kept(hi), roughly: the count falls as q rises
    if kept(lo, nms) <= target:
        hi = lo
    for _ in range(20):
        if hi == lo:
            break
        mid = (lo + hi) / 2
        if kept(mid, nms) >= target:
            lo = mid
        else:
            hi = mid
    q = min((lo, hi), key=lambda v: abs(kept(v, nms) - target))
    ti, ts = thresholds(q)
    chosen = dataclasses.replace(settings, pred_iou_thresh=ti, stability_score_thresh=ts, box_nms_thresh=nms)
    info = {
        "target": target,
        "candidates": len(iou),
        "quantile": q,
        "kept_on_first_image": kept(q, nms),
        "kept_without_thresholds_at_library_nms": kept(0.0, settings.box_nms_thresh),
        "predicted_iou_range": [float(iou.min()), float(iou.max())],
        "stability_nonzero_share": float((finite > 0).float().mean()) if len(finite) else 0.0,
    }
    return chosen, info


# The SAM rows: (name, implementation, precision). "library" is segment-anything's
# SamAutomaticMaskGenerator (before), "fast"/"fast-compiled" semires' generator (after).
SAM_ROWS = (
    ("library-fp32", "library", "fp32"),
    ("fast-fp32", "fast", "fp32"),
    ("library-bf16", "library", "bf16"),
    ("fast-bf16", "fast", "bf16"),
    ("fast-compiled-bf16", "fast-compiled", "bf16"),
)
# Mask agreement: (row, reference row); the first must be identical. Then bf16's effect on
# each path, fused attention's (fast vs library in bf16) and compilation's.
SAM_AGREEMENT = (
    ("fast-fp32", "library-fp32"),
    ("library-bf16", "library-fp32"),
    ("fast-bf16", "library-fp32"),
    ("fast-compiled-bf16", "library-fp32"),
    ("fast-bf16", "library-bf16"),
    ("fast-compiled-bf16", "fast-bf16"),
)


class PhaseTimer:
    """Seconds spent inside ``model.image_encoder`` and ``model.mask_decoder`` calls (forward
    hooks; the device is synchronised at every boundary, so the shares are exact but the
    total is a little above an unhooked run)."""

    def __init__(self, model: torch.nn.Module, clock: Clock) -> None:
        self.clock = clock
        self.seconds = {"encoder": 0.0, "decoder": 0.0}
        self._hooks = []
        for name, module in (("encoder", model.image_encoder), ("decoder", model.mask_decoder)):
            self._hooks.append(module.register_forward_pre_hook(self._start))
            self._hooks.append(module.register_forward_hook(lambda *_, name=name: self._stop(name)))
        self._t = 0.0

    def _start(self, *_: Any) -> None:
        self.clock.sync()
        self._t = time.perf_counter()

    def _stop(self, name: str) -> None:
        self.clock.sync()
        self.seconds[name] += time.perf_counter() - self._t

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()


def phase_shares(generate: Callable[[np.ndarray], Any], model, images, clock: Clock) -> dict[str, float]:
    """Share of one image's time in the image encoder, the mask decoder and the rest (the
    post-processing: upsampling, stability score, thresholds, boxes, NMS, RLE or packing,
    the copy to the host; also the image's resize to the encoder's input)."""
    timer = PhaseTimer(model, clock)
    try:
        clock.sync()
        t = time.perf_counter()
        for image in images:
            generate(image)
        clock.sync()
        total = time.perf_counter() - t
    finally:
        timer.remove()
    enc, dec = timer.seconds["encoder"], timer.seconds["decoder"]
    return {
        "seconds_per_image": total / len(images),
        "encoder": enc / total,
        "decoder": dec / total,
        "post": max(0.0, 1 - (enc + dec) / total),
    }


def top_ops(generate: Callable[[np.ndarray], Any], image: np.ndarray, device: torch.device, k: int = 8):
    """The ``k`` operators with the most self time (device time on CUDA) for one image."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        generate(image)
        if device.type == "cuda":
            torch.cuda.synchronize()
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, key, 0.0), reverse=True)
    total = sum(getattr(e, key, 0.0) for e in events) or 1.0
    return [
        {
            "op": e.key[:60],
            "ms": getattr(e, key, 0.0) / 1e3,
            "share": getattr(e, key, 0.0) / total,
            "calls": e.count,
        }
        for e in events[:k]
    ]


def section_sam(sizes: Sizes, device: torch.device, deadline: float) -> dict[str, Any]:
    import copy

    from segment_anything import SamAutomaticMaskGenerator

    from semires.proposals.base import cap
    from semires.proposals.sam import SamSettings, object_like, sam_generator
    from semires.proposals.sam_fast import compare_masks
    from semires.proposals.store import ImageResult, Scratch

    runs_encode = sibling("bench_proposals").runs_encode  # the public code's per-object format
    max_masks = 256  # proposals.max_masks
    settings = SamSettings()
    if sizes.sam_points_per_side is not None:
        settings = dataclasses.replace(settings, points_per_side=sizes.sam_points_per_side)
    t = time.perf_counter()
    torch.manual_seed(0)
    base = build_sam(sizes.sam_model, device)
    object_like(base)
    build_s = time.perf_counter() - t
    params = sum(p.numel() for p in base.parameters())
    log("sam", f"random {sizes.sam_model} ({params / 1e6:.1f} M params) built on {device} in {build_s:.1f} s")
    pool = synthetic_images(16, sizes.sam_image_hw)
    t = time.perf_counter()
    settings, calibration = calibrate(base, pool[0], settings, sizes.sam_target_masks)
    calibration["seconds"] = time.perf_counter() - t
    log(
        "sam",
        f"thresholds for ~{sizes.sam_target_masks} masks/image: pred_iou_thresh "
        f"{settings.pred_iou_thresh:.4f}, stability_score_thresh {settings.stability_score_thresh:.4f}, "
        f"box_nms_thresh {settings.box_nms_thresh} ({calibration['kept_on_first_image']} of "
        f"{calibration['candidates']} kept on the first image; "
        f"{calibration['kept_without_thresholds_at_library_nms']} at the library's box NMS, no thresholds)",
    )
    clock = Clock(device)
    out: dict[str, Any] = {
        "model": sizes.sam_model,
        "params": params,
        "build_s": build_s,
        "image_hw": list(sizes.sam_image_hw),
        "settings": dataclasses.asdict(settings),
        "calibration": calibration,
        "weights": "random, mask head shaped by object_like; the masks mean nothing (timing only)",
        "rows": {},
        "row_errors": {},
    }
    compare_n = min(sizes.sam_compare_images, len(pool))
    outputs: dict[str, list[Any]] = {}

    def run_row(name: str, implementation: str, precision: str, until: float, tmp: Path) -> dict[str, Any]:
        t0 = time.perf_counter()
        model = copy.deepcopy(base)
        generate = sam_generator(
            model,
            settings,
            precision=precision,
            implementation=implementation,
            compile_backend=sizes.sam_compile_backend,
        )
        scratch = Scratch(tmp / name)
        found: list[int] = []
        runs: list[float] = []
        kept: list[Any] = []

        def one(i: int) -> None:
            props = generate(pool[i % len(pool)])
            found.append(len(props))
            if i < compare_n:
                kept.append(props)
            scratch.save(i, ImageResult.from_proposals(cap(props, max_masks), len(props), ""))

        with torch.inference_mode():
            warm = time.perf_counter()
            generate(pool[0])  # warm-up: kernels, allocator, compilation
            clock.sync()
            warmup_s = time.perf_counter() - warm
            start, done, last = time.perf_counter(), 0, time.perf_counter()
            while done == 0 or (done < sizes.sam_images and time.perf_counter() < until):
                one(done)
                done += 1
                if time.perf_counter() - last > 10:
                    last = time.perf_counter()
                    log("sam", f"{name}: {done} images, {done / (last - start):.2f} images/s")
            clock.sync()
            seconds = time.perf_counter() - start
            while len(kept) < compare_n:  # the comparison images, if the time ran out first
                kept.append(generate(pool[len(kept)]))
            shares = phase_shares(generate, model, pool[: sizes.sam_profile_images], clock)
            try:
                ops = top_ops(generate, pool[1 % len(pool)], device)
            except Exception as e:  # the profiler is an extra: its failure is reported, not fatal
                ops = [
                    {
                        "op": f"profiler failed: {type(e).__name__}: {e}"[:60],
                        "ms": 0.0,
                        "share": 0.0,
                        "calls": 0,
                    }
                ]
        for p in kept[:1]:
            m = p.masks
            runs.append(float((m[:, :, 1:] != m[:, :, :-1]).sum() / max(1, m.shape[0] * m.shape[1])))
        outputs[name] = kept
        row = {
            "implementation": implementation,
            "precision": precision,
            "images": done,
            "seconds": seconds,
            "images_per_s": done / seconds,
            "masks_per_image": float(np.mean(found)),
            "masks_found": [int(n) for n in found],  # per image, in the order the rows share
            "warmup_s": warmup_s,
            "row_edges_per_mask_row": runs[0] if runs else 0.0,
            "shares": shares,
            "top_ops": ops,
            "row_s": time.perf_counter() - t0,
        }
        log(
            "sam",
            f"{name}: {done} images in {seconds:.1f} s = {row['images_per_s']:.2f} images/s, "
            f"{row['masks_per_image']:.1f} masks/image (warm-up {warmup_s:.1f} s); time in encoder "
            f"{100 * shares['encoder']:.0f} %, decoder {100 * shares['decoder']:.0f} %, post-processing "
            f"{100 * shares['post']:.0f} %",
        )
        for op in ops[:5]:
            log(
                "sam",
                f"  {name} top op: {op['op']} {op['ms']:.1f} ms "
                f"({100 * op['share']:.0f} %, {op['calls']} calls)",
            )
        return row

    def run_public(limit: int, until: float, tmp: Path) -> dict[str, Any]:
        folder = tmp / "public"
        folder.mkdir()
        calls: list[int] = []
        generator = SamAutomaticMaskGenerator(
            copy.deepcopy(base), output_mode="binary_mask", **dataclasses.asdict(settings)
        )

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

    # Time per row, as shares of what is left: the library's rows are the slow ones, the
    # compiled row pays for its compilation.
    weights = {"library-fp32": 3, "fast-fp32": 2, "library-bf16": 3, "fast-bf16": 2, "fast-compiled-bf16": 3}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        for k, (name, implementation, precision) in enumerate(SAM_ROWS):
            left = deadline - time.perf_counter()
            share = weights[name] / (sum(weights[n] for n, _, _ in SAM_ROWS[k:]) + 2)  # 2: public
            try:
                out["rows"][name] = run_row(
                    name, implementation, precision, time.perf_counter() + share * left, tmp
                )
            except Exception as e:  # one row failing (out of memory, compilation) keeps the others
                traceback.print_exc()
                out["row_errors"][name] = f"{type(e).__name__}: {e}".splitlines()[0]
                outputs.pop(name, None)
            release(device)  # the row's model copy is gone with its frame
        out["public"] = run_public(sizes.sam_public_images, deadline, tmp)
        release(device)
    agreement: dict[str, Any] = {}
    for name, ref in SAM_AGREEMENT:
        if name not in outputs or ref not in outputs:
            continue
        parts = [
            compare_masks(torch.as_tensor(a.masks, device=device), torch.as_tensor(b.masks, device=device))
            for a, b in zip(outputs[name], outputs[ref], strict=True)
        ]
        pairs = sum(p.pairs for p in parts)
        row = {
            "images": len(parts),
            "masks": sum(p.count_a for p in parts),
            "reference_masks": sum(p.count_b for p in parts),
            "identical": sum(p.identical for p in parts),
            "differ": sum(p.differ for p in parts),
            "mean_iou": sum(p.mean_iou * p.pairs for p in parts) / pairs if pairs else 1.0,
            "min_iou": min((p.min_iou for p in parts if p.pairs), default=1.0),
        }
        row["all_identical"] = row["differ"] == 0 and row["masks"] == row["reference_masks"]
        agreement[f"{name} vs {ref}"] = row
        log(
            "sam",
            f"masks {name} vs {ref} on {row['images']} images: {row['masks']} vs {row['reference_masks']}, "
            f"{row['identical']} identical, {row['differ']} differ, matched IoU mean {row['mean_iou']:.4f} "
            f"min {row['min_iou']:.4f}",
        )
    out["agreement"] = agreement
    ips = {name: row["images_per_s"] for name, row in out["rows"].items()}
    for key, a, b in (
        ("speedup_fp32", "fast-fp32", "library-fp32"),
        ("speedup_bf16", "fast-bf16", "library-bf16"),
        ("speedup_compiled", "fast-compiled-bf16", "library-bf16"),
    ):
        out[key] = ips[a] / ips[b] if a in ips and b in ips else None
    out["speedup_public"] = ips["fast-bf16"] / out["public"]["images_per_s"] if "fast-bf16" in ips else None
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
    from semires.data import ColourJitter, Sample
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
    jitter = ColourJitter(0.25, 0.25, 0.25, 0.25, random_order=True)  # the strong view: made on the device
    unl = UnlabeledSample(
        weak=torch.randint(0, 256, (nu, 3, s, s), generator=gen, dtype=torch.uint8).to(device),
        blur=torch.tensor([float(k % 2) for k in range(nu)], dtype=torch.float64),  # half, radius 1
        jitter=torch.stack([jitter.code(gen) for _ in range(nu)]),
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
    from semires.semi import pixel_mean_loss, unlabeled_to_device, unsupervised_loss

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    unl = unlabeled_to_device(unl, device)  # [0, 1] views, as the public loader makes them
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
    sup = pixel_mean_loss(logits[:b], lab.mask, cfg.class_weights)
    unsup = unsupervised_loss(logits[b:], refined, cfg.class_weights, pwa=cfg.refine.pwa)
    loss = cfg.sup_weight * sup + cfg.unsup_weight * unsup
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


def count_host_syncs(fn: Callable[[], Any]) -> tuple[int, list[str]]:
    """Implicit host syncs of ``fn`` on CUDA (``set_sync_debug_mode("warn")``): the count
    and where each was (``file:line``)."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    where = [f"{Path(w.filename).name}:{w.lineno}" for w in caught if "synchronizing" in str(w.message)]
    return len(where), where


# Our step's variants: (compile mode, channels-last), each on its own copy of one model.
# "eager" is the step as the stages ran it before these settings (the speed-up's baseline).
TRAIN_VARIANTS = {
    "eager": ("none", False),
    "channels-last": ("none", True),
    "regional": ("regional", True),
    "full": ("full", True),
}
# How far a variant's losses may be from eager's (relative): bf16 autocast on a GPU, where a
# compiled graph rounds its fused intermediates differently; float32 on the CPU
LOSS_RTOL = {"cuda": 0.02, "cpu": 1e-4}


def region_names() -> list[tuple[type, str]]:
    """Module classes -> the region their forward time is counted in (the first match wins;
    window attention is inside the Swin blocks, counted in both)."""
    from semires.model.decoder import Decoder
    from semires.model.pwam import LanguageGate, PixelWordAttention
    from semires.model.swin import PatchEmbed, PatchMerging, SwinBlock, WindowAttention
    from semires.model.text import TextEncoder

    return [
        (TextEncoder, "BERT"),
        (WindowAttention, "window attention"),
        (SwinBlock, "Swin blocks"),
        (PatchEmbed, "Swin embed+merge"),
        (PatchMerging, "Swin embed+merge"),
        (PixelWordAttention, "PWAM+gates"),
        (LanguageGate, "PWAM+gates"),
        (Decoder, "decoder"),
    ]


def hook_regions(models: list[torch.nn.Module]) -> list[Any]:
    """Forward hooks that open a profiler range ``region.<name>`` around each region module
    of ``models`` (:func:`region_names`). A module inside a compiled forward is left alone:
    its calls are traced into the compiled graph (a hook there would recompile it). Returns
    the handles (``.remove()`` each)."""
    from torch.profiler import record_function

    from semires.model.speed import is_compiled

    names = region_names()
    handles: list[Any] = []

    def visit(module: torch.nn.Module) -> None:
        name = next((n for cls, n in names if isinstance(module, cls)), None)
        if name is not None:
            open_ranges: list[Any] = []

            def enter(*_: Any, label: str = f"region.{name}", stack: list[Any] = open_ranges) -> None:
                stack.append(record_function(label).__enter__())

            def leave(*_: Any, stack: list[Any] = open_ranges) -> None:
                stack.pop().__exit__(None, None, None)

            handles.append(module.register_forward_pre_hook(enter))
            handles.append(module.register_forward_hook(leave))
        if not is_compiled(module):
            for child in module.children():
                visit(child)

    for model in models:
        visit(model)
    return handles


def profile_step(fn: Callable[[], Any], device: torch.device, models: list[torch.nn.Module], k: int):
    """One call of ``fn`` (a training step) under torch.profiler: the ``k`` operations with the
    most self time on the device (kernels, copies on CUDA; operators on the CPU) and the
    step's time by phase (``semi_step``'s ranges, :data:`semires.semi.STEP_PHASES`; on CUDA
    the backward is its autograd kernels) and by model region (forward only, teacher and
    student together; :func:`hook_regions`), in ms and as shares of the step's total."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    from semires.semi import STEP_PHASES

    cuda = device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    handles = hook_regions(models)
    try:
        with profile(activities=acts) as prof:
            fn()
            if cuda:
                torch.cuda.synchronize()
    finally:
        for h in handles:
            h.remove()
    ours = ("semi.", "region.")
    if cuda:
        ops = [e for e in prof.key_averages() if e.device_type != DeviceType.CPU]
        self_us = [e.self_device_time_total for e in ops]
    else:
        ops = [e for e in prof.key_averages() if not e.key.startswith(ours)]
        self_us = [e.self_cpu_time_total for e in ops]
    total = sum(self_us) or 1.0
    ranked = sorted(zip(self_us, ops, strict=True), key=lambda p: p[0], reverse=True)[:k]
    top = [{"op": e.key[:70], "ms": t / 1e3, "share": t / total, "calls": e.count} for t, e in ranked]
    phases: dict[str, float] = {}
    regions: dict[str, float] = {}
    backward = 0.0
    for e in prof.events():
        if e.device_type != DeviceType.CPU:
            continue
        t = e.device_time_total if cuda else e.cpu_time_total
        if e.name in STEP_PHASES:
            key = e.name.removeprefix("semi.")
            phases[key] = phases.get(key, 0.0) + t
        elif e.name.startswith("region."):
            key = e.name.removeprefix("region.")
            regions[key] = regions.get(key, 0.0) + t
        elif cuda and e.name.startswith("autograd::engine::evaluate_function"):
            backward += t  # on the autograd engine's thread, outside semi.backward's range
    if cuda:
        phases["backward"] = phases.get("backward", 0.0) + backward
    phases["other"] = max(0.0, total - sum(phases.values()))

    def shares(d: dict[str, float]) -> dict[str, dict[str, float]]:
        return {n: {"ms": t / 1e3, "share": t / total} for n, t in d.items()}

    return {
        "time": "device" if cuda else "cpu",
        "total_ms": total / 1e3,
        "top_ops": top,
        "phases": shares(phases),
        "regions": shares(regions),
    }


# inductor draws dropout's random numbers with eager's kernels, so that one step of a compiled
# variant is eager's step (BERT's dropout and Swin's stochastic depth act on small tensors:
# the cost is a few tiny kernels)
@torch._inductor.config.patch(fallback_random=True)
def section_train(sizes: Sizes, device: torch.device, deadline: float, peak: float | None) -> dict[str, Any]:
    import copy

    from torch.utils.flop_counter import FlopCounterMode

    from semires.model.build import count_parameters
    from semires.model.speed import speed_up
    from semires.semi import SemiConfig, semi_step
    from semires.syncs import HostSyncs
    from semires.train import make_optimizer, poly_schedule

    t = time.perf_counter()
    torch.manual_seed(0)
    spec, base = build_lavt(sizes.model_preset, device)
    base.train()
    bases = {"student": base, "teacher": copy.deepcopy(base).requires_grad_(False).eval()}
    cfg = SemiConfig(steps=10_000, batch_size=sizes.labeled, unlabeled_batch_size=sizes.unlabeled)
    lab, unl = step_inputs(spec, sizes, device)
    build_s = time.perf_counter() - t
    params = count_parameters(base)
    log(
        "train",
        f"{spec.config.name} LAVT ({params / 1e6:.1f} M params, {spec.config.image_size} px) built in "
        f"{build_s:.1f} s; {sizes.labeled} labeled + {sizes.unlabeled} unlabeled, "
        f"{sizes.step_masks} proposals each; variants {', '.join(sizes.train_variants)} "
        f"(compile backend {sizes.train_compile_backend})",
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
        "compile_backend": sizes.train_compile_backend,
        "variants": {},
    }
    losses: list[torch.Tensor] = []

    def setup(variant: str) -> dict[str, Any]:
        """The variant's student, teacher, optimiser and schedule, from the same weights."""
        compile_mode, channels_last = TRAIN_VARIANTS[variant]
        student, teacher = copy.deepcopy(bases["student"]), copy.deepcopy(bases["teacher"])
        for m in (student, teacher):
            speed_up(
                m, compile=compile_mode, channels_last=channels_last, backend=sizes.train_compile_backend
            )
        optimizer = make_optimizer(student, lr=cfg.lr, weight_decay=cfg.weight_decay)
        scheduler = poly_schedule(optimizer, total_steps=cfg.steps, power=cfg.poly_power)
        return {"student": student, "teacher": teacher, "optimizer": optimizer, "scheduler": scheduler}

    def make(
        state: dict[str, Any], step: Callable[..., dict[str, Any]], nl: int, nu: int
    ) -> Callable[[], Any]:
        lab_b, unl_b = head(lab, nl), head(unl, nu)

        def fn() -> dict[str, Any]:
            stats = step(
                state["student"], state["teacher"], lab_b, unl_b, state["optimizer"], state["scheduler"],
                cfg=cfg, device=device,
            )  # fmt: skip
            losses.append(stats["loss"])
            return stats

        return fn

    def wall(
        fn: Callable[[], Any], warmup: int, limit: int, until: float, before: int
    ) -> tuple[float, int, float]:
        """Seconds per step over as many steps as fit (at least one); the peak memory in GiB
        less ``before`` bytes (what other rows held: the row's own weights, optimiser state
        and activations remain)."""
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
        mem = (torch.cuda.max_memory_allocated(device) - before) / 2**30 if device.type == "cuda" else 0.0
        return (time.perf_counter() - start) / done, done, mem

    def allocated() -> int:
        return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0

    def measure(
        name: str, state, step, warmup: int, limit: int, until: float, before: int = 0
    ) -> dict[str, Any]:
        """Time ``step`` at the full batch; out of memory, at half the batch, and so on."""
        nl, nu = sizes.labeled, sizes.unlabeled
        oom: list[list[int]] = []
        while True:
            try:
                step_s, n, mem = wall(make(state, step, nl, nu), warmup, limit, until, before)
                break
            except torch.cuda.OutOfMemoryError:
                oom.append([nl, nu])
            state["optimizer"].zero_grad(set_to_none=True)
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

    per_sample: float | None = None

    def utilisation(row: dict[str, Any]) -> None:
        achieved = per_sample * row["samples_per_s"]  # every row does the same FLOPs per sample
        row["achieved_tflops"] = achieved / 1e12
        row["mfu"] = achieved / peak if peak else None

    eager_state: dict[str, Any] | None = None
    names = list(sizes.train_variants)
    for k, name in enumerate(names):
        t0, before = time.perf_counter(), allocated()
        state = setup(name)
        # the same two steps from the same weights, inputs and seed: the variants' losses
        # must agree with eager's (the second loss follows one backward and optimiser step)
        check_losses: list[float] = []
        try:
            one = make(state, semi_step, sizes.labeled, sizes.unlabeled)
            seconds = []
            for _ in range(2):
                torch.manual_seed(0)
                seconds.append(
                    clock.once(lambda one=one, into=check_losses: into.append(float(one()["loss"])))
                )
            first_s = seconds[0]
        except Exception as e:  # compilation may fail: the row reports it, the others go on
            traceback.print_exc()
            out["variants"][name] = {"error": f"{type(e).__name__}: {e}".splitlines()[0][:200]}
            del state
            release(device)
            continue
        log("train", f"{name}: first step {first_s:.1f} s (compilation included), losses {check_losses}")
        left = deadline - time.perf_counter()
        row = measure(
            name, state, semi_step, sizes.step_warmup, sizes.steps,
            time.perf_counter() + left * 0.5 / (len(names) - k + 1), before,
        )  # fmt: skip
        if "error" in row:
            if name == "eager":
                raise RuntimeError(f"semi_step: {row['error']}")
            out["variants"][name] = row
            continue
        row["compile"], row["channels_last"] = TRAIN_VARIANTS[name]
        row["first_step_s"] = first_s
        row["check_losses"] = check_losses
        fn = make(state, semi_step, row["labeled"], row["unlabeled"])
        if per_sample is None:  # the FLOPs of the step, counted once on the first (eager) row
            with FlopCounterMode(display=False) as counter:
                fn()
            out["flops_per_step"] = counter.get_total_flops()
            per_sample = out["flops_per_step"] / (row["labeled"] + row["unlabeled"])
            out["peak_flops"] = peak
        utilisation(row)
        if device.type == "cuda":
            row["host_syncs"], where = count_host_syncs(fn)
            if where:
                log("train", f"{name}: host syncs in one step at {', '.join(where)}")
        if row["compile"] == "none":  # traced: every operation through Python, on any device
            with HostSyncs() as syncs:
                fn()
            row["host_syncs_traced"] = len(syncs)
            row["host_syncs_where"] = [str(s) for s in syncs.found[:10]]
            if len(syncs):
                log("train", f"{name}: host syncs traced in one step: {syncs.summary()}")
        try:
            row["profile"] = profile_step(fn, device, [state["student"], state["teacher"]], sizes.profile_ops)
        except Exception as e:  # the profiler is an extra: its failure is reported, not fatal
            row["profile"] = {"error": f"{type(e).__name__}: {e}".splitlines()[0][:200]}
        row["row_s"] = time.perf_counter() - t0
        out["variants"][name] = row
        if name == "eager":
            eager_state = state
        del state
        release(device)
    if eager_state is None or "samples_per_s" not in out["variants"].get("eager", {}):
        raise RuntimeError("the eager step gave no figures")
    bases.clear()
    del base
    release(device)
    ours = out["variants"]["eager"]
    out["ours"] = ours  # the step as it was: the public-style comparison's and the targets' baseline
    ref = ours["check_losses"]
    rtol = LOSS_RTOL.get(device.type, LOSS_RTOL["cuda"])
    for row in out["variants"].values():
        if "check_losses" in row:
            diff = max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(row["check_losses"], ref, strict=True))
            row["loss_rel_diff"] = diff
            row["matches_eager"] = diff <= rtol
            row["speedup_vs_eager"] = row["samples_per_s"] / ours["samples_per_s"]
    out["loss_rtol"] = rtol
    timed = {n: r for n, r in out["variants"].items() if "samples_per_s" in r}
    out["fastest"] = max(timed, key=lambda n: timed[n]["samples_per_s"])
    out["speedup_vs_eager"] = timed[out["fastest"]]["samples_per_s"] / ours["samples_per_s"]
    best = timed[out["fastest"]]
    log(
        "train",
        f"{out['flops_per_step'] / 1e12:.2f} TFLOP/step; fastest {out['fastest']}: "
        f"{best['samples_per_s']:.1f} samples/s, {out['speedup_vs_eager']:.2f}x eager"
        + (f", MFU {100 * best['mfu']:.1f}% of {peak / 1e12:.0f}" if peak else ""),
    )
    out["public"] = measure(
        "public-style", eager_state, public_style_step, max(0, sizes.step_warmup - 1),
        max(1, sizes.steps // 2), max(deadline, time.perf_counter() + 1),
    )  # fmt: skip
    if "error" in out["public"]:  # fp32 may not fit where bf16 does: a figure, not a failure
        out["speedup"] = None
    else:
        utilisation(out["public"])
        out["speedup"] = ours["samples_per_s"] / out["public"]["samples_per_s"]
        log("train", f"eager is {out['speedup']:.1f}x the public-style step (samples/s)")
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


def profile_tables(report: dict[str, Any]) -> list[str]:
    """The profiled training steps of the eager variant and the fastest one, one markdown
    table each: top operations by self time, then the time by phase and by model region."""
    t = report.get("train", {})
    variants = t.get("variants", {})
    lines: list[str] = []
    for name in dict.fromkeys(["eager", t.get("fastest")]):
        prof = variants.get(name, {}).get("profile")
        if not prof:
            continue
        if "error" in prof:
            lines += [f"train step profile, {name}: {prof['error']}", ""]
            continue
        lines += [
            f"train step profile, {name} ({prof['time']} time, {prof['total_ms']:.1f} ms in one step):",
            "",
            "| kind | name | ms | share | calls |",
            "|---|---|---|---|---|",
        ]
        lines += [
            f"| op | {op['op']} | {op['ms']:.2f} | {100 * op['share']:.1f} % | {op['calls']} |"
            for op in prof["top_ops"]
        ]
        for kind, part in (("phase", "phases"), ("region (fwd)", "regions")):
            lines += [
                f"| {kind} | {n} | {v['ms']:.2f} | {100 * v['share']:.1f} % | |"
                for n, v in prof[part].items()
            ]
        lines.append("")
    return lines


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
        r = s["rows"]
        model = f"{s['model']}, {s['calibration']['target']} masks/image"

        def shares(row: dict[str, Any]) -> str:
            sh = row["shares"]
            return f"{100 * sh['encoder']:.0f}/{100 * sh['decoder']:.0f}/{100 * sh['post']:.0f} %"

        for fast, lib, label in (
            ("fast-fp32", "library-fp32", "fp32"),
            ("fast-bf16", "library-bf16", "bf16"),
            ("fast-compiled-bf16", "library-bf16", "bf16, compiled"),
        ):
            if fast not in r or lib not in r:
                continue  # the row raised: listed below
            ips = r[fast]["images_per_s"]
            bf16 = r[fast]["precision"] == "bf16"
            rows.append(
                (
                    f"SAM images/s {label} ({model}): semires vs library generator",
                    fmt(ips),
                    fmt(r[lib]["images_per_s"]),
                    fmt(ips / r[lib]["images_per_s"], ".1f", "x"),
                    f">= {target:.0f} images/s" if bf16 else "",
                    met(ips >= target) if bf16 else "",
                )
            )
            rows.append(
                (f"SAM time encoder/decoder/post {label}", shares(r[fast]), shares(r[lib]), "", "", "")
            )
        rows.append(
            (
                "SAM images/s semires bf16 vs public-style (fp32, 2.5 calls/image)",
                fmt(r.get("fast-bf16", {}).get("images_per_s")),
                fmt(s["public"]["images_per_s"]),
                fmt(s["speedup_public"], ".1f", "x"),
                "",
                "",
            )
        )
        cal = s["calibration"]
        rows.append(
            (
                "SAM thresholds (iou/stability/box NMS), masks/image semires bf16, library bf16",
                f"{s['settings']['pred_iou_thresh']:.4f}/{s['settings']['stability_score_thresh']:.4f}/"
                f"{s['settings']['box_nms_thresh']}",
                f"{fmt(r.get('fast-bf16', {}).get('masks_per_image'), '.1f')}, "
                f"{fmt(r.get('library-bf16', {}).get('masks_per_image'), '.1f')}",
                "",
                f"~{cal['target']} masks/image",
                "",
            )
        )
        for name, a in s["agreement"].items():
            rows.append(
                (
                    f"SAM masks {name}: identical/differ, matched IoU mean (min)",
                    f"{a['identical']}/{a['differ']} of {a['reference_masks']}, "
                    f"{a['mean_iou']:.4f} ({a['min_iou']:.4f})",
                    "",
                    "",
                    "identical" if name.startswith("fast-fp32 ") else "",
                    fmt(a["all_identical"]) if name.startswith("fast-fp32 ") else "",
                )
            )
    t = report.get("train")
    if t and "ours" in t:
        pub, ours = t.get("public", {}), t["ours"]
        variants = t.get("variants", {})

        def at(row: dict[str, Any]) -> str:
            if "samples_per_s" not in row:
                return row.get("error", "-")[:32]
            return f"{row['samples_per_s']:.1f} ({row['labeled']}+{row['unlabeled']})"

        def pct(row: dict[str, Any]) -> str:
            return fmt(None if row.get("mfu") is None else 100 * row["mfu"], ".1f", "%")

        rows.append(
            (
                f"train step samples/s ({t['preset']} @ {t['image_size']}, labeled+unlabeled), eager",
                at(ours),
                at(pub),
                fmt(t.get("speedup"), ".1f", "x"),
                f">= {TARGETS['train_speedup']:.0f}x",
                met(None if t.get("speedup") is None else t["speedup"] >= TARGETS["train_speedup"]),
            )
        )
        rows.append(
            (
                f"train step MFU, eager ({t['flops_per_step'] / 1e12:.3g} TFLOP/step, bf16 peak)",
                pct(ours),
                pct(pub),
                "",
                "",
                "",
            )
        )
        fastest = t.get("fastest")
        for name, row in variants.items():
            if name == "eager":
                continue
            label = f"{row.get('compile', '-')} compile, channels-last {row.get('channels_last', '-')}"
            ratio = row.get("speedup_vs_eager")
            is_best = name == fastest
            rows.append(
                (
                    f"train step samples/s, {name} ({label}) vs eager",
                    at(row),
                    at(ours),
                    fmt(ratio, ".2f", "x"),
                    f">= {TARGETS['train_speedup_eager']:.1f}x" if is_best else "",
                    met(ratio >= TARGETS["train_speedup_eager"]) if is_best and ratio is not None else "",
                )
            )
            if "samples_per_s" in row:
                rows.append(
                    (
                        f"train step MFU, {name}",
                        pct(row),
                        pct(ours),
                        "",
                        f">= {100 * TARGETS['train_mfu']:.0f} %" if is_best else "",
                        met(None if row.get("mfu") is None else row["mfu"] >= TARGETS["train_mfu"])
                        if is_best
                        else "",
                    )
                )
        for name, row in variants.items():
            if "samples_per_s" not in row:
                continue
            rows.append(
                (
                    f"train step {name}: peak GiB (own), first step s (compilation)",
                    f"{row['peak_mem_gib']:.1f}, {row['first_step_s']:.1f}",
                    "",
                    "",
                    "",
                    "",
                )
            )
            syncs = [row.get("host_syncs"), row.get("host_syncs_traced")]
            counted = [s for s in syncs if s is not None]
            rows.append(
                (
                    f"train step {name}: host syncs per step (CUDA / traced)",
                    " / ".join(fmt(s, "d") for s in syncs),
                    "",
                    "",
                    "0",
                    met(all(s == 0 for s in counted)) if counted else "",
                )
            )
            if name != "eager":
                rows.append(
                    (
                        f"train step {name}: 2 losses vs eager's (max relative difference)",
                        fmt(row.get("loss_rel_diff"), ".2e"),
                        "",
                        "",
                        f"<= {t['loss_rtol']:.0e}",
                        fmt(row.get("matches_eager")),
                    )
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
    for name, a in report.get("sam", {}).get("agreement", {}).items():
        if name.startswith("fast-fp32 "):  # float32: the library's masks, bit for bit
            checks["sam_fast_fp32_identical"] = a["all_identical"]
    train = report.get("train", {})
    if "finite_loss" in train:
        checks["train_finite_loss"] = train["finite_loss"]
    for name, row in train.get("variants", {}).items():
        if "matches_eager" in row and name != "eager":  # compiled within bf16's rounding of eager
            checks[f"train_{name}_matches_eager"] = row["matches_eager"]
        if "host_syncs_traced" in row:  # every operation of an eager step seen: none may sync
            checks[f"train_{name}_no_host_sync"] = row["host_syncs_traced"] == 0
    return checks


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    ap.add_argument("--budget-s", type=float, default=420.0, help="total wall-clock budget, builds included")
    ap.add_argument("--out", type=Path, default=None, help="write every figure here as JSON")
    ap.add_argument("--tiny", action="store_true", help="CPU sizes: tiny models, few images and proposals")
    ap.add_argument("--sections", default="refine,sam,train", help="comma-separated subset to run")
    ap.add_argument("--sam-images", type=int, default=None, help="at most this many images (each SAM row)")
    ap.add_argument("--sam-public-images", type=int, default=None, help="at most this many (public-style)")
    ap.add_argument("--steps", type=int, default=None, help="at most this many timed training steps (ours)")
    ap.add_argument(
        "--train-variants",
        default=None,
        help=f"our training step's variants, comma-separated, of {', '.join(TRAIN_VARIANTS)} (eager always "
        "runs first); default: eager,channels-last,regional",
    )
    ap.add_argument(
        "--peak-tflops", type=float, default=None, help="bf16 dense peak for MFU (default: by name)"
    )
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    t0 = time.perf_counter()
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    sizes = Sizes.tiny() if args.tiny else Sizes()
    overrides: dict[str, Any] = {
        "sam_images": args.sam_images,
        "sam_public_images": args.sam_public_images,
        "steps": args.steps,
    }
    if args.train_variants is not None:
        picked = [v for v in args.train_variants.split(",") if v]
        unknown = [v for v in picked if v not in TRAIN_VARIANTS]
        if unknown:
            print(f"gpu_check: --train-variants {unknown[0]!r}: expected some of {', '.join(TRAIN_VARIANTS)}")
            return 2
        overrides["train_variants"] = tuple(["eager"] + [v for v in dict.fromkeys(picked) if v != "eager"])
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
    for row, err in report.get("sam", {}).get("row_errors", {}).items():
        report["errors"][f"sam {row}"] = err
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
    profiles = profile_tables(report)
    if profiles:
        print("\n".join(profiles) + "\n", flush=True)
    print("\n".join(table(report)), flush=True)
    if not report["ok"]:
        return 1
    return 2 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
