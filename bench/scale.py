"""Extraction at scale: peak host memory as the dataset grows 10x (1 and 2 processes), throughput against the
backbone's own, and a run killed at 60% then resumed; prints markdown.

    python bench/scale.py [--small 2000] [--large 20000] [--chunk-rows 1024]

Every measurement runs in a fresh subprocess (`--child ...`) so that `resource.getrusage` peak RSS belongs to
one extraction. Images are synthetic (uint8, generated from their index, never held in memory), so the
source itself does not grow with the dataset. Memory: the `pixels` backbone at 32x32 (3072-dim features,
245 MB of features at 20k images: holding a split in memory would show). Throughput: a tiny random ViT
(dim 192, depth 4, patch 8 at 32x32), extraction images/s over the backbone's own images/s on pre-placed
inputs of the same batch (jitted forward + block_until_ready, after a warm-up). Kill: `pixels`, SIGKILLed once
60% of its chunks are on disk, then rerun; both times are measured inside the process (imports excluded).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
BATCH = 256


class SyntheticSource:
    """n uint8 [32, 32, 3] images made from their index (nothing held): the source does not grow with n."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> dict:
        rng = np.random.default_rng(int(index))
        return {"image": rng.integers(0, 256, (32, 32, 3), np.uint8), "label": np.int32(index % 10)}

    def label(self, index: int) -> int:
        return int(index) % 10

    def __repr__(self) -> str:
        return f"SyntheticSource(n={self.n})"


def _child(args) -> None:
    import jax

    if args.processes > 1:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(args.coordinator, args.processes, args.process_id)
    import jax.numpy as jnp
    from flax import nnx

    if args.grain_defaults:  # the "before" of the read_options change: grain's own 16 threads, 500 prefetched
        import grain

        from fxjax.data import images

        images.read_options = lambda per_host, num_threads=None: grain.ReadOptions()

    from fxjax import parallel
    from fxjax.backbones.backbone import Backbone
    from fxjax.backbones.families.pixels import Pixels
    from fxjax.backbones.transformer import TransformerSpec, VisionTransformer
    from fxjax.data.images import eval_batches
    from fxjax.data.preprocess import PreprocessSpec
    from fxjax.data.sources import Dataset
    from fxjax.features import extract

    spec = PreprocessSpec(size=(32, 32), mean=(127.5,) * 3, std=(127.5,) * 3, rescale=1.0)
    if args.backbone == "pixels":
        module = Pixels()
    else:
        vit = TransformerSpec(dim=192, depth=4, heads=3, mlp_dim=768, image_size=32, patch_size=8)
        module = VisionTransformer(vit, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    info = {"name": args.backbone, "revision": None, "weight_sha256": None}
    backbone = Backbone(module, spec, info)
    data = Dataset("synthetic", [str(i) for i in range(10)], {"train": SyntheticSource(args.n)}, {"train": str(args.n)})
    mesh = parallel.make_mesh()
    result = {}
    if args.measure == "throughput":  # the backbone alone, on inputs already on the devices
        x = jax.device_put(np.zeros((BATCH, 32, 32, 3), np.float32), parallel.batch_sharding(mesh))
        state = jax.device_put(backbone.state, parallel.replicated(mesh))
        jax.block_until_ready(backbone._variants(state, x, ("pooled",)))
        start = time.perf_counter()
        for _ in range(args.n // BATCH):
            out = backbone._variants(state, x, ("pooled",))
        jax.block_until_ready(out)
        result["backbone_img_s"] = (args.n // BATCH) * BATCH / (time.perf_counter() - start)
        start = time.perf_counter()  # the host input pipeline alone (read + preprocess + batch)
        count = sum(int(b["mask"].sum()) for b in eval_batches(data.splits["train"], spec, batch_size=BATCH))
        result["pipeline_img_s"] = count / (time.perf_counter() - start)
        warm = Dataset("synthetic-warm", data.class_names, {"train": SyntheticSource(BATCH)}, {"train": "w"})
        extract.cached_features(backbone, warm, mesh=mesh, batch_size=BATCH, cache_dir=args.cache, dtype="float32",
                                param_dtype="float32", chunk_rows=args.chunk_rows)  # fmt: skip
    start = time.perf_counter()
    _, _, hits = extract.cached_features(
        backbone, data, mesh=mesh, batch_size=BATCH, cache_dir=args.cache, dtype="float32", param_dtype="float32",
        chunk_rows=args.chunk_rows, rows="host",
    )  # fmt: skip
    result["seconds"] = time.perf_counter() - start
    result["img_s"] = args.n / result["seconds"]
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result["hit"] = hits["train"]
    print("RESULT " + json.dumps(result), flush=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(n: int, cache: str, *, processes: int = 1, backbone: str = "pixels", measure: str = "memory",
           chunk_rows: int = 1024, devices: int = 1,
           grain_defaults: bool = False) -> list[subprocess.Popen]:  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    coordinator = f"127.0.0.1:{_free_port()}"
    procs = []
    for i in range(processes):
        command = [sys.executable, __file__, "--child", "--n", str(n), "--cache", cache, "--backbone", backbone,
                   "--measure", measure, "--chunk-rows", str(chunk_rows), "--processes", str(processes),
                   "--process-id", str(i), "--coordinator", coordinator]  # fmt: skip
        command += ["--grain-defaults"] if grain_defaults else []
        procs.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True))
    return procs


def _results(procs: list[subprocess.Popen]) -> list[dict]:
    out = []
    for proc in procs:
        stdout, _ = proc.communicate(timeout=900)
        lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            raise RuntimeError(f"child exited {proc.returncode}: {stdout[-2000:]}")
        out.append(json.loads(lines[-1].removeprefix("RESULT ")))
    return out


def _chunks_on_disk(cache: Path) -> int:
    return len(list(cache.glob("*/0of1/pooled.*.npy")))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--child", action="store_true")
    parser.add_argument("--n", type=int, default=0)
    parser.add_argument("--cache", default="")
    parser.add_argument("--backbone", default="pixels")
    parser.add_argument("--measure", default="memory")
    parser.add_argument("--processes", type=int, default=1)
    parser.add_argument("--process-id", type=int, default=0)
    parser.add_argument("--coordinator", default="")
    parser.add_argument("--small", type=int, default=2000)
    parser.add_argument("--large", type=int, default=20000)
    parser.add_argument("--chunk-rows", type=int, default=1024)
    parser.add_argument("--throughput-n", type=int, default=8192)
    parser.add_argument("--kill-n", type=int, default=8000)
    parser.add_argument("--parts", default="memory,throughput,kill", help="comma-separated subset to run")
    parser.add_argument("--grain-defaults", action="store_true", help="child: grain's default ReadOptions")
    args = parser.parse_args()
    if args.child:
        return _child(args)

    parts = set(args.parts.split(","))
    with tempfile.TemporaryDirectory() as tmp:
        if "memory" in parts:
            _memory(args, tmp)
        if "throughput" in parts:
            _throughput(args, tmp)
        if "kill" in parts:
            _kill(args, tmp)


def _memory(args, tmp: str) -> None:
    print("| processes | images | peak RSS (MB, max over hosts) | seconds |\n|---|---|---|---|")
    peaks = {}
    for processes in (1, 2):
        for n in (args.small, args.large):
            cache = f"{tmp}/mem-{processes}-{n}"
            runs = _results(_spawn(n, cache, processes=processes, chunk_rows=args.chunk_rows))
            peaks[processes, n] = max(r["peak_rss_mb"] for r in runs)
            print(f"| {processes} | {n} | {peaks[processes, n]:.0f} | {max(r['seconds'] for r in runs):.1f} |")
    for processes in (1, 2):
        print(f"\npeak RSS ratio {args.large} / {args.small} images, {processes} process(es): "
              f"{peaks[processes, args.large] / peaks[processes, args.small]:.3f}")  # fmt: skip


def _throughput(args, tmp: str) -> None:
    """Side by side in one run: grain's default read options (before), then fxjax's `read_options` (after)."""
    print(f"\nthroughput (tiny ViT, batch {BATCH}, 1 device, {os.cpu_count()} cores)\n")
    print("| read options | backbone alone (img/s) | input pipeline alone (img/s) | extraction (img/s) | "
          "extraction / backbone | back to back, no overlap (img/s) |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|")
    for name, defaults in (("grain default (16 threads, 500 prefetch)", True), ("fxjax read_options", False)):
        (run,) = _results(_spawn(args.throughput_n, f"{tmp}/tp-{defaults}", backbone="vit", measure="throughput",
                                 chunk_rows=args.chunk_rows, grain_defaults=defaults))  # fmt: skip
        serial = 1 / (1 / run["backbone_img_s"] + 1 / run["pipeline_img_s"])  # no overlap at all
        print(f"| {name} | {run['backbone_img_s']:.0f} | {run['pipeline_img_s']:.0f} | {run['img_s']:.0f} | "
              f"{run['img_s'] / run['backbone_img_s']:.3f} | {serial:.0f} |")  # fmt: skip


def _kill(args, tmp: str) -> None:
    """Uninterrupted, killed + rerun, uninterrupted again: the two uninterrupted times bracket load drift."""
    n, chunks = args.kill_n, -(-args.kill_n // args.chunk_rows)
    (full,) = _results(_spawn(n, f"{tmp}/full", chunk_rows=args.chunk_rows))
    cache = Path(f"{tmp}/killed")
    (proc,) = _spawn(n, str(cache), chunk_rows=args.chunk_rows)
    target = -(-6 * chunks // 10)  # 60%, rounded up
    while _chunks_on_disk(cache) < target and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    done = _chunks_on_disk(cache)
    (resumed,) = _results(_spawn(n, str(cache), chunk_rows=args.chunk_rows))
    (again,) = _results(_spawn(n, f"{tmp}/again", chunk_rows=args.chunk_rows))
    whole = (full["seconds"] + again["seconds"]) / 2
    print(f"\nkilled with {done} of {chunks} chunks on disk ({n} images, pixels): the rerun took "
          f"{resumed['seconds']:.1f} s, uninterrupted runs {full['seconds']:.1f} s and {again['seconds']:.1f} s "
          f"(rerun / their mean: {resumed['seconds'] / whole:.2f})")  # fmt: skip


if __name__ == "__main__":
    main()
