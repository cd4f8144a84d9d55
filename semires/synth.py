"""A synthetic referring-expression segmentation dataset, written in the REFER layout.

Each image holds a few coloured shapes (some overlapping, some sharing a colour or a shape)
on a textured background; each object that can be named unambiguously becomes a ref with
1-3 referring expressions that pick it out among the image's objects by colour, shape,
size, position or relation to another object ("the small red circle", "the leftmost
square", "the blue shape above the triangle"). The same expression would fit another
object of the image only by reading it wrongly, so a model has to read the sentence.

Segmentations are polygons where the object is fully visible, compressed RLE where a later
object occludes it (and for a share of the others), and uncompressed RLE with ``iscrowd=1``
for groups of dots, as COCO stores crowd regions. The files::

    <root>/synthref/instances.json
    <root>/synthref/refs(unc).p
    <root>/images/synthref/SYNTH_<split>_<id>.jpg
"""

from __future__ import annotations

import io
import json
import math
import pickle
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

DATASET = "synthref"
SPLIT_BY = "unc"
CATEGORIES = ("circle", "square", "triangle", "diamond", "dots")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (205, 40, 40),
    "green": (40, 165, 60),
    "blue": (45, 75, 215),
    "yellow": (235, 205, 35),
    "purple": (145, 55, 190),
}
SHAPES = CATEGORIES[:4]


@dataclass(frozen=True)
class SynthOptions:
    """What to generate. ``image_size`` and ``objects`` are inclusive ranges."""

    num_images: int = 400
    image_size: tuple[int, int] = (96, 128)
    objects: tuple[int, int] = (2, 4)
    split_shares: dict[str, float] = field(
        default_factory=lambda: {"train": 0.7, "val": 0.1, "testA": 0.1, "testB": 0.1}
    )
    crowd_share: float = 0.15  # images that also get a crowd region (a group of dots)
    overlap_share: float = 0.3  # objects placed to overlap an earlier one
    rle_share: float = 0.1  # fully visible objects stored as RLE anyway
    object_scale: float = 1.0  # radii x this (small: 7-10 %, big: 15-20 %, dots 2.5 % of the shorter side)
    seed: int = 0


@dataclass
class _Object:
    shape: str
    colour: str
    size: str  # "small" or "big"
    cx: float
    cy: float
    full: np.ndarray  # H x W bool, before occlusion
    polygons: list[list[float]] | None  # None for crowd regions
    visible: np.ndarray | None = None


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[float]:
    if shape == "circle":
        t = np.linspace(0, 2 * math.pi, 28, endpoint=False)
    elif shape == "square":
        t = np.array([0.25, 0.75, 1.25, 1.75]) * math.pi + angle
        r = r * 1.2
    elif shape == "diamond":
        t = np.array([0.0, 0.5, 1.0, 1.5]) * math.pi + angle
        r = r * 1.25
    else:  # triangle, pointing up
        t = np.array([-0.5, 1 / 6, 5 / 6]) * math.pi + angle
        r = r * 1.3
    xs, ys = cx + r * np.cos(t), cy + r * np.sin(t)
    return [round(float(v), 2) for xy in zip(xs, ys, strict=True) for v in xy]


def _rasterise(polygons: list[list[float]], h: int, w: int) -> np.ndarray:
    rles = mask_utils.frPyObjects(polygons, h, w)
    return mask_utils.decode(mask_utils.merge(rles)).astype(bool)


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A muted, textured background: a gradient, stripes or checks, and noise."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = rng.uniform(90, 170, size=3)
    grad = rng.uniform(-40, 40, size=(2, 3))
    img = base + (xx[..., None] / w) * grad[0] + (yy[..., None] / h) * grad[1]
    kind = rng.integers(3)
    period = rng.uniform(6, 18)
    if kind == 0:
        theta = rng.uniform(0, math.pi)
        tex = np.sin((xx * math.cos(theta) + yy * math.sin(theta)) * 2 * math.pi / period)
    elif kind == 1:
        tex = np.sign(np.sin(xx * 2 * math.pi / period) * np.sin(yy * 2 * math.pi / period))
    else:
        tex = rng.normal(size=(h // 4 + 1, w // 4 + 1)).repeat(4, 0).repeat(4, 1)[:h, :w]
    img = img + rng.uniform(8, 20) * tex[..., None]
    img = img + rng.normal(0, 6, size=img.shape)
    grey = img.mean(axis=2, keepdims=True)
    return 0.6 * grey + 0.4 * img  # desaturate: object colours stay the only vivid ones


def _place(rng, h, w, r, placed: list[_Object], overlap: bool) -> tuple[float, float] | None:
    for _ in range(50):
        cx, cy = rng.uniform(r + 1, w - r - 1), rng.uniform(r + 1, h - r - 1)
        if overlap and placed:
            o = placed[rng.integers(len(placed))]
            ang = rng.uniform(0, 2 * math.pi)
            d = rng.uniform(0.6, 1.0) * (r + 0.5 * math.sqrt(o.full.sum() / math.pi))
            cx = float(np.clip(o.cx + d * math.cos(ang), r + 1, w - r - 1))
            cy = float(np.clip(o.cy + d * math.sin(ang), r + 1, h - r - 1))
            return cx, cy
        if all(math.hypot(cx - o.cx, cy - o.cy) > r + math.sqrt(o.full.sum() / math.pi) + 3 for o in placed):
            return cx, cy
    return None


def _make_objects(rng: np.random.Generator, h: int, w: int, opts: SynthOptions) -> list[_Object]:
    n = int(rng.integers(opts.objects[0], opts.objects[1] + 1))
    side = min(h, w)
    objs: list[_Object] = []
    for i in range(n):
        # Distractors: often reuse an earlier object's shape or colour, so neither alone names it.
        if objs and rng.random() < 0.6:
            ref = objs[rng.integers(len(objs))]
            shape = ref.shape if rng.random() < 0.5 else str(rng.choice(SHAPES))
            colour = ref.colour if shape != ref.shape else str(rng.choice(list(COLOURS)))
        else:
            shape, colour = str(rng.choice(SHAPES)), str(rng.choice(list(COLOURS)))
        size = "big" if rng.random() < 0.5 else "small"
        r = side * opts.object_scale * (rng.uniform(0.15, 0.2) if size == "big" else rng.uniform(0.07, 0.1))
        pos = _place(rng, h, w, r, objs, overlap=i > 0 and rng.random() < opts.overlap_share)
        if pos is None:
            continue
        polys = [_polygon(shape, pos[0], pos[1], r, float(rng.uniform(-0.2, 0.2)))]
        objs.append(_Object(shape, colour, size, pos[0], pos[1], _rasterise(polys, h, w), polys))
    if rng.random() < opts.crowd_share:
        colour = str(rng.choice(list(COLOURS)))
        cx, cy = rng.uniform(0.2 * w, 0.8 * w), rng.uniform(0.2 * h, 0.8 * h)
        polys = []
        for _ in range(int(rng.integers(5, 10))):
            dx, dy = rng.normal(0, side * 0.08, size=2)
            polys.append(_polygon("circle", cx + dx, cy + dy, side * 0.025 * opts.object_scale, 0.0))
        full = _rasterise(polys, h, w)
        objs.append(_Object("dots", colour, "small", cx, cy, full, None))
    # Later objects are drawn over earlier ones: what stays visible is the mask.
    covered = np.zeros((h, w), bool)
    for o in reversed(objs):
        o.visible = o.full & ~covered
        covered |= o.full
    return [o for o in objs if o.visible.sum() >= max(12, 0.4 * o.full.sum())]


def _render(rng: np.random.Generator, h: int, w: int, objs: list[_Object]) -> np.ndarray:
    img = _background(rng, h, w)
    for o in objs:
        colour = np.array(COLOURS[o.colour], np.float32) + rng.normal(0, 8, size=3)
        shade = rng.normal(0, 7, size=(h, w, 1))
        img[o.visible] = (colour + shade)[o.visible]
    return np.clip(img, 0, 255).astype(np.uint8)


# --- referring expressions -------------------------------------------------------------

_Pred = Callable[[_Object], bool]


def _candidates(objs: list[_Object], w: int, h: int) -> list[tuple[str, _Pred, int]]:
    """``(expression, predicate over objects, how informative)`` for the image's objects."""
    out: list[tuple[str, _Pred, int]] = []
    colours = sorted({o.colour for o in objs})
    shapes = sorted({o.shape for o in objs if o.shape != "dots"})
    for c in colours:
        out.append((f"the {c} shape", lambda o, c=c: o.colour == c and o.shape != "dots", 1))
        out.append((f"the {c} dots", lambda o, c=c: o.colour == c and o.shape == "dots", 1))
        for s in shapes:
            out.append((f"the {c} {s}", lambda o, c=c, s=s: o.colour == c and o.shape == s, 2))
            for z in ("small", "big"):
                out.append(
                    (f"the {z} {c} {s}", lambda o, c=c, s=s, z=z: (o.colour, o.shape, o.size) == (c, s, z), 3)
                )
    for s in shapes:
        out.append((f"the {s}", lambda o, s=s: o.shape == s, 1))
        for z in ("small", "big"):
            out.append((f"the {z} {s}", lambda o, s=s, z=z: o.shape == s and o.size == z, 2))
    out.append(("the group of dots", lambda o: o.shape == "dots", 1))

    def extreme(pool: Sequence[_Object], key: Callable[[_Object], float], sign: int, margin: float):
        vals = sorted((sign * key(o), id(o)) for o in pool)
        if len(vals) < 2 or vals[1][0] - vals[0][0] < margin:
            return None
        return vals[0][1]

    axes = (
        ("leftmost", "on the left", lambda o: o.cx, 1, w),
        ("rightmost", "on the right", lambda o: o.cx, -1, w),
        ("topmost", "at the top", lambda o: o.cy, 1, h),
        ("lowest", "at the bottom", lambda o: o.cy, -1, h),
    )
    pools = {"shape": [o for o in objs if o.shape != "dots"]}
    pools.update({s: [o for o in objs if o.shape == s] for s in shapes})
    pools.update({c: [o for o in objs if o.colour == c and o.shape != "dots"] for c in colours})
    for noun, pool in pools.items():
        for sup, phrase, key, sign, extent in axes:
            best = extreme(pool, key, sign, 0.15 * extent)
            if best is None:
                continue
            if noun in COLOURS:
                texts = [f"the {sup} {noun} shape", f"the {noun} shape {phrase}"]
            else:
                texts = [f"the {sup} {noun}", f"the {noun} {phrase}"]
            for t in texts:
                out.append((t, lambda o, best=best: id(o) == best, 3))
    relations = (
        ("above", lambda a, b: a.cy < b.cy - 0.15 * h),
        ("below", lambda a, b: a.cy > b.cy + 0.15 * h),
        ("left of", lambda a, b: a.cx < b.cx - 0.15 * w),
        ("right of", lambda a, b: a.cx > b.cx + 0.15 * w),
    )
    for c in colours:
        for s in shapes:
            for word, rel in relations:

                def pred(o, c=c, s=s, rel=rel):
                    return (
                        o.colour == c
                        and o.shape != "dots"
                        and any(q is not o and q.shape == s and rel(o, q) for q in objs)
                    )

                out.append((f"the {c} shape {word} the {s}", pred, 3))
    return out


def _expressions(rng: np.random.Generator, objs: list[_Object], w: int, h: int) -> list[list[str]]:
    """For each object, 1-3 expressions that select it and no other object (or none)."""
    cands = _candidates(objs, w, h)
    unique: list[list[tuple[str, int]]] = [[] for _ in objs]
    for text, pred, weight in cands:
        hits = [i for i, o in enumerate(objs) if pred(o)]
        if len(hits) == 1:
            unique[hits[0]].append((text, weight))
    chosen = []
    for opts in unique:
        if not opts:
            chosen.append([])
            continue
        k = int(min(len(opts), rng.integers(1, 4)))
        p = np.array([wt for _, wt in opts], float)
        idx = rng.choice(len(opts), size=k, replace=False, p=p / p.sum())
        chosen.append([opts[i][0] for i in sorted(idx)])
    return chosen


# --- writing -------------------------------------------------------------------------------


def _uncompressed_rle(mask: np.ndarray) -> dict[str, Any]:
    """COCO's crowd format: column-major run lengths starting with a run of zeros."""
    flat = mask.T.reshape(-1).astype(np.int8)
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat[0]:
        counts = [0, *counts]
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": [int(c) for c in counts]}


def _assign_splits(n: int, shares: dict[str, float], rng: np.random.Generator) -> list[str]:
    names = list(shares)
    total = sum(shares.values())
    bounds = np.cumsum([shares[s] / total for s in names]) * n
    order = rng.permutation(n)
    split = [""] * n
    for rank, i in enumerate(order):
        split[i] = names[int(np.searchsorted(bounds, rank, side="right"))]
    return split


def write_dataset(root: str | Path, opts: SynthOptions) -> dict[str, int]:
    """Generate the dataset under ``root`` in the REFER layout; return counts.

    Deterministic: image ``i`` depends only on ``(seed, i)``.
    """
    root = Path(root)
    ds_dir, img_dir = root / DATASET, root / "images" / DATASET
    ds_dir.mkdir(parents=True, exist_ok=True)
    img_dir.mkdir(parents=True, exist_ok=True)
    splits = _assign_splits(opts.num_images, opts.split_shares, np.random.default_rng([opts.seed, 1 << 30]))
    images, annotations, refs = [], [], []
    ann_id = ref_id = sent_id = 0
    for i in range(opts.num_images):
        rng = np.random.default_rng([opts.seed, i])
        for _attempt in range(20):
            h = int(rng.integers(opts.image_size[0], opts.image_size[1] + 1))
            w = int(rng.integers(opts.image_size[0], opts.image_size[1] + 1))
            objs = _make_objects(rng, h, w, opts)
            exprs = _expressions(rng, objs, w, h)
            if any(exprs):
                break
        image_id = i + 1
        file_name = f"SYNTH_{splits[i]}_{image_id:012d}.jpg"
        buf = io.BytesIO()
        Image.fromarray(_render(rng, h, w, objs)).save(buf, format="JPEG", quality=92)
        (img_dir / file_name).write_bytes(buf.getvalue())
        images.append({"id": image_id, "file_name": file_name, "height": h, "width": w})
        for o, sents in zip(objs, exprs, strict=True):
            ann_id += 1
            occluded = bool((o.full & ~o.visible).any())
            if o.polygons is None:
                seg, crowd = _uncompressed_rle(o.visible), 1
            elif occluded or rng.random() < opts.rle_share:
                rle = mask_utils.encode(np.asfortranarray(o.visible.astype(np.uint8)))
                seg, crowd = {"size": [h, w], "counts": rle["counts"].decode()}, 0
            else:
                seg, crowd = o.polygons, 0
            rle = mask_utils.encode(np.asfortranarray(o.visible.astype(np.uint8)))
            bbox = [float(v) for v in mask_utils.toBbox(rle)]
            annotations.append(
                {
                    "id": ann_id,
                    "image_id": image_id,
                    "category_id": CATEGORIES.index(o.shape) + 1,
                    "segmentation": seg,
                    "area": float(mask_utils.area(rle)),
                    "bbox": bbox,
                    "iscrowd": crowd,
                }
            )
            if not sents:
                continue  # cannot be named unambiguously: an annotation without a ref
            ref_sents = []
            for s in sents:
                ref_sents.append({"tokens": s.split(), "raw": s, "sent": s, "sent_id": sent_id})
                sent_id += 1
            refs.append(
                {
                    "ref_id": ref_id,
                    "ann_id": ann_id,
                    "image_id": image_id,
                    "split": splits[i],
                    "category_id": CATEGORIES.index(o.shape) + 1,
                    "sentences": ref_sents,
                    "sent_ids": [s["sent_id"] for s in ref_sents],
                    "file_name": f"SYNTH_{splits[i]}_{image_id:012d}_{ann_id}.jpg",
                }
            )
            ref_id += 1
    instances = {
        "info": {"description": "semires synthetic referring-expression dataset", "seed": opts.seed},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": k + 1, "name": n, "supercategory": "shape"} for k, n in enumerate(CATEGORIES)],
    }
    (ds_dir / "instances.json").write_text(json.dumps(instances), encoding="utf-8")
    (ds_dir / f"refs({SPLIT_BY}).p").write_bytes(pickle.dumps(refs, protocol=2))
    return {"images": len(images), "annotations": len(annotations), "refs": len(refs), "sentences": sent_id}
