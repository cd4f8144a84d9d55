"""params.yaml, read once into typed sections that check themselves.

Each stage asks for the sections it reads and nothing else, so a bad value in a section a
stage does not read never stops it. A section read by one stage only is defined in that
stage's module (``stages/<stage>.py``), so editing it reruns that stage alone under DVC; this
module holds the machinery and the sections several stages share. A wrong key, type or range raises a
:class:`~semires.errors.SemiresError` that names the key (``split.fractions[2]``), the value
(an excerpt of it, however large) and what is allowed.

Nothing falls back silently: a section that a stage reads must be there (``{}`` asks for the
built-in defaults), a key written twice is an error, numbers must be finite, and integers
fit in 64 bits (a section's own checks give tighter ranges where a value means work, e.g.
steps).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import reprlib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from semires.errors import InvalidSetting, SemiresError

T = TypeVar("T")
INT64 = (-(2**63), 2**63 - 1)


class ParamError(SemiresError):
    pass


def _excerpt_repr() -> reprlib.Repr:
    r = reprlib.Repr()
    r.maxlevel, r.maxlist, r.maxtuple, r.maxdict, r.maxset = 2, 4, 4, 4, 4
    r.maxstring, r.maxother, r.maxlong = 60, 60, 40
    return r


_EXCERPT = _excerpt_repr()


def excerpt(value: Any, limit: int = 120) -> str:
    """``repr(value)``, shortened: a value built from YAML aliases can be exponentially large."""
    text = _EXCERPT.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _fail(key: str, value: Any, expected: str) -> typing.NoReturn:
    raise ParamError(f"params.yaml: {key} = {excerpt(value)}: {expected}")


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
        try:
            number = float(value)
        except OverflowError:
            number = math.inf
        if not math.isfinite(number):
            _fail(key, value, "expected a finite number (not .nan or .inf)")
        return number
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
        if value is None:
            _fail(key, value, "expected a mapping of keys to values (leave the key out for the defaults)")
        return from_dict(tp, value, key)
    raise TypeError(f"unsupported params type {tp!r} for {key}")


def _check_int64(key: str, value: Any) -> None:
    """Integers anywhere in ``value`` fit in 64 bits (torch, numpy and the samplers need it)."""
    if isinstance(value, int) and not isinstance(value, bool):
        if not INT64[0] <= value <= INT64[1]:
            _fail(key, value, "expected an integer in [-2**63, 2**63 - 1]")
    elif isinstance(value, list | tuple):
        for i, v in enumerate(value):
            _check_int64(f"{key}[{i}]", v)


def from_dict(cls: type[T], data: Any, prefix: str) -> T:
    """Build the dataclass ``cls`` from a mapping, checking keys and types; defaults fill gaps
    (keys left out of a section)."""
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
        obj = cls(**kwargs)  # its own checks first: they name a tighter range
    except TypeError as e:  # a key without default is missing
        raise ParamError(f"params.yaml: {prefix}: {e}") from e
    except InvalidSetting as e:  # a library config used as a section checks its own values
        _fail(f"{prefix}.{e.key}", e.value, e.expected)
    for k, v in kwargs.items():
        _check_int64(f"{prefix}.{k}", v)
    return obj


def check(ok: bool, key: str, value: Any, expected: str) -> None:
    """For ``__post_init__`` validators: fail naming ``key`` unless ``ok``."""
    if not ok:
        _fail(key, value, expected)


_Loader = yaml.SafeLoader  # (the C loader words its errors less clearly; params files are small)
_MERGE = "tag:yaml.org,2002:merge"


def _no_duplicate_keys(path: Path, node: yaml.Node, key: str, seen: set[int]) -> None:
    """Fail naming the first key written twice in one mapping (YAML would keep the last).
    Each node is visited once: aliases share nodes, and a graph of them can stand for an
    exponentially large value."""
    if id(node) in seen:
        return
    seen.add(id(node))
    if isinstance(node, yaml.MappingNode):
        lines: dict[str, int] = {}
        for k, v in node.value:
            name = k.value if isinstance(k, yaml.ScalarNode) else None
            here = f"{key}.{name}" if key else str(name)
            if name is not None and k.tag != _MERGE:
                line = k.start_mark.line + 1
                if name in lines:
                    raise SemiresError(
                        f"{path}: line {line}: key {here} is written twice (also on line {lines[name]}); "
                        "YAML would silently keep the last one: keep one"
                    )
                lines[name] = line
            _no_duplicate_keys(path, v, here, seen)
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            _no_duplicate_keys(path, v, f"{key}[{i}]", seen)


def read_params(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise SemiresError(f"{path}: params file not found; run from the project folder or pass --params")
    loader = _Loader(path.read_text(encoding="utf-8"))
    try:
        node = loader.get_single_node()
        if node is not None:
            _no_duplicate_keys(path, node, "", set())
        data = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as e:
        raise SemiresError(f"{path}: not valid YAML ({e})") from e
    finally:
        loader.dispose()
    if not isinstance(data, dict):
        raise SemiresError(f"{path}: expected a mapping of sections (synth, dataset, split, ...)")
    return data


def section(path: str | Path, name: str, cls: type[T]) -> T:
    """Section ``name`` of the params file at ``path``, as a checked ``cls``. The section must
    be there: a stage never runs on built-in defaults because its section is missing,
    misspelled or null (``name: {}`` asks for the defaults)."""
    data = read_params(path)
    if name not in data:
        close = difflib.get_close_matches(name, [k for k in data if isinstance(k, str)], n=1, cutoff=0.6)
        hint = f" (is `{close[0]}` a misspelling of it?)" if close else ""
        raise ParamError(
            f"{path}: no `{name}` section{hint}; this stage reads it: add `{name}:` with its keys "
            f"(the shipped params.yaml lists them), or `{name}: {{}}` for the built-in defaults"
        )
    if data[name] is None:
        raise ParamError(
            f"{path}: the `{name}` section is empty (null); this stage reads it: give it its keys (the "
            f"shipped params.yaml lists them), or write `{name}: {{}}` for the built-in defaults"
        )
    return from_dict(cls, data[name], name)


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


# Knobs of how fast a training stage runs, not of what it learns: the same function (the
# kernels may add up in another order), so they are left out of the run keys too.
SPEED_KEYS = ("compile", "channels_last")


def check_speed(section_name: str, compile_mode: str) -> None:
    """``compile``: how the training stage compiles the model (:mod:`semires.model.speed`)."""
    from semires.model.speed import COMPILE_MODES

    check(
        compile_mode in COMPILE_MODES,
        f"{section_name}.compile",
        compile_mode,
        "expected none (eager), regional (Swin, PWAM, BERT blocks and the decoder compiled one by one) "
        "or full (the whole model as one graph)",
    )
