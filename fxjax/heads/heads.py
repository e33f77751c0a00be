"""Classification heads, and the classifier that puts one on a backbone (used for training, export and predict)."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from fxjax.backbones.backbone import VARIANTS


class Head(nnx.Module):
    """Linear layer (default) or MLP (GELU hidden layers, optional dropout) on features [n, d] → logits [n, c]."""

    def __init__(
        self,
        in_dim: int,
        num_classes: int,
        *,
        hidden_dims: Sequence[int] = (),
        dropout: float = 0.0,
        init_std: float = 0.0,
        rngs: nnx.Rngs,
    ):
        dims = [in_dim, *hidden_dims]
        self.hidden = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in zip(dims[:-1], dims[1:])])
        self.dropout = dropout if hidden_dims else 0.0
        # Output layer zero-initialised by default (every class starts equally likely, a common linear-probe
        # choice); DINOv2's linear evaluation draws it from N(0, init_std²) instead.
        init = nnx.initializers.normal(init_std) if init_std > 0 else nnx.initializers.zeros
        self.out = nnx.Linear(dims[-1], num_classes, kernel_init=init, rngs=rngs)

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


class Classifier(nnx.Module):
    """A head on a backbone's feature `variant` (see `backbones.backbone.VARIANTS`).

    Without a backbone the input *is* the variant's features (heads trained on cached features); either way the
    parameter tree is `head.*` (+ `backbone.*`), so cached and online runs checkpoint and export alike. What is
    frozen is not the module's business: the training step decides it (`fxjax.heads.freeze`).
    """

    def __init__(self, backbone: nnx.Module | None, head: Head, variant: str = "pooled"):
        if variant not in VARIANTS:
            raise ValueError(f"unknown feature variant {variant!r}; choose from {', '.join(VARIANTS)}")
        self.backbone = backbone
        self.head = head
        self.variant = variant

    def __call__(self, x, *, dropout_key=None):  # x: images [n, h, w, 3], or features [n, d] → logits [n, c]
        if self.backbone is not None:
            x = VARIANTS[self.variant](self.backbone(x))
        return self.head(x.astype(jnp.float32), dropout_key=dropout_key)
