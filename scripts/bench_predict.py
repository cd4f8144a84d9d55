"""Benchmark: `semires predict`'s throughput, and its memory on a very large photo.

    python scripts/bench_predict.py [--checkpoint data/train_semi/cpi_pwa/5/model.pt]
        [--preset tiny|paper] [--device cpu|cuda] [--images 64] [--size 640x480]
        [--batch-size 16] [--threads N] [--huge 8000x6000]

Without ``--checkpoint`` the network is the preset's with random weights (``paper``: Swin-B
and a random BERT-base at 480 x 480, the paper's sizes; speed does not depend on the
weights). JPEG photos of ``--size`` are written to a temporary folder, then it prints
images per second for:

- ``network``: the batched forward pass alone, on images already at the input size;
- ``segment``: :meth:`Segmenter.segment` from the JPEG files: decode, resize, tokenize,
  forward, logits back to the photo's size, mask statistics;
- ``predict``: the same plus what `semires predict` writes per request (mask PNG, overlay
  PNG, one JSON line).

``--huge`` then predicts one photo of that size and prints the process's peak memory
before and after it (the photo is written by a child process, so its pixels never count).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from semires.inference import Segmenter, load_model
from semires.overlay import draw_overlay
from stages.predict import OVERLAY_COMPRESSION, Request, output_stem, record, save_png

SENTENCES = ["the red circle on the left", "the small blue square", "the lowest shape", "the green diamond"]


def random_model(preset_name: str, device: torch.device) -> Segmenter:
    """The preset with random weights; ``paper`` gets a random BERT-base (30,522 tokens)."""
    from semires.model.build import PRESETS, ModelSpec, TextConfig, build_from_spec, small_bert_config
    from semires.model.text import TextTokenizer

    cfg = PRESETS[preset_name]
    if cfg.text is None:
        base = TextConfig(
            hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072, vocab_size=30522
        )
        cfg = dataclasses.replace(cfg, text=base, pretrained=False)
    tokenizer = TextTokenizer.build_wordpiece(SENTENCES * 4, cfg.text.vocab_size)
    vocab = cfg.text.vocab_size if preset_name == "paper" else tokenizer.vocab_size
    spec = ModelSpec(cfg, small_bert_config(cfg, vocab).to_json_string(), tokenizer.to_str())
    torch.manual_seed(0)
    return Segmenter(build_from_spec(spec), spec, weights="random", device=device)


def photos(folder: Path, n: int, size: tuple[int, int]) -> list[Path]:
    """``n`` JPEGs of ``size`` (w, h): smooth colour fields with a few discs, like photos to a codec."""
    rng = np.random.default_rng(0)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    paths = []
    for i in range(n):
        base = rng.uniform(40, 200, 3)
        img = base + 30 * np.sin(xx[..., None] / rng.uniform(20, 80) + yy[..., None] / rng.uniform(20, 80))
        for _ in range(3):
            cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(0.05, 0.2) * min(w, h)
            img[(xx - cx) ** 2 + (yy - cy) ** 2 < r * r] = rng.uniform(0, 255, 3)
        paths.append(folder / f"photo_{i:04d}.jpg")
        Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(paths[-1], quality=90)
    return paths


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def rate(fn, count: int, device: torch.device, repeats: int = 3) -> float:
    """Best items per second of ``repeats`` runs of ``fn`` (after one warm-up run)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return count / best


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path)
    p.add_argument("--preset", default="tiny", choices=["tiny", "paper"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--size", default="640x480", help="photo width x height")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument(
        "--huge", default="8000x6000", help="one photo of this size for the memory check; '' skips"
    )
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model = (
        load_model(args.checkpoint, device=device) if args.checkpoint else random_model(args.preset, device)
    )
    size = tuple(int(v) for v in args.size.split("x"))
    sentences = [SENTENCES[i % len(SENTENCES)] for i in range(args.images)]
    print(f"{model}; {args.images} JPEGs of {size[0]}x{size[1]}, batches of {args.batch_size}, "
          f"{torch.get_num_threads()} CPU thread(s)")  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        paths = photos(folder, args.images, size)
        s = model.image_size
        inputs = torch.rand(args.batch_size, 3, s, s, device=device)
        batch_sents = sentences[: args.batch_size]
        n_batches = max(1, args.images // args.batch_size)

        def network() -> None:
            for _ in range(n_batches):
                model.logits(inputs, batch_sents)

        def segment() -> None:
            for _ in model.segment(paths, sentences, batch_size=args.batch_size):
                pass

        def predict() -> None:
            out = folder / "out"
            out.mkdir(exist_ok=True)
            preds = model.segment(paths, sentences, batch_size=args.batch_size, pictures=True)
            with (out / "predictions.jsonl").open("w") as lines:
                for k, (path, text, pred) in enumerate(zip(paths, sentences, preds, strict=True), 1):
                    stem = output_stem(k, len(paths), path)
                    save_png(out / f"{stem}.mask.png", Image.fromarray(pred.mask.astype(np.uint8) * 255))
                    overlay = draw_overlay(pred.picture, pred.picture_mask, text)
                    save_png(out / f"{stem}.overlay.png", overlay, compress_level=OVERLAY_COMPRESSION)
                    req = Request(path, text, {"image": str(path), "text": text}, "")
                    lines.write(json.dumps(record(req, pred, stem)) + "\n")

        rows = [
            ("network (forward pass only)", rate(network, n_batches * args.batch_size, device)),
            ("segment (decode .. mask at the photo's size)", rate(segment, args.images, device)),
            ("predict (segment + mask/overlay PNGs + JSON)", rate(predict, args.images, device, repeats=2)),
        ]
        for name, r in rows:
            print(f"  {name:<46} {r:8.1f} images/s")
        if args.huge != "0":
            w, h = (int(v) for v in args.huge.split("x"))
            huge = folder / "huge.jpg"
            code = (
                "import numpy as np; from PIL import Image; "
                f"a = np.zeros(({h}, {w}, 3), np.uint8); a[:, :{w // 2}] = (200, 40, 40); "
                f"Image.fromarray(a).save({str(huge)!r}, quality=90)"
            )
            subprocess.run([sys.executable, "-c", code], check=True)
            before = peak_mb()
            t0 = time.perf_counter()
            (pred,) = model.segment([huge], [SENTENCES[0]], pictures=True)
            seconds = time.perf_counter() - t0
            print(
                f"  {w}x{h} JPEG ({w * h * 3 / 2**20:.0f} MB as RGB): {seconds:.2f} s, "
                f"mask {pred.mask.shape}, overlay picture {pred.picture.shape[:2]}; "
                f"peak memory {before:.0f} MB -> {peak_mb():.0f} MB"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
