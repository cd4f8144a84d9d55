"""The Swin Transformer backbone (timm), run stage by stage, and its original-checkpoint loader."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from timm.models.swin_transformer import SwinTransformer, checkpoint_filter_fn
from torch import nn

from semires.errors import SemiresError


@dataclass(frozen=True)
class SwinConfig:
    """A Swin architecture: ``embed_dim`` doubles at each of the four stages."""

    embed_dim: int = 128
    depths: tuple[int, int, int, int] = (2, 2, 18, 2)
    num_heads: tuple[int, int, int, int] = (4, 8, 16, 32)
    window_size: int = 12
    drop_path_rate: float = 0.3

    @property
    def dims(self) -> tuple[int, int, int, int]:
        return tuple(self.embed_dim * 2**i for i in range(4))  # type: ignore[return-value]


def create_swin(config: SwinConfig, image_size: int) -> SwinTransformer:
    """A randomly initialised timm Swin for square ``image_size`` inputs, without classifier."""
    return timm.create_model(
        "swin_base_patch4_window12_384",
        pretrained=False,
        img_size=image_size,
        embed_dim=config.embed_dim,
        depths=config.depths,
        num_heads=config.num_heads,
        window_size=config.window_size,
        drop_path_rate=config.drop_path_rate,
        num_classes=0,
    )


def load_original_checkpoint(swin: SwinTransformer, path: str | Path) -> None:
    """Load a Microsoft Swin checkpoint (``{"model": state_dict}``, original key layout) into ``swin``.

    timm's own ``checkpoint_filter_fn`` maps the original layout (downsample at the end of a
    stage) to timm's (downsample at the start) and resizes position-bias tables whose window
    differs. The classifier head and the non-persistent buffers are ignored; any other missing
    or unexpected key, or a shape mismatch, is an error naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise SemiresError(
            f"{path}: Swin checkpoint not found (model.swin_weights in params.yaml); download "
            "swin_base_patch4_window12_384_22k.pth from the Swin Transformer release page and fix the path"
        )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise SemiresError(f"{path}: not a readable PyTorch checkpoint ({e})") from e
    if not isinstance(obj, dict):
        raise SemiresError(
            f"{path}: expected a state dict (or {{'model': state dict}}), got {type(obj).__name__}"
        )
    state = checkpoint_filter_fn(obj, swin)
    state = {k: v for k, v in state.items() if not k.startswith("head")}
    own = swin.state_dict()
    bad = [
        f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and v.shape != own[k].shape
    ]
    if bad:
        raise SemiresError(
            f"{path}: {len(bad)} weight(s) do not fit the model ({bad[0]}, ...); the checkpoint is of "
            "another Swin size than model.preset's"
        )
    result = swin.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith("head")]
    if missing or result.unexpected_keys:
        raise SemiresError(
            f"{path}: not a Swin checkpoint of this size: {len(missing)} missing key(s) "
            f"{missing[:3]}, {len(result.unexpected_keys)} unexpected {result.unexpected_keys[:3]}"
        )


class SwinStages(nn.Module):
    """Swin's patch embedding and four stages, exposed one stage at a time.

    timm puts each stage's downsampling at the start of the next stage, so the output of
    ``stage(i)`` is the feature right after stage i's blocks, where LAVT fuses language.
    Features are channels-last: ``B x H/4 x W/4 x C`` after :meth:`embed`, and stage i maps
    ``B x h x w x c`` to ``B x h' x w' x dims[i]`` (``h' = h/2`` for i > 0).
    """

    def __init__(self, swin: SwinTransformer) -> None:
        super().__init__()
        swin.norm = nn.Identity()  # LAVT normalises each stage's fused output instead
        swin.head = nn.Identity()
        self.swin = swin

    def embed(self, image: torch.Tensor) -> torch.Tensor:
        """``B x 3 x H x W`` (normalised) -> ``B x H/4 x W/4 x C``."""
        return self.swin.patch_embed(image)

    def stage(self, i: int, x: torch.Tensor) -> torch.Tensor:
        return self.swin.layers[i](x)
