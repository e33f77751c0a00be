"""Torch-free, safe readers for checkpoint files: PyTorch (zip and legacy), safetensors, HF Flax msgpack, NumPy .npz.

Checkpoints come from the internet, so they are untrusted input: PyTorch pickles go through an allow-list that
can only rebuild tensors and containers, and every size a file claims is checked against the bytes actually
present before anything is allocated.
"""

from __future__ import annotations

import collections
import hashlib
import io
import json
import math
import mmap
import os
import pickle
import pickletools
import zipfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import ml_dtypes
import numpy as np
import safetensors.numpy

PathLike = str | os.PathLike

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001
_WRAPPER_KEYS = ("state_dict", "model", "module")  # training checkpoints nest the weights under one of these
_TORCH_SUFFIXES = (".bin", ".pth", ".pt", ".ckpt")


class CheckpointError(ValueError):
    """A checkpoint file is corrupt, unreadable or in an unsupported format."""


class UnsafeCheckpointError(CheckpointError):
    """A pickle asks for a global outside the allow-list (it could run code)."""


class _DType(NamedTuple):
    """Stand-in for a torch storage class or torch dtype. A tuple, so pickle's BUILD cannot mutate it."""

    name: str
    dtype: np.dtype


class _Storage(NamedTuple):
    """What a persistent id resolves to; the bytes are read once the pickle is done."""

    key: str
    dtype: np.dtype


class _Tensor(NamedTuple):
    """A validated view description, turned into an array once its storage is read."""

    storage: _Storage
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: np.dtype


def _dims(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, (tuple, list)) or not all(type(v) is int and v >= 0 for v in value):
        raise ValueError(f"bad tensor {what} {value!r:.80}")
    return tuple(value)


def _tensor(storage: Any, offset: Any, size: Any, stride: Any, dtype: np.dtype) -> _Tensor:
    if not isinstance(storage, _Storage) or type(offset) is not int or offset < 0:
        raise ValueError(f"bad tensor storage {storage!r:.80} at offset {offset!r:.20}")
    size, stride = _dims(size, "size"), _dims(stride, "stride")
    if len(size) != len(stride):
        raise ValueError(f"tensor size {size} and stride {stride} differ in rank")
    return _Tensor(storage, offset, size, stride, dtype)


def _rebuild_tensor(storage: Any, offset: Any, size: Any, stride: Any, *_: Any) -> _Tensor:
    # Covers _rebuild_tensor and _rebuild_tensor_v2: requires_grad, hooks and metadata do not matter here.
    return _tensor(storage, offset, size, stride, getattr(storage, "dtype", None))


def _rebuild_tensor_v3(
    storage: Any, offset: Any, size: Any, stride: Any, requires_grad: Any, hooks: Any, dtype: Any, *_: Any
) -> _Tensor:
    # Newer dtypes (uint16, float8, ...) are saved as an untyped byte storage plus the tensor's dtype.
    if not isinstance(dtype, _DType):
        raise TypeError(f"bad tensor dtype {dtype!r:.80}")
    return _tensor(storage, offset, size, stride, dtype.dtype)


def _rebuild_parameter(data: Any, *_: Any) -> _Tensor:
    if not isinstance(data, _Tensor):
        raise TypeError(f"bad parameter data {data!r:.80}")
    return data


_STORAGE_DTYPES = {
    "DoubleStorage": np.float64,
    "FloatStorage": np.float32,
    "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
    "ComplexFloatStorage": np.complex64,
    "ComplexDoubleStorage": np.complex128,
}
_TORCH_DTYPES = {
    "float64": np.float64,
    "float32": np.float32,
    "float16": np.float16,
    "bfloat16": ml_dtypes.bfloat16,
    "int64": np.int64,
    "int32": np.int32,
    "int16": np.int16,
    "int8": np.int8,
    "uint8": np.uint8,
    "uint16": np.uint16,
    "uint32": np.uint32,
    "uint64": np.uint64,
    "bool": np.bool_,
    "complex64": np.complex64,
    "complex128": np.complex128,
    "float8_e4m3fn": ml_dtypes.float8_e4m3fn,
    "float8_e5m2": ml_dtypes.float8_e5m2,
}
_ALLOWED: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch.storage", "UntypedStorage"): _DType("UntypedStorage", np.dtype(np.uint8)),
    **{("torch", k): _DType(k, np.dtype(v)) for k, v in {**_STORAGE_DTYPES, **_TORCH_DTYPES}.items()},
}
_MEMO_PUTS = frozenset({"PUT", "BINPUT", "LONG_BINPUT"})


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler whose globals come only from `_ALLOWED`; records the storages that the pickle refers to."""

    def __init__(self, file: Any, path: PathLike) -> None:
        super().__init__(file, encoding="utf-8")
        self._path = path
        self.storages: dict[str, np.dtype] = {}  # key -> storage dtype, in first-seen order

    def find_class(self, module: str, name: str) -> Any:
        obj = _ALLOWED.get((module, name))
        if obj is None:
            raise UnsafeCheckpointError(
                f"refusing global '{module}.{name}' in {self._path}: only tensors and containers are allowed"
            )
        return obj

    def persistent_load(self, pid: Any) -> _Storage:
        # zip: ('storage', type, key, location, numel); legacy adds a sixth item, view metadata.
        if not (
            isinstance(pid, tuple)
            and len(pid) in (5, 6)
            and pid[0] == "storage"
            and isinstance(pid[1], _DType)
            and isinstance(pid[2], str)
        ):
            raise ValueError(f"unsupported persistent id {pid!r:.80}")
        if len(pid) == 6 and pid[5] is not None:
            raise ValueError("storage views (files from torch < 0.4) are not supported")
        key, dtype = pid[2], pid[1].dtype
        self.storages.setdefault(key, dtype)
        return _Storage(key, dtype)


def _check_pickle(f: Any, path: PathLike) -> None:
    """Walk the opcodes without building anything, leaving `f` after STOP.

    The C unpickler allocates whatever a length or memo index claims before reading; this pass rejects claims
    that the bytes do not back (pickletools reads lengths lazily) and memo indices beyond the opcode count.
    """
    try:
        for n, (op, arg, _) in enumerate(pickletools.genops(f)):
            if op.name in _MEMO_PUTS and arg > n:
                raise CheckpointError(f"{path}: pickle memo index {arg} out of range")
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"{path}: not a valid pickle: {e}") from e


def _unpickle(f: Any, path: PathLike) -> tuple[Any, _RestrictedUnpickler]:
    """Load one pickle from the current position of `f` (a BytesIO or mmap), leaving `f` after it."""
    start = f.tell()
    _check_pickle(f, path)
    end = f.tell()
    f.seek(start)
    unpickler = _RestrictedUnpickler(f, path)
    try:
        obj = unpickler.load()
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"{path}: malformed pickle: {e}") from e
    f.seek(end)
    return obj, unpickler


def _flatten(tree: Mapping, is_leaf: Callable[[Any], bool], path: PathLike) -> dict[str, Any]:
    """Nested mappings → {dotted name: leaf}; leaves that fail `is_leaf` (metadata) are dropped."""
    out: dict[str, Any] = {}

    def walk(node: Mapping, prefix: str) -> None:
        for key, value in node.items():
            name = f"{prefix}{key}"
            if isinstance(value, Mapping):
                walk(value, name + ".")
            elif is_leaf(value):
                if name in out:
                    raise CheckpointError(f"{path}: duplicate tensor name '{name}'")
                out[name] = value

    try:
        walk(tree, "")
    except RecursionError as e:
        raise CheckpointError(f"{path}: containers nested too deeply (or cyclic)") from e
    return out


def _tensor_refs(obj: Any, path: PathLike) -> dict[str, _Tensor]:
    if isinstance(obj, Mapping):
        obj = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), obj)
    if not isinstance(obj, Mapping):
        kind = "bare tensor" if isinstance(obj, _Tensor) else type(obj).__name__
        raise CheckpointError(f"{path}: top-level object is a {kind}, not a dict of tensors")
    return _flatten(obj, lambda v: isinstance(v, _Tensor), path)


def _to_array(t: _Tensor, buf: bytes, name: str, path: PathLike) -> np.ndarray:
    """Copy the strided view out of its storage, after checking that it stays inside it."""
    flat = np.frombuffer(buf, dtype=t.dtype, count=len(buf) // t.dtype.itemsize)
    n = math.prod(t.size)
    if n == 0:
        return np.empty(t.size, t.dtype)
    last = t.offset + sum((s - 1) * st for s, st in zip(t.size, t.stride, strict=True))
    if last >= flat.size:
        raise CheckpointError(f"{path}: tensor '{name}' reaches element {last} of a {flat.size}-element storage")
    if n > flat.size:
        # Overlapping strides could otherwise expand a small storage into a copy far larger than the file.
        raise CheckpointError(f"{path}: tensor '{name}' has {n} elements, more than its storage ({flat.size})")
    strides = tuple(st * t.dtype.itemsize if s > 1 else 0 for s, st in zip(t.size, t.stride, strict=True))
    view = np.lib.stride_tricks.as_strided(flat[t.offset :], shape=t.size, strides=strides)
    return view.copy()


def _to_arrays(refs: dict[str, _Tensor], load: Callable[[str], bytes], path: PathLike) -> dict[str, np.ndarray]:
    storages: dict[str, bytes] = {}
    out = {}
    for name, t in refs.items():
        if t.storage.key not in storages:
            storages[t.storage.key] = load(t.storage.key)
        out[name] = _to_array(t, storages[t.storage.key], name, path)
    return out


def _read_torch_zip(path: Path) -> dict[str, np.ndarray]:
    archive_size = path.stat().st_size
    with zipfile.ZipFile(path) as zf:

        def read(name: str) -> bytes:
            try:
                info = zf.getinfo(name)
            except KeyError:
                raise CheckpointError(f"{path}: missing zip entry '{name}'") from None
            if info.file_size > archive_size:  # a zip bomb, or a corrupt header
                raise CheckpointError(f"{path}: entry '{name}' claims {info.file_size} bytes, more than the file")
            return zf.read(info)

        names = set(zf.namelist())
        pkls = [n for n in names if n.count("/") == 1 and n.endswith("/data.pkl")]
        if len(pkls) != 1:
            raise CheckpointError(f"{path}: expected one '<archive>/data.pkl' entry, found {len(pkls)}")
        prefix = pkls[0].removesuffix("data.pkl")
        if prefix + "byteorder" in names and read(prefix + "byteorder") != b"little":
            raise CheckpointError(f"{path}: big-endian checkpoints are not supported")
        obj, _ = _unpickle(io.BytesIO(read(pkls[0])), path)
        return _to_arrays(_tensor_refs(obj, path), lambda key: read(f"{prefix}data/{key}"), path)


def _read_torch_legacy(path: Path, mm: mmap.mmap) -> dict[str, np.ndarray]:
    try:
        magic, _ = _unpickle(mm, path)
    except UnsafeCheckpointError:
        raise
    except CheckpointError as e:
        raise CheckpointError(f"{path}: not a PyTorch checkpoint (neither a zip archive nor a legacy pickle)") from e
    if magic != _LEGACY_MAGIC:
        raise CheckpointError(f"{path}: not a PyTorch checkpoint (bad magic number)")
    protocol, _ = _unpickle(mm, path)
    if protocol != _LEGACY_PROTOCOL:
        raise CheckpointError(f"{path}: unsupported legacy protocol {protocol!r:.40}")
    sys_info, _ = _unpickle(mm, path)
    if not isinstance(sys_info, dict) or not sys_info.get("little_endian", True):
        raise CheckpointError(f"{path}: big-endian checkpoints are not supported")
    obj, unpickler = _unpickle(mm, path)
    keys, _ = _unpickle(mm, path)
    if not isinstance(keys, list):
        raise CheckpointError(f"{path}: storage key list is a {type(keys).__name__}")
    # Each storage: an 8-byte little-endian element count, then the raw bytes, in the order of `keys`.
    storages = {}
    for key in keys:
        dtype = unpickler.storages.get(key)
        if dtype is None:
            raise CheckpointError(f"{path}: storage {key!r:.40} is not referenced by the pickle")
        header = mm.read(8)
        if len(header) < 8:
            raise CheckpointError(f"{path}: truncated before storage '{key}'")
        count = int.from_bytes(header, "little")
        nbytes, left = count * dtype.itemsize, len(mm) - mm.tell()
        if nbytes > left:
            raise CheckpointError(
                f"{path}: storage '{key}' claims {count} elements ({nbytes} bytes), only {left} bytes remain"
            )
        storages[key] = mm.read(nbytes)

    def load(key: str) -> bytes:
        if key not in storages:
            raise CheckpointError(f"{path}: tensor refers to storage '{key}', which the file does not hold")
        return storages[key]

    return _to_arrays(_tensor_refs(obj, path), load, path)


def read_torch(path: PathLike) -> dict[str, np.ndarray]:
    """Read a PyTorch checkpoint (zip or legacy format) without torch and without running pickled code."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(4)
            if head == b"PK\x03\x04":
                return _read_torch_zip(path)
            if not head:
                raise CheckpointError(f"{path}: empty file")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                return _read_torch_legacy(path, mm)
    except CheckpointError:
        raise
    except Exception as e:  # zipfile, zlib and OS errors on corrupt or truncated files
        raise CheckpointError(f"{path}: unreadable PyTorch checkpoint: {e}") from e


def _read_safetensors_file(path: Path) -> dict[str, np.ndarray]:
    try:
        return safetensors.numpy.load_file(path)
    except Exception as e:
        raise CheckpointError(f"{path}: unreadable safetensors file: {e}") from e


def _read_sharded(index: Path, read_shard: Callable[[Path], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Read every shard named in a HF `*.index.json` weight_map; check that each listed tensor was found."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        shards = list(dict.fromkeys(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{index}: unreadable shard index: {e}") from e
    out: dict[str, np.ndarray] = {}
    for shard in shards:
        if not isinstance(shard, str) or Path(shard).name != shard:
            raise CheckpointError(f"{index}: shard {shard!r:.80} is not a plain file name")
        shard_path = index.parent / shard
        if not shard_path.is_file():
            raise CheckpointError(f"{index}: shard '{shard}' not found at {shard_path}")
        out.update(read_shard(shard_path))
    missing = [name for name in weight_map if name not in out]
    if missing:
        raise CheckpointError(
            f"{index}: {len(missing)} tensors of the weight_map are not in their shards: {missing[:3]}"
        )
    return out


def read_safetensors(path: PathLike) -> dict[str, np.ndarray]:
    """Read a `.safetensors` file, or every shard of a `model.safetensors.index.json`."""
    path = Path(path)
    if path.name.endswith(".index.json"):
        return _read_sharded(path, _read_safetensors_file)
    return _read_safetensors_file(path)


def read_flax_msgpack(path: PathLike) -> dict[str, np.ndarray]:
    """Read a HF Flax `flax_model.msgpack` (msgpack restores data only) into dotted names."""
    from flax import (
        serialization,
    )  # imported here so that reading torch or safetensors files does not load JAX

    path = Path(path)
    try:
        tree = serialization.msgpack_restore(path.read_bytes())
    except Exception as e:
        raise CheckpointError(f"{path}: unreadable msgpack file: {e}") from e
    if not isinstance(tree, Mapping):
        raise CheckpointError(f"{path}: top-level object is a {type(tree).__name__}, not a dict of arrays")
    leaves = _flatten(tree, lambda v: isinstance(v, (np.ndarray, np.generic)), path)
    return {name: np.asarray(v) for name, v in leaves.items()}


def _read_single(path: Path) -> dict[str, np.ndarray]:
    name = path.name.lower()
    if name.endswith(".safetensors"):
        return _read_safetensors_file(path)
    if name.endswith(".msgpack"):
        return read_flax_msgpack(path)
    if name.endswith(_TORCH_SUFFIXES):
        return read_torch(path)
    if name.endswith(".npz"):
        from fxjax.backbones.formats.npz import read_npz  # the module imports this one's names

        return read_npz(path)
    raise CheckpointError(
        f"{path}: unknown checkpoint suffix (expected .safetensors, .msgpack, .npz, .index.json, {_TORCH_SUFFIXES})"
    )


def load_module(build: Callable, file: PathLike, rules, *, param_dtype) -> Any:
    """The module `build()` makes (abstractly), filled with a weight file's tensors by `rules`
    (`convert.load_state`, whose errors name the file)."""
    from fxjax.backbones.convert import load_state

    return load_state(build, read_checkpoint(file), rules, source=str(file), param_dtype=param_dtype)


def read_checkpoint(path: PathLike) -> dict[str, np.ndarray]:
    """Read any supported checkpoint, picking the reader by file name; `*.index.json` reads all shards."""
    path = Path(path)
    if path.name.endswith(".index.json"):
        return _read_sharded(path, _read_single)
    return _read_single(path)


def sha256_files(paths: Iterable[PathLike]) -> str:
    """Hex sha256 over the files' bytes in order, streamed, to record exactly which weights a run used."""
    digest = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()
