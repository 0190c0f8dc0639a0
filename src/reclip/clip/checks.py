"""Checks every weights file passes: resource bounds before reading, finite values after.

Bounds come from what a file DECLARES, checked before anything is read or allocated:

- a zip (TorchScript archive, ``torch.save`` file): the total of its records' declared
  uncompressed sizes, against the limit and against the archive's size
  (``MAX_ZIP_RATIO``: zip bombs); each storage record's declared size against the
  bytes its tensor metadata needs; small records (pickles, JSON) against their caps;
- a ``torch.save`` file: its pickle is scanned without running anything
  (``torchsave.scan_torch_file``) for the storages it declares and the tensor views
  built on them, before ``torch.load`` allocates a byte;
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

import json
import math
import os
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .convert import CheckpointError, short

__all__ = [
    "LIMIT_ENV", "MAX_CHECKPOINT_BYTES", "MAX_JSON_BYTES", "MAX_PICKLE_BYTES", "MAX_SAFETENSORS_HEADER_BYTES",
    "MAX_ZIP_RATIO", "check_finite", "check_safetensors", "check_tensor_bounds", "check_view", "check_zip",
    "checkpoint_limit", "format_bytes", "is_count", "load_safetensors", "read_small_record", "take_bytes",
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


def is_count(x: Any) -> bool:
    """A non-negative ``int`` (not a bool): a size, stride, offset or element count from a file."""
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


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
            and all(is_count(x) for x in (offset, *size, *stride))):
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


def check_zip(zf: zipfile.ZipFile, source: str | os.PathLike, read_all: bool = True) -> None:
    """Refuse an archive whose records declare more than it can hold compressed, or than the limit.

    zipfile never inflates a record past its declared size, so with this check no read
    from the archive can allocate more than the archive plausibly holds. ``read_all``:
    every record will be read (the TorchScript reader), so their total must also fit
    ``checkpoint_limit()``; False when the storages are memory-mapped, not read.
    """
    declared = sum(info.file_size for info in zf.infolist())
    if read_all:
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
        if not (isinstance(shape, list) and all(is_count(d) for d in shape)
                and isinstance(offsets, list) and len(offsets) == 2 and all(is_count(o) for o in offsets)
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
