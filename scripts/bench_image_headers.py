"""What `extract`'s image check costs: every image's size read from its file header.

``semires.annotations.check_image_files`` opens each image of the annotations and reads its
stored size without decoding it. This script writes ``--images`` JPEGs of 640 x 480 (COCO's
typical size, with an EXIF block as cameras write it), times the check over them twice (the
first pass as the files come from the page cache after writing, then again), and prints the
wall and CPU time per image and for RefCOCO's 19,994 images at that rate (on a busy machine
the wall time is the CPU time's multiple). On a network file
system or a cold disk each header is one small random read more.

    python scripts/bench_image_headers.py [--images 2000]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from semires.annotations import Annotations, RefRecord, check_image_files  # noqa: E402

REFCOCO_IMAGES = 19994


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--dir", type=Path, default=None, help="where to write the images (default: a temp dir)")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(dir=args.dir))
    try:
        rng = np.random.default_rng(0)
        base = (np.linspace(0, 255, 640)[None, :, None] * np.ones((480, 1, 3))).astype(np.uint8)
        exif = Image.Exif()
        exif[0x010F], exif[0x0110], exif[0x0112] = "Camera", "Model", 1  # make, model, orientation
        refs = []
        for i in range(args.images):
            noisy = np.clip(base.astype(int) + rng.integers(-20, 20, base.shape), 0, 255).astype(np.uint8)
            name = f"COCO_train2014_{i:012d}.jpg"
            Image.fromarray(noisy).save(root / name, quality=90, exif=exif)
            refs.append(RefRecord(i, i, i, name, 480, 640, "train", 1, (0, 0, 1, 1), ("x",), (0,), {}))
        anns = Annotations("refcoco", "unc", refs)
        size = sum(f.stat().st_size for f in root.iterdir()) / args.images
        for attempt in ("first", "second"):
            t, c = time.perf_counter(), time.process_time()
            n = check_image_files(anns, root)
            dt, dcpu = time.perf_counter() - t, time.process_time() - c
            wall, cpu = dt / n, dcpu / n
            print(
                f"{attempt} pass: {n} images ({size / 1e3:.0f} kB each) in {dt:.2f} s wall, {dcpu:.2f} s CPU "
                f"= {wall * 1e6:.0f} us/image wall, {cpu * 1e6:.0f} us CPU; RefCOCO's {REFCOCO_IMAGES} "
                f"images: {wall * REFCOCO_IMAGES:.1f} s wall, {cpu * REFCOCO_IMAGES:.1f} s CPU"
            )
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
