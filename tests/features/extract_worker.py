"""One extraction process for tests/features/test_extract.py: a tiny random ViT over a small digits split
through `cached_features`, optionally one of several hosts (gloo on 127.0.0.1), optionally SIGKILLing itself
at the n-th file the cache writes (before or after its rename). Saves what it read to --out."""

import argparse
import json
import os
import signal
import sys

import jax

parser = argparse.ArgumentParser()
parser.add_argument("--cache", required=True)
parser.add_argument("--out", required=True)
parser.add_argument("--processes", type=int, default=1)
parser.add_argument("--process-id", type=int, default=0)
parser.add_argument("--coordinator", default=None)
parser.add_argument("--kill-at", type=int, default=0)  # the n-th cache file write (1-based); 0: never
parser.add_argument("--kill-phase", choices=("before_rename", "after_rename"), default="after_rename")
parser.add_argument("--chunk-rows", type=int, default=24)
args = parser.parse_args()

if args.processes > 1:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(args.coordinator, args.processes, args.process_id)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from fxjax import parallel  # noqa: E402
from fxjax.backbones.backbone import Backbone  # noqa: E402
from fxjax.backbones.transformer import TransformerSpec, VisionTransformer  # noqa: E402
from fxjax.data.features import FeatureBatches  # noqa: E402
from fxjax.data.preprocess import PreprocessSpec  # noqa: E402
from fxjax.data.shards import shard_bounds  # noqa: E402
from fxjax.data.sources import Dataset, Subset, load_dataset  # noqa: E402
from fxjax.features import entry as entry_lib, extract  # noqa: E402

if args.kill_at:
    calls, real_write = [0], entry_lib._write_atomic

    def write_then_maybe_die(path, data):
        calls[0] += 1
        if calls[0] == args.kill_at and args.kill_phase == "before_rename":
            tmp = path.parent / f".tmp-dying-{path.name}"
            tmp.write_bytes(data[: len(data) // 2])  # a half-written temporary file, never renamed
            os.kill(os.getpid(), signal.SIGKILL)
        real_write(path, data)
        if calls[0] == args.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    entry_lib._write_atomic = write_then_maybe_die

spec = TransformerSpec(dim=32, depth=2, heads=4, mlp_dim=64, image_size=16, patch_size=8)
module = VisionTransformer(spec, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
info = {"name": "tiny-vit", "revision": None, "weight_sha256": "00" * 32}
backbone = Backbone(module, PreprocessSpec(size=(16, 16), mean=(0.5,) * 3, std=(0.5,) * 3), info)
digits = load_dataset("digits", val_fraction=0.1, test_fraction=0.1, seed=0)
splits = {"train": Subset(digits.splits["train"], np.arange(203)), "test": Subset(digits.splits["test"], np.arange(37))}
data = Dataset("digits-small", digits.class_names, splits, {k: digits.fingerprint[k] + "-small" for k in splits})

mesh = parallel.make_mesh()
feats, labels, hits = extract.cached_features(
    backbone, data, mesh=mesh, batch_size=8, cache_dir=args.cache, dtype="float32", param_dtype="float32",
    chunk_rows=args.chunk_rows,
)  # fmt: skip
mine, mine_labels, _ = extract.cached_features(
    backbone, data, mesh=mesh, batch_size=8, cache_dir=args.cache, dtype="float32", param_dtype="float32",
    chunk_rows=args.chunk_rows, rows="host",
)  # fmt: skip
os.makedirs(args.out, exist_ok=True)
for split in data.splits:
    np.save(f"{args.out}/{split}.npy", np.asarray(feats[split]["pooled"]))
    np.save(f"{args.out}/{split}-labels.npy", labels[split])
    np.save(f"{args.out}/{split}-host.npy", np.asarray(mine[split]["pooled"]))


class _Recorded:
    """A feature array that records which of its (host-local) rows training batches read."""

    def __init__(self, array):
        self.array, self.read = array, []

    def __len__(self):
        return len(self.array)

    def __getitem__(self, index):
        self.read.append(np.asarray(index))
        return self.array[index]


host, hosts = jax.process_index(), jax.process_count()
recorded = _Recorded(mine["train"]["pooled"])
train = FeatureBatches(
    recorded, mine_labels["train"], batch_size=8, seed=0, shard_index=host, shard_count=hosts,
    total=len(data.splits["train"]),
)  # fmt: skip
batches = [next(train) for _ in range(30)]  # more than one epoch (25 steps)
np.save(f"{args.out}/train-batch-x.npy", np.stack([b["x"] for b in batches]))
np.save(f"{args.out}/train-batch-local-rows.npy", np.stack(recorded.read))
np.save(f"{args.out}/train-host-start.npy", shard_bounds(len(data.splits["train"]), host, hosts)[0])
with open(f"{args.out}/hits.json", "w") as f:
    json.dump(hits, f)
sys.exit(0)
