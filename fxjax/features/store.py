"""On-disk feature cache: features are extracted once per (backbone, weights, preprocessing, data split) and
read back memory-mapped by every later run, so sweeping heads never pays for the backbone again.

An entry is a directory `<root>/<key>` holding one `.npy` per array and a `meta.json`, where `key` is the
sha256 of the fingerprint (everything that changes the features). Entries are written into a temporary
sibling directory, fsynced and renamed into place, so a reader sees a whole entry or none; an entry that
does not match its `meta.json` (a truncated file, a disk error) is reported and treated as absent.

Extraction does not use these whole-array entries: it streams each host's rows chunk by chunk into a
`fxjax.features.entry.ChunkedEntry` under the same root and key scheme (on any etils.epath path).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
import uuid
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
from etils import epath

FORMAT = 1  # bump when the entry layout changes
STALE_SECONDS = 3600.0  # a temporary directory this old belongs to a writer that died
_TMP_PREFIX = ".tmp-"
_ARRAY_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


def cache_root(cache_dir: str | None = None) -> Path | epath.Path:
    """config.cache_dir, else $FXJAX_CACHE_DIR, else $XDG_CACHE_HOME/fxjax, else ~/.cache/fxjax. A URL
    (gs://, s3://) stays one: streamed entries (`fxjax.features.entry`) live on any path etils.epath handles."""
    chosen = cache_dir or os.environ.get("FXJAX_CACHE_DIR")
    if chosen and "://" in chosen:
        return epath.Path(chosen)
    if chosen:
        return Path(chosen).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "fxjax"


def as_path(root: str | os.PathLike) -> epath.Path:
    """A cache root as an etils.epath path (local, NFS, gs://, s3://)."""
    return epath.Path(root)


def fingerprint_key(fingerprint: dict) -> str:
    """sha256 of the canonical JSON (sorted keys, no whitespace); a value JSON cannot hold is an error, never
    silently stringified, so two different fingerprints cannot share a key by accident."""
    return hashlib.sha256(_canonical(fingerprint).encode()).hexdigest()


def _canonical(fingerprint: dict) -> str:
    return json.dumps(fingerprint, sort_keys=True, separators=(",", ":"), allow_nan=False)


class FeatureCache:
    """Feature arrays keyed by fingerprint under `root` (see `cache_root`)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def path(self, fingerprint: dict) -> Path:
        return self.root / fingerprint_key(fingerprint)

    def get(self, fingerprint: dict) -> dict[str, np.ndarray] | None:
        """The cached arrays, memory-mapped read-only, or None when the entry is absent or incomplete."""
        entry = self.path(fingerprint)
        if not entry.is_dir():
            return None
        problem, arrays = _read_entry(entry, fingerprint)
        if problem:
            warnings.warn(
                f"feature cache entry {entry} is unusable ({problem}); recomputing", RuntimeWarning, stacklevel=2
            )
            return None
        return arrays

    def put(self, fingerprint: dict, arrays: dict[str, np.ndarray]) -> None:
        """Writes the entry atomically. If another writer committed the same key first, its (equal) entry is
        kept and this copy is discarded; an unusable committed entry is replaced."""
        for name, value in arrays.items():
            if not _ARRAY_NAME.fullmatch(name):
                raise ValueError(f"array name {name!r} must be a plain file name ([A-Za-z0-9_.-], no leading dot)")
            if np.asarray(value).dtype.hasobject:
                raise ValueError(f"array {name!r} has dtype object; only numeric arrays can be cached")
        self.root.mkdir(parents=True, exist_ok=True)
        self._remove_stale()
        entry = self.path(fingerprint)
        tmp = self.root / f"{_TMP_PREFIX}{entry.name}-{uuid.uuid4().hex}"
        tmp.mkdir()
        try:
            meta = {"format": FORMAT, "fingerprint": fingerprint, "created": time.time(), "arrays": {}}
            for name, value in arrays.items():
                value = np.ascontiguousarray(value)
                with open(tmp / f"{name}.npy", "wb") as f:
                    np.save(f, value, allow_pickle=False)
                    _sync(f)
                meta["arrays"][name] = {"shape": list(value.shape), "dtype": value.dtype.str}
            with open(tmp / "meta.json", "w") as f:  # written last: its presence marks a complete copy
                f.write(_canonical(meta))
                _sync(f)
            _sync_dir(tmp)
            self._commit(tmp, entry, fingerprint)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # gone already after a successful rename

    def get_or_compute(
        self, fingerprint: dict, compute: Callable[[], dict[str, np.ndarray]]
    ) -> tuple[dict[str, np.ndarray], bool]:
        """(arrays, hit): the cached arrays, or `compute()`'s, stored and read back memory-mapped."""
        arrays = self.get(fingerprint)
        if arrays is not None:
            return arrays, True
        self.put(fingerprint, compute())
        arrays = self.get(fingerprint)
        if arrays is None:
            raise OSError(f"feature cache entry {self.path(fingerprint)} was written but cannot be read back")
        return arrays, False

    def _commit(self, tmp: Path, entry: Path, fingerprint: dict) -> None:
        for attempt in range(3):
            try:
                os.rename(tmp, entry)
                _sync_dir(self.root)
                return
            except OSError:  # the key exists: another writer won, or a damaged entry sits there
                if not entry.is_dir() or attempt == 2:
                    raise
                if _read_entry(entry, fingerprint)[0] is None:
                    return
                trash = self.root / f"{_TMP_PREFIX}{entry.name}-{uuid.uuid4().hex}"
                try:
                    os.rename(entry, trash)  # atomic: a reader sees the damaged entry or none
                except FileNotFoundError:  # another writer moved it away first
                    continue
                shutil.rmtree(trash, ignore_errors=True)

    def _remove_stale(self) -> None:
        """Temporary directories of writers that died (killed mid-extraction) are removed after an hour."""
        cutoff = time.time() - STALE_SECONDS
        for path in self.root.glob(f"{_TMP_PREFIX}*"):
            try:
                if path.stat().st_mtime < cutoff:
                    shutil.rmtree(path, ignore_errors=True)
            except FileNotFoundError:
                pass


def _read_entry(entry: Path, fingerprint: dict) -> tuple[str | None, dict[str, np.ndarray]]:
    """(problem, arrays): problem is None when meta.json is complete and every array matches it."""
    try:
        meta = json.loads((entry / "meta.json").read_text())
        specs = meta["arrays"]
        if meta["format"] != FORMAT or _canonical(meta["fingerprint"]) != _canonical(fingerprint):
            return "written by another format or for another fingerprint", {}
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"meta.json: {err}", {}
    arrays = {}
    for name, spec in specs.items():
        try:
            value = np.load(entry / f"{name}.npy", mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError, EOFError) as err:
            return f"{name}.npy: {err}", {}
        if list(value.shape) != spec["shape"] or value.dtype.str != spec["dtype"]:
            return f"{name}.npy holds {value.dtype.str} {list(value.shape)}, meta.json says {spec}", {}
        arrays[name] = value
    return None, arrays


def _sync(f) -> None:
    f.flush()
    os.fsync(f.fileno())


def _sync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
