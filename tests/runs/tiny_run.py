"""One real tiny run (the quickstart config at 32 px, 2 epochs), made once per pytest session and shared by
the report and export tests: a run costs most of their time."""

from __future__ import annotations

from pathlib import Path

from fxjax.cli import train as train_cli
from fxjax.runs import experiment

_RUNS: dict[Path, Path] = {}  # pytest's base temp dir → the run made in it


def tiny_config():
    config = train_cli.load_config_file("configs/quickstart.py")
    config.image_size = 32
    config.num_epochs = 2
    config.eval_every_epochs = 1
    return config


def tiny_run(tmp_path_factory) -> Path:
    base = tmp_path_factory.getbasetemp()
    if base not in _RUNS:
        workdir = tmp_path_factory.mktemp("tiny_run")
        experiment.run(tiny_config(), workdir)
        _RUNS[base] = workdir
    return _RUNS[base]
