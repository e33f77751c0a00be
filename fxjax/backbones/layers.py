"""Layers shared by model families."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from fxjax.backbones.activations import activation


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


# HF ConvNeXt fixes this eps for every LayerNorm but the final one (config.layer_norm_eps).
INNER_NORM_EPS = 1e-6


def two_pass_layer_norm(features: int, eps: float, *, dtype, param_dtype, rngs: nnx.Rngs) -> nnx.LayerNorm:
    # Two-pass variance, as torch computes it: the final norm's eps (1e-12) cannot hide E[x²]-E[x]²'s error.
    return nnx.LayerNorm(
        features, epsilon=eps, use_fast_variance=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs
    )


class GlobalResponseNorm(nnx.Module):
    """ConvNeXt-V2's GRN: each channel's spatial L2 norm, divided by its mean over channels, rescales the input
    (x + scale · x · n + bias); zero-initialised scale and bias make it the identity."""

    def __init__(self, dim: int, eps: float = 1e-6, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.scale = nnx.Param(jnp.zeros((dim,), param_dtype))
        self.bias = nnx.Param(jnp.zeros((dim,), param_dtype))
        self.eps, self.dtype = eps, dtype

    def __call__(self, x):  # [n, h, w, dim]
        # The norms sum h·w squares: in float32 whatever the compute dtype (bfloat16 would lose the small ones).
        norm = jnp.sqrt(jnp.sum(jnp.square(x.astype(jnp.float32)), axis=(1, 2), keepdims=True))  # [n, 1, 1, dim]
        norm = (norm / (jnp.mean(norm, axis=-1, keepdims=True) + self.eps)).astype(self.dtype)
        scale, bias = self.scale[...].astype(self.dtype), self.bias[...].astype(self.dtype)
        return x + scale * (x * norm) + bias


class ConvNextBlock(nnx.Module):
    """Depthwise 7x7 → LayerNorm → Linear 4x → activation → [GRN] → Linear → × layer scale → + input."""

    def __init__(
        self,
        dim: int,
        config,
        *,
        grn: bool = False,
        norm_eps: float = INNER_NORM_EPS,
        dtype,
        param_dtype,
        rngs: nnx.Rngs,
    ):
        kw = {"dtype": dtype, "param_dtype": param_dtype, "rngs": rngs}
        # Shifted-copy sum, not a grouped nnx.Conv: XLA's CPU grouped convolution is several times slower.
        self.dwconv = DepthwiseConv(dim, 7, padding=((3, 3), (3, 3)), use_bias=True, **kw)
        self.layernorm = two_pass_layer_norm(dim, norm_eps, **kw)
        self.pwconv1 = nnx.Linear(dim, 4 * dim, dot_general=dot_general, **kw)
        self.grn = GlobalResponseNorm(4 * dim, **kw) if grn else None
        self.pwconv2 = nnx.Linear(4 * dim, dim, dot_general=dot_general, **kw)
        self.activation = activation(config.hidden_act)
        self.layer_scale = (
            nnx.Param(jnp.full((dim,), config.layer_scale_init_value, param_dtype))
            if config.layer_scale_init_value > 0
            else None
        )
        self.dtype = dtype

    def __call__(self, x):  # [n, h, w, dim]
        y = self.activation(self.pwconv1(self.layernorm(self.dwconv(x))))
        y = self.pwconv2(y if self.grn is None else self.grn(y))
        if self.layer_scale is not None:
            y = y * self.layer_scale[...].astype(self.dtype)
        return x + y
