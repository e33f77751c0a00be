"""Classic evaluation probes on fixed feature matrices: ridge, L-BFGS logistic regression, kNN, few-shot.

Features are computed once by a frozen backbone, so every probe here is a pure function of arrays
(`x` float `[n, d]`, integer labels `y` `[n]`) built to make hyper-parameter sweeps nearly free:
ridge solves every regularisation strength from one eigendecomposition, logistic regression reuses one
compiled L-BFGS solver for every C with warm starts, kNN computes the neighbours once for every k.

Selection protocol (CLIP / CLIP_benchmark): the hyper-parameter is chosen on validation accuracy only; the
table also lists test accuracy for every row for reporting, but selection never reads it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

DEFAULT_LAMBDAS = tuple(2.0 ** np.arange(-10, 20))  # big_vision's few-shot grid
DEFAULT_CS = tuple(np.logspace(-6, 6, 13))


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


def _check_xy(x: Any, y: Any, num_classes: int, what: str) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(x)
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


def _check_splits(num_classes: int, **splits: tuple[Any, Any]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    out = {name: _check_xy(x, y, num_classes, name) for name, (x, y) in splits.items()}
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


# ---------------------------------------------------------------------------------------------- ridge


class RidgeFit(NamedTuple):
    lambdas: np.ndarray  # [L]
    weights: np.ndarray  # [L, d, c]
    bias: np.ndarray  # [L, c]

    def predict(self, x: Any) -> np.ndarray:
        """Class predictions for every lambda: [L, n]."""
        scores = np.asarray(x, np.float64) @ self.weights + self.bias[:, None]  # [L, n, c]
        return scores.argmax(-1)


def ridge_fit(x: Any, y: Any, num_classes: int, lambdas: Sequence[float] = DEFAULT_LAMBDAS) -> RidgeFit:
    """Ridge regression onto one-hot targets for every lambda from one decomposition (big_vision few-shot).

    Targets are 0/1 one-hot (big_vision's ±1 targets give the same predictions: after centring they only
    scale W by 2). The bias is unpenalised: x and targets are centred with the training means. Computed in
    numpy float64: the matrices are small and the closed form is exact to the tolerance of the tests.
    Uses eigh(Xc^T Xc) when n >= d (O(n d^2 + d^3)) and the thin SVD of Xc when n < d (O(n^2 d)).
    """
    x, y = _check_xy(x, y, num_classes, "train")
    lambdas = np.asarray(lambdas, np.float64).reshape(-1)
    if lambdas.size == 0 or np.any(lambdas <= 0):
        raise ValueError(f"lambdas must be a non-empty list of positive numbers, got {lambdas}")
    x = x.astype(np.float64)
    t = np.eye(num_classes)[y]  # [n, c]
    x_mean, t_mean = x.mean(0), t.mean(0)
    xc, tc = x - x_mean, t - t_mean
    n, d = x.shape
    if n >= d:
        evals, evecs = np.linalg.eigh(xc.T @ xc)  # [d], [d, d]
        proj = evecs.T @ (xc.T @ tc)  # [d, c]
        scale = 1.0 / (np.maximum(evals, 0.0)[None, :] + lambdas[:, None])  # [L, d]
    else:
        u, s, vt = np.linalg.svd(xc, full_matrices=False)  # [n, n], [n], [n, d]
        evecs = vt.T  # [d, n]
        proj = u.T @ tc  # [n, c]
        scale = s[None, :] / (s[None, :] ** 2 + lambdas[:, None])  # [L, n]
    weights = evecs @ (scale[:, :, None] * proj)  # [d, k] @ [L, k, c] -> [L, d, c]
    bias = t_mean[None, :] - x_mean @ weights  # [L, c]
    return RidgeFit(lambdas, weights, bias)


def ridge_probe(
    train_x: Any,
    train_y: Any,
    val_x: Any,
    val_y: Any,
    test_x: Any,
    test_y: Any,
    num_classes: int,
    lambdas: Sequence[float] = DEFAULT_LAMBDAS,
) -> ProbeResult:
    """Sweep every lambda in one fit; choose on val accuracy (ties: the strongest regularisation)."""
    s = _check_splits(num_classes, train=(train_x, train_y), val=(val_x, val_y), test=(test_x, test_y))
    fit = ridge_fit(*s["train"], num_classes, lambdas)
    preds = {name: fit.predict(x) for name, (x, _) in s.items()}  # each [L, n]
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


def _objective(params: dict[str, jax.Array], x: jax.Array, onehot: jax.Array, inv_c: jax.Array) -> jax.Array:
    """sklearn's objective over n: mean CE + ||W||^2 / (2 C n); same minimiser, intercept unpenalised."""
    logits = x @ params["w"] + params["b"]  # [n, c]
    ce = jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.sum(logits * onehot, -1))
    return ce + 0.5 * inv_c / x.shape[0] * jnp.sum(params["w"] ** 2)


@jax.jit
def _lbfgs_solve(
    params: dict[str, jax.Array],
    x: jax.Array,
    onehot: jax.Array,
    c: jax.Array,
    max_iter: jax.Array,
    tol: jax.Array,
) -> tuple[dict[str, jax.Array], jax.Array, jax.Array, jax.Array]:
    """Minimise `_objective` from `params`; C, max_iter and tol are traced so one compile serves a sweep.

    Stops when max |grad| <= tol (scipy's criterion, as sklearn uses it), after max_iter iterations, or when
    an iteration fails to decrease the objective at all (float32 has reached its resolution).
    """
    inv_c = 1.0 / c

    def fun(p: dict[str, jax.Array]) -> jax.Array:
        return _objective(p, x, onehot, inv_c)

    def grad_max(g: dict[str, jax.Array]) -> jax.Array:
        return optax.tree.max(jax.tree.map(jnp.abs, g))

    opt = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(fun)

    def step(carry):
        params, state, _, _ = carry
        value, grad = value_and_grad(params, state=state)
        updates, state = opt.update(grad, state, params, value=value, grad=grad, value_fn=fun)
        params = optax.apply_updates(params, updates)
        # The linesearch stored value and gradient at the new params; the next step reuses them.
        decrease = value - optax.tree.get(state, "value")
        return params, state, decrease, grad_max(optax.tree.get(state, "grad"))

    def keep_going(carry):
        _, state, decrease, gmax = carry
        return (optax.tree.get(state, "count") < max_iter) & (gmax > tol) & (decrease > 0)

    _, grad0 = jax.value_and_grad(fun)(params)
    carry = (params, opt.init(params), jnp.asarray(jnp.inf, x.dtype), grad_max(grad0))
    params, state, _, gmax = jax.lax.while_loop(keep_going, step, carry)
    return params, fun(params), optax.tree.get(state, "count"), gmax


def _solver_inputs(
    x: np.ndarray, y: np.ndarray, num_classes: int, standardize: bool
) -> tuple[jax.Array, jax.Array, np.ndarray, np.ndarray]:
    """float32 device features (standardised with train stats if asked), one-hot targets, and the stats."""
    mean, std = np.zeros(x.shape[1]), np.ones(x.shape[1])
    if standardize:
        mean, std = x.mean(0), x.std(0)
        std = np.where(std > 0, std, 1.0)
    xs = jnp.asarray((x - mean) / std, jnp.float32)  # [n, d]
    return xs, jax.nn.one_hot(y, num_classes, dtype=xs.dtype), mean, std


def _logistic_solve(
    xs: jax.Array,
    onehot: jax.Array,
    mean: np.ndarray,
    std: np.ndarray,
    c: float,
    init: dict[str, jax.Array],
    max_iter: int,
    tol: float,
) -> tuple[LogisticFit, dict[str, jax.Array]]:
    """One solve; returns the fit on raw features and the solver-space params (to warm-start the next C)."""
    f32 = xs.dtype
    params, value, count, gmax = _lbfgs_solve(
        init, xs, onehot, jnp.asarray(c, f32), jnp.asarray(max_iter), jnp.asarray(tol, f32)
    )
    # Fold the standardisation into the weights so the fit applies to raw features.
    w = np.asarray(params["w"], np.float64) / std[:, None]  # [d, c]
    b = np.asarray(params["b"], np.float64) - mean @ w  # [c]
    return LogisticFit(w, b, float(value), int(count), float(gmax)), params


def _zeros(d: int, c: int) -> dict[str, jax.Array]:
    return {"w": jnp.zeros((d, c), jnp.float32), "b": jnp.zeros((c,), jnp.float32)}


def logistic_fit(
    x: Any,
    y: Any,
    num_classes: int,
    C: float = 1.0,  # sklearn's name
    max_iter: int = 1000,
    tol: float = 1e-6,
    standardize: bool = False,
) -> LogisticFit:
    """Multinomial logistic regression by L-BFGS, matching `sklearn LogisticRegression(C=C, solver="lbfgs")`.

    Minimises mean CE + ||W||^2 / (2 C n) (sklearn's sum CE + ||W||^2 / (2C) divided by n; the intercept is
    not penalised). `tol` bounds max |gradient| of that objective, as sklearn's `tol` does. `standardize`
    uses train mean/std; the penalty then acts on the standardised weights, but the returned weights are
    folded back to apply to raw features.
    """
    x, y = _check_xy(x, y, num_classes, "train")
    if not C > 0:
        raise ValueError(f"C must be positive, got {C}")
    xs, onehot, mean, std = _solver_inputs(x, y, num_classes, standardize)
    fit, _ = _logistic_solve(xs, onehot, mean, std, C, _zeros(x.shape[1], num_classes), max_iter, tol)
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
    xs, onehot, mean, std = _solver_inputs(x, y, num_classes, standardize)
    params, fits = _zeros(x.shape[1], num_classes), {}
    for i in np.argsort(cs, kind="stable"):
        fits[i], params = _logistic_solve(xs, onehot, mean, std, float(cs[i]), params, max_iter, tol)
    return [fits[i] for i in range(cs.size)]


def logistic_probe(
    train_x: Any,
    train_y: Any,
    val_x: Any,
    val_y: Any,
    test_x: Any,
    test_y: Any,
    num_classes: int,
    Cs: Sequence[float] = DEFAULT_CS,  # sklearn's name
    max_iter: int = 1000,
    tol: float = 1e-6,
    standardize: bool = False,
) -> ProbeResult:
    """CLIP's linear-probe protocol: sweep C (log-spaced), choose on val accuracy, report test.

    Cs are solved in increasing order, each warm-started from the previous solution (the regularisation
    path), with one compiled solver for the whole sweep. Ties go to the smallest C.
    """
    s = _check_splits(num_classes, train=(train_x, train_y), val=(val_x, val_y), test=(test_x, test_y))
    cs = np.sort(np.asarray(Cs, np.float64).reshape(-1))
    if cs.size == 0 or np.any(cs <= 0):
        raise ValueError(f"Cs must be a non-empty list of positive numbers, got {Cs}")
    xs, onehot, mean, std = _solver_inputs(*s["train"], num_classes, standardize)
    params = _zeros(xs.shape[1], num_classes)
    rows = []
    for c in cs:
        fit, params = _logistic_solve(xs, onehot, mean, std, float(c), params, max_iter, tol)
        rows.append(
            {
                "C": float(c),
                **{f"{name}_accuracy": _accuracy(fit.predict(sx), sy) for name, (sx, sy) in s.items()},
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


def _knn_predict_many(
    train_x: np.ndarray,
    train_y: np.ndarray,
    query_x: np.ndarray,
    num_classes: int,
    ks: tuple[int, ...],
    temperature: float,
    chunk: int,
) -> np.ndarray:
    if any(k < 1 or k > train_x.shape[0] for k in ks):
        raise ValueError(f"every k must be in [1, {train_x.shape[0]}] (the train size), got {ks}")
    tx = _normalize(jnp.asarray(train_x, jnp.float32))
    onehot = jax.nn.one_hot(train_y, num_classes, dtype=jnp.float32)
    m = query_x.shape[0]
    chunk = max(1, min(chunk, m))
    padded = np.zeros((-(-m // chunk) * chunk, query_x.shape[1]), np.float32)  # one shape: one compile
    padded[:m] = query_x
    inv_t = jnp.asarray(1.0 / temperature, jnp.float32)
    preds = [
        np.asarray(_knn_chunk(tx, onehot, jnp.asarray(padded[i : i + chunk]), num_classes, ks, inv_t))
        for i in range(0, padded.shape[0], chunk)
    ]
    return np.concatenate(preds, axis=1)[:, :m]  # [len(ks), m]


def knn_predict(
    train_x: Any,
    train_y: Any,
    query_x: Any,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk: int = 1024,
) -> np.ndarray:
    """DINO's weighted kNN: cosine similarity on L2-normalised features, top-k votes weighted exp(sim / T).

    Queries go in chunks of `chunk` so memory stays at [chunk, n_train].
    """
    x, y = _check_xy(train_x, train_y, num_classes, "train")
    query_x = np.asarray(query_x)
    if query_x.ndim != 2 or query_x.shape[1] != x.shape[1]:
        raise ValueError(f"query features must be [m, {x.shape[1]}] like train, got {query_x.shape}")
    return _knn_predict_many(x, y, query_x, num_classes, (int(k),), temperature, chunk)[0]


def knn_probe(
    train_x: Any,
    train_y: Any,
    val_x: Any,
    val_y: Any,
    test_x: Any,
    test_y: Any,
    num_classes: int,
    ks: Sequence[int] = (10, 20),
    temperature: float = 0.07,
    chunk: int = 1024,
) -> ProbeResult:
    """kNN accuracy for every k (DINO reports each); `best` is chosen on val, ties to the first k listed."""
    s = _check_splits(num_classes, train=(train_x, train_y), val=(val_x, val_y), test=(test_x, test_y))
    ks = tuple(int(k) for k in ks)
    if not ks:
        raise ValueError("ks must be non-empty")
    acc = {
        name: [
            _accuracy(p, s[name][1])
            for p in _knn_predict_many(*s["train"], s[name][0], num_classes, ks, temperature, chunk)
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
    s = _check_splits(num_classes, train=(train_x, train_y), test=(test_x, test_y))
    (x, y), (tx, ty) = s["train"], s["test"]
    if probe not in ("ridge", "logistic"):
        raise ValueError(f"probe must be 'ridge' or 'logistic', got {probe!r}")
    rows = []
    for k in ks:
        accs = []
        for seed in seeds:
            idx = few_shot_indices(y, k, seed)
            if probe == "ridge":
                pred = ridge_fit(x[idx], y[idx], num_classes, [reg]).predict(tx)[0]
            else:
                pred = logistic_fit(x[idx], y[idx], num_classes, C=reg).predict(tx)
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
