"""Metrics of a run: one JSON line per record in metrics.jsonl, mirrored to TensorBoard. Process 0 writes."""

from __future__ import annotations

import json
from pathlib import Path

import jax

from fxjax.runs import rundir
from fxjax.runs.rundir import RunDir


class MetricsWriter:
    def __init__(self, run: RunDir, *, resume_step: int = 0):
        self.enabled = jax.process_index() == 0
        self.path = run / RunDir.METRICS
        self._tb = None
        if not self.enabled:
            return
        self._truncate_after(resume_step)
        self._file = self.path.open("a")
        from tensorboardX import SummaryWriter

        self._tb = SummaryWriter(str(run / RunDir.TENSORBOARD), purge_step=resume_step or None)

    def _truncate_after(self, step: int) -> None:
        """A resumed run redoes the steps after its checkpoint, and the final test evaluation: drop their old
        records so none is doubled."""
        if not self.path.exists():
            return
        records = [line for line in self.path.read_text().splitlines() if line]
        kept = [line for line in records if json.loads(line)["step"] <= step and json.loads(line)["split"] != "test"]
        rundir.write_text(self.path, "".join(line + "\n" for line in kept))

    def write(self, step: int, split: str, metrics: dict) -> None:
        if not self.enabled:
            return
        record = {"step": step, "split": split, **{k: float(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        for key, value in metrics.items():
            self._tb.add_scalar(f"{split}/{key}", float(value), step)

    def close(self) -> None:
        if self.enabled:
            self._file.close()
            self._tb.close()

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_metrics(workdir: str | Path) -> list[dict]:
    return RunDir(workdir).read(RunDir.METRICS, default=[])
