"""Feature-extraction speed of fxjax vs transformers' PyTorch models on the same weights; prints markdown.

    python bench/extract.py [--models vit-b16 resnet50 efficientnet-b0 dinov2-s convnextv2-t] [--batch 32] [--iters 5]
        [--dtype float32|bfloat16]

Each model is built in PyTorch from a default-sized transformers config, saved with `save_pretrained` and
loaded by `fxjax.load_backbone`, so both sides run the same weights; a timm row (`convnextv2-t`) builds timm's
model, saves its state dict as safetensors and loads it through `fxjax.backbones.checkpoints.timm_cnn`.
PyTorch runs under `torch.inference_mode()` with its default thread count; fxjax runs the jitted
`Backbone.features` after a warm-up call; its compile time (lower + compile, ahead of time) is reported on its
own. Times are medians over `--iters` batches, the two frameworks alternating batch by batch (`block_until_ready`
on the JAX side).

The machine's fp32 matmul throughput (2048³, jitted jnp.matmul; numpy and torch for comparison) is measured in
the same run; for each model, FLOPs utilisation = model FLOP/s ÷ jnp.matmul FLOP/s, with model FLOPs counted
by XLA (`cost_analysis()["flops"]` of the lowered pooled-features function: 2 per multiply-add of every
dot and convolution, plus elementwise work). For ViT-B/16 an analytic count (2·MACs of the patch embedding,
QKV, output and MLP projections and the two attention matmuls) is printed beside it as a check.

The CPU's fp32 multiply-add peak is measured too (`bench/fma_peak.c`, compiled with `cc -march=native`): it
bounds what any framework can reach, and each row says what share of it 1.5x PyTorch's speed would take.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
import types
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers
from machine import fma_peak_flops_per_second

import fxjax
from fxjax.backbones.backbone import Backbone
from fxjax.backbones.checkpoints import timm_cnn
from fxjax.backbones.convert import load_state
from fxjax.backbones.formats import read_checkpoint
from fxjax.backbones.xla import compiler_options
from fxjax.data.preprocess import PreprocessSpec


def _vit_b16():
    return transformers.ViTModel(transformers.ViTConfig(), add_pooling_layer=False)


def _dinov2_s():
    config = transformers.Dinov2Config(hidden_size=384, num_attention_heads=6, image_size=224, patch_size=14)
    return transformers.Dinov2Model(config)


def _efficientnet_b0():
    # EfficientNetConfig() defaults to B7 (width 2.0, depth 3.1, 600 px); these are google/efficientnet-b0's.
    config = transformers.EfficientNetConfig(
        width_coefficient=1.0, depth_coefficient=1.0, image_size=224, hidden_dim=1280, dropout_rate=0.2
    )
    model = transformers.EfficientNetModel(config)
    # Its init draws conv and BatchNorm scales from N(0, 0.02): activations decay through float32 denormals
    # (slow on CPU) to exact zeros. Unit-gain weights keep them normal, as trained weights are.
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.fill_(1.0)
            if isinstance(module, torch.nn.Conv2d):
                module.weight.normal_(0.0, module.weight[0].numel() ** -0.5)
    return model


def _pooler(out):
    return out.pooler_output


# name → (torch model factory, the reference output fxjax's `pooled` equals: ViT's is the final-norm CLS).
MODELS: dict[str, tuple[Callable[[], torch.nn.Module], Callable]] = {
    "vit-b16": (_vit_b16, lambda out: out.last_hidden_state[:, 0]),
    "resnet50": (lambda: transformers.ResNetModel(transformers.ResNetConfig()), _pooler),
    "efficientnet-b0": (_efficientnet_b0, _pooler),
    "dinov2-s": (_dinov2_s, _pooler),
    "convnext-t": (lambda: transformers.ConvNextModel(transformers.ConvNextConfig()), _pooler),
}
# name → timm architecture, compared with timm's `forward_head(forward_features(x), pre_logits=True)`.
TIMM_MODELS: dict[str, str] = {"convnextv2-t": "convnextv2_tiny"}


def _timm_pair(architecture: str, workdir: Path, dtype: str):
    """timm's model and the fxjax backbone on its weights, through the timm CNN builders (no Hub)."""
    sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))
    import timm
    from safetensors.torch import save_file

    model = timm.create_model(architecture, pretrained=False).eval()
    file = workdir / f"{architecture}.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(file))
    dt = jnp.dtype(dtype)
    module, rules = timm_cnn.builder(architecture)(architecture, {}, dtype=dt, param_dtype=dt)
    module = load_state(lambda: module, read_checkpoint(file), rules, source=str(file), param_dtype=dt)
    backbone = Backbone(module, PreprocessSpec(size=(224, 224)), {"name": architecture}, dt)
    return model, backbone, lambda m, x: m.forward_head(m.forward_features(x), pre_logits=True)


def _pair(name: str, workdir: Path, dtype: str):
    """(PyTorch model, fxjax backbone on the same weights, PyTorch forward giving the reference features)."""
    torch.manual_seed(0)
    if name in TIMM_MODELS:
        return _timm_pair(TIMM_MODELS[name], workdir, dtype)
    make, reference = MODELS[name]
    model = make().eval()
    folder = workdir / name
    model.save_pretrained(folder)
    backbone = fxjax.load_backbone(str(folder), dtype=dtype, param_dtype=dtype)
    return model, backbone, lambda m, x: reference(m(pixel_values=x))


def vit_b16_flops(batch: int, size: int = 224, patch: int = 16, dim: int = 768, depth: int = 12) -> float:
    """2·MACs of every matmul in ViT-B/16: patch embedding, then per block QKV (3d²), output (d²) and MLP
    (8d²) projections per token and the two attention matmuls (2·tokens²·d)."""
    patches = (size // patch) ** 2
    tokens = patches + 1
    macs = patches * 3 * patch * patch * dim + depth * (12 * tokens * dim * dim + 2 * tokens * tokens * dim)
    return 2.0 * macs * batch


def seconds(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def median_seconds(fn: Callable[[], object], iters: int) -> float:
    return statistics.median(seconds(fn) for _ in range(iters))


def matmul_flops_per_second(n: int = 2048, iters: int = 10) -> dict[str, float]:
    """fp32 n³ matmul throughput (2n³ FLOPs per product) of jitted jnp.matmul as fxjax compiles float32 work
    (`fxjax.backbones.xla.compiler_options`) and with XLA's defaults, numpy and torch."""
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((n, n), np.float32), rng.standard_normal((n, n), np.float32)
    ja, jb = jnp.asarray(a), jnp.asarray(b)
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    torch.matmul(ta, tb)
    out = {}
    for name, options in (("jax", compiler_options("float32")), ("jax (XLA defaults)", {})):
        matmul = jax.jit(jnp.matmul, compiler_options=options)
        matmul(ja, jb).block_until_ready()
        out[name] = 2.0 * n**3 / median_seconds(lambda f=matmul: f(ja, jb).block_until_ready(), iters)
    out["numpy"] = 2.0 * n**3 / median_seconds(lambda: a @ b, iters)
    out["torch"] = 2.0 * n**3 / median_seconds(lambda: torch.matmul(ta, tb), iters)
    return out


def bench_model(name: str, batch: int, iters: int, workdir: Path, dtype: str = "float32") -> dict:
    model, backbone, forward = _pair(name, workdir, dtype)
    model = model.to(getattr(torch, dtype))
    size = backbone.preprocess.size
    x = np.random.default_rng(0).standard_normal((batch, 3, *size)).astype(np.float32)  # NCHW
    x_torch, x_jax = torch.from_numpy(x).to(getattr(torch, dtype)), jnp.asarray(x.transpose(0, 2, 3, 1))

    with torch.inference_mode():
        ref = forward(model, x_torch).reshape(batch, -1).float().numpy()  # also the warm-up call
    start = time.perf_counter()
    lowered = backbone._pooled.lower(backbone.state, x_jax)
    lowered.compile()
    compile_s = time.perf_counter() - start
    ours = np.asarray(backbone.features(x_jax).block_until_ready(), np.float32)  # warm-up call

    # Alternate the two so that a shared machine's load falls on both alike.
    torch_times, fxjax_times = [], []
    for _ in range(iters):
        with torch.inference_mode():
            torch_times.append(seconds(lambda: forward(model, x_torch)))
        fxjax_times.append(seconds(lambda: backbone.features(x_jax).block_until_ready()))
    params = sum(p.numel() for p in model.parameters())
    return {
        "name": name,
        "params": params,
        "torch_s": statistics.median(torch_times),
        "fxjax_s": statistics.median(fxjax_times),
        "compile_s": compile_s,
        "flops": lowered.cost_analysis()["flops"],
        "rel_diff": float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref))),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--models",
        nargs="+",
        default=["vit-b16", "resnet50", "efficientnet-b0", "dinov2-s"],
        choices=sorted({**MODELS, **TIMM_MODELS}),
    )
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16"],
        help="compute and parameter dtype of both frameworks (the goals are for float32)",
    )
    args = parser.parse_args()

    peak = fma_peak_flops_per_second()
    matmul = matmul_flops_per_second()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            rows.append(bench_model(name, args.batch, args.iters, Path(tmp), args.dtype))
    if peak:  # a shared machine's throughput drifts: the best of a measurement before and one after
        peak = max(peak, fma_peak_flops_per_second() or 0.0)

    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    print(
        f"CPU: {cpu}, {os.cpu_count()} cores; jax {jax.__version__} ({jax.devices()[0].platform}), "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), batch {args.batch}, {args.dtype}, "
        f"median of {args.iters}; load average {os.getloadavg()[0]:.1f} at the end\n"
    )
    print("fp32 matmul 2048³: " + ", ".join(f"{k} {v / 1e9:.1f} GFLOP/s" for k, v in matmul.items()))
    if peak:
        print(f"fp32 FMA peak (bench/fma_peak.c, {os.cpu_count()} threads): {peak / 1e9:.1f} GFLOP/s")
    print(
        '\nUtilisation: model FLOP/s ÷ fxjax\'s matmul FLOP/s; "1.5x PyTorch needs": the FLOP/s that 1.5x '
        "PyTorch's images/s would take, as a share of the FMA peak.\n"
    )
    print(
        "| model | params (M) | fxjax img/s | PyTorch img/s | fxjax / PyTorch | fxjax compile (s) "
        "| GFLOPs / img (XLA) | fxjax util. | PyTorch util. | 1.5x PyTorch needs | max diff / max abs |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        per_image = r["flops"] / args.batch
        util = [r["flops"] / r[k] / matmul["jax"] for k in ("fxjax_s", "torch_s")]
        needs = f"{1.5 * r['flops'] / r['torch_s'] / peak:.0%} of peak" if peak and args.dtype == "float32" else "n/a"
        print(
            f"| {r['name']} | {r['params'] / 1e6:.1f} | {args.batch / r['fxjax_s']:.1f} | "
            f"{args.batch / r['torch_s']:.1f} | {r['torch_s'] / r['fxjax_s']:.2f} | {r['compile_s']:.1f} | "
            f"{per_image / 1e9:.2f} | {util[0]:.0%} | {util[1]:.0%} | {needs} | {r['rel_diff']:.1e} |"
        )
    vit = next((r for r in rows if r["name"] == "vit-b16"), None)
    if vit is not None:
        analytic = vit_b16_flops(args.batch)
        per_image = analytic / args.batch / 1e9
        print(
            f"\nViT-B/16 FLOPs per image: analytic (2·MACs of all matmuls) {per_image:.2f} G, XLA "
            f"cost_analysis {vit['flops'] / args.batch / 1e9:.2f} G (ratio {vit['flops'] / analytic:.3f})"
        )


if __name__ == "__main__":
    main()
