"""bench/machine.py's machine bounds: the fp32 FMA peak compiles and runs bench/fma_peak.c for this CPU."""

import importlib.util
import os
import shutil
from pathlib import Path

import pytest

BENCH = Path(__file__).parents[1] / "bench"


def _machine():
    spec = importlib.util.spec_from_file_location("machine", BENCH / "machine.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(shutil.which("cc") is None, reason="needs a C compiler")
def test_fma_peak_compiles_for_this_cpu_and_reports_a_plausible_peak(capsys):
    peak = _machine().fma_peak_flops_per_second()
    assert peak is not None, capsys.readouterr().out  # None: cc or the binary failed (it says why)
    # Above 1 GFLOP/s, below what any x86 core can issue: 2 FMAs of 16 floats (2 flops each) per cycle at 6 GHz.
    assert 1e9 < peak < os.cpu_count() * 2 * 16 * 2 * 6e9
