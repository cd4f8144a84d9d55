"""Torch datasets of referring expressions, and composable augmentations.

One *expression* is a (ref, sentence) pair. :class:`ExpressionDataset` indexes every
expression of a list of refs; a training sampler draws a ref and then one of its sentences
(:class:`StepSampler`), evaluation walks all of them. Items are :class:`Sample` named tuples,
which the default collate stacks field by field into a batch of the same type.

Images come out square, resized to the model's input size and **not** normalised (values in
[0, 1]): the model normalises, so colour augmentations can act on the raw image. Images and
masks are resized as the official pipeline does, with PIL (bilinear on the uint8 image,
``NEAREST`` for masks; :mod:`semires.resize`).

Memory does not grow with the dataset: an item is made from its files when asked for, and
what a dataset keeps between items is bounded: decoded images (uint8, as the file holds
them) in a least-recently-used cache of ``cache_mb`` megabytes per process, and its refs.
:func:`make_loader` builds the DataLoader every stage uses: worker processes, kept alive
for the whole run, pinned memory on CUDA.
"""

from __future__ import annotations

import math
import os
import random
import re
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from semires import resize
from semires.annotations import RefRecord
from semires.bits import flip_bits
from semires.blur import gaussian_blur
from semires.errors import InvalidSetting, SemiresError
from semires.images import read_rgb
from semires.model.text import TextTokenizer
from semires.syncs import host_values


class Sample(NamedTuple):
    """One expression, ready for the model (batched: a leading ``B`` on every tensor)."""

    image: torch.Tensor  # 3 x S x S uint8 pixels ([0, 1] float after a transform; to_device: float)
    mask: torch.Tensor  # S x S int64, 1 on the referred object
    input_ids: torch.Tensor  # T int64
    attention_mask: torch.Tensor  # T int64, 1 on tokens, 0 on pads
    index: int  # the expression's index in its dataset
    ref_id: int
    sent_id: int
    image_id: int
    sentence: str  # after augmentation (a flip may swap left and right)


@dataclass
class View:
    """What augmentations transform: an image, its masks, and the sentence.

    ``masks`` maps names to ``... x H x W`` tensors (the ground truth as ``"gt"``) and
    ``packed`` to bit-packed ones, ``... x H x ceil(W/8)`` uint8 (:mod:`semires.bits`) or
    :class:`DeferredMasks` (the SAM proposals as ``"proposals"``), so that every geometric
    transform moves them all with the image.
    """

    image: torch.Tensor  # 3 x H x W float in [0, 1], or uint8 pixels
    masks: dict[str, torch.Tensor] = field(default_factory=dict)
    sentence: str = ""
    packed: dict[str, torch.Tensor | DeferredMasks] = field(default_factory=dict)
    # True: a blur only records its radius in ``blur``, for the training device to apply it
    # (semires.semi.unlabeled_to_device); valid as long as only flips follow it (they commute)
    defer_blur: bool = False
    blur: float = 0.0  # the deferred blur's radius (0: none)


@dataclass(frozen=True)
class DeferredMasks:
    """Bit-packed masks read when the view is done: ``read(mirrored)`` gives them (in the
    reader's form), mirrored left-right or not. A flip only toggles ``mirrored``: the
    proposals store mirrors the masks' edges as it decodes them, instead of the bytes being
    reversed after."""

    read: Callable[[bool], Any]
    mirrored: bool = False

    def flip(self) -> DeferredMasks:
        return replace(self, mirrored=not self.mirrored)

    def value(self) -> Any:
        return self.read(self.mirrored)


def packed_tensor(masks: torch.Tensor | DeferredMasks) -> Any:
    """A :attr:`View.packed` entry as read (reading it now if deferred)."""
    return masks.value() if isinstance(masks, DeferredMasks) else masks


Transform = Callable[[View, torch.Generator], View]


class Compose:
    """Apply transforms in order; each draws its randomness from the one generator given."""

    def __init__(self, transforms: Sequence[Transform]) -> None:
        self.transforms = list(transforms)

    def __call__(self, view: View, gen: torch.Generator) -> View:
        for t in self.transforms:
            view = t(view, gen)
        return view


_LEFT_RIGHT = re.compile(r"left|right", re.IGNORECASE)
_WORD = re.compile(r"[A-Za-z]+")
# Words that hold "left" or "right" without meaning a side; kept as written (compared by
# their form with every "right" read as "left", which a swap does not change, so that a
# word and its swap are both kept or both swapped and flipping twice gives the sentence back).
_NOT_A_SIDE = frozenset(
    w.replace("right", "left")
    for w in (
        "bright", "brighter", "brightest", "brightly", "brightness", "brighten", "brightened",
        "upright", "uprights", "alright", "allright", "copyright", "wright", "fright", "frightened",
        "frightening", "birthright", "downright", "outright", "forthright", "righteous", "playwright",
        "cartwright", "shipwright", "wheelwright", "leftover", "leftovers", "cleft",
    )
)  # fmt: skip


def _swap_word(match: re.Match) -> str:
    word = match.group(0)
    if _LEFT_RIGHT.search(word) is None or word.lower().replace("right", "left") in _NOT_A_SIDE:
        return word
    return _LEFT_RIGHT.sub(_swap_side, word)


def _swap_side(match: re.Match) -> str:
    side = match.group(0)
    other = "right" if side.lower() == "left" else "left"
    if side.isupper():
        return other.upper()
    return other.capitalize() if side[0].isupper() else other


def swap_left_right(sentence: str) -> str:
    """The sentence of the mirrored image: every "left" becomes "right" and back, within words
    too ("leftmost", "left-most", "bottomright", "farleft"), in the case written ("Left guy"
    -> "Right guy", "LEFT" -> "RIGHT"), punctuation and spacing untouched ("far left, kid"
    -> "far right, kid"). Words where the letters do not mean a side ("bright", "upright",
    "leftover") are kept. Flipping twice gives the sentence back."""
    return _WORD.sub(_swap_word, sentence)


@dataclass(frozen=True)
class HorizontalFlip:
    """Mirror image and masks with probability ``p``, swapping 'left'/'right' in the sentence."""

    p: float = 0.5

    def __call__(self, view: View, gen: torch.Generator) -> View:
        if torch.rand((), generator=gen).item() >= self.p:
            return view
        width = view.image.shape[-1]
        return replace(
            view,
            image=view.image.flip(-1),
            masks={k: m.flip(-1) for k, m in view.masks.items()},
            sentence=swap_left_right(view.sentence),
            packed={
                k: m.flip() if isinstance(m, DeferredMasks) else flip_bits(m, width)
                for k, m in view.packed.items()
            },
        )


def _uniform(gen: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * torch.rand((), generator=gen).item()


def _symmetric(gen: torch.Generator, s: float) -> float:
    """Uniform in ``[-s, s]``."""
    return (torch.rand((), generator=gen).item() * 2 - 1) * s


@dataclass(frozen=True)
class GaussianBlur:
    """With probability ``p``, blur the image with PIL's ``ImageFilter.GaussianBlur``, its
    radius (PIL's name for the standard deviation) drawn uniformly in ``sigma``.

    The official weak view (``RandomGaussianBlur(p=0.5)``) blurs the uint8 image with
    ``radius=1``: ``sigma=(1.0, 1.0)``; its commented-out line drew sigma in [0.1, 2.0].
    A uint8 image is blurred as it is and stays uint8; a [0, 1] image as the uint8 image it
    came from (``x * 255`` rounded: exact for a resized image), as the official code does
    through ``ToPILImage``. A view with ``defer_blur`` (the unlabeled views) only gets the
    radius: the training device blurs, with the same pixels as PIL (:mod:`semires.blur`).
    """

    p: float
    sigma: tuple[float, float]

    def __call__(self, view: View, gen: torch.Generator) -> View:
        if torch.rand((), generator=gen).item() >= self.p:
            return view
        radius = _uniform(gen, *self.sigma)
        if view.defer_blur:
            return replace(view, blur=radius)
        image = view.image
        pixels = image if image.dtype == torch.uint8 else image.mul(255).round_().to(torch.uint8)
        out = gaussian_blur(pixels, radius)
        return replace(view, image=out if image.dtype == torch.uint8 else to_unit(out))


JITTER_ORDER = ("brightness", "contrast", "saturation", "hue")


@dataclass(frozen=True)
class ColourJitter:
    """With probability ``p``, random brightness / contrast / saturation (and hue if ``hue``
    > 0) on the [0, 1] image: factors drawn in ``[1 - s, 1 + s]``, the hue shift in
    ``[-hue, hue]``.

    ``random_order``: the four adjustments in a random order, as torchvision's
    ``ColorJitter`` (the official strong view: ``p=0.5``, 0.25 for all four), else in the
    order of :data:`JITTER_ORDER`. The official code jitters the *normalised* tensor, where
    torchvision's clamp to [0, 1] cuts off every value below the mean, and normalises it
    again; here the raw image is jittered and the model normalises once.
    Hue stays 0 where colour words name the object (the synthetic set): a hue shift would
    make "the red circle" green.
    """

    brightness: float
    contrast: float
    saturation: float
    hue: float = 0.0
    p: float = 1.0
    random_order: bool = False

    def draw(self, gen: torch.Generator) -> tuple[list[int], list[float]] | None:
        """``(order, [brightness, contrast, saturation, hue])`` for one image, or None (no
        jitter, probability ``1 - p``). ``order`` indexes :data:`JITTER_ORDER`; the hue
        shift is only drawn when ``hue`` > 0."""
        if self.p < 1 and torch.rand((), generator=gen).item() >= self.p:
            return None
        order = torch.randperm(4, generator=gen).tolist() if self.random_order else [0, 1, 2, 3]
        factors = [1.0 + _symmetric(gen, s) for s in (self.brightness, self.contrast, self.saturation)]
        factors.append(_symmetric(gen, self.hue) if self.hue > 0 else 0.0)
        return order, factors

    @staticmethod
    def apply(image: torch.Tensor, order: Sequence[int], factors: Sequence[float]) -> torch.Tensor:
        """The adjustments of :meth:`draw` on a ``3 x H x W`` [0, 1] image, in ``order``."""
        from torchvision.transforms.v2 import functional as TF

        adjust = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
        for k in order:
            if k < 3 or factors[3] != 0:
                image = adjust[k](image, factors[k])
        return image.clamp(0, 1)

    def __call__(self, view: View, gen: torch.Generator) -> View:
        drawn = self.draw(gen)
        if drawn is None:
            return view
        return replace(view, image=self.apply(view.image, *drawn))

    def code(self, gen: torch.Generator) -> torch.Tensor:
        """What :meth:`draw` draws (the same draws from ``gen``) as 9 float64 numbers: 1 if
        the image is jittered, else 0; the order (4); the factors (4). A loader ships this
        instead of the jittered image: :meth:`apply_codes` makes it where the model runs."""
        drawn = self.draw(gen)
        if drawn is None:
            return torch.zeros(9, dtype=torch.float64)
        order, factors = drawn
        return torch.tensor([1.0, *order, *factors], dtype=torch.float64)

    @classmethod
    def apply_codes(cls, images: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """``B x 3 x H x W`` [0, 1] images, each jittered as its row of ``codes`` (``B x 9``
        from :meth:`code`, on the host: read without a device sync), on the images' device.
        Equal to :meth:`apply` image by image (the same operations on the same values)."""
        rows = host_values(codes)
        if not any(row[0] for row in rows):
            return images
        out = [
            cls.apply(image, [int(k) for k in row[1:5]], row[5:]) if row[0] else image
            for image, row in zip(images, rows, strict=True)
        ]
        return torch.stack(out)


@dataclass(frozen=True)
class ViewConfig:
    """The teacher-student views (``semi.augment`` in params.yaml); defaults: the official
    scripts' (``RandomGaussianBlur(p=0.5)``, ``RandomHorizontalFlip(p=0)``,
    ``RandomColorJitter((0.75, 1.25) x 3, (-0.25, 0.25), p=0.5)``).

    The weak view (the teacher's) is the resized image, mirrored with probability 0.5 if
    ``flip`` (:class:`HorizontalFlip`) and blurred with probability ``blur_p``
    (:class:`GaussianBlur`); the strong view (the student's) is the weak one colour-jittered
    with probability ``jitter_p`` (:class:`ColourJitter`).
    """

    flip: bool = False  # also swaps left/right in the sentence
    blur_p: float = 0.5
    blur_sigma: tuple[float, float] = (1.0, 1.0)  # PIL's radius, drawn in [lo, hi]
    brightness: float = 0.25  # factors in [1 - s, 1 + s]
    contrast: float = 0.25
    saturation: float = 0.25
    hue: float = 0.25  # a hue shift in [-hue, hue]
    jitter_p: float = 0.5
    jitter_random_order: bool = True  # the four adjustments in a random order, as torchvision

    def __post_init__(self) -> None:
        for key in ("brightness", "contrast", "saturation"):
            v = getattr(self, key)
            if not 0 <= v < 1:
                raise InvalidSetting(key, v, "expected a strength in [0, 1)")
        if not 0 <= self.hue <= 0.5:
            raise InvalidSetting("hue", self.hue, "expected a hue shift in [0, 0.5]")
        for key in ("blur_p", "jitter_p"):
            v = getattr(self, key)
            if not 0 <= v <= 1:
                raise InvalidSetting(key, v, "expected a probability in [0, 1]")
        lo, hi = self.blur_sigma
        if not 0 < lo <= hi <= 50:
            raise InvalidSetting(
                "blur_sigma",
                list(self.blur_sigma),
                "expected [lo, hi] with 0 < lo <= hi <= 50 pixels, e.g. [1, 1] (the official radius)",
            )

    def views(self) -> tuple[Transform | None, Transform]:
        """``(weak, strong)``: the weak view's transforms (None: the resized image as is) and
        the colour jitter that makes the strong view from it."""
        weak: list[Transform] = [HorizontalFlip()] if self.flip else []
        if self.blur_p > 0:
            weak.append(GaussianBlur(self.blur_p, self.blur_sigma))
        strong = ColourJitter(
            self.brightness, self.contrast, self.saturation, self.hue, p=self.jitter_p,
            random_order=self.jitter_random_order,
        )  # fmt: skip
        return (Compose(weak) if weak else None), strong


def image_tensor(image: np.ndarray) -> torch.Tensor:
    """``H x W x 3`` uint8 -> ``3 x H x W`` float in [0, 1]."""
    return to_unit(torch.from_numpy(image).permute(2, 0, 1))


def to_unit(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 pixels -> float in [0, 1], on their device (``x / 255``)."""
    return pixels.float().div_(255)


def resized_pixels(image: np.ndarray, size: int) -> torch.Tensor:
    """``H x W x 3`` uint8 -> ``3 x size x size`` uint8 as PIL resizes it
    (:func:`semires.resize.resize_image`), channels first in memory: batching and flipping a
    strided view copies element by element."""
    hwc = np.asarray(resize.resize_image(image, size))
    return torch.from_numpy(np.ascontiguousarray(hwc.transpose(2, 0, 1)))


def resize_image(image: np.ndarray, size: int) -> torch.Tensor:
    """``H x W x 3`` uint8 -> ``3 x size x size`` float in [0, 1]: PIL's bilinear resize of the
    uint8 pixels, as the official input pipeline (:func:`semires.resize.resize_image`)."""
    return to_unit(resized_pixels(image, size))


def resize_mask_np(mask: np.ndarray, size: int, rule: resize.NearestRule = "pil") -> np.ndarray:
    """``H x W`` -> ``size x size``, nearest under ``rule`` (default PIL's ``NEAREST``, as the
    official ground truth; :func:`semires.resize.resize_mask`)."""
    return resize.resize_mask(mask, (size, size), rule)


class ImageCache:
    """Decoded images (``H x W x 3`` uint8) by key, least recently used first out, at most
    ``max_bytes`` in all (0: keep nothing). One per dataset and process: a DataLoader
    worker fills its own."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max(0, int(max_bytes))
        self.bytes = 0
        self._items: OrderedDict[int, np.ndarray] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: int) -> np.ndarray | None:
        item = self._items.get(key)
        if item is not None:
            self._items.move_to_end(key)
        return item

    def put(self, key: int, image: np.ndarray) -> None:
        if image.nbytes > self.max_bytes or key in self._items:
            return
        while self.bytes + image.nbytes > self.max_bytes:
            _, old = self._items.popitem(last=False)
            self.bytes -= old.nbytes
        self._items[key] = image
        self.bytes += image.nbytes


class ExpressionDataset(Dataset):
    """Every (ref, sentence) pair of ``refs`` as a :class:`Sample` at ``image_size``.

    An index is an ``int`` (the expression) or ``(int, seed)``: the seed drives the
    augmentation, so a batch depends only on the sampler's output, never on worker state.
    Decoded images are kept in an :class:`ImageCache` of ``cache_mb`` megabytes (0: none);
    an item is the same with or without it.
    """

    def __init__(
        self,
        refs: Sequence[RefRecord],
        image_dir: str | Path,
        tokenizer: TextTokenizer,
        *,
        image_size: int,
        max_tokens: int,
        transform: Transform | None = None,
        cache_mb: float = 0,
    ) -> None:
        self.refs = [r for r in refs if r.sentences]  # a ref without sentences cannot be asked for
        self.image_dir = Path(image_dir)
        self.tokenizer = tokenizer
        self.image_size = image_size
        self.max_tokens = max_tokens
        self.transform = transform
        self.cache = ImageCache(int(cache_mb * 2**20))
        counts = np.array([len(r.sentences) for r in self.refs], np.int64)
        first = np.zeros(len(counts) + 1, np.int64)
        np.cumsum(counts, out=first[1:])
        # (ref, sentence) of every expression, as arrays: a list of tuples would be copied,
        # page by page, into every DataLoader worker that reads it (reference counts)
        ref_of = np.repeat(np.arange(len(counts)), counts)
        self.pairs = np.stack([ref_of, np.arange(int(first[-1])) - first[ref_of]], axis=1)
        self._first = first[:-1]  # expression index of each ref's first sentence

    def __len__(self) -> int:
        return len(self.pairs)

    def expression_of(self, ref_index: int, sentence_index: int) -> int:
        return int(self._first[ref_index]) + sentence_index

    def pixels(self, ref: RefRecord) -> torch.Tensor:
        """The ref's image at the input size as PIL resizes it: ``3 x S x S`` uint8."""
        raw = self.cache.get(ref.image_id)
        if raw is None:
            raw = read_rgb(self.image_dir / ref.file_name)[0]
            self.cache.put(ref.image_id, raw)
        return resized_pixels(raw, self.image_size)

    def image(self, ref: RefRecord) -> torch.Tensor:
        """The ref's image at the input size: ``3 x S x S`` float in [0, 1]."""
        return to_unit(self.pixels(ref))

    def mask(self, ref: RefRecord) -> torch.Tensor:
        """The ref's ground truth at the input size: ``S x S`` uint8 (PIL's nearest)."""
        return torch.from_numpy(resize_mask_np(ref.decode_mask().view(np.uint8), self.image_size))

    def full_mask(self, index: int) -> torch.Tensor:
        """The expression's ground truth at the image's own resolution, ``H x W`` bool."""
        return torch.from_numpy(self.refs[self.pairs[index][0]].decode_mask())

    def __getitem__(self, key: int | tuple[int, int]) -> Sample:
        index, seed = (key, None) if isinstance(key, int) else key
        r, s = (int(v) for v in self.pairs[index])
        ref = self.refs[r]
        # uint8 pixels travel (a quarter of the bytes); transforms work on the [0, 1] image
        image = self.pixels(ref) if self.transform is None else self.image(ref)
        view = View(image=image, masks={"gt": self.mask(ref)}, sentence=ref.sentences[s])
        if self.transform is not None:
            gen = torch.Generator().manual_seed(int(seed) if seed is not None else index)
            view = self.transform(view, gen)
        ids, att = self.tokenizer.encode([view.sentence], self.max_tokens)
        return Sample(
            image=view.image,
            mask=view.masks["gt"].long(),
            input_ids=ids[0],
            attention_mask=att[0],
            index=index,
            ref_id=ref.ref_id,
            sent_id=ref.sent_ids[s],
            image_id=ref.image_id,
            sentence=view.sentence,
        )


class StepSampler(Sampler):
    """Training order as a pure function of ``(seed, step)``: exact resume with no sampler state.

    Each epoch is a seeded permutation of the refs; step ``k`` takes the next
    ``batch_size * world_size`` refs of the endless sequence of epochs, and this rank the
    ``rank``-th share. Each drawn ref gets one of its sentences at random (seeded by epoch
    and position), and a per-sample augmentation seed. Yields ``(expression, seed)`` keys,
    ``batch_size`` per step, from ``start_step`` to ``total_steps``.
    """

    def __init__(
        self,
        dataset: ExpressionDataset,
        *,
        batch_size: int,
        total_steps: int,
        seed: int,
        start_step: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if not dataset.refs:
            raise SemiresError("no labeled refs to train on; check the split (split.fractions)")
        self.dataset = dataset
        self.batch_size = batch_size
        self.total_steps = total_steps
        self.seed = seed
        self.start_step = start_step
        self.rank = rank
        self.world_size = world_size

    def __len__(self) -> int:
        return (self.total_steps - self.start_step) * self.batch_size

    def keys_for_step(self, step: int) -> list[tuple[int, int]]:
        n = len(self.dataset.refs)
        global_batch = self.batch_size * self.world_size
        out = []
        for j in range(self.batch_size):
            pos = step * global_batch + self.rank * self.batch_size + j
            epoch, within = divmod(pos, n)
            order = _epoch_order(self.seed, epoch, n)
            r = int(order[within])
            draw = random.Random(f"{self.seed}:{epoch}:{within}")
            s = draw.randrange(len(self.dataset.refs[r].sentences))
            out.append((self.dataset.expression_of(r, s), draw.randrange(2**31)))
        return out

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for step in range(self.start_step, self.total_steps):
            yield from self.keys_for_step(step)


_ORDER_CACHE: dict[tuple[int, int, int], np.ndarray] = {}


def _epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    key = (seed, epoch, n)
    if key not in _ORDER_CACHE:
        if len(_ORDER_CACHE) > 8:
            _ORDER_CACHE.clear()
        _ORDER_CACHE[key] = np.random.default_rng([seed, epoch]).permutation(n)
    return _ORDER_CACHE[key]


def num_epochs(steps: int, batch_size: int, world_size: int, num_refs: int) -> float:
    """How many passes over the refs ``steps`` steps make (for logs)."""
    return steps * batch_size * world_size / max(1, num_refs) if num_refs else math.inf


# --- loading -------------------------------------------------------------------------------


def auto_workers(device: torch.device, processes_per_machine: int | None = None) -> int:
    """DataLoader workers when ``num_workers`` is null: on a GPU, this process's share of the
    CPU cores less one for the process itself, at most 8 (an unlabeled sample at 480 px
    takes a core about 20-30 ms, and one GPU consumes about 70 a second with the paper's
    model); on the CPU none: the training process's threads already use every core."""
    if device.type == "cpu":
        return 0
    local = processes_per_machine or int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    share = (os.cpu_count() or 1) // max(1, local)
    return max(1, min(8, share - 1))


def make_loader(
    dataset: Dataset,
    *,
    device: torch.device,
    num_workers: int | None = None,
    batch_size: int = 1,
    sampler: Sampler | None = None,
    batch_sampler: Sampler | None = None,
    collate_fn: Callable | None = None,
    seed: int = 0,
) -> DataLoader:
    """The DataLoader of every stage: in order (``sampler``, ``batch_sampler`` or the
    dataset's own), batches of ``batch_size``; ``num_workers`` processes (None:
    :func:`auto_workers`) that live as long as the loader (persistent), pinned memory on
    CUDA. Its own seeded generator: starting it draws a seed, which must not move the global
    RNG (an exact resume needs it still). Items depend on their keys alone, so the batches
    are the same with any worker count."""
    workers = auto_workers(device) if num_workers is None else num_workers
    return DataLoader(
        dataset,
        batch_size=batch_size if batch_sampler is None else 1,
        sampler=sampler,
        batch_sampler=batch_sampler,
        shuffle=False,
        num_workers=workers,
        collate_fn=collate_fn,
        pin_memory=device.type == "cuda",
        persistent_workers=workers > 0,
        generator=torch.Generator().manual_seed(seed),
    )


def start_workers(*loaders: DataLoader | None) -> None:
    """Start the worker processes of persistent loaders now, while this process is small.

    A worker is forked from the training process: forked after training steps it maps every
    page the process has grown to (the allocator keeps memory it freed), and its resident
    size counts them again. So a training loop starts the workers of its evaluation loaders
    before the first step; an iteration started here and not consumed costs a few prefetched
    batches, dropped when the loader is next iterated."""
    for loader in loaders:
        if loader is not None and loader.num_workers > 0:
            iter(loader)
