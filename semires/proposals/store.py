"""The proposals store: every train image's masks in one sharded zarr v3 group.

Layout (images in ascending ``image_id`` order, ``I`` images, at most ``M`` masks each)::

    zarr.json        group attributes: format, version, backend, checkpoint_sha256,
                     settings, attr_fields, layout numbers (sorted keys, no timestamps)
    image_id         I int64
    height, width    I int32, the image's own size
    num_masks        I int32
    masks            I x C uint8: row i holds image i's masks bit-packed, ``N x H x ceil(W/8)``
                     flattened (np.packbits along W, little bit order), zeros after them;
                     C = M * max H * ceil(max W / 8) rounded up to whole inner chunks.
                     Inner chunks ``1 x chunk_bytes`` (1 MiB, zstd level 12), shards ``S x C``: one file per S
                     images; chunks past an image's masks stay all-zero and are not stored.
    attrs            I x M x 7 float32: predicted_iou, stability_score, area, x, y, w, h;
                     NaN after the image's N masks. Shards ``S x M x 7``.

Each shard is written whole, by one process (zarr rewrites a whole shard on every partial
write, so two writers of one shard lose data: zarr-python issues 3682 and 3413). Which
process writes a shard does not change its bytes, so the store is byte-identical whatever
the number of processes.

While a run is in progress every finished image is kept in a :class:`Scratch` folder, one
small ``.npz`` each, written atomically, so a killed run resumes where it stopped.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numcodecs
import numpy as np
import torch
import torch.nn.functional as F

from semires.atomic import atomic_path
from semires.errors import SemiresError
from semires.proposals.base import ATTR_FIELDS, Proposals

FORMAT = "semires-proposals"
VERSION = 1


def pack_masks(masks: np.ndarray) -> np.ndarray:
    """``N x H x W`` bool -> ``N*H*ceil(W/8)`` uint8, bits along W, little bit order."""
    return np.packbits(masks, axis=-1, bitorder="little").reshape(-1)


def unpack_masks(packed: np.ndarray, n: int, h: int, w: int) -> np.ndarray:
    """Inverse of :func:`pack_masks`: ``N x H x W`` bool."""
    rows = packed[: n * h * ((w + 7) // 8)].reshape(n, h, (w + 7) // 8)
    return np.unpackbits(rows, axis=-1, count=w, bitorder="little").astype(bool)


def nearest_index(src: int, dst: int) -> torch.Tensor:
    """Source index of each of ``dst`` outputs, exactly as ``F.interpolate(mode="nearest")``."""
    grid = torch.arange(src, dtype=torch.float32).view(1, 1, src)
    return F.interpolate(grid, size=dst, mode="nearest").view(dst).long()


def resize_packed(
    packed: np.ndarray, n: int, h: int, w: int, size: tuple[int, int], device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Bit-packed ``N x H x W`` masks -> ``N x h' x w'`` bool tensor on ``device``, nearest
    (as F.interpolate).

    Each output pixel is gathered once, from the smaller of the source and output row
    sets: O(N * min(H, h') * (W + w')) gathers plus whole-row copies. Off the CPU only the
    chosen packed rows travel to the device, and the bits are picked there."""
    oh, ow = size
    wb = (w + 7) // 8
    ri, ci = nearest_index(h, oh).numpy(), nearest_index(w, ow).numpy()
    grid = packed[: n * h * wb].reshape(n, h, wb)
    if torch.device(device).type != "cpu":
        return _pick_bits(torch.from_numpy(grid[:, ri]).to(device), torch.from_numpy(ci).to(device))
    if h < oh:  # upsampling rows: pick the columns of the H source rows, then copy whole rows
        bits = np.unpackbits(grid, axis=-1, bitorder="little")[..., :w]  # N x H x W uint8
        out = np.ascontiguousarray(_take_columns(bits, ci))[:, ri]
    else:  # pick the rows while still packed (cheap), then the columns
        rows = grid if oh == h else grid[:, ri]  # nearest keeps every row when h' == H
        bits = np.unpackbits(rows, axis=-1, bitorder="little")[..., :w]  # N x h' x W
        out = np.ascontiguousarray(_take_columns(bits, ci))
    return torch.from_numpy(out.view(bool))


def _pick_bits(rows: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``N x h' x W/8`` packed rows -> ``N x h' x w'`` bool: bit ``index[j]`` of each row."""
    picked = rows[:, :, index >> 3]
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
        """Bytes per row: room for ``max_masks`` masks of the largest image, whole chunks."""
        if not self.images:
            return self.chunk_bytes
        h = max(r[1] for r in self.images)
        wb = (max(r[2] for r in self.images) + 7) // 8
        need = self.max_masks * h * wb
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


def _compressors() -> list[Any]:
    from zarr.codecs import ZstdCodec

    return [ZstdCodec(level=12, checksum=False)]


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
        "num_masks", shape=(n,), dtype="int32", chunks=(max(n, 1),), compressors=_compressors(), fill_value=0
    )
    g.create_array(
        "masks",
        shape=(n, cap),
        dtype="uint8",
        chunks=(1, layout.chunk_bytes),
        shards=(s, cap),
        compressors=_compressors(),
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
        block[j, : item.packed.size] = item.packed
        attrs[j, : item.num_masks] = item.attrs
    g["masks"][rows.start : rows.stop] = block
    g["attrs"][rows.start : rows.stop] = attrs


def finish(path: str | Path, num_masks: np.ndarray) -> None:
    """Write ``num_masks`` (``I`` int) once every shard is in place (one process)."""
    zarr = _zarr()
    zarr.open_group(str(path), mode="r+")["num_masks"][:] = np.asarray(num_masks, np.int32)


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
        g = zarr.open_group(str(self.path), mode="r")
        self.attributes: dict[str, Any] = dict(g.attrs)
        if self.attributes.get("format") != FORMAT or self.attributes.get("version") != VERSION:
            raise SemiresError(
                f"{self.path}: not a {FORMAT} v{VERSION} store (format {self.attributes.get('format')!r}, "
                f"version {self.attributes.get('version')!r}); rebuild it with `semires propose`"
            )
        self.image_ids = g["image_id"][:]
        self.heights = g["height"][:]
        self.widths = g["width"][:]
        self.counts = g["num_masks"][:]
        self._masks = g["masks"]
        self._attrs = g["attrs"]
        self._row = {int(i): j for j, i in enumerate(self.image_ids)}
        if expect is not None:
            self.check(expect)

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
        """``N x 7`` float32, columns :data:`ATTR_FIELDS`."""
        j = self._index(image_id)
        return self._attrs[j, : int(self.counts[j])]

    def packed(self, image_id: int) -> np.ndarray:
        """The image's masks as stored: ``N*H*ceil(W/8)`` uint8."""
        j = self._index(image_id)
        n, h, w = int(self.counts[j]), int(self.heights[j]), int(self.widths[j])
        nbytes = n * h * ((w + 7) // 8)
        if nbytes == 0:
            return np.zeros(0, np.uint8)
        return self._masks[j, :nbytes]

    def masks(
        self, image_id: int, size: tuple[int, int] | None = None, device: torch.device | str = "cpu"
    ) -> torch.Tensor:
        """``N x h x w`` bool tensor: the masks resized (nearest, as ``F.interpolate``) to
        ``size`` = ``(h, w)``, or at the image's own size when ``size`` is None. With a GPU
        ``device`` the bits are unpacked there (only the packed rows are copied)."""
        j = self._index(image_id)
        n, h, w = int(self.counts[j]), int(self.heights[j]), int(self.widths[j])
        oh, ow = size if size is not None else (h, w)
        if n == 0:
            return torch.zeros((0, oh, ow), dtype=torch.bool, device=device)
        packed = self.packed(image_id)
        if (oh, ow) == (h, w) and torch.device(device).type == "cpu":
            return torch.from_numpy(unpack_masks(packed, n, h, w))
        return resize_packed(packed, n, h, w, (oh, ow), device=device)

    def proposals(self, image_id: int) -> Proposals:
        """Everything stored for the image, at its own resolution."""
        a = self.attrs(image_id)
        return Proposals(
            masks=self.masks(image_id).numpy(),
            predicted_iou=a[:, 0],
            stability_score=a[:, 1],
            area=a[:, 2],
            bbox=a[:, 3:7],
        )
