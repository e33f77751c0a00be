"""Probe speed vs scikit-learn on probe-sized features; prints a markdown table.

    python bench/probes.py [--n-train 10000] [--dim 1280] [--classes 10]

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
import numpy as np
from sklearn.linear_model import LogisticRegression, RidgeClassifier

from fxjax import probes


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
    args = parser.parse_args()

    n, m, c = args.n_train, args.n_eval, args.classes
    x, y = make_features(n + 2 * m, args.dim, c)
    mean, std = x[:n].mean(0), x[:n].std(0)
    x = (x - mean) / std  # standardised once, for both libraries
    (tx, ty), (vx, vy), (sx, sy) = (x[:n], y[:n]), (x[n : n + m], y[n : n + m]), (x[n + m :], y[n + m :])
    splits = (tx, ty, vx, vy, sx, sy, c)
    rows = []

    _, compile_s = timed(lambda: probes.logistic_fit(tx, ty, c, C=1.0, max_iter=1))
    ours, ours_s = timed(
        lambda: probes.logistic_probe(*splits, Cs=args.cs, max_iter=args.max_iter, tol=args.tol)
    )

    def sklearn_sweep() -> tuple[float, float, float]:
        fits = [
            LogisticRegression(C=C, solver="lbfgs", max_iter=args.max_iter, tol=args.tol).fit(tx, ty)
            for C in args.cs
        ]
        val = [f.score(vx, vy) for f in fits]
        i = int(np.argmax(val))
        return args.cs[i], val[i], fits[i].score(sx, sy)

    (sk_c, sk_val, sk_test), sk_s = timed(sklearn_sweep)
    iters = sum(r["iterations"] for r in ours.table)
    rows.append(
        (
            f"logistic, {len(args.cs)} Cs: fxjax L-BFGS (warm-started, {iters} iters)",
            ours_s,
            ours.best,
            ours.val_accuracy,
            ours.test_accuracy,
        )
    )
    rows.append((f"logistic, {len(args.cs)} Cs: sklearn lbfgs", sk_s, sk_c, sk_val, sk_test))
    rows.append(("logistic: fxjax jit compile (first call)", compile_s, None, None, None))

    probes.ridge_probe(*splits, lambdas=args.lambdas)  # warm-up (numpy, nothing to compile)
    ridge, ridge_s = timed(lambda: probes.ridge_probe(*splits, lambdas=args.lambdas))

    def sklearn_ridge() -> tuple[float, float, float]:
        fits = [RidgeClassifier(alpha=lam).fit(tx, ty) for lam in args.lambdas]
        val = [f.score(vx, vy) for f in fits]
        i = int(np.argmax(val))
        return args.lambdas[i], val[i], fits[i].score(sx, sy)

    (skr_lam, skr_val, skr_test), skr_s = timed(sklearn_ridge)
    rows.append(
        (
            f"ridge, {len(args.lambdas)} lambdas: fxjax one eigh",
            ridge_s,
            ridge.best,
            ridge.val_accuracy,
            ridge.test_accuracy,
        )
    )
    rows.append(
        (f"ridge, {len(args.lambdas)} lambdas: sklearn RidgeClassifier", skr_s, skr_lam, skr_val, skr_test)
    )

    probes.knn_probe(*splits)  # warm-up: compile
    knn, knn_s = timed(lambda: probes.knn_probe(*splits))
    rows.append(
        ("kNN, k in (10, 20), val + test queries", knn_s, knn.best, knn.val_accuracy, knn.test_accuracy)
    )

    print(
        f"n_train={n}, n_val=n_test={m}, dim={args.dim}, classes={c}, max_iter={args.max_iter}, "
        f"tol={args.tol}, device={jax.devices()[0].device_kind}\n"
    )
    print("| probe | seconds | chosen | val acc | test acc |")
    print("|---|---:|---:|---:|---:|")
    for name, sec, best, val, test in rows:
        cells = [
            f"{best:g}" if best is not None else "",
            f"{val:.4f}" if val is not None else "",
            f"{test:.4f}" if test is not None else "",
        ]
        print(f"| {name} | {sec:.2f} | " + " | ".join(cells) + " |")
    print(f"\nlogistic speed-up vs sklearn: {sk_s / ours_s:.1f}x; ridge speed-up: {skr_s / ridge_s:.1f}x")
    print("\nfxjax logistic sweep:\n\n| C | val acc | test acc | iterations | objective |")
    print("|---:|---:|---:|---:|---:|")
    for r in ours.table:
        print(
            f"| {r['C']:g} | {r['val_accuracy']:.4f} | {r['test_accuracy']:.4f} | {r['iterations']} | "
            f"{r['objective']:.6g} |"
        )


if __name__ == "__main__":
    main()
