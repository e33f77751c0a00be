"""Head-training speed: many heads in one vmapped sweep vs one head; cached features vs the backbone online.

    PYTHONPATH=. python bench/heads.py [--n-train 20000] [--dim 1280] [--classes 10] [--batch 256]
        [--epochs 5] [--heads 64] [--online-batch 64] [--online-batches 3]

(a) `fxjax.heads.engine.Engine` with `--heads` stacked heads (a learning-rate x weight-decay grid) vs the same
engine with one head (what `experiment.run` trains without a sweep), on the same synthetic features, batches and
steps. Times exclude compilation.

(b) One training epoch on scikit-learn digits (the train split of `load_dataset("digits")`) with the built-in
efficientnet-lite0 at 224 px, batch `--online-batch`: cached mode (the engine's head on pooled features) vs
online mode (the engine on `Classifier`: frozen backbone forward + head step per batch). The online epoch is
measured on `--online-batches` batches after a warm-up batch and extrapolated to the epoch's step count;
images are preprocessed beforehand, so the online time excludes data loading (a real online epoch is slower
still). The cached epoch runs on random features of the real shape: a head step does not depend on values.
"""

from __future__ import annotations

import argparse
import itertools
import os
import time

import jax
import numpy as np
from flax import nnx
from machine import copy_bytes_per_second, fma_peak_flops_per_second

import fxjax
from fxjax import parallel
from fxjax.config import default_config
from fxjax.data import images as pipeline
from fxjax.data.features import FeatureBatches, feature_eval_batches
from fxjax.data.sources import load_dataset
from fxjax.heads.engine import Engine
from fxjax.heads.freeze import frozen_patterns, trainable
from fxjax.heads.heads import Classifier, Head


def synthetic(n: int, dim: int, classes: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Learnable features: class means in a 64-d latent space, projected to `dim`, plus noise."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    z = rng.normal(size=(classes, 64))[y] * 0.5 + rng.normal(size=(n, 64))
    x = z @ rng.normal(size=(64, dim)) / 8.0 + 0.5 * rng.normal(size=(n, dim))  # [n, dim]
    return x.astype(np.float32), y.astype(np.int32)


def engine_seconds(engine: Engine, batches, steps: int) -> float:
    """Seconds for `steps` train steps after one warm-up (compiling) step."""
    state, _ = engine.train_step(engine.init_state(), next(batches))
    start = time.perf_counter()
    for _ in range(steps):
        state, _ = engine.train_step(state, next(batches))
    jax.block_until_ready(state.params)
    return time.perf_counter() - start


def _heads_engine(dim, classes, opt, total_steps, mesh, hyper=None) -> Engine:
    model = Classifier(None, Head(dim, classes, rngs=nnx.Rngs(0)))
    return Engine({"pooled": model}, trainable(()), num_classes=classes, opt_config=opt, total_steps=total_steps,
                  mesh=mesh, seed=0, hyper=None if hyper is None else {"pooled": hyper})  # fmt: skip


def bench_sweep(args, mesh) -> tuple[list[tuple[str, float, int]], float]:
    n_eval = 1000
    x, y = synthetic(args.n_train + 2 * n_eval, args.dim, args.classes)
    train, val = x[: args.n_train], x[args.n_train : -n_eval]
    train_y, val_y = y[: args.n_train], y[args.n_train : -n_eval]
    side = int(np.sqrt(args.heads))
    lrs, wds = np.logspace(-4, -1, side).tolist(), np.logspace(-5, -1, args.heads // side).tolist()
    grid = {"learning_rate": [lr for lr in lrs for _ in wds], "weight_decay": [wd for _ in lrs for wd in wds]}
    opt = default_config().optimizer
    steps = args.n_train // args.batch * args.epochs
    many = _heads_engine(args.dim, args.classes, opt, steps, mesh, grid)
    one = _heads_engine(args.dim, args.classes, opt, steps, mesh)
    many_s = engine_seconds(many, FeatureBatches(train, train_y, batch_size=args.batch, seed=0), steps)
    one_s = engine_seconds(one, FeatureBatches(train, train_y, batch_size=args.batch, seed=0), steps)
    state = many.init_state()
    batches = FeatureBatches(train, train_y, batch_size=args.batch, seed=0)
    for _ in range(steps):
        state, _ = many.train_step(state, next(batches))
    best = float(np.nanmax(many.evaluate(state.params, feature_eval_batches(val, val_y, 256))["pooled"]["accuracy"]))
    heads = len(grid["learning_rate"])
    return [
        (f"engine, {heads} heads", many_s, steps),
        ("engine, 1 head", one_s, steps),
        (f"engine, {heads} heads one by one (extrapolated)", one_s * heads, steps * heads),
    ], best


def bench_modes(args, mesh) -> dict:
    backbone = fxjax.load_backbone("efficientnet-lite0")
    data = load_dataset("digits")
    train = data.splits["train"]
    steps_per_epoch = len(train) // args.online_batch
    opt = default_config().optimizer

    head = Head(backbone.feature_dim, data.num_classes, rngs=nnx.Rngs(0))
    online = Engine(
        {"pooled": Classifier(backbone.module, head)},
        trainable(frozen_patterns("all", backbone.module.stage_paths())),
        num_classes=data.num_classes,
        opt_config=opt,
        total_steps=steps_per_epoch,
        mesh=mesh,
        seed=0,
        compiler_options=backbone.compiler_options,
    )
    images = pipeline.eval_batches(train, backbone.preprocess, batch_size=args.online_batch)
    batches = ({"x": b["x"], "label": b["label"]} for b in itertools.islice(images, args.online_batches + 1))
    online_s = engine_seconds(online, batches, args.online_batches) / args.online_batches * steps_per_epoch

    feats = np.random.default_rng(0).normal(size=(len(train), backbone.feature_dim)).astype(np.float32)
    train_y = np.asarray([train.label(i) for i in range(len(train))], np.int32)
    cached = _heads_engine(backbone.feature_dim, data.num_classes, opt, steps_per_epoch, mesh)
    cached_s = engine_seconds(
        cached, FeatureBatches(feats, train_y, batch_size=args.online_batch, seed=0), steps_per_epoch
    )
    return {
        "n": len(train),
        "steps": steps_per_epoch,
        "online_s": online_s,
        "cached_s": cached_s,
        "size": backbone.preprocess.size,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-train", type=int, default=20000)
    parser.add_argument("--dim", type=int, default=1280)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--heads", type=int, default=64)
    parser.add_argument("--online-batch", type=int, default=64)
    parser.add_argument("--online-batches", type=int, default=3)
    args = parser.parse_args()
    mesh = parallel.make_mesh()

    rows, best_acc = bench_sweep(args, mesh)
    modes = bench_modes(args, mesh)
    peak, bandwidth = fma_peak_flops_per_second(), copy_bytes_per_second()

    print(
        f"jax {jax.__version__} on {len(jax.devices())} {jax.devices()[0].platform} device(s), "
        f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the end\n"
    )
    print(
        f"(a) linear heads: n={args.n_train}, d={args.dim}, {args.classes} classes, batch {args.batch}, "
        f"{args.epochs} epochs; training loop only (compilation excluded). Best val accuracy "
        f"{best_acc:.3f}.\n"
    )
    print("| run | steps | seconds | ms / step | time vs 1 head | per head vs 1 head |")
    print("|---|---:|---:|---:|---:|---:|")
    base = rows[1][1]
    for (name, seconds, steps), heads in zip(rows, (args.heads, 1, args.heads)):
        print(
            f"| {name} | {steps} | {seconds:.2f} | {seconds / steps * 1e3:.2f} | {seconds / base:.2f}x | "
            f"{seconds / heads / base:.3f}x |"
        )
    if peak:
        # What no implementation can beat on this machine: per step, the forward and the weight-gradient
        # matmuls of every head (2 x 2·b·d·c·H FLOPs) at the FMA peak, plus reading and writing each head's
        # parameters and two Adam moments once (6 x 4 bytes per weight) at the copy bandwidth; on top of the
        # one-head engine's own time (feeding the batches, which 64 heads need just the same).
        steps, weights = rows[0][2], args.heads * (args.dim + 1) * args.classes
        flops = steps * 2 * 2 * args.batch * args.dim * args.classes * args.heads
        floor = flops / peak + steps * 6 * 4 * weights / bandwidth
        print(
            f"\nFloor for {args.heads} heads here: {flops / 1e9:.0f} GFLOP at the fp32 FMA peak "
            f"({peak / 1e9:.0f} GFLOP/s) + optimizer-state traffic at {bandwidth / 1e9:.0f} GB/s = "
            f"{floor:.2f} s on top of the one-head engine's {base:.2f} s: at best "
            f"{(floor + base) / base:.2f}x one head."
        )
    ratio = modes["online_s"] / modes["cached_s"]
    print(
        f"\n(b) one epoch on digits (train split, n={modes['n']}, {modes['steps']} steps of "
        f"{args.online_batch}), efficientnet-lite0 at {modes['size'][0]} px, one linear head. Online: "
        f"{args.online_batches} timed batches extrapolated to the epoch, data loading excluded.\n"
    )
    print("| mode | epoch seconds | ms / step | online / cached |")
    print("|---|---:|---:|---:|")
    print(f"| cached (head on features) | {modes['cached_s']:.3f} | {modes['cached_s'] / modes['steps'] * 1e3:.2f} | |")
    print(
        f"| online (backbone forward + head step) | {modes['online_s']:.1f} | "
        f"{modes['online_s'] / modes['steps'] * 1e3:.0f} | {ratio:.0f}x |"
    )


if __name__ == "__main__":
    main()
