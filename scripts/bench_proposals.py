"""Benchmark the proposals store against the public SemiRES code's format.

The public code writes, for every referred object, one JSON file holding SAM's masks as lists
of (1-based start, length) runs in column-major order, and at every training step decodes
them in a Python loop over runs and resizes the stack with ``F.interpolate(mode="nearest")``.
This script stores the same masks both ways and reports bytes per mask and milliseconds to
load one image's masks at the training size, on

(a) the synthetic dataset's train images with the offline backend (and its calls per image);
(b) SAM-like masks: smooth random blobs at 640 x 480, about 100 per image, with scores drawn
    like SAM's (predicted IoU and stability score, as float32).

    python scripts/bench_proposals.py [--images 40] [--sam-like-images 4] [--size 480]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from semires.proposals.base import Proposals, cap, read_image
from semires.proposals.offline import FelzenszwalbMultiscale
from semires.proposals.store import ImageResult, Layout, ProposalStore, create, finish, write_shard
from semires.refer import read_refer
from semires.synth import SynthOptions, write_dataset

# --- the public code's format (reimplemented from its description) --------------------------


def runs_encode(mask: np.ndarray) -> dict:
    """``H x W`` bool -> {"counts": [start1, len1, start2, len2, ...], "size": [H, W]}:
    1-based starts of the runs of ones in column-major order, as the public code writes."""
    pixels = np.concatenate([[0], mask.T.reshape(-1).astype(np.uint8), [0]])
    runs = np.flatnonzero(pixels[1:] != pixels[:-1]) + 1
    runs[1::2] -= runs[::2]
    return {"counts": [int(x) for x in runs], "size": [int(s) for s in mask.shape]}


def runs_decode(rle: dict) -> np.ndarray:
    """The public code's decoder: a Python loop over the runs."""
    h, w = rle["size"]
    mask = np.zeros(h * w, dtype=np.uint8)
    counts = np.array(rle["counts"])
    for start, length in zip(counts[0::2], counts[1::2], strict=True):
        mask[start - 1 : start - 1 + length] = 1
    return mask.reshape((h, w), order="F")


def public_save(path: Path, masks: np.ndarray) -> None:
    path.write_text(json.dumps([runs_encode(m) for m in masks]))


def public_load(path: Path, size: int) -> torch.Tensor:
    """As the public dataset's ``__getitem__``: json.load, decode each mask, resize the stack."""
    with open(path) as f:
        rles = json.load(f)
    n = len(rles)
    h, w = rles[0]["size"]
    masks = np.zeros((n, h, w), dtype=np.uint8)
    for k in range(n):
        masks[k] = runs_decode(rles[k])
    return F.interpolate(torch.tensor(masks)[None], size=(size, size), mode="nearest")[0] > 0


# --- SAM-like masks -------------------------------------------------------------------------


def sam_like_masks(rng: np.random.Generator, n: int, h: int, w: int) -> np.ndarray:
    """``n x h x w`` bool smooth blobs of varied size: thresholded low-pass noise, half of them
    unions of a few ellipses, like SAM's object and part masks."""
    out = np.zeros((n, h, w), bool)
    yy, xx = np.mgrid[0:h, 0:w]
    for i in range(n):
        if i % 2:
            sigma = rng.uniform(8, 40)
            noise = ndimage.gaussian_filter(rng.normal(size=(h // 4, w // 4)), sigma / 4)
            blob = np.kron(noise, np.ones((4, 4)))[:h, :w] > np.quantile(noise, 1 - rng.uniform(0.005, 0.2))
            lab, k = ndimage.label(blob)
            if k:  # one connected part, as SAM's masks mostly are
                sizes = ndimage.sum(blob, lab, range(1, k + 1))
                blob = lab == 1 + int(np.argmax(sizes))
            out[i] = blob
        else:
            for _ in range(int(rng.integers(1, 4))):
                cy, cx = rng.uniform(0, h), rng.uniform(0, w)
                ry, rx = rng.uniform(5, h / 4), rng.uniform(5, w / 4)
                out[i] |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1
    return out


# --- the comparison -------------------------------------------------------------------------


def _store(root: Path, per_image: dict[int, Proposals]) -> ProposalStore:
    # full shards, as in a real run (a shard's index is sized for all its images)
    shard = min(64, len(per_image))
    layout = Layout.build(
        {i: p.masks.shape[1:] for i, p in per_image.items()}, max_masks=256, shard_images=shard
    )
    create(root, layout, {"backend": "bench"})
    results = {i: ImageResult.from_proposals(p, len(p), "") for i, p in per_image.items()}
    for k in range(layout.num_shards):
        write_shard(root, layout, k, [results[layout.images[j][0]] for j in layout.shard(k)])
    finish(root, np.array([results[i].num_masks for i, _, _ in layout.images]))
    return ProposalStore(root)


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _ms(fn, repeat: int) -> float:
    fn()  # warm: page cache, lazy imports
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat * 1e3


def compare(name: str, per_image: dict[int, Proposals], size: int, work: Path, repeat: int) -> dict:
    work.mkdir(parents=True)
    total = sum(len(p) for p in per_image.values())
    s = _store(work / "store.zarr", per_image)
    for i, p in per_image.items():
        public_save(work / f"{i}.json", p.masks)
        ours, theirs = s.masks(i, size=(size, size)), public_load(work / f"{i}.json", size)
        assert torch.equal(ours, theirs), f"{name}: image {i}: the two formats disagree"
    ours_bytes = _dir_bytes(work / "store.zarr")
    ours_mask_bytes = _dir_bytes(work / "store.zarr/masks")
    public_bytes = sum((work / f"{i}.json").stat().st_size for i in per_image)
    ids = list(per_image)
    ours_ms = np.mean([_ms(lambda i=i: s.masks(i, size=(size, size)), repeat) for i in ids])
    public_ms = np.mean(
        [_ms(lambda i=i: public_load(work / f"{i}.json", size), max(1, repeat // 5)) for i in ids]
    )
    h, w = next(iter(per_image.values())).masks.shape[1:]
    return {
        "name": name,
        "images": len(per_image),
        "masks": total,
        "image": f"{w}x{h}" if len({p.masks.shape[1:] for p in per_image.values()}) == 1 else "varied",
        "raw_bytes_per_mask": np.mean([p.masks[0].size for p in per_image.values()]),
        "ours_bytes_per_mask": ours_bytes / total,
        "ours_mask_bytes_per_mask": ours_mask_bytes / total,
        "public_bytes_per_mask": public_bytes / total,
        "ours_ms": ours_ms,
        "public_ms": public_ms,
        "files": sum(1 for f in (work / "store.zarr").rglob("*") if f.is_file()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=40, help="synthetic train images to use")
    ap.add_argument("--sam-like-images", type=int, default=4)
    ap.add_argument("--masks-per-image", type=int, default=100)
    ap.add_argument("--size", type=int, default=480, help="training size (square)")
    ap.add_argument("--repeat", type=int, default=20)
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_dataset(tmp / "refer", SynthOptions(num_images=int(args.images / 0.7) + 4, seed=0))
        anns = read_refer(tmp / "refer", "synthref", "unc")
        backend = FelzenszwalbMultiscale()
        images = sorted(anns.images("train").items())[: args.images]
        start = time.perf_counter()
        synth = {
            i: cap(backend(read_image(tmp / "refer/images/synthref" / f)[0]), 256) for i, (f, _, _) in images
        }
        seconds = time.perf_counter() - start
        rows.append(compare("synthetic (offline backend)", synth, args.size, tmp / "a", args.repeat))
        rows[-1]["calls_per_image"] = backend.calls / len(synth)
        rows[-1]["backend_s_per_image"] = seconds / len(synth)

        rng, scores = np.random.default_rng(0), np.random.default_rng(1)
        like = {
            i: Proposals.from_masks(
                sam_like_masks(rng, args.masks_per_image, 480, 640),
                predicted_iou=scores.uniform(0.88, 1.0, args.masks_per_image),
                stability_score=scores.uniform(0.92, 1.0, args.masks_per_image),
            )
            for i in range(args.sam_like_images)
        }
        rows.append(compare("SAM-like blobs", like, args.size, tmp / "b", args.repeat))

    print(f"\nload = one image's masks as an N x {args.size} x {args.size} bool tensor (1 CPU thread)\n")
    head = (
        "| data | images | masks | image | raw B/mask | ours B/mask (masks only) | public B/mask | "
        "smaller | ours ms/image | public ms/image | faster | store files |"
    )
    print(head)
    print("|---" * (head.count("|") - 1) + "|")
    for r in rows:
        smaller = r["public_bytes_per_mask"] / r["ours_bytes_per_mask"]
        cells = [
            r["name"],
            r["images"],
            r["masks"],
            r["image"],
            f"{r['raw_bytes_per_mask']:.0f}",
            f"{r['ours_bytes_per_mask']:.0f} ({r['ours_mask_bytes_per_mask']:.0f})",
            f"{r['public_bytes_per_mask']:.0f}",
            f"{smaller:.1f}x",
            f"{r['ours_ms']:.2f}",
            f"{r['public_ms']:.1f}",
            f"{r['public_ms'] / r['ours_ms']:.1f}x",
            r["files"],
        ]
        print("| " + " | ".join(str(c) for c in cells) + " |")
    r = rows[0]
    print(
        f"\nbackend calls per image (offline, synthetic): {r['calls_per_image']:.2f} "
        f"({r['backend_s_per_image'] * 1e3:.0f} ms/image); the public code calls SAM once per referred "
        "object and writes one JSON per object, so its bytes and calls also multiply by refs per image "
        "(about 2.5 on RefCOCO)."
    )


if __name__ == "__main__":
    main()
