"""Checkpoint tensors → NNX module state, driven by a declarative conversion table.

A family describes its checkpoint with a list of `Rule`s (checkpoint-name regex → module path + layout
transform). `load_state` builds the module abstractly, matches every tensor, checks every shape and reports
*all* missing, unexpected and mis-shaped tensors in one error before touching anything.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import jax.numpy as jnp
import numpy as np
from flax import nnx

# PyTorch stores conv kernels as [out, in, kh, kw] and linear weights as [out, in]; Flax wants
# [kh, kw, in, out] and [in, out].
TRANSFORMS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "none": lambda t: t,
    "conv": lambda t: np.transpose(t, (2, 3, 1, 0)),
    "dense": lambda t: np.transpose(t, (1, 0)),
    "conv1x1_dense": lambda t: np.transpose(t[:, :, 0, 0], (1, 0)),  # a 1x1 conv used as a Dense layer
    "scalar": lambda t: np.reshape(t, ()),
}


class WeightMismatchError(ValueError):
    """The checkpoint's tensors do not fit the module; the message lists every problem."""


@dataclass(frozen=True)
class Rule:
    """Maps checkpoint names matching `pattern` (full match) to a module path.

    `target` is a template using the pattern's groups (`\\1`), or a callable of the match for mappings a
    template cannot express (e.g. a flat block index → (stage, block)). A target of None drops the tensor
    (e.g. BatchNorm's `num_batches_tracked`, a classifier the backbone does not use).
    """

    pattern: str
    target: str | Callable[[re.Match], str] | None
    transform: str = "none"

    def apply(self, name: str) -> tuple[str | None, str] | None:
        match = re.fullmatch(self.pattern, name)
        if match is None:
            return None
        if self.target is None:
            return None, self.transform
        target = self.target(match) if callable(self.target) else match.expand(self.target)
        return target, self.transform


def path_str(path: Sequence) -> str:
    return ".".join(str(p) for p in path)


def map_names(tensors: Mapping[str, np.ndarray], rules: Sequence[Rule]) -> tuple[dict, list[str]]:
    """Checkpoint name → (module path, transformed tensor) by the first matching rule; unmatched names."""
    mapped, unexpected = {}, []
    for name, tensor in tensors.items():
        for rule in rules:
            hit = rule.apply(name)
            if hit is not None:
                target, transform = hit
                if target is not None:
                    mapped[target] = (name, TRANSFORMS[transform](np.asarray(tensor)))
                break
        else:
            unexpected.append(name)
    return mapped, unexpected


def load_state(
    build: Callable[[], nnx.Module],
    tensors: Mapping[str, np.ndarray],
    rules: Sequence[Rule],
    *,
    source: str = "checkpoint",
    param_dtype=jnp.float32,
) -> nnx.Module:
    """Builds the module abstractly (no random init) and fills every variable from `tensors`."""
    abstract = nnx.eval_shape(build)
    graphdef, state = nnx.split(abstract)
    flat = nnx.to_flat_state(state)
    mapped, unexpected = map_names(tensors, rules)

    problems, values = [], []
    missing = []
    for path, variable in flat:
        key = path_str(path)
        expected = variable.get_value()
        if key not in mapped:
            missing.append(key)
            continue
        name, array = mapped.pop(key)
        if tuple(array.shape) != tuple(expected.shape):
            problems.append(
                f"mis-shaped: {name} → {key}: checkpoint {tuple(array.shape)}, model {tuple(expected.shape)}"
            )
            continue
        dtype = param_dtype if jnp.issubdtype(expected.dtype, jnp.floating) else expected.dtype
        values.append((path, variable.replace(jnp.asarray(array, dtype=dtype))))
    problems += [f"missing: {key}" for key in missing]
    problems += [f"unexpected: {name}" for name in unexpected]
    problems += [f"unexpected: {name} (maps to unknown module path {key})" for key, (name, _) in mapped.items()]
    if problems:
        raise WeightMismatchError(
            f"{source}: {len(problems)} tensor problem(s) — the checkpoint does not fit this architecture:\n  "
            + "\n  ".join(problems)
        )
    return nnx.merge(graphdef, nnx.from_flat_state(values))
