"""Resizing to the model's input size, pixel for pixel as the official pipeline does it.

The official scripts resize with ``torchvision.transforms.functional.resize`` on PIL images:
the image with PIL's ``BILINEAR`` on its uint8 pixels (antialiased when it shrinks: the
filter's support grows with the scale) and the ground-truth mask with PIL's ``NEAREST``.
:func:`resize_image` and :func:`resize_mask` give those very arrays.

Nearest resizing picks one source row and column per output one; which one is a *rule*:

- ``"pil"``: PIL's ``NEAREST``, the source pixel whose centre is nearest to the output
  pixel's centre (``floor((x + 0.5) * src / dst)``, in PIL's own float arithmetic). It lines
  up with the bilinear image, which is centre-aligned too.
- ``"torch"``: ``F.interpolate(mode="nearest")``, ``floor(x * src / dst)``: up to half an
  output pixel towards the top left. The official code resizes the SAM proposals so.

:func:`nearest_index` asks the library itself for the index of every output row or column,
once per pair of sizes, so every nearest resize here (masks, bit-packed proposals) picks by
index and equals the library's result exactly.
"""

from __future__ import annotations

import functools
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

NearestRule = Literal["pil", "torch"]
NEAREST_RULES: tuple[str, ...] = ("pil", "torch")


@functools.lru_cache(maxsize=128)
def nearest_index(src: int, dst: int, rule: NearestRule = "pil", axis: int = 1) -> np.ndarray:
    """The source index of each of ``dst`` outputs of nearest resizing ``src`` -> ``dst``
    under ``rule``: read-only int64 ``dst``. ``axis`` 0 for rows, 1 for columns (PIL computes
    them alike; each is asked of it along its own axis all the same)."""
    if rule == "torch":
        grid = torch.arange(src, dtype=torch.float32).view(1, 1, src)
        out = F.interpolate(grid, size=dst, mode="nearest").view(dst).long().numpy()
    elif rule == "pil":
        line = np.arange(src, dtype=np.int32)
        im = Image.fromarray(line[None, :] if axis == 1 else line[:, None])  # mode "I"
        size = (dst, 1) if axis == 1 else (1, dst)
        out = np.asarray(im.resize(size, Image.Resampling.NEAREST)).reshape(dst).astype(np.int64)
    else:
        raise ValueError(f"nearest rule {rule!r}: expected one of {NEAREST_RULES}")
    out.flags.writeable = False
    return out


def resize_mask(mask: np.ndarray, size: tuple[int, int], rule: NearestRule = "pil") -> np.ndarray:
    """``... x H x W`` -> ``... x h x w`` (``size``), nearest under ``rule``, same dtype: with
    ``"pil"`` the array ``Image.resize(..., NEAREST)`` gives for each ``H x W`` plane."""
    h, w = mask.shape[-2:]
    rows, cols = nearest_index(h, size[0], rule, 0), nearest_index(w, size[1], rule, 1)
    return np.take(np.take(mask, rows, axis=-2), cols, axis=-1)


def resize_image(image: np.ndarray, size: int) -> np.ndarray:
    """``H x W x 3`` uint8 -> ``size x size x 3`` uint8: PIL's bilinear resize, as the
    official ``T.Resize`` (antialiased when shrinking, rounded to uint8)."""
    return np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BILINEAR))
