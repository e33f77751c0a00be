"""fxjax as a package people install: the wheel, installed with its dependencies into a fresh venv, gives a
working `fxjax` command from any directory (help, config show, the quickstart, exit 2 on bad input); pyproject's
ranges admit the exact pins the tests run on; every folder of fxjax is a package the wheel ships."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

import fxjax
from fxjax.cli.main import COMMANDS

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def requirements(lines: list[str]) -> dict[str, Requirement]:
    """Requirement lines (comments, blanks and `-r` includes skipped) by canonical package name."""
    kept = (line.split("#")[0].strip() for line in lines)
    return {canonicalize_name(req.name): req for req in (Requirement(line) for line in kept if line and line[0] != "-")}


@pytest.mark.parametrize(
    ("pinned", "declared"),
    [("requirements.txt", "dependencies"), ("requirements-test.txt", "test")],
)
def test_every_pin_is_declared_in_pyproject_and_inside_its_range(pinned, declared):
    pins = requirements((ROOT / pinned).read_text().splitlines())
    listed = PROJECT["dependencies"] if declared == "dependencies" else PROJECT["optional-dependencies"][declared]
    ranges = requirements(listed)
    assert sorted(pins) == sorted(ranges)
    for name, pin in pins.items():
        versions = [spec.version for spec in pin.specifier if spec.operator == "=="]
        assert all(ranges[name].specifier.contains(v, prereleases=True) for v in versions), (pin, ranges[name])


def test_one_version_string():
    assert "version" not in PROJECT and "version" in PROJECT["dynamic"]
    assert re.fullmatch(r"\d+\.\d+\.\d+", fxjax.__version__)


def test_every_folder_of_fxjax_is_a_package():
    # A folder without __init__.py is left out of the wheel (setuptools' find_packages), and the installed
    # fxjax then fails on first import of it.
    folders = {p.parent for p in (ROOT / "fxjax").rglob("*.py")}
    assert sorted(str(f.relative_to(ROOT)) for f in folders if not (f / "__init__.py").is_file()) == []


def outputs_of_the_checkout(folder: str, names: list[str]) -> set[str]:
    """What a clone accumulates beside the sources (its venv, runs, caches), left out of the copy that is built."""
    top = Path(folder) == ROOT
    return {n for n in names if n in (".git", "build", "__pycache__") or n.endswith(".egg-info")} | {
        n for n in names if top and n in (".venv", "venv", "runs", "dist", ".pytest_cache", ".ruff_cache")
    }


def run(command: list[str], *, cwd: Path, env: dict, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_the_wheel_installs_into_a_fresh_venv_and_runs_the_quickstart_from_anywhere(tmp_path):
    # Built from a copy of the tree, so the checkout gets no build/ or egg-info.
    source = tmp_path / "source"
    shutil.copytree(ROOT, source, ignore=outputs_of_the_checkout)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    built = run(
        [sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "-w", str(tmp_path / "dist")], cwd=source, env=env
    )
    assert built.returncode == 0, built.stderr
    (wheel,) = (tmp_path / "dist").glob(f"fxjax-{fxjax.__version__}-py3-none-any.whl")

    venv = tmp_path / "venv"
    started = time.monotonic()
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    installed = run(
        [str(venv / "bin" / "pip"), "install", "--no-compile", str(wheel)], cwd=tmp_path, env=env, timeout=900
    )
    assert installed.returncode == 0, installed.stderr[-3000:]
    print(f"venv + pip install of the wheel with its dependencies: {time.monotonic() - started:.0f} s")

    elsewhere = tmp_path / "elsewhere"  # an empty directory outside the repository
    elsewhere.mkdir()
    env = {**env, "PATH": f"{venv / 'bin'}{os.pathsep}{env['PATH']}", "FXJAX_CACHE_DIR": str(tmp_path / "cache")}
    site = str(venv / "lib")

    where = run(["python", "-c", "import fxjax; print(fxjax.__version__, fxjax.__file__)"], cwd=elsewhere, env=env)
    assert where.returncode == 0, where.stderr
    version, file = where.stdout.split()
    assert version == fxjax.__version__ and file.startswith(site)

    helped = run(["fxjax", "--help"], cwd=elsewhere, env=env)
    assert helped.returncode == 0, helped.stderr
    assert all(f"  {name} " in helped.stdout for name in COMMANDS)
    for name in COMMANDS:  # every command module imports from the installed package
        sub = run(["fxjax", name, "--help"], cwd=elsewhere, env=env)
        assert sub.returncode == 0 and sub.stdout.startswith(f"usage: fxjax {name} "), sub.stderr

    shown = run(["fxjax", "config", "show", "quickstart"], cwd=elsewhere, env=env)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.startswith(f"# {site}") and "/fxjax/configs/quickstart.py:" in shown.stdout.splitlines()[0]
    assert "num_epochs = 30  # default: 10; passes over the training split" in shown.stdout

    quickstart = "fxjax train --config quickstart --workdir w --config.num_epochs=1 --config.image_size=32"
    trained = run(quickstart.split(), cwd=elsewhere, env=env, timeout=600)
    assert trained.returncode == 0, trained.stderr[-3000:]
    last = trained.stdout.strip().splitlines()[-1]
    match = re.fullmatch(r"test_accuracy=(\S+) val_accuracy=\S+ best_step=19 .* workdir=w", last)
    assert match and float(match[1]) > 0.3, last  # 10 classes: chance is 0.1
    assert (elsewhere / "w" / "summary.json").is_file()

    # Bad input: exit 2 and the same one-line error from the installed command and from a clone's launcher.
    bad = ["--config", "no_such_config", "--workdir", "w2"]
    refused = [
        run(["fxjax", "train", *bad], cwd=elsewhere, env=env),
        run(["python", "-m", "launch.train", *bad], cwd=ROOT, env=env),
    ]
    for result in refused:
        assert result.returncode == 2, result.stderr
        assert result.stderr.startswith("error: config file 'no_such_config' not found; ")
        assert result.stderr.count("\n") == 1
    assert refused[0].stderr == refused[1].stderr
