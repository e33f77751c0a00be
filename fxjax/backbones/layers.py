"""Layers shared by model families."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx


def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, **kwargs):
    """`lax.dot_general` summing in float32 whatever the operands' dtype, the result in their dtype.

    What accelerators do inside a bfloat16 matmul anyway; on CPU it selects YNNPACK's AMX / AVX512-BF16 kernels,
    3.5x faster than a bfloat16-output dot (which runs at Eigen's speed). For float32 operands it is plain
    `lax.dot_general`. Pass as `nnx.Linear(..., dot_general=dot_general)`."""
    out = jax.lax.dot_general(
        lhs, rhs, dimension_numbers, precision=precision, preferred_element_type=jnp.float32, **kwargs
    )
    return out.astype(preferred_element_type or jnp.result_type(lhs, rhs))


def matmul(x, y):
    """`x @ y` through `dot_general` above (float32 sums, result in the operands' dtype)."""
    return dot_general(x, y, (((x.ndim - 1,), (0,)), ((), ())))


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow "SAME" padding (extra pixel at the end), as the TF-trained checkpoints expect."""
    total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class DepthwiseConv(nnx.Module):
    """Depthwise k×k convolution as a sum of k² shifted, scaled copies of the input.

    Mathematically a grouped convolution (`feature_group_count=channels`); written this way because XLA's
    CPU grouped convolution is ~8x slower than the fused elementwise sum, and accelerators fuse it just as well.
    The kernel keeps the grouped-conv layout [k, k, 1, channels], so checkpoints convert the same way.
    `padding` is "SAME" (TensorFlow's) or explicit ((top, bottom), (left, right)).
    """

    def __init__(
        self,
        channels: int,
        kernel: int,
        *,
        stride: int = 1,
        padding="SAME",
        use_bias: bool = False,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        init = nnx.initializers.lecun_normal()
        self.kernel = nnx.Param(init(rngs.params(), (kernel, kernel, 1, channels), param_dtype))
        self.bias = nnx.Param(jnp.zeros((channels,), param_dtype)) if use_bias else None
        self.size, self.stride, self.padding, self.dtype = kernel, stride, padding, dtype

    def __call__(self, x):  # [n, h, w, c] → [n, h', w', c]
        k, s = self.size, self.stride
        pads = (
            (same_padding(x.shape[1], k, s), same_padding(x.shape[2], k, s)) if self.padding == "SAME" else self.padding
        )
        x = jnp.pad(x.astype(self.dtype), ((0, 0), pads[0], pads[1], (0, 0)))
        height, width = (x.shape[1] - k) // s + 1, (x.shape[2] - k) // s + 1
        kernel = self.kernel[...].astype(self.dtype)
        out = None
        for i in range(k):
            for j in range(k):
                tap = x[:, i : i + s * (height - 1) + 1 : s, j : j + s * (width - 1) + 1 : s, :] * kernel[i, j, 0]
                out = tap if out is None else out + tap
        return out if self.bias is None else out + self.bias[...].astype(self.dtype)


class PointwiseConv(nnx.Module):
    """1×1 convolution as a matmul over channels: XLA's CPU convolution is ~5x slower than the same matmul.
    Kernel layout [1, 1, in, out], as a 1×1 nnx.Conv, so checkpoints convert the same way."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        use_bias: bool = False,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        init = nnx.initializers.lecun_normal()
        self.kernel = nnx.Param(init(rngs.params(), (1, 1, in_features, out_features), param_dtype))
        self.bias = nnx.Param(jnp.zeros((out_features,), param_dtype)) if use_bias else None
        self.dtype = dtype

    def __call__(self, x):  # [..., in] → [..., out]
        y = matmul(x.astype(self.dtype), self.kernel[...][0, 0].astype(self.dtype))
        return y if self.bias is None else y + self.bias[...].astype(self.dtype)
