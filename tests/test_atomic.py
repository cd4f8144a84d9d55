"""Atomic writes: outputs follow the umask, and a write the machine refuses is one line naming
the path while what was there stays as it was."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat

import pytest

from semires.atomic import WriteError, as_write_error, atomic_path, write_text

NO_SPACE = "free space on that disk (or raise the quota) and rerun"


@contextlib.contextmanager
def umask(mask: int):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o002])
def test_outputs_follow_the_umask(tmp_path, mask):
    with umask(mask):
        write_text(tmp_path / "a.json", "{}\n")
        with atomic_path(tmp_path / "folder", directory=True) as tmp:
            (tmp / "inner.txt").write_text("x")
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o666 & ~mask
    assert stat.S_IMODE((tmp_path / "folder").stat().st_mode) == 0o777 & ~mask


def test_a_full_disk_is_one_line_naming_the_path_and_keeps_the_earlier_file(tmp_path):
    path = tmp_path / "model.pt"
    path.write_bytes(b"the earlier output")
    with pytest.raises(WriteError) as e, atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(b"half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # what write(2) says on a full disk
    assert str(e.value) == (f"{path}: cannot write (No space left on device); {NO_SPACE}")
    assert path.read_bytes() == b"the earlier output"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]  # no temporary file left


def test_a_read_only_folder_is_one_line_naming_the_path(tmp_path):
    path = tmp_path / "out" / "metrics.json"
    with pytest.raises(WriteError) as e, atomic_path(path) as tmp:
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(tmp))
    assert str(e.value) == (
        f"{path}: cannot write (Read-only file system); make the folder writable, or write somewhere else, "
        "and rerun"
    )


def test_an_input_that_cannot_be_read_inside_the_block_stays_what_it_is(tmp_path):
    """A permission error on another file (an input read while writing) is not a write fault."""
    with pytest.raises(PermissionError), atomic_path(tmp_path / "out.json"):
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "input.jpg"))


def test_a_folder_copy_that_fails_is_named_by_its_first_file(tmp_path):
    fault = shutil.Error([("src/a", "dst/a", "[Errno 28] No space left on device: 'dst/a'")])
    assert str(as_write_error(fault)) == (f"dst/a: cannot write (No space left on device); {NO_SPACE}")
    assert as_write_error(shutil.Error([("a", "b", "same file")])) is None
