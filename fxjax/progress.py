"""Progress of long work, readable both on a terminal and in a batch log.

On a terminal: a tqdm bar refreshed at most a few times a second. Elsewhere (Slurm logs, CI, a pipe): one line
every `FXJAX_PROGRESS_SECONDS` (default 30) with the count, the rate, the ETA and the latest values, so a day-long
run writes kilobytes, not gigabytes. Only process 0 reports.
"""

from __future__ import annotations

import os
import sys
import time

import jax
from tqdm import tqdm

REFRESH_SECONDS = 0.25  # terminal bar
_DEFAULT_LOG_SECONDS = 30.0


def _format_seconds(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    """`with Progress(total, desc=..., unit=...) as p: p.update(n, loss=...)`."""

    def __init__(
        self,
        total: int,
        *,
        desc: str,
        unit: str,
        initial: int = 0,
        stream=None,
        every: float | None = None,
        clock=time.perf_counter,
    ):
        self.total, self.desc, self.unit = total, desc, unit
        self.count = self.start_count = initial
        self.stream = stream or sys.stderr
        self.enabled = jax.process_index() == 0
        self.interactive = self.enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.every = (
            every if every is not None else float(os.environ.get("FXJAX_PROGRESS_SECONDS", _DEFAULT_LOG_SECONDS))
        )
        self.clock = clock
        self.started = self.last = clock()
        self.last_reading = self.started
        self.values: dict[str, str] = {}
        self.bar = None
        if self.interactive:
            self.bar = tqdm(
                total=total, initial=initial, desc=desc, unit=unit, file=self.stream, mininterval=REFRESH_SECONDS
            )

    def __enter__(self) -> Progress:
        return self

    @property
    def rate(self) -> float:
        elapsed = self.last_reading - self.started
        return (self.count - self.start_count) / elapsed if elapsed > 0 else 0.0

    def update(self, n: int = 1, **values) -> None:
        self.count += n
        self.last_reading = now = self.clock()
        self.values.update({k: f"{v:.4g}" if isinstance(v, float) else str(v) for k, v in values.items()})
        if self.bar is not None:
            self.bar.update(n)
            if values:
                self.bar.set_postfix(self.values, refresh=False)  # drawn with the next refresh, not every step
        elif self.enabled and now - self.last >= self.every:
            self._line()

    def _line(self) -> None:
        self.last = self.last_reading
        rate = self.rate
        eta = _format_seconds((self.total - self.count) / rate) if rate > 0 else "?"
        extra = "".join(f" {k}={v}" for k, v in self.values.items())
        print(
            f"{self.desc}: {self.count}/{self.total} {self.unit} ({rate:.1f} {self.unit}/s, eta {eta}){extra}",
            file=self.stream,
            flush=True,
        )

    def close(self) -> None:
        """Closes the bar; in a log, a last line unless the latest one already said it all."""
        if self.bar is not None:
            self.bar.close()
        elif self.enabled and self.count > self.start_count and self.last != self.last_reading:
            self._line()

    def __exit__(self, *exc) -> None:
        self.close()
