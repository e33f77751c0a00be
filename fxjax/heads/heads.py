"""Classification heads trained on pooled backbone features."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx


class Head(nnx.Module):
    """Linear layer (default) or MLP (GELU hidden layers, optional dropout) on features [n, d] → logits [n, c]."""

    def __init__(
        self, in_dim: int, num_classes: int, *, hidden_dims: Sequence[int] = (), dropout: float = 0.0, rngs: nnx.Rngs
    ):
        dims = [in_dim, *hidden_dims]
        self.hidden = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in zip(dims[:-1], dims[1:])])
        self.dropout = dropout if hidden_dims else 0.0
        # Zero-initialised output layer: every class starts equally likely (a common linear-probe choice).
        self.out = nnx.Linear(dims[-1], num_classes, kernel_init=nnx.initializers.zeros, rngs=rngs)

    def __call__(self, x, *, dropout_key: jax.Array | None = None):
        """Dropout is active only when a key is given (training); the key makes it reproducible on resume."""
        for i, layer in enumerate(self.hidden):
            x = jax.nn.gelu(layer(x))
            if dropout_key is not None and self.dropout > 0:
                keep = jax.random.bernoulli(jax.random.fold_in(dropout_key, i), 1.0 - self.dropout, x.shape)
                x = jnp.where(keep, x / (1.0 - self.dropout), 0.0)
        return self.out(x)


def make_head(head_config, in_dim: int, num_classes: int, seed: int) -> Head:
    hidden = tuple(head_config.hidden_dims) if head_config.kind == "mlp" else ()
    return Head(in_dim, num_classes, hidden_dims=hidden, dropout=head_config.dropout, rngs=nnx.Rngs(seed))
