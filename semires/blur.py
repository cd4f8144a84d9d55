"""PIL's ``ImageFilter.GaussianBlur``, pixel for pixel, on uint8 tensors of any device.

The official weak view blurs with PIL (``GaussianBlur(radius=1)`` on the uint8 image). PIL
approximates the Gaussian by three passes of an *extended box filter* along the rows, then
three along the columns (Gwosdek et al., SSVM 2011), in integer arithmetic with the result
rounded to uint8 after every pass. For a standard deviation ``sigma`` each pass averages
``2 r + 1`` pixels with weight ``ww`` and the two pixels just outside with weight ``fw``
(``r + f`` the box radius, ``f`` its fraction), edges repeated::

    out[x] = (ww * sum(p[x - r .. x + r]) + fw * (p[x - r - 1] + p[x + r + 1]) + 2**23) >> 24

:func:`box_weights` computes ``r``, ``ww`` and ``fw`` in PIL's own single-precision steps,
so :func:`gaussian_blur` returns the library's very pixels (tests/test_data.py compares
them over radii and sizes). On the training device it takes microseconds where PIL takes
about 11 ms for a 480 x 480 image on one CPU core, the largest cost of a loader worker.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch

from semires.syncs import host_array

PASSES = 3  # PIL's default


@functools.lru_cache(maxsize=256)
def box_weights(sigma: float, passes: int = PASSES) -> tuple[int, int, int] | None:
    """``(r, ww, fw)`` of one pass of PIL's Gaussian blur of standard deviation ``sigma``
    (its ``radius``), or None where PIL does not blur (a box radius of 0)."""
    f = np.float32
    s = f(sigma)  # the library reads the radius as a C float
    sigma2 = f(s * s / f(passes))
    big_l = f(math.sqrt(12.0 * float(sigma2) + 1.0))  # computed in double, kept as float
    small_l = f(math.floor((float(big_l) - 1.0) / 2.0))
    a = f(f(f(2) * small_l + f(1)) * f(small_l * (small_l + f(1)) - f(3) * sigma2))
    a = f(a / f(f(6) * f(sigma2 - f(small_l + f(1)) * f(small_l + f(1)))))
    radius = f(small_l + a)
    if radius == 0:
        return None
    r = int(radius)
    ww = int(f(f(1 << 24) / f(radius * f(2) + f(1))))
    fw = ((1 << 24) - (2 * r + 1) * ww) // 2
    return r, ww, fw


def _box_pass(x: torch.Tensor, r: int, ww: int, fw: int) -> torch.Tensor:
    """One extended box pass along the last dimension of int64 ``x`` (edges repeated)."""
    w = x.shape[-1]
    idx = torch.arange(-r - 1, w + r + 1, device=x.device).clamp_(0, w - 1)
    p = x.index_select(-1, idx)  # ... x (w + 2r + 2): p[j] is x[j - r - 1], clamped
    cs = torch.nn.functional.pad(p.cumsum(-1), (1, 0))
    window = cs[..., 2 * r + 2 : 2 * r + 2 + w] - cs[..., 1 : 1 + w]  # p[x + 1 .. x + 2r + 1]
    far = p[..., :w] + p[..., 2 * r + 2 : 2 * r + 2 + w]
    return (window * ww + far * fw + (1 << 23)) >> 24


def gaussian_blur(pixels: torch.Tensor, sigma: float) -> torch.Tensor:
    """``C x H x W`` uint8 pixels (C of 1, 3 or 4) blurred as
    ``Image.filter(ImageFilter.GaussianBlur(sigma))`` blurs them, on their device; uint8 out.
    On the CPU PIL itself does it (faster there), elsewhere :func:`box_blur`."""
    if pixels.dtype != torch.uint8:
        raise TypeError(f"gaussian_blur takes uint8 pixels, got {pixels.dtype}")
    if pixels.device.type != "cpu":
        return box_blur(pixels, sigma)
    from PIL import Image, ImageFilter

    hwc = host_array(pixels.permute(1, 2, 0).contiguous())
    image = Image.fromarray(hwc[..., 0] if hwc.shape[-1] == 1 else hwc)
    out = torch.from_numpy(np.array(image.filter(ImageFilter.GaussianBlur(radius=float(sigma)))))
    return out[None] if out.ndim == 2 else out.permute(2, 0, 1)


def box_blur(pixels: torch.Tensor, sigma: float) -> torch.Tensor:
    """PIL's Gaussian blur of ``... x H x W`` uint8 pixels in torch operations (any device):
    the three passes along the rows, then the columns, each rounded to uint8."""
    weights = box_weights(float(sigma))
    if sigma == 0 or weights is None:
        return pixels.clone()
    x = pixels.to(torch.int64)
    for _ in range(PASSES):
        x = _box_pass(x, *weights)
    x = x.transpose(-1, -2)
    for _ in range(PASSES):
        x = _box_pass(x, *weights)
    return x.transpose(-1, -2).to(torch.uint8).contiguous()
