"""``semires predict``: masks from a trained model for images and sentences (not a DVC stage).

For request ``k`` (1-based) of ``--image``/``--text`` pairs or of a ``--batch`` file, it writes
into ``--out``: ``<k>-<image name>.mask.png`` (the mask at the image's own size, upright,
0/255), ``<k>-<image name>.overlay.png`` (the image with the mask tinted and the sentence as
caption) and one line of ``predictions.jsonl``.

A batch file is read and checked whole before the model is loaded (every line a JSON object
with a non-empty ``image`` path that exists and a non-empty ``text``), so a typo on its last
line costs nothing. Outputs are then written request by request as they are computed (each
PNG atomically, each JSON line flushed), so when an image turns out to be undecodable the
requests before it keep their outputs.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer
from PIL import Image
from tqdm import tqdm

from semires.atomic import atomic_path
from semires.errors import SemiresError
from semires.images import MAX_PIXELS
from semires.inference import BATCH_SIZE, Prediction, load_model
from semires.overlay import draw_overlay
from stages.common import log, stage_command

PREDICTIONS = "predictions.jsonl"
PROGRESS_MIN = 32  # requests from which a progress bar is shown (on a terminal)
# zlib level of the overlays: a photo compresses little, and level 6 took 2.4x level 1's time for 30 % less
OVERLAY_COMPRESSION = 1


@dataclass(frozen=True)
class Request:
    image: Path  # where to read it
    text: str
    given: dict[str, Any]  # the request as given, echoed in predictions.jsonl
    where: str  # how messages name it: "--image #2", "requests.jsonl line 7"


def from_options(images: list[Path], texts: list[str]) -> list[Request]:
    if len(images) != len(texts):
        raise SemiresError(
            f"{len(images)} --image but {len(texts)} --text; give one --text per --image, in the same order"
        )
    out = []
    for k, (image, text) in enumerate(zip(images, texts, strict=True), 1):
        if not text.strip():
            raise SemiresError(f"--text #{k} is empty; give the sentence that names the object in {image}")
        out.append(Request(image, text, {"image": str(image), "text": text}, f"--image #{k}"))
    return out


def read_batch(path: Path) -> list[Request]:
    """Every request of a JSON-lines file (blank lines skipped); image paths relative to the file's folder."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise SemiresError(f"{path}: batch file not found; check the path") from None
    except (OSError, UnicodeDecodeError) as e:
        raise SemiresError(f"{path}: cannot read the batch file ({e}); it must be UTF-8 JSON lines") from e
    shape = 'one {"image": "photo.jpg", "text": "the man on the left"} object per line'
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path} line {n}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise SemiresError(f"{where}: not valid JSON ({e.msg}, column {e.colno}); {shape}") from None
        if not isinstance(obj, dict):
            raise SemiresError(f"{where}: a JSON {type(obj).__name__}, not an object; {shape}")
        for key in ("image", "text"):
            if not isinstance(obj.get(key), str) or not obj[key].strip():
                got = "missing" if key not in obj else f"{obj[key]!r}"
                raise SemiresError(f'{where}: "{key}" is {got}; expected a non-empty string ({shape})')
        image = Path(obj["image"])
        out.append(Request(image if image.is_absolute() else path.parent / image, obj["text"], obj, where))
    if not out:
        raise SemiresError(f"{path}: no requests in the batch file; {shape}")
    return out


def check_images(requests: list[Request]) -> None:
    for r in requests:
        if not r.image.is_file():
            why = "a folder, not an image" if r.image.is_dir() else "image not found"
            raise SemiresError(f"{r.where}: {r.image}: {why}; check the path")


def output_stem(k: int, total: int, image: Path) -> str:
    """``0007-photo``: the request number, zero-padded, and the image's name in safe characters."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", image.stem)[:60] or "image"
    return f"{k:0{max(4, len(str(total)))}d}-{name}"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_png(path: Path, image: Image.Image, *, compress_level: int = 6, mode: int = 0o666) -> None:
    """``image`` as a PNG at ``path``, atomically, readable as any new file (the temporary
    file starts private)."""
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", compress_level=compress_level)
        tmp.chmod(mode & ~_umask())


def record(r: Request, p: Prediction, stem: str) -> dict[str, Any]:
    h, w = p.mask.shape
    return {
        "request": r.given,
        "mask": f"{stem}.mask.png",
        "overlay": f"{stem}.overlay.png",
        "height": h,
        "width": w,
        "area": p.area,
        "bbox": list(p.bbox) if p.bbox is not None else None,
        "mean_probability": round(p.score, 6) if p.score is not None else None,
        "truncated": p.truncated,
        "seconds": round(p.seconds, 6),
    }


@stage_command("predict")
def predict(
    model: Annotated[
        Path,
        typer.Option(
            "--model",
            help="A semires checkpoint: data/burn_in/<percent>/model.pt, "
            "data/train_semi/<method>/<percent>/model.pt, or an imported one.",
        ),
    ],
    out: Annotated[Path, typer.Option("--out", help="Folder for the masks, overlays and predictions.jsonl.")],
    images: Annotated[
        list[Path] | None, typer.Option("--image", help="An image (path); repeat, one per --text.")
    ] = None,
    texts: Annotated[
        list[str] | None,
        typer.Option("--text", help="The sentence naming the object in the --image at its position."),
    ] = None,
    batch: Annotated[
        Path | None,
        typer.Option(
            "--batch",
            help='JSON lines, one {"image": ..., "text": ...} a line; image paths relative to its folder.',
        ),
    ] = None,
    weights: Annotated[
        str | None,
        typer.Option(help="teacher or student of a teacher-student checkpoint (default: the teacher)."),
    ] = None,
    batch_size: Annotated[int, typer.Option(help="Requests through the network at once.")] = BATCH_SIZE,
    max_pixels: Annotated[
        int,
        typer.Option(help="Refuse larger images (decompression bombs); raise it for a trusted huge file."),
    ] = MAX_PIXELS,
) -> None:
    """Segment the object each sentence names: mask and overlay PNGs, one JSON line per request."""
    if batch is not None and (images or texts):
        raise SemiresError("give --image/--text pairs or --batch, not both")
    if batch is None and not images and not texts:
        raise SemiresError(
            "nothing to predict: give --image and --text (repeatable) or --batch requests.jsonl"
        )
    if batch_size < 1:
        raise SemiresError(f"--batch-size {batch_size}: expected at least 1")
    if out.exists() and not out.is_dir():
        raise SemiresError(f"--out {out}: a file, not a folder; give a folder for the outputs")
    requests = read_batch(batch) if batch is not None else from_options(images or [], texts or [])
    check_images(requests)
    start = time.perf_counter()
    segmenter = load_model(model, weights=weights)
    log("predict", f"{len(requests)} request(s) with {segmenter}")
    out.mkdir(parents=True, exist_ok=True)
    done = 0
    with (out / PREDICTIONS).open("w", encoding="utf-8") as lines:
        predictions = segmenter.segment(
            [r.image for r in requests],
            [r.text for r in requests],
            batch_size=batch_size,
            pictures=True,
            max_pixels=max_pixels,
        )
        bar = tqdm(
            total=len(requests), unit="request", disable=True if len(requests) < PROGRESS_MIN else None
        )
        try:
            for r, p in zip(requests, predictions, strict=False):
                stem = output_stem(done + 1, len(requests), r.image)
                save_png(out / f"{stem}.mask.png", Image.fromarray(p.mask.astype("uint8") * 255))
                overlay = draw_overlay(p.picture, p.picture_mask, r.text)
                save_png(out / f"{stem}.overlay.png", overlay, compress_level=OVERLAY_COMPRESSION)
                lines.write(json.dumps(record(r, p, stem)) + "\n")
                lines.flush()
                done += 1
                bar.update()
        except SemiresError as e:
            kept = f" ({done} earlier request(s) written to {out})" if done else ""
            raise SemiresError(f"{requests[done].where}: {e}{kept}") from e
        finally:
            bar.close()
    seconds = time.perf_counter() - start
    log(
        "predict",
        f"{done} request(s) in {seconds:.1f} s ({done / seconds:.1f}/s, model load included) -> "
        f"{out}/{PREDICTIONS} and {2 * done} PNGs",
    )
