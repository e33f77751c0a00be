"""A trained run as a classifier folder people can use without the run directory or the training code:

    classifier.json    which backbone (name, revision, weight sha256), classes, preprocessing, head
    head.safetensors   the trainable parameters of the best checkpoint, by dotted module path
                       ("head.out.kernel", and "backbone.…" for stages the run fine-tuned)
    backbone/          optional: the backbone's own weight files, so the folder needs no download

Loading checks the backbone's weight hash against the recorded one: a head only makes sense on the exact
features it was trained on.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fxjax.backbones import formats as weights, hub
from fxjax.backbones.backbone import Backbone
from fxjax.backbones.convert import path_str
from fxjax.data.preprocess import PreprocessSpec, preprocess_image
from fxjax.data.sources import decode_rgb
from fxjax.heads.heads import Classifier, Head
from fxjax.runs import checkpoint, rundir
from fxjax.runs.report import read_run
from fxjax.runs.rundir import RunDir, RunDirError
from fxjax.runs.setup import Setup

FORMAT = "fxjax-classifier"
FORMAT_VERSION = 1
EXPORT_FILES = ("config.json", "environment.json", "summary.json")
_HF_SIDE_FILES = ("config.json", "preprocessor_config.json")


class WeightHashError(ValueError):
    """The backbone weights found are not the ones the head was trained on."""


# ---------------------------------------------------------------------------------------------------- export


def export(workdir: str | Path, out: str | Path, *, with_backbone: bool = False) -> Path:
    """Writes the classifier folder `out` from the best checkpoint of the run in `workdir`; returns `out`.

    Atomic: the folder is assembled under a temporary name beside `out` and renamed into place, so `out` is
    either absent or complete. `out` must not exist yet (an empty folder is accepted).
    """
    run = read_run(workdir, EXPORT_FILES)
    out = Path(out).absolute()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} already exists and is not empty; choose another output folder")
    step = run.summary.get("best_step")
    if step is None:
        raise RunDirError(f"{run.path / RunDir.SUMMARY} has no best_step: is {str(run.path)!r} a finished run?")
    winner = run.summary.get("head", {"variant": "pooled", "index": 0})
    try:
        saved = checkpoint.read_params(run.dir.checkpoints, step)
    except FileNotFoundError as err:
        raise RunDirError(f"{err} (summary.json best_step={step})") from None
    # The winning head of the checkpoint's stacked heads [H, ...] of its feature variant.
    group = winner["variant"] + "."
    params = {name[len(group) :]: value[winner["index"]] for name, value in saved.items() if name.startswith(group)}

    config, recorded = run.config, run.environment.get("backbone", {})
    # The backbone as the run built it, at the exact commit it recorded.
    backbone = Setup.from_record({**config, "revision": recorded.get("revision") or config.get("revision")}).backbone
    _check_hash(backbone.info["weight_sha256"], recorded.get("weight_sha256"), config["backbone"])
    head_config = config["head"]
    spec = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "backbone": {key: backbone.info[key] for key in ("name", "revision", "model_type", "weight_sha256")},
        "class_names": run.environment["class_names"],
        "preprocess": run.environment["preprocess"],
        "head": {
            "kind": head_config["kind"],
            "dropout": head_config.get("dropout", 0.0),
            "hidden_dims": list(head_config["hidden_dims"]) if head_config["kind"] == "mlp" else [],
            "init": head_config.get("init", "random"),
        },
        "variant": winner["variant"],
        "image_size": config.get("image_size"),
        "dtype": config.get("dtype", "float32"),
        "param_dtype": config.get("param_dtype", "float32"),
        "trained": {
            "workdir": str(run.path.absolute()),
            "step": step,
            "dataset": run.summary.get("dataset"),
            "test_accuracy": run.summary.get("test_accuracy"),
            "val_accuracy": run.summary.get("val_accuracy"),
        },
        "config": config,
    }

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        os.chmod(tmp, 0o755)
        _save_params(params, tmp / "head.safetensors", step)
        if with_backbone:
            spec["backbone"]["path"] = "backbone"
            spec["backbone"]["weight_files"] = _copy_backbone(
                backbone.info["name"], backbone.info["weight_files"], tmp / "backbone"
            )
        rundir.write_json(tmp / "classifier.json", spec)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _save_params(params: dict[str, np.ndarray], path: Path, step: int) -> None:
    from safetensors.numpy import save_file

    # safetensors' numpy writer has no bfloat16: stored as float32, cast back to the module's dtype on load.
    tensors = {
        k: np.asarray(v, np.float32) if v.dtype.name == "bfloat16" else np.ascontiguousarray(v)
        for k, v in params.items()
    }
    save_file(tensors, str(path), metadata={"format": FORMAT, "step": str(step)})


def _copy_backbone(name: str, weight_files: Sequence[str], folder: Path) -> list[str]:
    """Copies the weight files (following Hub-cache symlinks) and, for a Hugging Face folder, its config files
    and shard index; → the weight files' names, in the order their hash is taken."""
    folder.mkdir()
    sources = [Path(f) for f in weight_files]
    extras = []
    if name not in hub.BUILTINS:
        source_dir = sources[0].parent
        extras = [source_dir / n for n in _HF_SIDE_FILES if (source_dir / n).is_file()]
        chosen = hub.weight_files(source_dir)
        if chosen.name.endswith(".index.json"):
            extras.append(chosen)
    for path in [*sources, *extras]:
        shutil.copyfile(path, folder / path.name)
    return [p.name for p in sources]


def _check_hash(found: str, recorded: str | None, what: str) -> None:
    if recorded is not None and found != recorded:
        raise WeightHashError(
            f"backbone {what!r}: weight sha256 is {found[:16]}… but the head was trained on {recorded[:16]}…"
            ": different weights (fetch the recorded revision, or export with --with-backbone)"
        )


# ---------------------------------------------------------------------------------------------------- loading


class ExportedClassifier:
    """An exported classifier, ready to predict: preprocessing, backbone and head in one jitted function."""

    def __init__(self, model: Classifier, class_names: list[str], preprocess: PreprocessSpec, spec: dict):
        self.class_names = class_names
        self.preprocess = preprocess
        self.spec = spec
        self._graphdef, self._state = nnx.split(model)

    def predict(self, images: Sequence[np.ndarray | str | os.PathLike], batch_size: int = 32) -> np.ndarray:
        """uint8 [H, W, C] arrays (C in 1, 3, 4) or image file paths → class probabilities [n, classes].

        Every batch is padded to `batch_size`, so one compilation serves any number of images.
        """
        parts = []
        for start in range(0, len(images), batch_size):
            chunk = [
                decode_rgb(str(i)) if isinstance(i, (str, os.PathLike)) else np.asarray(i)
                for i in images[start : start + batch_size]
            ]
            x = np.zeros((batch_size, *self.preprocess.size, 3), np.float32)
            for row, image in enumerate(chunk):
                x[row] = preprocess_image(image, self.preprocess)
            parts.append(np.asarray(_probabilities(self._graphdef, self._state, x))[: len(chunk)])
        return np.concatenate(parts) if parts else np.zeros((0, len(self.class_names)), np.float32)


@partial(jax.jit, static_argnums=0)  # keyed on the graph: classifiers of one architecture share compilations
def _probabilities(graphdef, state, x):  # x: [b, h, w, 3] normalised → [b, classes]
    return jax.nn.softmax(nnx.merge(graphdef, state)(x).astype(jnp.float32), axis=-1)


def load_classifier(path: str | Path) -> ExportedClassifier:
    """Loads a folder written by `export`, checking the backbone's weight hash against the recorded one."""
    folder = Path(path)
    spec_file = folder / "classifier.json"
    if not spec_file.is_file():
        raise FileNotFoundError(f"{spec_file} is missing: is {str(folder)!r} a folder written by launch.export?")
    spec = json.loads(spec_file.read_text())
    if spec.get("format") != FORMAT or spec.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(
            f"{spec_file}: not an {FORMAT} v{FORMAT_VERSION} file "
            f"(format={spec.get('format')!r} version={spec.get('format_version')!r})"
        )
    backbone = _load_backbone(spec, folder)
    head = Head(
        backbone.variant_dim(spec.get("variant", "pooled")),
        len(spec["class_names"]),
        hidden_dims=tuple(spec["head"]["hidden_dims"]),
        dropout=spec["head"]["dropout"],
        rngs=nnx.Rngs(0),
    )
    model = Classifier(backbone.module, head, spec.get("variant", "pooled"))
    _assign(model, folder / "head.safetensors")
    return ExportedClassifier(model, list(spec["class_names"]), PreprocessSpec(**spec["preprocess"]), spec)


def _load_backbone(spec: dict, folder: Path) -> Backbone:
    entry, dtype, param_dtype = spec["backbone"], spec["dtype"], spec["param_dtype"]
    if entry.get("path") is not None:
        bundled = folder / entry["path"]
        files = [bundled / name for name in entry["weight_files"]]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"bundled backbone weights missing: {', '.join(missing)}")
        _check_hash(weights.sha256_files(files), entry["weight_sha256"], str(bundled))  # before the slow load
        if entry["name"] in hub.BUILTINS:
            return hub.load_backbone(
                entry["name"], dtype=dtype, param_dtype=param_dtype, weights_file=files[0] if files else None
            )
        return hub.load_folder(
            bundled,
            name=entry["name"],
            revision=entry["revision"],
            dtype=jnp.dtype(dtype),
            param_dtype=jnp.dtype(param_dtype),
        )
    backbone = hub.load_backbone(entry["name"], revision=entry["revision"], dtype=dtype, param_dtype=param_dtype)
    _check_hash(backbone.info["weight_sha256"], entry["weight_sha256"], entry["name"])
    return backbone


def _assign(model: nnx.Module, path: Path) -> None:
    """Puts the saved tensors into `model`; every mismatch (unknown name, shape) is listed before failing."""
    from safetensors.numpy import load_file

    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing")
    tensors = load_file(str(path))
    state = nnx.state(model)
    variables = {path_str(p): v for p, v in nnx.to_flat_state(state)}
    problems = [f"{name}: not in the model" for name in tensors if name not in variables]
    problems += [
        f"{name}: shape {tensors[name].shape} != model {variables[name].get_value().shape}"
        for name in tensors
        if name in variables and tensors[name].shape != variables[name].get_value().shape
    ]
    if problems:
        raise ValueError(f"{path} does not fit the model: " + "; ".join(problems))
    for name, value in tensors.items():
        variables[name].set_value(jnp.asarray(value, variables[name].get_value().dtype))
    nnx.update(model, state)
