"""Reading an image file, with one message for a missing or undecodable file."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from semires.errors import SemiresError


def read_rgb(path: str | os.PathLike) -> tuple[np.ndarray, bytes]:
    """``(H x W x 3 uint8 RGB, the file's bytes)``; a missing or undecodable file is a
    :class:`SemiresError` naming it (the bytes let a caller hash the file without reading it twice)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise SemiresError(f"{path}: cannot read image: image not found; check dataset.image_dir") from None
    except OSError as e:
        raise SemiresError(f"{path}: cannot read image ({e.strerror}); check dataset.image_dir") from e
    try:
        with Image.open(io.BytesIO(data)) as im:
            image = np.array(im.convert("RGB"))
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as e:
        raise SemiresError(f"{path}: not a readable image ({e}); replace the file and rerun") from e
    return image, data
