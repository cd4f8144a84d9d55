"""The proposals store: bit packing, the edge encoding, nearest resize on packed bits,
write/read round trip."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from semires.errors import SemiresError
from semires.proposals.base import Proposals, cap, mask_boxes
from semires.proposals.store import (
    EDGES,
    HEADER,
    PLAIN,
    ImageResult,
    Layout,
    ProposalStore,
    Scratch,
    _pick_bits,
    _prefix_xor,
    create,
    decode_masks,
    decode_rows,
    encode_masks,
    encoded_size,
    finish,
    nearest_index,
    pack_masks,
    resize_packed,
    resize_rows,
    resize_rows_packed,
    unpack_masks,
    write_shard,
)

CONFIG = {"backend": "test", "checkpoint_sha256": None, "settings": {"b": 2, "a": 1}}


def _blobs(rng: np.random.Generator, n: int, h: int, w: int) -> np.ndarray:
    """``n x h x w`` bool: random ellipses, like object masks."""
    yy, xx = np.mgrid[0:h, 0:w]
    out = np.zeros((n, h, w), bool)
    for i in range(n):
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        ry, rx = rng.uniform(2, h / 2), rng.uniform(2, w / 2)
        out[i] = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1
    return out


def test_pack_round_trip_odd_width():
    masks = np.random.default_rng(0).random((3, 5, 13)) > 0.5
    packed = pack_masks(masks)
    assert packed.dtype == np.uint8 and packed.size == 3 * 5 * 2
    assert np.array_equal(unpack_masks(packed, 3, 5, 13), masks)


def _masks_of_every_kind(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Blobs, noise, empty, full, one pixel in each corner, one column, one row."""
    blobs = _blobs(rng, 3, max(h, 4), max(w, 4))[:, :h, :w]
    masks = [blobs, rng.random((2, h, w)) > 0.5, np.zeros((2, h, w), bool)]
    one = np.zeros((6, h, w), bool)
    one[0] = True
    one[1, 0, 0] = one[2, 0, w - 1] = one[3, h - 1, 0] = one[4, h - 1, w - 1] = True
    one[5, :, w // 2] = True
    masks.append(one)
    return np.concatenate(masks)


@pytest.mark.parametrize(
    ("h", "w"), [(1, 1), (1, 17), (5, 13), (7, 8), (9, 16), (3, 9), (31, 257), (1, 300), (12, 63)]
)
def test_edge_encoding_round_trips_every_size(h, w):
    rng = np.random.default_rng(h * 1000 + w)
    masks = _masks_of_every_kind(rng, h, w)
    n = len(masks)
    for pick in (np.arange(n), [0, 1, 2], [5, 6], [7, 8, 9, 10, 11, 12], [0], []):
        m = masks[pick]
        packed = pack_masks(m)
        row = encode_masks(packed, len(m), h, w)
        assert encoded_size(row[:HEADER]) == row.size
        assert np.array_equal(decode_masks(row, len(m), h, w), packed)
        rows, packed_rows = decode_rows(row, len(m), h, w)
        assert np.array_equal(rows, np.flatnonzero(m.reshape(-1, w).any(axis=1)))
        assert np.array_equal(
            unpack_masks(packed_rows.reshape(-1), 1, len(rows), w)[0], m.reshape(-1, w)[rows]
        )


def test_smooth_masks_take_the_edges_and_noise_the_plain_bits():
    rng = np.random.default_rng(4)
    blobs = _blobs(rng, 8, 64, 80)
    row = encode_masks(pack_masks(blobs), 8, 64, 80)
    assert row[0] == EDGES and row.size < (HEADER + blobs.size // 8) / 3
    noise = rng.random((2, 16, 24)) > 0.5
    row = encode_masks(pack_masks(noise), 2, 16, 24)
    assert row[0] == PLAIN and row.size == HEADER + noise.size // 8
    assert np.array_equal(decode_masks(row, 2, 16, 24), pack_masks(noise))


@pytest.mark.parametrize("noise", [False, True])
def test_bits_past_the_width_are_not_stored(noise):
    rng = np.random.default_rng(5)
    masks = rng.random((3, 40, 29)) > 0.5 if noise else _blobs(rng, 3, 40, 29)
    packed = pack_masks(masks)
    dirty = packed.reshape(120, 4) | np.array([0, 0, 0, 0xE0], np.uint8)  # bits 29..31: padding
    row = encode_masks(dirty.reshape(-1), 3, 40, 29)
    assert row[0] == (PLAIN if noise else EDGES)
    assert np.array_equal(decode_masks(row, 3, 40, 29), packed)


def test_prefix_xor_long_and_short():
    a = np.random.default_rng(7).integers(0, 256, 100_003).astype(np.uint8)
    assert np.array_equal(_prefix_xor(a), np.bitwise_xor.accumulate(a))
    assert np.array_equal(_prefix_xor(a[:5]), np.bitwise_xor.accumulate(a[:5]))


@pytest.mark.parametrize("size", [(16, 16), (64, 80), (150, 97), (40, 200), (7, 3)])
def test_resize_from_nonempty_rows_equals_interpolate_nearest(size):
    """Blobs leave most rows empty: only the others are computed."""
    masks = _masks_of_every_kind(np.random.default_rng(8), 45, 61)
    n = len(masks)
    rows, packed_rows = decode_rows(encode_masks(pack_masks(masks), n, 45, 61), n, 45, 61)
    assert len(rows) < n * 45
    got = resize_rows(rows, packed_rows, n, 45, 61, size)
    want = F.interpolate(torch.from_numpy(masks).float()[None], size=size, mode="nearest")[0] > 0.5
    assert got.dtype == torch.bool and torch.equal(got, want)


@pytest.mark.parametrize(
    ("h", "w", "size"),
    [
        (37, 53, (16, 16)),
        (48, 64, (48, 48)),
        (7, 9, (20, 31)),
        (5, 8, (5, 8)),
        (30, 640, (30, 480)),
        (4, 427, (4, 480)),
        (3, 96, (3, 64)),
    ],
)
def test_resize_on_packed_bits_equals_interpolate_nearest(h, w, size):
    masks = np.random.default_rng(1).random((4, h, w)) > 0.5
    got = resize_packed(pack_masks(masks), 4, h, w, size)
    want = F.interpolate(torch.from_numpy(masks).float()[None], size=size, mode="nearest")[0] > 0.5
    assert got.dtype == torch.bool and got.shape == (4, *size)
    assert torch.equal(got, want)


@pytest.mark.parametrize("size", [(16, 16), (64, 80), (150, 97), (45, 61), (7, 3), (45, 480)])
def test_rows_resized_while_packed_equal_interpolate_nearest_packed(size):
    """Edges moved to the output width (smooth masks) or bits picked (noise), rows picked."""
    masks = _masks_of_every_kind(np.random.default_rng(9), 45, 61)
    n = len(masks)
    encoded = encode_masks(pack_masks(masks), n, 45, 61)
    want = F.interpolate(torch.from_numpy(masks).float()[None], size=size, mode="nearest")[0] > 0.5
    for mirror in (False, True):
        rows, packed_rows = decode_rows(encoded, n, 45, 61, width=size[1], mirror=mirror)
        got = resize_rows_packed(rows, packed_rows, n, 45, size[0])
        assert got.dtype == np.uint8 and got.shape == (n, size[0], (size[1] + 7) // 8)
        pixels = want.flip(-1) if mirror else want
        assert np.array_equal(got, np.packbits(pixels.numpy(), axis=-1, bitorder="little"))


def test_device_path_picks_the_same_bits():
    """The GPU path (bits picked by torch ops after the copy), run here on CPU tensors."""
    masks = np.random.default_rng(3).random((3, 21, 45)) > 0.5
    rows = torch.from_numpy(pack_masks(masks).reshape(3, 21, 6)[:, nearest_index(21, 30).numpy()])
    got = _pick_bits(rows, nearest_index(45, 33))
    assert torch.equal(got, resize_packed(pack_masks(masks), 3, 21, 45, (30, 33)))


def test_mask_boxes_match_sam_xywh():
    m = np.zeros((2, 6, 8), bool)
    m[0, 1:4, 2:7] = True  # rows 1..3, cols 2..6
    assert mask_boxes(m).tolist() == [[2, 1, 4, 2], [0, 0, 0, 0]]


def test_cap_keeps_highest_predicted_iou_then_stability_in_backend_order():
    masks = np.zeros((4, 4, 4), bool)
    p = Proposals.from_masks(masks, predicted_iou=[0.5, np.nan, 0.9, 0.7], stability_score=[0, 1, 0, 0])
    assert cap(p, 2).predicted_iou.tolist() == pytest.approx([0.9, 0.7])
    q = Proposals.from_masks(masks, stability_score=[0.2, 1.0, np.nan, 0.6])
    assert cap(q, 2).stability_score.tolist() == pytest.approx([1.0, 0.6])


def _write_store(path, images: dict[int, Proposals], shard_images: int, chunk_bytes: int = 512) -> Layout:
    layout = Layout.build(
        {i: p.masks.shape[1:] for i, p in images.items()},
        max_masks=8,
        shard_images=shard_images,
        chunk_bytes=chunk_bytes,
    )
    create(path, layout, CONFIG)
    results = {i: ImageResult.from_proposals(p, len(p), "sha") for i, p in images.items()}
    for k in range(layout.num_shards):
        write_shard(path, layout, k, [results[layout.images[j][0]] for j in layout.shard(k)])
    finish(path, np.array([results[i].num_masks for i, _, _ in layout.images]))
    return layout


@pytest.fixture
def proposals_images() -> dict[int, Proposals]:
    rng = np.random.default_rng(2)
    sizes = {7: (30, 41), 3: (24, 24), 11: (33, 17), 5: (30, 41), 9: (12, 20)}
    counts = {7: 5, 3: 8, 11: 0, 5: 2, 9: 3}
    return {
        i: Proposals.from_masks(_blobs(rng, counts[i], *hw), predicted_iou=rng.random(counts[i]))
        for i, hw in sizes.items()
    }


def test_store_round_trip(tmp_path, proposals_images):
    path = tmp_path / "p.zarr"
    _write_store(path, proposals_images, shard_images=2)
    s = ProposalStore(path, expect=CONFIG)
    assert s.image_ids.tolist() == [3, 5, 7, 9, 11]
    assert s.backend == "test" and s.settings == {"a": 1, "b": 2}
    for i, p in proposals_images.items():
        assert s.num_masks(i) == len(p)
        assert s.size(i) == p.masks.shape[1:]
        assert torch.equal(s.masks(i), torch.from_numpy(p.masks))
        np.testing.assert_array_equal(s.attrs(i), p.attrs())
        back = s.proposals(i)
        assert np.array_equal(back.masks, p.masks) and np.array_equal(back.attrs(), p.attrs(), equal_nan=True)
        if len(p) == 0:
            continue
        assert np.array_equal(s.packed(i), pack_masks(p.masks))
        want = F.interpolate(torch.from_numpy(p.masks).float()[None], size=(16, 20), mode="nearest")[0] > 0.5
        assert torch.equal(s.masks(i, size=(16, 20)), want)
    assert s.masks(11, size=(8, 8)).shape == (0, 8, 8)
    # few files: one per shard for the sharded arrays (none for a shard with no masks at
    # all: the last one holds only image 11), one chunk for each small array
    files = sorted(str(f.relative_to(path)) for f in path.rglob("*") if f.is_file())
    assert [f for f in files if "/c/" in f] == [
        "attrs/c/0/0/0",
        "attrs/c/1/0/0",
        "height/c/0",
        "image_id/c/0",
        "masks/c/0/0",
        "masks/c/1/0",
        "num_masks/c/0",
        "width/c/0",
    ]


def test_packed_masks_at_a_size_are_the_resized_masks_packed(tmp_path, proposals_images):
    import pickle

    path = tmp_path / "p.zarr"
    _write_store(path, proposals_images, shard_images=2)
    s = ProposalStore(path)
    for i in proposals_images:
        for size in ((16, 16), (64, 40), (30, 41), (9, 13)):
            masks = s.masks(i, size=size).numpy()
            want = np.packbits(masks, axis=-1, bitorder="little")
            assert np.array_equal(s.packed_masks(i, size), want), (i, size)
            mirrored = np.packbits(masks[..., ::-1], axis=-1, bitorder="little")
            assert np.array_equal(s.packed_masks(i, size, mirror=True), mirrored), (i, size)
    # a DataLoader worker that is spawned gets the store without its zarr handles and opens
    # its own on first use
    copy = pickle.loads(pickle.dumps(s))
    assert copy._masks is None
    assert np.array_equal(copy.packed_masks(7, (16, 16)), s.packed_masks(7, (16, 16)))


def test_empty_inner_chunks_are_not_stored(tmp_path, proposals_images):
    """Rows are sized for max_masks masks of the largest image; the unused tail costs nothing."""
    small = _write_store(tmp_path / "a.zarr", proposals_images, shard_images=5)
    sizes = {i: p.masks.shape[1:] for i, p in proposals_images.items()}
    layout = Layout.build(sizes, max_masks=64, shard_images=5, chunk_bytes=512)
    create(tmp_path / "b.zarr", layout, CONFIG)
    results = [ImageResult.from_proposals(proposals_images[i], 0, "sha") for i, _, _ in layout.images]
    write_shard(tmp_path / "b.zarr", layout, 0, results)
    size_a = (tmp_path / "a.zarr/masks/c/0/0").stat().st_size
    size_b = (tmp_path / "b.zarr/masks/c/0/0").stat().st_size
    assert layout.capacity > 6 * small.capacity
    # only the shard index grows (16 bytes per inner chunk), not the data
    index_growth = 16 * 5 * (layout.capacity - small.capacity) // 512
    assert size_b - size_a <= index_growth


def test_store_from_another_configuration_is_refused(tmp_path, proposals_images):
    path = tmp_path / "p.zarr"
    _write_store(path, proposals_images, shard_images=4)
    with pytest.raises(SemiresError, match=r"settings"):
        ProposalStore(path, expect={**CONFIG, "settings": {"a": 1, "b": 3}})
    with pytest.raises(SemiresError, match="no proposals store"):
        ProposalStore(tmp_path / "missing.zarr")
    with pytest.raises(SemiresError, match="image 4 has no proposals"):
        ProposalStore(path).masks(4)


def test_scratch_round_trip(tmp_path, proposals_images):
    scratch = Scratch(tmp_path / "s")
    p = proposals_images[7]
    scratch.save(7, ImageResult.from_proposals(p, 12, "abc"))
    assert scratch.has(7) and not scratch.has(3)
    r = scratch.load(7)
    assert (r.num_masks, r.found, r.source_sha256) == (5, 12, "abc")
    assert np.array_equal(unpack_masks(r.packed, r.num_masks, r.height, r.width), p.masks)
    assert [f.name for f in (tmp_path / "s").iterdir()] == ["7.npz"]


def test_attributes_unlike_the_masks_come_back_bit_for_bit(tmp_path, proposals_images):
    """Attributes are stored relative to the masks' own area and box: any others, NaN and -0.0
    too, come back unchanged."""
    layout = Layout.build({i: p.masks.shape[1:] for i, p in proposals_images.items()}, 8, 5, 512)
    create(tmp_path / "p.zarr", layout, CONFIG)
    rng = np.random.default_rng(9)
    items = []
    for i, _, _ in layout.images:
        p = proposals_images[i]
        attrs = rng.normal(size=(len(p), 7)).astype(np.float32) * 1e3
        attrs[:1, 0], attrs[1:2, 3], attrs[2:3, 5] = np.nan, -0.0, np.inf
        items.append(ImageResult(pack_masks(p.masks), attrs, len(p), *p.masks.shape[1:], len(p), ""))
    write_shard(tmp_path / "p.zarr", layout, 0, items)
    finish(tmp_path / "p.zarr", np.array([r.num_masks for r in items]))
    s = ProposalStore(tmp_path / "p.zarr")
    for (i, _, _), r in zip(layout.images, items, strict=True):
        assert np.array_equal(s.attrs(i).view(np.uint32), r.attrs.view(np.uint32))


@pytest.mark.parametrize("version", [1, 2])
def test_store_of_an_earlier_format_is_refused_with_what_to_do(tmp_path, proposals_images, version):
    path = tmp_path / "p.zarr"
    _write_store(path, proposals_images, shard_images=4)
    meta = json.loads((path / "zarr.json").read_text())
    meta["attributes"]["version"] = version
    del meta["attributes"]["digests"]  # what a version 2 store lacks
    (path / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(SemiresError) as e:
        ProposalStore(path)
    assert str(e.value) == (
        f"{path}: a proposals store of version {version}; this semires reads version 3, which records a "
        "digest of every shard to check it on open: rebuild it with `semires propose` (dvc repro propose)"
    )


def _damaged(path: Path, where: str, why: str) -> str:
    return (
        f"{path}: damaged proposals store ({where}: {why}); delete it and rerun `semires propose` "
        "(dvc repro propose), or `dvc pull` it again"
    )


def test_shards_copied_from_another_store_or_swapped_read_as_damaged(tmp_path, proposals_images):
    """Shards of one layout are interchangeable to zarr: without the digests they would decode
    as other images' masks."""
    a, b = tmp_path / "a.zarr", tmp_path / "b.zarr"
    _write_store(a, proposals_images, shard_images=2)
    rng = np.random.default_rng(5)  # the same images and layout, other masks
    other = {
        i: Proposals.from_masks(_blobs(rng, len(p), *p.masks.shape[1:])) for i, p in proposals_images.items()
    }
    _write_store(b, other, shard_images=2)
    ProposalStore(a)  # intact
    recorded = json.loads((a / "zarr.json").read_text())["attributes"]["digests"]
    assert sorted(recorded) == [
        "attrs/c/0/0/0", "attrs/c/1/0/0", "height/c/0", "image_id/c/0", "masks/c/0/0", "masks/c/1/0",
        "num_masks/c/0", "width/c/0",
    ]  # fmt: skip
    damaged = r"damaged proposals store \({}: (its content is not what the store wrote there|\d+ bytes where)"

    def spoiled(name: str, spoil) -> Path:
        path = tmp_path / name
        shutil.copytree(a, path)
        spoil(path)
        return path

    copied = spoiled("copied.zarr", lambda p: shutil.copy(b / "masks/c/1/0", p / "masks/c/1/0"))
    with pytest.raises(SemiresError, match=damaged.format("masks/c/1/0")):
        ProposalStore(copied)

    def swap(path: Path) -> None:  # rows 0-1 and 2-3 trade places
        for name in ("masks/c/0/0", "attrs/c/0/0/0"):
            first, second = path / name, path / name.replace("/c/0/", "/c/1/", 1)
            data = first.read_bytes()
            first.write_bytes(second.read_bytes())
            second.write_bytes(data)

    with pytest.raises(SemiresError, match=damaged.format(r"(attrs/c/0/0/0|masks/c/0/0)")):
        ProposalStore(spoiled("swapped.zarr", swap))

    # the content alone differs (the same size): the sha256 tells
    size = (a / "num_masks/c/0").stat().st_size
    counts = spoiled("counts.zarr", lambda p: (p / "num_masks/c/0").write_bytes(bytes(size)))
    with pytest.raises(SemiresError) as e:
        ProposalStore(counts)
    assert str(e.value) == _damaged(
        counts,
        "num_masks/c/0",
        "its content is not what the store wrote there (a shard of another store, or moved)",
    )

    full = (a / "masks/c/0/0").read_bytes()
    cut = spoiled("cut.zarr", lambda p: (p / "masks/c/0/0").write_bytes(full[: len(full) // 2]))
    with pytest.raises(SemiresError) as e:
        ProposalStore(cut)
    assert str(e.value) == _damaged(
        cut, "masks/c/0/0", f"{len(full) // 2} bytes where the store wrote {len(full)}"
    )

    extra = spoiled("extra.zarr", lambda p: shutil.copy(a / "masks/c/0/0", p / "masks/c/2"))
    with pytest.raises(SemiresError) as e:
        ProposalStore(extra)
    assert str(e.value) == _damaged(extra, "masks/c/2", "a file this store did not write")


def test_a_deleted_shard_is_an_error_not_empty_masks(tmp_path, proposals_images):
    """zarr reads a missing shard as zeros: the store checks its shard files when opened."""
    path = tmp_path / "p.zarr"
    _write_store(path, proposals_images, shard_images=2)
    (path / "masks/c/0/0").unlink()  # images 3 and 5
    with pytest.raises(SemiresError, match=r"damaged proposals store \(masks/c/0/0: shard file missing\)"):
        ProposalStore(path)


def test_proposals_resized_by_pils_rule_equal_pils_nearest_resize(tmp_path, proposals_images):
    from PIL import Image

    rng = np.random.default_rng(4)
    images = dict(proposals_images)
    images[13] = Proposals.from_masks(rng.random((3, 29, 37)) > 0.5, predicted_iou=rng.random(3))  # noise
    path = tmp_path / "p.zarr"
    _write_store(path, images, shard_images=2)
    s = ProposalStore(path)
    for i, p in images.items():
        for h, w in ((16, 16), (64, 40), (9, 13)):
            want = np.stack(
                [np.asarray(Image.fromarray(m.view(np.uint8)).resize((w, h), Image.NEAREST)) for m in p.masks]
            ).astype(bool) if len(p) else np.zeros((0, h, w), bool)  # fmt: skip
            assert np.array_equal(s.masks(i, size=(h, w), rule="pil").numpy(), want), (i, h, w)
            packed = np.packbits(want[..., ::-1], axis=-1, bitorder="little")
            assert np.array_equal(s.packed_masks(i, (h, w), mirror=True, rule="pil"), packed), (i, h, w)
