"""Classic evaluation probes on fixed feature matrices: ridge, L-BFGS logistic regression, kNN, few-shot.

Features are computed once by a frozen backbone, so every probe here is a pure function of arrays
(`x` float `[n, d]`, integer labels `y` `[n]`) built to make hyper-parameter sweeps nearly free:
ridge solves every regularisation strength from one eigendecomposition, logistic regression reuses one
compiled L-BFGS solver for every C with warm starts, kNN computes the neighbours once for every k.

Across devices (`mesh=`): the rows are laid out over every axis of the mesh so no device holds them all. kNN
keeps its bank sharded and merges each shard's top-k; logistic regression sums loss and gradient over the row
shards (XLA all-reduces the sum) while the solver state stays replicated; ridge accumulates X^T X and X^T Y over
chunks (`ridge_fit_chunks` takes an iterator, so the rows need not exist as one array). Each equals its
one-device result: kNN exactly (same ties), logistic and ridge to float32 rounding.

Selection protocol (CLIP / CLIP_benchmark): the hyper-parameter is chosen on validation accuracy only; the
table also lists test accuracy for every row for reporting, but selection never reads it.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterable, Sequence
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from fxjax.parallel import mesh as mesh_lib

DEFAULT_LAMBDAS = tuple(2.0 ** np.arange(-10, 20))  # big_vision's few-shot grid
DEFAULT_CS = tuple(np.logspace(-6, 6, 13))
DINOV2_KS = (10, 20, 100, 200)  # DINOv2's kNN evaluation, at temperature 0.07


class Splits(NamedTuple):
    """A probe's inputs, (features [n, d], labels [n]) per split; with a mesh the features may be lazy arrays."""

    train: tuple[Any, Any]
    val: tuple[Any, Any]
    test: tuple[Any, Any]


@dataclasses.dataclass
class ProbeResult:
    """One probe's outcome: the chosen hyper-parameter, its accuracies and the whole sweep."""

    name: str  # "ridge", "logistic", "knn"
    param: str  # name of the swept hyper-parameter: "lambda", "C", "k"
    best: float  # its chosen value
    val_accuracy: float
    test_accuracy: float
    table: list[dict[str, float]]  # one row per hyper-parameter value, in sweep order

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------- validation


def _is_lazy(x: Any) -> bool:
    """An array read by rows on demand (a memory map or a cache entry's chunked array), kept as it is."""
    return hasattr(x, "shape") and hasattr(x, "ndim") and hasattr(x, "__getitem__") and not isinstance(x, jax.Array)


def _check_xy(x: Any, y: Any, num_classes: int, what: str, lazy: bool = False) -> tuple[Any, np.ndarray]:
    """Checked features and labels; `lazy` keeps a lazy feature array unread (mesh paths read it by chunks)."""
    x = x if lazy and _is_lazy(x) else np.asarray(x)
    y = np.asarray(y)
    if x.ndim != 2:
        raise ValueError(f"{what}: features must be [n, d], got shape {x.shape}")
    if y.ndim != 1 or y.shape[0] != x.shape[0]:
        raise ValueError(f"{what}: labels must be [{x.shape[0]}] to match features {x.shape}, got {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"{what}: labels must be integers, got dtype {y.dtype}")
    if y.size:
        bad = y[(y < 0) | (y >= num_classes)]
        if bad.size:
            raise ValueError(f"{what}: label {int(bad[0])} outside [0, {num_classes})")
    return x, y


def _check_splits(num_classes: int, lazy: bool = False, **splits: tuple[Any, Any]) -> dict[str, tuple[Any, np.ndarray]]:
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    out = {name: _check_xy(x, y, num_classes, name, lazy) for name, (x, y) in splits.items()}
    dims = {name: x.shape[1] for name, (x, _) in out.items()}
    if len(set(dims.values())) > 1:
        raise ValueError(f"feature dimensions differ between splits: {dims}")
    return out


def _accuracy(pred: Any, y: np.ndarray) -> float:
    return float(np.mean(np.asarray(pred) == y)) if y.size else float("nan")


def _select(rows: list[dict[str, float]], prefer: Literal["first", "last"]) -> dict[str, float]:
    """Row with the best val accuracy; ties go to the first or last row (callers order by regularisation)."""
    acc = np.array([r["val_accuracy"] for r in rows])
    hits = np.flatnonzero(acc == acc.max())
    return rows[hits[0] if prefer == "first" else hits[-1]]


# ---------------------------------------------------------------------------------------------- rows on a mesh


def _row_axes(mesh: Mesh) -> tuple[str, ...]:
    return tuple(mesh.axis_names)  # rows split over every device of the mesh


def _shard_rows(x: Any, mesh: Mesh, transform: Any = None) -> jax.Array:
    """Rows zero-padded to a multiple of the mesh size, laid out over every mesh axis, each process reading
    only its own devices' rows chunk by chunk (`parallel.rows_on_mesh`): multi-host safe as long as every
    process can index `x` (a numpy array, a memory map, a cache entry's chunked array)."""
    return mesh_lib.rows_on_mesh(x, mesh, transform=transform)


def _chunks(x: Any, chunk: int = mesh_lib.ROW_CHUNK):
    """Rows of a (lazy) array as in-memory chunks, in order."""
    for start in range(0, len(x), chunk):
        yield np.asarray(x[start : start + chunk])


def _predict(predict: Any, x: Any) -> np.ndarray:
    """`predict` over a (lazy) array chunk by chunk; predictions are concatenated along their last axis."""
    parts = [predict(rows) for rows in _chunks(x)]
    return np.concatenate(parts, axis=-1) if parts else predict(np.zeros((0, *x.shape[1:]), np.float32))


# ---------------------------------------------------------------------------------------------- ridge


class RidgeFit(NamedTuple):
    lambdas: np.ndarray  # [L]
    weights: np.ndarray  # [L, d, c]
    bias: np.ndarray  # [L, c]

    def predict(self, x: Any) -> np.ndarray:
        """Class predictions for every lambda: [L, n]."""
        scores = np.asarray(x, np.float64) @ self.weights + self.bias[:, None]  # [L, n, c]
        return scores.argmax(-1)


def _check_lambdas(lambdas: Sequence[float]) -> np.ndarray:
    lambdas = np.asarray(lambdas, np.float64).reshape(-1)
    if lambdas.size == 0 or np.any(lambdas <= 0):
        raise ValueError(f"lambdas must be a non-empty list of positive numbers, got {lambdas}")
    return lambdas


def _ridge_from_gram(
    gram: np.ndarray, cross: np.ndarray, x_mean: np.ndarray, t_mean: np.ndarray, lambdas: np.ndarray
) -> RidgeFit:
    """Every lambda's solution from the centred Gram Xc^T Xc [d, d] and cross term Xc^T Tc [d, c]."""
    evals, evecs = np.linalg.eigh(gram)  # [d], [d, d]
    proj = evecs.T @ cross  # [d, c]
    scale = 1.0 / (np.maximum(evals, 0.0)[None, :] + lambdas[:, None])  # [L, d]
    weights = evecs @ (scale[:, :, None] * proj)  # [d, d] @ [L, d, c] -> [L, d, c]
    bias = t_mean[None, :] - x_mean @ weights  # [L, c]
    return RidgeFit(lambdas, weights, bias)


def ridge_fit(
    x: Any, y: Any, num_classes: int, lambdas: Sequence[float] = DEFAULT_LAMBDAS, mesh: Mesh | None = None
) -> RidgeFit:
    """Ridge regression onto one-hot targets for every lambda from one decomposition (big_vision few-shot).

    Targets are 0/1 one-hot (big_vision's ±1 targets give the same predictions: after centring they only
    scale W by 2). The bias is unpenalised: x and targets are centred with the training means. Computed in
    numpy float64: the matrices are small and the closed form is exact to the tolerance of the tests.
    Uses eigh(Xc^T Xc) when n >= d (O(n d^2 + d^3)) and the thin SVD of Xc when n < d (O(n^2 d)).
    With `mesh`, the Gram matrix is summed over row shards on the devices (`ridge_fit_chunks`).
    """
    if mesh is not None:
        x, y = _check_xy(x, y, num_classes, "train", lazy=True)
        return ridge_fit_chunks(zip(_chunks(x), _chunks(y)), num_classes, lambdas, mesh=mesh)
    x, y = _check_xy(x, y, num_classes, "train")
    lambdas = _check_lambdas(lambdas)
    x = x.astype(np.float64)
    t = np.eye(num_classes)[y]  # [n, c]
    x_mean, t_mean = x.mean(0), t.mean(0)
    xc, tc = x - x_mean, t - t_mean
    n, d = x.shape
    if n >= d:
        return _ridge_from_gram(xc.T @ xc, xc.T @ tc, x_mean, t_mean, lambdas)
    u, s, vt = np.linalg.svd(xc, full_matrices=False)  # [n, n], [n], [n, d]
    scale = s[None, :] / (s[None, :] ** 2 + lambdas[:, None])  # [L, n]
    weights = vt.T @ (scale[:, :, None] * (u.T @ tc))  # [d, n] @ [L, n, c] -> [L, d, c]
    bias = t_mean[None, :] - x_mean @ weights  # [L, c]
    return RidgeFit(lambdas, weights, bias)


@jax.jit
def _moments(x: jax.Array, t: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """sum x, sum t, X^T X, X^T T of one chunk; on row-sharded inputs XLA all-reduces each sum over the shards."""
    hi = jax.lax.Precision.HIGHEST
    return x.sum(0), t.sum(0), jnp.dot(x.T, x, precision=hi), jnp.dot(x.T, t, precision=hi)


def ridge_fit_chunks(
    chunks: Iterable[tuple[Any, Any]],
    num_classes: int,
    lambdas: Sequence[float] = DEFAULT_LAMBDAS,
    mesh: Mesh | None = None,
) -> RidgeFit:
    """`ridge_fit` from (features [b, d], labels [b]) chunks: only [d, d] sums are kept, never the rows.

    Sums are taken about the first chunk's mean (a shift close to the mean keeps X^T X - n m m^T from
    cancelling) and accumulated in float64. Without `mesh` each chunk's sums are numpy float64; with it
    each chunk's rows are laid out over the mesh and summed on the devices in float32, one [d, d] all-reduce
    per chunk, so a chunk may be larger than one device holds.
    """
    lambdas = _check_lambdas(lambdas)
    n, shift, sums = 0, None, None
    for i, (x, y) in enumerate(chunks):
        x, y = _check_xy(x, y, num_classes, f"train chunk {i}")
        if shift is None:
            shift = x.mean(0, dtype=np.float64)
        elif x.shape[1] != shift.shape[0]:
            raise ValueError(f"train chunk {i} has {x.shape[1]} features, the first chunk had {shift.shape[0]}")
        xs = x.astype(np.float64) - shift  # [b, d]
        t = np.eye(num_classes)[y]  # [b, c]
        if mesh is None:
            part = (xs.sum(0), t.sum(0), xs.T @ xs, xs.T @ t)
        else:  # zero padding rows add nothing to any sum
            part = _moments(_shard_rows(xs.astype(np.float32), mesh), _shard_rows(t.astype(np.float32), mesh))
        part = [np.asarray(p, np.float64) for p in part]
        sums = part if sums is None else [a + b for a, b in zip(sums, part, strict=True)]
        n += x.shape[0]
    if not n:
        raise ValueError("ridge_fit_chunks: the chunks hold no rows; pass at least one non-empty (x, y) chunk")
    sum_x, sum_t, xx, xt = sums
    m, t_mean = sum_x / n, sum_t / n  # m: mean of the shifted features
    gram = xx - n * np.outer(m, m)  # Xc^T Xc
    cross = xt - n * np.outer(m, t_mean)  # Xc^T Tc
    return _ridge_from_gram(gram, cross, shift + m, t_mean, lambdas)


def ridge_probe(
    splits: Splits,
    num_classes: int,
    lambdas: Sequence[float] = DEFAULT_LAMBDAS,
    mesh: Mesh | None = None,
) -> ProbeResult:
    """Sweep every lambda in one fit; choose on val accuracy (ties: the strongest regularisation). With `mesh`
    the splits may be lazy arrays: they are read chunk by chunk."""
    s = _check_splits(num_classes, mesh is not None, **splits._asdict())
    fit = ridge_fit(*s["train"], num_classes, lambdas, mesh=mesh)
    preds = {name: _predict(fit.predict, x) for name, (x, _) in s.items()}  # each [L, n]
    rows = [
        {
            "lambda": float(lam),
            **{f"{name}_accuracy": _accuracy(preds[name][i], s[name][1]) for name in ("train", "val", "test")},
        }
        for i, lam in enumerate(fit.lambdas)
    ]
    order = np.argsort(fit.lambdas, kind="stable")
    best = _select([rows[i] for i in order], prefer="last")
    return ProbeResult("ridge", "lambda", best["lambda"], best["val_accuracy"], best["test_accuracy"], rows)


# ---------------------------------------------------------------------------------------------- logistic


class LogisticFit(NamedTuple):
    weights: np.ndarray  # [d, c], applies to the raw (unstandardised) features
    bias: np.ndarray  # [c]
    objective: float  # mean CE + ||W||^2 / (2 C n), on the features the solver saw
    iterations: int
    grad_norm: float  # max |gradient| at the end (scipy's pgtol convention)

    def predict(self, x: Any) -> np.ndarray:
        return (np.asarray(x) @ self.weights + self.bias).argmax(-1)


def _objective(
    params: dict[str, jax.Array], x: jax.Array, onehot: jax.Array, weight: jax.Array | None, inv_c: jax.Array
) -> jax.Array:
    """sklearn's objective over n: mean CE + ||W||^2 / (2 C n); same minimiser, intercept unpenalised.

    `weight` [n] is 1 for real rows and 0 for the padding that makes rows divide over a mesh (None: no padding).
    """
    logits = x @ params["w"] + params["b"]  # [n, c]
    ce_rows = jax.nn.logsumexp(logits, -1) - jnp.sum(logits * onehot, -1)  # [n]
    if weight is None:
        n, ce = x.shape[0], jnp.mean(ce_rows)
    else:  # a sum over sharded rows: XLA sums each shard, then all-reduces
        n = jnp.sum(weight)
        ce = jnp.sum(weight * ce_rows) / n
    return ce + 0.5 * inv_c / n * jnp.sum(params["w"] ** 2)


@jax.jit(static_argnames=("replicate",))
def _lbfgs_solve(
    params: dict[str, jax.Array],
    x: jax.Array,
    onehot: jax.Array,
    weight: jax.Array | None,
    c: jax.Array,
    max_iter: jax.Array,
    tol: jax.Array,
    replicate: NamedSharding | None = None,
) -> tuple[dict[str, jax.Array], jax.Array, jax.Array, jax.Array]:
    """Minimise `_objective` from `params`; C, max_iter and tol are traced so one compile serves a sweep.

    Stops when max |grad| <= tol (scipy's criterion, as sklearn uses it), after max_iter iterations, or when
    an iteration fails to decrease the objective at all (float32 has reached its resolution). `replicate`
    (rows sharded over a mesh) pins the parameters and the whole L-BFGS state to every device, so only the
    [n]-sized work is split and each step's loss and gradient are all-reduced.
    """
    inv_c = 1.0 / c

    def fun(p: dict[str, jax.Array]) -> jax.Array:
        return _objective(p, x, onehot, weight, inv_c)

    def pin(tree: Any) -> Any:
        return tree if replicate is None else jax.lax.with_sharding_constraint(tree, replicate)

    def grad_max(g: dict[str, jax.Array]) -> jax.Array:
        return optax.tree.max(jax.tree.map(jnp.abs, g))

    opt = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(fun)

    def step(carry):
        params, state, _, _ = carry
        value, grad = value_and_grad(params, state=state)
        updates, state = opt.update(grad, state, params, value=value, grad=grad, value_fn=fun)
        params, state = pin((optax.apply_updates(params, updates), state))
        # The linesearch stored value and gradient at the new params; the next step reuses them.
        decrease = value - optax.tree.get(state, "value")
        return params, state, decrease, grad_max(optax.tree.get(state, "grad"))

    def keep_going(carry):
        _, state, decrease, gmax = carry
        return (optax.tree.get(state, "count") < max_iter) & (gmax > tol) & (decrease > 0)

    _, grad0 = jax.value_and_grad(fun)(params)
    carry = (*pin((params, opt.init(params))), jnp.asarray(jnp.inf, x.dtype), grad_max(grad0))
    params, state, _, gmax = jax.lax.while_loop(keep_going, step, carry)
    return params, fun(params), optax.tree.get(state, "count"), gmax


class _SolverInputs(NamedTuple):
    xs: jax.Array  # [n, d] float32, standardised if asked; rows sharded (and zero-padded) on a mesh
    onehot: jax.Array  # [n, c]
    weight: jax.Array | None  # [n] 1 real / 0 padding on a mesh, else None
    mean: np.ndarray  # [d] the standardisation, folded back into the returned weights
    std: np.ndarray  # [d]
    replicate: NamedSharding | None  # where parameters and solver state live on a mesh


def _column_stats(x: Any) -> tuple[np.ndarray, np.ndarray]:
    """Per-column mean and std in the features' dtype: numpy's on an in-memory array, two float64 passes of
    chunks on a lazy one (equal up to rounding)."""
    if type(x) is np.ndarray:
        return x.mean(0), x.std(0)
    mean = sum(rows.sum(0, dtype=np.float64) for rows in _chunks(x)) / len(x)
    std = np.sqrt(sum(((rows - mean) ** 2).sum(0) for rows in _chunks(x)) / len(x))
    return mean.astype(x.dtype), std.astype(x.dtype)


def _solver_inputs(
    x: Any, y: np.ndarray, num_classes: int, standardize: bool, mesh: Mesh | None = None
) -> _SolverInputs:
    """float32 device features (standardised with train stats if asked), one-hot targets, and the stats; on
    a mesh `x` may be lazy, read chunk by chunk."""
    mean, std = np.zeros(x.shape[1]), np.ones(x.shape[1])
    if standardize:
        mean, std = _column_stats(x)
        std = np.where(std > 0, std, 1.0)
    if mesh is None:
        xs = jnp.asarray((x - mean) / std, jnp.float32)  # [n, d]
        return _SolverInputs(xs, jax.nn.one_hot(y, num_classes, dtype=xs.dtype), None, mean, std, None)
    xs = _shard_rows(x, mesh, lambda rows: ((rows - mean) / std).astype(np.float32))
    onehot = _shard_rows(y, mesh, lambda labels: np.eye(num_classes, dtype=np.float32)[labels])
    weight = _shard_rows(y, mesh, lambda labels: np.ones(len(labels), np.float32))
    return _SolverInputs(xs, onehot, weight, mean, std, NamedSharding(mesh, P()))


def _logistic_solve(
    inputs: _SolverInputs, c: float, init: dict[str, jax.Array], max_iter: int, tol: float
) -> tuple[LogisticFit, dict[str, jax.Array]]:
    """One solve; returns the fit on raw features and the solver-space params (to warm-start the next C)."""
    f32 = inputs.xs.dtype
    params, value, count, gmax = _lbfgs_solve(
        init,
        inputs.xs,
        inputs.onehot,
        inputs.weight,
        jnp.asarray(c, f32),
        jnp.asarray(max_iter),
        jnp.asarray(tol, f32),
        replicate=inputs.replicate,
    )
    # Fold the standardisation into the weights so the fit applies to raw features.
    w = np.asarray(params["w"], np.float64) / inputs.std[:, None]  # [d, c]
    b = np.asarray(params["b"], np.float64) - inputs.mean @ w  # [c]
    return LogisticFit(w, b, float(value), int(count), float(gmax)), params


def _zeros(d: int, c: int, replicate: NamedSharding | None = None) -> dict[str, jax.Array]:
    params = {"w": jnp.zeros((d, c), jnp.float32), "b": jnp.zeros((c,), jnp.float32)}
    return params if replicate is None else jax.device_put(params, replicate)


def logistic_fit(
    x: Any,
    y: Any,
    num_classes: int,
    C: float = 1.0,  # sklearn's name
    max_iter: int = 1000,
    tol: float = 1e-6,
    standardize: bool = False,
    mesh: Mesh | None = None,
) -> LogisticFit:
    """Multinomial logistic regression by L-BFGS, matching `sklearn LogisticRegression(C=C, solver="lbfgs")`.

    Minimises mean CE + ||W||^2 / (2 C n) (sklearn's sum CE + ||W||^2 / (2C) divided by n; the intercept is
    not penalised). `tol` bounds max |gradient| of that objective, as sklearn's `tol` does. `standardize`
    uses train mean/std; the penalty then acts on the standardised weights, but the returned weights are
    folded back to apply to raw features. With `mesh`, rows are sharded over its devices (see `_lbfgs_solve`).
    """
    x, y = _check_xy(x, y, num_classes, "train", lazy=mesh is not None)
    if not C > 0:
        raise ValueError(f"C must be positive, got {C}")
    inputs = _solver_inputs(x, y, num_classes, standardize, mesh)
    fit, _ = _logistic_solve(inputs, C, _zeros(x.shape[1], num_classes, inputs.replicate), max_iter, tol)
    return fit


def logistic_path(
    x: Any,
    y: Any,
    num_classes: int,
    Cs: Sequence[float],  # sklearn's name
    max_iter: int = 1000,
    tol: float = 1e-6,
    standardize: bool = False,
) -> list[LogisticFit]:
    """`logistic_fit` for every C, solved in increasing order with warm starts and one compiled solver;
    fits come back in the order of `Cs`."""
    x, y = _check_xy(x, y, num_classes, "train")
    cs = np.asarray(Cs, np.float64).reshape(-1)
    if cs.size == 0 or np.any(cs <= 0):
        raise ValueError(f"Cs must be a non-empty list of positive numbers, got {Cs}")
    inputs = _solver_inputs(x, y, num_classes, standardize)
    params, fits = _zeros(x.shape[1], num_classes, inputs.replicate), {}
    for i in np.argsort(cs, kind="stable"):
        fits[i], params = _logistic_solve(inputs, float(cs[i]), params, max_iter, tol)
    return [fits[i] for i in range(cs.size)]


def logistic_probe(
    splits: Splits,
    num_classes: int,
    Cs: Sequence[float] = DEFAULT_CS,  # sklearn's name
    max_iter: int = 1000,
    tol: float = 1e-6,
    standardize: bool = False,
    mesh: Mesh | None = None,
) -> ProbeResult:
    """CLIP's linear-probe protocol: sweep C (log-spaced), choose on val accuracy, report test.

    Cs are solved in increasing order, each warm-started from the previous solution (the regularisation
    path), with one compiled solver for the whole sweep. Ties go to the smallest C.
    """
    s = _check_splits(num_classes, mesh is not None, **splits._asdict())
    cs = np.sort(np.asarray(Cs, np.float64).reshape(-1))
    if cs.size == 0 or np.any(cs <= 0):
        raise ValueError(f"Cs must be a non-empty list of positive numbers, got {Cs}")
    inputs = _solver_inputs(*s["train"], num_classes, standardize, mesh)
    params = _zeros(inputs.xs.shape[1], num_classes, inputs.replicate)
    rows = []
    for c in cs:
        fit, params = _logistic_solve(inputs, float(c), params, max_iter, tol)
        rows.append(
            {
                "C": float(c),
                **{f"{name}_accuracy": _accuracy(_predict(fit.predict, sx), sy) for name, (sx, sy) in s.items()},
                "objective": fit.objective,
                "iterations": fit.iterations,
            }
        )
    best = _select(rows, prefer="first")
    return ProbeResult("logistic", "C", best["C"], best["val_accuracy"], best["test_accuracy"], rows)


# ---------------------------------------------------------------------------------------------- kNN


def _normalize(x: jax.Array) -> jax.Array:
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


@jax.jit(static_argnames=("num_classes", "ks"))
def _knn_chunk(
    train_x: jax.Array,
    train_onehot: jax.Array,
    q: jax.Array,
    num_classes: int,
    ks: tuple[int, ...],
    inv_t: jax.Array,
) -> jax.Array:
    """Predictions [len(ks), chunk] from one top-max(ks) search: k's neighbours are a prefix of max(ks)'s."""
    sim = _normalize(q) @ train_x.T  # [chunk, n_train]
    top_sim, top_idx = jax.lax.top_k(sim, max(ks))  # [chunk, kmax]
    votes = jnp.exp(top_sim * inv_t)[..., None] * train_onehot[top_idx]  # [chunk, kmax, c]
    cum = jnp.cumsum(votes, axis=1)  # [chunk, kmax, c]
    return jnp.stack([cum[:, k - 1].argmax(-1) for k in ks])


@jax.jit(static_argnames=("num_classes", "ks", "mesh"))
def _knn_chunk_sharded(
    bank: jax.Array,
    bank_labels: jax.Array,
    q: jax.Array,
    n_bank: jax.Array,
    num_classes: int,
    ks: tuple[int, ...],
    inv_t: jax.Array,
    mesh: Mesh,
) -> jax.Array:
    """`_knn_chunk` over a bank sharded by rows: each shard's top-k, gathered, then one top-k over them.

    Exact: every global top-k neighbour is in its shard's top-k; lax.top_k breaks ties by lower index, the
    shards are gathered in row order, so among equal similarities the merge also prefers the lower global
    row, as one top_k over the whole bank does. Only [chunk, devices * k] candidates cross devices.
    """
    axes = _row_axes(mesh)
    kmax = max(ks)

    def shard_top_k(bank: jax.Array, labels: jax.Array, q: jax.Array) -> tuple[jax.Array, jax.Array]:
        rows = bank.shape[0]  # this shard's [rows, d]
        sim = _normalize(q) @ bank.T  # [chunk, rows]
        first = jax.lax.axis_index(axes) * rows  # global index of this shard's first row
        sim = jnp.where(first + jnp.arange(rows) < n_bank, sim, -jnp.inf)  # padding rows never win
        top_sim, top_idx = jax.lax.top_k(sim, min(kmax, rows))  # [chunk, k_local]
        gather = functools.partial(jax.lax.all_gather, axis_name=axes, axis=1, tiled=True)
        return gather(top_sim), gather(labels[top_idx])  # [chunk, devices * k_local] each

    cand_sim, cand_labels = jax.shard_map(
        shard_top_k, mesh=mesh, in_specs=(P(axes), P(axes), P()), out_specs=(P(), P()), check_vma=False
    )(bank, bank_labels, q)
    top_sim, pos = jax.lax.top_k(cand_sim, kmax)  # [chunk, kmax]
    top_labels = jnp.take_along_axis(cand_labels, pos, axis=1)
    votes = jnp.exp(top_sim * inv_t)[..., None] * jax.nn.one_hot(top_labels, num_classes, dtype=top_sim.dtype)
    cum = jnp.cumsum(votes, axis=1)  # [chunk, kmax, c]
    return jnp.stack([cum[:, k - 1].argmax(-1) for k in ks])


def _knn_predict_many(
    train_x: np.ndarray,
    train_y: np.ndarray,
    query_x: np.ndarray,
    num_classes: int,
    ks: tuple[int, ...],
    temperature: float,
    chunk: int,
    mesh: Mesh | None = None,
) -> np.ndarray:
    if any(k < 1 or k > train_x.shape[0] for k in ks):
        raise ValueError(f"every k must be in [1, {train_x.shape[0]}] (the train size), got {ks}")
    inv_t = jnp.asarray(1.0 / temperature, jnp.float32)
    if mesh is None:
        tx = _normalize(jnp.asarray(train_x, jnp.float32))
        onehot = jax.nn.one_hot(train_y, num_classes, dtype=jnp.float32)

        def search(q: jax.Array) -> jax.Array:
            return _knn_chunk(tx, onehot, q, num_classes, ks, inv_t)
    else:  # the bank stays where it lies: [n / devices, d] per device
        bank = _normalize(_shard_rows(train_x, mesh, lambda rows: rows.astype(np.float32)))
        labels = _shard_rows(np.asarray(train_y, np.int32), mesh)
        n_bank = jnp.asarray(train_x.shape[0], jnp.int32)

        def search(q: jax.Array) -> jax.Array:
            return _knn_chunk_sharded(bank, labels, q, n_bank, num_classes, ks, inv_t, mesh)

    m = query_x.shape[0]
    chunk = max(1, min(chunk, m))
    preds = []
    for i in range(0, m, chunk):  # queries read chunk by chunk, each padded to one shape: one compile
        q = np.zeros((chunk, query_x.shape[1]), np.float32)
        rows = np.asarray(query_x[i : i + chunk])
        q[: len(rows)] = rows
        preds.append(np.asarray(search(jnp.asarray(q)))[:, : len(rows)])
    return np.concatenate(preds, axis=1) if preds else np.zeros((len(ks), 0), np.int64)  # [len(ks), m]


def knn_predict(
    train_x: Any,
    train_y: Any,
    query_x: Any,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk: int = 1024,
    mesh: Mesh | None = None,
) -> np.ndarray:
    """DINO's weighted kNN: cosine similarity on L2-normalised features, top-k votes weighted exp(sim / T).

    Queries go in chunks of `chunk` so memory stays at [chunk, n_train]; with `mesh` the bank is sharded
    over its devices and each holds [n_train / devices, d] and [chunk, n_train / devices] similarities.
    """
    x, y = _check_xy(train_x, train_y, num_classes, "train")
    query_x = np.asarray(query_x)
    if query_x.ndim != 2 or query_x.shape[1] != x.shape[1]:
        raise ValueError(f"query features must be [m, {x.shape[1]}] like train, got {query_x.shape}")
    return _knn_predict_many(x, y, query_x, num_classes, (int(k),), temperature, chunk, mesh)[0]


def knn_probe(
    splits: Splits,
    num_classes: int,
    ks: Sequence[int] = (10, 20),
    temperature: float = 0.07,
    chunk: int = 1024,
    mesh: Mesh | None = None,
) -> ProbeResult:
    """kNN accuracy for every k (DINO reports each; `DINOV2_KS` is DINOv2's set); `best` is chosen on val,
    ties to the first k listed. `mesh` shards the bank (see `knn_predict`); the splits may then be lazy."""
    s = _check_splits(num_classes, mesh is not None, **splits._asdict())
    ks = tuple(int(k) for k in ks)
    if not ks:
        raise ValueError("ks must be non-empty")
    acc = {
        name: [
            _accuracy(p, s[name][1])
            for p in _knn_predict_many(*s["train"], s[name][0], num_classes, ks, temperature, chunk, mesh)
        ]
        for name in ("val", "test")
    }
    rows = [{"k": k, "val_accuracy": acc["val"][i], "test_accuracy": acc["test"][i]} for i, k in enumerate(ks)]
    best = _select(rows, prefer="first")
    return ProbeResult("knn", "k", best["k"], best["val_accuracy"], best["test_accuracy"], rows)


# ---------------------------------------------------------------------------------------------- few-shot


def few_shot_indices(labels: Any, k: int, seed: int) -> np.ndarray:
    """k indices per class, drawn by a seeded numpy Generator: the same seed always gives the same subset.

    Classes are those present in `labels`; the result is sorted by class then drawn order.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be [n], got shape {labels.shape}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    rng = np.random.default_rng(seed)
    out = []
    for cls in np.unique(labels):
        idx = np.flatnonzero(labels == cls)
        if idx.size < k:
            raise ValueError(f"class {cls} has {idx.size} examples, fewer than k={k}")
        out.append(rng.choice(idx, size=k, replace=False))
    return np.concatenate(out)


def few_shot_eval(
    train_x: Any,
    train_y: Any,
    test_x: Any,
    test_y: Any,
    num_classes: int,
    ks: Sequence[int] = (1, 5, 10, 25),
    seeds: Sequence[int] = (0, 1, 2),
    probe: Literal["ridge", "logistic"] = "ridge",
    reg: float = 1.0,
) -> list[dict[str, Any]]:
    """k-shot test accuracy, mean and std (ddof=0) over seeds, one row per k.

    There is no validation split in the few-shot protocol, so the regulariser is fixed: `reg` is the ridge
    lambda or the logistic C. Every class in `train_y` must have at least max(ks) examples.
    """
    s = _check_splits(num_classes, True, train=(train_x, train_y), test=(test_x, test_y))
    (x, y), (tx, ty) = s["train"], s["test"]  # x and tx may be lazy: only the drawn rows, chunks of test
    if probe not in ("ridge", "logistic"):
        raise ValueError(f"probe must be 'ridge' or 'logistic', got {probe!r}")
    rows = []
    for k in ks:
        accs = []
        for seed in seeds:
            idx = few_shot_indices(y, k, seed)
            if probe == "ridge":
                pred = _predict(ridge_fit(x[idx], y[idx], num_classes, [reg]).predict, tx)[0]
            else:
                pred = _predict(logistic_fit(x[idx], y[idx], num_classes, C=reg).predict, tx)
            accs.append(_accuracy(pred, ty))
        rows.append(
            {
                "k": int(k),
                "mean_accuracy": float(np.mean(accs)),
                "std_accuracy": float(np.std(accs)),
                "accuracies": accs,
            }
        )
    return rows
