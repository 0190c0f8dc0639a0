"""reclip.files.atomic_write: all or nothing, umask permissions, no leftovers."""

from __future__ import annotations

import json
import os
import stat

import pytest

from reclip.files import atomic_write, atomic_write_bytes, atomic_write_json, atomic_write_text


@pytest.fixture()
def umask():
    """Set the process umask for one test, restoring it afterwards."""
    saved = os.umask(0o022)
    os.umask(saved)
    yield lambda value: os.umask(value)
    os.umask(saved)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("mask, expected", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_files_get_the_umask_permissions(tmp_path, umask, mask, expected):
    umask(mask)
    assert mode(atomic_write_text(tmp_path / "a.txt", "x")) == expected
    # replacing an existing file gives the new file the umask's mode too
    assert mode(atomic_write_bytes(tmp_path / "a.txt", b"y")) == expected


def test_content_and_parent_folders(tmp_path):
    target = tmp_path / "deep" / "er" / "r.json"
    atomic_write_json(target, {"a": [1, 2]})
    assert json.loads(target.read_text()) == {"a": [1, 2]} and target.read_text().endswith("\n")
    atomic_write(tmp_path / "w.bin", lambda tmp: tmp.write_bytes(b"\x00\x01"))
    assert (tmp_path / "w.bin").read_bytes() == b"\x00\x01"


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = atomic_write_text(tmp_path / "keep.txt", "old")

    def half_then_fail(tmp):
        tmp.write_text("half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        atomic_write(target, half_then_fail)
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]


def test_the_writer_sees_an_empty_file_with_its_own_name(tmp_path):
    seen = []
    atomic_write(tmp_path / "x.png", lambda tmp: seen.append((tmp.parent, tmp.name, tmp.stat().st_size)))
    folder, name, size = seen[0]
    assert folder == tmp_path and name.startswith(".x.png.") and name.endswith(".tmp") and size == 0
