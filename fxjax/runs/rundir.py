"""The run directory, the record of one experiment: `RunDir` names, writes and reads every file in it (config,
environment, summary, metrics, predictions, tables, report, checkpoints); everything is written atomically
(temporary name, then rename), so a reader sees an old file or a new one, never half of one."""

from __future__ import annotations

import io
import json
import os
import platform
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

import jax
import numpy as np

PACKAGES = (
    "jax",
    "jaxlib",
    "flax",
    "optax",
    "orbax-checkpoint",
    "grain",
    "tensorflow-datasets",
    "transformers",
    "safetensors",
    "numpy",
    "ml_collections",
)


def prepare(workdir: str | Path) -> Path:
    """Creates the workdir and proves it writable, or fails with a one-line error naming it."""
    path = Path(workdir).expanduser().absolute()
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as err:
        raise PermissionError(
            f"workdir {str(path)!r} is not writable ({err.strerror}); choose another --workdir"
        ) from err
    return path


def write_bytes(path: str | Path, data: bytes) -> None:
    """Atomic: readers see the old file or the new one, never half of one (temporary name, then rename)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(path: str | Path, text: str) -> None:
    write_bytes(path, text.encode())


def write_json(path: str | Path, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_jsonable) + "\n")


def write_npy(path: str | Path, array) -> None:
    buffer = io.BytesIO()
    np.save(buffer, array)
    write_bytes(path, buffer.getvalue())


def _jsonable(obj):
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, (set, tuple)):
        return list(obj)
    return str(obj)


def git_commit(cwd: str | Path = ".") -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def environment(**extra) -> dict:
    """Provenance of a run: versions, devices, code commit, plus what the caller adds (weights, data)."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": versions,
        "devices": [str(d) for d in jax.devices()],
        "device_kind": jax.devices()[0].device_kind,
        "process_count": jax.process_count(),
        "git_commit": git_commit(Path(__file__).parent),
        **extra,
    }


class WorkdirBusyError(RuntimeError):
    """Another live run holds the workdir."""


def acquire_lock(workdir: Path):
    """One writer per workdir: an exclusive flock on `workdir/.lock`, released by the OS when the process
    dies, so a workdir whose previous run was killed is simply resumed. Returns the open lock file."""
    import fcntl
    import socket

    handle = open(workdir / ".lock", "a+")  # noqa: SIM115 - held for the whole run
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        owner = handle.read().strip() or "another process"
        handle.close()
        raise WorkdirBusyError(
            f"workdir {str(workdir)!r} is in use by a live run ({owner}); "
            "wait for it to finish or use another --workdir"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    handle.flush()
    return handle


class RunDirError(FileNotFoundError):
    """A run directory lacks a file a command needs, or holds one that cannot be read."""


class RunDir:
    """One run's directory. Every module that reads or writes a run file goes through here."""

    CONFIG = "config.json"  # the resolved config
    ENVIRONMENT = "environment.json"  # provenance: versions, devices, commit, weights, data fingerprints
    SUMMARY = "summary.json"  # the final numbers
    METRICS = "metrics.jsonl"  # one record per logged step (train / val / test)
    PREDICTIONS = "test_predictions.npy"
    LABELS = "test_labels.npy"
    SWEEP, SWEEP_TABLE = "sweep.json", "sweep.md"
    PROBES, PROBES_TABLE = "probes.json", "probes.md"
    FEWSHOT, FEWSHOT_TABLE = "fewshot.json", "fewshot.md"
    PROTOCOLS, PROTOCOLS_TABLE = "protocols.json", "protocols.md"  # config.protocols (fxjax.evaluate.catalog)
    REPORT = "report.html"
    CHECKPOINTS = "checkpoints"
    TENSORBOARD = "tensorboard"

    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser().absolute()

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    @property
    def checkpoints(self) -> Path:
        return self.path / self.CHECKPOINTS

    def prepare(self) -> RunDir:
        """Creates the directory and proves it writable, or fails with a one-line error naming it."""
        prepare(self.path)
        return self

    def lock(self):
        return acquire_lock(self.path)

    def has(self, name: str) -> bool:
        return (self.path / name).is_file()

    def require(self, *names: str, what: str = "a finished run directory") -> None:
        """A one-line RunDirError naming the first missing file (or a missing directory)."""
        if not self.path.is_dir():
            raise RunDirError(f"run directory {str(self.path)!r} does not exist")
        for name in names:
            if not self.has(name):
                raise RunDirError(f"{self.path / name} is missing: is {str(self.path)!r} {what}?")

    def read(self, name: str, default=None):
        """A JSON / JSON-lines / .npy file's contents; `default` when it is absent (None: it must exist)."""
        file = self.path / name
        if not file.is_file():
            if default is not None:
                return default
            self.require(name)
        try:
            if name.endswith(".jsonl"):
                return [json.loads(line) for line in file.read_text().splitlines() if line.strip()]
            if name.endswith(".npy"):
                return np.load(file, allow_pickle=False)
            return json.loads(file.read_text())
        except (OSError, ValueError) as err:
            raise RunDirError(f"{file} is unreadable ({err})") from err

    def write(self, name: str, content) -> Path:
        """Atomically: .json from an object, .npy from an array, text or bytes otherwise."""
        file = self.path / name
        if name.endswith(".json"):
            write_json(file, content)
        elif name.endswith(".npy"):
            write_npy(file, content)
        elif isinstance(content, str):
            write_text(file, content)
        else:
            write_bytes(file, content)
        return file
