"""params.yaml, read once into typed sections that check themselves.

Each stage asks for the sections it reads and nothing else, so a bad value in a section a
stage does not read never stops it. A wrong key, type or range raises a
:class:`~semires.errors.SemiresError` that names the key (``split.fractions[2]``), the value
and what is allowed.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from semires.errors import SemiresError

T = TypeVar("T")


class ParamError(SemiresError):
    pass


def _fail(key: str, value: Any, expected: str) -> typing.NoReturn:
    raise ParamError(f"params.yaml: {key} = {value!r}: {expected}")


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Convert ``value`` read from YAML to the annotated type ``tp``, or fail naming ``key``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(key, value, inner)
    if tp is bool:
        if not isinstance(value, bool):
            _fail(key, value, "expected true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            _fail(key, value, "expected an integer")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            _fail(key, value, "expected a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str) or not value:
            _fail(key, value, "expected a non-empty string")
        return value
    if origin is tuple:
        if not isinstance(value, list | tuple) or len(value) != len(args):
            _fail(key, value, f"expected a list of {len(args)} values")
        return tuple(_coerce(f"{key}[{i}]", v, a) for i, (v, a) in enumerate(zip(value, args, strict=True)))
    if origin is list:
        if not isinstance(value, list):
            _fail(key, value, "expected a list")
        return [_coerce(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value)]
    if origin is dict:
        if value is None:
            return {}
        if not isinstance(value, dict):
            _fail(key, value, "expected a mapping")
        return {_coerce(f"{key}", k, args[0]): _coerce(f"{key}.{k}", v, args[1]) for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key)
    raise TypeError(f"unsupported params type {tp!r} for {key}")


def from_dict(cls: type[T], data: Any, prefix: str) -> T:
    """Build the dataclass ``cls`` from a mapping, checking keys and types; defaults fill gaps."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        _fail(prefix, data, "expected a mapping of keys to values")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ParamError(
            f"params.yaml: unknown key {prefix}.{unknown[0]}; known keys of {prefix}: "
            f"{', '.join(sorted(names))}"
        )
    kwargs = {k: _coerce(f"{prefix}.{k}", v, hints[k]) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as e:  # a key without default is missing
        raise ParamError(f"params.yaml: {prefix}: {e}") from e


def check(ok: bool, key: str, value: Any, expected: str) -> None:
    """For ``__post_init__`` validators: fail naming ``key`` unless ``ok``."""
    if not ok:
        _fail(key, value, expected)


def read_params(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise SemiresError(f"{path}: params file not found; run from the project folder or pass --params")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise SemiresError(f"{path}: not valid YAML ({e})") from e
    if not isinstance(data, dict):
        raise SemiresError(f"{path}: expected a mapping of sections (synth, dataset, split, ...)")
    return data


def section(path: str | Path, name: str, cls: type[T]) -> T:
    """Section ``name`` of the params file at ``path``, as a checked ``cls``."""
    return from_dict(cls, read_params(path).get(name), name)


# --- the sections --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SynthParams:
    num_images: int = 400
    image_size: tuple[int, int] = (96, 128)
    objects_per_image: tuple[int, int] = (2, 4)
    crowd_share: float = 0.15
    overlap_share: float = 0.3
    split_shares: dict[str, float] = dataclasses.field(
        default_factory=lambda: {"train": 0.7, "val": 0.1, "testA": 0.1, "testB": 0.1}
    )
    seed: int = 0

    def __post_init__(self) -> None:
        check(self.num_images >= 4, "synth.num_images", self.num_images, "need at least 4 images")
        lo, hi = self.image_size
        check(
            32 <= lo <= hi <= 4096,
            "synth.image_size",
            list(self.image_size),
            "expected [min, max] side in pixels with 32 <= min <= max",
        )
        lo, hi = self.objects_per_image
        check(
            1 <= lo <= hi <= 12,
            "synth.objects_per_image",
            list(self.objects_per_image),
            "expected [min, max] with 1 <= min <= max <= 12",
        )
        for k in ("crowd_share", "overlap_share"):
            v = getattr(self, k)
            check(0 <= v <= 1, f"synth.{k}", v, "expected a share in [0, 1]")
        check(
            "train" in self.split_shares
            and all(v >= 0 for v in self.split_shares.values())
            and sum(self.split_shares.values()) > 0,
            "synth.split_shares",
            self.split_shares,
            "expected non-negative shares including train, "
            "e.g. {train: 0.7, val: 0.1, testA: 0.1, testB: 0.1}",
        )


@dataclasses.dataclass(frozen=True)
class DatasetParams:
    name: str = "synthref"
    split_by: str = "unc"
    refer_root: str = "data/refer"
    image_dir: str = "data/refer/images/synthref"

    def __post_init__(self) -> None:
        from semires.refer import SPLITS_BY

        check(self.name in SPLITS_BY, "dataset.name", self.name, f"expected one of {', '.join(SPLITS_BY)}")
        check(
            self.split_by in SPLITS_BY[self.name],
            "dataset.split_by",
            self.split_by,
            f"{self.name} is published with {', '.join(SPLITS_BY[self.name])}",
        )


@dataclasses.dataclass(frozen=True)
class SplitParams:
    seed: int = 0
    fractions: list[float] = dataclasses.field(default_factory=lambda: [5.0, 10.0])
    files: dict[float, str] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        check(len(self.fractions) > 0, "split.fractions", self.fractions, "expected at least one percentage")
        for i, f in enumerate(self.fractions):
            check(0 < f <= 100, f"split.fractions[{i}]", f, "expected a percentage in (0, 100], e.g. 1 or 10")
        check(
            len(set(self.fractions)) == len(self.fractions),
            "split.fractions",
            self.fractions,
            "each percentage once",
        )
        for f in self.files:
            check(
                f in self.fractions,
                f"split.files.{f:g}",
                self.files[f],
                "the key must be one of split.fractions",
            )
