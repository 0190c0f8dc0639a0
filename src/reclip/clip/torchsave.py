"""Scan a ``torch.save`` file before ``torch.load`` reads it (see ``checks.py`` for the bounds).

``torch.load(weights_only=True)`` decides what a pickle may build, but allocates every
storage the pickle declares, and ``Tensor.set_`` grows a storage to fit any view, before
anything can be checked. So the pickle is first walked by an unpickler that imports and
calls nothing from the file: it records each persistent id (storage key, type, element
count) and checks each ``_rebuild_tensor_v2`` view against its storage; the storages are
then checked against the file (zip records, or the bytes after a legacy pickle).

Format reference: torch/serialization.py (``_save``, ``_load``, ``_legacy_load``) and
torch/_utils.py (``_rebuild_tensor_v2``), read from PyTorch's source.
"""

from __future__ import annotations

import io
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from .checks import (
    MAX_PICKLE_BYTES,
    check_view,
    check_zip,
    format_bytes,
    is_count,
    read_small_record,
    take_bytes,
    zip_record,
)
from .convert import CheckpointError, short

__all__ = ["DTYPES", "STORAGE_DTYPES", "load_torch_file", "scan_torch_file"]


# Storage classes a pickle names in persistent ids -> element dtype, and the dtypes it may
# name: fixed tables, never getattr on torch with a name from the file. Shared with the
# TorchScript reader. torch.storage.UntypedStorage (torch >= 2.0) holds bytes.
STORAGE_DTYPES: dict[str, torch.dtype] = {
    "DoubleStorage": torch.float64, "FloatStorage": torch.float32, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
    "ComplexFloatStorage": torch.complex64, "ComplexDoubleStorage": torch.complex128,
}
DTYPES: dict[str, torch.dtype] = {
    str(d).removeprefix("torch."): d
    for d in (torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.complex64, torch.complex128,
              torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool, torch.uint16,
              torch.uint32, torch.uint64, torch.float8_e4m3fn, torch.float8_e5m2)
}
_STORAGE_TYPES: dict[tuple[str, str], torch.dtype] = {
    **{("torch", name): dtype for name, dtype in STORAGE_DTYPES.items()},
    ("torch", "UntypedStorage"): torch.uint8,
    ("torch.storage", "UntypedStorage"): torch.uint8,
}
_REBUILDS = {("torch._utils", "_rebuild_tensor"), ("torch._utils", "_rebuild_tensor_v2"),
             ("torch._utils", "_rebuild_tensor_v3")}
# A tensor with Python attributes (or a Parameter subclass) is pickled as
# _rebuild_from_type_v2(func, type, args, state), func being one of _REBUILDS.
_REBUILD_FROM_TYPE = ("torch._tensor", "_rebuild_from_type_v2")
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # torch.serialization.MAGIC_NUMBER


class _Inert:
    """Whatever a scanned pickle builds from a global: accepts every call and change, does nothing."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __call__(self, *args: Any, **kwargs: Any) -> _Inert:
        return _Inert()

    def __setstate__(self, state: Any) -> None:
        pass

    def __setitem__(self, key: Any, value: Any) -> None:
        pass

    def append(self, value: Any) -> None:
        pass

    def extend(self, values: Any) -> None:
        pass

    def add(self, value: Any) -> None:
        pass


class _StorageRef:
    __slots__ = ("key", "numel", "dtype")

    def __init__(self, key: str, numel: int, dtype: torch.dtype) -> None:
        self.key, self.numel, self.dtype = key, numel, dtype


class _StorageType:
    __slots__ = ("dtype",)

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype


class _ScanUnpickler(pickle.Unpickler):
    """Walks a torch.save pickle without importing or calling anything from it.

    Records the storages its persistent ids declare and checks the view of every tensor
    rebuilt on them; every other global becomes an inert stand-in (``torch.load``'s
    weights-only unpickler, run afterwards, decides what is allowed).
    """

    def __init__(self, file: Any, source: str, legacy: bool) -> None:
        super().__init__(file)
        self.source, self.legacy = source, legacy
        self.storages: dict[str, int] = {}  # key -> bytes

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _STORAGE_TYPES:
            return _StorageType(_STORAGE_TYPES[module, name])
        if module == "torch" and name in DTYPES:
            return DTYPES[name]
        if (module, name) in _REBUILDS:
            return self._rebuild
        if (module, name) == _REBUILD_FROM_TYPE:
            return self._rebuild_from_type
        return _Inert  # one class for all: a pickle naming millions of globals makes no new types

    def persistent_load(self, pid: Any) -> _StorageRef:
        # zip: ('storage', type, key, location, numel); legacy adds view_metadata (view_key, offset, view_numel)
        n = 6 if self.legacy else 5
        if not (isinstance(pid, tuple) and len(pid) == n and pid[0] == "storage"):
            raise CheckpointError(f"{self.source}: persistent id {short(pid)} is not a torch storage")
        storage_type, key, numel = pid[1], pid[2], pid[4]
        if not isinstance(storage_type, _StorageType):
            raise CheckpointError(f"{self.source}: storage {short(key)} has type {short(storage_type)}; "
                                  "expected a torch storage type")
        if not (isinstance(key, str) and key.isalnum() and is_count(numel)):
            raise CheckpointError(f"{self.source}: storage {short(key)} of {short(numel)} elements is not a "
                                  "plain record name and element count")
        nbytes = numel * storage_type.dtype.itemsize
        if self.storages.setdefault(key, nbytes) != nbytes:
            raise CheckpointError(f"{self.source}: storage {key} is declared with {self.storages[key]} and "
                                  f"{nbytes} bytes; the file is corrupt")
        view = pid[5] if self.legacy else None
        if view is not None:  # a legacy view of a storage: (view_key, offset, numel), in elements
            if not (isinstance(view, tuple) and len(view) == 3 and all(is_count(x) for x in view[1:])
                    and view[1] + view[2] <= numel):
                raise CheckpointError(f"{self.source}: storage view {short(view)} does not lie in storage {key} "
                                      f"of {numel} elements")
            numel = view[2]
        return _StorageRef(key, numel, storage_type.dtype)

    def _rebuild_from_type(self, func: Any, new_type: Any, args: Any, state: Any) -> _Inert:
        """The wrapped rebuild runs too, so the view of a tensor with attributes is checked as well."""
        if func == self._rebuild and isinstance(args, tuple):
            return self._rebuild(*args)
        return _Inert()

    def _rebuild(self, storage: Any, offset: Any, size: Any, stride: Any, *rest: Any) -> _Inert:
        if isinstance(storage, _StorageRef):
            dtype = rest[2] if len(rest) >= 3 and isinstance(rest[2], torch.dtype) else storage.dtype
            numel = storage.numel * storage.dtype.itemsize // dtype.itemsize
            check_view(offset, size, stride, numel, f"{self.source}: a tensor on storage {storage.key}")
        return _Inert()


class _BoundedReader:
    """A binary file as the unpickler reads it, refusing to read past ``limit`` bytes in all.

    A pickle opcode may declare a length (``BINBYTES8``, ``LONG4``) that ``read(n)``
    would allocate before finding the file shorter; capped here, it only truncates. (The C
    unpickler still reserves the declared length for ``BINBYTES8`` before reading: address
    space, not memory, until bytes arrive; an impossible size fails at once.)
    """

    def __init__(self, f: Any, limit: int, source: str) -> None:
        self.f, self.left, self.source = f, limit, source

    def _take(self, data: bytes) -> bytes:
        self.left -= len(data)
        if self.left < 0:
            raise CheckpointError(f"{self.source}: its pickles are longer than {format_bytes(MAX_PICKLE_BYTES)}, "
                                  "more than any state dict's; the file is corrupt or crafted")
        return data

    def read(self, n: int = -1) -> bytes:
        return self._take(self.f.read(self.left + 1 if n < 0 else min(n, self.left + 1)))

    def readline(self, size: int = -1) -> bytes:
        return self._take(self.f.readline(self.left + 1 if size < 0 else min(size, self.left + 1)))


def _scan(data: Any, source: str, legacy: bool) -> tuple[_ScanUnpickler, Any]:
    """Scan one pickle from ``data`` (a binary file at its start); returns the scanner and the value."""
    scanner = _ScanUnpickler(data, source, legacy)
    try:
        value = scanner.load()
    except CheckpointError:
        raise
    except Exception as e:  # not a pickle, or a malformed one; torch.load would fail on it too
        raise CheckpointError(
            f"cannot read {source} with torch.load(weights_only=True): not a torch.save file or a damaged one "
            f"({type(e).__name__}: {str(e)[:200]}). Expected a state dict saved with torch.save, a .safetensors "
            "file or a TorchScript archive"
        ) from e
    return scanner, value


def scan_torch_file(path: Path) -> bool:
    """Check a ``torch.save`` file's declared storages and tensor views before ``torch.load`` reads it.

    Returns True for the zip format (storage records checked uncompressed and exactly as
    large as their storages, so ``torch.load(mmap=True)`` maps them without reading; the
    caller bounds what it copies, the state dict), False for the legacy pickle format
    (storages checked to fit in the rest of the file and the limit: ``torch.load``
    reads them all). Either way every tensor view is checked (``checks.check_view``).
    Anything else (a tar of torch < 0.4, not a torch file) raises ``CheckpointError``
    naming the file.
    """
    source = str(path)
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            check_zip(zf, source, read_all=False)  # storages are mapped; the state dict is bounded after
            pkls = [n for n in zf.namelist() if n.count("/") == 1 and n.endswith("/data.pkl")]
            if len(pkls) != 1:
                raise CheckpointError(
                    f"{source} is a zip but not a torch.save file: expected one '<archive>/data.pkl', found "
                    f"{pkls or 'none'}"
                )
            root = pkls[0].split("/")[0]
            data = read_small_record(zf, pkls[0], MAX_PICKLE_BYTES, source)
            scanner, _ = _scan(io.BytesIO(data), source, legacy=False)
            for key, nbytes in scanner.storages.items():
                zip_record(zf, f"{root}/data/{key}", nbytes, source, stored=True)
        return True
    # Legacy format (torch.serialization._legacy_load): pickles of the magic number, the
    # protocol version, system info, the object, the storage keys; then each storage as
    # an 8-byte element count and its bytes. torch allocates each declared storage first.
    with open(path, "rb") as raw:
        f = _BoundedReader(raw, MAX_PICKLE_BYTES, source)
        _, magic = _scan(f, source, legacy=True)
        if magic != _LEGACY_MAGIC:
            raise CheckpointError(
                f"cannot read {source} with torch.load(weights_only=True): not a torch.save file (it starts with "
                f"{short(magic)}, not torch's magic number). Expected a state dict saved with torch.save, a "
                ".safetensors file or a TorchScript archive"
            )
        _scan(f, source, legacy=True)  # protocol version
        _scan(f, source, legacy=True)  # system info
        scanner, _ = _scan(f, source, legacy=True)
        _scan(f, source, legacy=True)  # storage keys
        left = path.stat().st_size - raw.tell()
    total = take_bytes(0, sum(scanner.storages.values()), "its storages", source)
    if total + 8 * len(scanner.storages) > left:
        raise CheckpointError(
            f"{source}: its pickle declares {len(scanner.storages)} storages of {total} bytes in all but only {left} "
            "bytes follow it; the file is truncated or crafted"
        )
    return False


def load_torch_file(path: Path, *, hint: str, error: type[Exception] = CheckpointError,
                    safe_globals: tuple[type, ...] = ()) -> Any:
    """``torch.load(path, weights_only=True)`` of a file :func:`scan_torch_file` has checked
    first (memory-mapped when it is a zip), on the CPU; no pickled code ever runs.

    Every failure raises ``error`` naming the file: the scan's own message, or "cannot read
    PATH with torch.load(weights_only=True) (why). HINT" with ``hint`` saying what was
    expected and what to do. ``safe_globals``: plain classes a known format pickles besides
    tensors (DINO's full checkpoints store an ``argparse.Namespace``).
    """
    try:
        mmap = scan_torch_file(path)
        with torch.serialization.safe_globals(list(safe_globals)):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except CheckpointError as e:  # the scan's own message names the file
        if error is CheckpointError:
            raise
        raise error(str(e)) from e
    except Exception as e:  # a damaged zip (BadZipFile), weights_only refusals (UnpicklingError), ...
        raise error(f"cannot read {path} with torch.load(weights_only=True) ({type(e).__name__}: {str(e)[:300]}). "
                    f"{hint}") from e
