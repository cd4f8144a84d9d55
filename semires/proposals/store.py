"""The proposals store: every train image's masks in one sharded zarr v3 group.

Layout (images in ascending ``image_id`` order, ``I`` images, at most ``M`` masks each)::

    zarr.json        group attributes: format, version, backend, checkpoint_sha256,
                     settings, attr_fields, layout numbers, ``digests`` (sorted keys, no
                     timestamps)
    image_id         I int64
    height, width    I int32, the image's own size
    num_masks        I int32
    masks            I x C uint8: row i holds image i's ``N`` masks (``H x W`` each), encoded as
                     below, zeros after them; C = 9 + M * max H * ceil(max W / 8) rounded up to
                     whole inner chunks. Inner chunks ``1 x chunk_bytes`` (1 MiB, zstd level 19),
                     shards ``S x C``: one file per S images; chunks past an image's masks stay
                     all-zero and are not stored.
    attrs            I x M x 7 float32: predicted_iou, stability_score, area, x, y, w, h, each
                     stored as its bits XOR those of what the masks themselves give
                     (:func:`mask_attrs`: their area and box, 0 for the scores), so that a
                     backend's area and box cost next to nothing; NaN after the image's N
                     masks. Shards ``S x M x 7``.

Each shard is written whole, by one process (zarr rewrites a whole shard on every partial
write, so two writers of one shard lose data: zarr-python issues 3682 and 3413). Which
process writes a shard does not change its bytes, so the store is byte-identical whatever
the number of processes.

While a run is in progress every finished image is kept in a :class:`Scratch` folder, one
small ``.npz`` each, written atomically, so a killed run resumes where it stopped.

Every data file (each shard, each small array's chunk) is tied to the store: ``digests``
maps its path to ``[size in bytes, sha256]``, recorded by :func:`finish` (version 3). A
reader checks them all when it opens the store, hashing files on several threads (a
RefCOCO-sized store, 16,994 images of SAM-like masks in 161 MB, opens in 0.9 s on two busy
CPU cores: ``scripts/bench_store_verify.py``; a lazy check per shard would fail mid-run
instead of before any work), so a shard that is missing, cut short, copied from another
store or swapped with another reads as damaged, never as other images' masks. The digests
depend on the bytes alone, which do not depend on the number of processes that wrote them.

How a row of ``masks`` holds an image's masks (since version 2; :func:`encode_masks`). A row of
mask pixels is stored as its *edges*: the columns ``x`` in ``0..W`` where a pixel differs from
the one before it (outside the image counts as empty), so a row has an even number of edges
and its runs of ones are ``[x_0, x_1), [x_2, x_3), ...``. Object masks are smooth blobs, so a
row's edges are nearly those of the row above, and most rows of most masks have none. The
encoded row starts with 9 bytes: the encoding (uint8) and the encoded length in bytes, these
9 included (uint64, little endian).

* encoding 2, edges: 3 bytes (the size in bytes, 1, 2, 4 or 8, of the numbers of each of the
  three streams that follow), then the streams. ``counts``: the number of edges of each of the
  ``N x H`` mask rows. Consecutive rows of one mask with the same, nonzero number ``K`` of
  edges form a *block*, whose edges are taken edge by edge (edge ``k`` along all the block's
  rows, then edge ``k + 1``). ``moves``: every row but a block's first, each edge's move from
  the row above, ``x_k(r) - x_k(r - 1)``, zigzag coded (``2d`` for ``d >= 0``, ``-2d - 1``
  below). ``firsts``: each block's first row, ``x_0`` then the gaps ``x_k - x_(k-1)``. Each
  stream is stored as byte planes, least significant first, so small numbers leave the upper
  planes all zero.
* encoding 1, plain: the masks bit-packed, ``N x H x ceil(W/8)`` (np.packbits along W, little
  bit order), where the edges would take more bytes (noise-like masks).

Both give back exactly the masks written. :meth:`ProposalStore.masks` decodes the nonempty
rows alone and resizes those; the rest of its output stays zero.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numcodecs
import numpy as np
import torch

from semires.atomic import as_write_error, atomic_path
from semires.errors import SemiresError
from semires.proposals.base import ATTR_FIELDS, Proposals
from semires.resize import NearestRule
from semires.resize import nearest_index as resize_nearest_index

FORMAT = "semires-proposals"
VERSION = 3  # 3: digests of the data files in zarr.json


def pack_masks(masks: np.ndarray) -> np.ndarray:
    """``N x H x W`` bool -> ``N*H*ceil(W/8)`` uint8, bits along W, little bit order."""
    return np.packbits(masks, axis=-1, bitorder="little").reshape(-1)


def unpack_masks(packed: np.ndarray, n: int, h: int, w: int) -> np.ndarray:
    """Inverse of :func:`pack_masks`: ``N x H x W`` bool."""
    rows = packed[: n * h * ((w + 7) // 8)].reshape(n, h, (w + 7) // 8)
    return np.unpackbits(rows, axis=-1, count=w, bitorder="little").astype(bool)


def nearest_index(src: int, dst: int, rule: NearestRule = "torch", axis: int = 1) -> torch.Tensor:
    """Source index of each of ``dst`` outputs of nearest resizing under ``rule``: ``"torch"``
    as ``F.interpolate(mode="nearest")``, ``"pil"`` as PIL's ``NEAREST``
    (:func:`semires.resize.nearest_index`; ``axis`` 0 rows, 1 columns)."""
    return torch.from_numpy(_nearest(src, dst, rule, axis).copy())


def resize_packed(
    packed: np.ndarray,
    n: int,
    h: int,
    w: int,
    size: tuple[int, int],
    device: torch.device | str = "cpu",
    rule: NearestRule = "torch",
) -> torch.Tensor:
    """Bit-packed ``N x H x W`` masks -> ``N x h' x w'`` bool tensor on ``device``, nearest
    under ``rule`` (default as F.interpolate). See :func:`resize_rows`."""
    grid = packed[: n * h * ((w + 7) // 8)].reshape(n * h, -1)
    rows = np.flatnonzero(grid.any(axis=1))
    return resize_rows(rows, grid[rows], n, h, w, size, device, rule)


def resize_rows(
    rows: np.ndarray,
    packed_rows: np.ndarray,
    n: int,
    h: int,
    w: int,
    size: tuple[int, int],
    device: torch.device | str = "cpu",
    rule: NearestRule = "torch",
) -> torch.Tensor:
    """``N x H x W`` masks given by their nonempty rows -> ``N x h' x w'`` bool tensor on
    ``device``, nearest under ``rule`` (default as F.interpolate). ``rows``: the nonempty
    rows' indices ``n * H + y``; ``packed_rows``: their bits, ``len(rows) x ceil(W/8)``
    (as :func:`pack_masks`).

    Only output rows made from a nonempty row are computed (the others stay zero), each
    output pixel once, from the smaller of the source and output row sets, plus whole-row
    copies. Off the CPU only those packed rows travel to the device, and the bits are
    picked there."""
    oh, ow = size
    ri, ci = _nearest(h, oh, rule, 0), _nearest(w, ow, rule, 1)
    where = np.full(n * h, -1, np.int64)
    where[rows] = np.arange(len(rows))
    src = where[(np.arange(n)[:, None] * h + ri).reshape(-1)]  # each output row's source, or -1
    dest = np.flatnonzero(src >= 0)
    src = src[dest]
    if torch.device(device).type != "cpu":
        out = torch.zeros((n * oh, ow), dtype=torch.bool, device=device)
        if len(dest):
            picked = torch.from_numpy(np.ascontiguousarray(packed_rows[src])).to(device)
            out[torch.from_numpy(dest).to(device)] = _pick_bits(picked, torch.from_numpy(ci).to(device))
        return out.view(n, oh, ow)
    out = np.zeros((n * oh, ow), np.uint8)
    if len(dest) > len(rows):  # rows repeat (upsampling): pick the columns first, then copy rows
        bits = np.unpackbits(packed_rows, axis=-1, count=w, bitorder="little")
        out[dest] = _take_columns(bits, ci)[src]
    elif len(dest):  # pick the rows while still packed (cheap), then the columns
        bits = np.unpackbits(packed_rows[src], axis=-1, count=w, bitorder="little")
        out[dest] = _take_columns(bits, ci)
    return torch.from_numpy(out.view(bool).reshape(n, oh, ow))


def _pick_bits(rows: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``... x W/8`` packed rows -> ``... x w'`` bool: bit ``index[j]`` of each row."""
    picked = rows[..., index >> 3]
    return ((picked >> (index & 7).to(torch.uint8)) & 1).bool()


def _take_columns(bits: np.ndarray, index: np.ndarray) -> np.ndarray:
    """``bits[..., index]`` for a nondecreasing ``index``. When it repeats with a short period
    ``p`` (``index[j + p] = index[j] + q``, e.g. 640 -> 480 is p = 3, q = 4) the gather is
    ``p`` strided copies, about twice as fast as an indexed gather."""
    w = len(index)
    if w == bits.shape[-1] and np.array_equal(index, np.arange(w)):
        return bits
    for p in range(1, min(w, 33)):
        q = int(index[p] - index[0])
        if q > 0 and np.all(index[p:] - index[:-p] == q):
            out = np.empty((*bits.shape[:-1], w), bits.dtype)
            for r in range(p):
                k = len(range(r, w, p))
                out[..., r::p] = bits[..., index[r] :: q][..., :k]
            return out
    return np.take(bits, index, axis=-1)


# --- the row encoding (see the module docstring) ---------------------------------------------

PLAIN, EDGES = 1, 2
HEADER = 9  # encoding (uint8), encoded length (uint64 LE)


def encode_masks(packed: np.ndarray, n: int, h: int, w: int) -> np.ndarray:
    """Bit-packed ``N x H x W`` masks (:func:`pack_masks`) -> one row of the store, uint8: the
    edge encoding, or the plain bits where those are shorter. Lossless and deterministic."""
    wb = (w + 7) // 8
    words = np.zeros((n * h, wb // 8 + 1), "<u8")  # each mask row, and room for an edge at x = W
    bits = words.view(np.uint8)[:, :wb]
    bits[:] = np.asarray(packed[: n * h * wb], np.uint8).reshape(n * h, wb)
    if w % 8:
        bits[:, -1] &= (1 << (w % 8)) - 1  # bits past W are not pixels: always store them as 0
    kind, size = PLAIN, HEADER + bits.size
    counts, x = _edges(words, n * h)
    if HEADER + 3 + _itemsize(counts) * counts.size + x.size < size:  # at least a byte a value
        b = _Blocks(counts, h)
        values = _edge_values(b, counts, x)
        streams = [counts, values[~b.first], values[b.first]]  # counts, moves, first rows
        edges = HEADER + 3 + sum(_itemsize(a) * a.size for a in streams)
        if edges < size:
            sizes = np.array([_itemsize(a) for a in streams], np.uint8)
            kind, size, body = EDGES, edges, [sizes, *(_planes(a) for a in streams)]
    if kind == PLAIN:
        body = [bits.reshape(-1)]
    header = np.array([kind], np.uint8).tobytes() + np.array([size], "<u8").tobytes()
    return np.concatenate([np.frombuffer(header, np.uint8), *body])


def encoded_size(row_start: np.ndarray) -> int:
    """The length in bytes of an encoded row, from its first :data:`HEADER` bytes."""
    return int(np.frombuffer(row_start[1:HEADER].tobytes(), "<u8")[0])


def decode_masks(row: np.ndarray, n: int, h: int, w: int) -> np.ndarray:
    """Inverse of :func:`encode_masks`: ``N*H*ceil(W/8)`` uint8, the masks bit-packed."""
    rows, packed_rows = decode_rows(row, n, h, w)
    out = np.zeros((n * h, (w + 7) // 8), np.uint8)
    out[rows] = packed_rows
    return out.reshape(-1)


def decode_rows(
    row: np.ndarray,
    n: int,
    h: int,
    w: int,
    width: int | None = None,
    mirror: bool = False,
    rule: NearestRule = "torch",
) -> tuple[np.ndarray, np.ndarray]:
    """An encoded row -> the masks' nonempty rows, as :func:`resize_rows` takes them: their
    indices ``n * H + y`` (ascending) and their bits, ``R x ceil(W/8)`` uint8.

    ``width``: each row resized to this many columns instead (nearest under ``rule``):
    ``R x ceil(width/8)``; ``mirror``: and mirrored left-right. From the edge encoding the
    edges are moved (a run ``[x0, x1)`` keeps the output columns whose source column lies in
    it; mirrored, an edge at ``e`` moves to ``width - e``), so the rows are never unpacked at
    their own width. A row may become empty and stays listed."""
    wb = (w + 7) // 8
    kind = int(row[0])
    width = w if width is None else width
    if kind == PLAIN:
        grid = row[HEADER : HEADER + n * h * wb].reshape(n * h, wb)
        rows = np.flatnonzero(grid.any(axis=1))
        if width == w and not mirror:
            return rows, grid[rows]
        cols = _nearest(w, width, rule, 1)[::-1] if mirror else _nearest(w, width, rule, 1)
        bits = np.unpackbits(grid[rows], axis=-1, count=w, bitorder="little")
        return rows, np.packbits(bits[:, cols], axis=-1, bitorder="little")
    if kind != EDGES:
        raise SemiresError(f"unknown mask encoding {kind}: the store is damaged")
    sc, sm, sf = (int(v) for v in row[HEADER : HEADER + 3])
    at = HEADER + 3
    counts = _unplanes(row[at : at + sc * n * h], n * h, sc)
    at += sc * n * h
    b = _Blocks(counts, h)
    n_first = len(b.seg_len)
    n_moves = len(b.first) - n_first
    moves = _unplanes(row[at : at + sm * n_moves], n_moves, sm)
    at += sm * n_moves
    first = _unplanes(row[at : at + sf * n_first], n_first, sf)
    # a block's first row: x_0 and gaps -> columns (a cumulative sum within the block)
    cg = _cumsum0(first)
    d = np.empty(len(b.first), np.int64)
    d[b.first] = cg[1:] - cg[b.block_seg[b.seg_block]]
    d[~b.first] = (moves >> 1) ^ -(moves & 1)  # later rows: zigzag moves
    cs = _cumsum0(d)  # -> columns: a cumulative sum along each segment
    x = cs[1:] - np.repeat(cs[b.seg_start[:-1]], b.seg_len)
    if width != w:
        x, wb = _edge_map(w, width, rule)[x], (width + 7) // 8
    if mirror:
        x = width - x
    # Each edge flips every bit from x on. As differences (XOR) of consecutive bytes that is
    # two bytes: byte x // 8, bits x % 8 and up, and the byte after, the bits below x % 8 (it
    # is all flipped, its predecessor only from x % 8 on). A running XOR along the rows turns
    # the differences back into bytes; a row has an even number of edges, so nothing carries
    # over into the next row.
    compact = np.zeros(len(b.rows) * wb + 2, np.uint8)  # + 2: an edge at x = W spills over
    at_byte = b.compact_row * wb + (x >> 3)
    low = ((np.uint16(1) << (x & 7).astype(np.uint8)) - 1).astype(np.uint8)
    np.bitwise_xor.at(compact, np.concatenate([at_byte, at_byte + 1]), np.concatenate([~low, low]))
    return b.rows, _prefix_xor(compact)[: len(b.rows) * wb].reshape(-1, wb)


def _nearest(src: int, dst: int, rule: NearestRule = "torch", axis: int = 1) -> np.ndarray:
    """:func:`semires.resize.nearest_index`: read-only, made once per pair of sizes."""
    return resize_nearest_index(src, dst, rule, axis)


@functools.lru_cache(maxsize=64)
def _edge_map(src: int, dst: int, rule: NearestRule = "torch") -> np.ndarray:
    """Where an edge at source column ``x`` (``0..src``) lands at ``dst`` columns: the first
    output column whose source column is ``x`` or more. Nearest resizing keeps the columns
    in order, so a run ``[x0, x1)`` becomes the output run ``[map[x0], map[x1])``."""
    out = np.searchsorted(_nearest(src, dst, rule, 1), np.arange(src + 1), side="left")
    out.flags.writeable = False
    return out


def pick_rows(
    rows: np.ndarray, packed_rows: np.ndarray, h: int, out_h: int, rule: NearestRule = "torch"
) -> tuple[np.ndarray, np.ndarray]:
    """Masks given by their nonempty rows, already at the output width (as :func:`decode_rows`
    gives them with ``width``) -> the same for ``out_h`` rows each, picked nearest (as
    ``F.interpolate``, or ``rule``): the output rows' indices ``n * out_h + y`` (ascending) and their bits.
    A source row is copied to each output row that picks it (none, one, or several)."""
    first = _first_pick(h, out_h, rule)  # output rows [first[y], first[y + 1]) pick source row y
    mask, y = np.divmod(rows, h)
    repeats = first[y + 1] - first[y]
    start = np.repeat(mask * out_h + first[y] - _cumsum0(repeats)[:-1], repeats)
    return start + np.arange(len(start)), np.repeat(packed_rows, repeats, axis=0)


@functools.lru_cache(maxsize=64)
def _first_pick(src: int, dst: int, rule: NearestRule = "torch") -> np.ndarray:
    """``src + 1`` entries: the first of the ``dst`` outputs of nearest resizing whose source
    is ``y`` or more (the outputs pick their sources in order)."""
    out = np.searchsorted(_nearest(src, dst, rule, 0), np.arange(src + 1), side="left")
    out.flags.writeable = False
    return out


def resize_rows_packed(rows: np.ndarray, packed_rows: np.ndarray, n: int, h: int, out_h: int) -> np.ndarray:
    """:func:`pick_rows` laid out whole: ``N x out_h x C`` uint8, zeros but the picked rows."""
    index, picked = pick_rows(rows, packed_rows, h, out_h)
    out = np.zeros((n * out_h, packed_rows.shape[1]), np.uint8)
    out[index] = picked
    return out.reshape(n, out_h, packed_rows.shape[1])


def _edges(words: np.ndarray, rows: int) -> tuple[np.ndarray, np.ndarray]:
    """Mask rows bit-packed into little-endian uint64 words (pixel ``x`` is bit ``x % 64`` of
    word ``x // 64``, zeros past W and one bit more) -> ``counts`` (edges of each row) and
    every edge's column ``x`` in row order (columns ascending)."""
    flips = words << 1  # the pixel before each pixel: the next lower bit, or the word before's top
    flips[:, 1:] |= words[:, :-1] >> 63
    flips ^= words
    at = np.flatnonzero(flips)  # the words, then their bytes, then bits that hold an edge
    nonzero = flips.reshape(-1)[at].astype("<u8", copy=False).view(np.uint8)
    byte = np.flatnonzero(nonzero)
    k, bit = np.nonzero(np.unpackbits(nonzero[byte][:, None], axis=1, bitorder="little"))
    row, col = np.divmod(at[byte[k] >> 3], words.shape[1])
    x = col * 64 + (byte[k] & 7) * 8 + bit
    return np.bincount(row, minlength=rows).astype(np.int64), x.astype(np.int64)


class _Blocks:
    """The block structure of an image's edges (module docstring), from the edge counts.

    A block is a run of consecutive rows of one mask with the same, nonzero number of edges;
    its values come as one *segment* per edge slot ``k``: that edge along the block's rows.
    ``rows``: the nonempty rows (``n * H + y``). Per segment: ``seg_len`` (the block's rows),
    ``seg_start`` (its first value; one more entry, the total), ``seg_block``. Per value, in
    stored order: ``seg``, ``slot`` (``k``), ``compact_row`` (its row's place in ``rows``)."""

    def __init__(self, counts: np.ndarray, h: int) -> None:
        self.rows = rows = np.flatnonzero(counts)
        per_row = counts[rows]
        new = np.ones(len(rows), bool)
        new[1:] = (rows[1:] != rows[:-1] + 1) | (per_row[1:] != per_row[:-1]) | (rows[1:] % h == 0)
        starts = np.flatnonzero(new)
        block_len = np.diff(np.append(starts, len(rows)))
        block_edges = per_row[starts]
        self.seg_block = np.repeat(np.arange(len(starts)), block_edges)
        self.block_seg = _cumsum0(block_edges)  # each block's first segment
        self.seg_len = block_len[self.seg_block]
        self.seg_start = _cumsum0(self.seg_len)
        self.seg = np.repeat(np.arange(len(self.seg_len)), self.seg_len)
        t = np.arange(int(self.seg_start[-1])) - self.seg_start[self.seg]  # row within the block
        self.first = t == 0
        self.slot = (np.arange(len(self.seg_len)) - self.block_seg[self.seg_block])[self.seg]
        self.compact_row = starts[self.seg_block][self.seg] + t


def _edge_values(b: _Blocks, counts: np.ndarray, x: np.ndarray) -> np.ndarray:
    """The values stream (module docstring) from the edge columns in row order."""
    x = x[_cumsum0(counts)[b.rows[b.compact_row]] + b.slot]  # in stored order
    out = np.empty_like(x)
    # later rows of a block: the move from the row above (the value before, same segment)
    move = x[1:] - x[:-1]
    later = np.flatnonzero(~b.first)
    out[later] = (move[later - 1] << 1) ^ (move[later - 1] >> 63)
    # a block's first row: x_0, then the gap from the edge before (the segment before)
    first = np.flatnonzero(b.first)
    out[first] = x[first]
    gap = first[b.slot[first] > 0]
    out[gap] -= x[gap - b.seg_len[b.seg[gap]]]
    return out


def _cumsum0(a: np.ndarray) -> np.ndarray:
    """``[0, a0, a0 + a1, ...]`` as int64."""
    out = np.zeros(len(a) + 1, np.int64)
    np.cumsum(a, out=out[1:])
    return out


def _itemsize(a: np.ndarray) -> int:
    top = int(a.max()) if a.size else 0
    return next(s for s in (1, 2, 4, 8) if top < 1 << (8 * s))


def _planes(a: np.ndarray) -> np.ndarray:
    """Non-negative integers -> their bytes as planes (all least significant bytes first)."""
    size = _itemsize(a)
    le = a.astype(f"<u{size}").view(np.uint8).reshape(-1, size)
    return np.ascontiguousarray(le.T).reshape(-1)


def _unplanes(buf: np.ndarray, count: int, size: int) -> np.ndarray:
    planes = buf.reshape(size, count)
    if size == 1:
        return planes[0].astype(np.int64)
    out = np.ascontiguousarray(planes.T).view(f"<u{size}").reshape(count)
    return out.astype(np.int64)


def _prefix_xor(a: np.ndarray) -> np.ndarray:
    """Running XOR of a uint8 array, eight bytes at a time."""
    if a.size <= 4096:
        return np.bitwise_xor.accumulate(a)
    words = np.zeros(-(-a.size // 8), "<u8")
    words.view(np.uint8)[: a.size] = a
    words ^= words << 8  # within each word (little endian: later bytes are higher)
    words ^= words << 16
    words ^= words << 32
    carry = _prefix_xor((words >> 56).astype(np.uint8))  # the running XOR at each word's end
    words[1:] ^= carry[:-1].astype("<u8") * 0x0101010101010101
    return words.view(np.uint8)[: a.size]


_POPCOUNT = np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1).sum(axis=1)


def mask_attrs(rows: np.ndarray, packed_rows: np.ndarray, n: int, h: int, w: int) -> np.ndarray:
    """What the masks themselves say of :data:`ATTR_FIELDS`: ``N x 7`` float32 with the area and
    the box (as :func:`~semires.proposals.base.mask_boxes`), zero scores. The masks are given by
    their nonempty rows, as :func:`resize_rows` takes them (``rows`` ascending)."""
    out = np.zeros((n, len(ATTR_FIELDS)), np.float32)
    if len(rows) == 0:
        return out
    mask, y = np.divmod(rows, h)
    out[:, 2] = np.bincount(mask, weights=_POPCOUNT[packed_rows].sum(axis=1), minlength=n)
    start = np.flatnonzero(np.append(True, mask[1:] != mask[:-1]))  # each mask's first row
    end = np.append(start[1:], len(rows)) - 1
    union = np.bitwise_or.reduceat(packed_rows, start, axis=0)  # each mask's columns
    cols = np.unpackbits(union, axis=1, count=w, bitorder="little")
    x0 = np.argmax(cols, axis=1)
    x1 = w - 1 - np.argmax(cols[:, ::-1], axis=1)
    out[mask[start], 3:] = np.stack([x0, y[start], x1 - x0, y[end] - y[start]], axis=1)
    return out


def _xor_floats(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The float32s whose bits are those of ``a`` XOR those of ``b`` (its own inverse)."""
    return (np.ascontiguousarray(a, np.float32).view(np.uint32) ^ b.view(np.uint32)).view(np.float32)


# --- geometry -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """Where each image lives in the store. ``images``: ``(image_id, height, width)`` in
    ascending id order."""

    images: tuple[tuple[int, int, int], ...]
    max_masks: int
    shard_images: int
    chunk_bytes: int = 1 << 20

    @classmethod
    def build(
        cls,
        images: Mapping[int, tuple[int, int]],
        max_masks: int,
        shard_images: int,
        chunk_bytes: int = 1 << 20,
    ) -> Layout:
        """``images``: ``image_id -> (height, width)``."""
        rows = tuple((int(i), int(images[i][0]), int(images[i][1])) for i in sorted(images))
        return cls(rows, max_masks, shard_images, chunk_bytes)

    @property
    def num_images(self) -> int:
        return len(self.images)

    @property
    def capacity(self) -> int:
        """Bytes per row: room for ``max_masks`` masks of the largest image bit-packed (the
        longest an encoded row gets) and the row header, whole chunks."""
        if not self.images:
            return self.chunk_bytes
        h = max(r[1] for r in self.images)
        wb = (max(r[2] for r in self.images) + 7) // 8
        need = HEADER + self.max_masks * h * wb
        return max(1, -(-need // self.chunk_bytes)) * self.chunk_bytes

    @property
    def num_shards(self) -> int:
        return -(-self.num_images // self.shard_images)

    def shard(self, k: int) -> range:
        """Row indices of shard ``k``."""
        return range(k * self.shard_images, min((k + 1) * self.shard_images, self.num_images))

    def shards_of(self, rank: int, world: int) -> list[int]:
        """The shards process ``rank`` of ``world`` writes: ``k % world == rank``."""
        return list(range(rank, self.num_shards, world))

    def to_json(self) -> dict[str, Any]:
        return {
            "chunk_bytes": self.chunk_bytes,
            "max_masks": self.max_masks,
            "shard_images": self.shard_images,
            "capacity_bytes": self.capacity,
        }


# --- writing ----------------------------------------------------------------------------------


def _zarr() -> Any:
    import zarr

    return zarr


@contextlib.contextmanager
def _writing(path: str | Path) -> Iterator[None]:
    """zarr's writes into the store at ``path``: a full disk or an unwritable folder is one
    :class:`~semires.atomic.WriteError` naming the store (zarr's error names a temporary
    file, or none at all)."""
    try:
        yield
    except OSError as e:
        fault = as_write_error(e, path)
        if fault is None:
            raise
        raise fault from e


def _compressors(level: int = 12) -> list[Any]:
    from zarr.codecs import ZstdCodec

    return [ZstdCodec(level=level, checksum=False)]


def create(path: str | Path, layout: Layout, attributes: Mapping[str, Any]) -> None:
    """Write the store's metadata and its small per-image arrays (one process, once).

    ``attributes``: what made the masks (see the backends' ``config()``); stored with sorted
    keys alongside the format, version and layout."""
    zarr = _zarr()
    attrs = _sorted_json(
        {
            **attributes,
            "format": FORMAT,
            "version": VERSION,
            "attr_fields": list(ATTR_FIELDS),
            **layout.to_json(),
        }
    )
    with _writing(path):
        g = zarr.open_group(str(path), mode="w", zarr_format=3, attributes=attrs)
        n, s, cap, m = layout.num_images, layout.shard_images, layout.capacity, layout.max_masks
        ids = np.array([r[0] for r in layout.images], np.int64)
        for name, values in (
            ("image_id", ids),
            ("height", np.array([r[1] for r in layout.images], np.int32)),
            ("width", np.array([r[2] for r in layout.images], np.int32)),
        ):
            g.create_array(name, data=values, chunks=(max(n, 1),), compressors=_compressors())
        g.create_array(
            "num_masks",
            shape=(n,),
            dtype="int32",
            chunks=(max(n, 1),),
            compressors=_compressors(),
            fill_value=0,
        )
        g.create_array(
            "masks",
            shape=(n, cap),
            dtype="uint8",
            chunks=(1, layout.chunk_bytes),
            shards=(s, cap),
            compressors=_compressors(19),  # the encoded rows are short: a high level costs little
            fill_value=0,
        )
        g.create_array(
            "attrs",
            shape=(n, m, len(ATTR_FIELDS)),
            dtype="float32",
            chunks=(1, m, len(ATTR_FIELDS)),
            shards=(s, m, len(ATTR_FIELDS)),
            compressors=_compressors(),
            fill_value=float("nan"),
        )


def write_shard(path: str | Path, layout: Layout, k: int, items: Sequence[ImageResult]) -> None:
    """Write shard ``k`` whole: ``items`` are its images' results in row order."""
    zarr = _zarr()
    g = zarr.open_group(str(path), mode="r+")
    rows = layout.shard(k)
    if len(items) != len(rows):
        raise ValueError(f"shard {k} has {len(rows)} images, got {len(items)}")
    # np.zeros does not touch memory it is not asked to fill: only the masks' bytes cost RAM.
    block = np.zeros((len(rows), layout.capacity), np.uint8)
    attrs = np.full((len(rows), layout.max_masks, len(ATTR_FIELDS)), np.nan, np.float32)
    for j, item in enumerate(items):
        if item.num_masks > layout.max_masks:
            raise ValueError(
                f"{item.num_masks} masks, the store holds at most {layout.max_masks}: cap() first"
            )
        n, h, w = item.num_masks, item.height, item.width
        values = np.asarray(item.attrs, np.float32).reshape(n, len(ATTR_FIELDS))
        if n * h * w:
            row = encode_masks(item.packed, n, h, w)
            block[j, : row.size] = row
            # the masks as a reader decodes them, so that it derives the very same values
            values = _xor_floats(values, mask_attrs(*decode_rows(row, n, h, w), n, h, w))
        attrs[j, :n] = values
    with _writing(path):
        g["masks"][rows.start : rows.stop] = block
        g["attrs"][rows.start : rows.stop] = attrs


def finish(path: str | Path, num_masks: np.ndarray) -> None:
    """Write ``num_masks`` (``I`` int) once every shard is in place, then record the size and
    sha256 of every data file in ``zarr.json`` (one process)."""
    zarr = _zarr()
    path = Path(path)
    g = zarr.open_group(str(path), mode="r+")
    with _writing(path):
        g["num_masks"][:] = np.asarray(num_masks, np.int32)
        for leftover in path.rglob("*.partial"):  # zarr's temporary file of a writer killed mid-write
            leftover.unlink()
        digests = file_digests(path, data_files(path))
        g.attrs.put(_sorted_json({**dict(g.attrs), "digests": digests}))


def data_files(path: str | Path) -> list[str]:
    """The store's data files (chunks and shards; not the ``zarr.json`` metadata), as
    ``/``-separated paths relative to ``path``, sorted."""
    path = Path(path)
    return sorted(
        f.relative_to(path).as_posix() for f in path.rglob("*") if f.is_file() and f.name != "zarr.json"
    )


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)  # hashlib releases the GIL: threads hash files in parallel
    return h.hexdigest()


def file_digests(path: str | Path, names: Sequence[str]) -> dict[str, list[int | str]]:
    """``{name: [size, sha256]}`` of the files ``names`` under ``path``."""
    path = Path(path)
    with ThreadPoolExecutor(max(1, min(8, os.cpu_count() or 1))) as pool:
        shas = list(pool.map(lambda n: _sha256(path / n), names))
    return {n: [(path / n).stat().st_size, sha] for n, sha in zip(names, shas, strict=True)}


def _sorted_json(obj: Any) -> Any:
    """``obj`` with every mapping's keys sorted, through a JSON round trip (plain types)."""
    return json.loads(json.dumps(obj, sort_keys=True))


# --- scratch: one finished image per file -------------------------------------------------


@dataclass(frozen=True)
class ImageResult:
    """One image's kept masks: ``packed`` (see :func:`pack_masks`), ``attrs`` ``N x 7``,
    ``found``: masks the backend returned before the cap, ``source_sha256`` of the image file."""

    packed: np.ndarray
    attrs: np.ndarray
    num_masks: int
    height: int
    width: int
    found: int
    source_sha256: str

    @classmethod
    def from_proposals(cls, props: Proposals, found: int, source_sha256: str) -> ImageResult:
        n, h, w = props.masks.shape
        return cls(pack_masks(props.masks), props.attrs(), n, h, w, found, source_sha256)


class Scratch:
    """A folder of finished images (``<image_id>.npz``) for a run that may be killed."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self._codec = numcodecs.Zstd(level=3)

    def path(self, image_id: int) -> Path:
        return self.root / f"{int(image_id)}.npz"

    def has(self, image_id: int) -> bool:
        return self.path(image_id).is_file()

    def save(self, image_id: int, r: ImageResult) -> None:
        """Write atomically: a killed process leaves no file that reads as finished."""
        self.root.mkdir(parents=True, exist_ok=True)
        meta = np.array([r.num_masks, r.height, r.width, r.found, r.packed.size], np.int64)
        with atomic_path(self.path(image_id)) as tmp, open(tmp, "wb") as f:
            np.savez(
                f,
                packed=np.frombuffer(self._codec.encode(r.packed), np.uint8),
                attrs=r.attrs.astype(np.float32),
                meta=meta,
                sha=np.array(r.source_sha256),
            )

    def load(self, image_id: int) -> ImageResult:
        with np.load(self.path(image_id), allow_pickle=False) as z:
            n, h, w, found, size = (int(v) for v in z["meta"])
            packed = np.frombuffer(self._codec.decode(z["packed"].tobytes()), np.uint8)[:size]
            return ImageResult(packed, z["attrs"], n, h, w, found, str(z["sha"]))

    def source_sha256(self, image_id: int) -> str:
        with np.load(self.path(image_id), allow_pickle=False) as z:
            return str(z["sha"])


class _ShardReader:
    """Rows of the ``masks`` array read straight from its shard files, without zarr's
    machinery (an event loop round trip per read): the shard index at the end of the file
    (``offset, nbytes`` per inner chunk, then its crc32c), the chunk's bytes, zstd. Only for
    the layout :func:`create` writes; :meth:`of` returns None for any other, and the store
    reads through zarr. The indexes of the last few shards read are kept."""

    MISSING = 2**64 - 1  # an inner chunk that was never written (all zeros)

    def __init__(self, folder: Path, shard_rows: int, chunk: int, row_chunks: int) -> None:
        self.folder, self.shard_rows, self.chunk, self.row_chunks = folder, shard_rows, chunk, row_chunks
        self._indexes: dict[int, np.ndarray] = {}

    @classmethod
    def of(cls, folder: Path) -> _ShardReader | None:
        try:
            meta = json.loads((folder / "zarr.json").read_text())
            (codec,) = meta["codecs"]
            conf = codec["configuration"]
            inner = [c["name"] for c in conf["codecs"]]
            index = [(c["name"], c.get("configuration", {})) for c in conf["index_codecs"]]
            shard_rows, row_bytes = meta["chunk_grid"]["configuration"]["chunk_shape"]
            one, chunk = conf["chunk_shape"]
            layout_ok = (
                codec["name"] == "sharding_indexed"
                and meta["data_type"] == "uint8"
                and meta["fill_value"] == 0
                and meta["chunk_key_encoding"] == {"name": "default", "configuration": {"separator": "/"}}
                and inner == ["bytes", "zstd"]
                and index == [("bytes", {"endian": "little"}), ("crc32c", {})]
                and conf.get("index_location", "end") == "end"
                and one == 1
                and row_bytes == meta["shape"][1]
                and row_bytes % chunk == 0
            )
        except (OSError, KeyError, TypeError, ValueError):
            return None
        return cls(folder, shard_rows, chunk, row_bytes // chunk) if layout_ok else None

    def _index(self, k: int) -> np.ndarray:
        index = self._indexes.get(k)
        if index is None:
            size = self.shard_rows * self.row_chunks * 16 + 4
            with open(self.folder / "c" / str(k) / "0", "rb") as f:
                f.seek(-size, os.SEEK_END)
                raw = f.read(size)
            body, stored = raw[:-4], int.from_bytes(raw[-4:], "little")
            if len(raw) != size or numcodecs.CRC32C().checksum(body) != stored:
                raise ValueError("Stored and computed checksum do not match")
            index = np.frombuffer(body, "<u8").reshape(-1, 2)
            if len(self._indexes) >= 16:
                self._indexes.pop(next(iter(self._indexes)))
            self._indexes[k] = index
        return index

    def read(self, j: int, start: int, stop: int) -> np.ndarray:
        k, r = divmod(j, self.shard_rows)
        index = self._index(k)
        parts = []
        first, last = start // self.chunk, (stop - 1) // self.chunk
        with open(self.folder / "c" / str(k) / "0", "rb") as f:
            for c in range(first, last + 1):
                offset, nbytes = (int(v) for v in index[r * self.row_chunks + c])
                if offset == nbytes == self.MISSING:
                    data = np.zeros(self.chunk, np.uint8)
                else:
                    f.seek(offset)
                    data = np.frombuffer(_ZSTD.decode(f.read(nbytes)), np.uint8)
                    if data.size != self.chunk:
                        raise ValueError(f"inner chunk {c} of shard {k} holds {data.size} bytes")
                parts.append(data)
        row = parts[0] if len(parts) == 1 else np.concatenate(parts)
        return row[start - first * self.chunk : stop - first * self.chunk]


_ZSTD = numcodecs.Zstd()


# --- reading ----------------------------------------------------------------------------------


class ProposalStore:
    """Read a proposals store. ``store.masks(image_id, size=(h, w))`` -> ``N x h x w`` bool.

    ``expect``: a backend's ``config()``; if given, the store must have been made by an equal
    configuration, else a :class:`SemiresError` says what differs."""

    def __init__(self, path: str | Path, expect: Mapping[str, Any] | None = None) -> None:
        zarr = _zarr()
        self.path = Path(path)
        if not (self.path / "zarr.json").is_file():
            raise SemiresError(
                f"{self.path}: no proposals store here; run `semires propose` (dvc repro propose)"
            )
        try:
            g = zarr.open_group(str(self.path), mode="r")
            self.attributes: dict[str, Any] = dict(g.attrs)
        except Exception as e:  # zarr.json cut short or not JSON
            raise self._damaged("zarr.json", e) from e
        if self.attributes.get("format") != FORMAT:
            raise SemiresError(
                f"{self.path}: not a proposals store of semires (format {self.attributes.get('format')!r}); "
                "rebuild it with `semires propose` (dvc repro propose)"
            )
        if self.attributes.get("version") != VERSION:
            raise SemiresError(
                f"{self.path}: a proposals store of version {self.attributes.get('version')!r}; this semires "
                f"reads version {VERSION}, which records a digest of every shard to check it on open: "
                "rebuild it with `semires propose` (dvc repro propose)"
            )
        self._check_digests()
        arrays = {}
        for name in ("image_id", "height", "width", "num_masks", "masks", "attrs"):
            try:
                arrays[name] = a = g[name]
                # zarr reads a missing chunk as zeros: the per-image arrays must be whole
                if name in ("image_id", "height", "width") and a.nchunks_initialized < a.nchunks:
                    raise FileNotFoundError("its chunk is missing")
            except Exception as e:
                raise self._damaged(name, e) from e
        self.image_ids = arrays["image_id"][:]
        self.heights = arrays["height"][:]
        self.widths = arrays["width"][:]
        self.counts = arrays["num_masks"][:]
        self._masks = arrays["masks"]
        self._chunk_bytes = int(self.attributes["chunk_bytes"])
        self._attrs = arrays["attrs"]
        self._pid = os.getpid()
        self._shards: _ShardReader | bool | None = None  # made on first read (False: read through zarr)
        self._check_shards()
        self._row = {int(i): j for j, i in enumerate(self.image_ids)}
        if expect is not None:
            self.check(expect)

    def __getstate__(self) -> dict[str, Any]:
        """Pickled (for a DataLoader worker that is spawned) without its zarr handles: each
        process opens the arrays itself, on first use (see :meth:`_reopen`)."""
        state = dict(self.__dict__)
        state["_masks"] = state["_attrs"] = None
        return state

    def _reopen(self) -> None:
        """Open ``masks`` and ``attrs`` in this process if they were opened in another (a
        forked or spawned DataLoader worker): one store handle per process, opened lazily."""
        if self._masks is not None and self._pid == os.getpid():
            return
        try:
            g = _zarr().open_group(str(self.path), mode="r")
            self._masks, self._attrs = g["masks"], g["attrs"]
        except Exception as e:
            raise self._damaged("masks", e) from e
        self._pid = os.getpid()

    def _damaged(self, where: str, e: BaseException | str) -> SemiresError:
        """The one message for a store that is incomplete or corrupt (a copy cut short, say)."""
        if isinstance(e, KeyError):
            why = "missing"
        else:
            why = (str(e).strip().splitlines() or [type(e).__name__])[0].split(". ")[0][:200]
        return SemiresError(
            f"{self.path}: damaged proposals store ({where}: {why}); delete it and rerun "
            "`semires propose` (dvc repro propose), or `dvc pull` it again"
        )

    def _check_digests(self) -> None:
        """Every data file is the one :func:`finish` recorded: none missing, none added, each of
        its size (cheap, all first) and its sha256."""
        recorded = self.attributes.get("digests")
        if not isinstance(recorded, dict) or not all(
            isinstance(v, list) and len(v) == 2 for v in recorded.values()
        ):
            raise self._damaged("zarr.json", "no digests of its files")
        present = data_files(self.path)
        missing = sorted(set(recorded) - set(present))
        if missing:
            raise self._damaged(missing[0], "shard file missing" if "/c/" in missing[0] else "file missing")
        added = sorted(set(present) - set(recorded))
        if added:
            raise self._damaged(added[0], "a file this store did not write")
        for name in present:
            size = (self.path / name).stat().st_size
            if size != recorded[name][0]:
                raise self._damaged(name, f"{size} bytes where the store wrote {recorded[name][0]}")
        got = file_digests(self.path, present)
        for name in present:
            if got[name][1] != recorded[name][1]:
                raise self._damaged(
                    name, "its content is not what the store wrote there (a shard of another store, or moved)"
                )

    def _check_shards(self) -> None:
        """Every shard that holds masks is on disk: zarr would read a missing one as zeros."""
        per = int(self._masks.shards[0])
        for k in range(-(-len(self.image_ids) // per)):
            if not self.counts[k * per : (k + 1) * per].any():
                continue  # a shard of images without masks is never written
            for a in (self._masks, self._attrs):
                key = a.metadata.encode_chunk_key((k,) + (0,) * (a.ndim - 1))
                if not (self.path / a.path / key).is_file():
                    raise self._damaged(f"{a.path}/{key}", "shard file missing")

    @property
    def backend(self) -> str:
        return str(self.attributes["backend"])

    @property
    def checkpoint_sha256(self) -> str | None:
        return self.attributes.get("checkpoint_sha256")

    @property
    def settings(self) -> dict[str, Any]:
        return dict(self.attributes.get("settings", {}))

    def check(self, config: Mapping[str, Any]) -> None:
        """Fail unless every key of ``config`` (a backend's ``config()``) matches the store's."""
        want = _sorted_json(dict(config))
        diff = [k for k in sorted(want) if self.attributes.get(k) != want[k]]
        if diff:
            k = diff[0]
            raise SemiresError(
                f"{self.path}: proposals were made with {k} = {self.attributes.get(k)!r}, "
                f"expected {want[k]!r}; rerun `semires propose` (dvc repro propose) for this configuration"
            )

    def __len__(self) -> int:
        return len(self.image_ids)

    def __contains__(self, image_id: object) -> bool:
        return image_id in self._row

    def _index(self, image_id: int) -> int:
        try:
            return self._row[int(image_id)]
        except KeyError:
            raise SemiresError(
                f"{self.path}: image {image_id} has no proposals (the store holds the train images)"
            ) from None

    def num_masks(self, image_id: int) -> int:
        return int(self.counts[self._index(image_id)])

    def size(self, image_id: int) -> tuple[int, int]:
        """The image's own ``(height, width)``."""
        j = self._index(image_id)
        return int(self.heights[j]), int(self.widths[j])

    def attrs(self, image_id: int) -> np.ndarray:
        """``N x 7`` float32, columns :data:`ATTR_FIELDS` (decodes the masks: see ``attrs`` in
        the module docstring)."""
        return self._attrs_and_rows(image_id)[0]

    def _attrs_and_rows(self, image_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The attributes, and the masks as :func:`decode_rows` gives them."""
        j = self._index(image_id)
        n, h, w = int(self.counts[j]), int(self.heights[j]), int(self.widths[j])
        self._reopen()
        try:
            stored = np.ascontiguousarray(self._attrs[j, :n], np.float32)
        except Exception as e:  # a shard cut short or corrupt
            raise self._damaged(f"attrs of image {image_id}", e) from e
        if n * h * w == 0:
            return stored, np.zeros(0, np.int64), np.zeros((0, (w + 7) // 8), np.uint8)
        rows, packed_rows = decode_rows(self._encoded(j, n, h, w), n, h, w)
        return _xor_floats(stored, mask_attrs(rows, packed_rows, n, h, w)), rows, packed_rows

    def packed(self, image_id: int) -> np.ndarray:
        """The image's masks bit-packed: ``N*H*ceil(W/8)`` uint8 (see :func:`pack_masks`)."""
        j = self._index(image_id)
        n, h, w = int(self.counts[j]), int(self.heights[j]), int(self.widths[j])
        if n * h * w == 0:
            return np.zeros(0, np.uint8)
        return decode_masks(self._encoded(j, n, h, w), n, h, w)

    def _encoded(self, j: int, n: int, h: int, w: int) -> np.ndarray:
        """Row ``j`` of ``masks``: the encoded masks of an image with ``n`` masks of ``h x w``."""
        # one read of the first inner chunk holds the whole row but for the largest ones
        longest = HEADER + n * h * ((w + 7) // 8)
        head = min(longest, self._chunk_bytes)
        row = self._read(j, 0, head)
        size = encoded_size(row)
        if row[0] not in (PLAIN, EDGES) or not HEADER < size <= longest:  # all zeros: no shard file
            raise SemiresError(
                f"{self.path}: the masks of image {int(self.image_ids[j])} are not an encoded row "
                f"(encoding {int(row[0])}, {size} bytes): the store is damaged; rebuild it with "
                "`semires propose` (dvc repro propose)"
            )
        if size > head:
            row = np.concatenate([row, self._read(j, head, size)])
        return row

    def _read(self, j: int, start: int, stop: int) -> np.ndarray:
        """Bytes ``start:stop`` of row ``j`` of ``masks``: from the shard file itself when it
        is laid out as :func:`create` makes it (:class:`_ShardReader`, a tenth of zarr's time
        for one row), else through zarr."""
        where = f"masks of image {int(self.image_ids[j])}"
        try:
            if self._shards is None:
                self._shards = _ShardReader.of(self.path / "masks") or False
            if self._shards:
                return self._shards.read(j, start, stop)
            self._reopen()
            return self._masks[j, start:stop]
        except SemiresError:
            raise
        except Exception as e:  # a shard cut short or corrupt
            raise self._damaged(where, e) from e

    def masks(
        self,
        image_id: int,
        size: tuple[int, int] | None = None,
        device: torch.device | str = "cpu",
        rule: NearestRule = "torch",
    ) -> torch.Tensor:
        """``N x h x w`` bool tensor: the masks resized (nearest under ``rule``: ``"torch"`` as
        ``F.interpolate``, ``"pil"`` as PIL's ``NEAREST``) to ``size`` = ``(h, w)``, or at the
        image's own size when ``size`` is None. With a GPU ``device`` the bits are unpacked
        there (only the packed rows are copied)."""
        j = self._index(image_id)
        n, h, w = int(self.counts[j]), int(self.heights[j]), int(self.widths[j])
        oh, ow = size if size is not None else (h, w)
        if n * h * w == 0:
            return torch.zeros((n, oh, ow), dtype=torch.bool, device=device)
        rows, packed_rows = decode_rows(self._encoded(j, n, h, w), n, h, w)
        return resize_rows(rows, packed_rows, n, h, w, (oh, ow), device=device, rule=rule)

    def packed_rows(
        self, image_id: int, size: tuple[int, int], mirror: bool = False, rule: NearestRule = "torch"
    ) -> tuple[np.ndarray, np.ndarray]:
        """The masks resized (nearest under ``rule``, as :meth:`masks`) to ``size`` = ``(h, w)``, mirrored
        left-right if ``mirror``, bit-packed (as :func:`pack_masks`, per row) and given by
        their nonempty rows: ``(index, rows)``, ``index`` the rows' places ``n * h + y``
        (int64, ascending) and ``rows`` their bits, ``R x ceil(w/8)`` uint8. Never unpacked on
        the way, and a few percent of the whole: what a data loader collates and sends to the
        device, which lays them out and unpacks them (:func:`semires.bits.unpack_bits`)."""
        j = self._index(image_id)
        n, h, w = int(self.counts[j]), int(self.heights[j]), int(self.widths[j])
        oh, ow = size
        if n * h * w == 0:
            return np.zeros(0, np.int64), np.zeros((0, (ow + 7) // 8), np.uint8)
        rows, packed = decode_rows(self._encoded(j, n, h, w), n, h, w, width=ow, mirror=mirror, rule=rule)
        return pick_rows(rows, packed, h, oh, rule)

    def packed_masks(
        self, image_id: int, size: tuple[int, int], mirror: bool = False, rule: NearestRule = "torch"
    ) -> np.ndarray:
        """:meth:`packed_rows` laid out whole: ``N x h x ceil(w/8)`` uint8, equal to
        ``np.packbits(masks(image_id, size)[..., ::-1 if mirror else 1], axis=-1,
        bitorder="little")`` (with the same ``rule``)."""
        n, (oh, ow) = self.num_masks(image_id), size
        index, rows = self.packed_rows(image_id, size, mirror, rule)
        out = np.zeros((n * oh, (ow + 7) // 8), np.uint8)
        out[index] = rows
        return out.reshape(n, oh, (ow + 7) // 8)

    def proposals(self, image_id: int) -> Proposals:
        """Everything stored for the image, at its own resolution."""
        a, rows, packed_rows = self._attrs_and_rows(image_id)
        h, w = self.size(image_id)
        masks = np.zeros((len(a), h, w), bool)
        if len(rows):
            masks = resize_rows(rows, packed_rows, len(a), h, w, (h, w)).numpy()
        return Proposals(
            masks=masks,
            predicted_iou=a[:, 0],
            stability_score=a[:, 1],
            area=a[:, 2],
            bbox=a[:, 3:7],
        )
