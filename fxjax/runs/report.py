"""What a run learned, as pages people can open: `report.html` (self-contained, every figure embedded as a
base64 PNG) with the PNGs beside it, and a side-by-side comparison of several runs.

Everything is read back from the run directory, so a report can be regenerated at any time, on any machine
that can read the run (the misclassified-image strip also needs the dataset). Figures are drawn on bare
`matplotlib.figure.Figure` objects (Agg renderer, no pyplot), so making a report never touches the caller's
global matplotlib state.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from fxjax.data.preprocess import to_rgb
from fxjax.runs import rundir
from fxjax.runs.rundir import RunDir

RUN_FILES = (RunDir.CONFIG, RunDir.ENVIRONMENT, RunDir.SUMMARY, RunDir.METRICS, RunDir.PREDICTIONS)
COMPARE_FILES = (RunDir.CONFIG, RunDir.SUMMARY, RunDir.METRICS)
MAX_MISCLASSIFIED = 16
_ANNOTATE_UP_TO = 20  # classes: beyond this, confusion-matrix cells are too small for numbers


@dataclass
class Run:
    dir: RunDir
    config: dict
    summary: dict
    metrics: list[dict]
    environment: dict

    @property
    def path(self) -> Path:
        return self.dir.path


def read_run(workdir: str | Path, required: Sequence[str] = RUN_FILES) -> Run:
    """The run's records, or a one-line RunDirError naming the first missing or unreadable file."""
    run = RunDir(workdir)
    run.require(*required)
    return Run(
        run,
        run.read(RunDir.CONFIG),
        run.read(RunDir.SUMMARY),
        run.read(RunDir.METRICS, default=[]),
        run.read(RunDir.ENVIRONMENT, default={}),
    )


# ---------------------------------------------------------------------------------------------------- figures


def png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return buffer.getvalue()


def _series(metrics: list[dict], split: str, key: str) -> tuple[list[int], list[float]]:
    points = sorted((r["step"], r[key]) for r in metrics if r.get("split") == split and key in r)
    return [s for s, _ in points], [v for _, v in points]


def curves_figure(metrics: list[dict], best_step: int | None = None) -> Figure:
    """Loss and accuracy against step, train and validation; the test result marked at the best step."""
    fig = Figure(figsize=(10, 3.6), layout="constrained")
    for ax, key in zip(fig.subplots(1, 2), ("loss", "accuracy")):
        for split, style in (("train", "-"), ("val", "o-")):
            steps, values = _series(metrics, split, key)
            if steps:
                ax.plot(steps, values, style, label=split, markersize=4)
        steps, values = _series(metrics, "test", key)
        if steps:
            ax.plot(steps, values, "r*", markersize=11, label="test (best checkpoint)")
        if best_step is not None:
            ax.axvline(best_step, color="grey", linestyle=":", linewidth=1)
        ax.set(xlabel="step", ylabel=key, title=key)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return fig


def confusion(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
    """counts [true, predicted]."""
    matrix = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(matrix, (labels, predictions), 1)
    return matrix


def confusion_figure(matrix: np.ndarray, class_names: Sequence[str]) -> Figure:
    """Colour is the row-normalised rate (so rare classes show up), numbers are counts."""
    n = len(class_names)
    side = min(max(4.5, 0.45 * n + 2), 24)
    fig = Figure(figsize=(side + 1, side), layout="constrained")
    ax = fig.subplots()
    rates = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    image = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, shrink=0.8, label="fraction of the true class")
    if n <= 60:
        ax.set_xticks(range(n), [_short(c) for c in class_names], rotation=90, fontsize=8)
        ax.set_yticks(range(n), [_short(c) for c in class_names], fontsize=8)
    if n <= _ANNOTATE_UP_TO:
        for (i, j), count in np.ndenumerate(matrix):
            if count:
                ax.text(
                    j,
                    i,
                    str(count),
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="white" if rates[i, j] > 0.5 else "black",
                )
    ax.set(xlabel="predicted", ylabel="true", title="confusion matrix (test)")
    return fig


def per_class_figure(matrix: np.ndarray, class_names: Sequence[str]) -> Figure:
    n = len(class_names)
    support = matrix.sum(axis=1)
    accuracy = np.divide(np.diag(matrix), support, out=np.zeros(n), where=support > 0)
    fig = Figure(figsize=(8, min(max(3, 0.28 * n + 1), 30)), layout="constrained")
    ax = fig.subplots()
    ax.barh(range(n), accuracy, color="tab:blue")
    ax.set_yticks(range(n), [f"{_short(c)} (n={s})" for c, s in zip(class_names, support)], fontsize=8)
    ax.invert_yaxis()
    ax.axvline(np.trace(matrix) / max(matrix.sum(), 1), color="tab:red", linestyle="--", label="overall")
    ax.set(xlim=(0, 1), xlabel="accuracy", title="per-class accuracy (test)")
    ax.legend(fontsize=8, loc="lower right")
    return fig


def sweep_figure(table: list[dict]) -> Figure:
    """Validation accuracy over the (learning rate, weight decay) grid, one panel per feature variant."""
    variants = sorted({str(r.get("variant", "")) for r in table})
    rates = sorted({r["learning_rate"] for r in table})
    decays = sorted({r["weight_decay"] for r in table})
    fig = Figure(figsize=(min(4.5 * len(variants), 18), 0.45 * len(rates) + 2.2), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(variants), squeeze=False)[0])
    best = max(r["val_accuracy"] for r in table)
    image = None
    for ax, variant in zip(axes, variants):
        grid = np.full((len(rates), len(decays)), np.nan)
        for r in table:
            if str(r.get("variant", "")) == variant:
                grid[rates.index(r["learning_rate"]), decays.index(r["weight_decay"])] = r["val_accuracy"]
        image = ax.imshow(
            grid, cmap="viridis", vmin=np.nanmin([r["val_accuracy"] for r in table]), vmax=best, aspect="auto"
        )
        for (i, j), value in np.ndenumerate(grid):
            if np.isfinite(value):
                ax.text(
                    j,
                    i,
                    f"{value:.3f}",
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="black" if value == best else "white",
                    weight="bold" if value == best else None,
                )
                if value == best:
                    ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2))
        ax.set_xticks(range(len(decays)), [f"{d:g}" for d in decays], rotation=45, fontsize=8)
        ax.set_yticks(range(len(rates)), [f"{lr:g}" for lr in rates], fontsize=8)
        ax.set(xlabel="weight decay", ylabel="learning rate", title=variant or "sweep")
    fig.colorbar(image, ax=list(axes), label="val accuracy")
    return fig


def misclassified_figure(images: Sequence[np.ndarray], true: Sequence[str], predicted: Sequence[str]) -> Figure:
    columns = min(len(images), 8)
    rows = -(-len(images) // columns)
    fig = Figure(figsize=(1.6 * columns, 1.9 * rows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, columns, squeeze=False).ravel())
    for ax in axes:
        ax.axis("off")
    for ax, image, t, p in zip(axes, images, true, predicted):
        ax.imshow(to_rgb(np.asarray(image, np.uint8)), interpolation="nearest")
        ax.set_title(f"true: {_short(t)}\npred: {_short(p)}", fontsize=8)
    return fig


def val_curves_figure(runs: Sequence[tuple[str, list[dict]]]) -> Figure:
    fig = Figure(figsize=(10, 3.8), layout="constrained")
    for ax, key in zip(fig.subplots(1, 2), ("accuracy", "loss")):
        for label, metrics in runs:
            steps, values = _series(metrics, "val", key)
            ax.plot(steps, values, "o-", markersize=3, label=label)
        ax.set(xlabel="step", ylabel=f"val {key}", title=f"validation {key}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return fig


def _short(name: str, limit: int = 16) -> str:
    return name if len(name) <= limit else name[: limit - 1] + "…"


# ---------------------------------------------------------------------------------------------------- report


def write_report(workdir: str | Path, *, dataset=None, max_misclassified: int = MAX_MISCLASSIFIED) -> Path:
    """Writes report.html and its PNGs into `workdir` and returns the page's path.

    `dataset` (an `fxjax.data.sources.Dataset`) saves reloading the data when the caller has it; otherwise
    it is loaded as config.json says, for the misclassified images (and the labels of runs without
    test_labels.npy). When the data cannot be had, those sections say why and the rest is still written.
    """
    run = read_run(workdir)
    class_names = list(run.environment.get("class_names") or [])
    predictions = run.dir.read(RunDir.PREDICTIONS)
    notes: dict[str, str] = {}
    test_split, labels = None, None
    if run.dir.has(RunDir.LABELS):
        labels = run.dir.read(RunDir.LABELS)
    try:
        test_split = _test_split(run, dataset, len(predictions))
    except (OSError, ValueError, ImportError) as err:
        notes["misclassified"] = f"test images unavailable: {err}"
    if labels is None and test_split is not None:
        labels = np.asarray([test_split.label(i) for i in range(len(test_split))], np.int64)
    if not class_names and labels is not None:
        class_names = [str(i) for i in range(int(max(labels.max(), predictions.max())) + 1)]

    figures: dict[str, tuple[str, bytes]] = {}  # section id → (file name, PNG)
    figures["curves"] = ("curves.png", png(curves_figure(run.metrics, run.summary.get("best_step"))))
    if labels is not None and len(labels) == len(predictions):
        matrix = confusion(labels, predictions, len(class_names))
        figures["confusion-matrix"] = ("confusion_matrix.png", png(confusion_figure(matrix, class_names)))
        figures["per-class-accuracy"] = ("per_class_accuracy.png", png(per_class_figure(matrix, class_names)))
        wrong = np.flatnonzero(labels != predictions)[:max_misclassified]
        if test_split is not None and len(wrong):
            images = [test_split[int(i)]["image"] for i in wrong]
            fig = misclassified_figure(
                images, [class_names[labels[i]] for i in wrong], [class_names[predictions[i]] for i in wrong]
            )
            figures["misclassified"] = ("misclassified.png", png(fig))
        elif test_split is not None:
            notes["misclassified"] = "no test image was misclassified"
    else:
        notes["confusion-matrix"] = "no test labels: test_labels.npy is missing and the dataset could not be read"
    sweep = run.dir.read(RunDir.SWEEP, default={}) or None
    if sweep and sweep.get("table"):
        figures["sweep"] = ("sweep.png", png(sweep_figure(sweep["table"])))
    fewshot = run.dir.read(RunDir.FEWSHOT, default={}) or None

    for name, data in figures.values():
        run.dir.write(name, data)
    probes = run.dir.read(RunDir.PROBES, default={}) or None
    return run.dir.write(RunDir.REPORT, _report_html(run, figures, notes, sweep, fewshot, probes))


def _test_split(run: Run, dataset, expected: int):
    """The test split the predictions refer to, checked against the run's record of it."""
    if dataset is None:
        from fxjax.runs.setup import Setup

        dataset = Setup.from_record(run.config).data
    recorded = run.environment.get("dataset_fingerprint", {}).get("test")
    if recorded is not None and dataset.fingerprint["test"] != recorded:
        raise ValueError(f"the test split of {dataset.name} changed since the run (fingerprint differs)")
    split = dataset.splits["test"]
    if len(split) != expected:
        raise ValueError(f"the test split has {len(split)} examples but the run predicted {expected}")
    return split


# -------------------------------------------------------------------------------------------- comparison


def compare_runs(workdirs: Sequence[str | Path], out: str | Path = "comparison") -> Path:
    """Writes comparison.html (one table, a row per run, and overlaid validation curves) and val_curves.png
    into `out`; returns the page's path."""
    runs = [read_run(w, COMPARE_FILES) for w in workdirs]
    labels = _run_labels([r.path for r in runs])
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    curves = png(val_curves_figure([(label, r.metrics) for label, r in zip(labels, runs)]))
    rundir.write_bytes(out / "val_curves.png", curves)
    header = [
        "run",
        "backbone",
        "dataset",
        "test accuracy",
        "val accuracy",
        "best step",
        "train seconds",
        "images/s",
    ]
    rows = []
    for label, r in zip(labels, runs):
        s = r.summary
        rows.append(
            [
                label,
                s.get("backbone", r.config.get("backbone")),
                s.get("dataset", r.config.get("data", {}).get("source")),
                _num(s.get("test_accuracy"), 4),
                _num(s.get("val_accuracy"), 4),
                _num(s.get("best_step")),
                _num(s.get("train_seconds"), 1),
                _num(s.get("images_per_second"), 0),
            ]
        )
    body = [
        "<h1>Run comparison</h1>",
        _table(header, rows, table_id="runs"),
        _figure("val-curves", curves, "validation accuracy and loss of every run"),
        "<p class=note>Runs: " + ", ".join(f"<code>{html.escape(str(r.path))}</code>" for r in runs) + "</p>",
    ]
    page = out / "comparison.html"
    rundir.write_bytes(page, _page("fxjax run comparison", body).encode())
    return page


def _run_labels(paths: Sequence[Path]) -> list[str]:
    """Folder names where they tell the runs apart, otherwise the paths as given."""
    names = [p.name or str(p) for p in paths]
    return names if len(set(names)) == len(names) else [str(p) for p in paths]


# ---------------------------------------------------------------------------------------------------- HTML

_STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:24px auto;max-width:1100px;color:#222;
padding:0 16px}
h1{font-size:1.5em;margin-bottom:4px}h2{font-size:1.15em;margin-top:32px;border-bottom:1px solid #ddd}
.cards{display:flex;flex-wrap:wrap;gap:12px;margin:16px 0}
.card{background:#f4f6fa;border-radius:8px;padding:10px 16px;min-width:120px}
.card .value{font-size:1.6em;font-weight:600}.card .label{font-size:.8em;color:#555}
table{border-collapse:collapse;font-size:.9em;margin:8px 0}
th,td{border:1px solid #ddd;padding:4px 10px;text-align:left}th{background:#f4f6fa}
td.num{text-align:right;font-variant-numeric:tabular-nums}
figure{margin:8px 0}img{max-width:100%;height:auto}figcaption{font-size:.85em;color:#555}
.note{color:#666;font-size:.9em}code{font-size:.9em}
"""


def _page(title: str, body: list[str]) -> str:
    return (
        "<!DOCTYPE html>\n<html lang=en>\n<head>\n<meta charset=utf-8>\n"
        f"<title>{html.escape(title)}</title>\n"
        f"<style>{_STYLE}</style>\n</head>\n<body>\n" + "\n".join(body) + "\n</body>\n</html>\n"
    )


def _figure(section_id: str, data: bytes, caption: str) -> str:
    encoded = base64.b64encode(data).decode("ascii")
    return (
        f'<figure id="{section_id}-figure"><img src="data:image/png;base64,{encoded}" '
        f'alt="{html.escape(caption)}"><figcaption>{html.escape(caption)}</figcaption></figure>'
    )


def _num(value, digits: int | None = None) -> str:
    if value is None:
        return "–"
    if digits is None or isinstance(value, int):
        return str(value)
    return f"{value:,.{digits}f}"


def _table(header: Sequence[str] | None, rows: Sequence[Sequence], table_id: str | None = None) -> str:
    def cell(value) -> str:
        text = html.escape(str(value))
        numeric = text.replace(",", "").replace(".", "", 1).lstrip("-").isdigit()
        return f"<td class=num>{text}</td>" if numeric else f"<td>{text}</td>"

    head = "<thead><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr></thead>" if header else ""
    body = "".join("<tr>" + "".join(cell(v) for v in row) + "</tr>" for row in rows)
    attr = f' id="{table_id}"' if table_id else ""
    return f"<table{attr}>{head}<tbody>{body}</tbody></table>"


_CAPTIONS = {
    "curves": (
        "Training and validation curves",
        "loss and accuracy against step; the dotted line is the best step",
    ),
    "confusion-matrix": (
        "Confusion matrix",
        "test split; colour is the fraction of each true class, numbers count",
    ),
    "per-class-accuracy": ("Per-class accuracy", "test split; the dashed line is the overall accuracy"),
    "sweep": (
        "Hyper-parameter sweep",
        "validation accuracy per learning rate and weight decay; the best framed in red",
    ),
    "misclassified": ("Misclassified test images", "the first misclassified test examples, in test order"),
}


def _percent(entry: dict | None) -> str:
    """A protocol metric as `value [ci_low, ci_high]` in percent (– where it is not defined)."""
    if not entry or entry.get("value") is None:
        return "–"
    text = f"{100 * entry['value']:.1f}"
    if entry.get("ci_low") is not None and entry.get("ci_high") is not None:
        text += f" [{100 * entry['ci_low']:.1f}, {100 * entry['ci_high']:.1f}]"
    return text


def _protocols_section(run: Run) -> str:
    """The named protocols' table (protocols.json): chosen setting, test metrics with 95% bootstrap intervals."""
    results = run.dir.read(RunDir.PROTOCOLS, default={}).get("results") or []
    if not results:
        return ""
    rows = []
    for r in results:
        sel, metrics = r.get("selection") or {}, r.get("metrics") or {}
        chosen = f"{sel.get('param')}={sel.get('value')} ({sel.get('on')})" if sel.get("param") else "–"
        batch = (r.get("settings") or {}).get("global_batch")
        rows.append(
            [r.get("protocol"), chosen, *(_percent(metrics.get(k)) for k in ("top1", "top5", "mean_per_class_recall")),
             "–" if batch is None else batch]
        )  # fmt: skip
    header = ["protocol", "chosen", "top-1 % [95% CI]", "top-5 %", "mean per-class recall %", "global batch"]
    return (
        '<section id="protocols"><h2>Named protocols on the cached features</h2>'
        + _table(header, rows, table_id="protocols-table")
        + "<p class=note>Every head's numbers: protocols.json; the global batch scales the linear heads' learning "
        "rates (x batch / 256).</p></section>"
    )


def _report_html(
    run: Run, figures: dict, notes: dict, sweep: dict | None, fewshot: dict | None, probes: dict | None = None
) -> str:
    s, c, env = run.summary, run.config, run.environment
    backbone = env.get("backbone", {})
    cards = [
        ("test accuracy", _num(s.get("test_accuracy"), 4)),
        ("val accuracy", _num(s.get("val_accuracy"), 4)),
        ("best step", f"{_num(s.get('best_step'))} / {_num(s.get('total_steps'))}"),
        ("train seconds", _num(s.get("train_seconds"), 1)),
        ("images / s", _num(s.get("images_per_second"), 0)),
        ("mode", _num(s.get("mode"))),
    ]
    details = [
        ("backbone", backbone.get("name", c.get("backbone"))),
        ("revision", backbone.get("revision")),
        ("weight sha256", backbone.get("weight_sha256")),
        ("dataset", s.get("dataset", env.get("dataset"))),
        ("classes", s.get("num_classes", len(env.get("class_names", [])))),
        ("test examples", s.get("test_examples")),
        ("image size", c.get("image_size")),
        ("head", c.get("head", {}).get("kind")),
        ("freeze", c.get("freeze")),
        ("optimizer", c.get("optimizer", {}).get("name")),
        ("learning rate", c.get("optimizer", {}).get("learning_rate")),
        ("batch size", c.get("batch_size")),
        ("epochs", c.get("num_epochs")),
        ("feature extraction seconds", _num(s.get("extract_seconds"), 1)),
        ("git commit", env.get("git_commit")),
    ]
    body = [
        f"<h1>Run report: {html.escape(run.path.name)}</h1>",
        f"<p class=note><code>{html.escape(str(run.path))}</code></p>",
        '<div class=cards id="summary">'
        + "".join(
            f"<div class=card><div class=value>{html.escape(v)}</div><div class=label>{html.escape(k)}</div></div>"
            for k, v in cards
        )
        + "</div>",
        _table(None, [(k, "–" if v is None else v) for k, v in details], table_id="details"),
    ]
    for section, (title, caption) in _CAPTIONS.items():
        if section == "sweep" and sweep is None:
            continue
        body.append(f'<section id="{section}"><h2>{title}</h2>')
        if section in figures:
            body.append(_figure(section, figures[section][1], caption))
        if section == "sweep" and sweep.get("best"):
            best = sweep["best"]
            keys = ("variant", "learning_rate", "weight_decay", "val_accuracy", "test_accuracy")
            body.append(
                "<p>The run's head: the best of the sweep on validation.</p>"
                + _table(
                    ["variant", "learning rate", "weight decay", "val accuracy", "test accuracy"],
                    [[_num(best.get(k), 4) if "accuracy" in k else best.get(k) for k in keys]],
                    table_id="sweep-best",
                )
            )
        if section in notes:
            body.append(f"<p class=note>{html.escape(notes[section])}</p>")
        body.append("</section>")
    if probes is not None:
        rows = [
            [p.get("name"), f"{p.get('param')}={_num(p.get('best'))}", _num(p.get("val_accuracy"), 4),
             _num(p.get("test_accuracy"), 4)]
            for p in probes.get("probes", [])
        ]  # fmt: skip
        body.append(
            '<section id="probes"><h2>Probes on the cached features</h2>'
            + _table(["probe", "chosen", "val accuracy", "test accuracy"], rows, table_id="probes-table")
            + "</section>"
        )
    if fewshot is not None:
        rows = [
            [r.get("k"), r.get("probe"), _num(r.get("mean_accuracy"), 4), _num(r.get("std_accuracy"), 4),
             len(r.get("seeds") or [])]
            for r in fewshot.get("rows", [])
        ]  # fmt: skip
        body.append(
            '<section id="fewshot"><h2>Few-shot accuracy</h2>'
            + _table(["k", "probe", "mean accuracy", "std", "seeds"], rows, table_id="fewshot-table")
            + "</section>"
        )
    body.append(_protocols_section(run))
    return _page(f"fxjax report: {run.path.name}", body)
