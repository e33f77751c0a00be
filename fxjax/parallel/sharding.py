"""FSDP layout of a frozen backbone: each large tensor split over the mesh's `fsdp` axis, so every device
holds 1/fsdp of it (XLA gathers a layer's weights where they are used), while the batch stays split over
both axes and small tensors (biases, norms, LayerScale, BatchNorm statistics) stay replicated.

The rules are data: a parameter-path pattern → the dimensions it may be split along, in order of preference;
the first one divisible by the fsdp size wins. One table serves every family, since they all name their
parameters the Flax way (`kernel` for dense and convolution weights, `position` / `embedding` tables).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

FSDP_AXIS = "fsdp"

# Output channels first: they are the widest and nearly always a multiple of the device count, whereas the
# input channels of a stem (3) or a depthwise kernel (1) never are.
FSDP_RULES: tuple[tuple[str, tuple[int, ...]], ...] = (
    (r"(^|\.)kernel$", (-1, -2)),  # dense [in, out], conv [h, w, in, out], patch embedding [p, p, 3, d]
    (r"(^|\.)position$", (-1,)),  # position embeddings [1, tokens, d] / [tokens, d]
    (r"(^|\.)embedding$", (-1, -2)),  # nnx.Embed tables [vocab, d]
)

# Below this many elements a tensor is cheaper to replicate than to gather in every step.
MIN_ELEMENTS = 2**16


def leaf_name(path) -> str:
    """A pytree path as the dotted parameter path (`blocks.0.attn.query.kernel`); an nnx.Variable's own
    `.value` step is left out so that patterns can anchor on the parameter's name."""
    keys = [getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))) for k in path]
    if keys and isinstance(path[-1], jax.tree_util.GetAttrKey) and keys[-1] == "value":
        keys.pop()
    return ".".join(str(k) for k in keys)


def fsdp_spec(shape: Sequence[int], dims: Sequence[int], fsdp: int) -> P:
    """The PartitionSpec splitting the first of `dims` divisible by `fsdp`; replicated when none is."""
    if fsdp > 1:
        for dim in dims:
            if -len(shape) <= dim < len(shape) and shape[dim] % fsdp == 0:
                spec = [None] * len(shape)
                spec[dim] = FSDP_AXIS
                return P(*spec)
    return P()


def fsdp_shardings(
    state, mesh: Mesh, *, rules: Sequence[tuple[str, Sequence[int]]] = FSDP_RULES, min_elements: int = MIN_ELEMENTS
):
    """A NamedSharding for every leaf of a (frozen) parameter state on `mesh`, per `rules`."""
    fsdp = mesh.shape[FSDP_AXIS]

    def sharding_for(path, leaf) -> NamedSharding:
        shape = np.shape(leaf)
        if int(np.prod(shape)) >= min_elements:
            name = leaf_name(path)
            for pattern, dims in rules:
                if re.search(pattern, name):
                    return NamedSharding(mesh, fsdp_spec(shape, dims, fsdp))
        return NamedSharding(mesh, P())

    return jax.tree_util.tree_map_with_path(sharding_for, state)
