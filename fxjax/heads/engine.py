"""The training loop: jitted steps with explicit shardings, over trainable parameters only.

The model is split once into a trainable and a frozen state; the step differentiates the trainable state
alone, so the optimizer holds state only for it and frozen weights can never move (no weight decay, no
momentum). The loop is the same for heads on cached features and for an online backbone: only the batches and
the model differ.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
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


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or Inf; nothing from that step is saved."""


class Classifier(nnx.Module):
    """Backbone → pooled features → head. `frozen_stages` puts stop_gradient on the frozen part's output."""

    def __init__(self, backbone: nnx.Module, head: nnx.Module, frozen_stages: int):
        self.backbone = backbone
        self.head = head
        self.frozen_stages = frozen_stages

    def __call__(self, x, *, dropout_key=None):  # x: [n, h, w, 3] → logits [n, c]
        pooled = self.backbone(x, frozen_stages=self.frozen_stages)["pooled"]
        return self.head(pooled.astype(jnp.float32), dropout_key=dropout_key)


@dataclass
class TrainState:
    step: int
    params: nnx.State  # trainable only
    opt_state: optax.OptState


class Trainer:
    """Compiled train / eval steps for `model` (called as `model(x, dropout_key=...)`) on `mesh`."""

    def __init__(
        self,
        model: nnx.Module,
        frozen: tuple[str, ...],
        *,
        num_classes: int,
        opt_config,
        total_steps: int,
        mesh,
        seed: int,
        frozen_sharding: parallel.ShardingFn | None = None,
        compiler_options: dict[str, str] | None = None,
    ):
        """`frozen_sharding` lays out the frozen state (e.g. `sharding.fsdp_shardings`, so that each device
        holds a slice of a large backbone); by default it is replicated, like the trainable state.
        `compiler_options` go to the steps' `jax.jit` (an online backbone's `Backbone.compiler_options`)."""
        self.graphdef, params, frozen_state = split_trainable(model, frozen)
        self.num_classes = num_classes
        self.label_smoothing = opt_config.label_smoothing
        self.tx = make_optimizer(opt_config, total_steps)
        self.lr = schedule(opt_config, total_steps)
        self.key = jax.random.key(seed)
        self.repl, batch = parallel.replicated(mesh), parallel.batch_sharding(mesh)
        self.batch_sharding = batch
        self.params_init = jax.device_put(params, self.repl)
        frozen_layout = self.repl if frozen_sharding is None else frozen_sharding(frozen_state, mesh)
        self.frozen = jax.device_put(frozen_state, frozen_layout)
        self._init_opt = jax.jit(self.tx.init, out_shardings=self.repl)
        jit = partial(jax.jit, compiler_options=compiler_options)
        self._train = jit(
            self._train_step,
            in_shardings=(self.repl, self.repl, frozen_layout, batch, self.repl),
            out_shardings=(self.repl, self.repl, self.repl),
            donate_argnums=(0, 1),
        )
        self._eval = jit(
            self._eval_step, in_shardings=(self.repl, frozen_layout, batch), out_shardings=(self.repl, batch)
        )

    def init_state(self) -> TrainState:
        return TrainState(0, self.params_init, self._init_opt(self.params_init))

    def _forward(self, params, frozen, x, key):
        return nnx.merge(self.graphdef, params, frozen)(x, dropout_key=key)

    def _train_step(self, params, opt_state, frozen, batch, key):
        def loss_fn(p):
            logits = self._forward(p, frozen, batch["x"], key)
            return cross_entropy(logits, batch["label"], self.num_classes, self.label_smoothing).mean(), logits

        (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = self.tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        metrics = {
            "loss": loss,
            "accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["label"]),
            "grad_norm": optax.global_norm(grads),
        }
        return params, opt_state, metrics

    def _eval_step(self, params, frozen, batch):
        logits = self._forward(params, frozen, batch["x"], None)
        mask = batch["mask"].astype(jnp.float32)
        losses = cross_entropy(logits, batch["label"], self.num_classes)
        predictions = jnp.argmax(logits, -1)
        sums = {
            "loss": jnp.sum(losses * mask),
            "correct": jnp.sum((predictions == batch["label"]) * mask),
            "count": jnp.sum(mask),
        }
        return sums, predictions

    def train_step(self, state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        key = jax.random.fold_in(self.key, state.step)  # dropout noise depends on the step alone: resumable
        params, opt_state, metrics = self._train(
            state.params, state.opt_state, self.frozen, parallel.to_global(batch, self.batch_sharding), key
        )
        metrics = {k: float(v) for k, v in metrics.items()}
        if not math.isfinite(metrics["loss"]):
            raise NonFiniteLossError(f"loss is {metrics['loss']} at step {state.step + 1}")
        metrics["learning_rate"] = float(self.lr(state.step))
        return TrainState(state.step + 1, params, opt_state), metrics

    def evaluate(self, params, batches: Iterator[dict]) -> dict:
        """Accuracy and loss over every real (mask True) example; also the predictions, in order."""
        totals, predictions, masks = {"loss": 0.0, "correct": 0.0, "count": 0.0}, [], []
        for batch in batches:
            sums, preds = self._eval(params, self.frozen, parallel.to_global(batch, self.batch_sharding))
            totals = {k: totals[k] + float(v) for k, v in sums.items()}
            predictions.append(parallel.gather(preds))
            masks.append(parallel.gather(batch["mask"]))
        count = max(totals["count"], 1.0)
        return {
            "accuracy": totals["correct"] / count,
            "loss": totals["loss"] / count,
            "count": int(totals["count"]),
            "predictions": parallel.host_major(predictions, masks) if predictions else np.zeros(0, np.int64),
        }


class FeatureBatches:
    """Training batches from feature arrays: a seeded permutation per epoch, this host's shard of each global
    batch. The state is the step count alone, since the order is a pure function of (seed, step)."""

    def __init__(
        self,
        features: np.ndarray,
        labels: np.ndarray,
        *,
        batch_size: int,
        seed: int,
        shard_index: int = 0,
        shard_count: int = 1,
    ):
        self.features, self.labels = features, labels
        self.batch_size, self.seed = batch_size, seed
        self.per_host = batch_size // shard_count
        self.offset = shard_index * self.per_host
        self.steps_per_epoch = len(labels) // batch_size
        if self.steps_per_epoch == 0:
            raise ValueError(f"{len(labels)} training examples cannot fill one batch of {batch_size}")
        self.step = 0

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        epoch, within = divmod(self.step, self.steps_per_epoch)
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.labels))
        start = within * self.batch_size + self.offset
        index = np.sort(order[start : start + self.per_host])
        self.step += 1
        return {"x": self.features[index], "label": self.labels[index]}

    def get_state(self) -> dict:
        return {"step": self.step}

    def set_state(self, state: dict) -> None:
        self.step = int(state["step"])


def feature_eval_batches(
    features: np.ndarray, labels: np.ndarray, batch_size: int, shard_index: int = 0, shard_count: int = 1
) -> Iterator[dict]:
    """Padded, masked eval batches over feature arrays; every host yields the same number of batches."""
    per_host = batch_size // shard_count
    bounds = np.linspace(0, len(labels), shard_count + 1).astype(int)
    start, stop = bounds[shard_index], bounds[shard_index + 1]
    largest = int(np.max(np.diff(bounds)))
    for offset in range(0, max(largest, 1) if largest else 0, per_host):
        index = np.arange(start + offset, start + offset + per_host)
        mask = index < stop
        index = np.where(mask, index, start)
        yield {"x": features[index], "label": np.where(mask, labels[index], 0).astype(np.int32), "mask": mask}


def loader_state(iterator) -> dict:
    """A data iterator's position as JSON (grain gives bytes)."""
    state = iterator.get_state()
    return {"grain": state.decode()} if isinstance(state, bytes) else state


def restore_loader_state(iterator, state: dict) -> None:
    iterator.set_state(state["grain"].encode() if "grain" in state else state)
