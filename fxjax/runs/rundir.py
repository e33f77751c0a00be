"""The run directory: checked before anything runs, and written only atomically (temporary name, then rename)."""

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

PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "tensorflow-datasets", "transformers",
            "safetensors", "numpy", "ml_collections")


def prepare(workdir: str | Path) -> Path:
    """Creates the workdir and proves it writable, or fails with a one-line error naming it."""
    path = Path(workdir).expanduser().absolute()
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as err:
        raise PermissionError(
            f"workdir {str(path)!r} is not writable ({err.strerror}); choose another --workdir") from err
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
