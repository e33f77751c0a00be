"""XLA compiler options fxjax picks per computation (only where they measurably pay; docs/benchmarks.md).

On CPU, jaxlib hands dots to YNNPACK by default. For float32 work XLA's own Eigen kernels are faster on the
machines we measured (ResNet-50 extraction 1.6x, ViT and DINOv2 modestly), while bfloat16 dots need YNNPACK
(AMX / AVX512-BF16 kernels, ~3.5x Eigen's bfloat16). So float32 computations compile without YNNPACK and
everything else keeps the default. A user's own `--xla_cpu_experimental_ynn_fusion_type` in `XLA_FLAGS` wins.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp

_YNN = "xla_cpu_experimental_ynn_fusion_type"


def compiler_options(compute_dtype) -> dict[str, str]:
    """Options for `jax.jit(..., compiler_options=...)` of a computation whose heavy ops run in `compute_dtype`."""
    if jax.default_backend() != "cpu" or _YNN in os.environ.get("XLA_FLAGS", ""):
        return {}
    return {_YNN: ""} if jnp.dtype(compute_dtype) == jnp.float32 else {}
