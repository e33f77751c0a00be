"""The head engine: H heads trained at once, stacked on a leading axis, under `jax.jit` with explicit shardings.

A *group* is a set of heads with one model structure and one input: the heads on one cached feature variant, or
the classifier with an online backbone. A group's trainable parameters are stacked [H, ...] (H >= 1) and every
head has its own learning rate and weight decay, held as arrays [H], so a 64-head sweep and a single head are one
program (DINOv2's linear evaluation: one pass over the batches feeds every head). The frozen part of a model is
split off once (`freeze.split_trainable`), shared by the heads of its group, enters the step behind
`stop_gradient` and holds no optimiser state; only the trainable part is differentiated.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from fxjax import parallel
from fxjax.heads.freeze import split_trainable
from fxjax.heads.optim import cross_entropy, make_optimizer, schedule

Hyper = Mapping[str, Sequence[float]]  # {"learning_rate": [H], "weight_decay": [H]}


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or Inf in every head; nothing from that step is saved."""


@dataclass
class TrainState:
    step: int
    params: dict  # group → trainable state, every leaf stacked [H, ...]
    opt_state: dict  # group → optimiser state, stacked [H, ...]


class _Overrides:
    """An optimizer config with some fields replaced by per-head tracers (a ConfigDict would refuse them)."""

    def __init__(self, base, **values):
        self._base, self._values = base, values

    def __getattr__(self, name: str):
        return self._values[name] if name in self._values else getattr(self._base, name)


def _stack(tree, heads: int):
    return jax.tree.map(lambda a: jnp.broadcast_to(jnp.asarray(a), (heads, *np.shape(a))), tree)


class StepMetrics(Mapping):
    """One step's metrics, read from the device on first use (or when the engine checks them)."""

    def __init__(self, engine: Engine, stats: dict, step: int):
        self._engine, self._stats, self.step = engine, stats, step
        self._values: dict[str, float] | None = None

    def check(self) -> dict[str, float]:
        if self._values is None:
            self._values = self._engine._summarise(self._stats, self.step)
            self._stats = None
        return self._values

    def __getitem__(self, key: str) -> float:
        return self.check()[key]

    def __iter__(self):
        return iter(self.check())

    def __len__(self) -> int:
        return len(self.check())


class Engine:
    """Compiled train / eval steps for `models` (group → module called as `model(x, dropout_key=...)`) on `mesh`.

    `hyper` gives each group its heads' learning rates and weight decays (default: one head at the optimizer
    config's values). `frozen_sharding` lays out the frozen state (e.g. `sharding.fsdp_shardings`); by default it
    is replicated like the heads. `compiler_options` go to the steps' `jax.jit` (an online backbone's).
    """

    def __init__(
        self,
        models: Mapping[str, nnx.Module],
        is_trainable: Callable[[str], bool],
        *,
        num_classes: int,
        opt_config,
        total_steps: int,
        mesh,
        seed: int,
        hyper: Mapping[str, Hyper] | None = None,
        frozen_sharding: parallel.ShardingFn | None = None,
        compiler_options: dict[str, str] | None = None,
    ):
        self.groups = tuple(models)
        default = {"learning_rate": [opt_config.learning_rate], "weight_decay": [opt_config.weight_decay]}
        hyper = {g: (hyper or {}).get(g, default) for g in self.groups}
        self.heads = {g: len(hyper[g]["learning_rate"]) for g in self.groups}
        self.num_classes, self.opt_config, self.total_steps = num_classes, opt_config, total_steps
        self.key = jax.random.key(seed)
        self.schedule = schedule(opt_config, total_steps)
        self._pending: StepMetrics | None = None
        self.repl, self.batch_sharding = parallel.replicated(mesh), parallel.batch_sharding(mesh)
        self.graphdefs, params, frozen, frozen_layout = {}, {}, {}, {}
        for g, model in models.items():
            self.graphdefs[g], trainable_state, frozen_state = split_trainable(model, is_trainable)
            params[g] = _stack(trainable_state, self.heads[g])
            frozen_layout[g] = self.repl if frozen_sharding is None else frozen_sharding(frozen_state, mesh)
            frozen[g] = jax.device_put(frozen_state, frozen_layout[g])
        self.frozen = frozen
        self.hyper = jax.device_put(
            {g: {k: np.asarray(v, np.float32) for k, v in h.items()} for g, h in hyper.items()}, self.repl
        )
        self.params_init = jax.device_get(params)  # on the host: each init_state places fresh (donatable) buffers
        self._init_opt = jax.jit(self._init, out_shardings=self.repl)
        jit = partial(jax.jit, compiler_options=compiler_options)
        repl, batch = self.repl, self.batch_sharding
        self._train = jit(
            self._train_step,
            in_shardings=(repl, repl, frozen_layout, repl, batch, repl),
            out_shardings=(repl, repl, repl),
            donate_argnums=(0, 1),
        )
        self._eval = jit(self._eval_step, in_shardings=(repl, frozen_layout, batch), out_shardings=(repl, batch))

    # ---- per-head functions, mapped over the stacked heads of a group

    def _tx(self, learning_rate, weight_decay) -> optax.GradientTransformation:
        config = _Overrides(self.opt_config, learning_rate=learning_rate, weight_decay=weight_decay)
        return make_optimizer(config, self.total_steps)

    def _per_head(self, group: str, fn, *stacked):
        """fn over every head of `group`: vmapped, or called directly on the squeezed arrays when H = 1 (an online
        backbone's convolutions batch poorly under vmap)."""
        if self.heads[group] > 1:
            return jax.vmap(fn)(*stacked)
        return _stack(fn(*jax.tree.map(lambda a: a[0], stacked)), 1)

    def _init(self, params, hyper):
        return {
            g: jax.vmap(lambda p, lr, wd: self._tx(lr, wd).init(p))(
                params[g], hyper[g]["learning_rate"], hyper[g]["weight_decay"]
            )
            for g in self.groups
        }

    def _logits(self, group, params, frozen, x, key):
        # The boundary between frozen and trainable computation: nothing flows back into the frozen state.
        return nnx.merge(self.graphdefs[group], params, jax.lax.stop_gradient(frozen))(x, dropout_key=key)

    def _train_step(self, params, opt_state, frozen, hyper, batch, key):
        new_params, new_state, metrics = {}, {}, {}
        label_smoothing = self.opt_config.label_smoothing
        for g in self.groups:
            x = batch["x"][g] if isinstance(batch["x"], Mapping) else batch["x"]

            def one_head(p, state, lr, wd, g=g, x=x):
                def loss_fn(p):
                    logits = self._logits(g, p, frozen[g], x, key)
                    return cross_entropy(logits, batch["label"], self.num_classes, label_smoothing).mean(), logits

                (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(p)
                updates, state = self._tx(lr, wd).update(grads, state, p)
                accuracy = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
                stats = {"loss": loss, "accuracy": accuracy, "grad_norm": optax.global_norm(grads)}
                return optax.apply_updates(p, updates), state, stats

            new_params[g], new_state[g], metrics[g] = self._per_head(
                g, one_head, params[g], opt_state[g], hyper[g]["learning_rate"], hyper[g]["weight_decay"]
            )
        return new_params, new_state, metrics

    def _eval_step(self, params, frozen, batch):
        mask = batch["mask"].astype(jnp.float32)
        sums, predictions = {}, {}
        for g in self.groups:
            x = batch["x"][g] if isinstance(batch["x"], Mapping) else batch["x"]

            def one_head(p, g=g, x=x):
                logits = self._logits(g, p, frozen[g], x, None)
                losses = cross_entropy(logits, batch["label"], self.num_classes)
                preds = jnp.argmax(logits, -1)
                return {"loss": losses @ mask, "correct": (preds == batch["label"]).astype(jnp.float32) @ mask}, preds

            sums[g], preds = self._per_head(g, one_head, params[g])
            predictions[g] = preds.T  # [b, H]: the batch axis first, sharded like the batch
        return sums, predictions

    # ---- host side

    def init_state(self) -> TrainState:
        params = jax.device_put(self.params_init, self.repl)
        return TrainState(0, params, self._init_opt(params, self.hyper))

    def train_step(self, state: TrainState, batch: dict) -> tuple[TrainState, StepMetrics]:
        """One step of every head. Its metrics (the mean over heads whose loss is finite) are read from the device
        only when used, and the previous step's are checked now, while this one computes: the host never waits on
        the step it has just dispatched. `finish()` checks the last step."""
        key = jax.random.fold_in(self.key, state.step)  # dropout noise depends on the step alone: resumable
        global_batch = {
            "x": parallel.to_global(batch["x"], self.batch_sharding)
            if isinstance(batch["x"], Mapping)
            else parallel.to_global({"x": batch["x"]}, self.batch_sharding)["x"],
            "label": parallel.to_global({"label": batch["label"]}, self.batch_sharding)["label"],
        }
        params, opt_state, stats = self._train(
            state.params, state.opt_state, self.frozen, self.hyper, global_batch, key
        )
        metrics = StepMetrics(self, stats, state.step + 1)
        previous, self._pending = self._pending, metrics
        if previous is not None:
            previous.check()
        return TrainState(state.step + 1, params, opt_state), metrics

    def finish(self) -> None:
        """Checks the last step's loss (raises NonFiniteLossError when every head's is NaN/Inf)."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.check()

    def _summarise(self, stats: dict, step: int) -> dict[str, float]:
        stats = {k: np.concatenate([np.asarray(stats[g][k]) for g in self.groups]) for k in stats[self.groups[0]]}
        finite = np.isfinite(stats["loss"])
        if not finite.any():
            raise NonFiniteLossError(f"loss is {stats['loss'][0]} at step {step}")
        metrics = {k: float(np.mean(v[finite])) for k, v in stats.items()}
        if sum(self.heads.values()) == 1:
            metrics["learning_rate"] = float(self.schedule(step - 1))
        return metrics

    def evaluate(self, params, batches: Iterator[dict]) -> dict:
        """group → {"accuracy": [H], "loss": [H], "predictions": [n, H]} over every real (mask True) example, and
        "count". An empty split gives NaN accuracies (nothing was measured)."""
        totals = {g: {"loss": 0.0, "correct": 0.0} for g in self.groups}
        predictions, masks, count = {g: [] for g in self.groups}, [], 0
        for batch in batches:
            placed = {
                "x": parallel.to_global(batch["x"], self.batch_sharding)
                if isinstance(batch["x"], Mapping)
                else parallel.to_global({"x": batch["x"]}, self.batch_sharding)["x"],
                **parallel.to_global({"label": batch["label"], "mask": batch["mask"]}, self.batch_sharding),
            }
            sums, preds = self._eval(params, self.frozen, placed)
            totals = jax.tree.map(lambda a, b: a + np.asarray(b, np.float64), totals, sums)
            for g in self.groups:
                predictions[g].append(parallel.gather(preds[g]))
            masks.append(parallel.gather(batch["mask"]))
            count += int(np.sum(masks[-1]))
        out = {"count": count}
        for g in self.groups:
            heads = self.heads[g]
            rows = parallel.host_major(predictions[g], masks) if masks else np.zeros((0, heads), np.int64)
            if count:
                accuracy, loss = (np.asarray(totals[g][k], np.float64) / count for k in ("correct", "loss"))
            else:
                accuracy = loss = np.full(heads, np.nan)
            out[g] = {"accuracy": accuracy, "loss": loss, "predictions": rows}
        return out


def head_rows(engine: Engine, hyper: Mapping[str, Hyper]) -> list[dict]:
    """One row per head, in engine order: {"variant", "index", "learning_rate", "weight_decay"}."""
    return [
        {"variant": g, "index": i, "learning_rate": float(lr), "weight_decay": float(wd)}
        for g in engine.groups
        for i, (lr, wd) in enumerate(zip(hyper[g]["learning_rate"], hyper[g]["weight_decay"]))
    ]


def score(rows: list[dict], split: str, result: dict) -> list[dict]:
    """Rows with `<split>_accuracy` / `<split>_loss` from `Engine.evaluate`'s result."""
    return [
        {
            **r,
            f"{split}_accuracy": float(result[r["variant"]]["accuracy"][r["index"]]),
            f"{split}_loss": float(result[r["variant"]]["loss"][r["index"]]),
        }
        for r in rows
    ]


def select(rows: Sequence[dict]) -> dict:
    """The best validation accuracy among heads whose validation loss is finite; ties → smaller learning rate,
    then smaller weight decay, then the first variant given (deterministic, and the more conservative head)."""
    order = {v: i for i, v in enumerate(dict.fromkeys(r["variant"] for r in rows))}
    candidates = [r for r in rows if math.isfinite(r["val_loss"]) and math.isfinite(r["val_accuracy"])]
    if not candidates:
        raise NonFiniteLossError(
            "every head diverged (non-finite validation loss): lower the learning rates, or check the data"
        )
    return min(
        candidates, key=lambda r: (-r["val_accuracy"], r["learning_rate"], r["weight_decay"], order[r["variant"]])
    )
