"""Every shell command that README.md and docs/*.md show works as written: each runs, in order, in a copy of the
tracked files (a fresh clone's layout), through bash from the copy's root, and exits 0. `fxjax` is the clone's own
code (a shim on PATH runs `python -m fxjax.cli`, as `pip install .` would install it).

What cannot run here is skipped by the explicit list SKIPPED, each with its reason; commands that differ from the
documented text only in what makes them cheap are listed in CHEAPER."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = ("README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md")))

# A command, or one `&&`-joined part of it, matching one of these is not run (pattern → why).
SKIPPED = {
    r"^python3 -m venv \.venv$": "creates a fresh venv (the tests run inside one already)",
    r"^\. \.venv/bin/activate$": "activates that venv",
    r"^pip install ": "installs from the package index (tests/test_package.py installs the wheel into a fresh venv)",
    r"^python -m pytest$": "the test suite itself",
    r"^tfds build ": "downloads CIFAR-10 (network)",
    r"^tensorboard ": "a server that runs until stopped",
    r"vit_b16_cifar10": "needs the Hugging Face Hub and a prepared TFDS dataset",
    r"^sbatch ": "needs a SLURM cluster",
    r"launch/tpu_pod\.sh": "needs a Cloud TPU pod",
    r"^python -m launch\.train \.\.\. ": "a placeholder (`...`) for the arguments of a run, shown for its flags",
}
# The quickstart's 224 px features of 1,797 images take minutes on a loaded 2-core CPU; at 32 px, seconds; its 30
# epochs (and the sweep's 6 heads x 30 epochs) become 2. The same override goes to every command of the quickstart
# config, so reruns on its workdirs see the same config. The pixels baseline at the quickstart's 224 px holds
# 150,528 raw pixels per image: at 32 px, 3,072. The offline suite's pixels row (27,648 raw pixels per image
# through 45 logistic regressions) takes longer than the rest of this test together: the suite runs its
# EfficientNet-Lite0 row, at 32 px, with 3 values of C and 13 of CLIP's λ (of 45 and 97), 30 iterations each.
EPOCHS = "--config.num_epochs=2"
CHEAPER = {
    r"(--config (configs/quickstart\.py|quickstart))(?=\s|$)": rf"\1 --config.image_size=32 {EPOCHS}",
    r"(--config configs/pixels_digits\.py)(?=\s|$)": rf"\1 --config.image_size=32 {EPOCHS}",
    r"(--config (configs/suites/offline\.py|offline))(?=\s|$)": (
        r"\1 --config.image_size=32 --config.backbones=efficientnet-lite0"
        r" '--config.overrides.dinov2_logreg.c_powers=(-1.0,1.0,3)' --config.overrides.dinov2_logreg.max_iter=30"
        r" '--config.overrides.clip_linear_probe.lambda_powers=(-4.0,2.0)'"
        r" --config.overrides.clip_linear_probe.per_decade=2 --config.overrides.clip_linear_probe.max_iter=30"
    ),
}


def shell_commands(document: str) -> list[str]:
    """The commands of a document's ```bash blocks, in order: continuation lines joined, blank lines and
    comment lines dropped."""
    text = (ROOT / document).read_text()
    commands = []
    for block in re.findall(r"^```(?:bash|sh|shell)\n(.*?)^```", text, flags=re.S | re.M):
        for line in block.replace("\\\n", " ").splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                commands.append(line.strip())
    return commands


def runnable(command: str) -> str | None:
    """The command without its skipped `&&` parts, made cheaper where CHEAPER says; None if nothing is left."""
    code = command.split(" #")[0].strip()
    kept = [part for part in code.split(" && ") if not any(re.search(p, part.strip()) for p in SKIPPED)]
    if not kept:
        return None
    joined = " && ".join(kept)
    for pattern, replacement in CHEAPER.items():
        joined = re.sub(pattern, replacement, joined)
    return joined


def write_images(folder: Path, count: int) -> None:
    """The user's own images the predict commands name (photo.jpg, more_images/): grey digit-like scans."""
    folder.mkdir(exist_ok=True)
    rng = np.random.default_rng(count)
    for i in range(count):
        Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(folder / f"scan_{i}.png")


def test_the_skip_list_is_small_and_every_entry_is_used():
    commands = [c for doc in DOCUMENTS for c in shell_commands(doc)]
    assert len(commands) >= 15
    used = {p for p in SKIPPED for c in commands for part in c.split(" #")[0].split(" && ") if re.search(p, part)}
    assert sorted(used) == sorted(SKIPPED)  # no stale entry hides a command
    assert len(SKIPPED) <= 10
    assert sum(runnable(c) is not None for c in commands) >= 12


@pytest.mark.slow
def test_every_documented_command_works_as_written(tmp_path):
    clone = tmp_path / "clone"
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True, check=True)
    for name in filter(None, tracked.stdout.split("\0")):
        if (ROOT / name).is_file():
            (clone / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, clone / name)
    shim = tmp_path / "bin" / "fxjax"
    shim.parent.mkdir()
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m fxjax.cli "$@"\n')
    shim.chmod(0o755)
    env = {
        **os.environ,
        "PATH": f"{shim.parent}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "FXJAX_CACHE_DIR": str(tmp_path / "cache"),
        "HF_HUB_OFFLINE": "1",
    }
    Image.fromarray(np.full((30, 20, 3), 200, np.uint8)).save(clone / "photo.jpg")
    write_images(clone / "more_images", 3)

    ran = []
    for document in DOCUMENTS:
        for command in shell_commands(document):
            line = runnable(command)
            if line is None:
                continue
            done = subprocess.run(["bash", "-c", line], cwd=clone, env=env, capture_output=True, text=True, timeout=600)
            assert done.returncode == 0, f"{document}: {line}\n{done.stderr[-3000:]}"
            assert "Traceback" not in done.stderr, f"{document}: {line}\n{done.stderr[-3000:]}"
            ran.append((line, done))

    assert len(ran) >= 12
    outputs = {line: done.stdout for line, done in ran}
    trained = next(out for line, out in outputs.items() if "--workdir runs/quickstart" in line)
    assert re.search(r"test_accuracy=0\.\d+ .* workdir=runs/quickstart$", trained.strip())
    assert (clone / "runs/quickstart/report.html").is_file()
    assert (clone / "comparison/comparison.html").is_file()
    assert (clone / "exported/digits/classifier.json").is_file()
    predictions = (clone / "predictions.json").read_text()
    assert predictions.count('"path"') == 3 and "error" not in predictions
