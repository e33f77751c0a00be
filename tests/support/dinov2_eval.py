"""Test and benchmark reference only: DINOv2's linear evaluation code (`dinov2/eval/linear.py`, `dinov2/eval/utils.py`)
imported for real, with the imports it needs only for its CLI, checkpoints and metrics (fvcore, torchmetrics,
omegaconf, its dataset stack) stubbed: create_linear_input, LinearClassifier, AllClassifiers, scale_lr,
setup_linear_classifiers and ModelWithIntermediateLayers are DINOv2's own code."""

from __future__ import annotations

import contextlib
import enum
import sys
import types


class _Placeholder:
    """Stands in for the unused classes (torchmetrics.Metric, fvcore's Checkpointer, ...)."""


class _MetricType(enum.Enum):  # dinov2.eval.metrics.MetricType's default, named in run_eval_linear's signature
    MEAN_ACCURACY = "mean_accuracy"


_STUBS = {
    "fvcore": {},
    "fvcore.common": {},
    "fvcore.common.checkpoint": {"Checkpointer": _Placeholder, "PeriodicCheckpointer": _Placeholder},
    "torchmetrics": {"MetricCollection": _Placeholder, "Metric": _Placeholder},
    "dinov2.data": {
        "SamplerType": None, "make_data_loader": None, "make_dataset": None, "DatasetWithEnumeratedTargets": None,
    },
    "dinov2.data.transforms": {"make_classification_eval_transform": None, "make_classification_train_transform": None},
    "dinov2.eval.metrics": {"MetricType": _MetricType, "build_metric": None},
    "dinov2.eval.setup": {"get_args_parser": None, "setup_and_build_model": None},
}  # fmt: skip


@contextlib.contextmanager
def stubbed(stubs: dict[str, dict]):
    """sys.modules[name] replaced by a module holding only `attrs`, for each {name: attrs}, then restored."""
    saved = {name: sys.modules.get(name) for name in stubs}
    for name, attrs in stubs.items():
        module = types.ModuleType(name)
        module.__dict__.update(attrs)
        sys.modules[name] = module
    try:
        yield
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


def load() -> tuple[types.ModuleType, types.ModuleType]:
    """→ (dinov2.eval.linear, dinov2.eval.utils), DINOv2's modules."""
    with stubbed(_STUBS):
        for name in ("dinov2.eval.linear", "dinov2.eval.utils"):
            sys.modules.pop(name, None)
        from dinov2.eval import linear, utils
    return linear, utils
