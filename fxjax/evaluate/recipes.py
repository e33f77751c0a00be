"""Named evaluation protocols with the papers' settings as defaults: pure functions of feature arrays.

Each protocol takes `train`, `test` (and optionally `val`) as `(features [n, d], integer labels [n])`, the
number of classes, and keyword overrides of its defaults (unknown names are an error), and returns a
`ProtocolResult`. `PROTOCOLS` maps names to them; docs/protocols.md gives the source each one follows.
Protocols that train heads by SGD (DINOv2 linear, VTAB-1k) are specs for the head engine: see `linear_specs`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fxjax.evaluate import fewshot, probes, search
from fxjax.evaluate.metrics import METRICS, bootstrap_metrics, point_metrics
from fxjax.evaluate.results import ProtocolResult

Split = tuple[Any, Any]  # (features [n, d], labels [n])


@dataclasses.dataclass(frozen=True)
class Protocol:
    """A named recipe: `fn(train, test, num_classes, val, settings)` and the defaults it is run with."""

    name: str
    fn: Callable[..., ProtocolResult]
    defaults: dict[str, Any]
    reference: str  # the file or paper section the defaults come from

    def __call__(
        self, train: Split, test: Split, num_classes: int, val: Split | None = None, **overrides: Any
    ) -> ProtocolResult:
        unknown = sorted(set(overrides) - set(self.defaults))
        if unknown:
            raise ValueError(f"{self.name}: unknown setting {unknown[0]!r}; known: {sorted(self.defaults)}")
        settings = {**self.defaults, **overrides}
        splits = probes._check_splits(num_classes, train=train, test=test, **({"val": val} if val is not None else {}))
        return self.fn(splits["train"], splits["test"], num_classes, splits.get("val"), settings)


def _metrics(scores: np.ndarray, labels: np.ndarray, settings: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return bootstrap_metrics(scores, labels, settings["bootstrap"], settings["bootstrap_seed"])


def _sizes(**splits: Split | None) -> dict[str, int]:
    return {name: int(len(s[1])) for name, s in splits.items() if s is not None}


def _holdout(train: Split, fraction: float, seed: int) -> tuple[Split, Split]:
    """A seeded random `fraction` of train as validation (DINOv2 log_regression: 10%, seed 0)."""
    x, y = train
    perm = np.random.default_rng(seed).permutation(len(y))
    cut = int(len(y) * fraction)
    if cut < 1 or cut >= len(y):
        raise ValueError(f"holdout_fraction={fraction} leaves an empty split of {len(y)} training examples")
    return (x[perm[cut:]], y[perm[cut:]]), (x[perm[:cut]], y[perm[:cut]])


def _concat(a: Split, b: Split) -> Split:
    return np.concatenate([a[0], b[0]]), np.concatenate([a[1], b[1]])


def _logits(fit: probes.LogisticFit, x: np.ndarray) -> np.ndarray:
    return np.asarray(x, np.float64) @ fit.weights + fit.bias


# ---------------------------------------------------------------------------------------------- kNN


@jax.jit(static_argnames=("num_classes", "ks"))
def _knn_scores_chunk(
    train_x: jax.Array, train_y: jax.Array, q: jax.Array, num_classes: int, ks: tuple[int, ...], inv_t: jax.Array
) -> jax.Array:
    """DINOv2's KnnModule on one chunk: softmax(top-max(ks) sims / T), class votes of the first k: [K, chunk, c]."""
    sim = q @ train_x.T  # [chunk, n_train]
    top_sim, top_idx = jax.lax.top_k(sim, max(ks))  # [chunk, kmax], sorted
    weight = jax.nn.softmax(top_sim * inv_t, axis=-1)  # normalised over all max(ks) neighbours, as DINOv2 does
    labels = train_y[top_idx]  # [chunk, kmax]
    rows = jnp.arange(q.shape[0])[:, None]
    return jnp.stack(
        [jnp.zeros((q.shape[0], num_classes), weight.dtype).at[rows, labels[:, :k]].add(weight[:, :k]) for k in ks]
    )


def knn_scores(
    train_x: Any,
    train_y: Any,
    query_x: Any,
    num_classes: int,
    ks: tuple[int, ...],
    temperature: float,
    chunk: int = 256,
) -> np.ndarray:
    """Weighted kNN class scores [len(ks), m, c] on L2-normalised features; memory [chunk, n_train]."""
    if any(k < 1 or k > len(train_y) for k in ks):
        raise ValueError(f"every k must be in [1, {len(train_y)}] (the train size), got {ks}")

    def normalize(x: Any) -> np.ndarray:
        x = np.asarray(x, np.float32)
        return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)

    tx, ty = jnp.asarray(normalize(train_x)), jnp.asarray(np.asarray(train_y, np.int32))
    q = normalize(query_x)
    m = q.shape[0]
    chunk = max(1, min(chunk, m))
    padded = np.zeros((-(-m // chunk) * chunk, q.shape[1]), np.float32)  # one shape: one compile
    padded[:m] = q
    inv_t = jnp.asarray(1.0 / temperature, jnp.float32)
    out = [
        np.asarray(_knn_scores_chunk(tx, ty, jnp.asarray(padded[i : i + chunk]), num_classes, ks, inv_t))
        for i in range(0, padded.shape[0], chunk)
    ]
    return np.concatenate(out, axis=1)[:, :m]


def _dinov2_knn(train: Split, test: Split, num_classes: int, val: Split | None, s: dict[str, Any]) -> ProtocolResult:
    ks = tuple(int(k) for k in s["ks"])
    select = val is not None and s["select_k_on_val"]
    if not select and s["k"] not in ks:
        raise ValueError(f"dinov2_knn: k={s['k']} (the reported k) must be one of ks={ks}")
    scores = knn_scores(*train, test[0], num_classes, ks, s["temperature"], s["chunk"])  # [K, m, c]
    rows = [{"k": k, **point_metrics(scores[i], test[1])} for i, k in enumerate(ks)]
    chosen, on, note = s["k"], "fixed", "DINOv2 reports every k on the evaluation split; no selection"
    if select:
        val_scores = knn_scores(*train, val[0], num_classes, ks, s["temperature"], s["chunk"])
        val_top1 = [point_metrics(v, val[1])["top1"] for v in val_scores]
        for row, acc in zip(rows, val_top1):
            row["val_top1"] = acc
        chosen, on, note = ks[int(np.argmax(val_top1))], "val", "k with the best val top-1 (ties: first listed)"
    return ProtocolResult(
        protocol="dinov2_knn",
        settings=s,
        selection={"param": "k", "value": chosen, "on": on, "note": note},
        metrics=_metrics(scores[ks.index(chosen)], test[1], s),
        splits={**_sizes(train=train, val=val, test=test), "fit_on": "train"},
        rows=rows,
    )


# ---------------------------------------------------------------------------------------------- logistic


def _select_logistic(
    fit_split: Split, select_split: Split, num_classes: int, cs: np.ndarray, s: dict[str, Any]
) -> tuple[int, list[dict[str, Any]]]:
    """Fit every C on `fit_split`, score on `select_split`; index of the best (ties: first, the smallest C)."""
    fits = probes.logistic_path(*fit_split, num_classes, cs, s["max_iter"], s["tol"], s["standardize"])
    table = [
        {"C": float(c), **point_metrics(_logits(f, select_split[0]), select_split[1]), "iterations": f.iterations}
        for c, f in zip(cs, fits)
    ]
    values = np.array([r[s["select_metric"]] for r in table])
    return int(np.flatnonzero(values == values.max())[0]), table


def _selection_split(train: Split, val: Split | None, s: dict[str, Any]) -> tuple[Split, Split, str]:
    """(fit on, select on, its name): val when given, else a seeded holdout of train."""
    if s["select_metric"] not in METRICS:
        raise ValueError(f"select_metric={s['select_metric']!r}: choose from {', '.join(METRICS)}")
    if val is not None:
        return train, val, "val"
    fit_split, held = _holdout(train, s["holdout_fraction"], s["holdout_seed"])
    return fit_split, held, "train_holdout"


def _dinov2_logreg(train: Split, test: Split, num_classes: int, val: Split | None, s: dict[str, Any]) -> ProtocolResult:
    cs = 10.0 ** np.linspace(*s["c_powers"])
    fit_split, select_split, on = _selection_split(train, val, s)
    best, table = _select_logistic(fit_split, select_split, num_classes, cs, s)
    final_split = _concat(fit_split, select_split)
    (fit,) = probes.logistic_path(*final_split, num_classes, [cs[best]], s["max_iter"], s["tol"], s["standardize"])
    return ProtocolResult(
        protocol="dinov2_logreg",
        settings=s,
        selection={"param": "C", "value": float(cs[best]), "on": on, "metric": s["select_metric"], "table": table},
        metrics=_metrics(_logits(fit, test[0]), test[1], s),
        splits={
            **_sizes(train=fit_split, selection=select_split, test=test),
            "fit_on": "train+" + on,
            "final_objective": fit.objective,
        },
    )


def _clip_linear_probe(
    train: Split, test: Split, num_classes: int, val: Split | None, s: dict[str, Any]
) -> ProtocolResult:
    lambdas = search.log_grid(*s["lambda_powers"], s["per_decade"])
    fit_split, select_split, on = _selection_split(train, val, s)
    curve: dict[int, dict[str, Any]] = {}

    def score(i: int) -> float:
        (fit,) = probes.logistic_path(
            *fit_split, num_classes, [1.0 / lambdas[i]], s["max_iter"], s["tol"], s["standardize"]
        )
        curve[i] = {"lambda": float(lambdas[i]), **point_metrics(_logits(fit, select_split[0]), select_split[1])}
        return curve[i][s["select_metric"]]

    best, asked = search.coarse_to_fine(score, lambdas.size, s["coarse_stride"], s["spans"])
    final_split = _concat(fit_split, select_split)
    (fit,) = probes.logistic_path(
        *final_split, num_classes, [1.0 / lambdas[best]], s["max_iter"], s["tol"], s["standardize"]
    )
    return ProtocolResult(
        protocol="clip_linear_probe",
        settings=s,
        selection={
            "param": "lambda",
            "value": float(lambdas[best]),
            "C": float(1.0 / lambdas[best]),
            "on": on,
            "metric": s["select_metric"],
            "visited": [float(lambdas[i]) for i in asked],
            "table": [curve[i] for i in sorted(curve)],
        },
        metrics=_metrics(_logits(fit, test[0]), test[1], s),
        splits={
            **_sizes(train=fit_split, selection=select_split, test=test),
            "fit_on": "train+" + on,
            "final_objective": fit.objective,
        },
    )


# ---------------------------------------------------------------------------------------------- few-shot


def _fewshot_rows(
    train: Split,
    test: Split,
    num_classes: int,
    s: dict[str, Any],
    solve: Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, fewshot.Selection]],
) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]]]:
    """For each shot count: every seed's subset, `solve(x, y) -> (test scores, selection)`, metrics over seeds."""
    metrics, rows = {}, []
    for shots in s["shots"]:
        seed_scores, selections = [], []
        for seed in s["seeds"]:
            idx = fewshot.bigvision_subset(train[1], num_classes, int(shots), int(seed))
            scores, selection = solve(train[0][idx], train[1][idx])
            seed_scores.append(scores)
            selections.append({"seed": int(seed), "value": selection.value, "on": selection.on, "note": selection.note})
        entry = _metrics(np.stack(seed_scores), test[1], s)  # [seeds, m, c]: CI of the seed mean, per-seed spread
        for name, value in entry.items():
            metrics[f"{name}@{shots}shot"] = value
        rows.append({"shots": int(shots), "selections": selections})
    return metrics, rows


def _bigvision_fewshot(
    train: Split, test: Split, num_classes: int, val: Split | None, s: dict[str, Any]
) -> ProtocolResult:
    if s["select"] not in ("fixed", "loo"):
        raise ValueError(f"bigvision_fewshot: select must be 'fixed' or 'loo', got {s['select']!r}")

    def solve(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, fewshot.Selection]:
        system = fewshot.ridge_system(x, y, num_classes)
        if s["select"] == "loo":
            selection = fewshot.select_ridge_loo(system, y, s["l2_grid"], s["l2_reg"])
        else:
            selection = fewshot.Selection(s["l2_reg"], "fixed", [], "big_vision's fixed l2_reg")
        return system.scores(test[0], selection.value), selection

    metrics, rows = _fewshot_rows(train, test, num_classes, s, solve)
    return ProtocolResult(
        protocol="bigvision_fewshot",
        settings=s,
        selection={"param": "l2_reg", "value": s["l2_reg"] if s["select"] == "fixed" else None, "on": s["select"]},
        metrics=metrics,
        splits={**_sizes(train=train, test=test), "fit_on": "shots per class from train (val unused)"},
        rows=rows,
    )


def _fewshot_logistic(
    train: Split, test: Split, num_classes: int, val: Split | None, s: dict[str, Any]
) -> ProtocolResult:
    def fit_predict(x: np.ndarray, y: np.ndarray, held: np.ndarray, c: float) -> np.ndarray:
        (fit,) = probes.logistic_path(x, y, num_classes, [c], s["max_iter"], s["tol"], s["standardize"])
        return fit.predict(held)

    def solve(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, fewshot.Selection]:
        selection = fewshot.select_kfold(fit_predict, x, y, s["Cs"], s["C"], s["folds"], s["fold_seed"])
        (fit,) = probes.logistic_path(x, y, num_classes, [selection.value], s["max_iter"], s["tol"], s["standardize"])
        return _logits(fit, test[0]), selection

    metrics, rows = _fewshot_rows(train, test, num_classes, s, solve)
    return ProtocolResult(
        protocol="fewshot_logistic",
        settings=s,
        selection={"param": "C", "value": None, "on": "kfold", "note": "per shot count and seed: see rows"},
        metrics=metrics,
        splits={**_sizes(train=train, test=test), "fit_on": "shots per class from train (val unused)"},
        rows=rows,
    )


# ---------------------------------------------------------------------------------------------- registry

_BOOTSTRAP = {"bootstrap": 1000, "bootstrap_seed": 0}
_LOGISTIC = {"max_iter": 1000, "tol": 1e-6, "standardize": False, "select_metric": "top1"}
_SHOTS = {"shots": (1, 5, 10, 25), "seeds": (0, 1, 2)}  # big_vision's common_fewshot.py

PROTOCOLS: dict[str, Protocol] = {
    p.name: p
    for p in (
        Protocol(
            "dinov2_knn",
            _dinov2_knn,
            {
                "ks": (10, 20, 100, 200),
                "temperature": 0.07,
                "k": 20,
                "select_k_on_val": False,
                "chunk": 256,
                **_BOOTSTRAP,
            },
            "dinov2/eval/knn.py (KnnModule, get_args_parser defaults)",
        ),
        Protocol(
            "dinov2_logreg",
            _dinov2_logreg,
            {"c_powers": (-6.0, 5.0, 45), "holdout_fraction": 0.1, "holdout_seed": 0, **_LOGISTIC, **_BOOTSTRAP},
            "dinov2/eval/log_regression.py (C_POWER_RANGE, eval_log_regression, sweep_C_values)",
        ),
        Protocol(
            "clip_linear_probe",
            _clip_linear_probe,
            {
                "lambda_powers": (-6.0, 6.0),
                "per_decade": 8,
                "coarse_stride": search.COARSE_STRIDE,
                "spans": search.SPANS,
                "holdout_fraction": 0.1,
                "holdout_seed": 0,
                **_LOGISTIC,
                **_BOOTSTRAP,
            },
            "CLIP paper (arXiv 2103.00020) appendix A.3; clip_benchmark/metrics/linear_probe.py (find_peak)",
        ),
        Protocol(
            "bigvision_fewshot",
            _bigvision_fewshot,
            {
                **_SHOTS,
                "l2_reg": 2.0**10,
                "select": "fixed",
                "l2_grid": tuple(2.0 ** np.arange(-10, 20)),
                **_BOOTSTRAP,
            },
            "big_vision/evaluators/fewshot_lsr.py; big_vision/configs/common_fewshot.py (shots, l2_reg, seeds)",
        ),
        Protocol(
            "fewshot_logistic",
            _fewshot_logistic,
            {
                **_SHOTS,
                "C": 1.0,
                "Cs": tuple(np.logspace(-4, 4, 9)),
                "folds": 5,
                "fold_seed": 0,
                "max_iter": 1000,
                "tol": 1e-6,
                "standardize": True,
                **_BOOTSTRAP,
            },
            "fxjax: big_vision's subsets, L-BFGS logistic, C by stratified k-fold on the shots",
        ),
    )
}


def run(
    name: str, train: Split, test: Split, num_classes: int, val: Split | None = None, **overrides: Any
) -> ProtocolResult:
    """PROTOCOLS[name](...), with an error that lists the known names."""
    if name not in PROTOCOLS:
        raise ValueError(f"unknown protocol {name!r}; known: {sorted(PROTOCOLS)}")
    return PROTOCOLS[name](train, test, num_classes, val, **overrides)
