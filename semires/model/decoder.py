"""The segmentation decoder: four scales fused top-down into a 2-class map at 1/4 resolution."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def _conv_bn_relu(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(True))


class Decoder(nn.Module):
    """Top-down fusion as LAVT's: upsample, concatenate the finer scale, two conv-BN-ReLU blocks.

    Inputs are the four stage features, channels-first, finest first:
    ``B x C1 x H/4 x W/4``, ``B x C2 x H/8 x W/8``, ``B x C3 x H/16``, ``B x C4 x H/32``.
    Output: logits ``B x 2 x H/4 x W/4`` (background, object). A coarser map is resized to
    the finer one (bilinear, ``align_corners=True``, as LAVT) only where their sizes differ.
    """

    def __init__(self, dims: Sequence[int], hidden: int, num_classes: int = 2) -> None:
        super().__init__()
        c1, c2, c3, c4 = dims
        self.fuse = nn.ModuleList(
            [
                nn.Sequential(_conv_bn_relu(c4 + c3, hidden), _conv_bn_relu(hidden, hidden)),
                nn.Sequential(_conv_bn_relu(hidden + c2, hidden), _conv_bn_relu(hidden, hidden)),
                nn.Sequential(_conv_bn_relu(hidden + c1, hidden), _conv_bn_relu(hidden, hidden)),
            ]
        )
        self.classifier = nn.Conv2d(hidden, num_classes, 1)

    def forward(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        x = feats[3]
        for fuse, skip in zip(self.fuse, (feats[2], feats[1], feats[0]), strict=True):
            if x.shape[-2:] != skip.shape[-2:]:
                x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=True)
            x = fuse(torch.cat([x, skip], dim=1))
        return self.classifier(x)
