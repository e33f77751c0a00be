"""Accelerator throughput: feature-extraction images/s and model FLOPs utilisation (MFU) of ViT-B/16 and
DINOv2-L in bf16, and head-training steps/s on cached features; prints markdown tables naming the device.

    PYTHONPATH=. python bench/accelerator.py                                # batch 256 on the first device
    PYTHONPATH=. python bench/accelerator.py --batch 4 --iters 2 --head-steps 5   # a CPU smoke run
    PYTHONPATH=. python bench/accelerator.py --peak 989e12                  # a device the table lacks

Weights are random: each model's transformers config class (no torch) gives the architecture, and the fxjax
module is built with `family.build(config, dtype=bf16, param_dtype=bf16, rngs=nnx.Rngs(0))`. One device runs
the jitted pooled-features function on a device-resident batch; times are medians over `--iters` calls after
a warm-up call, compile time (ahead of time: lower + compile) reported on its own.

FLOPs are counted analytically, 2 per multiply-add of every matmul, per image:
    patch embedding   P · 3p² · d
    each of L blocks  T · (4d² + (2 + g)·d·m) + 2 · T² · d
with P = (size / p)² patches, T = P + prefix tokens (CLS), width d, MLP width m, g = 1 for a gated (SwiGLU)
MLP else 0: query, key, value and output projections (4d²), the two MLP projections, then QKᵀ and AV.
Softmax, GELU, LayerNorm and the position-embedding resize are left out, as MFU conventions do; XLA's
`cost_analysis()["flops"]` of the compiled function counts them too and is printed beside it as a check
(expect a ratio slightly above 1). MFU = analytic FLOPs per second ÷ the device's dense bf16 peak, from
PEAK_FLOPS by device kind or `--peak`; "n/a" where neither gives one (e.g. a CPU).

Head training runs the real cached-features path: `Trainer` + a linear `Head` on random features of each
model's width, one `train_step` per batch (host → device copy and the loss read back included).
"""

from __future__ import annotations

import argparse
import re
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import transformers
from flax import nnx

from fxjax import parallel
from fxjax.backbones.families import dinov2, vit
from fxjax.backbones.transformer import TransformerSpec
from fxjax.config import default_config
from fxjax.heads.engine import Trainer
from fxjax.heads.heads import Head

# Dense bf16 peak FLOP/s per chip, by `device_kind` (lower-cased, first match wins).
PEAK_FLOPS: tuple[tuple[str, float], ...] = (
    (r"h100.*pcie", 756e12),
    (r"h100|h200", 989e12),  # SXM; the H200 has the H100's compute
    (r"a100", 312e12),
    (r"^tpu v4$", 275e12),  # not "TPU v4 lite" (v4i)
    (r"^tpu v5 lite$|^tpu v5e$", 197e12),
    (r"^tpu v5p?$", 459e12),
)

MODELS = {
    "vit-b16": (vit, lambda: transformers.ViTConfig()),
    "dinov2-l": (
        dinov2,
        lambda: transformers.Dinov2Config(
            hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, patch_size=14, image_size=518, mlp_ratio=4
        ),
    ),
}


def peak_flops(device_kind: str) -> float | None:
    kind = device_kind.lower()
    return next((peak for pattern, peak in PEAK_FLOPS if re.search(pattern, kind)), None)


def analytic_flops(spec: TransformerSpec, size: int) -> float:
    """FLOPs per image of every matmul (see the module docstring)."""
    p, d, m = spec.patch_size, spec.dim, spec.mlp_dim
    patches = (size // p) ** 2
    tokens = patches + spec.prefix_tokens
    block = tokens * (4 * d * d + (2 if spec.gated_mlp else 1) * d * m + m * d) + 2 * tokens * tokens * d
    return 2.0 * (patches * 3 * p * p * d + spec.depth * block)


def _median_seconds(fn, iters: int) -> float:
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _xla_flops(compiled) -> float | None:
    analysis = compiled.cost_analysis()
    if isinstance(analysis, list):  # older jax: one dict per computation
        analysis = analysis[0] if analysis else {}
    flops = (analysis or {}).get("flops")
    return float(flops) if flops else None


def bench_extraction(name: str, batch: int, size: int, iters: int, device) -> dict:
    family, make_config = MODELS[name]
    config = make_config()
    module = family.build(config, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(module)
    state = jax.device_put(state, device)
    x = jax.device_put(jax.random.normal(jax.random.key(0), (batch, size, size, 3), jnp.float32), device)
    pooled = jax.jit(lambda s, images: nnx.merge(graphdef, s)(images)["pooled"])
    start = time.perf_counter()
    compiled = pooled.lower(state, x).compile()
    compile_s = time.perf_counter() - start
    jax.block_until_ready(compiled(state, x))  # warm-up
    seconds = _median_seconds(lambda: compiled(state, x), iters)
    return {
        "name": name,
        "params": sum(v.size for v in jax.tree.leaves(state)),
        "spec": family.spec(config),
        "seconds": seconds,
        "compile_s": compile_s,
        "xla_flops": _xla_flops(compiled),
    }


def bench_head(dim: int, classes: int, batch: int, steps: int, device) -> float:
    """Steps per second of the cached-features head step, after a compiling warm-up step."""
    opt = default_config().optimizer
    trainer = Trainer(
        Head(dim, classes, rngs=nnx.Rngs(0)),
        (),
        num_classes=classes,
        opt_config=opt,
        total_steps=steps + 1,
        mesh=parallel.make_mesh(devices=[device]),
        seed=0,
    )
    rng = np.random.default_rng(0)
    batches = [
        {
            "x": rng.normal(size=(batch, dim)).astype(np.float32),
            "label": rng.integers(0, classes, batch).astype(np.int32),
        }
        for _ in range(min(steps, 8))
    ]
    state, _ = trainer.train_step(trainer.init_state(), batches[0])
    start = time.perf_counter()
    for i in range(steps):
        state, _ = trainer.train_step(state, batches[i % len(batches)])  # reads the loss back: synchronous
    return steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--batch", type=int, default=256, help="feature-extraction batch")
    parser.add_argument("--size", type=int, default=224, help="input resolution")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--peak", type=float, help="the device's dense bf16 FLOP/s (overrides the table)")
    parser.add_argument("--classes", type=int, default=1000, help="head classes")
    parser.add_argument("--head-batch", type=int, default=1024)
    parser.add_argument("--head-steps", type=int, default=50)
    args = parser.parse_args()

    device = jax.devices()[0]
    peak = args.peak or peak_flops(device.device_kind)
    rows = [bench_extraction(name, args.batch, args.size, args.iters, device) for name in args.models]
    heads = {
        dim: bench_head(dim, args.classes, args.head_batch, args.head_steps, device)
        for dim in dict.fromkeys(r["spec"].dim for r in rows)
    }

    peak_text = f"{peak / 1e12:.0f} TFLOP/s" if peak else "unknown"
    print(
        f"Device: {device.device_kind} ({device.platform}), 1 of {jax.device_count()}; "
        f"jax {jax.__version__}; bf16 peak {peak_text}; batch {args.batch}, {args.size} px, "
        f"median of {args.iters}\n"
    )
    print(
        "| model | device | params (M) | img/s | GFLOP/img (analytic) | XLA / analytic | TFLOP/s | MFU | compile (s) |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        flops = analytic_flops(r["spec"], args.size)
        achieved = flops * args.batch / r["seconds"]
        ratio = f"{r['xla_flops'] / (flops * args.batch):.3f}" if r["xla_flops"] else "n/a"
        mfu = f"{achieved / peak:.1%}" if peak else "n/a"
        print(
            f"| {r['name']} | {device.device_kind} | {r['params'] / 1e6:.1f} "
            f"| {args.batch / r['seconds']:.1f} | {flops / 1e9:.2f} | {ratio} | {achieved / 1e12:.3f} "
            f"| {mfu} | {r['compile_s']:.1f} |"
        )
    print(
        f"\nHead training on cached features (linear head, {args.classes} classes, AdamW, float32, "
        f"batch {args.head_batch}, {args.head_steps} steps):\n"
    )
    print("| features | device | steps/s | examples/s |")
    print("|---:|---|---:|---:|")
    for dim, steps_per_s in heads.items():
        print(f"| {dim} | {device.device_kind} | {steps_per_s:.1f} | {steps_per_s * args.head_batch:.0f} |")


if __name__ == "__main__":
    main()
