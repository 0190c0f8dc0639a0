"""Writing files safely: every file reclip writes whole goes through :func:`atomic_write`
(logs that grow line by line, such as a run's metrics.jsonl, are appended instead).

A reader, a crash, a ``kill -9`` or a full disk sees the old file or the new one, never
half of one: the content goes to a temporary file in the target's folder, is flushed to
disk (fsync), then renamed over the target (``os.replace``, atomic on POSIX and Windows),
and the folder itself is fsynced so that the rename survives a power cut. A failed write
removes its temporary file and leaves the target as it was.

The temporary file is created with mode 0o666 masked by the process umask, as any file
opened for writing is, so outputs get the user's usual permissions (``tempfile.mkstemp``
would make them 0600, unreadable to the user's group). Temporary names are
``.<name>.<pid>-<random>.tmp``: a killed writer's leftovers are recognisable, and
:func:`remove_stale_temporaries` removes those whose process is gone.

Text files reclip reads line by line (class lists, split files, protocol YAMLs) go
through :func:`read_text_file`: UTF-8, a leading byte-order mark dropped, and a file in
another encoding refused with its path, the byte offset and line of the first bad byte
and the fix, instead of a bare ``UnicodeDecodeError``.
"""

from __future__ import annotations

import json
import os
import re
import secrets
from pathlib import Path
from typing import Any, Callable

__all__ = [
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "read_text_file",
    "remove_stale_temporaries",
    "temporary_name",
]

TEMPORARY_SUFFIX = ".tmp"
_TEMPORARY = re.compile(r"^\..+\.(\d+)-[0-9a-f]{8}\.tmp$")  # .<name>.<pid>-<random>.tmp


def temporary_name(path: Path) -> Path:
    """A fresh temporary path next to ``path`` (hidden, unique per process and call)."""
    return path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}{TEMPORARY_SUFFIX}")


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_folder(folder: Path) -> None:
    """Persist a rename in ``folder``; a no-op where folders cannot be opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems do not sync folders (EINVAL); the file itself is synced
        pass
    finally:
        os.close(fd)


def atomic_write(
    path: str | os.PathLike, write: Callable[[Path], None], *, keep_previous: str | os.PathLike | None = None
) -> Path:
    """Write ``path`` atomically: ``write(tmp)`` fills a temporary file, which then replaces ``path``.

    ``write`` receives the temporary file's path (it exists, empty, with umask
    permissions) and may open it by name (``torch.save``, ``Image.save``, ...). Any
    exception from it (or from the disk) propagates after the temporary file is removed;
    ``path`` is then untouched. The folder is created if needed. Returns ``path``.

    ``keep_previous``: once the new content is safely on disk, the current ``path`` (if
    any) is renamed to this path before the new one takes its place, so the last two
    versions are kept (a crash between the two renames leaves the previous version there).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # umask applies
    try:
        write(tmp)
        _fsync_file(tmp)
        if keep_previous is not None and path.exists():
            os.replace(path, keep_previous)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # gone after the rename; removes the leftover of a failure
    _fsync_folder(path.parent)
    return path


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files that killed writers left in ``folder`` (not recursive).

    Only files named like :func:`temporary_name`'s whose process no longer exists on this
    machine are removed (a live writer's are kept). Call it before this process writes
    there: a leftover carrying this process's own id is a dead writer's whose id was
    reused (a container's entrypoint is PID 1 at every restart), and is removed too.
    Returns the removed paths.
    """
    folder = Path(folder)
    removed = []
    if not folder.is_dir():
        return removed
    for entry in folder.iterdir():
        match = _TEMPORARY.match(entry.name)
        pid = int(match.group(1)) if match else None
        if match and entry.is_file() and (pid == os.getpid() or not _process_alive(pid)):
            entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """``data`` to ``path`` atomically (see :func:`atomic_write`)."""
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """``text`` (UTF-8) to ``path`` atomically (see :func:`atomic_write`)."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any, *, indent: int | None = 2, **dumps_kwargs: Any) -> Path:
    """``json.dumps(obj)`` plus a final newline to ``path`` atomically (see :func:`atomic_write`)."""
    return atomic_write_text(path, json.dumps(obj, indent=indent, **dumps_kwargs) + "\n")


def read_text_file(path: str | os.PathLike, what: str = "file") -> str:
    """The text of a UTF-8 file, a leading byte-order mark (U+FEFF, Windows editors) removed.

    ``what`` names the file in errors ("class file", "split file"). Raises
    FileNotFoundError for a missing file and ValueError for bytes that are not UTF-8,
    giving the path, the byte offset and line of the first bad byte and how to convert it.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {str(path)!r} does not exist or is not a file; check the path")
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise ValueError(
            f"{what} {str(path)!r} is not UTF-8: byte {err.start} (line {line}) is "
            f"{data[err.start:err.start + 1]!r} ({err.reason}); save it as UTF-8, e.g. "
            f"`iconv -f latin1 -t utf-8 {path} > fixed.txt` for a Latin-1 file"
        ) from None
