"""One result shape for every protocol, so a suite can put (backbone, dataset, protocol) cells in one table.

A result says what was run (`settings`, the protocol's defaults with any overrides applied), how the
hyper-parameter was chosen and on what (`selection`), the test metrics with bootstrap intervals (`metrics`),
how many examples each split had and what the final model was fitted on (`splits`), and optional per-k or
per-shot `rows`. `labels` (backbone, dataset, ...) is left for the suite runner to fill.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any


@dataclasses.dataclass
class ProtocolResult:
    protocol: str
    settings: dict[str, Any]
    selection: dict[str, Any]  # {"param", "value", "on": "val" | "train_holdout" | "loo" | "kfold" | "fixed", ...}
    metrics: dict[str, dict[str, Any]]  # name -> {"value", "ci_low", "ci_high"[, "per_seed", "std"]}
    splits: dict[str, Any]  # {"train": n, "val": n, "test": n, "fit_on": "train+val", ...}
    rows: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    labels: dict[str, str] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return _finite(dataclasses.asdict(self))


def _finite(obj: Any) -> Any:
    """NaN becomes None: JSON has no NaN, and a missing metric (top-5 with 5 classes) is not a number."""
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def to_json(results: Sequence[ProtocolResult]) -> str:
    return json.dumps({"results": [r.to_dict() for r in results]}, indent=2, sort_keys=False) + "\n"


def write_json(results: Sequence[ProtocolResult], path: str | Path) -> None:
    Path(path).write_text(to_json(results))


def _cell(entry: dict[str, Any]) -> str:
    value = entry.get("value")
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    text = f"{100 * value:.1f}"
    if "std" in entry:
        text += f" ± {100 * entry['std']:.1f}"
    lo, hi = entry.get("ci_low"), entry.get("ci_high")
    if lo is not None and hi is not None and not (math.isnan(lo) or math.isnan(hi)):
        text += f" [{100 * lo:.1f}, {100 * hi:.1f}]"
    return text


def _chosen(selection: dict[str, Any]) -> str:
    if selection.get("param") is None:
        return "–"
    value = selection.get("value")
    shown = f"{value:.3g}" if isinstance(value, float) else str(value)
    return f"{selection['param']}={shown} ({selection.get('on', '?')})"


def markdown_table(results: Sequence[ProtocolResult]) -> str:
    """One row per result: its labels, protocol, chosen hyper-parameter, then every metric any result has.

    Cells read `value [ci_low, ci_high]` in percent; few-shot cells `mean ± std over seeds [CI]`.
    """
    label_keys = list(dict.fromkeys(k for r in results for k in r.labels))
    metric_keys = list(dict.fromkeys(k for r in results for k in r.metrics))
    header = [*label_keys, "protocol", "chosen", *metric_keys]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * (len(label_keys) + 2) + "---:|" * len(metric_keys)]
    for r in results:
        cells = [r.labels.get(k, "") for k in label_keys] + [r.protocol, _chosen(r.selection)]
        cells += [_cell(r.metrics[k]) if k in r.metrics else "" for k in metric_keys]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_markdown(results: Sequence[ProtocolResult], path: str | Path) -> None:
    Path(path).write_text(markdown_table(results))
