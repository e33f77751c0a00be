"""The grain pipeline: exact padded evaluation, deterministic resumable training streams, host sharding."""

import itertools

import numpy as np
import pytest

from fxjax.data.images import eval_batches, train_loader
from fxjax.data.preprocess import PreprocessSpec, preprocess_image
from fxjax.data.sources import ArraySource

SPEC = PreprocessSpec(size=(6, 6), rescale=1.0)


def _source(n: int, size: int = 10) -> ArraySource:
    """Random images whose label is their index, so every batch says exactly which examples it holds."""
    images = np.random.default_rng(0).integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    return ArraySource(images, np.arange(n, dtype=np.int32), f"synthetic-{n}")


def _take(iterator, n: int) -> list[dict]:
    return list(itertools.islice(iterator, n))


def _assert_same(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x["label"], y["label"])
        np.testing.assert_array_equal(x["x"], y["x"])


@pytest.mark.parametrize("n", [37, 40, 3])
def test_eval_sees_each_example_once_in_order_with_padding_masked(n):
    source = _source(n)
    batches = list(eval_batches(source, SPEC, batch_size=8))
    assert len(batches) == -(-n // 8)
    for b in batches:
        assert b["x"].shape == (8, 6, 6, 3) and b["x"].dtype == np.float32
        assert b["label"].dtype == np.int32 and b["mask"].dtype == bool and b["mask"].shape == (8,)
    labels = np.concatenate([b["label"][b["mask"]] for b in batches])
    np.testing.assert_array_equal(labels, np.arange(n))
    mask = np.concatenate([b["mask"] for b in batches])
    assert mask.sum() == n and mask[:n].all()
    assert (batches[-1]["x"][~batches[-1]["mask"]] == 0).all()
    np.testing.assert_array_equal(batches[0]["x"][1], preprocess_image(source[1]["image"], SPEC))


@pytest.mark.parametrize(("n", "hosts", "batch_size"), [(37, 2, 8), (5, 2, 4), (10, 4, 4)])
def test_eval_hosts_cover_everything_once_with_equal_batch_counts(n, hosts, batch_size):
    source = _source(n)
    per_host = [
        list(eval_batches(source, SPEC, batch_size=batch_size, shard_index=h, shard_count=hosts)) for h in range(hosts)
    ]
    assert len({len(batches) for batches in per_host}) == 1
    labels = np.concatenate([b["label"][b["mask"]] for batches in per_host for b in batches])
    np.testing.assert_array_equal(labels, np.arange(n))  # host order then batch order = dataset order
    assert all(b["x"].shape[0] == batch_size // hosts for batches in per_host for b in batches)


def test_eval_all_padding_batch_for_short_host():
    host0 = list(eval_batches(_source(5), SPEC, batch_size=4, shard_index=0, shard_count=2))
    assert [b["mask"].tolist() for b in host0] == [[True, True], [False, False]]


def test_train_batches_shapes_and_seeded_shuffle():
    source = _source(16)
    first = _take(iter(train_loader(source, SPEC, batch_size=16, seed=0, num_epochs=2)), 3)
    assert len(first) == 2  # two epochs, one batch each; num_epochs ends the stream
    assert first[0]["x"].shape == (16, 6, 6, 3) and first[0]["label"].dtype == np.int32
    epoch0, epoch1 = (sorted(b["label"].tolist()) for b in first)
    assert epoch0 == epoch1 == list(range(16))
    assert first[0]["label"].tolist() != first[1]["label"].tolist()  # reshuffled each epoch
    _assert_same(first, _take(iter(train_loader(source, SPEC, batch_size=16, seed=0, num_epochs=2)), 3))
    other = _take(iter(train_loader(source, SPEC, batch_size=16, seed=1, num_epochs=2)), 1)
    assert other[0]["label"].tolist() != first[0]["label"].tolist()


def test_train_resume_reproduces_uninterrupted_stream_with_augmentation():
    source = _source(24, size=20)

    def loader():
        return train_loader(source, SPEC, batch_size=8, seed=7, augment=True)

    uninterrupted = _take(iter(loader()), 8)
    interrupted = iter(loader())
    _take(interrupted, 3)
    state = interrupted.get_state()
    resumed = iter(loader())
    resumed.set_state(state)
    _assert_same(_take(resumed, 5), uninterrupted[3:])
    # Augmentation is really on: the same example differs between epochs.
    views = {}
    for b in uninterrupted:
        for label, image in zip(b["label"], b["x"], strict=True):
            views.setdefault(int(label), []).append(image)
    assert any(not np.array_equal(v[0], v[1]) for v in views.values() if len(v) > 1)


def test_train_hosts_see_disjoint_shards_covering_the_split():
    source = _source(40)
    seen = []
    for host in range(2):
        batches = list(train_loader(source, SPEC, batch_size=8, seed=3, shard_index=host, shard_count=2, num_epochs=1))
        assert len(batches) == 5 and all(b["label"].shape == (4,) for b in batches)
        seen.append({int(x) for b in batches for x in b["label"]})
    assert not seen[0] & seen[1] and seen[0] | seen[1] == set(range(40))


def test_train_resume_with_worker_processes():
    # Each worker batches its own records, so the stream is compared with itself, not with worker_count=0.
    source = _source(24, size=12)
    kwargs = dict(batch_size=8, seed=5, augment=True, worker_count=2)
    uninterrupted = iter(train_loader(source, SPEC, **kwargs))
    _take(uninterrupted, 3)
    state = uninterrupted.get_state()
    expected = _take(uninterrupted, 3)
    resumed = iter(train_loader(source, SPEC, **kwargs))
    resumed.set_state(state)
    _assert_same(_take(resumed, 3), expected)


def test_batch_size_must_divide_over_hosts():
    with pytest.raises(ValueError, match="multiple of shard_count"):
        train_loader(_source(16), SPEC, batch_size=6, seed=0, shard_count=4)
    with pytest.raises(ValueError, match="multiple of shard_count"):
        eval_batches(_source(16), SPEC, batch_size=6, shard_count=4)
    with pytest.raises(ValueError, match="cannot fill one batch"):
        train_loader(_source(6), SPEC, batch_size=8, seed=0)
