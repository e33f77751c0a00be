"""Probe speed vs scikit-learn on probe-sized features; prints a markdown table.

    python bench/probes.py [--n-train 10000] [--dim 1280] [--classes 10]
    XLA_FLAGS=--xla_force_host_platform_device_count=8 python bench/probes.py --memory [--bank-sizes ...]

`--memory` reports, for kNN and the logistic solver, the memory one device needs (XLA's compiled
memory_analysis: arguments + outputs + temporaries) against bank size, on one device and with the rows
sharded over every device (`mesh=`). It compiles on abstract shapes, so banks of millions cost no memory here.

Features are synthetic but learnable and not separable (a Gaussian mixture in a 64-d latent space, randomly
projected to `dim` with isotropic noise), so large C does not run to max_iter on a separable problem.
Timings exclude jit compilation, which is reported on its own row (first call, one L-BFGS iteration).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from sklearn.linear_model import LogisticRegression, RidgeClassifier
from threadpoolctl import threadpool_limits

from fxjax.evaluate import probes
from fxjax.parallel import make_mesh


def make_features(n: int, dim: int, classes: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    latent_dim = 64
    centers = rng.normal(size=(classes, latent_dim)) * 0.35
    y = rng.integers(0, classes, size=n)
    z = centers[y] + rng.normal(size=(n, latent_dim))  # [n, latent]
    proj = rng.normal(size=(latent_dim, dim)) / np.sqrt(latent_dim)
    x = z @ proj + 0.5 * rng.normal(size=(n, dim))  # [n, dim]
    return x.astype(np.float32), y


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


# name, seconds, speed-up over sklearn, chosen hyper-parameter, val accuracy, test accuracy
Row = tuple[str, float, float | None, float | None, float | None, float | None]
Splits = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]


def _probe_inputs(splits: Splits) -> tuple[probes.Splits, int]:
    tx, ty, vx, vy, sx, sy, c = splits
    return probes.Splits((tx, ty), (vx, vy), (sx, sy)), c


def _sklearn_sweep(make: Callable[[float], Any], grid: list[float], splits: Splits) -> tuple[float, float, float]:
    """Fit one sklearn model per grid value, choose on val like the probes do: (chosen, val acc, test acc)."""
    tx, ty, vx, vy, sx, sy, _ = splits
    fits = [make(v).fit(tx, ty) for v in grid]
    val = [f.score(vx, vy) for f in fits]
    i = int(np.argmax(val))
    return grid[i], val[i], fits[i].score(sx, sy)


def bench_logistic(args: argparse.Namespace, splits: Splits) -> tuple[list[Row], list[dict[str, float]]]:
    tx, ty, *_, c = splits
    _, compile_s = timed(lambda: probes.logistic_fit(tx, ty, c, C=1.0, max_iter=1))
    ours, ours_s = timed(
        lambda: probes.logistic_probe(*_probe_inputs(splits), Cs=args.cs, max_iter=args.max_iter, tol=args.tol)
    )
    theirs, sk_s = timed(
        lambda: _sklearn_sweep(
            lambda C: LogisticRegression(C=C, solver="lbfgs", max_iter=args.max_iter, tol=args.tol),
            args.cs,
            splits,
        )
    )
    iters = sum(r["iterations"] for r in ours.table)
    return [
        (
            f"logistic, {len(args.cs)} Cs: fxjax L-BFGS (warm-started, {iters} iters)",
            ours_s,
            sk_s / ours_s,
            ours.best,
            ours.val_accuracy,
            ours.test_accuracy,
        ),
        (f"logistic, {len(args.cs)} Cs: sklearn lbfgs", sk_s, None, *theirs),
        ("logistic: fxjax jit compile (first call, 1 iteration)", compile_s, None, None, None, None),
    ], ours.table


def bench_ridge(args: argparse.Namespace, splits: Splits) -> list[Row]:
    probes.ridge_probe(*_probe_inputs(splits), lambdas=args.lambdas)  # warm-up (numpy, nothing to compile)
    ours, ours_s = timed(lambda: probes.ridge_probe(*_probe_inputs(splits), lambdas=args.lambdas))
    theirs, sk_s = timed(lambda: _sklearn_sweep(lambda lam: RidgeClassifier(alpha=lam), args.lambdas, splits))
    return [
        (
            f"ridge, {len(args.lambdas)} lambdas: fxjax one eigh",
            ours_s,
            sk_s / ours_s,
            ours.best,
            ours.val_accuracy,
            ours.test_accuracy,
        ),
        (f"ridge, {len(args.lambdas)} lambdas: sklearn RidgeClassifier", sk_s, None, *theirs),
    ]


def bench_knn(splits: Splits) -> list[Row]:
    probes.knn_probe(*_probe_inputs(splits))  # warm-up: compile
    ours, ours_s = timed(lambda: probes.knn_probe(*_probe_inputs(splits)))
    return [
        (
            "kNN, k in (10, 20), val + test queries",
            ours_s,
            None,
            ours.best,
            ours.val_accuracy,
            ours.test_accuracy,
        )
    ]


def _device_bytes(compiled: Any) -> int:
    """What one device holds while the program runs (per partition when sharded)."""
    m = compiled.memory_analysis()
    return m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes


def _spec(shape: tuple[int, ...], dtype: Any, sharding: Any = None) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)


def _solver_bytes(rows: int, d: int, c: int, rows_sharding: Any, rep: Any) -> int:
    """The L-BFGS solver over [rows, d]: one device when `rows_sharding` is None, else rows sharded."""
    f32, sharded = jnp.float32, rows_sharding is not None
    params = {"w": _spec((d, c), f32, rep), "b": _spec((c,), f32, rep)}
    compiled = probes._lbfgs_solve.lower(
        params,
        _spec((rows, d), f32, rows_sharding),
        _spec((rows, c), f32, rows_sharding),
        _spec((rows,), f32, rows_sharding) if sharded else None,
        f32(1.0),
        jnp.int32(1),
        f32(1e-6),
        replicate=rep,
    ).compile()
    return _device_bytes(compiled)


def bench_memory(args: argparse.Namespace) -> list[tuple[str, int, int, int, int]]:
    """(probe, bank rows, devices, bytes on one device, bytes per device sharded) for every bank size."""
    mesh = make_mesh()
    devices, axes = mesh.devices.size, tuple(mesh.axis_names)
    rows_sharding, rep = NamedSharding(mesh, P(axes)), NamedSharding(mesh, P())
    d, c, chunk, f32 = args.dim, args.classes, args.knn_chunk, jnp.float32
    ks, inv_t = probes.DINOV2_KS, jnp.float32(1 / 0.07)
    out = []
    for n in args.bank_sizes:
        padded = -(-n // devices) * devices
        one = probes._knn_chunk.lower(
            _spec((n, d), f32), _spec((n, c), f32), _spec((chunk, d), f32), num_classes=c, ks=ks, inv_t=inv_t
        ).compile()
        many = probes._knn_chunk_sharded.lower(
            _spec((padded, d), f32, rows_sharding),
            _spec((padded,), jnp.int32, rows_sharding),
            _spec((chunk, d), f32, rep),
            jnp.int32(n),
            num_classes=c,
            ks=ks,
            inv_t=inv_t,
            mesh=mesh,
        ).compile()
        out.append((f"kNN (chunk {chunk}, k up to {max(ks)})", n, devices, _device_bytes(one), _device_bytes(many)))
        one_solver = _solver_bytes(n, d, c, None, None)
        out.append(("logistic L-BFGS", n, devices, one_solver, _solver_bytes(padded, d, c, rows_sharding, rep)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-train", type=int, default=10000)
    parser.add_argument("--n-eval", type=int, default=2000, help="size of val and of test")
    parser.add_argument("--dim", type=int, default=1280)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--cs", type=float, nargs="+", default=list(np.logspace(-6, 6, 13)))
    parser.add_argument("--lambdas", type=float, nargs="+", default=list(np.logspace(-3, 6, 10)))
    parser.add_argument("--max-iter", type=int, default=1000)
    parser.add_argument("--tol", type=float, default=1e-6)
    parser.add_argument(
        "--probes", nargs="+", choices=("logistic", "ridge", "knn"), default=["logistic", "ridge", "knn"]
    )
    parser.add_argument("--blas-threads", type=int, default=None, help="cap numpy/scipy BLAS threads (both libraries)")
    parser.add_argument("--memory", action="store_true", help="only the memory-per-device table (see above)")
    parser.add_argument("--bank-sizes", type=int, nargs="+", default=[100_000, 1_000_000, 10_000_000])
    parser.add_argument("--knn-chunk", type=int, default=1024, help="queries per kNN step")
    args = parser.parse_args()

    if args.memory:
        kind = jax.devices()[0].device_kind
        print(f"dim={args.dim}, classes={args.classes}, devices={jax.device_count()} x {kind}\n")
        print("| probe | bank rows | devices | MiB on one device | MiB per device, sharded |")
        print("|---|---:|---:|---:|---:|")
        for name, n, devices, one, many in bench_memory(args):
            print(f"| {name} | {n:,} | {devices} | {one / 2**20:,.1f} | {many / 2**20:,.1f} |")
        return

    n, m, c = args.n_train, args.n_eval, args.classes
    x, y = make_features(n + 2 * m, args.dim, c)
    x = (x - x[:n].mean(0)) / x[:n].std(0)  # standardised once, for both libraries
    splits = (x[:n], y[:n], x[n : n + m], y[n : n + m], x[n + m :], y[n + m :], c)
    rows, sweep = [], []
    with threadpool_limits(args.blas_threads):
        if "logistic" in args.probes:
            logistic_rows, sweep = bench_logistic(args, splits)
            rows += logistic_rows
        if "ridge" in args.probes:
            rows += bench_ridge(args, splits)
        if "knn" in args.probes:
            rows += bench_knn(splits)

    print(
        f"n_train={n}, n_val=n_test={m}, dim={args.dim}, classes={c}, max_iter={args.max_iter}, "
        f"tol={args.tol}, blas_threads={args.blas_threads}, device={jax.devices()[0].device_kind}\n"
    )
    print("| probe | seconds | speed-up vs sklearn | chosen | val acc | test acc |")
    print("|---|---:|---:|---:|---:|---:|")
    formats = (".2f", ".1f", "g", ".4f", ".4f")
    for name, *values in rows:
        print(f"| {name} | " + " | ".join("" if v is None else f"{v:{f}}" for v, f in zip(values, formats)) + " |")
    if sweep:
        print("\nfxjax logistic sweep:\n\n| C | val acc | test acc | iterations | objective |")
        print("|---:|---:|---:|---:|---:|")
        for r in sweep:
            print(
                f"| {r['C']:g} | {r['val_accuracy']:.4f} | {r['test_accuracy']:.4f} | {r['iterations']} | "
                f"{r['objective']:.6g} |"
            )


if __name__ == "__main__":
    main()
