"""A restricted reader for TorchScript archives (OpenAI's released ``ViT-B-16.pt`` etc.).

OpenAI released CLIP as ``torch.jit`` archives. ``torch.jit.load`` would run the
archive's code, and ``torch.load(weights_only=True)`` refuses TorchScript, so we read
the zip ourselves, without executing anything from the file:

- ``<archive>/data.pkl`` is a pickle of the module tree. Each module is pickled as
  ``GLOBAL __torch__.<path> <Class>``, ``NEWOBJ``, then its attribute dict via ``BUILD``
  (parameters, buffers, submodules, ``training``). We map every ``__torch__.*`` class to
  an inert placeholder that only stores that dict.
- tensors are ``torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)``
  whose storage is a persistent id ``('storage', torch.HalfStorage, key, location,
  numel)``; the bytes are the zip record ``<archive>/data/<key>`` (little endian).
- any other global (``os.system``, ``builtins.eval``, ...) raises
  ``UnsafeCheckpointError`` naming it, before anything could be called.
- sizes are checked before reading (``checks.py``): the archive's declared sizes against
  the limit and its own size (zip bombs), each storage record's declared size against
  its persistent id, every tensor view against its storage (no stride-0 expansion).

Format reference: torch/csrc/jit/serialization/export_module.cpp and
torch/serialization.py (``_load``, persistent ids), read from PyTorch's source.
"""

from __future__ import annotations

import io
import json
import pickle
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from .checks import (
    MAX_JSON_BYTES,
    MAX_PICKLE_BYTES,
    check_view,
    check_zip,
    is_count,
    read_small_record,
    take_bytes,
    zip_record,
)
from .convert import CheckpointError, short
from .torchsave import DTYPES, STORAGE_DTYPES


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint's pickle references something other than tensors and plain containers."""


class _Token:
    """Inert stand-in for an allowed global: a storage type or a known function.

    Instances cannot be changed by pickle's ``BUILD`` (``__setstate__`` refuses), so a
    crafted pickle cannot patch the reader's own callables.
    """

    __slots__ = ("name", "dtype", "fn")

    def __init__(self, name: str, dtype: torch.dtype | None = None, fn: Callable | None = None) -> None:
        self.name = name
        self.dtype = dtype
        self.fn = fn

    def __call__(self, *args: Any) -> Any:
        if self.fn is None:
            raise UnsafeCheckpointError(f"the pickle calls {self.name}, which is a type, not a tensor builder")
        return self.fn(*args)

    def __setstate__(self, state: Any) -> None:
        raise UnsafeCheckpointError(f"the pickle tries to modify {self.name}; refusing the checkpoint")


class ScriptObject:
    """Inert placeholder for a pickled ``__torch__.*`` module: keeps its state, runs nothing."""

    type_name = "__torch__"
    args: tuple = ()
    state: Any = None  # NEWOBJ does not call __init__; BUILD sets the state

    def __init__(self, *args: Any) -> None:
        self.args = args
        self.state: Any = None

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"<{self.type_name}>"


class _Budget:
    """Bytes a load has allocated so far, against ``checks.checkpoint_limit()``."""

    __slots__ = ("spent", "source")

    def __init__(self, source: str) -> None:
        self.spent, self.source = 0, source

    def take(self, nbytes: int, what: str) -> None:
        self.spent = take_bytes(self.spent, nbytes, what, self.source)


class _Storage:
    """A storage read from ``data/<key>``: a flat tensor of its dtype."""

    __slots__ = ("flat", "key", "budget")

    def __init__(self, flat: torch.Tensor, key: str, budget: _Budget) -> None:
        self.flat, self.key, self.budget = flat, key, budget

    def __setstate__(self, state: Any) -> None:
        raise UnsafeCheckpointError("the pickle tries to modify a storage; refusing the checkpoint")


def _rebuild_tensor(storage: _Storage, offset: int, size: tuple, stride: tuple, *rest: Any) -> torch.Tensor:
    """torch._utils._rebuild_tensor_v2 on our storage; extra args (requires_grad, hooks) ignored.

    The view is checked first (inside the storage, no element read twice: a stride-0
    view is refused, never expanded); a copy is counted against the load's budget.
    """
    if not isinstance(storage, _Storage):
        raise UnsafeCheckpointError(f"a tensor is rebuilt from {type(storage).__name__}, expected a storage record")
    flat = storage.flat
    numel = check_view(offset, size, stride, flat.numel(), f"a tensor on storage record data/{storage.key}")
    if numel == 0:
        return torch.empty(tuple(size), dtype=flat.dtype)
    t = flat.as_strided(tuple(size), tuple(stride), offset)
    if t.numel() == flat.numel() and t.is_contiguous():
        return t
    # Views sharing one storage (or a part of it) are copied so each tensor owns its memory.
    storage.budget.take(numel * flat.element_size(), "copies of its tensor views")
    return t.clone()


def _rebuild_parameter(data: torch.Tensor, *rest: Any) -> torch.Tensor:
    """torch._utils._rebuild_parameter(data, requires_grad, backward_hooks[, state]) -> the tensor."""
    if not isinstance(data, torch.Tensor):
        raise UnsafeCheckpointError(f"a parameter wraps {type(data).__name__}, expected a tensor")
    return data


def _identity(value: Any, *rest: Any) -> Any:
    """torch.jit._pickle.build_intlist / restore_type_tag: return the plain value."""
    return value


def _ordered_dict(*args: Any) -> dict:
    if args and not isinstance(args[0], (list, tuple, dict)):
        raise UnsafeCheckpointError(f"OrderedDict built from {type(args[0]).__name__}")
    return OrderedDict(*args)


# (module, name) -> stand-in function; everything else except __torch__.* raises.
_ALLOWED_CALLS: dict[tuple[str, str], Callable] = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("collections", "OrderedDict"): _ordered_dict,
    ("torch.jit._pickle", "restore_type_tag"): _identity,
    ("torch.jit._pickle", "build_intlist"): _identity,
    ("torch.jit._pickle", "build_doublelist"): _identity,
    ("torch.jit._pickle", "build_boollist"): _identity,
    ("torch.jit._pickle", "build_tensorlist"): _identity,
    ("torch", "device"): str,
}


# Distinct __torch__ classes one archive may name (each becomes a placeholder type).
_MAX_MODULE_CLASSES = 10_000


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that only rebuilds tensors, plain containers and inert module placeholders."""

    def __init__(self, data: bytes, read_record: Callable[[str, int], bytes], source: str) -> None:
        super().__init__(io.BytesIO(data))
        self._read_record = read_record
        self._storages: dict[str, _Storage] = {}
        self._classes: dict[str, type] = {}  # per load: a crafted BUILD cannot leak into later loads
        self._budget = _Budget(source)

    def find_class(self, module: str, name: str) -> Any:
        if module == "__torch__" or module.startswith("__torch__."):
            qualname = f"{module}.{name}"
            if qualname not in self._classes:
                if len(self._classes) >= _MAX_MODULE_CLASSES:
                    raise CheckpointError(
                        f"the pickle names more than {_MAX_MODULE_CLASSES} module classes (a CLIP has about 20); "
                        "the archive is corrupt or crafted"
                    )
                self._classes[qualname] = type(name, (ScriptObject,), {"type_name": qualname})
            return self._classes[qualname]
        if module == "torch" and name in STORAGE_DTYPES:
            return _Token(f"torch.{name}", dtype=STORAGE_DTYPES[name])
        if module == "torch" and name in DTYPES:
            return DTYPES[name]  # a dtype: immutable, BUILD on it fails
        fn = _ALLOWED_CALLS.get((module, name))
        if fn is not None:
            return _Token(f"{module}.{name}", fn=fn)
        raise UnsafeCheckpointError(
            f"the checkpoint's pickle references {module}.{name}, which is not a tensor or plain container; "
            "refusing to load it (it could run code). Use a checkpoint from a trusted source in a "
            "supported format (TorchScript archive, state dict, safetensors, HF folder)"
        )

    def persistent_load(self, pid: Any) -> _Storage:
        # ('storage', storage_type, key, location, numel); location (e.g. 'cuda:0') is ignored: all on CPU.
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise UnsafeCheckpointError(
                f"unexpected persistent id {short(pid)}; expected ('storage', type, key, location, numel)"
            )
        _, storage_type, key, _location, numel = pid
        if isinstance(storage_type, _Token) and storage_type.dtype is not None:
            dtype = storage_type.dtype
        elif isinstance(storage_type, torch.dtype):
            dtype = storage_type
        else:
            raise UnsafeCheckpointError(
                f"persistent id names storage type {short(storage_type)}, expected a torch storage type"
            )
        if not isinstance(key, str) or not key.isalnum():
            raise UnsafeCheckpointError(f"storage key {short(key)} is not a plain record name")
        if not is_count(numel):
            raise CheckpointError(f"storage record data/{key} has {short(numel)} elements, expected a count")
        if key not in self._storages:
            nbytes = numel * dtype.itemsize
            self._budget.take(nbytes, "its storage records")  # before reading: the file declares, we check
            raw = self._read_record(key, nbytes)
            if len(raw) != nbytes:  # zipfile stops at the declared size, which zip_record checked
                raise CheckpointError(
                    f"storage record data/{key} has {len(raw)} bytes, expected {numel} x {dtype.itemsize} ({dtype}); "
                    "the archive is corrupt, download it again"
                )
            flat = torch.frombuffer(bytearray(raw), dtype=dtype) if raw else torch.empty(0, dtype=dtype)
            self._storages[key] = _Storage(flat, key, self._budget)
        elif self._storages[key].flat.dtype != dtype or self._storages[key].flat.numel() != numel:
            raise CheckpointError(f"storage record data/{key} is declared twice with different types or sizes")
        return self._storages[key]


def is_torchscript_archive(path: str | Path) -> bool:
    """True for a zip holding ``*/data.pkl`` and TorchScript code (``*/code/`` or ``*/constants.pkl``)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
    has_data = any(n.count("/") == 1 and n.endswith("/data.pkl") for n in names)
    has_code = any(n.split("/")[1:2] == ["code"] or n.endswith("/constants.pkl") for n in names)
    return has_data and has_code


def _flatten(top: ScriptObject) -> dict[str, torch.Tensor]:
    """Walk placeholder states: tensors become dotted names, submodules are entered (no recursion:
    a crafted archive may nest modules arbitrarily deep)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    stack: list[tuple[str, ScriptObject]] = [("", top)]
    while stack:
        prefix, obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        state = obj.state
        if not isinstance(state, dict):
            continue  # modules with custom __getstate__ hold no parameters we use
        for name, value in reversed(list(state.items())):  # popped in the archive's order
            if not isinstance(name, str):
                continue
            if isinstance(value, torch.Tensor):
                out[prefix + name] = value.detach()  # drops anything a crafted BUILD attached (hooks)
            elif isinstance(value, ScriptObject):
                stack.append((f"{prefix}{name}.", value))
    return out


def _naming(e: CheckpointError, path: Path) -> CheckpointError:
    """``e`` with ``path`` in front of its message (same class), unless it names it already."""
    return e if str(path) in str(e) else type(e)(f"{path}: {e}")


def read_torchscript(
    path: str | Path, extra_names: Iterable[str] | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, bytes]]:
    """Read a TorchScript archive's tensors without executing it.

    Returns the flat state dict {dotted_name: tensor} (the archive's dtype, on CPU) and
    the archive's ``extra/`` files {name: bytes} (``torch.jit.save(_extra_files=...)``):
    those named in ``extra_names`` (default: all), each at most ``MAX_JSON_BYTES``.
    Raises ``UnsafeCheckpointError`` if ``data.pkl`` references anything but tensors,
    plain containers and ``__torch__`` modules, ``CheckpointError`` if it is malformed or
    declares more than it holds (see the module docstring); messages name ``path``.
    """
    path = Path(path)
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise CheckpointError(f"{path} is not a readable zip archive ({e}); expected a TorchScript .pt file") from e
    try:
        with zf:
            top, extra = _read_archive(zf, path, extra_names)
    except CheckpointError as e:  # UnsafeCheckpointError too: keep the class, name the file
        raise _naming(e, path) from e
    if not isinstance(top, ScriptObject):
        raise CheckpointError(f"{path}: data.pkl holds {type(top).__name__}, expected a TorchScript module")
    return _flatten(top), extra


def _read_archive(zf: zipfile.ZipFile, path: Path, extra_names: Iterable[str] | None) -> tuple[Any, dict[str, bytes]]:
    check_zip(zf, path)  # declared sizes against the limit and the archive's size, before any read
    names = zf.namelist()
    pkls = [n for n in names if n.count("/") == 1 and n.endswith("/data.pkl")]
    if len(pkls) != 1:
        raise CheckpointError(f"{path}: expected one '<archive>/data.pkl' in the zip, found {pkls or 'none'}")
    root = pkls[0].split("/")[0]
    byteorder = f"{root}/byteorder"
    if byteorder in names:
        order = read_small_record(zf, byteorder, 16, path).strip()
        if order not in (b"little", b""):
            raise CheckpointError(f"{path}: byte order {short(order)} is not supported; expected little endian")

    def read_record(key: str, nbytes: int) -> bytes:
        return zf.read(zip_record(zf, f"{root}/data/{key}", nbytes, path))

    try:
        top = _RestrictedUnpickler(read_small_record(zf, pkls[0], MAX_PICKLE_BYTES, path), read_record,
                                   str(path)).load()
    except CheckpointError:  # UnsafeCheckpointError too
        raise
    except Exception as e:  # malformed pickle: name the file and the cause
        raise CheckpointError(f"{path}: cannot read {pkls[0]} ({type(e).__name__}: {e})") from e
    extra_dir = f"{root}/extra/"
    present = [n[len(extra_dir):] for n in names if n.startswith(extra_dir) and not n.endswith("/")]
    wanted = present if extra_names is None else [n for n in present if n in set(extra_names)]
    extra = {n: read_small_record(zf, extra_dir + n, MAX_JSON_BYTES, path) for n in wanted}
    return top, extra


def read_extra_json(extra: dict[str, bytes], name: str) -> dict | None:
    """Parse one JSON object from an archive's extra files, or None if absent."""
    if name not in extra:
        return None
    try:
        data = json.loads(extra[name].decode("utf-8"))
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError
        raise CheckpointError(f"extra file {name!r} in the archive is not valid JSON ({type(e).__name__}: {e})") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"extra file {name!r} in the archive holds {type(data).__name__}, expected a JSON object")
    return data
