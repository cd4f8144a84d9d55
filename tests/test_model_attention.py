"""Swin blocks and PWAM (fused attention) against plain references written from LAVT's description.

The references loop over windows and compute attention as matmul + softmax; the region of
each padded, shifted position and the bias-table row of each token pair are worked out one
by one, not with the vectorised code under test. Geometries: a stage that is not a multiple
of the window (480 px / window 12 -> 15 x 15), a stage equal to the window (384 px -> 12 x
12) or smaller (192 px -> 6 x 6; the tiny preset's 2 x 2 under window 4), window 7, and a
non-square map.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from semires.model.pwam import PixelWordAttention
from semires.model.swin import SwinBlock, SwinConfig, create_swin


def _bias_reference(table: torch.Tensor, window: int) -> torch.Tensor:
    """heads x N x N: the table row of (query a, key b) is (dy + w - 1) * (2w - 1) + (dx + w - 1)."""
    coords = [(y, x) for y in range(window) for x in range(window)]
    rows = [[(ya - yb + window - 1) * (2 * window - 1) + (xa - xb + window - 1) for yb, xb in coords]
            for ya, xa in coords]  # fmt: skip
    return table[torch.tensor(rows)].permute(2, 0, 1)


def _region(pos: int, size: int, window: int, shift: int) -> int:
    """Which of LAVT's three slices of a padded axis: [0, -window), [-window, -shift), [-shift, end)."""
    if pos < size - window:
        return 0
    return 1 if pos < size - shift else 2


def reference_block(block: SwinBlock, x: torch.Tensor) -> torch.Tensor:
    """LAVT's Swin block, plainly: norm, pad to a multiple of the window, roll by -shift, attention
    per window (bias, and -100 between regions of the padded map in a shifted block), roll back,
    crop, residual; then the MLP with its residual. ``x`` B x H x W x C."""
    b, h, w, c = x.shape
    win, s, heads = block.window, block.shift, block.attn.heads
    d, n = c // heads, block.window**2
    hp, wp = math.ceil(h / win) * win, math.ceil(w / win) * win
    y = F.pad(block.norm1(x), (0, 0, 0, wp - w, 0, hp - h))
    if s:
        y = torch.roll(y, shifts=(-s, -s), dims=(1, 2))
    bias = _bias_reference(block.attn.relative_position_bias_table, win)
    out = torch.zeros_like(y)
    coords = [(i, j) for i in range(win) for j in range(win)]
    for wy in range(0, hp, win):
        for wx in range(0, wp, win):
            tokens = y[:, wy : wy + win, wx : wx + win].reshape(b, n, c)
            q, k, v = block.attn.qkv(tokens).reshape(b, n, 3, heads, d).permute(2, 0, 3, 1, 4)
            logits = (q * d**-0.5) @ k.transpose(-1, -2) + bias  # B x heads x N x N
            if s:
                labels = torch.tensor(
                    [3 * _region(wy + i, hp, win, s) + _region(wx + j, wp, win, s) for i, j in coords]
                )
                logits = logits + torch.where(labels[:, None] != labels[None, :], -100.0, 0.0)
            att = (logits.softmax(-1) @ v).transpose(1, 2).reshape(b, n, c)
            out[:, wy : wy + win, wx : wx + win] = block.attn.proj(att).reshape(b, win, win, c)
    if s:
        out = torch.roll(out, shifts=(s, s), dims=(1, 2))
    x = x + out[:, :h, :w]
    return x + block.mlp(block.norm2(x))


GEOMETRIES = {  # name: (H, W, window)
    "480px stage 4: 15x15, window 12": (15, 15, 12),
    "384px stage 4: 12x12 = window 12": (12, 12, 12),
    "192px stage 4: 6x6 < window 12": (6, 6, 12),
    "tiny stage 4: 2x2 < window 4": (2, 2, 4),
    "window 7, 12x12 padded to 14": (12, 12, 7),
    "window 7, 7x7": (7, 7, 7),
    "window 7, 5x5": (5, 5, 7),
    "non-square 10x13, window 7": (10, 13, 7),
    "multiple and larger: 16x16, window 4": (16, 16, 4),
}


def _block(window: int, shifted: bool, *, dim: int = 16, heads: int = 2, seed: int = 0) -> SwinBlock:
    torch.manual_seed(seed)
    block = SwinBlock(dim, heads, window, window // 2 if shifted else 0).eval()
    with torch.no_grad():  # a bias far from its small initial values, so a misplaced entry shows
        block.attn.relative_position_bias_table.normal_(0, 1)
    return block


@pytest.mark.parametrize("shifted", [False, True], ids=["unshifted", "shifted"])
@pytest.mark.parametrize("geometry", list(GEOMETRIES))
def test_swin_block_is_lavts_arithmetic(geometry, shifted):
    h, w, window = GEOMETRIES[geometry]
    block = _block(window, shifted)
    x = torch.randn(2, h, w, 16)
    with torch.no_grad():
        torch.testing.assert_close(block(x), reference_block(block, x), atol=1e-5, rtol=1e-5)


def test_swin_block_gradients_match_the_reference():
    """The fused attention's backward (bias table included) equals the plain one's."""
    block = _block(12, True)
    x = torch.randn(2, 15, 15, 16)
    grads = []
    for fn in (block, lambda t: reference_block(block, t)):
        block.zero_grad()
        xg = x.clone().requires_grad_(True)
        (fn(xg) ** 2).sum().backward()
        grads.append([xg.grad, *(p.grad.clone() for p in block.parameters())])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_the_shift_is_never_dropped_nor_the_window_shrunk():
    """At 64 px with window 4 the tiny preset's last stages are 4x4 and 2x2: still window 4,
    and every second block shifted by 2 (timm would drop the shift and shrink the window)."""
    swin = create_swin(SwinConfig(embed_dim=8, depths=(2, 2, 2, 2), num_heads=(1, 1, 1, 1), window_size=4))
    for stage in swin.layers:
        assert [(b.window, b.shift) for b in stage.blocks] == [(4, 0), (4, 2)]


def test_shift_regions_matter_at_small_maps():
    """On a 2x2 map padded to 4x4, the shifted block differs from the same block unshifted."""
    shifted, plain = _block(4, True), _block(4, False)
    x = torch.randn(1, 2, 2, 16)
    with torch.no_grad():
        assert not torch.allclose(shifted(x), plain(x), atol=1e-4)


def reference_pwam(m: PixelWordAttention, vis, words, word_mask) -> torch.Tensor:
    """LAVT's PWAM, plainly: per head, softmax(q k^T / sqrt(C) - 10^4 on pads) v with C the width of
    all heads; instance-normalised query and output; vis_proj(V) * lang, then mm_proj."""
    c, heads = vis.shape[-1], m.heads
    mask = word_mask.float()
    q = m.query_norm(m.query(vis).transpose(1, 2)).transpose(1, 2)
    k, v = m.key(words) * mask[..., None], m.value(words) * mask[..., None]
    parts = []
    for i in range(heads):
        sl = slice(i * c // heads, (i + 1) * c // heads)
        logits = q[..., sl] @ k[..., sl].transpose(1, 2) * c**-0.5 + (1e4 * mask[:, None, :] - 1e4)
        parts.append(logits.softmax(-1) @ v[..., sl])
    lang = m.out_norm(m.out(torch.cat(parts, -1)).transpose(1, 2)).transpose(1, 2)
    return m.mm_proj(m.vis_proj(vis) * lang)


@pytest.mark.parametrize("heads", [1, 2, 4])
def test_pwam_is_lavts_arithmetic(heads):
    torch.manual_seed(heads)
    m = PixelWordAttention(32, 24, heads=heads).eval()
    vis, words = torch.randn(2, 50, 32), torch.randn(2, 7, 24)
    word_mask = torch.tensor([[1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0, 0]])
    with torch.no_grad():
        got = m(vis, words, word_mask)
        torch.testing.assert_close(got, reference_pwam(m, vis, words, word_mask), atol=1e-5, rtol=1e-5)
        # Padding words do not count: the second sample with its pads cut away is the same.
        short = m(vis[1:], words[1:, :3], word_mask[1:, :3])
    torch.testing.assert_close(got[1:], short, atol=1e-5, rtol=1e-5)
