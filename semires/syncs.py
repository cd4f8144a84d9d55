"""Host syncs: the operations that make the host wait for the device, found on any device.

A training step that never reads a device value back keeps the GPU's queue full: the host
runs ahead, launching the next kernels while the device works. One ``.item()``, one Python
``if`` on a tensor, one boolean-mask index (its output size is data the device holds)
stalls the host until the device has caught up. CUDA counts them itself
(``torch.cuda.set_sync_debug_mode``), but only on a GPU; :class:`HostSyncs` finds them on
the CPU too, from the operations themselves, so the tests can hold a step to zero:

- reading a value: ``aten._local_scalar_dense`` (``item``, ``bool``, ``int``, ``float`` of
  a tensor, a Python ``if`` on one), ``equal``, ``allclose``;
- an output whose size is data: ``nonzero``, ``masked_select``, indexing or assigning
  through a boolean mask (``x[mask]``, ``x[mask] = v``), ``unique*``, ``bincount``,
  ``repeat_interleave`` without ``output_size``;
- a copy to the host: ``.cpu()``, ``.tolist()``, ``.numpy()`` of a tensor, and any copy
  from a non-CPU device to the CPU.

Each is recorded with where it came from: the innermost stack frame outside torch.
Numbers that live on the host on every device (what a loader made: a view's blur radius,
its colour-jitter draws) are read with :func:`host_values` / :func:`host_array`, which
refuse a tensor that is not on the CPU and are not counted.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

_TORCH_DIR = str(Path(torch.__file__).resolve().parent)
_THIS = str(Path(__file__).resolve())
_aten = torch.ops.aten

# aten operations that read a device value on the host, or whose output size is data
_ALWAYS = {
    _aten._local_scalar_dense.default,
    _aten.equal.default,
    _aten.allclose.default,
    _aten.nonzero.default,
    _aten.nonzero.out,
    _aten.masked_select.default,
    _aten.masked_select.out,
    _aten.bincount.default,
    _aten._unique.default,
    _aten._unique2.default,
    _aten.unique_dim.default,
    _aten.unique_consecutive.default,
    _aten.unique_dim_consecutive.default,
}
_BOOL_INDEXED = {
    _aten.index.Tensor,
    _aten.index_put.default,
    _aten.index_put_.default,
    _aten._index_put_impl_.default,
}
_REPEAT_INTERLEAVE = {_aten.repeat_interleave.Tensor, _aten.repeat_interleave.self_Tensor}
_COPIES = {_aten._to_copy.default, _aten.copy_.default}
# Tensor methods that hand data to the host (on the CPU they are no aten operation at all)
_HOST_METHODS = {
    torch.Tensor.cpu: "cpu",
    torch.Tensor.tolist: "tolist",
    torch.Tensor.numpy: "numpy",
}


_host_reads = threading.local()  # depth of host_values / host_array calls on this thread


def _reading_host() -> bool:
    return getattr(_host_reads, "depth", 0) > 0


def _read_host(t: torch.Tensor, read: Callable[[torch.Tensor], Any], what: str) -> Any:
    if t.device.type != "cpu":
        raise ValueError(f"{what} reads a tensor that lives on the host; this one is on {t.device}")
    _host_reads.depth = getattr(_host_reads, "depth", 0) + 1
    try:
        return read(t)
    finally:
        _host_reads.depth -= 1


def host_values(t: torch.Tensor) -> Any:
    """``t.tolist()`` of a tensor that lives on the host on every device (a loader's
    output, never moved): no device sync anywhere, so :class:`HostSyncs` does not count it.
    A tensor on another device is refused (reading it would be a sync)."""
    return _read_host(t, torch.Tensor.tolist, "host_values")


def host_array(t: torch.Tensor) -> Any:
    """``t.numpy()`` of a CPU tensor, for host code (PIL) that runs only when the device is
    the CPU: no device sync, not counted by :class:`HostSyncs`; another device is refused."""
    return _read_host(t, torch.Tensor.numpy, "host_array")


@dataclass(frozen=True)
class Sync:
    """One host sync: the operation and where it was called (``file:line in function``,
    the innermost frame outside torch; ``via`` the innermost one in this project's code,
    if that is another)."""

    op: str
    where: str
    via: str = ""

    def __str__(self) -> str:
        return f"{self.op} at {self.where}" + (f" (via {self.via})" if self.via else "")


def _frames() -> tuple[str, str]:
    """``(innermost frame outside torch, innermost frame of semires/stages/scripts/tests)``."""
    first = ours = ""
    f = sys._getframe(2)
    while f is not None and not ours:
        name = f.f_code.co_filename
        if not name.startswith(_TORCH_DIR) and name != _THIS and not name.startswith("<"):
            here = f"{Path(name).name}:{f.f_lineno} in {f.f_code.co_name}"
            first = first or here
            parts = Path(name).parts
            if any(p in ("semires", "stages", "scripts", "tests") for p in parts[-3:-1]):
                ours = here
        f = f.f_back
    if not first:  # e.g. inside autograd's backward, which runs no Python code
        return "no Python frame (a backward?)", ""
    return first, ("" if ours == first else ours)


def _has_bool_index(indices: Any) -> bool:
    return any(
        isinstance(t, torch.Tensor) and t.dtype in (torch.bool, torch.uint8)
        for t in (indices or ())
        if t is not None
    )


def _is_sync(func: Any, args: tuple, kwargs: dict) -> bool:
    if func in _ALWAYS:
        return True
    if func in _BOOL_INDEXED:
        return _has_bool_index(args[1] if len(args) > 1 else kwargs.get("indices"))
    if func in _REPEAT_INTERLEAVE:
        return kwargs.get("output_size") is None
    if func in _COPIES:
        if func is _aten._to_copy.default:
            src, dst = args[0], kwargs.get("device")
            return (
                dst is not None and torch.device(dst).type == "cpu" and src.device.type not in ("cpu", "meta")
            )
        dst, src = args[0], args[1]
        return dst.device.type == "cpu" and src.device.type not in ("cpu", "meta")
    return False


class _Dispatch(TorchDispatchMode):
    def __init__(self, owner: HostSyncs) -> None:
        super().__init__()
        self.owner = owner

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self.owner._quieted() and _is_sync(func, args, kwargs):
            self.owner._record(str(func.overloadpacket.__name__))
        return func(*args, **kwargs)


class _Function(TorchFunctionMode):
    def __init__(self, owner: HostSyncs) -> None:
        super().__init__()
        self.owner = owner

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = _HOST_METHODS.get(func)
        if name is None or self.owner._quieted():
            return func(*args, **kwargs)
        self.owner._record(name)
        quiet = self.owner._quiet
        quiet.depth = getattr(quiet, "depth", 0) + 1  # the copy it makes is this one sync, not a second
        try:
            return func(*args, **kwargs)
        finally:
            quiet.depth -= 1


class HostSyncs:
    """Record every host sync of the code run inside ``with HostSyncs() as syncs:``.

    ``syncs.found`` lists them (:class:`Sync`) in order; ``len(syncs)`` counts them. Works on
    any device (on a GPU beside CUDA's own count). Under it each operation goes through
    Python: time nothing inside it, and run the code eagerly (``torch.compile`` runs what
    it cannot trace under a mode in Python anyway).
    """

    def __init__(self) -> None:
        self.found: list[Sync] = []
        self._quiet = threading.local()  # per thread: autograd's backward may run on its own
        self._modes: tuple[_Function, _Dispatch] | None = None

    def _quieted(self) -> bool:
        return getattr(self._quiet, "depth", 0) > 0 or _reading_host()

    def _record(self, op: str) -> None:
        where, via = _frames()
        self.found.append(Sync(op, where, via))

    def __len__(self) -> int:
        return len(self.found)

    def __enter__(self) -> HostSyncs:
        self._modes = (_Function(self), _Dispatch(self))
        for m in self._modes:
            m.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._modes is not None
        for m in reversed(self._modes):
            m.__exit__(*exc)
        self._modes = None

    def summary(self, limit: int = 8) -> str:
        """The syncs in one line, the same ones counted once: ``item at semi.py:12 in f (x2), ...``."""
        counts: dict[str, int] = {}
        for s in self.found:
            counts[str(s)] = counts.get(str(s), 0) + 1
        parts = [k + (f" (x{n})" if n > 1 else "") for k, n in list(counts.items())[:limit]]
        more = len(counts) - limit
        return ", ".join(parts) + (f", and {more} more" if more > 0 else "") if parts else "none"


def host_syncs(fn: Callable[[], Any]) -> HostSyncs:
    """The host syncs of one call of ``fn`` (see :class:`HostSyncs`)."""
    with HostSyncs() as syncs:
        fn()
    return syncs
