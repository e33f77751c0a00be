"""Shared layers: the float32-summing dot_general, the depthwise and pointwise convolutions, against lax."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fxjax.backbones.layers import DepthwiseConv, PointwiseConv, dot_general, matmul


def test_dot_general_sums_in_float32_and_keeps_the_operands_dtype():
    x = jax.random.normal(jax.random.key(0), (3, 5, 64))
    w = jax.random.normal(jax.random.key(1), (64, 48))
    exact = jnp.einsum("btk,kn->btn", x, w, precision=jax.lax.Precision.HIGHEST)
    np.testing.assert_allclose(matmul(x, w), exact, rtol=1e-5, atol=1e-5)
    half = matmul(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16))
    assert half.dtype == jnp.bfloat16
    # one rounding of the float32 sum: within bf16's half-ulp of the float32 product of the rounded operands
    reference = jnp.einsum(
        "btk,kn->btn",
        x.astype(jnp.bfloat16).astype(jnp.float32),
        w.astype(jnp.bfloat16).astype(jnp.float32),
        precision=jax.lax.Precision.HIGHEST,
    )
    np.testing.assert_allclose(half.astype(jnp.float32), reference, rtol=2**-8, atol=1e-6)
    linear = nnx.Linear(64, 48, dtype=jnp.bfloat16, dot_general=dot_general, rngs=nnx.Rngs(0))
    assert linear(x).dtype == jnp.bfloat16


def test_depthwise_and_pointwise_equal_lax_convolutions():
    x = jax.random.normal(jax.random.key(1), (2, 9, 11, 6))
    dw = DepthwiseConv(6, 3, stride=2, padding=((1, 1), (1, 1)), rngs=nnx.Rngs(0))
    ref = jax.lax.conv_general_dilated(
        x,
        dw.kernel[...],
        (2, 2),
        ((1, 1), (1, 1)),
        feature_group_count=6,
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        precision=jax.lax.Precision.HIGHEST,
    )
    np.testing.assert_allclose(dw(x), ref, rtol=1e-5, atol=1e-5)
    pw = PointwiseConv(6, 5, rngs=nnx.Rngs(0))
    ref = jax.lax.conv_general_dilated(
        x,
        pw.kernel[...],
        (1, 1),
        "VALID",
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        precision=jax.lax.Precision.HIGHEST,
    )
    np.testing.assert_allclose(pw(x), ref, rtol=1e-5, atol=1e-5)
