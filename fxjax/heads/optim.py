"""The optax optimizer and loss from config: built over the trainable parameters only."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def schedule(opt_config, total_steps: int) -> optax.Schedule:
    """Linear warmup, then cosine decay to zero (or constant)."""
    lr, warmup = opt_config.learning_rate, min(opt_config.warmup_steps, max(total_steps - 1, 0))
    if opt_config.schedule == "constant":
        main = optax.constant_schedule(lr)
    else:
        main = optax.cosine_decay_schedule(lr, max(total_steps - warmup, 1))
    if warmup == 0:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), main], [warmup])


def decay_mask(params):
    """Weight decay on kernels (ndim ≥ 2) only: never biases, norms or scales."""
    return jax.tree.map(lambda x: jnp.ndim(x) >= 2, params)


def make_optimizer(opt_config, total_steps: int) -> optax.GradientTransformation:
    lr = schedule(opt_config, total_steps)
    if opt_config.name == "adamw":
        core = optax.adamw(lr, weight_decay=opt_config.weight_decay, mask=decay_mask)
    else:
        core = optax.chain(
            optax.add_decayed_weights(opt_config.weight_decay, mask=decay_mask),
            optax.sgd(lr, momentum=opt_config.momentum),
        )
    if opt_config.grad_clip > 0:
        return optax.chain(optax.clip_by_global_norm(opt_config.grad_clip), core)
    return core


def cross_entropy(logits, labels, num_classes: int, label_smoothing: float = 0.0):
    """Per-example softmax cross-entropy [n] with optional label smoothing."""
    targets = jax.nn.one_hot(labels, num_classes)
    if label_smoothing:
        targets = optax.smooth_labels(targets, label_smoothing)
    return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)
