"""Many linear heads at once (DINOv2-style linear evaluation): one pass over cached features per epoch
trains a grid of learning rates x weight decays for every feature variant; the best head on val is reported.

Head parameters are stacked on a leading axis ([H, d, c]) and trained with `jax.vmap`; each head's optimizer
is `fxjax.heads.optim.make_optimizer` with that head's learning rate and weight decay, so a head here is the head
that `fxjax.heads.engine.Trainer` would train alone at those values, on the same batches (`FeatureBatches` order).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fxjax import parallel
from fxjax.heads.engine import FeatureBatches, feature_eval_batches
from fxjax.heads.optim import cross_entropy, make_optimizer
from fxjax.runs import rundir

Splits = tuple[np.ndarray, np.ndarray, np.ndarray]  # train [n, d], val [n_val, d], test [n_test, d]


class _Overrides:
    """An optimizer config with some fields replaced (per-head tracers inside vmap); ConfigDicts are type-safe
    and would refuse a tracer."""

    def __init__(self, base, **values):
        self._base, self._values = base, values

    def __getattr__(self, name: str):
        return self._values[name] if name in self._values else getattr(self._base, name)


@dataclass
class SweepResult:
    table: list[dict]  # one row per head: variant, learning_rate, weight_decay, val/test metrics, diverged
    best: dict  # the selected row
    params: dict[str, dict[str, np.ndarray]]  # variant → {"kernel": [H, d, c], "bias": [H, c]}, table order
    total_steps: int
    train_seconds: float  # the training loop alone, after compilation
    compile_seconds: float  # the train step's compilation

    def head(self, row: dict) -> dict[str, np.ndarray]:
        """One head's parameters ({"kernel": [d, c], "bias": [c]}), e.g. `result.head(result.best)`."""
        rows = [r for r in self.table if r["variant"] == row["variant"]]
        key = lambda r: (r["learning_rate"], r["weight_decay"])
        index = next(i for i, r in enumerate(rows) if key(r) == key(row))
        return {k: v[index] for k, v in self.params[row["variant"]].items()}

    def to_dict(self) -> dict:
        return {
            "table": self.table,
            "best": self.best,
            "num_heads": len(self.table),
            "total_steps": self.total_steps,
            "train_seconds": self.train_seconds,
            "compile_seconds": self.compile_seconds,
        }


def select(table: Sequence[dict]) -> dict:
    """The best validation accuracy among heads that did not diverge; ties → smaller learning rate, then
    smaller weight decay, then the first variant given (deterministic, and the more conservative head)."""
    order = {v: i for i, v in enumerate(dict.fromkeys(r["variant"] for r in table))}
    candidates = [r for r in table if not r["diverged"]]
    if not candidates:
        raise FloatingPointError("every head in the sweep diverged (non-finite parameters)")
    return min(
        candidates, key=lambda r: (-r["val_accuracy"], r["learning_rate"], r["weight_decay"], order[r["variant"]])
    )


def train_sweep(
    features: Mapping[str, Splits],
    labels: tuple[np.ndarray, np.ndarray, np.ndarray],
    *,
    num_classes: int,
    learning_rates: Sequence[float],
    weight_decays: Sequence[float],
    opt_config,
    batch_size: int,
    num_epochs: int,
    seed: int,
    mesh,
    eval_batch_size: int | None = None,
) -> SweepResult:
    """Trains len(learning_rates) x len(weight_decays) linear heads per feature variant, evaluates all of them
    on val and test, and selects the best on val. Every host passes the full arrays (as `features.extract`
    returns them); each feeds its own slice of every global batch."""
    train_y = labels[0]
    for name, splits in features.items():
        if [len(x) for x in splits] != [len(y) for y in labels]:
            raise ValueError(
                f"variant {name!r}: split sizes {[len(x) for x in splits]} differ from the "
                f"labels' {[len(y) for y in labels]}"
            )
    if not (features and learning_rates and weight_decays):
        raise ValueError("a sweep needs at least one feature variant, learning rate and weight decay")
    eval_batch_size = eval_batch_size or batch_size
    parallel.check_batch_size(batch_size, mesh, "batch_size")
    parallel.check_batch_size(eval_batch_size, mesh, "eval_batch_size")
    shard = {"shard_index": jax.process_index(), "shard_count": jax.process_count()}
    grid = [(float(lr), float(wd)) for lr in learning_rates for wd in weight_decays]
    # Batches of row indices, in the order FeatureBatches gives the features themselves.
    batches = FeatureBatches(np.arange(len(train_y)), train_y, batch_size=batch_size, seed=seed, **shard)
    total_steps = batches.steps_per_epoch * num_epochs
    steps = _Steps(opt_config, num_classes, total_steps, mesh)

    hyper = {
        "learning_rate": np.array([lr for lr, _ in grid], np.float32),  # [H]
        "weight_decay": np.array([wd for _, wd in grid], np.float32),
    }  # [H]
    # Zero-initialised, as Head's output layer.
    params = {
        v: {
            "kernel": np.zeros((len(grid), splits[0].shape[1], num_classes), np.float32),  # [H, d, c]
            "bias": np.zeros((len(grid), num_classes), np.float32),
        }  # [H, c]
        for v, splits in features.items()
    }
    hyper, params = jax.device_put((hyper, params), steps.repl)
    opt_state = steps.init(params, hyper)
    start = time.perf_counter()
    xs_spec = {
        v: jax.ShapeDtypeStruct((batch_size, train.shape[1]), train.dtype, sharding=steps.batch)
        for v, (train, _, _) in features.items()
    }
    y_spec = jax.ShapeDtypeStruct((batch_size,), train_y.dtype, sharding=steps.batch)
    train_step = steps.train.lower(params, opt_state, hyper, xs_spec, y_spec).compile()
    compile_seconds = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(total_steps):
        batch = next(batches)
        xs = parallel.to_global({v: splits[0][batch["x"]] for v, splits in features.items()}, steps.batch)
        y = parallel.to_global({"label": batch["label"]}, steps.batch)["label"]
        params, opt_state = train_step(params, opt_state, hyper, xs, y)
    params = jax.block_until_ready(params)
    train_seconds = time.perf_counter() - start

    evaluate = lambda split: steps.evaluate(
        params, {v: s[split] for v, s in features.items()}, labels[split], eval_batch_size, shard
    )
    val, test = evaluate(1), evaluate(2)
    params = {v: {k: parallel.gather(x) for k, x in params[v].items()} for v in features}  # caller's order
    table = []
    for v, p in params.items():
        finite = np.isfinite(p["kernel"]).all(axis=(1, 2)) & np.isfinite(p["bias"]).all(axis=1)  # [H]
        for i, (lr, wd) in enumerate(grid):
            table.append(
                {
                    "variant": v,
                    "learning_rate": lr,
                    "weight_decay": wd,
                    "val_accuracy": float(val[v]["accuracy"][i]),
                    "val_loss": float(val[v]["loss"][i]),
                    "test_accuracy": float(test[v]["accuracy"][i]),
                    "diverged": not bool(finite[i]),
                }
            )
    return SweepResult(table, select(table), params, total_steps, train_seconds, compile_seconds)


def _logits(params, x):  # one head: x [b, d] → [b, c], as Head's linear output layer
    return x @ params["kernel"] + params["bias"]


class _Steps:
    """The compiled steps: head parameters and hyperparameters replicated, the batch sharded on the mesh."""

    def __init__(self, opt_config, num_classes: int, total_steps: int, mesh):
        self.opt_config, self.num_classes, self.total_steps = opt_config, num_classes, total_steps
        self.repl, self.batch = parallel.replicated(mesh), parallel.batch_sharding(mesh)
        self.init = jax.jit(self._init, in_shardings=(self.repl, self.repl), out_shardings=self.repl)
        self.train = jax.jit(
            self._train,
            in_shardings=(self.repl, self.repl, self.repl, self.batch, self.batch),
            out_shardings=(self.repl, self.repl),
            donate_argnums=(0, 1),
        )
        self._eval = jax.jit(
            self._eval_sums, in_shardings=(self.repl, self.batch, self.batch, self.batch), out_shardings=self.repl
        )

    def _optimizer(self, learning_rate, weight_decay) -> optax.GradientTransformation:
        config = _Overrides(self.opt_config, learning_rate=learning_rate, weight_decay=weight_decay)
        return make_optimizer(config, self.total_steps)

    def _init(self, params, hyper):
        init_one = lambda p, lr, wd: self._optimizer(lr, wd).init(p)
        return {v: jax.vmap(init_one)(p, hyper["learning_rate"], hyper["weight_decay"]) for v, p in params.items()}

    def _train(self, params, opt_state, hyper, xs, y):
        """One batch (xs: variant → [b, d_v], y: [b]) updates every head of every variant."""

        def one_head(p, state, lr, wd, x):
            def loss_fn(p):
                losses = cross_entropy(_logits(p, x), y, self.num_classes, self.opt_config.label_smoothing)
                return losses.mean()

            grads = jax.grad(loss_fn)(p)
            updates, state = self._optimizer(lr, wd).update(grads, state, p)
            return optax.apply_updates(p, updates), state

        new_params, new_state = {}, {}
        for v in params:
            new_params[v], new_state[v] = jax.vmap(one_head, in_axes=(0, 0, 0, 0, None))(
                params[v], opt_state[v], hyper["learning_rate"], hyper["weight_decay"], xs[v]
            )
        return new_params, new_state

    def _eval_sums(self, params, xs, y, mask):
        """Per head, summed loss and number correct over the real (mask True) rows: variant → [H] each."""
        mask = mask.astype(jnp.float32)
        sums = {}
        for v, p in params.items():
            logits = jax.vmap(_logits, in_axes=(0, None))(p, xs[v])  # [H, b, c]
            losses = jax.vmap(lambda lg: cross_entropy(lg, y, self.num_classes))(logits)  # [H, b]
            correct = (jnp.argmax(logits, -1) == y).astype(jnp.float32)  # [H, b]
            sums[v] = {"loss": losses @ mask, "correct": correct @ mask}
        return sums

    def evaluate(
        self, params, features: Mapping[str, np.ndarray], labels: np.ndarray, batch_size: int, shard: dict
    ) -> dict[str, dict[str, np.ndarray]]:
        """variant → {"accuracy": [H], "loss": [H]} over every example of the split."""
        totals = {v: {"loss": np.zeros(len(p["bias"])), "correct": np.zeros(len(p["bias"]))} for v, p in params.items()}
        for batch in feature_eval_batches(np.arange(len(labels)), labels, batch_size, **shard):
            xs = parallel.to_global({v: f[batch["x"]] for v, f in features.items()}, self.batch)
            rest = parallel.to_global({"label": batch["label"], "mask": batch["mask"]}, self.batch)
            totals = jax.tree.map(jnp.add, totals, self._eval(params, xs, rest["label"], rest["mask"]))
        count = max(len(labels), 1)  # an empty split gives zeros, as Trainer.evaluate does
        return {
            v: {
                "accuracy": np.asarray(s["correct"], np.float64) / count,
                "loss": np.asarray(s["loss"], np.float64) / count,
            }
            for v, s in totals.items()
        }


def write(result: SweepResult, workdir: str | Path) -> None:
    """sweep.json (every row, the best, timings) and sweep.md (the same table for people, best marked)."""
    workdir = Path(workdir)
    rundir.write_json(workdir / "sweep.json", result.to_dict())
    best = result.best
    lines = [
        "# Linear-head sweep",
        "",
        f"{len(result.table)} heads, {result.total_steps} steps, {result.train_seconds:.2f} s of training "
        f"(+{result.compile_seconds:.1f} s compiling). "
        f"Best on validation: `{best['variant']}`, learning rate {best['learning_rate']:g}, weight decay "
        f"{best['weight_decay']:g}: val accuracy {best['val_accuracy']:.4f}, test accuracy "
        f"{best['test_accuracy']:.4f}.",
        "",
        "| | variant | learning rate | weight decay | val accuracy | val loss | test accuracy |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for row in result.table:
        mark = "**best**" if row == best else "diverged" if row["diverged"] else ""
        lines.append(
            f"| {mark} | {row['variant']} | {row['learning_rate']:g} | {row['weight_decay']:g} | "
            f"{row['val_accuracy']:.4f} | {row['val_loss']:.4f} | {row['test_accuracy']:.4f} |"
        )
    rundir.write_text(workdir / "sweep.md", "\n".join(lines) + "\n")
