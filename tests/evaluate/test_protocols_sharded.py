"""A run's probes and few-shot protocol on lazy cache arrays over 8 simulated devices (`on_features(mesh=)`)
against today's in-memory, one-device results: kNN exactly, ridge and logistic within 1e-5; no split is ever
read whole into host memory (the arrays refuse it and record the largest read)."""

import jax
import ml_collections
import numpy as np
import pytest
from sklearn.datasets import load_digits

from fxjax import config as config_lib
from fxjax.evaluate import probes, protocols
from fxjax.features.entry import ChunkedArray, ChunkedEntry
from fxjax.parallel import make_mesh, rows_on_mesh


class _NoWholeReads(ChunkedArray):
    """A cache entry's chunked array that refuses to be read whole and remembers its largest read."""

    largest = 0

    def rows(self, start, stop):
        _NoWholeReads.largest = max(_NoWholeReads.largest, min(stop, len(self)) - max(0, start))
        return super().rows(start, stop)

    def __getitem__(self, index):
        if not isinstance(index, (slice, int, np.integer)):
            _NoWholeReads.largest = max(_NoWholeReads.largest, len(np.asarray(index)))
        return super().__getitem__(index)

    def __array__(self, dtype=None, copy=None):
        raise AssertionError("a whole split was read into host memory")


def _entry_array(tmp_path, name: str, x: np.ndarray, chunk: int) -> ChunkedArray:
    """`x` written as a committed one-host cache entry of `chunk`-row files, read back lazily."""
    entry = ChunkedEntry(tmp_path / name, {"split": name})
    writer = entry.shard_writer(0, 1, chunk)
    writer.start(0, ("pooled", "labels"))
    for a in range(0, len(x), chunk):
        writer.append({"pooled": x[a : a + chunk], "labels": np.zeros(len(x[a : a + chunk]), np.int32)})
    writer.finish()
    entry.commit(1, [0])
    lazy = entry.arrays()["pooled"]
    return _NoWholeReads(lazy.files, np.diff(lazy.bounds), lazy.tail, lazy.dtype.str)


@pytest.fixture(scope="module")
def mesh():
    assert jax.device_count() == 8, "tests/conftest.py should give 8 simulated CPU devices"
    return make_mesh(data=4, fsdp=2)


def test_rows_on_mesh_reads_each_device_rows_in_chunks(tmp_path, mesh):
    x = np.random.default_rng(0).normal(size=(203, 5)).astype(np.float32)
    lazy = _entry_array(tmp_path, "x", x, chunk=24)
    _NoWholeReads.largest = 0
    placed = rows_on_mesh(lazy, mesh, chunk_rows=10)
    assert placed.shape == (208, 5) and len(placed.sharding.device_set) == 8
    np.testing.assert_array_equal(np.asarray(placed)[:203], x)
    assert not np.asarray(placed)[203:].any() and _NoWholeReads.largest <= 10


@pytest.fixture(scope="module")
def digits():
    x, y = load_digits(return_X_y=True)
    cut = {"train": slice(0, 1001), "val": slice(1001, 1401), "test": slice(1401, None)}
    return {s: x[c].astype(np.float32) for s, c in cut.items()}, {s: y[c].astype(np.int32) for s, c in cut.items()}


def test_probes_and_fewshot_on_lazy_sharded_features_equal_in_memory(tmp_path, mesh, digits):
    feats, labels = digits
    config = config_lib.default_config()
    config.probes = ("ridge", "knn")
    config.fewshot = ml_collections.ConfigDict({"ks": (1, 5), "seeds": (0, 1), "probe": "ridge"})
    in_memory = {s: {"pooled": x} for s, x in feats.items()}
    lazy = {s: {"pooled": _entry_array(tmp_path, s, x, chunk=100)} for s, x in feats.items()}
    want, want_files = protocols.on_features(config, in_memory, labels, 10)
    _NoWholeReads.largest = 0
    got, got_files = protocols.on_features(config, lazy, labels, 10, mesh=mesh)
    assert _NoWholeReads.largest <= 4096  # parallel.ROW_CHUNK: never more than one chunk of rows at a time
    assert got["fewshot"] == want["fewshot"] and got["probes"] == want["probes"]
    want_tables = {p["name"]: p["table"] for p in want_files["probes.json"]["probes"]}
    got_tables = {p["name"]: p["table"] for p in got_files["probes.json"]["probes"]}
    assert got_tables["knn"] == want_tables["knn"]  # exactly
    for g, w in zip(got_tables["ridge"], want_tables["ridge"], strict=True):
        for key in ("train_accuracy", "val_accuracy", "test_accuracy"):
            np.testing.assert_allclose(g[key], w[key], atol=1e-5, err_msg=key)


def test_logistic_probe_on_lazy_features_equals_in_memory_on_the_mesh(tmp_path, mesh, digits):
    feats, labels = digits
    lazy = {s: _entry_array(tmp_path, s, x, chunk=100) for s, x in feats.items()}
    args = lambda f: probes.Splits(**{s: (f[s], labels[s]) for s in protocols.SPLITS})  # noqa: E731
    cs = [1e-3, 1e-1, 10.0]
    one = probes.logistic_probe(args(feats), 10, Cs=cs, standardize=True)
    here = probes.logistic_probe(args(feats), 10, Cs=cs, standardize=True, mesh=mesh)
    _NoWholeReads.largest = 0
    got = probes.logistic_probe(args(lazy), 10, Cs=cs, standardize=True, mesh=mesh)
    assert _NoWholeReads.largest <= 4096 and got.best == here.best == one.best
    for g, h, o in zip(got.table, here.table, one.table, strict=True):
        np.testing.assert_allclose(g["objective"], h["objective"], rtol=1e-5)
        np.testing.assert_allclose(g["objective"], o["objective"], rtol=1e-5)
        for split in ("train", "val", "test"):
            assert g[f"{split}_accuracy"] == h[f"{split}_accuracy"], split
