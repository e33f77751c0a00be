"""A streamed feature-cache entry: each host appends fixed-size chunks of its own rows, on any path
`etils.epath` handles (local disk, NFS, gs://, s3://), so no host holds a whole split and a killed
extraction resumes from its last complete chunk.

Layout of `<root>/<key>/`:

    <h>of<H>/<name>.<c:06d>.npy   chunk c of array `name` of host h's shard (of H shards; rows in source order)
    <h>of<H>/done.json            the shard is complete: its row count and chunk count
    manifest.json                 written last: the entry is committed; lists the shards it holds

Host h of H holds the contiguous rows `shard_bounds(n, h, H)`; chunk files are written to a temporary name
and renamed, so a chunk file that exists is whole. A reader never sees a partial entry: without a readable
`manifest.json` the entry is absent. With one shared store the manifest lists every shard; with per-host
local disks each host's manifest lists its own shard only, and a rerun on the same hosts hits.
"""

from __future__ import annotations

import functools
import io
import json
import queue
import re
import threading
import uuid
import warnings
from collections.abc import Iterator, Sequence

import numpy as np
from etils import epath

ENTRY_FORMAT = 2  # bump when this layout changes
MANIFEST = "manifest.json"
_DONE = "done.json"
_CHUNK = re.compile(r"(?P<name>[A-Za-z0-9_][A-Za-z0-9_-]*)\.(?P<index>\d{6})\.npy")
_ARRAY_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]*")


def _canonical(value) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)


def _shard_dir(path: epath.Path, host: int, hosts: int) -> epath.Path:
    return path / f"{host}of{hosts}"


def _is_local(path: epath.Path) -> bool:
    return "://" not in str(path)


def _load(path: epath.Path) -> np.ndarray:
    """A chunk file: memory-mapped on a local disk, read whole from a remote store."""
    if _is_local(path):
        return np.load(str(path), mmap_mode="r", allow_pickle=False)
    with path.open("rb") as f:
        return np.load(io.BytesIO(f.read()), allow_pickle=False)


def _write_atomic(path: epath.Path, data: bytes) -> None:
    """Writes to a temporary sibling, then renames: a reader (or a resuming writer) sees all bytes or none."""
    tmp = path.parent / f".tmp-{uuid.uuid4().hex}-{path.name}"
    tmp.write_bytes(data)
    tmp.replace(path)


def _npy_bytes(value: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(value), allow_pickle=False)
    return buffer.getvalue()


class ChunkedArray:
    """Rows of several chunk files, concatenated lazily: indexed like an array (`x[i]`, `x[a:b]`, `x[index]`),
    so callers that index `feats[split][variant][...]` never load more than the chunks they touch."""

    def __init__(self, files: Sequence[epath.Path], rows: Sequence[int], tail: tuple[int, ...], dtype: str):
        self.files, self.tail, self.dtype = list(files), tuple(tail), np.dtype(dtype)
        self.bounds = np.concatenate([[0], np.cumsum(np.asarray(rows, np.int64))]).astype(np.int64)
        self.shape = (int(self.bounds[-1]), *self.tail)
        self.ndim = len(self.shape)
        self._chunk = functools.lru_cache(maxsize=4)(self._read_chunk)

    def _read_chunk(self, c: int) -> np.ndarray:
        value = _load(self.files[c])
        expected = (int(self.bounds[c + 1] - self.bounds[c]), *self.tail)
        if value.shape != expected or value.dtype != self.dtype:
            raise OSError(f"chunk {self.files[c]} holds {value.dtype} {value.shape}, the manifest says {expected}")
        return value

    def __len__(self) -> int:
        return self.shape[0]

    def rows(self, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) as one in-memory array."""
        start, stop = max(0, start), min(stop, len(self))
        out = np.empty((max(0, stop - start), *self.tail), self.dtype)
        if stop <= start:
            return out
        first = int(np.searchsorted(self.bounds, start, side="right")) - 1
        for c in range(first, len(self.files)):
            lo, hi = int(self.bounds[c]), int(self.bounds[c + 1])
            if lo >= stop:
                break
            a, b = max(lo, start), min(hi, stop)
            out[a - start : b - start] = self._chunk(c)[a - lo : b - lo]
        return out

    def __getitem__(self, index):
        if isinstance(index, (int, np.integer)):
            i = int(index) + len(self) if index < 0 else int(index)
            if not 0 <= i < len(self):
                raise IndexError(f"row {index} is out of range for {len(self)} rows")
            return self.rows(i, i + 1)[0]
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            return self.rows(start, stop)[::step] if step > 0 else self.__array__()[index]
        index = np.asarray(index)
        if index.dtype == bool:
            index = np.flatnonzero(index)
        index = np.where(index < 0, index + len(self), index).astype(np.int64)
        out = np.empty((len(index), *self.tail), self.dtype)
        chunk_of = np.searchsorted(self.bounds, index, side="right") - 1  # [len(index)]
        for c in np.unique(chunk_of):
            picked = chunk_of == c
            out[picked] = self._chunk(int(c))[index[picked] - self.bounds[c]]
        return out

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        value = self.rows(0, len(self))
        return value if dtype is None else value.astype(dtype)

    def astype(self, dtype) -> np.ndarray:
        return self.__array__(dtype)

    def iter_chunks(self) -> Iterator[tuple[int, np.ndarray]]:
        """(first row, rows) of each chunk in order."""
        for c in range(len(self.files)):
            yield int(self.bounds[c]), self._chunk(c)


class ChunkedEntry:
    """One streamed entry (see the module docstring): read through `manifest()`, `arrays()`, `rows()`,
    `iter_chunks()`, `host_rows()`; written by each host through `shard_writer()` and committed by `commit()`."""

    def __init__(self, path: epath.Path, fingerprint: dict):
        self.path, self.fingerprint = epath.Path(path), fingerprint

    def manifest(self) -> dict | None:
        """The committed manifest, or None when the entry is absent, in progress, or unusable (with a warning)."""
        path = self.path / MANIFEST
        try:
            manifest = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as err:
            return self._unusable(str(err))
        if manifest.get("format") != ENTRY_FORMAT:
            return self._unusable(f"format {manifest.get('format')}, this code reads {ENTRY_FORMAT}")
        if _canonical(manifest.get("fingerprint")) != _canonical(self.fingerprint):
            return self._unusable("written for another fingerprint")
        return manifest

    def _unusable(self, problem: str) -> None:
        warnings.warn(f"feature cache entry {self.path} is unusable ({problem}); recomputing", RuntimeWarning, 3)

    def holds(self, host: int, hosts: int) -> bool:
        """Whether the committed entry can give host `host` of `hosts` its rows (its own shard, or all rows)."""
        manifest = self.manifest()
        if manifest is None:
            return False
        if len(manifest["shards"]) == manifest["hosts"]:
            return True
        return manifest["hosts"] == hosts and host in manifest["shards"]

    def _shard_arrays(self, manifest: dict, host: int) -> dict[str, ChunkedArray]:
        done = manifest["shard_rows"][str(host)]
        directory = _shard_dir(self.path, host, manifest["hosts"])
        out = {}
        for name, spec in manifest["arrays"].items():
            files = [directory / f"{name}.{c:06d}.npy" for c in range(len(done))]
            out[name] = ChunkedArray(files, done, tuple(spec["tail"]), spec["dtype"])
        return out

    def _committed(self) -> dict:
        manifest = self.manifest()
        if manifest is None:
            raise FileNotFoundError(f"feature cache entry {self.path} is not committed; extract it first")
        return manifest

    def arrays(self) -> dict[str, ChunkedArray]:
        """Every row of every array, lazily; needs an entry that holds all shards (a shared store)."""
        manifest = self._committed()
        if len(manifest["shards"]) != manifest["hosts"]:
            raise ValueError(
                f"feature cache entry {self.path} holds shards {manifest['shards']} of {manifest['hosts']} only "
                "(per-host caches); read host_rows() on each host, or gather the rows across hosts"
            )
        parts = [self._shard_arrays(manifest, h) for h in range(manifest["hosts"])]
        return {
            name: ChunkedArray(
                [f for p in parts for f in p[name].files],
                [r for h in range(manifest["hosts"]) for r in manifest["shard_rows"][str(h)]],
                parts[0][name].tail,
                parts[0][name].dtype.str,
            )
            for name in manifest["arrays"]
        }

    def rows(self, start: int, stop: int) -> dict[str, np.ndarray]:
        """Rows [start, stop) of the whole split, in memory (a probe gathering all rows chunk by chunk)."""
        return {name: value.rows(start, stop) for name, value in self.arrays().items()}

    def iter_chunks(self) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        """(first row, {name: rows}) chunk by chunk over the whole split."""
        arrays = self.arrays()
        iterators = [value.iter_chunks() for value in arrays.values()]
        for parts in zip(*iterators):
            yield parts[0][0], {name: rows for name, (_, rows) in zip(arrays, parts)}

    def host_rows(self, host: int, hosts: int) -> dict[str, ChunkedArray]:
        """Host `host` of `hosts`'s contiguous rows (`shard_bounds`), lazily: its own shard when the entry was
        written by as many hosts, else a slice of all rows."""
        manifest = self._committed()
        if manifest["hosts"] == hosts and host in manifest["shards"]:
            return self._shard_arrays(manifest, host)
        arrays = self.arrays()
        n = manifest["rows"]
        start, stop = n * host // hosts, n * (host + 1) // hosts
        return {name: _Slice(value, start, stop) for name, value in arrays.items()}

    def shard_writer(self, host: int, hosts: int, chunk_rows: int, queue_size: int = 2) -> ShardWriter:
        return ShardWriter(_shard_dir(self.path, host, hosts), chunk_rows, queue_size)

    def shard_done(self, host: int, hosts: int) -> dict | None:
        try:
            return json.loads((_shard_dir(self.path, host, hosts) / _DONE).read_text())
        except (FileNotFoundError, ValueError):
            return None

    def commit(self, hosts: int, shards: Sequence[int]) -> None:
        """Writes the manifest (last): the entry now holds `shards` of `hosts`, each already finished."""
        done = {h: self.shard_done(h, hosts) for h in shards}
        missing = [h for h, d in done.items() if d is None]
        if missing:
            raise FileNotFoundError(f"shards {missing} of {hosts} of {self.path} are not finished; cannot commit")
        arrays = next(iter(done.values()))["arrays"]
        manifest = {
            "format": ENTRY_FORMAT,
            "fingerprint": self.fingerprint,
            "hosts": hosts,
            "shards": sorted(shards),
            "shard_rows": {str(h): d["chunk_rows"] for h, d in done.items()},
            "rows": sum(d["rows"] for d in done.values()) if len(shards) == hosts else None,
            "arrays": arrays,
        }
        _write_atomic(self.path / MANIFEST, _canonical(manifest).encode())


class _Slice(ChunkedArray):
    """Rows [start, stop) of a ChunkedArray, still lazy."""

    def __init__(self, parent: ChunkedArray, start: int, stop: int):
        self.parent, self.start = parent, start
        self.tail, self.dtype = parent.tail, parent.dtype
        self.shape = (stop - start, *parent.tail)
        self.ndim = len(self.shape)

    def rows(self, start: int, stop: int) -> np.ndarray:
        start, stop = max(0, start), min(stop, len(self))
        return self.parent.rows(self.start + start, self.start + max(start, stop))

    def __getitem__(self, index):
        if isinstance(index, slice) or isinstance(index, (int, np.integer)):
            return super().__getitem__(index)
        index = np.asarray(index)
        index = np.flatnonzero(index) if index.dtype == bool else np.where(index < 0, index + len(self), index)
        return self.parent[index + self.start]

    def iter_chunks(self) -> Iterator[tuple[int, np.ndarray]]:
        for first, rows in self.parent.iter_chunks():
            a, b = max(first, self.start), min(first + len(rows), self.start + len(self))
            if a < b:
                yield a - self.start, rows[a - first : b - first]


class ShardWriter:
    """Appends one host's chunks in order from a writer thread (a bounded queue keeps the extraction loop off
    the file system while holding at most `queue_size` chunks in memory); `resume_chunks()` says where a
    killed writer stopped."""

    def __init__(self, directory: epath.Path, chunk_rows: int, queue_size: int = 2):
        if chunk_rows <= 0:
            raise ValueError(f"chunk_rows must be positive, got {chunk_rows}")
        self.directory, self.chunk_rows = directory, chunk_rows
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._error: BaseException | None = None
        self._specs: dict[str, dict] = {}
        self._rows: list[int] = []
        self._thread: threading.Thread | None = None

    def resume_chunks(self, names: Sequence[str]) -> int:
        """How many leading chunks are complete on disk (every array's file present and chunk_rows long);
        a finished shard answers its whole chunk count."""
        try:
            files = set(p.name for p in self.directory.iterdir())
        except FileNotFoundError:
            return 0
        complete = 0
        while all(f"{name}.{complete:06d}.npy" in files for name in names):
            first = _load(self.directory / f"{names[0]}.{complete:06d}.npy")
            if len(first) != self.chunk_rows:
                break  # a shard's short last chunk: only a finished shard (done.json) keeps it
            complete += 1
        return complete

    def start(self, first_chunk: int, names: Sequence[str]) -> None:
        """Begins appending at chunk `first_chunk` (the chunks before it stay as written)."""
        for name in names:
            if not _ARRAY_NAME.fullmatch(name):
                raise ValueError(f"array name {name!r} must be a plain file name ([A-Za-z0-9_-], no leading dot)")
        self.directory.mkdir(parents=True, exist_ok=True)
        for leftover in self.directory.glob(".tmp-*"):  # a killed writer's (only this host writes here)
            leftover.unlink(missing_ok=True)
        for c in range(first_chunk):
            value = _load(self.directory / f"{names[0]}.{c:06d}.npy")
            self._rows.append(len(value))
        for name in names:
            if first_chunk:
                value = _load(self.directory / f"{name}.{0:06d}.npy")
                self._specs[name] = {"tail": list(value.shape[1:]), "dtype": value.dtype.str}
        self._next = first_chunk
        self._thread = threading.Thread(target=self._drain, name="feature-chunk-writer", daemon=True)
        self._thread.start()

    def append(self, arrays: dict[str, np.ndarray]) -> None:
        """Queues the next chunk ({name: rows}, equal row counts); blocks while the queue is full."""
        if self._error is not None:
            raise OSError(f"writing feature chunks to {self.directory} failed: {self._error}") from self._error
        (rows,) = {len(v) for v in arrays.values()}
        for name, value in arrays.items():
            spec = {"tail": list(value.shape[1:]), "dtype": value.dtype.str}
            if self._specs.setdefault(name, spec) != spec:
                raise ValueError(f"chunk of {name!r} is {spec}, earlier chunks were {self._specs[name]}")
        self._queue.put((self._next, arrays))
        self._rows.append(rows)
        self._next += 1

    def _drain(self) -> None:
        while (item := self._queue.get()) is not None:
            index, arrays = item
            try:
                if self._error is None:
                    for name, value in arrays.items():
                        _write_atomic(self.directory / f"{name}.{index:06d}.npy", _npy_bytes(value))
            except BaseException as err:  # re-raised in the extraction loop by append() / finish()
                self._error = err

    def finish(self) -> None:
        """Waits for every queued chunk, then marks the shard finished (done.json)."""
        self._queue.put(None)
        self._thread.join()
        if self._error is not None:
            raise OSError(f"writing feature chunks to {self.directory} failed: {self._error}") from self._error
        done = {"rows": int(sum(self._rows)), "chunk_rows": self._rows, "arrays": self._specs}
        _write_atomic(self.directory / _DONE, _canonical(done).encode())

    def close(self) -> None:
        """Stops the writer thread after an error in the loop (queued chunks are still written)."""
        if self._thread is not None and self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
