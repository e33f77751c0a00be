"""Protocols that train linear heads by SGD, as data for the head engine: DINOv2's linear evaluation, VTAB-1k.

These need the engine that trains H stacked heads with per-head hyper-parameters, so here they are specs only:
what heads to train on which features, with which optimiser and schedule, selected on which split, reported
on which. `LinearEvalSpec.heads(global_batch)` expands the grid into one row per head.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from fxjax.data.vtab import VTAB_TASKS, VtabTask

# dinov2/eval/linear.py get_args_parser defaults.
DINOV2_LEARNING_RATES = (1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1)

# DINOv2's four feature inputs (`create_linear_input` over n_last_blocks_list = [1, 4], avgpool in [False, True])
# as fxjax's backbone VARIANTS: every block output goes through the final norm; "pooled" is the last block's
# normed CLS for DINOv2 / ViT; the avgpool variants append the mean of the last block's normed patch tokens.
DINOV2_VARIANTS = (
    ("pooled", 1, False),
    ("pooled_avgpool", 1, True),
    ("cls_last4", 4, False),
    ("cls_last4_avgpool", 4, True),
)


@dataclasses.dataclass(frozen=True)
class LinearEvalSpec:
    """A grid of linear heads trained together on frozen features; the best on `select_on` is reported."""

    name: str
    reference: str
    variants: tuple[tuple[str, int, bool], ...] = DINOV2_VARIANTS  # (feature variant, last blocks, avgpool)
    base_learning_rates: tuple[float, ...] = DINOV2_LEARNING_RATES
    reference_batch: int = 256  # lr = base_lr * global_batch / 256 (dinov2 linear.py scale_lr)
    batch_size_per_device: int = 128  # dinov2 --batch-size, per GPU
    epochs: int = 10  # dinov2: 10 epochs of epoch_length 1250 iterations = 12,500 SGD steps
    epoch_length: int = 1250
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 0.0
    schedule: str = "cosine"  # torch CosineAnnealingLR over all iterations, eta_min = 0, no warmup
    final_learning_rate: float = 0.0
    head_init_std: float = 0.01  # weight ~ N(0, 0.01), bias 0 (dinov2 LinearClassifier)
    bias_init: float = 0.0
    select_on: str = "val"
    select_metric: str = "top1"
    report_on: str = "test"

    @property
    def steps(self) -> int:
        return self.epochs * self.epoch_length

    def heads(self, global_batch: int) -> list[dict[str, Any]]:
        """One row per head, in DINOv2's order (blocks, then avgpool, then learning rate), with its scaled lr
        and DINOv2's classifier name."""
        if global_batch < 1:
            raise ValueError(f"global_batch must be a positive number of examples, got {global_batch}")
        rows = []
        for variant, blocks, avgpool in self.variants:
            for base in self.base_learning_rates:
                lr = base * global_batch / self.reference_batch
                rows.append(
                    {
                        "name": f"classifier_{blocks}_blocks_avgpool_{avgpool}_lr_{lr:.5f}".replace(".", "_"),
                        "variant": variant,
                        "base_learning_rate": base,
                        "learning_rate": lr,
                    }
                )
        return rows

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "steps": self.steps}


DINOV2_LINEAR = LinearEvalSpec(
    name="dinov2_linear",
    reference="dinov2/eval/linear.py (setup_linear_classifiers, scale_lr, LinearClassifier, run_eval_linear)",
)


@dataclasses.dataclass(frozen=True)
class VtabSpec:
    """VTAB-1k: choose hyper-parameters on train800 -> val200, retrain on all 1000, report on the full test."""

    name: str = "vtab1k"
    reference: str = "Zhai et al. 2019 (arXiv 1910.04867) section 3; google-research/task_adaptation"
    tasks: tuple[VtabTask, ...] = VTAB_TASKS
    train_examples: int = 800
    val_examples: int = 200
    heads: LinearEvalSpec = dataclasses.field(
        default_factory=lambda: dataclasses.replace(DINOV2_LINEAR, name="vtab1k_linear", select_on="val200")
    )
    stages: tuple[dict[str, str], ...] = (
        {"stage": "select", "train": "train800", "eval": "val200"},
        {"stage": "final", "train": "train800val200", "eval": "test"},
    )

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "heads": self.heads.to_dict()}


VTAB1K = VtabSpec()

LINEAR_SPECS: dict[str, LinearEvalSpec | VtabSpec] = {"dinov2_linear": DINOV2_LINEAR, "vtab1k": VTAB1K}
