"""From the network's logits to masks: the forward pass in inference mode, bilinear upsampling
to any size in bounded memory, and the foreground mask with its area, box and mean probability.

LAVT's logits are ``B x 2 x S x S`` (background, object) at the model's input size. The mask
at another size is the argmax of the logits brought there bilinearly
(``F.interpolate(mode="bilinear", align_corners=False)``). Interpolation is linear, so that
argmax is the sign of the interpolated difference ``d = object - background``, and the
foreground probability ``softmax(logits)[1]`` is ``sigmoid(d)``: one channel to upsample,
not two. It is upsampled a band of rows at a time, so the mask of an 8000 x 6000 photo never
holds its 2 x 48 M float logits at once.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

BAND_PIXELS = 1 << 22  # output pixels upsampled at once (16 MB of float32)


PRECISIONS = ("fp32", "bf16")


def forward(
    network: nn.Module,
    image: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    precision: str = "fp32",
) -> torch.Tensor:
    """Logits ``B x 2 x S x S`` float32 of ``image`` ``B x 3 x S x S`` in [0, 1] and the token ids
    and attention mask ``B x T``; no gradients. ``precision``: ``"fp32"`` (the paper's
    evaluation) or ``"bf16"`` (autocast on the image's device: about twice as fast on a GPU,
    a few masks differ by a pixel or so)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: expected one of {PRECISIONS}")
    amp = (
        torch.autocast(image.device.type, dtype=torch.bfloat16)
        if precision == "bf16"
        else contextlib.nullcontext()
    )
    with torch.no_grad(), amp:
        return network(image, input_ids, attention_mask).float()


def difference(logits: torch.Tensor) -> torch.Tensor:
    """``... x 2 x H x W`` logits -> ``... x H x W`` object minus background (> 0: foreground)."""
    return logits[..., 1, :, :] - logits[..., 0, :, :]


def _axis(
    in_size: int, out_size: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For each output index along one axis: the two source indices and the second's weight,
    as ``F.interpolate(mode="bilinear", align_corners=False)`` computes them."""
    # float32 arithmetic, as PyTorch's kernel for float input
    scale = torch.tensor(in_size / out_size, dtype=torch.float32)
    src = ((torch.arange(out_size, device=device, dtype=torch.float32) + 0.5) * scale.to(device) - 0.5).clamp(
        min=0
    )
    i0 = src.floor().long().clamp(max=in_size - 1)
    w1 = (src - i0).clamp(0, 1)
    i1 = (i0 + 1).clamp(max=in_size - 1)
    return i0, i1, w1


def upsampled_bands(
    d: torch.Tensor, size: tuple[int, int], band_pixels: int = BAND_PIXELS
) -> Iterator[tuple[int, torch.Tensor]]:
    """``d`` ``h x w`` bilinearly resized to ``size`` ``(H, W)``, as ``(first row, rows x W)``
    bands of at most ``band_pixels`` values, top to bottom, on ``d``'s device."""
    h_out, w_out = size
    d = d.float()
    y0, y1, wy = _axis(d.shape[0], h_out, d.device)
    step = max(1, band_pixels // max(1, w_out))
    for top in range(0, h_out, step):
        rows = slice(top, min(h_out, top + step))
        a = wy[rows, None]
        by_row = d[y0[rows]] * (1 - a) + d[y1[rows]] * a  # rows x w: the rows' source lines blended
        # then along each row, by the kernel F.interpolate uses for that axis
        yield top, F.interpolate(by_row[None], size=w_out, mode="linear", align_corners=False)[0]


def foreground(d: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The mask ``H x W`` bool (on ``d``'s device) of the difference ``d`` ``h x w`` brought to
    ``size`` bilinearly: the argmax of the upsampled logits."""
    out = torch.empty(size, dtype=torch.bool, device=d.device)
    for top, band in upsampled_bands(d, size):
        out[top : top + band.shape[0]] = band > 0
    return out


@dataclass(frozen=True)
class MaskSummary:
    """A foreground mask at a requested size and what a caller reports about it."""

    mask: np.ndarray  # H x W bool
    area: int  # foreground pixels
    bbox: tuple[int, int, int, int] | None  # x, y, width, height of the foreground (COCO), None if empty
    score: float | None  # mean foreground probability over the mask's pixels, None if empty


def summarize(d: torch.Tensor, size: tuple[int, int]) -> MaskSummary:
    """:func:`foreground` of ``d`` at ``size``, on the host, with its area, box and mean
    foreground probability, computed band by band."""
    h, w = size
    mask = np.empty((h, w), dtype=bool)
    prob_sum = torch.zeros((), dtype=torch.float64, device=d.device)
    cols = torch.zeros(w, dtype=torch.bool, device=d.device)
    row_hits: list[torch.Tensor] = []
    for top, band in upsampled_bands(d, size):
        m = band > 0
        prob_sum += (torch.sigmoid(band) * m).sum(dtype=torch.float64)
        cols |= m.any(0)
        row_hits.append(m.any(1))
        mask[top : top + band.shape[0]] = m.cpu().numpy()
    area = int(mask.sum())
    if area == 0:
        return MaskSummary(mask, 0, None, None)
    ys = torch.cat(row_hits).nonzero().flatten()
    xs = cols.nonzero().flatten()
    y, x = int(ys[0]), int(xs[0])
    bbox = (x, y, int(xs[-1]) - x + 1, int(ys[-1]) - y + 1)
    return MaskSummary(mask, area, bbox, float(prob_sum) / area)
