"""Bad input, table-driven, through the real `fxjax` entry point: for each of the cases below, every command
(train, extract, verify, report, export, predict, config show) exits 2 with one `error:` line on stderr naming
the key or the file at fault (argparse's usage lines may precede its error), no traceback, and the sandbox holding
every workdir, run and file the cases name is unchanged to the byte (a workdir that did not exist is still
absent). Cases marked cheap are refused before any backbone loads.

Each case runs in-process through `fxjax.cli.main.main(argv)` (a subprocess per case would cost minutes of jax
start-up); a few run again as subprocesses for the real exit status and stderr of the command line."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fxjax.cli import main as cli

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "runs"))
from tiny_run import tiny_run  # noqa: E402 - one tiny run per session, shared with the export and report tests

ROOT = Path(__file__).resolve().parents[2]
# The finished tiny run's config, as a command line (a rerun with it alone would change nothing).
TINY = "--config quickstart --config.image_size=32 --config.num_epochs=2 --config.eval_every_epochs=1"
NEW = "--config quickstart --workdir {S}/new"  # a workdir that does not exist yet

# (name, command line with {S} for the sandbox, what the message must name, cheap: refused before a backbone loads)
CASES = [
    # train: the config file
    ("no such config", "train --config no_such_config --workdir {S}/new", "no_such_config", True),
    ("config syntax error", "train --config {S}/configs/syntax.py --workdir {S}/new", "syntax.py, line 2", True),
    ("config imports nothing", "train --config {S}/configs/missing_module.py --workdir {S}/new", "line 1", True),
    ("config without get_config", "train --config {S}/configs/no_get_config.py --workdir {S}/new", "get_config", True),
    ("config file is a folder", "train --config {S}/empty --workdir {S}/new", "is a folder", True),
    # train: keys and values
    ("misspelled key", f"train {NEW} --config.num_epoch=3", "num_epoch", True),
    ("misspelled nested key", f"train {NEW} --config.optimizer.lerning_rate=0.1", "optimizer.lerning_rate", True),
    ("int from a word", f"train {NEW} --config.eval_batch_size=abc", "eval_batch_size", True),
    ("float from a word", f"train {NEW} --config.optimizer.learning_rate=fast", "optimizer.learning_rate", True),
    ("bool from a word", f"train {NEW} --config.data.augment=maybe", "data.augment", True),
    ("zero interval", f"train {NEW} --config.log_every_steps=0", "log_every_steps", True),
    ("zero epochs", f"train {NEW} --config.num_epochs=0", "num_epochs", True),
    ("negative batch size", f"train {NEW} --config.batch_size=-8", "batch_size", True),
    ("batch size the devices do not divide", f"train {NEW} --config.batch_size=12", "batch_size", True),
    ("batch size over the training split", f"train {NEW} --config.batch_size=4096", "batch_size", True),
    ("zero learning rate", f"train {NEW} --config.optimizer.learning_rate=0", "optimizer.learning_rate", True),
    ("zero image size", f"train {NEW} --config.image_size=0", "image_size", True),
    ("unknown head", f"train {NEW} --config.head.kind=transformer", "head.kind", True),
    ("unknown optimizer", f"train {NEW} --config.optimizer.name=lion", "optimizer.name", True),
    ("unknown dtype", f"train {NEW} --config.dtype=float8", "dtype", True),
    ("label smoothing of 1", f"train {NEW} --config.optimizer.label_smoothing=1.0", "label_smoothing", True),
    ("unknown probe", f"train {NEW} --config.probes=('ridge','lasso')", "lasso", True),
    ("negative few-shot k", f"train {NEW} --config.data.few_shot_k=-1", "few_shot_k", True),
    ("zero few-shot k in the protocol", f"train {NEW} --config.fewshot.ks=(0,5)", "fewshot.ks", True),
    (
        "linear protocol batch over the training split",
        f"train {NEW} --config.protocols=dinov2_linear --config.protocol_overrides.dinov2_linear.batch_size=4096",
        "batch_size",
        True,
    ),
    ("unknown dataset", f"train {NEW} --config.data.source=nowhere", "nowhere", True),
    ("missing folder dataset", f"train {NEW} --config.data.source=folder:{{S}}/absent", "absent", True),
    ("folder dataset is a file", f"train {NEW} --config.data.source=folder:{{S}}/file.txt", "is a file", True),
    ("empty validation split", f"train {NEW} --config.data.val_fraction=0", "val_fraction", True),
    ("validation fraction over 1", f"train {NEW} --config.data.val_fraction=1.5", "config.data.val_fraction=1.5", True),
    # train: the backbone (found to be bad only by loading it)
    ("unknown backbone", f"train {NEW} --config.backbone=resnet-9000", "resnet-9000", False),
    ("empty backbone folder", f"train {NEW} --config.backbone={{S}}/empty", "has no config.json", False),
    ("backbone file fxjax cannot read", f"train {NEW} --config.backbone={{S}}/file.txt", "file.txt", False),
    # train: the workdir
    ("workdir is a file", "train --config quickstart --workdir {S}/file.txt", "is a file", True),
    ("workdir under a file", "train --config quickstart --workdir {S}/file.txt/run", "is a file", True),
    (
        "split changed on a finished run",
        f"train {TINY} --workdir {{S}}/run --config.data.split_seed=1",
        "split_seed",
        True,
    ),
    ("head changed on a finished run", f"train {TINY} --workdir {{S}}/run --config.head.kind=mlp", "head.kind", True),
    # train: the command line
    ("unknown argument", f"train {NEW} --confg.num_epochs=3", "--confg.num_epochs=3", True),
    ("missing --workdir", "train --config quickstart", "--workdir", True),
    ("--num_processes not a number", f"train {NEW} --num_processes two", "--num_processes", True),
    ("unknown command", "trian --config quickstart", "trian", True),
    # extract
    ("extract: bad value", "extract --config quickstart --config.eval_batch_size=0", "eval_batch_size", True),
    ("extract: no such config", "extract --config nope.py", "nope.py", True),
    ("extract: missing folder", "extract --config quickstart --config.data.source=folder:{S}/absent", "absent", True),
    # verify
    ("verify: missing folder", "verify --folder {S}/absent", "absent", True),
    ("verify: folder is a file", "verify --folder {S}/file.txt", "is a file", True),
    ("verify: config without a folder", "verify --config quickstart", "data.source", True),
    ("verify: nothing to verify", "verify", "--folder", True),
    # config show
    ("config show: no such config", "config show nope", "nope", True),
    ("config show: misspelled key", "config show quickstart --config.num_epoch=3", "num_epoch", True),
    ("config show: bad value", "config show quickstart --config.num_epochs=many", "num_epochs", True),
    ("config: no action", "config", "<action>", True),
    # report
    ("report: missing workdir", "report {S}/absent", "absent", True),
    ("report: workdir without a summary", "report {S}/no_summary", "summary.json", True),
    ("report: malformed summary", "report {S}/bad_summary", "summary.json", True),
    ("report: --out for one run", "report {S}/run --out {S}/cmp", "--out", True),
    # export
    ("export: missing workdir", "export {S}/absent {S}/out", "absent", True),
    ("export: workdir without a summary", "export {S}/no_summary {S}/out", "summary.json", True),
    ("export: malformed summary", "export {S}/bad_summary {S}/out", "summary.json", True),
    ("export: truncated checkpoint", "export {S}/truncated_checkpoint {S}/out", "checkpoints", True),
    ("export: output exists", "export {S}/run {S}/exported", "exported", True),
    ("export: output is a file", "export {S}/run {S}/file.txt", "file.txt is a file", True),
    # predict
    ("predict: not a classifier folder", "predict {S}/empty {S}/images", "classifier.json", True),
    ("predict: malformed classifier.json", "predict {S}/bad_json {S}/images", "classifier.json", True),
    ("predict: classifier.json lacks a key", "predict {S}/no_head_key {S}/images", "classifier.json", True),
    ("predict: truncated head", "predict {S}/truncated_head {S}/images", "head.safetensors", True),
    ("predict: no images in the folder", "predict {S}/exported {S}/empty", "empty", True),
    ("predict: zero top-k", "predict {S}/exported {S}/images --top-k 0", "--top-k", True),
    ("predict: the only image is not one", "predict {S}/exported {S}/file.txt", "images could be read", True),
]
# One case of each command again as a subprocess: the real exit status, and nothing else on stderr.
SUBPROCESS = (
    "int from a word",
    "config syntax error",
    "workdir is a file",
    "empty backbone folder",
    "extract: bad value",
    "report: missing workdir",
    "export: truncated checkpoint",
    "predict: truncated head",
    "missing --workdir",
)


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory) -> Path:
    """Everything the cases name: a finished run and damaged copies of it, an export and damaged copies of it,
    bad config files, a file, an empty folder, a folder of images."""
    from fxjax.cli import export as export_cli

    s = tmp_path_factory.mktemp("bad_inputs")
    shutil.copytree(tiny_run(tmp_path_factory), s / "run")
    assert export_cli.main([str(s / "run"), str(s / "exported")]) == 0
    (s / "file.txt").write_text("not a checkpoint, an image or a folder\n")
    (s / "empty").mkdir()
    (s / "images").mkdir()
    Image.fromarray(np.full((8, 8), 120, np.uint8)).save(s / "images" / "digit.png")
    configs = s / "configs"
    configs.mkdir()
    (configs / "syntax.py").write_text("def get_config():\n    return (\n")
    (configs / "missing_module.py").write_text("import no_such_module_anywhere\n")
    (configs / "no_get_config.py").write_text("CONFIG = 1\n")

    for name in ("no_summary", "bad_summary", "truncated_checkpoint"):
        shutil.copytree(s / "run", s / name)
    (s / "no_summary" / "summary.json").unlink()
    (s / "bad_summary" / "summary.json").write_text('{"best_step": ')
    for file in (s / "truncated_checkpoint" / "checkpoints").rglob("*"):
        if file.is_file() and file.stat().st_size > 64:
            file.write_bytes(file.read_bytes()[: file.stat().st_size // 3])

    for name in ("bad_json", "no_head_key", "truncated_head"):
        shutil.copytree(s / "exported", s / name)
    (s / "bad_json" / "classifier.json").write_text('{"format": "fxjax-classifier",')
    spec = (s / "exported" / "classifier.json").read_text()
    (s / "no_head_key" / "classifier.json").write_text(spec.replace('"head":', '"heads":'))
    head = s / "truncated_head" / "head.safetensors"
    head.write_bytes(head.read_bytes()[:100])
    return s


def snapshot(root: Path) -> dict[str, tuple]:
    """Every path under root → (size, mtime, bytes) for files, None for folders."""
    tree = {}
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        tree[str(path.relative_to(root))] = (st.st_size, st.st_mtime_ns, path.read_bytes()) if path.is_file() else None
    return tree


def check_message(err: str, needle: str, *, usage: bool = False, skipped: int = 0) -> None:
    assert "Traceback" not in err, err
    lines = err.splitlines()
    assert err.endswith("\n") and lines, err
    *before, last = lines
    if usage:  # argparse: its usage (possibly wrapped) then `prog: error: ...`
        assert before and before[0].startswith("usage: ") and ": error: " in last, err
    else:
        assert last.startswith("error: "), err
        assert len(before) == skipped and all(line.startswith("warning: skipped ") for line in before), err
    assert needle in last or any(needle in line for line in before), err


def argv_of(line: str, sandbox: Path) -> list[str]:
    return [part.replace("{S}", str(sandbox)) for part in line.split()]


def test_there_are_at_least_40_cases_across_every_command():
    assert len(CASES) >= 40 and len({name for name, *_ in CASES}) == len(CASES)
    commands = {line.split()[0] for _, line, *_ in CASES}
    assert {"train", "extract", "verify", "report", "export", "predict", "config"} <= commands
    assert set(SUBPROCESS) <= {name for name, *_ in CASES}


@pytest.mark.parametrize(("name", "line", "needle", "cheap"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_changes_nothing(name, line, needle, cheap, sandbox, capsys, monkeypatch):
    monkeypatch.chdir(sandbox)  # anything a command wrote relative to the working directory shows up too
    if cheap:
        from fxjax.backbones import hub

        def no_load(*args, **kwargs):
            raise AssertionError(f"{name}: the backbone loaded before the input was refused")

        monkeypatch.setattr(hub, "load_backbone", no_load)
    before = snapshot(sandbox)
    try:
        code = cli.main(argv_of(line, sandbox))
    except SystemExit as stop:  # argparse
        code = stop.code
    err = capsys.readouterr().err
    assert code == 2, (name, err)
    check_message(err, needle, usage=": error: " in err, skipped=err.count("warning: skipped "))
    after = snapshot(sandbox)
    assert sorted(after.keys() - before.keys()) == [] and sorted(before.keys() - after.keys()) == []
    assert [k for k in before if before[k] != after[k]] == []


@pytest.mark.parametrize("name", SUBPROCESS)
def test_as_a_subprocess_the_exit_status_is_2_and_stderr_one_line(name, sandbox):
    _, line, needle, _ = next(case for case in CASES if case[0] == name)
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    before = snapshot(sandbox)
    done = subprocess.run(
        [sys.executable, "-m", "fxjax.cli", *argv_of(line, sandbox)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2, done.stderr
    check_message(done.stderr, needle, usage=": error: " in done.stderr)
    assert snapshot(sandbox) == before
