"""Write files and folders so that a killed process never leaves one that looks finished.

Everything is first written under a temporary name in the destination's own folder (so the
final rename stays on one file system and is atomic), then renamed into place. What is
written follows the process's umask, like any other tool's output (a temporary file or
folder is created private, 0600 / 0700, and opened up before the rename).

A write that fails for a reason of the machine, not of the data (a full disk, a read-only
or foreign folder), becomes a :class:`WriteError`: one line that names the path and says
what to do; what was at the path before is left as it was.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from semires.errors import SemiresError

# errno -> what to do about it
_NO_SPACE = "free space on that disk (or raise the quota) and rerun"
_NO_WRITE = "make the folder writable, or write somewhere else, and rerun"
WRITE_FAULTS = {
    errno.ENOSPC: _NO_SPACE,
    errno.EDQUOT: _NO_SPACE,
    errno.EFBIG: _NO_SPACE,
    errno.EROFS: _NO_WRITE,
    errno.EACCES: _NO_WRITE,
    errno.EPERM: _NO_WRITE,
}
_UNAMBIGUOUS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS)  # only writes fail like this


class WriteError(SemiresError):
    """A file or folder could not be written: the machine's fault (disk full, read-only)."""


def write_error(path: str | os.PathLike | None, e: OSError) -> WriteError:
    """The one-line :class:`WriteError` for ``e`` (a write fault of :data:`WRITE_FAULTS`)."""
    where = path if path is not None else e.filename
    what = e.strerror or os.strerror(e.errno or 0)
    head = f"{where}: cannot write" if where is not None else "a write failed"
    return WriteError(f"{head} ({what}); {WRITE_FAULTS.get(e.errno or 0, _NO_WRITE)}")


def as_write_error(e: BaseException, path: str | os.PathLike | None = None) -> WriteError | None:
    """``e`` as a :class:`WriteError` naming ``path`` (default: the file the error names), or
    None when ``e`` is not a fault of the machine. ``shutil.Error`` (a copy of a folder,
    one entry per file that failed) counts when its first failure does."""
    if isinstance(e, WriteError):
        return e
    if isinstance(e, shutil.Error) and e.args and isinstance(e.args[0], list) and e.args[0]:
        _src, dst, why = e.args[0][0]
        for code in WRITE_FAULTS:
            if f"[Errno {code}]" in str(why):
                fault = OSError(code, os.strerror(code), dst)
                return write_error(path if path is not None else dst, fault)
        return None
    if isinstance(e, OSError) and e.errno in WRITE_FAULTS:
        return write_error(path, e)
    return None


def _umask() -> int:
    """The process's umask (read from /proc where it can be, so that it is never changed)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, directory: bool = False) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` if the block succeeds.

    With ``directory=True`` the temporary path is an empty folder, and an existing folder at
    ``path`` is replaced as a whole. On any exception the temporary file or folder is removed
    and ``path`` is left as it was; a full disk or an unwritable folder (in the block or at
    the rename) is raised as a :class:`WriteError` naming ``path``.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if directory:
            tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
        else:
            fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            os.close(fd)
            tmp = Path(name)
        # mkstemp/mkdtemp create private entries; the output follows the umask like any other
        os.chmod(tmp, (0o777 if directory else 0o666) & ~_umask())
    except OSError as e:
        fault = as_write_error(e, path)
        if fault is not None:
            raise fault from e
        raise
    try:
        yield tmp
        if directory:
            if path.exists():
                old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
                os.replace(path, old / "x")
                os.replace(tmp, path)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, path)
        else:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException as e:
        if directory:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        fault = _fault_in_block(e, tmp, path)
        if fault is not None:
            raise fault from e
        raise


def _fault_in_block(e: BaseException, tmp: Path, path: Path) -> WriteError | None:
    """A write fault of the block or the rename, named by ``path``. Permission errors count
    only for the temporary path and the destination (a block may read other files)."""
    if isinstance(e, OSError) and e.errno not in _UNAMBIGUOUS:
        name = e.filename
        if name is not None and not any(
            str(name) == str(p) or str(name).startswith(f"{p}{os.sep}") for p in (tmp, path)
        ):
            return None
    return as_write_error(e, path)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike, obj: Any, *, indent: int | None = 2) -> None:
    """Write ``obj`` as JSON to ``path`` atomically, keys in a stable order."""
    write_text(path, json.dumps(obj, indent=indent, sort_keys=False) + "\n")
