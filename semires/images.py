"""Reading image files as ``H x W x 3`` uint8 RGB, whatever a camera or the web produced.

Every reader here turns the file's colour mode into 8-bit RGB the way an image viewer shows
it: greyscale and palette images are expanded, 16-bit greyscale is scaled to 8 bits (Pillow's
own conversion clips it, so a 16-bit PNG would read as white), transparent pixels are laid on
white, CMYK goes through Pillow's conversion.

Two orientations exist for a JPEG from a phone: the *stored* pixel grid and the one its EXIF
orientation tag asks a viewer to show. Annotations (COCO masks and the sizes in
``instances.json``) are made on the stored grid, so the dataset readers (:func:`read_rgb`:
training, evaluation, proposals) read it untransposed, as the official code does.
:func:`read_image` (inference on a user's photo) turns it upright first, so that a mask fits
the image as displayed.

A file of more than :data:`MAX_PIXELS` pixels is refused before it is decoded (a
decompression bomb: a few kilobytes of PNG can claim 20000 x 20000 pixels); callers that
trust their files pass a larger ``max_pixels``. :func:`read_image` can also decode a large
image at a reduced size (JPEG's DCT scaling, else a box filter), so that memory stays bounded
by ``max_side`` and not by the camera.
"""

from __future__ import annotations

import contextlib
import io
import os
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from semires.errors import SemiresError

# Pillow refuses more than twice its MAX_IMAGE_PIXELS (and warns above it); this is that hard limit.
MAX_PIXELS = 2 * 89_478_485
# EXIF orientations that swap width and height (transpose, 90 degrees, transverse, 270 degrees).
_SWAPS_AXES = (5, 6, 7, 8)
_EXIF_ORIENTATION = 0x0112
# What turns a stored image upright, per EXIF orientation (as ImageOps.exif_transpose).
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_DATASET_FIX = "replace the file and rerun"
_USER_TOO_BIG = (
    "downscale it, or if you trust the file raise the limit (semires predict --max-pixels, max_pixels=)"
)
_pillow_limit = threading.Lock()


@dataclass(frozen=True)
class DecodedImage:
    """An image as :func:`read_image` decoded it.

    ``rgb`` is ``h x w x 3`` uint8, the whole picture, possibly reduced; ``size`` is the full
    image's ``(H, W)`` (upright when EXIF orientation was applied): masks are made at ``size``.
    """

    rgb: np.ndarray
    size: tuple[int, int]

    @property
    def reduced(self) -> bool:
        return self.rgb.shape[:2] != self.size


def read_rgb(path: str | os.PathLike, *, max_pixels: int = MAX_PIXELS) -> tuple[np.ndarray, bytes]:
    """``(H x W x 3 uint8 RGB in the stored orientation, the file's bytes)``: the dataset reader.

    A missing, empty or undecodable file, or one above ``max_pixels``, is a
    :class:`SemiresError` naming it (the bytes let a caller hash the file without reading it
    twice).
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise SemiresError(f"{path}: cannot read image: image not found; check dataset.image_dir") from None
    except IsADirectoryError:
        raise SemiresError(f"{path}: a folder, not an image; check dataset.image_dir") from None
    except OSError as e:
        raise SemiresError(f"{path}: cannot read image ({e.strerror}); check dataset.image_dir") from e
    if not data:
        raise SemiresError(f"{path}: empty file (0 bytes), not an image; {_DATASET_FIX}")
    with _decoding(path, _DATASET_FIX), _open(io.BytesIO(data), path, max_pixels, _DATASET_FIX) as im:
        return to_rgb(im), data


def read_image(
    source: str | os.PathLike | Image.Image,
    *,
    max_side: int | None = None,
    max_pixels: int = MAX_PIXELS,
    exif: bool = True,
) -> DecodedImage:
    """A user's image, upright (``exif``), decoded at full size or reduced to bound memory.

    ``source`` is a path or an open PIL image. With ``max_side``, an image whose longer side
    is at least twice ``max_side`` is decoded smaller by an integer factor (a JPEG by its DCT
    scaling, 2, 4 or 8, without ever holding the full picture), so its longer side ends in
    ``[max_side, 2 * max_side)``; ``size`` still gives the full size.
    """
    fix = "check the path, or convert the image to PNG or JPEG"
    if isinstance(source, Image.Image):
        with _decoding(_describe(source), fix):
            return _decode(source, max_side, exif, draft=False)  # draft would change the caller's image
    path = Path(source)
    if path.is_dir():
        raise SemiresError(f"{path}: a folder, not an image; pass an image file")
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise SemiresError(f"{path}: image not found; check the path") from None
    except OSError as e:
        raise SemiresError(f"{path}: cannot read image ({e.strerror}); check the path") from e
    if size == 0:
        raise SemiresError(f"{path}: empty file (0 bytes), not an image; replace the file")
    with _decoding(path, fix), _open(path, path, max_pixels, _USER_TOO_BIG) as im:
        return _decode(im, max_side, exif)


def displayed_size(im: Image.Image) -> tuple[int, int]:
    """``(H, W)`` of ``im`` as a viewer shows it (after its EXIF orientation), without decoding."""
    w, h = im.size
    return (w, h) if _orientation(im) in _SWAPS_AXES else (h, w)


def to_rgb(im: Image.Image) -> np.ndarray:
    """``H x W x 3`` uint8 RGB of any Pillow mode, as a viewer shows it (decodes ``im``)."""
    if im.mode == "RGB":
        return np.array(im)
    if im.mode.startswith("I;16") or im.mode in ("I", "F"):
        grey = _to_8bit(np.asarray(im), im.mode)
        return np.repeat(grey[..., None], 3, axis=2)
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.array(Image.alpha_composite(white, rgba).convert("RGB"))
    return np.array(im.convert("RGB"))


def _to_8bit(a: np.ndarray, mode: str) -> np.ndarray:
    """Greyscale of more than 8 bits -> uint8. 16-bit (``I;16*``) is scaled by 255 / 65535, so
    65535 is white and a dark 16-bit image stays dark; 32-bit integers (``I``) likewise when
    they exceed 255, else they are 8-bit values already; floats (``F``) in [0, 1] by 255."""
    if mode == "F":
        a = np.nan_to_num(a.astype(np.float64), nan=0.0, posinf=255.0, neginf=0.0)
        top = float(a.max()) if a.size else 0.0
        return np.clip(np.rint(a * (255.0 if top <= 1.0 else 1.0)), 0, 255).astype(np.uint8)
    a = a.astype(np.int64)
    sixteen = mode.startswith("I;16") or (a.size > 0 and int(a.max()) > 255)
    if not sixteen:
        return np.clip(a, 0, 255).astype(np.uint8)
    return ((np.clip(a, 0, 65535) * 255 + 32767) // 65535).astype(np.uint8)


def _orientation(im: Image.Image) -> int:
    try:
        return int(im.getexif().get(_EXIF_ORIENTATION, 1))
    except Exception:  # a damaged EXIF block: show the image as stored, as viewers do
        return 1


def _decode(im: Image.Image, max_side: int | None, exif: bool, *, draft: bool = True) -> DecodedImage:
    orientation = _orientation(im) if exif else 1
    size = displayed_size(im) if exif else (im.height, im.width)
    if max_side is not None and max(im.size) >= 2 * max_side:
        if draft and im.format == "JPEG":  # no effect on an image already decoded
            longer = max(im.size)
            im.draft(im.mode, tuple(-(-s * max_side // longer) for s in im.size))  # 1/2, 1/4 or 1/8
        factor = max(im.size) // max_side
        if factor > 1:
            im = im.reduce(factor)
    if orientation in _TRANSPOSE:
        im = im.transpose(_TRANSPOSE[orientation])
    return DecodedImage(rgb=to_rgb(im), size=size)


def _describe(im: Image.Image) -> str:
    name = getattr(im, "filename", "") or ""
    return name or f"PIL image ({im.mode}, {im.width}x{im.height})"


@contextlib.contextmanager
def _decoding(name: str | os.PathLike, fix: str) -> Iterator[None]:
    """Decoding errors of Pillow and numpy as one :class:`SemiresError` naming the image."""
    try:
        yield
    except SemiresError:
        raise
    except UnidentifiedImageError:
        raise SemiresError(f"{name}: not an image file Pillow can read (unknown format); {fix}") from None
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        raise SemiresError(f"{name}: not a readable image ({e}); {fix}") from e
    except MemoryError:
        raise SemiresError(f"{name}: not enough memory to decode this image; {fix}") from None


@contextlib.contextmanager
def _open(fp, name: str | os.PathLike, max_pixels: int, too_big: str) -> Iterator[Image.Image]:
    """``Image.open`` with our pixel limit in place of Pillow's (so that a caller can raise it),
    checked on the header before anything is decoded; ``too_big`` says what to do above it."""
    with _pillow_limit, warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            im = Image.open(fp)
        finally:
            Image.MAX_IMAGE_PIXELS = saved
    with im:
        w, h = im.size
        if w * h > max_pixels:
            raise SemiresError(
                f"{name}: image of {w}x{h} = {w * h / 1e6:.0f} M pixels, above the limit of "
                f"{max_pixels / 1e6:.0f} M that guards against decompression bombs; {too_big}"
            )
        yield im
