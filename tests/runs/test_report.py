"""Reports of a real tiny run: the page embeds its figures (and nothing external), renders in a real browser,
compares runs, fails in one line on a partial run dir; TensorBoard finds the run's scalars."""

from __future__ import annotations

import base64
import io
import json
import shutil
import struct
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from browser import screenshot
from PIL import Image
from tiny_run import tiny_run

from fxjax.cli import report as report_cli
from fxjax.runs import experiment
from fxjax.runs.metrics import read_metrics

FIGURES = ("curves", "confusion-matrix", "per-class-accuracy", "misclassified")


class _Page(HTMLParser):
    """Images per enclosing <section id>, table rows per <table id>, and every external reference."""

    def __init__(self):
        super().__init__()
        self.section, self.table = None, None
        self.images: dict[str, list[str]] = {}
        self.rows: dict[str, list[list[str]]] = {}
        self.external: list[str] = []
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "section":
            self.section = attrs.get("id")
        elif tag == "table":
            self.table = attrs.get("id")
        elif tag == "tr":
            self.rows.setdefault(self.table, []).append([])
        elif tag in ("td", "th"):
            self._cell = []
        elif tag == "img":
            self.images.setdefault(self.section, []).append(attrs["src"])
        for key in ("src", "href"):
            if key in attrs and not attrs[key].startswith("data:"):
                self.external.append(attrs[key])
        if tag in ("link", "script"):
            self.external.append(tag)

    def handle_endtag(self, tag):
        if tag == "section":
            self.section = None
        elif tag == "table":
            self.table = None
        elif tag in ("td", "th") and self._cell is not None:
            self.rows[self.table][-1].append("".join(self._cell))
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def _parse(path: Path) -> _Page:
    page = _Page()
    page.feed(path.read_text())
    return page


def _decode(src: str) -> tuple[bytes, Image.Image]:
    prefix = "data:image/png;base64,"
    assert src.startswith(prefix)
    data = base64.b64decode(src[len(prefix) :], validate=True)
    image = Image.open(io.BytesIO(data))
    image.load()
    return data, image


def _copy_run(workdir: Path, to: Path) -> Path:
    """The run's records without checkpoints or event files: enough for reports."""
    return Path(
        shutil.copytree(
            workdir, to, ignore=shutil.ignore_patterns("checkpoints", "tensorboard", "*.png", "report.html")
        )
    )


def _write_report(workdir: Path) -> Path:
    assert report_cli.main([str(workdir)]) == 0
    return workdir / "report.html"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return tiny_run(tmp_path_factory)


@pytest.fixture(scope="module")
def report(run):
    return _write_report(run)


def test_report_embeds_curves_confusion_and_misclassified_images(report, run):
    page = _parse(report)
    assert page.external == []  # self-contained: no links, scripts or non-data images
    for section in FIGURES:
        assert len(page.images.get(section, [])) == 1, section
        data, image = _decode(page.images[section][0])
        assert image.format == "PNG" and image.width > 200 and image.height > 100
        assert np.asarray(image.convert("L")).std() > 5, f"{section} figure is blank"
    beside = {p.name for p in run.glob("*.png")}
    assert {"curves.png", "confusion_matrix.png", "per_class_accuracy.png", "misclassified.png"} <= beside
    assert _decode(page.images["curves"][0])[0] == (run / "curves.png").read_bytes()
    summary = json.loads((run / "summary.json").read_text())
    text = report.read_text()
    assert text.index(f"{summary['test_accuracy']:.4f}") < text.index('id="curves"')  # numbers on top
    details = dict(page.rows["details"])
    assert details["backbone"] == "efficientnet-lite0" and details["dataset"] == "digits"


def test_sweep_probes_and_fewshot_sections_show_what_a_real_run_wrote(tmp_path):
    """On the files a real run writes (never hand-made fixtures): the sweep heatmap and its best row, the probes'
    table and the few-shot table, with the numbers of sweep.json, probes.json and fewshot.json."""
    from tiny_run import tiny_config

    config = tiny_config()
    config.sweep.learning_rates, config.sweep.weight_decays = (1e-3, 1e-2), (0.0, 1e-4)
    config.probes, config.fewshot.ks, config.fewshot.seeds = ("ridge",), (1, 5), (0, 1)
    experiment.run(config, tmp_path / "run")
    workdir = tmp_path / "run"
    page = _parse(workdir / "report.html")
    sweep, probes = json.loads((workdir / "sweep.json").read_text()), json.loads((workdir / "probes.json").read_text())
    fewshot = json.loads((workdir / "fewshot.json").read_text())["rows"]
    assert len(page.images["sweep"]) == 1 and _decode(page.images["sweep"][0])[1].width > 200
    best = page.rows["sweep-best"]
    assert best[0][0] == "variant" and best[1][3] == f"{sweep['best']['val_accuracy']:.4f}"
    assert page.rows["probes-table"][1][0] == "ridge"
    assert page.rows["probes-table"][1][3] == f"{probes['probes'][0]['test_accuracy']:.4f}"
    table = page.rows["fewshot-table"]
    assert table[0] == ["k", "probe", "mean accuracy", "std", "seeds"]
    assert [r[0] for r in table[1:]] == ["1", "5"]
    assert table[1][2] == f"{fewshot[0]['mean_accuracy']:.4f}" and table[1][3] == f"{fewshot[0]['std_accuracy']:.4f}"
    assert table[1][4] == "2"


def test_without_the_dataset_the_rest_of_the_report_is_still_written(run, tmp_path):
    workdir = _copy_run(run, tmp_path / "moved")
    config = json.loads((workdir / "config.json").read_text())
    config["data"]["source"] = f"folder:{tmp_path / 'gone'}"
    (workdir / "config.json").write_text(json.dumps(config))
    (workdir / "test_labels.npy").unlink(missing_ok=True)
    page = _parse(_write_report(workdir))
    assert len(page.images["curves"]) == 1 and "misclassified" not in page.images
    text = (workdir / "report.html").read_text()
    assert "test images unavailable" in text and "no test labels" in text


def test_missing_file_is_a_one_line_error_naming_it(run, tmp_path, capsys):
    workdir = _copy_run(run, tmp_path / "partial")
    (workdir / "summary.json").unlink()
    assert report_cli.main([str(workdir)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "summary.json" in err and err.startswith("error:")
    assert not (workdir / "report.html").exists()


def test_comparison_has_one_table_with_both_runs_and_overlaid_curves(run, tmp_path, capsys):
    other = _copy_run(run, tmp_path / "second_run")
    summary = json.loads((other / "summary.json").read_text())
    (other / "summary.json").write_text(json.dumps({**summary, "test_accuracy": 0.125}))
    out = tmp_path / "cmp"
    assert report_cli.main([str(run), str(other), "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out / "comparison.html")
    page = _parse(out / "comparison.html")
    assert list(page.rows) == ["runs"] and page.external == []
    header, *rows = page.rows["runs"]
    assert header[:5] == ["run", "backbone", "dataset", "test accuracy", "val accuracy"]
    assert [r[0] for r in rows] == [run.name, "second_run"]
    assert rows[1][3] == "0.1250" and rows[0][1] == "efficientnet-lite0" and rows[0][2] == "digits"
    data, image = _decode(page.images[None][0])
    assert data == (out / "val_curves.png").read_bytes() and image.width > 200


def test_headless_browser_renders_the_report(report, tmp_path):
    pixels = screenshot(report, tmp_path / "shot.png")
    assert (pixels.min(axis=2) < 200).mean() > 0.02, "screenshot is blank"
    r, g, b = pixels[..., 0], pixels[..., 1], pixels[..., 2]
    orange = (r > 220) & (g > 100) & (g < 160) & (b < 60)  # matplotlib's tab:orange, the validation curve
    assert orange.sum() > 50, "the embedded curves image did not render"


def _tfrecords(path: Path):
    """The records of a TFRecord file (length, crc, payload, crc), as TensorBoard reads event files."""
    data, offset = path.read_bytes(), 0
    while offset < len(data):
        (length,) = struct.unpack("<Q", data[offset : offset + 8])
        yield data[offset + 12 : offset + 12 + length]
        offset += 12 + length + 4


def test_tensorboard_event_file_holds_the_metrics(run):
    from tensorboardX.proto.event_pb2 import Event

    files = list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert len(files) == 1  # the name `tensorboard --logdir` looks for
    scalars = {}
    for record in _tfrecords(files[0]):
        event = Event.FromString(record)
        for value in event.summary.value:
            scalars.setdefault(value.tag, {})[event.step] = value.simple_value
    for record in read_metrics(run):
        for key, value in record.items():
            if key not in ("step", "split"):
                assert scalars[f"{record['split']}/{key}"][record["step"]] == pytest.approx(value, rel=1e-6)


def test_tensorboard_finds_the_scalars(run):
    pytest.importorskip("tensorboard", reason="tensorboard is not installed (pip install tensorboard)")
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer

    multiplexer = EventMultiplexer()
    multiplexer.AddRunsFromDirectory(str(run))  # what `tensorboard --logdir <run>` does
    multiplexer.Reload()
    tags = multiplexer.Runs()["tensorboard"]["scalars"]
    assert {
        "train/loss",
        "train/accuracy",
        "train/learning_rate",
        "val/accuracy",
        "val/loss",
        "test/accuracy",
    } <= set(tags)
    val_steps = [e.step for e in multiplexer.Scalars("tensorboard", "val/accuracy")]
    assert val_steps == [r["step"] for r in read_metrics(run) if r["split"] == "val"]
