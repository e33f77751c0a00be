"""Activations by transformers' `hidden_act` names, so that a config selects the same function in JAX."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import jax

# transformers' ACT2FN names (and timm's / open_clip's) → JAX functions. "gelu" there is the exact (erf) form,
# "gelu_new" the tanh one; "quick_gelu" is OpenAI CLIP's sigmoid approximation.
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": jax.nn.relu,
    "relu6": jax.nn.relu6,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "gelu": partial(jax.nn.gelu, approximate=False),
    "gelu_new": partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": partial(jax.nn.gelu, approximate=True),
    "gelu_fast": partial(jax.nn.gelu, approximate=True),
    "gelu_tanh": partial(jax.nn.gelu, approximate=True),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    """The function for a config's `hidden_act`; an unknown name lists the supported ones."""
    if name not in ACTIVATIONS:
        raise ValueError(f"unsupported activation {name!r}; supported: {', '.join(sorted(ACTIVATIONS))}")
    return ACTIVATIONS[name]
