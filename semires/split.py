"""Label fractions of the train split, drawn by image as in the paper.

Every ref of a labeled image is labeled; the rest of the train images form the unlabeled
side. A seed fixes one random order of the train images and a fraction takes a prefix of it,
so for a given seed a smaller fraction's labeled images are a subset of a larger one's.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from semires.annotations import Annotations
from semires.errors import SemiresError


@dataclass(frozen=True)
class LabelSplit:
    """The labeled and unlabeled train images of one label fraction."""

    percent: float
    seed: int | None  # None when the labeled images came from a split file
    source: str  # "random" or the split file's name
    labeled: tuple[int, ...]
    unlabeled: tuple[int, ...]

    def to_json(self, anns: Annotations) -> dict[str, Any]:
        by_image = anns.refs_by_image("train")
        side = {}
        for name, ids in (("labeled", self.labeled), ("unlabeled", self.unlabeled)):
            refs = [r for i in ids for r in by_image[i]]
            side[name] = asdict(anns.counts(refs))
        return {
            "percent": self.percent,
            "seed": self.seed,
            "source": self.source,
            "counts": side,
            "labeled": list(self.labeled),
            "unlabeled": list(self.unlabeled),
        }


def num_labeled(num_images: int, percent: float) -> int:
    """How many of ``num_images`` are labeled at ``percent`` (at least one, at most all)."""
    if not 0 < percent <= 100:
        raise SemiresError(f"label fraction {percent} is outside (0, 100]; give a percentage such as 1 or 10")
    return min(num_images, max(1, math.floor(num_images * percent / 100 + 0.5)))


def random_split(train_image_ids: Iterable[int], percent: float, seed: int) -> LabelSplit:
    """Label ``percent`` % of the train images: a prefix of one seeded random order."""
    ids = sorted(set(train_image_ids))
    if not ids:
        raise SemiresError("the train split has no images; check dataset.name / dataset.split_by")
    order = np.random.default_rng(seed).permutation(len(ids))
    k = num_labeled(len(ids), percent)
    labeled = sorted(ids[i] for i in order[:k])
    unlabeled = sorted(ids[i] for i in order[k:])
    return LabelSplit(
        percent=percent, seed=seed, source="random", labeled=tuple(labeled), unlabeled=tuple(unlabeled)
    )


def split_from_file(obj: Any, anns: Annotations, percent: float, *, name: str) -> LabelSplit:
    """Labeled images taken from a SemiRES/SimREC ``anns`` split file.

    The file is ``{"train": [{"iid": image id, "mask_id": ref id, "refs": [...]}, ...], ...}``
    whose ``train`` list holds the labeled side only (the paper's RefCOCO 1 % file is one).
    Every labeled image must be a train image of ``anns``.
    """
    if not isinstance(obj, Mapping) or not isinstance(obj.get("train"), list) or not obj["train"]:
        raise SemiresError(
            f'{name}: not a SemiRES/SimREC split file (expected a non-empty "train" list '
            'of {"iid": ..., "mask_id": ...} entries)'
        )
    try:
        file_ids = {int(e["iid"]) for e in obj["train"]}
    except (KeyError, TypeError, ValueError) as e:
        raise SemiresError(
            f'{name}: a "train" entry has no integer "iid" ({e!r}); it is not a SemiRES/SimREC split file'
        ) from e
    train = set(anns.image_ids("train"))
    unknown = sorted(file_ids - train)
    if unknown:
        raise SemiresError(
            f"{name}: {len(unknown)} labeled image(s) are not train images of "
            f"{anns.dataset}({anns.split_by}), e.g. {unknown[:3]}; the file belongs to "
            "another dataset or split scheme"
        )
    return LabelSplit(
        percent=percent,
        seed=None,
        source=name,
        labeled=tuple(sorted(file_ids)),
        unlabeled=tuple(sorted(train - file_ids)),
    )


def check_nested(splits: Sequence[LabelSplit]) -> None:
    """Raise if a smaller random fraction is not a subset of a larger one (a broken seed/order)."""
    rnd = sorted((s for s in splits if s.source == "random"), key=lambda s: s.percent)
    for small, large in itertools.pairwise(rnd):
        if not set(small.labeled) <= set(large.labeled):
            raise AssertionError(f"{small.percent}% labeled images are not a subset of {large.percent}%'s")


def fraction_name(percent: float) -> str:
    """A file-name friendly label: 1 -> "1", 0.5 -> "0.5", 10.0 -> "10"."""
    return f"{percent:g}"
