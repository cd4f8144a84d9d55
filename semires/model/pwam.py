"""Pixel-word attention (PWAM) and the language gate, LAVT's fusion after each Swin stage."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

PAD_LOGIT = -1e4  # LAVT's additive mask on padding words


class PixelWordAttention(nn.Module):
    """Language-aware visual features: each pixel attends over the words.

    Vision features ``V`` (``B x N x C``, N = H·W pixels) are projected (linear + GELU +
    dropout); each pixel queries the words (keys and values from ``L``, padding masked out),
    and the attended language feature multiplies the projected pixel feature element-wise;
    a final linear + GELU projection gives the fused feature ``F`` (``B x N x C``).

    With several heads, each attends with its slice of the channels, and the logits are
    scaled by ``C ** -0.5`` (all heads' width, as LAVT), not by the per-head width.
    """

    def __init__(self, dim: int, text_dim: int, *, heads: int = 1, dropout: float = 0.0) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"PWAM width {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.vis_proj = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Dropout(dropout))
        self.query = nn.Linear(dim, dim)
        self.query_norm = nn.InstanceNorm1d(dim)
        self.key = nn.Linear(text_dim, dim)
        self.value = nn.Linear(text_dim, dim)
        self.out = nn.Linear(dim, dim)
        self.out_norm = nn.InstanceNorm1d(dim)
        self.mm_proj = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Dropout(dropout))

    def forward(self, vis: torch.Tensor, words: torch.Tensor, word_mask: torch.Tensor) -> torch.Tensor:
        """``vis`` B x N x C, ``words`` B x T x Ct, ``word_mask`` B x T (1 = word, 0 = pad) -> B x N x C."""
        b, n, c = vis.shape
        h = self.heads
        m = word_mask.to(vis.dtype)
        # Instance norm over the pixels of each channel, as LAVT's query and output (B x C x N).
        q = self.query_norm(self.query(vis).transpose(1, 2)).transpose(1, 2)
        k = self.key(words) * m[..., None]
        v = self.value(words) * m[..., None]
        q = q.reshape(b, n, h, c // h).transpose(1, 2)  # B x h x N x d
        k = k.reshape(b, -1, h, c // h).transpose(1, 2)  # B x h x T x d
        v = v.reshape(b, -1, h, c // h).transpose(1, 2)
        bias = ((1.0 - m) * PAD_LOGIT)[:, None, None, :].to(q.dtype)  # B x 1 x 1 x T: pads get no attention
        lang = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=c**-0.5)  # B x h x N x d
        lang = lang.transpose(1, 2).reshape(b, n, c)
        lang = self.out_norm(self.out(lang).transpose(1, 2)).transpose(1, 2)
        return self.mm_proj(self.vis_proj(vis) * lang)


class LanguageGate(nn.Module):
    """How much of the fused feature flows back into the visual stream, per channel.

    ``gate(F) = tanh(W2 · relu(W1 · F))`` (``B x N x C``); the next stage sees
    ``X + gate(F) * F``.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(dim, dim, bias=False), nn.ReLU(), nn.Linear(dim, dim, bias=False), nn.Tanh()
        )

    def forward(self, fused: torch.Tensor) -> torch.Tensor:
        return self.mlp(fused) * fused
