"""Feature cache: reuse, invalidation by every fingerprint part, crash safety, damaged entries, mmap reads."""

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from fxjax.features.entry import ChunkedEntry
from fxjax.features.store import FeatureCache, cache_root, fingerprint_key

REPO = Path(__file__).resolve().parents[2]

BASE = {
    "backbone": "efficientnet-lite0",
    "revision": None,
    "weight_sha256": "ab" * 32,
    "preprocess": {
        "size": [224, 224],
        "mean": [127.0] * 3,
        "std": [128.0] * 3,
        "rescale": 1.0,
        "resize_shortest": None,
        "resample": "bilinear",
    },
    "dataset": "digits",
    "split": "train",
    "split_fingerprint": "cd" * 32,
    "outputs": ["pooled"],
    "dtype": "float32",
    "format": 1,
}
CHANGES = {
    "backbone": "google/vit-base-patch16-224",
    "revision": "main",
    "weight_sha256": "ef" * 32,
    "preprocess": {**BASE["preprocess"], "size": [256, 256]},
    "dataset": "mnist",
    "split": "val",
    "split_fingerprint": "01" * 32,
    "outputs": ["pooled", "tokens"],
    "dtype": "bfloat16",
    "format": 2,
}


def _arrays(seed=0):
    rng = np.random.default_rng(seed)
    return {"features": rng.normal(size=(50, 16)).astype(np.float32), "labels": rng.integers(0, 10, 50)}


class _Counter:
    def __init__(self, seed=0):
        self.calls, self.seed = 0, seed

    def __call__(self):
        self.calls += 1
        return _arrays(self.seed)


def _tmp_dirs(root: Path) -> list[Path]:
    return sorted(root.glob(".tmp-*"))


def test_reuse_when_nothing_changed(tmp_path):
    cache, compute = FeatureCache(tmp_path), _Counter()
    first, hit_first = cache.get_or_compute(dict(BASE), compute)
    second, hit_second = FeatureCache(tmp_path).get_or_compute(dict(reversed(list(BASE.items()))), compute)
    assert (hit_first, hit_second, compute.calls) == (False, True, 1)
    for name, value in _arrays().items():
        np.testing.assert_array_equal(first[name], value)
        np.testing.assert_array_equal(second[name], value)
    assert _tmp_dirs(tmp_path) == []


@pytest.mark.parametrize("part", sorted(CHANGES))
def test_any_fingerprint_change_recomputes(tmp_path, part):
    assert set(CHANGES) == set(BASE)  # every part of the fingerprint is exercised
    cache, compute = FeatureCache(tmp_path), _Counter()
    cache.get_or_compute(BASE, compute)
    changed = {**BASE, part: CHANGES[part]}
    assert fingerprint_key(changed) != fingerprint_key(BASE)
    assert cache.get(changed) is None
    _, hit = cache.get_or_compute(changed, compute)
    assert not hit and compute.calls == 2
    assert cache.get(BASE) is not None  # the old entry is untouched


def test_fingerprint_must_be_plain_json():
    with pytest.raises(TypeError):
        fingerprint_key({**BASE, "preprocess": object()})


def test_reads_are_memory_mapped(tmp_path):
    cache = FeatureCache(tmp_path)
    computed, _ = cache.get_or_compute(BASE, _Counter())
    cached = cache.get(BASE)
    for arrays in (computed, cached):
        assert all(isinstance(x, np.memmap) and not x.flags.writeable for x in arrays.values())
    cache.put({**BASE, "split": "val"}, {"features": np.zeros((0, 16), np.float32)})  # an empty split
    assert cache.get({**BASE, "split": "val"})["features"].shape == (0, 16)


# A writer that pauses at a chosen point of `put`, to be SIGKILLed there: half-way through an array's bytes,
# or at the n-th fsync (1, 2: after each array; 3: after meta.json; 4: the directory, just before the rename).
_WRITER = """
import os, sys, time
import numpy as np
from fxjax.features import store as cache

stage, root = sys.argv[1], sys.argv[2]

def pause():
    print("paused", flush=True)
    time.sleep(60)

if stage == "mid_array":
    def save(f, value, allow_pickle):
        data = value.tobytes()
        f.write(data[: len(data) // 2])
        f.flush()
        pause()
    np.save = save
else:
    calls, real_fsync = [0], os.fsync
    def fsync(fd):
        real_fsync(fd)
        calls[0] += 1
        if calls[0] == int(stage):
            pause()
    os.fsync = fsync
arrays = {"a": np.arange(4_000_000, dtype=np.float32), "b": np.ones((100, 8), np.int32)}
cache.FeatureCache(root).put(__FINGERPRINT__, arrays)
print("finished", flush=True)
"""


@pytest.mark.parametrize("stage", ["mid_array", "1", "2", "3", "4"])
def test_killed_writer_leaves_nothing_readable(tmp_path, stage):
    script = _WRITER.replace("__FINGERPRINT__", repr(BASE))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-c", script, stage, str(tmp_path)], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert proc.stdout.readline().strip() == "paused"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
    cache = FeatureCache(tmp_path)
    assert cache.get(BASE) is None
    (leftover,) = _tmp_dirs(tmp_path)

    cache.put(BASE, _arrays())  # a later put succeeds beside the dead writer's fresh temporary directory
    np.testing.assert_array_equal(cache.get(BASE)["features"], _arrays()["features"])
    assert _tmp_dirs(tmp_path) == [leftover]

    an_hour_ago = time.time() - 3700
    os.utime(leftover, (an_hour_ago, an_hour_ago))
    cache.put({**BASE, "split": "test"}, _arrays(1))
    assert _tmp_dirs(tmp_path) == []  # stale temporary directories are cleaned


def test_truncated_array_is_absent_with_a_warning_then_replaced(tmp_path):
    cache = FeatureCache(tmp_path)
    cache.put(BASE, _arrays())
    path = cache.path(BASE) / "features.npy"
    os.truncate(path, path.stat().st_size // 2)
    with pytest.warns(RuntimeWarning, match="features.npy"):
        assert cache.get(BASE) is None
    compute = _Counter()
    with pytest.warns(RuntimeWarning):
        arrays, hit = cache.get_or_compute(BASE, compute)
    assert not hit and compute.calls == 1
    np.testing.assert_array_equal(arrays["features"], _arrays()["features"])
    assert cache.get(BASE) is not None and _tmp_dirs(tmp_path) == []


def test_arrays_that_disagree_with_meta_or_no_meta_are_absent(tmp_path):
    cache = FeatureCache(tmp_path)
    cache.put(BASE, _arrays())
    np.save(cache.path(BASE) / "labels.npy", np.zeros(49, np.int64))  # a valid .npy of the wrong shape
    with pytest.warns(RuntimeWarning, match="labels.npy"):
        assert cache.get(BASE) is None
    other = {**BASE, "split": "test"}
    cache.path(other).mkdir()  # a directory with no meta.json
    with pytest.warns(RuntimeWarning, match="meta.json"):
        assert cache.get(other) is None


def test_concurrent_writers_of_one_key(tmp_path):
    cache = FeatureCache(tmp_path)
    cache.put(BASE, _arrays(0))
    cache.put(BASE, _arrays(1))  # the rename loser discards its copy
    np.testing.assert_array_equal(cache.get(BASE)["features"], _arrays(0)["features"])

    other, errors = {**BASE, "split": "val"}, []
    barrier = threading.Barrier(4)

    def write(seed):
        barrier.wait()
        try:
            cache.put(other, _arrays(seed))
        except Exception as err:  # collected and asserted below
            errors.append(err)

    threads = [threading.Thread(target=write, args=(seed,)) for seed in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    features = cache.get(other)["features"]
    assert any(np.array_equal(features, _arrays(seed)["features"]) for seed in range(4))
    assert _tmp_dirs(tmp_path) == []


def test_bad_array_names_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="file name"):
        FeatureCache(tmp_path).put(BASE, {"../escape": np.zeros(1)})


def test_root_resolution_order(monkeypatch, tmp_path):
    monkeypatch.delenv("FXJAX_CACHE_DIR", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_root(None) == tmp_path / "home" / ".cache" / "fxjax"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root(None) == tmp_path / "xdg" / "fxjax"
    monkeypatch.setenv("FXJAX_CACHE_DIR", str(tmp_path / "env"))
    assert cache_root(None) == tmp_path / "env"
    assert cache_root(str(tmp_path / "config")) == tmp_path / "config"


# ------------------------------------------------------------------ streamed, chunked entries (fxjax.features.entry)


def _write_shards(entry: ChunkedEntry, hosts: int, rows: int, chunk_rows: int) -> dict[str, np.ndarray]:
    """Every host's shard of a [rows, 4] array written chunk by chunk; → the whole arrays in source order."""
    rng = np.random.default_rng(0)
    full = {"pooled": rng.normal(size=(rows, 4)).astype(np.float32), "labels": np.arange(rows, dtype=np.int32)}
    for host in range(hosts):
        start, stop = rows * host // hosts, rows * (host + 1) // hosts
        writer = entry.shard_writer(host, hosts, chunk_rows)
        writer.start(0, list(full))
        for a in range(start, stop, chunk_rows):
            writer.append({name: value[a : min(a + chunk_rows, stop)] for name, value in full.items()})
        writer.finish()
    return full


@pytest.mark.parametrize("where", ["local", "gs"])
def test_chunked_entry_round_trips_and_is_invisible_until_committed(tmp_path, gcs, where):
    root = {"local": str(tmp_path), "gs": gcs}[where]
    entry = ChunkedEntry(f"{root}/{fingerprint_key(BASE)}", BASE)
    full = _write_shards(entry, hosts=2, rows=53, chunk_rows=8)
    assert entry.manifest() is None and not entry.holds(0, 2)  # shards finished, entry not committed
    with pytest.raises(FileNotFoundError, match="not committed"):
        entry.arrays()
    entry.commit(2, [0, 1])
    assert entry.holds(0, 2) and entry.holds(0, 3)  # all rows: any host count can read its share
    arrays = entry.arrays()
    for name, value in full.items():
        np.testing.assert_array_equal(np.asarray(arrays[name]), value)
    index = np.random.default_rng(1).permutation(53)[:20]
    np.testing.assert_array_equal(arrays["pooled"][index], full["pooled"][index])
    np.testing.assert_array_equal(arrays["pooled"][5:30], full["pooled"][5:30])
    np.testing.assert_array_equal(arrays["pooled"][-1], full["pooled"][-1])
    np.testing.assert_array_equal(entry.rows(10, 40)["labels"], full["labels"][10:40])
    starts = [start for start, _ in entry.iter_chunks()]
    np.testing.assert_array_equal(np.concatenate([c["pooled"] for _, c in entry.iter_chunks()]), full["pooled"])
    assert starts == [0, 8, 16, 24, 26, 34, 42, 50]  # host 0's rows 0..25, then host 1's 26..52
    for host, hosts in [(1, 2), (2, 3)]:  # its own shard, or a slice of all rows for another host count
        mine = entry.host_rows(host, hosts)["labels"]
        np.testing.assert_array_equal(np.asarray(mine), np.arange(53 * host // hosts, 53 * (host + 1) // hosts))


def test_per_host_entry_holds_its_own_shard_only(tmp_path):
    entry = ChunkedEntry(tmp_path / "k", BASE)
    full = _write_shards(entry, hosts=2, rows=20, chunk_rows=4)
    entry.commit(2, [1])  # host 1's local disk
    assert entry.holds(1, 2) and not entry.holds(0, 2) and not entry.holds(1, 3)
    np.testing.assert_array_equal(np.asarray(entry.host_rows(1, 2)["pooled"]), full["pooled"][10:])
    with pytest.raises(ValueError, match="per-host"):
        entry.arrays()


def test_damaged_manifest_or_chunk_is_reported(tmp_path):
    entry = ChunkedEntry(tmp_path / "k", BASE)
    _write_shards(entry, hosts=1, rows=20, chunk_rows=8)
    entry.commit(1, [0])
    with pytest.warns(RuntimeWarning, match="another fingerprint"):
        assert ChunkedEntry(tmp_path / "k", {**BASE, "split": "val"}).manifest() is None
    np.save(tmp_path / "k" / "0of1" / "pooled.000001.npy", np.zeros((7, 4), np.float32))  # a wrong chunk
    with pytest.raises(OSError, match="pooled.000001.npy"):
        np.asarray(entry.arrays()["pooled"])
    (tmp_path / "k" / "manifest.json").write_text("{")
    with pytest.warns(RuntimeWarning, match="unusable"):
        assert entry.manifest() is None
