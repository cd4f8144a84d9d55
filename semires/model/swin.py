"""The Swin Transformer backbone with LAVT's window arithmetic, run stage by stage.

The blocks compute the function of LAVT's Swin (the Swin-for-segmentation code): a block
pads the map to a multiple of the window, *then* shifts it cyclically, masks attention
between the regions the shift brought together (built on the padded map; padded tokens are
attended to like any other), shifts back and crops. It never drops the shift or shrinks the
window for maps smaller than the window. (timm's block shifts before padding and does both,
so with the same weights it computes another function wherever a stage is not a multiple of
the window or not larger than it.)

The weights keep timm's layout (``patch_embed.*``; ``layers.i.downsample.*`` at the *start*
of stage i > 0; ``layers.i.blocks.j.{norm1, attn.qkv, attn.proj,
attn.relative_position_bias_table, norm2, mlp.fc1, mlp.fc2}``), so timm's
``checkpoint_filter_fn`` loads the original Microsoft checkpoints into it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from timm.layers import DropPath, trunc_normal_
from timm.models.swin_transformer import checkpoint_filter_fn
from torch import nn

from semires.errors import SemiresError

SHIFT_MASK_VALUE = -100.0  # LAVT's (and Swin's) additive mask between shifted regions


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


# --- windows -------------------------------------------------------------------------------


def window_partition(x: torch.Tensor, window: int) -> torch.Tensor:
    """``B x H x W x C`` (H, W multiples of ``window``) -> ``B x nW x N x C``.

    ``nW = (H / window) * (W / window)`` windows in row-major order, ``N = window²`` tokens
    each, row-major inside the window.
    """
    b, h, w, c = x.shape
    x = x.view(b, h // window, window, w // window, window, c).transpose(2, 3)
    return x.reshape(b, (h // window) * (w // window), window * window, c)


def pad_map(x: torch.Tensor, hp: int, wp: int, value: torch.Tensor | None = None) -> torch.Tensor:
    """``B x H x W x C`` -> ``B x hp x wp x C``, the new bottom rows and right columns filled
    with ``value`` (``C``; zeros if None)."""
    b, h, w, c = x.shape
    if value is None:
        return F.pad(x, (0, 0, 0, wp - w, 0, hp - h))
    if wp > w:
        x = torch.cat([x, value.expand(b, h, wp - w, c)], dim=2)
    if hp > h:
        x = torch.cat([x, value.expand(b, hp - h, wp, c)], dim=1)
    return x


def relative_position_index(window: int) -> torch.Tensor:
    """``N x N`` (``N = window²``) int64: row of the bias table for each query/key token pair.

    Tokens ``a = (ya, xa)`` and ``b = (yb, xb)`` of one window share the entry
    ``(ya - yb + window - 1) * (2 window - 1) + (xa - xb + window - 1)``.
    """
    ys, xs = torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    dy = ys[:, None] - ys[None, :] + window - 1
    dx = xs[:, None] - xs[None, :] + window - 1
    return dy * (2 * window - 1) + dx


def _region_labels(size: int, window: int, shift: int) -> torch.Tensor:
    """0, 1, 2 along one padded axis: before the last window, the last window's first
    ``window - shift`` positions, its last ``shift`` positions (the ones the shift wrapped)."""
    pos = torch.arange(size)
    return (pos >= size - window).long() + (pos >= size - shift).long()


@functools.lru_cache(maxsize=64)
def shift_mask(hp: int, wp: int, window: int, shift: int, device: torch.device) -> torch.Tensor:
    """The additive attention mask of a shifted block on an ``hp x wp`` padded map.

    ``nW x N x N`` float32: 0 between tokens of the same region of the shifted map,
    :data:`SHIFT_MASK_VALUE` between tokens that the cyclic shift brought together from
    different regions. Cached per geometry (read only: never modify the returned tensor).
    """
    labels = 3 * _region_labels(hp, window, shift)[:, None] + _region_labels(wp, window, shift)[None, :]
    windows = window_partition(labels.view(1, hp, wp, 1), window)[0, :, :, 0]  # nW x N
    differ = windows[:, :, None] != windows[:, None, :]
    return torch.where(differ, SHIFT_MASK_VALUE, 0.0).to(device)


# --- modules -------------------------------------------------------------------------------


class WindowAttention(nn.Module):
    """LAVT's (shifted) window attention over a normalised map: ``B x H x W x C`` -> ``B x H x W x C``.

    The map is padded with zeros (bottom, right) to a multiple of ``window``, rolled by
    ``-shift`` on both axes if ``shift`` > 0, and each window's tokens attend to each other
    (multi-head, learned relative position bias; in a shifted block :func:`shift_mask`
    separates the regions the roll brought together); the result is rolled back, cropped
    and projected. A zero token's query, key and value are the ``qkv`` bias, so q/k/v are
    computed for the map's own tokens only and the padding is filled with that bias, and the
    output projection runs on the cropped map: the same arithmetic, with no work on tokens
    that are thrown away. The bias (and shift mask) is one additive float mask of
    :func:`torch.nn.functional.scaled_dot_product_attention`.
    """

    def __init__(self, dim: int, heads: int, window: int, shift: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"Swin width {dim} is not divisible by {heads} heads")
        if not 0 <= shift < window:
            raise ValueError(f"shift {shift} must be in [0, window {window})")
        self.heads, self.window, self.shift = heads, window, shift
        self.window_size = (window, window)  # timm's checkpoint_filter_fn reads it
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, heads))
        self.register_buffer("relative_position_index", relative_position_index(window), persistent=False)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        trunc_normal_(self.relative_position_bias_table, std=0.02)

    def position_bias(self) -> torch.Tensor:
        """``heads x N x N``."""
        n = self.relative_position_index.shape[0]
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        return bias.view(n, n, self.heads).permute(2, 0, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        win, s, nh, d = self.window, self.shift, self.heads, c // self.heads
        hp, wp = h + -h % win, w + -w % win
        gh, gw, n = hp // win, wp // win, win * win  # windows down and across, tokens per window
        qkv = self.qkv(x)  # B x H x W x 3C
        if (hp, wp) != (h, w):
            qkv = pad_map(qkv, hp, wp, self.qkv.bias)
        if s:
            qkv = torch.roll(qkv, shifts=(-s, -s), dims=(1, 2))
        # windows and heads apart in one copy: 3 x B x gh x gw x heads x win x win x d
        qkv = qkv.view(b, gh, win, gw, win, 3, nh, d).permute(5, 0, 1, 3, 6, 2, 4, 7)
        bias = self.position_bias()  # heads x N x N
        if s:  # windows differ: windows x heads as the head axis, the mask broadcasts over B
            q, k, v = qkv.reshape(3, b, gh * gw * nh, n, d).unbind(0)
            mask = shift_mask(hp, wp, win, s, x.device)  # nW x N x N
            attn_mask = (bias + mask[:, None]).reshape(gh * gw * nh, n, n)
        else:  # every window alike: the windows join the batch, the bias broadcasts
            q, k, v = qkv.reshape(3, b * gh * gw, nh, n, d).unbind(0)
            attn_mask = bias
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask.to(q.dtype))
        out = out.reshape(b, gh, gw, nh, win, win, d).permute(0, 1, 4, 2, 5, 3, 6).reshape(b, hp, wp, c)
        if s:
            out = torch.roll(out, shifts=(s, s), dims=(1, 2))
        return self.proj(out[:, :h, :w])


class Mlp(nn.Module):
    """Linear, GELU, linear: ``... x C`` -> ``... x C``."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SwinBlock(nn.Module):
    """One Swin block with LAVT's arithmetic: ``B x H x W x C`` -> ``B x H x W x C``.

    ``x + attn(norm1(x))`` with :class:`WindowAttention` (windows of ``window``, rolled by
    ``shift``), then ``x + mlp(norm2(x))``.
    """

    def __init__(
        self, dim: int, heads: int, window: int, shift: int, *, mlp_ratio: float = 4.0, drop_path: float = 0.0
    ) -> None:
        super().__init__()
        self.window, self.shift = window, shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, heads, window, shift)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.attn(self.norm1(x)))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    """4 x 4 patches, linear embedding, LayerNorm: ``B x 3 x H x W`` -> ``B x H/4 x W/4 x C``.

    A side that is not a multiple of 4 is zero-padded (bottom, right) first.
    """

    def __init__(self, dim: int, patch: int = 4) -> None:
        super().__init__()
        self.patch = patch
        self.proj = nn.Conv2d(3, dim, patch, stride=patch)
        self.norm = nn.LayerNorm(dim)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        h, w = image.shape[-2:]
        if h % self.patch or w % self.patch:
            image = F.pad(image, (0, -w % self.patch, 0, -h % self.patch))
        return self.norm(self.proj(image).permute(0, 2, 3, 1))


class PatchMerging(nn.Module):
    """2 x 2 neighbours concatenated, LayerNorm, linear: ``B x H x W x C`` -> ``B x H/2 x W/2 x 2C``.

    The concatenation order is Swin's (even row even column, odd row even column, even row
    odd column, odd odd); an odd side is zero-padded (bottom, right) first.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        if h % 2 or w % 2:
            x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2))
            h, w = h + h % 2, w + w % 2
        x = x.reshape(b, h // 2, 2, w // 2, 2, c).permute(0, 1, 3, 4, 2, 5).flatten(3)
        return self.reduction(self.norm(x))


class SwinStage(nn.Module):
    """Stage i: patch merging (i > 0), then blocks alternating unshifted and shifted by window // 2."""

    def __init__(
        self, dim: int, depth: int, heads: int, window: int, *, downsample: bool, drop_path: list[float]
    ) -> None:
        super().__init__()
        self.downsample = PatchMerging(dim // 2) if downsample else nn.Identity()
        self.blocks = nn.Sequential(
            *(
                SwinBlock(dim, heads, window, 0 if j % 2 == 0 else window // 2, drop_path=drop_path[j])
                for j in range(depth)
            )
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.downsample(x))


class Swin(nn.Module):
    """Swin's patch embedding and four stages, exposed one stage at a time.

    Stage i's downsampling sits at its start (timm's layout), so the output of
    :meth:`stage` ``(i)`` is the feature right after stage i's blocks, where LAVT fuses
    language. Features are channels-last: ``B x H/4 x W/4 x C`` after :meth:`embed`, and
    stage i maps ``B x h x w x c`` to ``B x h' x w' x dims[i]`` (``h' = ceil(h/2)`` for i > 0).
    Stochastic depth rises linearly from 0 to ``drop_path_rate`` over all blocks.
    """

    def __init__(self, config: SwinConfig) -> None:
        super().__init__()
        self.config = config
        dims = config.dims
        rates = torch.linspace(0, config.drop_path_rate, sum(config.depths)).tolist()
        self.patch_embed = PatchEmbed(dims[0])
        self.layers = nn.ModuleList()
        for i, depth in enumerate(config.depths):
            start = sum(config.depths[:i])
            self.layers.append(
                SwinStage(
                    dims[i], depth, config.num_heads[i], config.window_size,
                    downsample=i > 0, drop_path=rates[start : start + depth],
                )
            )  # fmt: skip
        self.apply(_init_linear)

    def embed(self, image: torch.Tensor) -> torch.Tensor:
        """``B x 3 x H x W`` (normalised) -> ``B x H/4 x W/4 x C``."""
        return self.patch_embed(image)

    def stage(self, i: int, x: torch.Tensor) -> torch.Tensor:
        return self.layers[i](x)


def _init_linear(m: nn.Module) -> None:
    """Swin's initialisation: truncated normal (std 0.02) linear weights, zero biases."""
    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


def create_swin(config: SwinConfig) -> Swin:
    """A randomly initialised Swin backbone (no final norm, no classifier)."""
    return Swin(config)


def load_original_checkpoint(swin: Swin, path: str | Path) -> None:
    """Load a Microsoft Swin checkpoint (``{"model": state_dict}``, original key layout) into ``swin``.

    timm's own ``checkpoint_filter_fn`` maps the original layout (downsample at the end of a
    stage) to timm's (downsample at the start) and resizes position-bias tables whose window
    differs. The classifier head and the final norm (LAVT normalises each fused stage
    instead) are ignored; any other missing or unexpected key, or a shape mismatch, is an
    error naming the file.
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
    try:
        state = checkpoint_filter_fn(obj, swin)
    except (AttributeError, KeyError, RuntimeError, ValueError) as e:
        raise SemiresError(f"{path}: not a Swin checkpoint this model can load ({e!r})") from e
    state = {k: v for k, v in state.items() if not k.startswith(("head.", "norm."))}
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
    missing, unexpected = result.missing_keys, result.unexpected_keys
    if missing or unexpected:
        raise SemiresError(
            f"{path}: not a Swin checkpoint of this size: {len(missing)} missing key(s) "
            f"{missing[:3]}, {len(unexpected)} unexpected {unexpected[:3]}"
        )
