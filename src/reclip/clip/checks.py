"""Checks every weights file passes: resource bounds before reading, finite values after.

Bounds come from what a file DECLARES, checked before anything is read or allocated:

- a zip (TorchScript archive, ``torch.save`` file): the total of its records' declared
  uncompressed sizes, against the limit and against the archive's size
  (``MAX_ZIP_RATIO``: zip bombs); each storage record's declared size against the
  bytes its tensor metadata needs; small records (pickles, JSON) against their caps;
- a ``torch.save`` file: its pickle is scanned without running anything
  (:func:`scan_torch_file`) for the storages it declares and the tensor views built on
  them, before ``torch.load`` allocates a byte;
- safetensors: the header's dtype / shape / offsets against each other and the file size;
- every tensor view (size, stride, offset) must lie inside its storage and read each
  stored element once (:func:`check_view`): a stride-0 (expanded) or overlapping view
  would grow when copied, so it is refused, never materialised;
- what a load materialises, in total, against ``MAX_CHECKPOINT_BYTES``.

After reading, :func:`check_finite` refuses NaN or infinite weights (a CLIP or a
trained head), which would otherwise load and predict one class everywhere.
Every refusal is a ``CheckpointError`` naming the file, the record or tensor, the value
and what was expected.
"""

from __future__ import annotations

import io
import json
import math
import os
import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .convert import CheckpointError, short

__all__ = [
    "LIMIT_ENV", "MAX_CHECKPOINT_BYTES", "MAX_JSON_BYTES", "MAX_PICKLE_BYTES", "MAX_SAFETENSORS_HEADER_BYTES",
    "MAX_ZIP_RATIO", "check_finite", "check_safetensors", "check_tensor_bounds", "check_view", "check_zip",
    "checkpoint_limit", "format_bytes", "load_safetensors", "read_small_record", "scan_torch_file", "take_bytes",
    "zip_record",
]

# The most bytes of tensors one load may allocate (as stored in the file; a float16 file
# doubles when cast to float32). The largest ViT CLIP in use, open_clip's ViT-bigG-14, is
# 2.5 G parameters: 10 GB in float32. Override with the environment variable
# RECLIP_MAX_CHECKPOINT_BYTES (an integer, e.g. 40000000000) or by setting this constant.
MAX_CHECKPOINT_BYTES = 16 << 30
LIMIT_ENV = "RECLIP_MAX_CHECKPOINT_BYTES"
# A zip's records may declare at most this many times the archive's size (plus 1 MiB for
# small records of zeros). Weights barely compress (< 1.2x) and torch stores them
# uncompressed; a deflate "zip bomb" reaches ~1000x.
MAX_ZIP_RATIO = 10
_ZIP_SLACK_BYTES = 1 << 20
# Pickles describe tensors (a few hundred bytes each), never hold them: a CLIP's data.pkl
# is well under 1 MiB, with an optimizer's state a few MiB. Unpickling can grow a pickle
# ~30x in memory (a 2-byte opcode can make a 64-byte empty dict): at most ~0.5 GB here.
MAX_PICKLE_BYTES = 16 << 20
# Configs (config.json, open_clip_config.json, preprocessor_config.json, index files).
MAX_JSON_BYTES = 16 << 20
# safetensors refuses headers over 100 MB itself; the same bound, checked first.
MAX_SAFETENSORS_HEADER_BYTES = 100_000_000


def format_bytes(n: int) -> str:
    """``1073741824`` -> ``'1.0 GiB'``."""
    if n < 1024:
        return f"{n} B"
    exponent = min(int(math.log(n, 1024)), 3)
    return f"{n / 1024 ** exponent:.1f} {('KiB', 'MiB', 'GiB')[exponent - 1]}"


def checkpoint_limit() -> int:
    """``MAX_CHECKPOINT_BYTES``, or ``$RECLIP_MAX_CHECKPOINT_BYTES`` when set."""
    value = os.environ.get(LIMIT_ENV)
    if value is None or value.strip() == "":
        return MAX_CHECKPOINT_BYTES
    try:
        limit = int(float(value))
    except ValueError:
        limit = 0
    if limit <= 0:
        raise ValueError(f"{LIMIT_ENV}={value!r}: expected a positive number of bytes, e.g. 40000000000")
    return limit


def take_bytes(spent: int, more: int, what: str, source: str | os.PathLike) -> int:
    """``spent + more``, or a ``CheckpointError`` when that passes :func:`checkpoint_limit`."""
    limit = checkpoint_limit()
    if spent + more > limit:
        raise CheckpointError(
            f"{source}: {what} would take {format_bytes(spent + more)} ({spent + more} bytes), over the limit of "
            f"{format_bytes(limit)} for one checkpoint. A file this size is not a CLIP we load or is corrupt; "
            f"if it is genuine, raise the limit: {LIMIT_ENV}=<bytes> (reclip.clip.checks.MAX_CHECKPOINT_BYTES)"
        )
    return spent + more


# ---------------------------------------------------------------------------------------
# Tensor views
# ---------------------------------------------------------------------------------------


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def check_view(offset: Any, size: Any, stride: Any, storage_numel: int, what: str) -> int:
    """Elements of the view ``as_strided(size, stride, offset)`` of a storage; raises unless it is sane.

    Sane: non-negative integers, one stride per dimension, every element inside the
    storage, and no stored element read twice (checked sufficiently: along dimensions
    sorted by stride, each stride passes the extent of the smaller ones, as contiguous
    tensors, slices, transposes and chunks do). A stride-0 (``expand``) or overlapping
    view is refused: copying it would allocate more than the file holds. ``what`` names
    the tensor or record in the message.
    """
    size = tuple(size) if isinstance(size, (tuple, list)) else size  # torch.Size is a tuple
    stride = tuple(stride) if isinstance(stride, (tuple, list)) else stride
    geometry = f"size {short(size)}, stride {short(stride)}, offset {short(offset)}"
    if not (isinstance(size, tuple) and isinstance(stride, tuple) and len(size) == len(stride)
            and all(_is_int(x) and x >= 0 for x in (offset, *size, *stride))):
        raise CheckpointError(
            f"{what}: {geometry} is not a tensor view; expected non-negative integers, one stride per dimension. "
            "The file is corrupt or crafted"
        )
    numel = math.prod(size)
    if numel == 0:
        return 0
    span = 1 + sum((n - 1) * st for n, st in zip(size, stride))  # stored elements from first to last
    extent = 0  # elements spanned, minus one, by the dimensions seen so far
    for n, st in sorted(((n, st) for n, st in zip(size, stride) if n > 1), key=lambda d: d[1]):
        if st <= extent:
            raise CheckpointError(
                f"{what}: {geometry} reads stored elements more than once ({numel} elements from a span of {span}: "
                "a stride-0 (expanded) or overlapping view), which weights never are; refused rather than "
                "expanded. Re-save the tensor with .contiguous()"
            )
        extent += (n - 1) * st
    if offset + span > storage_numel:
        raise CheckpointError(
            f"{what}: {geometry} ends at element {offset + span} but its storage holds {storage_numel}; "
            "the file is truncated or corrupt, get it again"
        )
    return numel


def check_tensor_bounds(tensors: Mapping[str, torch.Tensor], source: str | os.PathLike) -> None:
    """Every tensor a dense CPU tensor, a sane view of its storage (:func:`check_view`), all within the limit.

    Run on a loaded state dict before anything copies, casts or converts it: afterwards
    no tensor grows when made contiguous, and together they fit ``checkpoint_limit()``.
    """
    total = 0
    for name, t in tensors.items():
        if t.layout != torch.strided or t.is_quantized or t.device.type != "cpu":
            raise CheckpointError(
                f"{source}: tensor {name} is a {'quantized' if t.is_quantized else t.layout} tensor on {t.device}; "
                "weights must be dense (torch.strided) tensors with their data in the file"
            )
        itemsize = t.element_size()
        numel = check_view(t.storage_offset(), tuple(t.shape), t.stride(),
                           t.untyped_storage().nbytes() // itemsize, f"{source}: tensor {name}")
        total = take_bytes(total, numel * itemsize, "the state dict's tensors", source)


# ---------------------------------------------------------------------------------------
# Finite values
# ---------------------------------------------------------------------------------------


def _all_finite(t: torch.Tensor) -> bool:
    if t.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):  # complex, float8
        return bool(torch.isfinite(t if t.is_complex() else t.float()).all())
    # min and max propagate NaN and are +-Inf when any value is: one pass, no mask allocated
    # (10x faster than isfinite(t).all() on a ViT-B/16).
    return all(math.isfinite(float(x)) for x in torch.aminmax(t))


def check_finite(tensors: Mapping[str, torch.Tensor], source: str | os.PathLike, fix: str | None = None) -> None:
    """Refuse weights holding NaN or +-Inf, naming ``source``, a few tensors and how many.

    Integer tensors are skipped. ``fix`` replaces the default advice (get the weights again).
    """
    bad: list[str] = []
    for name, t in tensors.items():
        if not (t.is_floating_point() or t.is_complex()) or t.numel() == 0 or _all_finite(t):
            continue
        nan, inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
        bad.append(f"{name} {tuple(t.shape)}: " + ", ".join(
            f"{n} {kind}" for n, kind in ((nan, "NaN"), (inf, "Inf")) if n
        ))
    if bad:
        shown = "; ".join(bad[:5]) + (f"; ... and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise CheckpointError(
            f"{source}: {len(bad)} of {len(tensors)} tensors hold NaN or infinite values ({shown}). A model with "
            "them predicts garbage (every pixel one class); "
            + (fix or "the file is damaged or came from a diverged training run: download or convert it again")
        )


# ---------------------------------------------------------------------------------------
# Zip archives (TorchScript and torch.save files)
# ---------------------------------------------------------------------------------------


def check_zip(zf: zipfile.ZipFile, source: str | os.PathLike) -> None:
    """Refuse an archive whose records declare more than the limit or than it can hold compressed.

    zipfile never inflates a record past its declared size, so with this check no
    read from the archive can allocate more than the archive plausibly holds.
    """
    declared = sum(info.file_size for info in zf.infolist())
    take_bytes(0, declared, "the archive's records", source)
    size = Path(zf.filename).stat().st_size if zf.filename else declared
    if declared > MAX_ZIP_RATIO * size + _ZIP_SLACK_BYTES:
        raise CheckpointError(
            f"{source}: the zip's records declare {format_bytes(declared)} uncompressed in a {format_bytes(size)} "
            f"file ({declared / max(size, 1):.0f}x; weights compress < 2x and at most {MAX_ZIP_RATIO}x is accepted). "
            "It is a zip bomb or corrupt, not a checkpoint"
        )


def zip_record(zf: zipfile.ZipFile, name: str, nbytes: int, source: str | os.PathLike,
               stored: bool = False) -> zipfile.ZipInfo:
    """The record ``name``, checked to declare exactly ``nbytes`` (what its tensor metadata needs).

    ``stored``: also require it uncompressed (torch.save never compresses; memory-mapping needs it).
    """
    try:
        info = zf.getinfo(name)
    except KeyError:
        raise CheckpointError(f"{source}: storage record {name} is missing; the file is truncated or corrupt") from None
    if info.file_size != nbytes:
        raise CheckpointError(
            f"{source}: storage record {name} declares {info.file_size} bytes but its tensor metadata needs {nbytes}; "
            "the file is corrupt or crafted"
        )
    if stored and info.compress_type != zipfile.ZIP_STORED:
        raise CheckpointError(
            f"{source}: storage record {name} is compressed (zip method {info.compress_type}); torch.save stores "
            "records uncompressed, so the file was repacked. Re-save it with torch.save, or repack without "
            "compression (zip -0)"
        )
    return info


def read_small_record(zf: zipfile.ZipFile, name: str, limit: int, source: str | os.PathLike) -> bytes:
    """Read a metadata record (a pickle, JSON, a byte-order mark) whose declared size is at most ``limit``."""
    info = zf.getinfo(name)
    if info.file_size > limit:
        raise CheckpointError(
            f"{source}: record {name} declares {format_bytes(info.file_size)}, more than the {format_bytes(limit)} "
            "such a record ever needs; the file is corrupt or crafted"
        )
    return zf.read(info)


# ---------------------------------------------------------------------------------------
# torch.save files, scanned before torch.load
# ---------------------------------------------------------------------------------------

# Storage types a torch.save pickle names in its persistent ids -> dtype (a fixed table: no
# getattr on torch with names from the file). torch.storage.UntypedStorage holds bytes.
_STORAGE_TYPES: dict[tuple[str, str], torch.dtype] = {
    **{("torch", name): dtype for name, dtype in {
        "DoubleStorage": torch.float64, "FloatStorage": torch.float32, "HalfStorage": torch.float16,
        "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
        "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
        "BoolStorage": torch.bool, "ComplexFloatStorage": torch.complex64, "ComplexDoubleStorage": torch.complex128,
    }.items()},
    ("torch", "UntypedStorage"): torch.uint8,
    ("torch.storage", "UntypedStorage"): torch.uint8,
}
# dtypes _rebuild_tensor_v3 names (torch.uint16, ...).
_DTYPE_NAMES: dict[str, torch.dtype] = {
    str(d).removeprefix("torch."): d
    for d in (torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.complex64, torch.complex128,
              torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool, torch.uint16,
              torch.uint32, torch.uint64, torch.float8_e4m3fn, torch.float8_e5m2)
}
_REBUILDS = {("torch._utils", "_rebuild_tensor"), ("torch._utils", "_rebuild_tensor_v2"),
             ("torch._utils", "_rebuild_tensor_v3")}
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
        self.tensor_bytes = 0

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _STORAGE_TYPES:
            return _StorageType(_STORAGE_TYPES[module, name])
        if module == "torch" and name in _DTYPE_NAMES:
            return _DTYPE_NAMES[name]
        if (module, name) in _REBUILDS:
            return self._rebuild
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
        if not (isinstance(key, str) and key.isalnum() and _is_int(numel) and numel >= 0):
            raise CheckpointError(f"{self.source}: storage {short(key)} of {short(numel)} elements is not a "
                                  "plain record name and element count")
        nbytes = numel * storage_type.dtype.itemsize
        if self.storages.setdefault(key, nbytes) != nbytes:
            raise CheckpointError(f"{self.source}: storage {key} is declared with {self.storages[key]} and "
                                  f"{nbytes} bytes; the file is corrupt")
        view = pid[5] if self.legacy else None
        if view is not None:  # a legacy view of a storage: (view_key, offset, numel), in elements
            if not (isinstance(view, tuple) and len(view) == 3 and all(_is_int(x) and x >= 0 for x in view[1:])
                    and view[1] + view[2] <= numel):
                raise CheckpointError(f"{self.source}: storage view {short(view)} does not lie in storage {key} "
                                      f"of {numel} elements")
            numel = view[2]
        return _StorageRef(key, numel, storage_type.dtype)

    def _rebuild(self, storage: Any, offset: Any, size: Any, stride: Any, *rest: Any) -> _Inert:
        if isinstance(storage, _StorageRef):
            dtype = rest[2] if len(rest) >= 3 and isinstance(rest[2], torch.dtype) else storage.dtype
            numel = storage.numel * storage.dtype.itemsize // dtype.itemsize
            count = check_view(offset, size, stride, numel, f"{self.source}: a tensor on storage {storage.key}")
            self.tensor_bytes = take_bytes(self.tensor_bytes, count * dtype.itemsize, "its tensors", self.source)
        return _Inert()


class _BoundedReader:
    """A binary file as the unpickler reads it, refusing to read past ``limit`` bytes in all.

    A pickle opcode may declare a length (``BINBYTES8``, ``LONG4``) that ``read(n)``
    would allocate before finding the file shorter; capped here, it only truncates.
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
    large as their storages, so ``torch.load(mmap=True)`` maps them without reading),
    False for the legacy pickle format (storages checked to fit in the rest of the file,
    which ``torch.load`` reads). Either way every tensor view is checked
    (:func:`check_view`) and their total against the limit. Anything else (a tar of
    torch < 0.4, not a torch file) raises ``CheckpointError`` naming the file.
    """
    source = str(path)
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            check_zip(zf, source)
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


# ---------------------------------------------------------------------------------------
# safetensors
# ---------------------------------------------------------------------------------------

_SAFETENSORS_ITEMSIZE = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8, "C64": 8,
}


def check_safetensors(path: Path) -> int:
    """Check a safetensors header against itself and the file size before loading; returns the data bytes.

    The header (8-byte length, then JSON) declares each tensor's dtype, shape and byte
    offsets in the data that follows; each must be a known dtype, non-negative integer
    dims and offsets inside the file whose length is exactly what dtype x shape needs.
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise CheckpointError(f"cannot read {path} as safetensors: it is {size} bytes, too short for even the "
                                  "8-byte header length. Get the file again")
        n = int.from_bytes(prefix, "little")
        if n > min(MAX_SAFETENSORS_HEADER_BYTES, size - 8):
            raise CheckpointError(
                f"cannot read {path} as safetensors: it is {size} bytes and declares a header of {n} bytes; expected "
                "an 8-byte header length, at most the rest of the file, then the JSON header. Get the file again"
            )
        try:
            header = json.loads(f.read(n))
        except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError
            raise CheckpointError(f"cannot read {path} as safetensors: its header is not JSON ({e})") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"cannot read {path} as safetensors: its header is {type(header).__name__}, "
                              "expected a JSON object")
    data = size - 8 - n
    total = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = info.get("dtype") if isinstance(info, dict) else None
        shape = info.get("shape") if isinstance(info, dict) else None
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if dtype not in _SAFETENSORS_ITEMSIZE:
            raise CheckpointError(f"{path}: tensor {name} has dtype {short(dtype)}; expected one of "
                                  f"{', '.join(_SAFETENSORS_ITEMSIZE)}")
        if not (isinstance(shape, list) and all(_is_int(d) and d >= 0 for d in shape)
                and isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)
                and 0 <= offsets[0] <= offsets[1] <= data):
            raise CheckpointError(
                f"{path}: tensor {name} declares shape {short(shape)} at bytes {short(offsets)}; expected "
                f"non-negative integer dims and 0 <= begin <= end <= {data} (the data's length)"
            )
        need = math.prod(shape) * _SAFETENSORS_ITEMSIZE[dtype]
        if offsets[1] - offsets[0] != need:
            raise CheckpointError(
                f"{path}: tensor {name} ({dtype} {tuple(shape)}) needs {need} bytes but its offsets {offsets} "
                f"span {offsets[1] - offsets[0]}; the file is corrupt"
            )
        total += need
    take_bytes(0, total, "its tensors", path)
    return total


def load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors after :func:`check_safetensors`; any failure a ``CheckpointError``."""
    from safetensors.torch import load_file

    check_safetensors(path)
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for inconsistent files
        raise CheckpointError(f"cannot read {path} as safetensors ({type(e).__name__}: {e}); get it again") from e
