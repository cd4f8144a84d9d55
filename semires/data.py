"""Torch datasets of referring expressions, and composable augmentations.

One *expression* is a (ref, sentence) pair. :class:`ExpressionDataset` indexes every
expression of a list of refs; a training sampler draws a ref and then one of its sentences
(:class:`StepSampler`), evaluation walks all of them. Items are :class:`Sample` named tuples,
which the default collate stacks field by field into a batch of the same type.

Images come out square, resized to the model's input size (bilinear) and **not** normalised
(values in [0, 1]): the model normalises, so colour augmentations can act on the raw image.
Masks are resized nearest-neighbour.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Sampler

from semires.annotations import RefRecord
from semires.errors import SemiresError
from semires.images import read_rgb
from semires.model.text import TextTokenizer


class Sample(NamedTuple):
    """One expression, ready for the model (batched: a leading ``B`` on every tensor)."""

    image: torch.Tensor  # 3 x S x S float in [0, 1]
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

    ``masks`` maps names to ``... x H x W`` tensors (the ground truth as ``"gt"``; later e.g.
    SAM proposals) so that every geometric transform moves them all with the image.
    """

    image: torch.Tensor  # 3 x H x W float in [0, 1]
    masks: dict[str, torch.Tensor] = field(default_factory=dict)
    sentence: str = ""


Transform = Callable[[View, torch.Generator], View]


class Compose:
    """Apply transforms in order; each draws its randomness from the one generator given."""

    def __init__(self, transforms: Sequence[Transform]) -> None:
        self.transforms = list(transforms)

    def __call__(self, view: View, gen: torch.Generator) -> View:
        for t in self.transforms:
            view = t(view, gen)
        return view


_LR_SWAP = {"left": "right", "right": "left", "leftmost": "rightmost", "rightmost": "leftmost"}


def swap_left_right(sentence: str) -> str:
    """'the shape left of the circle' -> 'the shape right of the circle' (word by word)."""
    return " ".join(_LR_SWAP.get(w, w) for w in sentence.split(" "))


@dataclass(frozen=True)
class HorizontalFlip:
    """Mirror image and masks with probability ``p``, swapping 'left'/'right' in the sentence."""

    p: float = 0.5

    def __call__(self, view: View, gen: torch.Generator) -> View:
        if torch.rand((), generator=gen).item() >= self.p:
            return view
        return View(
            image=view.image.flip(-1),
            masks={k: m.flip(-1) for k, m in view.masks.items()},
            sentence=swap_left_right(view.sentence),
        )


@dataclass(frozen=True)
class ColourJitter:
    """Random brightness / contrast / saturation (and hue if ``hue`` > 0) on the [0, 1] image.

    Hue stays 0 where colour words name the object (the synthetic set): a hue shift would
    make "the red circle" green.
    """

    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.0

    def __call__(self, view: View, gen: torch.Generator) -> View:
        from torchvision.transforms.v2 import functional as TF

        def factor(s: float) -> float:
            return 1.0 + (torch.rand((), generator=gen).item() * 2 - 1) * s

        img = TF.adjust_brightness(view.image, factor(self.brightness))
        img = TF.adjust_contrast(img, factor(self.contrast))
        img = TF.adjust_saturation(img, factor(self.saturation))
        if self.hue > 0:
            img = TF.adjust_hue(img, (torch.rand((), generator=gen).item() * 2 - 1) * self.hue)
        return replace(view, image=img.clamp(0, 1))


def load_image(path: Path) -> torch.Tensor:
    """``3 x H x W`` float in [0, 1]; a missing or broken file is a :class:`SemiresError`."""
    image, _ = read_rgb(path)
    return torch.from_numpy(image).permute(2, 0, 1).float().div_(255)


def resize_image(image: torch.Tensor, size: int) -> torch.Tensor:
    """``3 x H x W`` -> ``3 x size x size``, bilinear (as LAVT's input pipeline)."""
    out = F.interpolate(image[None], size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return out[0].clamp_(0, 1)


def resize_mask(mask: torch.Tensor, size: int) -> torch.Tensor:
    """``... x H x W`` -> ``... x size x size``, nearest neighbour, same dtype."""
    lead = mask.shape[:-2]
    flat = mask.reshape(-1, 1, *mask.shape[-2:]).float()
    out = F.interpolate(flat, size=(size, size), mode="nearest")
    return out.reshape(*lead, size, size).to(mask.dtype)


class ExpressionDataset(Dataset):
    """Every (ref, sentence) pair of ``refs`` as a :class:`Sample` at ``image_size``.

    An index is an ``int`` (the expression) or ``(int, seed)``: the seed drives the
    augmentation, so a batch depends only on the sampler's output, never on worker state.
    Resized images are cached in memory when ``cache_images`` (small datasets).
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
        cache_images: bool = True,
    ) -> None:
        self.refs = [r for r in refs if r.sentences]  # a ref without sentences cannot be asked for
        self.image_dir = Path(image_dir)
        self.tokenizer = tokenizer
        self.image_size = image_size
        self.max_tokens = max_tokens
        self.transform = transform
        self.cache_images = cache_images
        self._cache: dict[int, torch.Tensor] = {}
        self.pairs: list[tuple[int, int]] = [
            (r, s) for r, ref in enumerate(self.refs) for s in range(len(ref.sentences))
        ]
        first = [i for i, (_, s) in enumerate(self.pairs) if s == 0]
        self._first = first  # expression index of each ref's first sentence

    def __len__(self) -> int:
        return len(self.pairs)

    def expression_of(self, ref_index: int, sentence_index: int) -> int:
        return self._first[ref_index] + sentence_index

    def image(self, ref: RefRecord) -> torch.Tensor:
        img = self._cache.get(ref.image_id)
        if img is None:
            img = resize_image(load_image(self.image_dir / ref.file_name), self.image_size)
            if self.cache_images:
                self._cache[ref.image_id] = img
        return img

    def full_mask(self, index: int) -> torch.Tensor:
        """The expression's ground truth at the image's own resolution, ``H x W`` bool."""
        return torch.from_numpy(self.refs[self.pairs[index][0]].decode_mask())

    def __getitem__(self, key: int | tuple[int, int]) -> Sample:
        index, seed = (key, None) if isinstance(key, int) else key
        r, s = self.pairs[index]
        ref = self.refs[r]
        gt = resize_mask(torch.from_numpy(ref.decode_mask()).to(torch.uint8), self.image_size)
        view = View(image=self.image(ref), masks={"gt": gt}, sentence=ref.sentences[s])
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
