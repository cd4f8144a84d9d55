"""params.yaml, read once into typed sections that check themselves.

Each stage asks for the sections it reads and nothing else, so a bad value in a section a
stage does not read never stops it. A section read by one stage only is defined in that
stage's module (``stages/<stage>.py``), so editing it reruns that stage alone under DVC; this
module holds the machinery and the sections several stages share. A wrong key, type or range raises a
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


# --- shared by several stages ------------------------------------------------------------


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


# Knobs of how data is loaded, not of what is learnt: the same batches with any value, so a
# run with other values continues a killed one (they are left out of the run keys).
LOADER_KEYS = ("num_workers", "image_cache_mb")


def check_loader(section_name: str, num_workers: int | None, image_cache_mb: int) -> None:
    """The loader knobs every training and evaluation section has.

    ``num_workers``: DataLoader worker processes; null (auto) is none on the CPU (the
    training process's threads use every core) and, on a GPU, the process's share of the
    cores less one, at most 8 (:func:`semires.data.auto_workers`). ``image_cache_mb``:
    decoded images (uint8) each loading process keeps per dataset, least recently used out."""
    check(
        num_workers is None or num_workers >= 0,
        f"{section_name}.num_workers",
        num_workers,
        "expected null (auto: none on the CPU, the CPU cores less one on a GPU) or 0 or more workers",
    )
    check(
        0 <= image_cache_mb <= 1 << 20,
        f"{section_name}.image_cache_mb",
        image_cache_mb,
        "expected megabytes of decoded images to keep per dataset and process, 0 for none",
    )
