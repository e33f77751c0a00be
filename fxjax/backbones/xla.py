"""XLA compiler options fxjax picks per computation (only where they measurably pay; docs/benchmarks.md).

On CPU, jaxlib hands dots to YNNPACK by default. For float32 backbones XLA's own Eigen convolutions and
matmuls are faster on the machine we measured (ResNet-50 extraction 1.8x, ConvNeXt-T 1.3x, ViT and DINOv2
~1.1x, EfficientNet equal), while bfloat16 dots need YNNPACK (AMX / AVX512-BF16 kernels, ~3.5x Eigen's) and
the skinny matmuls of many linear heads are faster on it too. So float32 backbone computations compile
without YNNPACK and everything else keeps the default. A user's own `--xla_cpu_experimental_ynn_fusion_type`
in `XLA_FLAGS` wins.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp

_YNN = "xla_cpu_experimental_ynn_fusion_type"


def compiler_options(compute_dtype) -> dict[str, str]:
    """Options for `jax.jit(..., compiler_options=...)` of a backbone computation in `compute_dtype`."""
    if jax.default_backend() != "cpu" or _YNN in os.environ.get("XLA_FLAGS", ""):
        return {}
    return {_YNN: ""} if jnp.dtype(compute_dtype) == jnp.float32 else {}
