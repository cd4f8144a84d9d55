"""RefCOCO at scale: what the pipeline's memory and data loading cost, measured.

    python scripts/bench_scale.py --root .scratch/scale                  # 2,020 and 16,994 train images
    python scripts/bench_scale.py --root /tmp/scale --code OLD --label before   # another checkout's code
    python scripts/bench_scale.py --root /tmp/scale-tiny --tiny          # seconds: what the tests run

1. **A RefCOCO-sized dataset** in the REFER layout, built once under ``--root`` and reused
   (every file is written whole under a temporary name, so a killed build resumes where it
   stopped): RefCOCO's (unc) counts, 16,994 train images with 42,404 refs and 120,624
   sentences, val 1,500 / 3,811 / 10,834, testA 750 / 1,975 / 5,657, testB 750 / 1,810 /
   5,095, and as many COCO annotations per image as RefCOCO's ``instances.json`` holds
   (196,771 for 19,994 images, the unreferred ones included; 1 % of those crowd RLEs).
   Refs per image and sentences per ref are drawn around RefCOCO's means and corrected to
   its exact totals. Objects are smooth star-shaped polygons of 16-40 vertices, areas
   log-uniform between 0.2 % and 30 % of the image; sentences of 1-8 words (3.5 on average,
   as RefCOCO's) from a vocabulary of RefCOCO-like words. Images are 640 x 480 JPEGs
   (quality 90): a smooth colour field, the objects filled, and pixel noise (a random
   window of one fixed noise tile), about as costly to decode as a COCO photo of that size.
   A smaller size is a prefix: the first train images and the same share of each eval split.
2. **A proposals store of SAM-like masks**, written by ``semires propose`` itself (its
   scratch folder, shard writer and store) with the mask generator below in place of SAM:
   100-200 masks per image, areas log-uniform between 0.03 % and 40 % of the image (SAM's
   automatic masks range from object parts to background regions), each a smooth blob
   whose left and right borders wander with a few low sinusoids (most rows one run, as
   SAM's masks mostly are), a third of them two lobes (two runs on some rows), a third
   parts of an earlier mask (intersected with it: SAM's whole / part / subpart), scores
   drawn in SAM's kept range (predicted IoU 0.88-1, stability 0.95-1). Seeded by the image
   pixels: the same image gets the same masks. Made once, for the largest size; the
   smaller sizes read it too (their images are a prefix of it).
3. **At each size**, every measured step in its own process, with the sum of the resident
   memory of that process and all its children (DataLoader workers) sampled 10 times a second:
   ``extract`` and ``split`` (1 % labels) time and peak RSS; the unlabeled loader of
   ``train-semi`` (flip, the default blur and colour jitter, proposals; batch 8) in samples/s
   at 480 px with 0 (one torch thread), 1 and 2 workers, up to the batch leaving the loader
   (the views travel as uint8 pixels, a blur radius and jitter numbers: the blur and the jitter
   run on the training device and are not in this figure); a ``train-semi`` run (CPI+PWA, the
   ``tiny`` model at 480 px, ``--steps`` steps of 8 labeled + 8 unlabeled, pseudo-label quality
   on 64 expressions at start and end, 2 workers; on the train refs only, as validation is the
   next row) from a 1-step burn-in: peak RSS of all its processes together (and their PSS,
   which counts a page shared by the workers once); ``evaluate`` (2 workers) on the val split:
   10,834 expressions at full size. Once: ``propose`` (time, peak RSS: a writer holds one shard
   of ``proposals.shard_images`` images; its scratch folder's peak size and files; the store's
   size and files) and refinement of 8 x 256 proposals at 480 px (extra memory beyond its
   inputs, as the rise of the process's peak RSS, glibc's malloc told to return freed memory at
   once).

``--code`` runs the measured steps on another checkout's code (e.g. the commit before a
change, extracted with ``git archive``): params it does not know are left out. Results are
kept in ``--root`` per label and size; a rerun measures only what is missing (``--fresh``
measures again). The printed markdown table shows ``--label``'s figures, with those of
``--compare`` (another label in the same root) in parentheses.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import io
import json
import math
import os
import pickle
import re
import subprocess
import sys
import threading
import time
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
CATEGORIES = 80
GENERATOR = 1  # the dataset generator's version: a root built by another one is refused


# --- what to build -------------------------------------------------------------------------


@dataclass(frozen=True)
class Split:
    images: int
    refs: int
    sentences: int


@dataclass(frozen=True)
class Spec:
    """The largest dataset to build, and how to measure."""

    splits: dict[str, Split]
    annotations: int  # COCO annotations of all images in instances.json
    width: int = 640
    height: int = 480
    masks: tuple[int, int] = (100, 200)  # proposals per image
    image_size: int = 480  # the model's input
    seed: int = 0

    def key(self) -> dict[str, Any]:
        return {"generator": GENERATOR, **asdict(self)}


REFCOCO = Spec(
    splits={
        "train": Split(16994, 42404, 120624),
        "val": Split(1500, 3811, 10834),
        "testA": Split(750, 1975, 5657),
        "testB": Split(750, 1810, 5095),
    },
    annotations=196771,
)
TINY = Spec(
    splits={
        "train": Split(40, 100, 284),
        "val": Split(8, 20, 57),
        "testA": Split(4, 10, 28),
        "testB": Split(4, 10, 28),
    },
    annotations=560,
    width=96,
    height=72,
    masks=(8, 16),
    image_size=64,
)


@dataclass(frozen=True)
class Options:
    """How to measure (the same for every size)."""

    steps: int = 20  # train-semi steps
    batch: int = 8  # labeled and unlabeled expressions per step; the loader's batch
    workers: tuple[int, ...] = (0, 1, 2)  # loader throughput with each
    run_workers: int = 2  # train-semi and evaluate
    loader_batches: int = 25  # timed batches per worker count (after 2 to warm up)
    quality: int = 64  # pseudo-label quality expressions
    refine_batch: int = 8
    refine_masks: int = 256
    propose_procs: int = 2  # propose's processes (each writes its own shards)
    only: tuple[str, ...] = ()  # measure only these of loader, train_semi, evaluate, refine (empty: all)

    def skip(self, step: str) -> bool:
        return bool(self.only) and step not in self.only


# --- the dataset ---------------------------------------------------------------------------


def _words(text: str) -> tuple[str, ...]:
    return tuple(text.split())


NOUNS = _words(
    "man woman guy girl boy lady person kid child player skier surfer batter catcher umpire "
    "car truck bus bike motorcycle train plane boat horse dog cat elephant giraffe zebra cow "
    "sheep bear bird chair couch bed table bench umbrella bottle cup bowl glass pizza "
    "sandwich cake donut banana orange broccoli carrot laptop tv screen keyboard phone book "
    "clock vase plant suitcase bag kite board racket bat"
)
COLOURS = _words("red blue white black green yellow gray brown orange pink purple dark light")
ATTRIBUTES = _words("tall short small big little old young striped blurry partial smiling standing sitting")
PLACES = _words("left right middle center top bottom front back far near")
THINGS = _words("shirt jacket hat dress shorts pants helmet cap coat sweater")


def sentence(rng: np.random.Generator) -> str:
    """A RefCOCO-like expression: 1-8 words, 3.5 on average."""
    n, c, a = (str(rng.choice(v)) for v in (NOUNS, COLOURS, ATTRIBUTES))
    p, t, m = str(rng.choice(PLACES)), str(rng.choice(THINGS)), str(rng.choice(NOUNS))
    forms = (
        f"{p} {n}",
        f"{n} on {p}",
        f"{c} {n}",
        f"{n} in {c} {t}",
        f"{a} {n} {p}",
        f"the {n} on the {p}",
        f"{p} {c} {n}",
        f"{n}",
        f"{p}",
        f"{n} next to {m}",
        f"second {n} from {p}",
        f"{a} {c} {n} on {p} side",
        f"{a} {n} with {c} {t} on the {p}",
    )
    weights = np.array([12, 12, 12, 10, 10, 8, 8, 3, 3, 6, 5, 6, 7], float)
    return forms[int(rng.choice(len(forms), p=weights / weights.sum()))]


def _counts(rng: np.random.Generator, total: int, slots: int, low: int = 1) -> np.ndarray:
    """``slots`` counts, each at least ``low``, spread like ``low`` + Poisson around the mean,
    then corrected to add up to ``total`` exactly."""
    mean = total / max(1, slots)
    c = low + rng.poisson(max(0.0, mean - low), slots)
    while c.sum() != total:
        i = rng.integers(slots, size=abs(int(c.sum() - total)))
        if c.sum() > total:
            np.subtract.at(c, i, 1)
            c = np.maximum(c, low)
        else:
            np.add.at(c, i, 1)
    return c


@dataclass
class Image:
    image_id: int
    split: str
    refs: int  # referred objects (the first ones)
    sentences: list[int]  # per ref
    objects: int  # annotations, referred or not

    @property
    def file_name(self) -> str:
        return f"SCALE_{self.split}_{self.image_id:012d}.jpg"


def plan(spec: Spec) -> dict[str, list[Image]]:
    """Every image of the largest dataset: split, refs, sentences per ref, annotations."""
    rng = np.random.default_rng([spec.seed, 7])
    out: dict[str, list[Image]] = {}
    next_id = 1
    total_images = sum(s.images for s in spec.splits.values())
    extra = spec.annotations - sum(s.refs for s in spec.splits.values())
    unreferred = _counts(rng, extra, total_images, low=0)
    k = 0
    for name, s in spec.splits.items():
        refs = _counts(rng, s.refs, s.images)
        sents = _counts(rng, s.sentences, s.refs)
        images, at = [], 0
        for i in range(s.images):
            r = int(refs[i])
            images.append(
                Image(next_id, name, r, [int(v) for v in sents[at : at + r]], r + int(unreferred[k]))
            )
            at, next_id, k = at + r, next_id + 1, k + 1
        out[name] = images
    return out


def subset(spec: Spec, images: dict[str, list[Image]], train: int) -> dict[str, list[Image]]:
    """The first ``train`` train images and the same share of each eval split."""
    share = train / spec.splits["train"].images
    return {
        name: imgs[: train if name == "train" else max(1, round(len(imgs) * share))]
        for name, imgs in images.items()
    }


def objects(spec: Spec, image: Image) -> list[dict[str, Any]]:
    """The image's annotations (COCO style, no ids yet), referred ones first."""
    rng = np.random.default_rng([spec.seed, image.image_id])
    w, h = spec.width, spec.height
    out = []
    for k in range(image.objects):
        crowd = k >= image.refs and rng.random() < 0.01
        area = math.exp(rng.uniform(math.log(0.002), math.log(0.3))) * w * h
        r = math.sqrt(area / math.pi)
        cx, cy = rng.uniform(0.1 * w, 0.9 * w), rng.uniform(0.1 * h, 0.9 * h)
        t = np.linspace(0, 2 * math.pi, int(rng.integers(16, 41)), endpoint=False)
        wobble = 1 + sum(rng.uniform(0, 0.25 / f) * np.sin(f * t + rng.uniform(0, 6.3)) for f in (2, 3, 5))
        aspect = math.exp(rng.uniform(-0.5, 0.5))
        xs = np.clip(cx + r * aspect * wobble * np.cos(t), 0, w - 1)
        ys = np.clip(cy + r / aspect * wobble * np.sin(t), 0, h - 1)
        poly = [round(float(v), 2) for xy in zip(xs, ys, strict=True) for v in xy]
        colour = [int(v) for v in rng.integers(0, 256, 3)]
        out.append(
            {"polygon": poly, "crowd": bool(crowd), "colour": colour, "category_id": int(rng.integers(1, 81))}
        )
    return out


_NOISE: np.ndarray | None = None


def render(spec: Spec, image: Image, objs: list[dict[str, Any]]) -> bytes:
    """The image as JPEG bytes (see the module docstring)."""
    from PIL import Image as PILImage
    from PIL import ImageDraw

    global _NOISE
    w, h = spec.width, spec.height
    if _NOISE is None or _NOISE.shape[0] < 2 * h or _NOISE.shape[1] < 2 * w:
        _NOISE = np.random.default_rng(12345).normal(0, 14, (2 * h, 2 * w, 3)).astype(np.float32)
    rng = np.random.default_rng([spec.seed, image.image_id, 1])
    low = rng.integers(30, 226, (6, 8, 3)).astype(np.uint8)
    im = PILImage.fromarray(low).resize((w, h), PILImage.BILINEAR)
    draw = ImageDraw.Draw(im)
    for o in objs:
        p = o["polygon"]
        draw.polygon(list(zip(p[0::2], p[1::2], strict=True)), fill=tuple(o["colour"]))
    oy, ox = int(rng.integers(0, h)), int(rng.integers(0, w))
    pixels = np.asarray(im, np.float32) + _NOISE[oy : oy + h, ox : ox + w]
    buf = io.BytesIO()
    PILImage.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def build_images(spec: Spec, images: dict[str, list[Image]], folder: Path, log) -> int:
    """Write every image that is not there yet; returns how many were written."""
    folder.mkdir(parents=True, exist_ok=True)
    todo = [im for imgs in images.values() for im in imgs if not (folder / im.file_name).is_file()]
    start = time.perf_counter()
    for k, im in enumerate(todo):
        _write_atomic(folder / im.file_name, render(spec, im, objects(spec, im)))
        if (k + 1) % 1000 == 0:
            rate = (k + 1) / (time.perf_counter() - start)
            log(f"images: {k + 1} / {len(todo)} ({rate:.0f}/s)")
    return len(todo)


def _crowd_rle(polygon: list[float], h: int, w: int) -> dict[str, Any]:
    """COCO's crowd form (uncompressed RLE, column-major) of a polygon."""
    from pycocotools import mask as mask_utils

    m = mask_utils.decode(mask_utils.frPyObjects([polygon], h, w))[..., 0].astype(bool)
    flat = m.T.reshape(-1).astype(np.int8)
    change = np.flatnonzero(np.diff(flat)) + 1
    counts = np.diff(np.concatenate([[0], change, [flat.size]])).tolist()
    if flat[0]:
        counts = [0, *counts]
    return {"size": [h, w], "counts": [int(c) for c in counts]}


def write_refer(spec: Spec, images: dict[str, list[Image]], root: Path) -> None:
    """``<root>/synthref/instances.json`` and ``refs(unc).p`` for ``images``."""
    folder = root / "synthref"
    if (folder / "refs(unc).p").is_file():
        return
    folder.mkdir(parents=True, exist_ok=True)
    w, h = spec.width, spec.height
    inst_images, anns, refs = [], [], []
    ann_id = ref_id = sent_id = 0
    for split, imgs in images.items():
        for im in imgs:
            inst_images.append({"id": im.image_id, "file_name": im.file_name, "height": h, "width": w})
            rng = np.random.default_rng([spec.seed, im.image_id, 2])
            for k, o in enumerate(objects(spec, im)):
                ann_id += 1
                xs, ys = o["polygon"][0::2], o["polygon"][1::2]
                box = [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)]
                seg = _crowd_rle(o["polygon"], h, w) if o["crowd"] else [o["polygon"]]
                ann = {"id": ann_id, "image_id": im.image_id, "category_id": o["category_id"]}
                ann.update(segmentation=seg, area=box[2] * box[3] * 0.7, bbox=box, iscrowd=int(o["crowd"]))
                anns.append(ann)
                if k >= im.refs:
                    continue
                sents = []
                for _ in range(im.sentences[k]):
                    s = sentence(rng)
                    sents.append({"tokens": s.split(), "raw": s, "sent": s, "sent_id": sent_id})
                    sent_id += 1
                refs.append(
                    {"ref_id": ref_id, "ann_id": ann_id, "image_id": im.image_id, "split": split,
                     "category_id": o["category_id"], "sentences": sents,
                     "sent_ids": [s["sent_id"] for s in sents],
                     "file_name": f"{im.file_name[:-4]}_{ann_id}.jpg"}
                )  # fmt: skip
                ref_id += 1
    cats = [{"id": k, "name": f"category{k}", "supercategory": "thing"} for k in range(1, CATEGORIES + 1)]
    doc = {"info": {"description": "semires scale benchmark"}, "images": inst_images, "annotations": anns}
    _write_atomic(folder / "instances.json", json.dumps({**doc, "categories": cats}).encode())
    _write_atomic(folder / "refs(unc).p", pickle.dumps(refs, protocol=2))


# --- SAM-like proposals ----------------------------------------------------------------------


class SamLike:
    """The mask generator of the module docstring, as a ``propose`` backend."""

    name = "sam-like"

    def __init__(self, masks: tuple[int, int]) -> None:
        self.masks = masks
        self.calls = 0

    def config(self) -> dict[str, Any]:
        return {
            "backend": self.name,
            "description": "SAM-like random blobs for the scale benchmark (scripts/bench_scale.py), not SAM",
            "checkpoint_sha256": None,
            "settings": {"masks": list(self.masks), "generator": GENERATOR},
        }

    def __call__(self, image: np.ndarray):
        from semires.proposals.base import Proposals

        self.calls += 1
        h, w = image.shape[:2]
        rng = np.random.default_rng(zlib.crc32(np.ascontiguousarray(image[::7, ::7]).tobytes()))
        n = int(rng.integers(self.masks[0], self.masks[1] + 1))
        masks = np.zeros((n, h, w), bool)
        boxes = np.zeros((n, 4), np.int64)  # y0, y1, x0, x1 (exclusive) of each mask
        areas = np.zeros(n, np.float32)
        target = np.exp(rng.uniform(math.log(3e-4), math.log(0.4), n)) * h * w
        for i in range(n):
            aspect = math.exp(rng.uniform(-0.8, 0.8))
            ry = math.sqrt(target[i] / math.pi * aspect)
            rx = target[i] / math.pi / ry
            parent = int(rng.integers(0, i)) if i and rng.random() < 0.35 else -1
            if parent >= 0:  # a part of an earlier mask: centred inside its box, cut by it
                py0, py1, px0, px1 = boxes[parent]
                cy, cx = rng.uniform(py0, py1), rng.uniform(px0, px1)
                ry, rx = min(ry, (py1 - py0) / 2 + 1), min(rx, (px1 - px0) / 2 + 1)
            else:
                cy, cx = rng.uniform(0, h), rng.uniform(0, w)
            region = [h, 0, w, 0]  # where this mask's lobes drew
            for _ in range(int(rng.integers(1, 3))):  # one or two lobes
                drawn = _blob(rng, masks[i], cy, cx, ry, rx)
                if drawn is not None:
                    region = [min(region[0], drawn[0]), max(region[1], drawn[1]),
                              min(region[2], drawn[2]), max(region[3], drawn[3])]  # fmt: skip
                cy, cx = cy + rng.normal(0, ry * 0.8), cx + rng.normal(0, rx * 0.8)
                ry, rx = ry * 0.7, rx * 0.7
            y0, y1, x0, x1 = region
            if y1 <= y0 or x1 <= x0:  # fell off the image: one pixel inside it
                y0, x0 = int(min(h - 1, max(0, cy))), int(min(w - 1, max(0, cx)))
                y1, x1 = y0 + 1, x0 + 1
                masks[i, y0, x0] = True
            box = masks[i, y0:y1, x0:x1]
            if parent >= 0:
                part = box & masks[parent, y0:y1, x0:x1]
                if part.any():
                    box[:] = part
            rows, cols = np.flatnonzero(box.any(1)), np.flatnonzero(box.any(0))
            boxes[i] = y0 + rows[0], y0 + rows[-1] + 1, x0 + cols[0], x0 + cols[-1] + 1
            areas[i] = box.sum()
        y0, y1, x0, x1 = boxes.T
        return Proposals(
            masks=masks,
            predicted_iou=rng.uniform(0.88, 1.0, n).astype(np.float32),
            stability_score=rng.uniform(0.95, 1.0, n).astype(np.float32),
            area=areas,
            bbox=np.stack([x0, y0, x1 - 1 - x0, y1 - 1 - y0], axis=1).astype(np.float32),
        )


def _blob(
    rng: np.random.Generator, out: np.ndarray, cy: float, cx: float, ry: float, rx: float
) -> tuple[int, int, int, int] | None:
    """OR into ``out`` (``H x W``) an ellipse whose left and right borders wander; returns the
    box it drew in (``y0, y1, x0, x1``), or None."""
    h, w = out.shape
    y0, y1 = max(0, math.floor(cy - ry)), min(h, math.ceil(cy + ry) + 1)
    if y1 <= y0:
        return None
    t = (np.arange(y0, y1) - cy) / ry
    half = rx * np.sqrt(np.clip(1 - t * t, 0, None))
    f = np.arange(1, 4)
    phase, amp = rng.uniform(0, 2 * math.pi, (2, 3)), rng.uniform(0, 0.25, (2, 3)) / f
    u = (t[:, None] + 1) * math.pi
    skew = rng.uniform(-0.3, 0.3) * rx * t
    left = np.clip(np.round(cx + skew - half * (1 + (amp[0] * np.sin(f * u + phase[0])).sum(1))), 0, w)
    right = np.clip(np.round(cx + skew + half * (1 + (amp[1] * np.sin(f * u + phase[1])).sum(1))), 0, w)
    left, right = left.astype(np.int32), right.astype(np.int32)
    x0, x1 = int(left.min()), int(right.max())
    if x1 <= x0:
        return None
    xx = np.arange(x0, x1, dtype=np.int32)
    out[y0:y1, x0:x1] |= (xx >= left[:, None]) & (xx < right[:, None])
    return y0, y1, x0, x1


# --- measuring a process tree ----------------------------------------------------------------


@dataclass
class Measured:
    seconds: float
    peak_rss: int  # bytes: the largest sum over the process and its children at one sample
    peak_pss: int  # the same for PSS (a page shared by n processes counts 1/n in each)
    processes: int  # the most processes seen at once
    own_peaks: int  # the sum of each process's own peak (as last seen), whenever they were
    max_own_peak: int  # the largest of them
    rc: int
    tail: str = ""
    dir_bytes: int = 0  # the watched folder at its largest
    dir_files: int = 0


def _hwm(pid: int) -> int:
    """A process's own peak resident size so far (VmHWM), bytes; 0 if gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _dir_size(path: Path) -> tuple[int, int]:
    total = files = 0
    for dirpath, _, names in os.walk(path):
        for n in names:
            try:
                total += os.stat(os.path.join(dirpath, n)).st_size
                files += 1
            except OSError:
                pass
    return total, files


def run_measured(
    cmd: list[str], env: dict[str, str], *, log_path: Path, watch: Path | None = None
) -> Measured:
    """Run ``cmd``; sample the resident memory of its process tree 10 times a second (the
    tree itself once a second, PSS and each process's own peak every two seconds)."""
    import psutil

    start = time.perf_counter()
    with open(log_path, "w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
        peak = {"rss": 0, "pss": 0, "n": 0, "bytes": 0, "files": 0, "own": 0, "max_own": 0}
        done = threading.Event()

        def watch_dir() -> None:
            while not done.wait(2.0):
                b, f = _dir_size(watch)
                peak["bytes"], peak["files"] = max(peak["bytes"], b), max(peak["files"], f)

        watcher = threading.Thread(target=watch_dir, daemon=True) if watch is not None else None
        if watcher is not None:
            watcher.start()
        root = psutil.Process(proc.pid)
        tree: list[Any] = [root]
        own_peaks: dict[int, int] = {}  # each process's own peak (VmHWM), the last seen
        k = 0
        while proc.poll() is None:
            try:
                if k % 10 == 0:  # the tree once a second: listing every process is not cheap
                    tree = [root, *root.children(recursive=True)]
                rss = 0
                for p in tree:
                    with contextlib.suppress(psutil.Error, OSError):
                        rss += p.memory_info().rss
                peak["rss"], peak["n"] = max(peak["rss"], rss), max(peak["n"], len(tree))
                if k % 20 == 0:
                    pss = 0
                    for p in tree:
                        with contextlib.suppress(psutil.Error, OSError):
                            pss += p.memory_full_info().pss
                            own_peaks[p.pid] = _hwm(p.pid) or own_peaks.get(p.pid, 0)
                    peak["pss"] = max(peak["pss"], pss)
            except (psutil.Error, OSError):
                pass
            k += 1
            time.sleep(0.1)
        peak["own"], peak["max_own"] = sum(own_peaks.values()), max(own_peaks.values(), default=0)
        done.set()
        if watcher is not None:
            watcher.join()
    text = log_path.read_text(errors="replace")
    return Measured(
        seconds=time.perf_counter() - start, peak_rss=peak["rss"], peak_pss=peak["pss"],
        processes=peak["n"], own_peaks=peak["own"], max_own_peak=peak["max_own"], rc=proc.returncode,
        tail=text[-3000:],
        dir_bytes=peak["bytes"], dir_files=peak["files"],
    )  # fmt: skip


# --- the measured steps, run in their own processes -------------------------------------------


def child_loader(args: dict[str, Any]) -> dict[str, Any]:
    """Samples/s of the unlabeled loader as ``train-semi`` builds it, per worker count. One
    torch thread, as in a loader worker: with 0 workers the figure is one core's."""
    import torch

    torch.set_num_threads(1)
    from torch.utils.data import DataLoader

    from semires import annotations
    from semires.data import StepSampler
    from semires.semi import UnlabeledDataset, collate_unlabeled
    from semires.train import load_model

    try:  # the default views (blur, colour jitter), and the flip
        from semires.data import ViewConfig

        geometric, photometric = ViewConfig(flip=True).views()
    except ImportError:  # code from before the recipe's views
        from semires.data import ColourJitter, Compose, HorizontalFlip

        geometric, photometric = Compose([HorizontalFlip()]), ColourJitter(0.4, 0.4, 0.4, 0.0)
    spec, _, _ = load_model(args["checkpoint"])
    labeled = set(json.loads(Path(args["split"]).read_text())["labeled"])
    refs = [r for r in annotations.load(args["anns"]).in_split("train") if r.image_id not in labeled]
    ds = UnlabeledDataset(
        refs, args["image_dir"], spec.make_tokenizer(), args["store"], image_size=spec.config.image_size,
        max_tokens=spec.config.max_tokens, geometric=geometric, photometric=photometric,
    )  # fmt: skip
    try:
        from semires.data import make_loader
    except ImportError:  # code from before make_loader
        make_loader = None
    out = {}
    batch, warm, timed = args["batch"], 2, args["batches"]
    for workers in args["workers"]:
        sampler = StepSampler(ds, batch_size=batch, total_steps=warm + timed, seed=100 + workers)
        if make_loader is not None:
            loader = make_loader(
                ds, batch_size=batch, sampler=sampler, device=torch.device("cpu"), num_workers=workers,
                collate_fn=collate_unlabeled,
            )  # fmt: skip
        else:
            loader = DataLoader(
                ds, batch_size=batch, sampler=sampler, num_workers=workers, collate_fn=collate_unlabeled,
                persistent_workers=workers > 0,
            )  # fmt: skip
        it = iter(loader)
        for _ in range(warm):
            next(it)
        start = time.perf_counter()
        n = sum(len(b.index) for b in it)
        out[str(workers)] = n / (time.perf_counter() - start)
        del it, loader
    return out


def _rss_now() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def _rss_peak() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def child_refine(args: dict[str, Any]) -> dict[str, Any]:
    """Extra memory of refining ``batch x masks`` proposals at ``size``: the rise of this
    process's peak RSS over its RSS with the inputs made (MALLOC_MMAP_THRESHOLD_ is set by the
    caller, so freed blocks go back to the system at once and the peak is what was live)."""
    import torch

    from semires.refine import RefineConfig, refine

    try:
        from semires.bits import pack_bits
    except ImportError:  # code from before packed proposals: refine takes bool masks
        pack_bits = None
    torch.set_num_threads(int(args.get("threads", 2)))
    b, n, s = args["batch"], args["masks"], args["size"]
    g = torch.Generator().manual_seed(0)

    def blobs(*shape):
        low = torch.rand(*shape, 6, 6, generator=g).reshape(-1, 1, 6, 6)
        up = torch.nn.functional.interpolate(low, size=(s, s), mode="bilinear", align_corners=False)
        return up.reshape(*shape, s, s)

    prob = blobs(b)
    parts = [blobs(n) > 0.62 for _ in range(b)]  # one sample at a time: no B x N x S x S float
    props = torch.stack([pack_bits(p) for p in parts]) if pack_bits else torch.stack(parts)
    del parts
    valid = torch.ones(b, n, dtype=torch.bool)
    input_bytes = prob.nbytes + props.nbytes + valid.nbytes
    out = {
        "input_mb": input_bytes / 2**20,
        "packed": pack_bits is not None,
        "batch": b,
        "masks": n,
        "size": s,
    }
    libc = ctypes.CDLL("libc.so.6")
    for strategy in ("iom", "cpi"):
        cfg = RefineConfig(strategy=strategy)
        refine(prob, props, valid, cfg)  # warm: lazy initialisation is not the refinement's
        libc.malloc_trim(0)
        base = _rss_now()
        Path("/proc/self/clear_refs").write_text("5")  # the peak RSS starts again from now
        start = time.perf_counter()
        r = refine(prob, props, valid, cfg)
        seconds = time.perf_counter() - start
        out[strategy] = {
            "extra_mb": (_rss_peak() - base) / 2**20,
            "ms": seconds * 1e3,
            "matched": int(r.matched.sum()),
        }
        del r
    return out


def child_propose(args: dict[str, Any]) -> None:
    """``semires propose`` with the SAM-like generator in place of the configured backend."""
    import stages.propose
    from stages.cli import app

    stages.propose.make_backend = lambda p, device: SamLike(tuple(args["masks"]))
    app(args["argv"])


CHILDREN = {"loader": child_loader, "refine": child_refine, "propose": child_propose}


def child_main(task: str, args_path: str) -> None:
    args = json.loads(Path(args_path).read_text())
    result = CHILDREN[task](args)
    if result is not None:
        Path(args["result"]).write_text(json.dumps(result))


# --- the benchmark -------------------------------------------------------------------------


@dataclass
class Bench:
    root: Path
    spec: Spec
    opts: Options
    code: Path
    label: str
    fresh: bool = False
    results: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.logs = self.root / "logs" / self.label
        self.logs.mkdir(parents=True, exist_ok=True)
        self.results_path = self.root / f"results-{self.label}.json"
        if self.results_path.is_file() and not self.fresh:
            self.results = json.loads(self.results_path.read_text())
        self.env = {
            **os.environ,
            "PYTHONPATH": str(self.code),
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "SEMIRES_NPROC": "1",
        }
        self.env.pop("RANK", None)
        self.env.pop("WORLD_SIZE", None)

    def log(self, msg: str) -> None:
        print(f"[bench_scale] {msg}", flush=True)

    def save(self) -> None:
        tmp = self.results_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.results, indent=1, sort_keys=True))
        os.replace(tmp, self.results_path)

    def done(self, *keys: str) -> Any:
        d = self.results
        for k in keys:
            if not isinstance(d, dict) or k not in d:
                return None
            d = d[k]
        return d

    def put(self, value: Any, *keys: str) -> Any:
        d = self.results
        for k in keys[:-1]:
            d = d.setdefault(k, {})
        d[keys[-1]] = value
        self.save()
        return value

    # processes

    def stage(self, name: str, argv: list[str], *, watch: Path | None = None) -> Measured:
        cmd = [sys.executable, "-m", "stages.cli", *argv]
        m = run_measured(cmd, self.env, log_path=self.logs / f"{name}.log", watch=watch)
        if m.rc != 0:
            raise RuntimeError(
                f"{name} failed (exit {m.rc}); the end of {self.logs / f'{name}.log'}:\n{m.tail}"
            )
        return m

    def child(self, name: str, task: str, args: dict[str, Any], env: dict[str, str] | None = None) -> Any:
        args = {**args, "result": str(self.logs / f"{name}.result.json")}
        args_path = self.logs / f"{name}.args.json"
        args_path.write_text(json.dumps(args))
        cmd = [sys.executable, str(Path(__file__).resolve()), "child", task, str(args_path)]
        m = run_measured(cmd, env or self.env, log_path=self.logs / f"{name}.log")
        if m.rc != 0:
            raise RuntimeError(
                f"{name} failed (exit {m.rc}); the end of {self.logs / f'{name}.log'}:\n{m.tail}"
            )
        result = Path(args["result"])
        return (json.loads(result.read_text()) if result.is_file() else None), m

    def known_keys(self) -> dict[str, list[str]]:
        """The params keys of the measured code's burn_in / semi / evaluate sections."""
        if self.done("keys") is not None:
            return self.results["keys"]
        code = (
            "import dataclasses, json\n"
            "from stages.burn_in import BurnInParams\nfrom stages.train_semi import SemiParams\n"
            "from stages.evaluate import EvaluateParams\n"
            "print(json.dumps({n: [f.name for f in dataclasses.fields(c)] for n, c in "
            "(('burn_in', BurnInParams), ('semi', SemiParams), ('evaluate', EvaluateParams))}))"
        )
        out = subprocess.run(
            [sys.executable, "-c", code], env=self.env, capture_output=True, text=True, check=True
        )
        return self.put(json.loads(out.stdout), "keys")

    # the data

    def build(self, largest: int) -> dict[str, list[Image]]:
        """Every image of the largest size asked for that is not there yet; the plan of all."""
        key_path = self.root / "build.json"
        key = json.loads(json.dumps(self.spec.key()))
        record = json.loads(key_path.read_text()) if key_path.is_file() else {"spec": key}
        if record["spec"] != key:
            raise SystemExit(f"{self.root} holds a dataset of another spec; pass another --root or delete it")
        images = plan(self.spec)
        start = time.perf_counter()
        written = build_images(self.spec, subset(self.spec, images, largest), self.root / "images", self.log)
        if written or not key_path.is_file():
            record["image_seconds"] = record.get("image_seconds", 0.0) + time.perf_counter() - start
            record["images"], record["images_bytes"] = _dir_size(self.root / "images")[::-1]
            key_path.write_text(json.dumps(record, indent=1))
        return images

    def params(self, size_dir: Path, keys: dict[str, list[str]]) -> Path:
        o = self.opts
        full = {
            "dataset": {"name": "synthref", "split_by": "unc", "refer_root": str(size_dir / "refer"),
                        "image_dir": str(self.root / "images")},
            "split": {"seed": 0, "fractions": [1]},
            "proposals": {"max_masks": 256, "shard_images": 64},
            "model": {"preset": "tiny", "image_size": self.spec.image_size},
            "burn_in": {"steps": 1, "batch_size": o.batch, "eval_every": 0, "log_every": 1,
                        "checkpoint_every": 1000, "num_workers": 0},
            "semi": {"fractions": [1], "methods": ["cpi_pwa"], "steps": o.steps, "batch_size": o.batch,
                     "unlabeled_batch_size": o.batch, "eval_every": 0, "log_every": 5,
                     "checkpoint_every": 1000, "quality_samples": o.quality, "num_workers": o.run_workers},
            "evaluate": {"batch_size": 32, "splits": ["val"], "num_workers": o.run_workers},
        }  # fmt: skip
        for section, known in keys.items():
            full[section] = {k: v for k, v in full[section].items() if k in known}
        path = size_dir / f"params-{self.label}.yaml"
        import yaml

        path.write_text(yaml.safe_dump(full))
        return path

    def propose(self, images: dict[str, list[Image]]) -> Path:
        """The store of the largest size (``propose`` run once; its figures kept)."""
        largest = max(self.sizes)
        size_dir = self.root / f"n{largest}"
        store = self.store(largest)
        if store is not None:
            return store
        store = self.root / f"proposals-n{largest}.zarr"
        params = self.params(size_dir, self.known_keys())
        scratch = self.root / "propose-scratch"
        argv = ["propose", "--images", str(size_dir / "train_images.json"), "--out", str(store),
                "--scratch", str(scratch), "--params", str(params)]  # fmt: skip
        args = {"argv": argv, "masks": list(self.spec.masks)}
        args_path = self.logs / "propose.args.json"
        args_path.write_text(json.dumps(args))
        cmd = [sys.executable, str(Path(__file__).resolve()), "child", "propose", str(args_path)]
        procs = self.opts.propose_procs
        if procs > 1:  # as SEMIRES_NPROC would: torchrun, each process its own shards
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}",
                   *cmd[1:]]  # fmt: skip
        lo, hi = self.spec.masks
        self.log(f"propose: {largest} train images, {lo}-{hi} SAM-like masks each, {procs} process(es)")
        m = run_measured(cmd, self.env, log_path=self.logs / "propose.log", watch=scratch)
        if m.rc != 0:
            raise RuntimeError(f"propose failed (exit {m.rc}):\n{m.tail}")
        store_bytes, store_files = _dir_size(store)
        done_line = next((ln for ln in m.tail.splitlines() if "[propose] done" in ln), "")
        self.put(
            {"seconds": m.seconds, "peak_rss": m.peak_rss, "writer_peak": m.max_own_peak, "processes": procs,
             "scratch_bytes": m.dir_bytes,
             "scratch_files": m.dir_files, "store_bytes": store_bytes, "store_files": store_files,
             "images": largest, "log": done_line},
            "propose",
        )  # fmt: skip
        return store

    # one size

    def measure_size(
        self, images: dict[str, list[Image]], n: int, store: Path | None, build_only: bool = False
    ) -> None:
        o = self.opts
        size_dir = self.root / f"n{n}"
        part = subset(self.spec, images, n)
        write_refer(self.spec, part, size_dir / "refer")
        keys = self.known_keys()
        params = str(self.params(size_dir, keys))
        key = f"n{n}"
        anns, split = size_dir / "anns.json", size_dir / "split"
        counts = {
            s: {
                "images": len(v),
                "refs": sum(i.refs for i in v),
                "sentences": sum(sum(i.sentences) for i in v),
            }
            for s, v in part.items()
        }
        self.put(counts, key, "counts")
        if self.done(key, "extract") is None or not anns.is_file():
            train_images = size_dir / "train_images.json"
            argv = ["extract", "--out", str(anns), "--images", str(train_images), "--params", params]
            m = self.stage(f"{key}-extract", argv)
            own = re.search(r"\[extract\] .* -> .* \(([0-9.]+) s\)", m.tail)  # the stage's own clock
            row = {
                "seconds": m.seconds,
                "peak_rss": m.peak_rss,
                "own_seconds": float(own[1]) if own else None,
            }
            self.put(row, key, "extract")
            self.log(f"{key} extract: {m.seconds:.1f} s, {m.peak_rss / 2**30:.2f} GB")
        if self.done(key, "split") is None or not (split / "1.json").is_file():
            summary_path = size_dir / "split.json"
            argv = ["split", "--anns", str(anns), "--out", str(split), "--summary", str(summary_path)]
            m = self.stage(f"{key}-split", [*argv, "--params", params])
            summary = json.loads(summary_path.read_text())["1"]
            self.put({"seconds": m.seconds, "peak_rss": m.peak_rss, "counts": summary}, key, "split")
            self.log(f"{key} split: {m.seconds:.1f} s, {m.peak_rss / 2**30:.2f} GB")
        if store is None:
            store = self.propose(images)
        if build_only:
            return
        train_anns = size_dir / "anns-train.json"
        if not train_anns.is_file():  # the train refs alone: train-semi's run is not validated
            from semires import annotations

            a = annotations.load(anns)
            annotations.save(train_anns, annotations.Annotations(a.dataset, a.split_by, a.in_split("train")))
        burn_in = size_dir / f"burn_in-{self.label}.pt"
        lab = str(split / "1.json")
        if not burn_in.is_file() and not all(o.skip(s) for s in ("loader", "train_semi", "evaluate")):
            live, scratch = size_dir / "burn_in_live", size_dir / "scratch"
            argv = ["burn-in", "--split", lab, "--anns", str(train_anns), "--out", str(burn_in)]
            self.stage(
                f"{key}-burn_in", [*argv, "--live", str(live), "--scratch", str(scratch), "--params", params]
            )
        if not o.skip("loader") and self.done(key, "loader") is None:
            args = {
                "checkpoint": str(burn_in), "split": lab, "anns": str(train_anns),
                "image_dir": str(self.root / "images"), "store": str(store), "batch": self.opts.batch,
                "batches": self.opts.loader_batches, "workers": list(self.opts.workers),
            }  # fmt: skip
            rates, _ = self.child(f"{key}-loader", "loader", args)
            self.put(rates, key, "loader")
            self.log(f"{key} loader samples/s: {rates}")
        model = size_dir / f"semi-{self.label}.pt"
        wanted = not o.skip("train_semi") or (not o.skip("evaluate") and not model.is_file())
        if wanted and (self.done(key, "train_semi") is None or not model.is_file()):
            argv = [
                "train-semi", "--method", "cpi_pwa", "--split", lab, "--burn-in", str(burn_in),
                "--proposals", str(store), "--anns", str(train_anns), "--out", str(model),
                "--live", str(size_dir / "semi_live"), "--quality", str(size_dir / "quality.json"),
                "--scratch", str(size_dir / "scratch"), "--params", params,
            ]  # fmt: skip
            m = self.stage(f"{key}-train_semi", argv)
            row = {
                "seconds": m.seconds,
                "peak_rss": m.peak_rss,
                "peak_pss": m.peak_pss,
                "own_peaks": m.own_peaks,
            }
            self.put({**row, "processes": m.processes, "steps": self.opts.steps}, key, "train_semi")
            self.log(
                f"{key} train-semi: {m.seconds:.0f} s, peak RSS {m.peak_rss / 2**30:.2f} GB "
                f"(PSS {m.peak_pss / 2**30:.2f} GB) over {m.processes} processes"
            )
        if not o.skip("evaluate") and self.done(key, "evaluate") is None:
            results = size_dir / "eval.jsonl"
            argv = [
                "evaluate", "--checkpoint", str(model), "--name", "bench", "--anns", str(anns),
                "--metrics", str(size_dir / "eval.json"), "--scores", str(size_dir / "scores.json"),
                "--results", str(results), "--params", params,
            ]  # fmt: skip
            m = self.stage(f"{key}-evaluate", argv)
            # expressions per network (a teacher-student checkpoint scores its teacher and its student)
            networks = json.loads((size_dir / "scores.json").read_text())["networks"]
            count = sum(int(v["count"]) for v in next(iter(networks.values())).values())
            row = {
                "seconds": m.seconds,
                "peak_rss": m.peak_rss,
                "peak_pss": m.peak_pss,
                "own_peaks": m.own_peaks,
            }
            self.put({**row, "processes": m.processes, "expressions": count}, key, "evaluate")
            gb = m.peak_rss / 2**30
            self.log(f"{key} evaluate: {count} expressions, {m.seconds:.0f} s, peak RSS {gb:.2f} GB")

    def refine(self) -> None:
        if self.done("refine") is not None:
            return
        o = self.opts
        env = {**self.env, "MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}
        args = {"batch": o.refine_batch, "masks": o.refine_masks, "size": self.spec.image_size}
        result, _ = self.child("refine", "refine", args, env)
        self.put(result, "refine")
        self.log(f"refine {o.refine_batch} x {o.refine_masks} at {self.spec.image_size}: {result}")

    def store(self, n: int) -> Path | None:
        """A finished store made for ``n`` train images or more (a size is a prefix of a larger)."""
        made = sorted(
            int(d.name[len("proposals-n") : -len(".zarr")]) for d in self.root.glob("proposals-n*.zarr")
        )
        fits = [m for m in made if m >= n]
        return self.root / f"proposals-n{fits[0]}.zarr" if fits else None

    def run(self, sizes: list[int], build_only: bool = False) -> None:
        self.sizes = sizes
        start = time.perf_counter()
        images = self.build(max(sizes))
        self.log(f"dataset ready in {self.root} ({time.perf_counter() - start:.0f} s)")
        for n in sorted(sizes, reverse=True):  # the largest first: it makes the proposals store
            self.measure_size(images, n, self.store(n), build_only=build_only)
            if build_only:
                return
        if not self.opts.skip("refine"):
            self.refine()


# --- the table -----------------------------------------------------------------------------


def _gb(v: float | None) -> str:
    return "-" if v is None else f"{v / 2**30:.2f}"


def table(
    results: dict[str, Any], compare: dict[str, Any] | None, sizes: list[int], build: dict[str, Any]
) -> str:
    """One markdown table (a row per size) and notes; ``compare``'s figures in parentheses."""

    def get(base: dict[str, Any] | None, *keys: str) -> Any:
        d: Any = base
        for k in keys:
            d = d.get(k) if isinstance(d, dict) else None
        return d

    def both(fmt, *keys: str) -> str:
        a, b = get(results, *keys), get(compare, *keys)
        text = "-" if a is None else fmt(a)
        return text if b is None else f"{text} ({fmt(b)})"

    def time_and_rss(d: dict[str, Any]) -> str:
        return f"{d['seconds']:.1f} / {_gb(d['peak_rss'])}"

    head = (
        "| train images | unlabeled (1 %) | refs / expressions | extract s / GB | split s / GB | "
        "loader samples/s, 0 / 1 / 2 workers | train-semi peak RSS GB, all processes (PSS) | "
        "evaluate: expressions, peak RSS GB |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for n in sorted(sizes):
        k = f"n{n}"
        counts = get(results, k, "counts") or {}
        refs = sum(v["refs"] for v in counts.values())
        sents = sum(v["sentences"] for v in counts.values())
        unl = get(results, k, "split", "counts", "unlabeled", "images")
        workers = " / ".join(both(lambda v: f"{v:.0f}", k, "loader", str(w)) for w in (0, 1, 2))
        semi = both(lambda d: f"{_gb(d['peak_rss'])} ({_gb(d['peak_pss'])})", k, "train_semi")
        ev = both(lambda d: f"{d['expressions']:,}: {_gb(d['peak_rss'])}", k, "evaluate")
        ext, spl = both(time_and_rss, k, "extract"), both(time_and_rss, k, "split")
        unl_text = "-" if unl is None else f"{unl:,}"
        lines.append(
            f"| {n:,} | {unl_text} | {refs:,} / {sents:,} | {ext} | {spl} | {workers} | {semi} | {ev} |"
        )
    notes = []
    p = results.get("propose") or (compare or {}).get("propose")
    if p:
        notes.append(
            f"propose, {p['images']:,} images, SAM-like masks, {p.get('processes', 1)} process(es): "
            f"{p['seconds'] / 60:.1f} min, peak RSS {_gb(p['peak_rss'])} GB in all, "
            f"{_gb(p.get('writer_peak', p['peak_rss']))} GB the largest process; "
            f"its scratch folder at most {p['scratch_bytes'] / 2**30:.2f} GB in "
            f"{p['scratch_files']:,} files; the store {p['store_bytes'] / 2**30:.2f} GB in "
            f"{p['store_files']} files"
        )
    for label, r in (("", results), (" (compared)", compare or {})):
        rf = r.get("refine")
        if rf:
            kind = "bit-packed" if rf.get("packed") else "bool"
            notes.append(
                f"refinement{label}, {rf.get('batch', 8)} x {rf.get('masks', 256)} proposals at "
                f"{rf.get('size', 480)} px ({kind}, inputs {rf['input_mb']:.0f} MB): extra memory "
                f"IOM {rf['iom']['extra_mb']:.0f} MB ({rf['iom']['ms']:.0f} ms), "
                f"CPI {rf['cpi']['extra_mb']:.0f} MB ({rf['cpi']['ms']:.0f} ms)"
            )
    if build.get("image_seconds"):
        notes.append(
            f"dataset build: {build['image_seconds'] / 60:.1f} min for the images "
            f"({build.get('images_bytes', 0) / 2**30:.2f} GB)"
        )
    return "\n".join(lines + [""] + [f"- {x}" for x in notes])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "child":  # a measured step: the code on PYTHONPATH (--code) is measured
        child_main(argv[1], argv[2])
        return 0
    sys.path.insert(0, str(REPO))  # the benchmark itself uses this checkout's library
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--root", type=Path, required=True, help="where the dataset and results live (git-ignored)"
    )
    ap.add_argument("--sizes", type=int, nargs="+", help="train images per size (default: 2,020 and all)")
    ap.add_argument("--steps", type=int, default=None, help="train-semi steps (default 20)")
    ap.add_argument("--code", type=Path, default=REPO, help="the checkout whose code is measured")
    ap.add_argument("--label", default="after", help="the results' name in --root")
    ap.add_argument("--compare", default=None, help="another label's results, shown in parentheses")
    ap.add_argument("--tiny", action="store_true", help="a tiny dataset at 96 x 72 (the tests)")
    ap.add_argument("--fresh", action="store_true", help="measure again what --root already holds")
    ap.add_argument("--build-only", action="store_true", help="the dataset and the store, no measurements")
    ap.add_argument(
        "--only", nargs="+", choices=("loader", "train_semi", "evaluate", "refine"), default=(),
        help="measure only these (extract and split, which they need, are measured once in any case)",
    )  # fmt: skip
    ap.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    args = ap.parse_args(argv)
    spec = TINY if args.tiny else REFCOCO
    opts = Options()
    if args.tiny:
        opts = Options(
            steps=8, batch=2, workers=(0, 1), run_workers=1, loader_batches=3, quality=4, refine_masks=16
        )
    if args.steps is not None:
        opts = Options(**{**asdict(opts), "steps": args.steps})
    opts = Options(**{**asdict(opts), "only": tuple(args.only)})
    full = spec.splits["train"].images
    sizes = args.sizes or ([20, full] if args.tiny else [2020, full])
    if max(sizes) > full or min(sizes) < 2:
        ap.error(f"--sizes must lie in [2, {full}]")
    bench = Bench(args.root, spec, opts, args.code.resolve(), args.label, fresh=args.fresh)
    bench.run(sizes, build_only=args.build_only)
    if args.build_only:
        return 0
    compare = None
    if args.compare:
        path = args.root / f"results-{args.compare}.json"
        compare = json.loads(path.read_text()) if path.is_file() else None
    build = json.loads((args.root / "build.json").read_text())
    print()
    print(table(bench.results, compare, sizes, build))
    if args.out is not None:
        args.out.write_text(json.dumps(bench.results, indent=1, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
