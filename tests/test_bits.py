"""Bit-packed masks in torch: the store's bit order, a round trip, and the flip."""

import numpy as np
import pytest
import torch

from semires.bits import flip_bits, pack_bits, unpack_bits


@pytest.mark.parametrize("width", [8, 13, 64, 70])
def test_pack_is_numpys_little_bit_order_and_unpack_inverts_it(width):
    g = torch.Generator().manual_seed(width)
    masks = torch.rand(2, 3, 5, width, generator=g) > 0.5
    packed = pack_bits(masks)
    want = np.packbits(masks.numpy(), axis=-1, bitorder="little")
    assert packed.dtype == torch.uint8 and np.array_equal(packed.numpy(), want)
    assert torch.equal(unpack_bits(packed, width), masks)


@pytest.mark.parametrize("width", [8, 13, 32, 70])
def test_flip_of_packed_rows_is_the_flip_of_the_masks(width):
    g = torch.Generator().manual_seed(width)
    masks = torch.rand(4, 6, width, generator=g) > 0.6
    flipped = flip_bits(pack_bits(masks), width)
    assert torch.equal(flipped, pack_bits(masks.flip(-1)))
    assert torch.equal(flip_bits(flipped, width), pack_bits(masks))


def test_a_single_pixel_lands_on_its_bit():
    m = torch.zeros(1, 16, dtype=torch.bool)
    m[0, 9] = True  # byte 1, bit 1
    assert pack_bits(m).tolist() == [[0, 2]]
    assert flip_bits(pack_bits(m), 16).tolist() == [[64, 0]]  # column 6: byte 0, bit 6
