"""A benchmark suite: backbones × datasets × protocols into one table (what CLIP_benchmark and VTAB do).

Features are extracted once per (backbone, dataset) through the feature cache, by the same `Setup` a run uses;
each (backbone, dataset, protocol) cell is its own resumable unit, written atomically to
`cells/<backbone>/<dataset>/<protocol>.json`, so a killed suite reruns only the cells it had not finished. The
workdir is a record: a rerun whose config would change what a finished cell means (its protocol's settings, the
image size, the seed, the data split, ...) is refused naming what changed; new backbones, datasets or protocols
only add cells. The results: `suite.json` (every cell, metrics with bootstrap CIs), `suite.md` (top-1 in %, rows
backbone × dataset, columns protocols) and `suite.html` (the table as a heatmap).
"""

from __future__ import annotations

import dataclasses
import hashlib
import html
import json
import re
import time
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from matplotlib.figure import Figure
from ml_collections import config_dict

from fxjax import config as config_lib
from fxjax.data.vtab import vtab_task
from fxjax.evaluate import catalog
from fxjax.evaluate.results import ProtocolResult, markdown_table
from fxjax.progress import Progress
from fxjax.runs import rundir
from fxjax.runs.report import _figure, _page, _table, png
from fxjax.runs.rundir import RunDir
from fxjax.runs.setup import Setup, check_same_meaning

SUITE_CONFIG, SUITE_JSON, SUITE_TABLE, SUITE_REPORT = "suite_config.json", "suite.json", "suite.md", "suite.html"
CELLS = "cells"
SPLITS = ("train", "val", "test")
# The run-config keys a suite may set for every (backbone, dataset) under `config.run`: how features are
# computed and how the data is split. Backbone, data source, data_dir, image size and seed are the suite's own.
RUN_KEYS = ("revision", "dtype", "param_dtype", "cache_dir", "eval_batch_size", "data", "mesh")
RUN_DATA_KEYS = ("val_fraction", "test_fraction", "split_seed", "few_shot_k", "worker_count")


def _run_schema() -> ml_collections.ConfigDict:
    run = config_lib.default_config()
    for key in [k for k in run.keys() if k not in RUN_KEYS]:
        del run[key]
    for key in [k for k in run.data.keys() if k not in RUN_DATA_KEYS]:
        del run.data[key]
    return run


def _settings_schema(name: str) -> ml_collections.ConfigDict:
    """A protocol's settings as typed keys; a default of None (derived from the batch) takes an integer."""
    settings = ml_collections.ConfigDict()
    for key, value in catalog.protocol_defaults(name).items():
        settings[key] = config_dict.placeholder(int) if value is None else value
    return settings


def suite_schema() -> ml_collections.ConfigDict:
    """Every key a suite config may set, with its default and type (overrides are parsed as these types)."""
    c = ml_collections.ConfigDict()
    c.backbones = ()  # built-in names, checkpoint folders or files, Hub ids (as config.backbone takes them)
    c.datasets = ()  # data sources (as config.data.source takes them)
    c.protocols = ()  # names in fxjax.evaluate.catalog.NAMES (recipes and the SGD linear evaluations)
    # Per-protocol settings, defaulting to the reference's own (catalog.protocol_defaults(name)).
    c.overrides = ml_collections.ConfigDict({name: _settings_schema(name) for name in catalog.NAMES})
    c.data_dir = config_dict.placeholder(str)  # TFDS data_dir, or the folder of IDX files
    c.image_size = config_dict.placeholder(int)  # every backbone's input size; unset: each backbone's own
    c.seed = 0  # the run seed of every (backbone, dataset)
    c.run = _run_schema()  # run-config keys for every (backbone, dataset): dtype, eval_batch_size, data splits
    return c


def resolve_suite(user: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The schema overlaid with the user's suite config, checked; unknown keys and bad values are errors."""
    suite = config_lib.overlay(user, suite_schema())
    for key in ("backbones", "datasets", "protocols"):
        names = suite[key]
        if not names or not all(isinstance(n, str) and n for n in names):
            raise ValueError(f"config.{key}={tuple(names)}: give one or more names")
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"config.{key} lists {repeated[0]!r} twice")
    for name in suite.protocols:
        if name not in catalog.NAMES:
            raise ValueError(f"config.protocols: unknown protocol {name!r}; known: {', '.join(catalog.NAMES)}")
    for name in suite.datasets:
        if name.startswith("vtab:"):
            try:
                vtab_task(name.removeprefix("vtab:"))  # an unknown or unsupported task fails before any cell runs
            except ValueError as e:
                raise ValueError(f"config.datasets: {e}") from None
    if suite.image_size is not None and suite.image_size <= 0:
        raise ValueError(f"config.image_size={suite.image_size}: must be > 0")
    suite.lock()
    return suite


def suite_override(suite: ml_collections.ConfigDict, dotted: str, text: str) -> None:
    """A command-line `--config.a.b=text` on a suite config, typed by the suite schema."""
    config_lib.override(suite, dotted, text, schema=suite_schema())


def find_suite(name_or_path: str) -> Path:
    """A suite config: a path to a file, or the name of a shipped suite (configs/suites/<name>.py)."""
    shipped = config_lib.shipped_dir() / "suites" / f"{name_or_path}.py"
    if not Path(name_or_path).is_file() and "/" not in name_or_path and shipped.is_file():
        return shipped
    return config_lib.find_config(name_or_path)


def pair_config(suite: ml_collections.ConfigDict, backbone: str, dataset: str) -> ml_collections.ConfigDict:
    """The resolved run config that extracts `backbone`'s features of `dataset` for the suite."""
    config = config_lib.overlay(suite.run, config_lib.default_config())
    config.backbone, config.data.source, config.data.data_dir = backbone, dataset, suite.data_dir
    config.image_size, config.seed = suite.image_size, suite.seed
    config.protocols = tuple(suite.protocols)  # Setup extracts the feature variants they read
    return config_lib.resolve(config)


def _slug(name: str) -> str:
    """A file-name-safe folder for a backbone or dataset name; a hash keeps altered names apart."""
    if re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        return name
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", label(name)).strip("._-")[-48:]
    return f"{safe}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"


def label(name: str) -> str:
    """How a backbone or dataset appears in the tables: paths by their last component."""
    prefix, sep, rest = name.rpartition(":") if name.startswith("folder:") else ("", "", name)
    shown = Path(rest).name if rest.startswith(("/", ".", "~")) else rest
    return f"{prefix}{sep}{shown}"


def _plain(obj: Any) -> Any:
    """As JSON would read it back (tuples as lists, numpy scalars as numbers), so records compare equal."""
    return json.loads(json.dumps(obj, default=rundir._jsonable))


@dataclasses.dataclass(frozen=True)
class Cell:
    backbone: str
    dataset: str
    protocol: str
    file: str  # relative to the workdir
    config: ml_collections.ConfigDict  # the run config its features come from
    meaning: dict  # what the result depends on: the run config (sweep aside) and the protocol's settings

    @property
    def name(self) -> str:
        return f"{self.backbone} × {self.dataset} × {self.protocol}"


def plan(suite: ml_collections.ConfigDict) -> list[Cell]:
    """Every cell, in table order: backbones, then datasets, then protocols."""
    cells = []
    for backbone in suite.backbones:
        for dataset in suite.datasets:
            config = pair_config(suite, backbone, dataset)
            run = config.to_dict()
            for key in ("sweep", "protocols", "protocol_overrides"):  # what else is computed: not this cell's meaning
                run.pop(key)
            for protocol in suite.protocols:
                meaning = _plain({**run, "protocol": protocol, "settings": suite.overrides[protocol].to_dict()})
                file = f"{CELLS}/{_slug(backbone)}/{_slug(dataset)}/{protocol}.json"
                cells.append(Cell(backbone, dataset, protocol, file, config, meaning))
    return cells


def _environment(setup: Setup) -> dict:
    """What a cell also depends on beyond its config: the weights and the data actually read."""
    return _plain(
        {
            "backbone": setup.backbone.info.get("name"),
            "weight_sha256": setup.backbone.info.get("weight_sha256"),
            "dataset": setup.data.name,
            "dataset_fingerprint": setup.data.fingerprint,
        }
    )


def run_suite(suite_config: ml_collections.ConfigDict, workdir: str | Path) -> dict:
    """Runs (or resumes) the suite in `workdir`; → the contents of suite.json (on process 0; {} elsewhere)."""
    suite = resolve_suite(suite_config)
    cells = plan(suite)
    root = RunDir(workdir).prepare()
    primary = jax.process_index() == 0
    lock = root.lock() if primary else None
    try:
        for cell in cells:  # refuse before any work
            if root.has(cell.file):
                check_same_meaning(root, root.read(cell.file)["meaning"], cell.meaning, what=f"cell {cell.name}")
        if primary:
            root.write(SUITE_CONFIG, suite.to_dict())
        _run_cells(root, cells, primary)
        if not primary:  # process 0 writes the cells; the others need not see its disk
            return {}
        summary = {"suite": _plain(suite.to_dict()), **tabulate([root.read(c.file) for c in cells])}
        root.write(SUITE_JSON, summary)
        root.write(SUITE_TABLE, suite_markdown(summary))
        root.write(SUITE_REPORT, suite_html(summary, root.path))
        return summary
    finally:
        if lock is not None:
            lock.close()


def _run_cells(root: RunDir, cells: list[Cell], primary: bool) -> None:
    pairs: dict[tuple[str, str], list[Cell]] = {}
    for cell in cells:
        pairs.setdefault((cell.backbone, cell.dataset), []).append(cell)
    done = sum(root.has(c.file) for c in cells)
    with Progress(len(cells), desc="suite", unit="cell", initial=done) as progress:
        for (backbone, dataset), group in pairs.items():
            todo = [c for c in group if not root.has(c.file)]
            if not todo:
                continue
            setup = Setup.from_config(todo[0].config)
            environment = _environment(setup)
            for finished in (c for c in group if root.has(c.file)):
                if root.read(finished.file)["environment"] != environment:
                    raise ValueError(
                        f"workdir {str(root.path)!r} holds cells of {backbone} on {dataset} computed from other "
                        "weights or other data (weight or dataset fingerprint differs): use a new --workdir"
                    )
            feats, labels, _ = setup.cached_features()
            feats = {s: {v: np.asarray(x) for v, x in feats[s].items()} for s in SPLITS}
            for cell in todo:
                start = time.perf_counter()
                result = catalog.evaluate_protocol(
                    cell.protocol,
                    feats,
                    labels,
                    setup.data.num_classes,
                    mesh=setup.mesh,
                    seed=setup.config.seed,
                    overrides=cell.meaning["settings"],
                )
                result.labels = {"backbone": label(backbone), "dataset": label(dataset)}
                record = {
                    "backbone": backbone,
                    "dataset": dataset,
                    "protocol": cell.protocol,
                    "seconds": time.perf_counter() - start,
                    "environment": environment,
                    "meaning": cell.meaning,
                    "result": result.to_dict(),
                }
                if primary:
                    (root / cell.file).parent.mkdir(parents=True, exist_ok=True)
                    root.write(cell.file, record)
                progress.update(1, cell=cell.name)


# ---------------------------------------------------------------------------------------------------- tables


def _top1_columns(protocol: str, metrics: dict) -> list[tuple[str, dict]]:
    """A protocol's top-1 entries as table columns: one, or one per shot count for few-shot protocols."""
    if "top1" in metrics:
        return [(protocol, metrics["top1"])]
    shots = sorted((int(k.split("@")[1].removesuffix("shot")), k) for k in metrics if k.startswith("top1@"))
    return [(f"{protocol} {n}-shot", metrics[k]) for n, k in shots]


def tabulate(records: list[dict]) -> dict:
    """The cells, and the table of top-1 (fractions) with rows backbone × dataset and a column per protocol."""
    columns, rows = [], {}
    for record in records:
        row = rows.setdefault((record["backbone"], record["dataset"]), {})
        for column, entry in _top1_columns(record["protocol"], record["result"]["metrics"]):
            columns += [column] if column not in columns else []
            row[column] = entry
    table = [
        {"backbone": b, "dataset": d, "label": f"{label(b)} · {label(d)}", "top1": row} for (b, d), row in rows.items()
    ]
    cells = [{k: v for k, v in r.items() if k != "meaning"} for r in records]  # the cell files keep the meaning
    return {"columns": columns, "table": table, "cells": cells}


def _percent(entry: dict | None, ci: bool = False) -> str:
    if entry is None or entry.get("value") is None:
        return "–"
    text = f"{100 * entry['value']:.1f}"
    if ci and entry.get("ci_low") is not None and entry.get("ci_high") is not None:
        text += f" [{100 * entry['ci_low']:.1f}, {100 * entry['ci_high']:.1f}]"
    return text


def suite_markdown(summary: dict) -> str:
    """suite.md: the top-1 table in %, then every cell with its chosen hyper-parameter and all metrics."""
    columns = summary["columns"]
    lines = [
        "# Benchmark suite",
        "",
        "Top-1 accuracy (%) on each dataset's test split; few-shot columns are the mean over seeds.",
        "",
        "| backbone | dataset | " + " | ".join(columns) + " |",
        "|---|---|" + "---:|" * len(columns),
    ]
    for row in summary["table"]:
        values = [_percent(row["top1"].get(c)) for c in columns]
        lines.append(f"| {label(row['backbone'])} | {label(row['dataset'])} | " + " | ".join(values) + " |")
    results = [ProtocolResult(**cell["result"]) for cell in summary["cells"]]
    lines += ["", "## Every cell", "", "Values in %, [95% bootstrap CI]; few-shot: mean ± std over seeds [CI].", ""]
    return "\n".join(lines) + "\n" + markdown_table(results)


def heatmap_figure(summary: dict) -> Figure:
    """Top-1 per (backbone · dataset) row and protocol column, the value written in each cell."""
    columns, table = summary["columns"], summary["table"]
    grid = np.array([[np.nan if (e := r["top1"].get(c)) is None or e["value"] is None else 100 * e["value"]
                      for c in columns] for r in table])  # fmt: skip
    fig = Figure(figsize=(min(2 + 1.4 * len(columns), 20), min(1.5 + 0.45 * len(table), 30)), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(grid, cmap="viridis", vmin=0, vmax=100, aspect="auto")
    for (i, j), value in np.ndenumerate(grid):
        if np.isfinite(value):
            ax.text(j, i, f"{value:.1f}", ha="center", va="center", fontsize=8,
                    color="black" if value > 60 else "white")  # fmt: skip
    ax.set_xticks(range(len(columns)), columns, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(table)), [r["label"] for r in table], fontsize=8)
    ax.set(title="top-1 accuracy (%), test split")
    fig.colorbar(image, ax=ax, label="top-1 %")
    return fig


def suite_html(summary: dict, workdir: Path) -> str:
    """suite.html: the heatmap (embedded PNG), the table, and every cell with CIs and the chosen setting."""
    columns = summary["columns"]
    rows = [[label(r["backbone"]), label(r["dataset"]), *(_percent(r["top1"].get(c)) for c in columns)]
            for r in summary["table"]]  # fmt: skip
    cells = []
    for cell in summary["cells"]:
        result = cell["result"]
        for column, entry in _top1_columns(cell["protocol"], result["metrics"]):
            chosen = result["selection"]
            cells.append([label(cell["backbone"]), label(cell["dataset"]), column,
                          f"{chosen.get('param')}={chosen.get('value')} ({chosen.get('on')})",
                          _percent(entry, ci=True), f"{cell['seconds']:.2f}"])  # fmt: skip
    body = [
        "<h1>Benchmark suite</h1>",
        f"<p class=note><code>{html.escape(str(workdir))}</code></p>",
        '<section id="heatmap"><h2>Top-1 accuracy</h2>',
        _figure("heatmap", png(heatmap_figure(summary)), "top-1 accuracy (%) per backbone · dataset and protocol"),
        _table(["backbone", "dataset", *columns], rows, table_id="suite-table"),
        "</section>",
        '<section id="cells"><h2>Every cell</h2>',
        _table(["backbone", "dataset", "protocol", "chosen", "top-1 % [95% CI]", "seconds"], cells, "cells-table"),
        "</section>",
    ]
    return _page("fxjax benchmark suite", body)
