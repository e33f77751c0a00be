"""What this machine can do at best: fp32 multiply-add peak and memory copy bandwidth (bounds for the benches)."""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np


def fma_peak_flops_per_second() -> float | None:
    """The CPU's fp32 multiply-add peak over all cores, from `bench/fma_peak.c` (None without a C compiler)."""
    with tempfile.TemporaryDirectory() as tmp:
        binary = Path(tmp) / "fma_peak"
        source = Path(__file__).with_name("fma_peak.c")
        try:
            subprocess.run(["cc", "-O2", "-march=native", "-pthread", str(source), "-o", str(binary)], check=True)
            out = subprocess.run([str(binary), str(os.cpu_count())], check=True, capture_output=True, text=True)
        except (OSError, subprocess.CalledProcessError) as error:
            print(f"(no FMA peak: {error})")
            return None
    return float(out.stdout) * 1e9


def copy_bytes_per_second(megabytes: int = 64, iters: int = 10) -> float:
    """Bytes read + written per second by a large numpy copy (one thread; best of `iters`)."""
    src = np.ones(megabytes << 18, np.float32)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(iters):
        start = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - start)
    return 2 * src.nbytes / best
