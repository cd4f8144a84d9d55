"""The LAVT model: language fused into Swin after every stage, decoded to a 2-class mask."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from semires.model.decoder import Decoder
from semires.model.pwam import LanguageGate, PixelWordAttention
from semires.model.swin import Swin
from semires.model.text import TextEncoder

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class LAVT(nn.Module):
    """Referring segmentation: image + sentence -> per-pixel logits (background, object).

    Stage i of Swin runs its blocks on ``X_i``; PWAM fuses the words into ``F_i``; the gate
    adds ``gate(F_i) * F_i`` back (``X_i + gate(F_i) * F_i`` enters stage i+1, so stage 4 has
    no gate) and the layer-normalised ``F_i`` goes to the decoder. ImageNet normalisation
    happens inside, so callers (and colour augmentations) work on images in [0, 1]; LAVT's
    ``(image / 255 - mean) / std`` is the same arithmetic. ``pwam_heads`` gives each stage's
    PWAM head count (LAVT's ``--mha``; the paper's is one head everywhere).
    """

    def __init__(
        self,
        swin: Swin,
        text: TextEncoder,
        dims: tuple[int, int, int, int],
        *,
        decoder_hidden: int,
        pwam_heads: tuple[int, int, int, int] = (1, 1, 1, 1),
    ) -> None:
        super().__init__()
        self.backbone = swin
        self.text = text
        self.fusion = nn.ModuleList(
            [PixelWordAttention(d, text.dim, heads=h) for d, h in zip(dims, pwam_heads, strict=True)]
        )
        # The last stage has no next stage to feed, so no gate (its output would go unused).
        self.gates = nn.ModuleList([LanguageGate(d) for d in dims[:3]])
        self.norms = nn.ModuleList([nn.LayerNorm(d) for d in dims])
        self.decoder = Decoder(dims, hidden=decoder_hidden)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(
        self, image: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """``image`` B x 3 x H x W in [0, 1]; ``input_ids``, ``attention_mask`` B x T.

        Returns logits ``B x 2 x H x W``: the decoder's 1/4-resolution map upsampled bilinearly
        with ``align_corners=True``, as LAVT.
        """
        words = self.text(input_ids, attention_mask)  # B x T x Ct
        x = self.backbone.embed((image - self.mean) / self.std)  # B x H/4 x W/4 x C
        feats = []
        for i in range(4):
            x = self.backbone.stage(i, x)  # B x h x w x C_i, channels-last
            b, h, w, c = x.shape
            flat = x.reshape(b, h * w, c)
            fused = self.fusion[i](flat, words, attention_mask)  # B x hw x C_i
            if i < 3:
                x = (flat + self.gates[i](fused)).reshape(b, h, w, c)
            feats.append(self.norms[i](fused).reshape(b, h, w, c).permute(0, 3, 1, 2))
        logits = self.decoder(feats)  # B x 2 x H/4 x W/4
        return F.interpolate(logits, size=image.shape[-2:], mode="bilinear", align_corners=True)
