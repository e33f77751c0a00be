"""DINOv2's 52-head linear evaluation: fxjax (extract the four feature variants once, then the head engine) against
the same protocol the PyTorch way, as `dinov2/eval/linear.py` runs it (the frozen backbone in the loop at every
iteration: ModelWithIntermediateLayers -> AllClassifiers of LinearClassifier, SGD momentum 0.9, CosineAnnealingLR,
the best on val by top-1 evaluated on test), side by side in one process on the same images and weights.

    PYTHONPATH=. python bench/protocols.py [--dim 384 --depth 12 --heads 6] [--image-size 56] [--batch 256]
        [--epochs 4] [--threads N]

A random-weight DINOv2 ViT (default: vit_small's width, depth and heads) at `--image-size` on scikit-learn digits
(8x8 upsampled, ImageNet-normalised): 1024 train, 256 val, 517 test images; an epoch is one pass over train
(DINOv2's epoch_length = train / batch). Each side's time runs from preprocessed images in memory to the final
table, compilation and evaluation included; building the model and reading its weights are not timed. The
global batch is 256 so DINOv2's 5-decimal head names are distinct (below it, names collide and its ModuleDict
keeps fewer than 52 heads).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np

sys.modules.setdefault("torchvision._meta_registrations", type(sys)("torchvision._meta_registrations"))

import torch  # noqa: E402
from dinov2.layers import MemEffAttention, NestedTensorBlock  # noqa: E402
from dinov2.models.vision_transformer import DinoVisionTransformer  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402

import fxjax  # noqa: E402
from fxjax.evaluate import linear_eval  # noqa: E402
from fxjax.evaluate.linear_specs import DINOV2_LEARNING_RATES, DINOV2_VARIANTS  # noqa: E402
from tests.support import dinov2_eval  # noqa: E402

MEAN, STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
SPLITS = {"train": 1024, "val": 256, "test": 517}


def digits(size: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Digits as [n, size, size, 3] ImageNet-normalised images, split by a fixed permutation."""
    d = load_digits()
    order = np.random.default_rng(0).permutation(len(d.target))
    x = d.images[order] / 16.0  # [n, 8, 8] in [0, 1]
    scale = -(-size // 8)
    x = np.kron(x, np.ones((1, scale, scale)))[:, :size, :size]  # nearest upsampling
    x = ((x[..., None] - MEAN) / STD).astype(np.float32)
    images, labels, start = {}, {}, 0
    for split, n in SPLITS.items():
        images[split], labels[split] = x[start : start + n], d.target[order][start : start + n].astype(np.int64)
        start += n
    return images, labels


def make_model(args) -> DinoVisionTransformer:
    torch.manual_seed(0)
    model = DinoVisionTransformer(
        img_size=args.image_size, patch_size=14, embed_dim=args.dim, depth=args.depth, num_heads=args.heads,
        mlp_ratio=4, init_values=1.0, block_chunks=0, block_fn=partial(NestedTensorBlock, attn_class=MemEffAttention),
    )  # fmt: skip
    with torch.no_grad():  # random weights with some spread (inits leave norms at 1 / 0)
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape))
    return model.eval()


def run_torch(model, images, labels, classes: int, batch: int, steps: int) -> dict:
    """dinov2/eval/linear.py's run_eval_linear + eval_linear, minus its checkpointing and data stack."""
    linear, utils = dinov2_eval.load()
    start, cpu = time.perf_counter(), time.process_time()
    feature_model = utils.ModelWithIntermediateLayers(model, 4, contextlib.nullcontext)
    to_torch = {s: torch.from_numpy(x).permute(0, 3, 1, 2) for s, x in images.items()}
    sample = feature_model(to_torch["train"][:1])
    torch.nn.Module.cuda = lambda self, *a, **k: self  # setup_linear_classifiers moves heads to the GPU
    heads, groups = linear.setup_linear_classifiers(sample, [1, 4], np.asarray(DINOV2_LEARNING_RATES), batch, classes)
    assert len(heads) == 52, f"DINOv2 kept {len(heads)} heads: its names collide at global batch {batch}"
    optimizer = torch.optim.SGD(groups, momentum=0.9, weight_decay=0)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps, eta_min=0)
    y_train = torch.from_numpy(labels["train"])
    per_epoch = len(y_train) // batch
    gen = torch.Generator().manual_seed(0)
    order = None
    for it in range(steps):
        if it % per_epoch == 0:
            order = torch.randperm(len(y_train), generator=gen)
        idx = order[(it % per_epoch) * batch : (it % per_epoch + 1) * batch]
        features = feature_model(to_torch["train"][idx])  # the backbone, every iteration
        outputs = heads(features)
        loss = sum(torch.nn.CrossEntropyLoss()(v, y_train[idx]) for v in outputs.values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()

    def top1(split: str) -> dict[str, float]:
        correct = dict.fromkeys(heads.classifiers_dict, 0)
        with torch.no_grad():
            for i in range(0, len(labels[split]), batch):
                outputs = heads(feature_model(to_torch[split][i : i + batch]))
                y = torch.from_numpy(labels[split][i : i + batch])
                for k, v in outputs.items():
                    correct[k] += int((v.argmax(-1) == y).sum())
        return {k: c / len(labels[split]) for k, c in correct.items()}

    val = top1("val")
    best = max(val, key=val.get)  # evaluate_linear_classifiers: the first strictly best
    test = top1("test")
    return {
        "seconds": time.perf_counter() - start, "cpu_seconds": time.process_time() - cpu, "best": best,
        "val": val[best], "test": test[best],
    }  # fmt: skip


def _extract(backbone, x: np.ndarray, batch: int, names: tuple[str, ...]) -> dict[str, np.ndarray]:
    """The four variants of x from one forward pass per batch; the last batch padded (one compiled shape)."""
    n = len(x)
    x = np.concatenate([x, np.zeros((-n % batch, *x.shape[1:]), x.dtype)])
    parts = [backbone.variants(x[i : i + batch], names) for i in range(0, len(x), batch)]
    return {k: np.concatenate([np.asarray(p[k]) for p in parts])[:n] for k in names}


def run_fxjax(backbone, images, labels, classes: int, batch: int, steps: int) -> dict:
    start, cpu = time.perf_counter(), time.process_time()
    names = tuple(v for v, _, _ in DINOV2_VARIANTS)
    feats = {s: _extract(backbone, x, batch, names) for s, x in images.items()}
    extracted = time.perf_counter() - start
    result = linear_eval.run_linear("dinov2_linear", feats, labels, classes, batch_size=batch, steps=steps)
    sel = result.selection
    return {
        "seconds": time.perf_counter() - start, "cpu_seconds": time.process_time() - cpu,
        "extract_seconds": extracted, "best": sel["value"], "val": sel["val_top1"],
        "test": result.metrics["top1"]["value"],
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--depth", type=int, default=12)
    parser.add_argument("--heads", type=int, default=6)
    parser.add_argument("--image-size", type=int, default=56)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    images, labels = digits(args.image_size)
    steps = args.epochs * (SPLITS["train"] // args.batch)
    model = make_model(args)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"dinov2_bench_heads{args.heads}.pth"
        torch.save(model.state_dict(), path)
        backbone = fxjax.load_backbone(str(path))
    print(
        f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, load average "
        f"{os.getloadavg()[0]:.1f}; torch {torch.__version__} ({args.threads} threads), jax "
        f"{__import__('jax').__version__}; ViT dim {args.dim} depth {args.depth} heads {args.heads} at "
        f"{args.image_size} px; 52 heads, global batch {args.batch}, {steps} steps ({args.epochs} epochs)"
    )
    ours = run_fxjax(backbone, images, labels, 10, args.batch, steps)
    theirs = run_torch(model, images, labels, 10, args.batch, steps)
    print("| | wall s to the final table | CPU s | best head on val | val top-1 | test top-1 |")
    print("|---|---:|---:|---|---:|---:|")
    print(
        f"| fxjax (extract once: {ours['extract_seconds']:.1f} s, then the engine) | {ours['seconds']:.1f} | "
        f"{ours['cpu_seconds']:.1f} | `{ours['best']}` | {ours['val']:.3f} | {ours['test']:.3f} |"
    )
    print(
        f"| PyTorch, dinov2/eval/linear.py (backbone every iteration) | {theirs['seconds']:.1f} | "
        f"{theirs['cpu_seconds']:.1f} | `{theirs['best']}` | {theirs['val']:.3f} | {theirs['test']:.3f} |"
    )
    print(
        f"\nratio PyTorch / fxjax: {theirs['seconds'] / ours['seconds']:.2f}x wall, "
        f"{theirs['cpu_seconds'] / ours['cpu_seconds']:.2f}x CPU"
    )


if __name__ == "__main__":
    main()
