"""Bit-packed masks as torch tensors, on any device.

A stack of binary masks ``... x H x W`` travels from the proposals store to the device
bit-packed: ``... x H x ceil(W/8)`` uint8, pixel ``x`` of a row is bit ``x % 8`` of byte
``x // 8`` (little bit order, as :func:`semires.proposals.store.pack_masks` and
``np.packbits(..., bitorder="little")``), and the bits past ``W`` are 0. Eight times fewer
bytes to collate, pin and copy than ``bool``; the device unpacks what it works on.
"""

from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=8)
def _shifts(device: torch.device) -> torch.Tensor:
    return torch.arange(8, dtype=torch.uint8, device=device)


def packed_width(width: int) -> int:
    """Bytes per packed row of ``width`` pixels."""
    return (width + 7) // 8


def pack_bits(masks: torch.Tensor) -> torch.Tensor:
    """``... x W`` bool -> ``... x ceil(W/8)`` uint8 (little bit order, zero padding bits)."""
    w = masks.shape[-1]
    wb = packed_width(w)
    bits = masks.to(torch.uint8)
    if wb * 8 != w:
        bits = torch.nn.functional.pad(bits, (0, wb * 8 - w))
    bits = bits.reshape(*masks.shape[:-1], wb, 8) << _shifts(masks.device)
    return bits.sum(dim=-1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, width: int) -> torch.Tensor:
    """``... x ceil(W/8)`` uint8 -> ``... x W`` bool (inverse of :func:`pack_bits`)."""
    bits = (packed[..., None] >> _shifts(packed.device)) & 1  # ... x wb x 8
    return bits.reshape(*packed.shape[:-1], packed.shape[-1] * 8)[..., :width].bool()


def _reverse_byte_bits(x: torch.Tensor) -> torch.Tensor:
    """Each uint8's bits in reverse order (bit 0 <-> bit 7), by three swaps."""
    x = ((x & 0xF0) >> 4) | ((x & 0x0F) << 4)
    x = ((x & 0xCC) >> 2) | ((x & 0x33) << 2)
    return ((x & 0xAA) >> 1) | ((x & 0x55) << 1)


def flip_bits(packed: torch.Tensor, width: int) -> torch.Tensor:
    """The packed masks mirrored left-right, as ``unpack_bits(p, width).flip(-1)`` packed.

    When ``width`` is a multiple of 8 (the model's input sizes are multiples of 32) this is
    the bytes in reverse order, each with its bits reversed; otherwise it unpacks, flips
    and packs again."""
    if width % 8:
        return pack_bits(unpack_bits(packed, width).flip(-1))
    return _reverse_byte_bits(packed.flip(-1))
