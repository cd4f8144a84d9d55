"""What checking a proposals store's digests costs when it is opened, at RefCOCO's size.

A store records the size and sha256 of every data file (version 3) and
:class:`~semires.proposals.store.ProposalStore` checks them all when it opens it. This script
builds a store of RefCOCO's train-image count (16,994 images of 640 x 480 by default, 64 per
shard: 266 shards) whose shards hold SAM-like masks (``scripts/bench_proposals.py``'s smooth
blobs, 100 per image), and prints: the bytes per mask and of the whole store, the seconds
``finish`` takes to record the digests, and the seconds to open the store with the check
and with the digests' sizes alone (what opening cost before). Making 266 shards of blobs
takes long, so ``--distinct`` images' masks are made and repeated over the rows of one shard,
and that shard's files are copied into every shard of the store: the bytes and the file
count are a real store's. The page cache is warm (the files were just written); a cold
read adds the disk's time to read the store once, which the training reads anyway.

    python scripts/bench_store_verify.py [--images 16994] [--masks-per-image 100] [--distinct 8]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "scripts"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from bench_proposals import sam_like_masks  # noqa: E402

from semires.proposals.store import (  # noqa: E402
    ImageResult,
    Layout,
    ProposalStore,
    create,
    data_files,
    finish,
    pack_masks,
    write_shard,
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=16994, help="train images (RefCOCO unc: 16,994)")
    ap.add_argument("--masks-per-image", type=int, default=100)
    ap.add_argument("--distinct", type=int, default=8, help="distinct images' masks made, then repeated")
    ap.add_argument("--shard-images", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=3, help="opens timed (the best is printed)")
    ap.add_argument("--dir", type=Path, default=None, help="where to build the store (default: a temp dir)")
    args = ap.parse_args()

    h, w, n = 480, 640, args.masks_per_image
    rng = np.random.default_rng(0)
    t = time.perf_counter()
    made = [sam_like_masks(rng, n, h, w) for _ in range(args.distinct)]
    attrs = rng.random((n, 7)).astype(np.float32)
    results = [ImageResult(pack_masks(m), attrs, n, h, w, n, "") for m in made]
    print(f"{args.distinct} images of {n} SAM-like masks made in {time.perf_counter() - t:.1f} s", flush=True)

    root = Path(tempfile.mkdtemp(dir=args.dir))
    try:
        path = root / "proposals.zarr"
        layout = Layout.build({i: (h, w) for i in range(args.images)}, 256, args.shard_images)
        create(path, layout, {"backend": "bench"})
        write_shard(path, layout, 0, [results[j % len(results)] for j in layout.shard(0)])
        for k in range(1, layout.num_shards):
            if len(layout.shard(k)) == len(layout.shard(0)):  # a full shard: the same bytes
                (path / f"masks/c/{k}").mkdir(parents=True)
                shutil.copy(path / "masks/c/0/0", path / f"masks/c/{k}/0")
                (path / f"attrs/c/{k}/0").mkdir(parents=True)
                shutil.copy(path / "attrs/c/0/0/0", path / f"attrs/c/{k}/0/0")
            else:
                write_shard(path, layout, k, [results[j % len(results)] for j in layout.shard(k)])
        files = data_files(path)
        total = sum((path / f).stat().st_size for f in files)
        t = time.perf_counter()
        finish(path, np.full(args.images, n))
        finish_s = time.perf_counter() - t

        def best(fn) -> float:
            times = []
            for _ in range(args.repeat):
                t = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t)
            return min(times)

        full_s = best(lambda: ProposalStore(path))
        recorded = json.loads((path / "zarr.json").read_text())["attributes"]["digests"]

        def sizes_only() -> None:
            for f in data_files(path):
                assert (path / f).stat().st_size == recorded[f][0]

        sizes_s = best(sizes_only)
        print(
            f"store: {args.images} images, {layout.num_shards} shards, {len(files)} data files, "
            f"{total / 1e6:.1f} MB ({total / (args.images * n):.0f} bytes/mask)"
        )
        print(f"finish (records every file's sha256): {finish_s:.2f} s")
        print(f"open with every digest checked: {full_s:.2f} s ({total / 1e6 / full_s:.0f} MB/s)")
        print(f"sizes alone (stat of every file): {sizes_s * 1e3:.1f} ms")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
