"""A picture of a prediction: the image, the mask tinted over it and outlined, the sentence as caption.

The tint must show on any object, so it is the one of :data:`TINTS` farthest from the masked
pixels' mean colour (a red tint on a red shape would vanish), and the rest of the image is
dimmed.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw, ImageFont

TINTS = ((0, 255, 255), (255, 0, 255), (255, 255, 0), (255, 64, 0))  # cyan, magenta, yellow, orange
ALPHA = 0.5  # tint strength inside the mask
DIM = 0.55  # brightness outside it
MIN_SIDE = 320  # smaller images are enlarged (nearest) by a whole factor to at least this


def outline(mask: np.ndarray, width: int = 1) -> np.ndarray:
    """The pixels of ``mask`` (``H x W`` bool) within ``width`` pixels of its border."""
    inner = mask.copy()
    for _ in range(width):
        shrunk = inner.copy()
        shrunk[1:] &= inner[:-1]
        shrunk[:-1] &= inner[1:]
        shrunk[:, 1:] &= inner[:, :-1]
        shrunk[:, :-1] &= inner[:, 1:]
        inner = shrunk
    return mask & ~inner


def _wrap(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> list[str]:
    lines: list[str] = []
    for word in text.split():
        if lines and draw.textlength(f"{lines[-1]} {word}", font=font) <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines or [""]


def tint_for(colour: np.ndarray) -> tuple[int, int, int]:
    """The tint of :data:`TINTS` farthest from ``colour`` (RGB)."""
    return max(TINTS, key=lambda t: float(np.sum((np.asarray(t, np.float32) - colour) ** 2)))


def draw_overlay(image: np.ndarray, mask: np.ndarray, caption: str) -> Image.Image:
    """``image`` ``H x W x 3`` uint8, dimmed, with ``mask`` ``H x W`` bool tinted (see
    :func:`tint_for`) and outlined in white, and ``caption`` wrapped in a white strip below
    (marked when the mask is empty); enlarged by a whole factor when the longer side is under
    :data:`MIN_SIDE`."""
    if image.shape[:2] != mask.shape:
        raise ValueError(f"image {image.shape[:2]} and mask {mask.shape} differ in size")
    factor = max(1, math.ceil(MIN_SIDE / max(image.shape[:2])))
    if factor > 1:
        image = image.repeat(factor, 0).repeat(factor, 1)
        mask = mask.repeat(factor, 0).repeat(factor, 1)
    h, w = mask.shape
    out = image.astype(np.float32)
    inside = out[mask]
    tint = np.asarray(tint_for(inside.mean(0) if len(inside) else out.reshape(-1, 3).mean(0)), np.float32)
    out *= DIM
    out[mask] = inside * (1 - ALPHA) + tint * ALPHA
    out[outline(mask, max(1, min(h, w) // 240))] = 255
    if not mask.any():
        caption = f"{caption} (empty mask)"
    font_px = int(np.clip(w / 26, 12, 40))
    font = ImageFont.load_default(size=font_px)
    pad = max(4, font_px // 3)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    lines = _wrap(probe, caption, font, w - 2 * pad)
    line_h = int(font_px * 1.25)
    canvas = Image.new("RGB", (w, h + 2 * pad + line_h * len(lines)), (255, 255, 255))
    canvas.paste(Image.fromarray(out.round().astype(np.uint8)), (0, 0))
    draw = ImageDraw.Draw(canvas)
    for i, line in enumerate(lines):
        draw.text((pad, h + pad + i * line_h), line, fill=(0, 0, 0), font=font)
    return canvas
