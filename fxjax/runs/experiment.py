"""One experiment, end to end: the only module that knows every stage.

config → backbone + data → (features once, or the backbone online) → head training with Orbax checkpoints
→ the best checkpoint evaluated on test → summary.json. A rerun on the same workdir resumes.
"""

from __future__ import annotations

import errno
import json
import logging
import signal
import sys
import threading
import time
from pathlib import Path

import jax
import ml_collections
import numpy as np
import optax
from tqdm import tqdm

from fxjax import config as config_lib, parallel
from fxjax.evaluate import protocols as evaluation
from fxjax.features import extract as features
from fxjax.runs import rundir
from fxjax.runs.checkpoint import Checkpoints, abstract
from fxjax.data import images as pipeline
from fxjax.data.sources import load_dataset, split_labels
from fxjax.heads.freeze import frozen_prefixes
from fxjax.heads.heads import make_head
from fxjax.backbones.hub import load_backbone
from fxjax.runs.metrics import MetricsWriter
from fxjax.parallel.sharding import fsdp_shardings
from fxjax.heads.engine import (
    Classifier,
    FeatureBatches,
    NonFiniteLossError,
    Trainer,
    TrainState,
    feature_eval_batches,
    loader_state,
    restore_loader_state,
)

log = logging.getLogger("fxjax")


class Preempted(Exception):
    """SIGTERM arrived; a checkpoint at the current step was saved. Rerunning the command resumes."""

    def __init__(self, step: int, workdir: Path):
        super().__init__(f"preempted at step {step}: checkpoint saved in {workdir / 'checkpoints'}; "
                         "rerun the same command to resume")
        self.step = step


def run(config: ml_collections.ConfigDict, workdir: str | Path) -> dict:
    """Runs (or resumes) the experiment in `workdir` and returns its summary."""
    config = config_lib.resolve(config)
    workdir = rundir.prepare(workdir)
    lock = rundir.acquire_lock(workdir) if jax.process_index() == 0 else None
    try:
        return _run(config, workdir)
    finally:
        if lock is not None:
            lock.close()


def _run(config, workdir: Path) -> dict:
    mesh = parallel.make_mesh(config.mesh.data, config.mesh.fsdp)
    param_sharding = fsdp_shardings if config.mesh.fsdp > 1 else None  # frozen backbone: 1/fsdp per device
    parallel.check_batch_size(config.batch_size, mesh)
    parallel.check_batch_size(config.eval_batch_size, mesh, "config.eval_batch_size")
    shard = {"shard_index": jax.process_index(), "shard_count": jax.process_count()}

    backbone = load_backbone(config.backbone, revision=config.revision, dtype=config.dtype,
                             param_dtype=config.param_dtype)
    if config.image_size is not None:
        backbone.preprocess = backbone.preprocess.at_size(config.image_size)
    data = load_dataset(config.data.source, data_dir=config.data.data_dir, val_fraction=config.data.val_fraction,
                        test_fraction=config.data.test_fraction, seed=config.data.split_seed,
                        few_shot_k=config.data.few_shot_k)
    _check_resumable(workdir, backbone, data)
    if jax.process_index() == 0:
        rundir.write_json(workdir / "config.json", config.to_dict())
        rundir.write_json(workdir / "environment.json", rundir.environment(
            backbone=backbone.info, preprocess=backbone.preprocess.to_dict(), dataset=data.name,
            class_names=data.class_names, dataset_fingerprint=data.fingerprint))

    frozen_stages = config_lib.frozen_stages(config.freeze, backbone.num_stages)
    head = make_head(config.head, backbone.feature_dim, data.num_classes, config.seed)
    train_size = len(data.splits["train"])
    steps_per_epoch = train_size // config.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"config.batch_size={config.batch_size} is larger than the training split ({train_size})")
    total_steps = steps_per_epoch * config.num_epochs

    extract_seconds, extras = 0.0, {}
    if config_lib.uses_cached_features(config):
        start = time.perf_counter()
        feats, labels, hits = features.cached_features(
            backbone, data, mesh=mesh, batch_size=config.eval_batch_size, cache_dir=config.cache_dir,
            dtype=config.dtype, param_dtype=config.param_dtype, worker_count=config.data.worker_count,
            param_sharding=param_sharding, variants=tuple(config.sweep.feature_variants))
        extract_seconds = time.perf_counter() - start
        extras = {"feature_cache_hits": hits,
                  **evaluation.on_features(config, feats, labels, data.num_classes, mesh, workdir)}
        feats = {split: variants["pooled"] for split, variants in feats.items()}  # the run's head: pooled
        if "sweep" in extras:  # the grid's best (lr, wd) becomes the run's head
            config = _with_optimizer(config, extras["sweep"]["learning_rate"], extras["sweep"]["weight_decay"])
        model, frozen, options = head, (), {}  # a head alone: XLA's defaults
        train_iter = FeatureBatches(feats["train"], labels["train"], batch_size=config.batch_size,
                                    seed=config.seed, **shard)

        def eval_iter(split):
            return feature_eval_batches(feats[split], labels[split], config.eval_batch_size, **shard)
    else:
        model = Classifier(backbone.module, head, frozen_stages)
        frozen, options = frozen_prefixes(backbone.module, frozen_stages), backbone.compiler_options
        loader = pipeline.train_loader(data.splits["train"], backbone.preprocess, batch_size=config.batch_size,
                                       seed=config.seed, augment=config.data.augment,
                                       worker_count=config.data.worker_count, **shard)
        train_iter = _Renamed(iter(loader))

        def eval_iter(split):
            batches = pipeline.eval_batches(data.splits[split], backbone.preprocess,
                                            batch_size=config.eval_batch_size,
                                            worker_count=config.data.worker_count, **shard)
            return ({"x": b["image"], "label": b["label"], "mask": b["mask"]} for b in batches)

    trainer = Trainer(model, frozen, num_classes=data.num_classes, opt_config=config.optimizer,
                      total_steps=total_steps, mesh=mesh, seed=config.seed, frozen_sharding=param_sharding,
                      compiler_options=options)
    checkpoints = Checkpoints(workdir / "checkpoints", keep=config.checkpoint.keep)
    state = trainer.init_state()
    targets = _abstract_targets(state, trainer)
    resumed, restored = checkpoints.restore_newest_good(*targets)
    if restored is not None:
        params, opt_state, position = restored
        restore_loader_state(train_iter, position["loaders"][jax.process_index()])
        state = TrainState(resumed, params, opt_state)
        log.info("resumed from step %d", resumed)
    writer = MetricsWriter(workdir, resume_step=state.step)
    try:
        train_seconds, examples = _loop(config, trainer, state, train_iter, eval_iter, checkpoints, writer,
                                        steps_per_epoch, total_steps, workdir)
        checkpoints.wait()
        best, restored = checkpoints.restore_newest_good(*targets, steps=_best_first(checkpoints))
        params = restored[0]
        val = trainer.evaluate(params, eval_iter("val"))
        test = trainer.evaluate(params, eval_iter("test"))
        writer.write(best, "test", {k: test[k] for k in ("accuracy", "loss")})
    except NonFiniteLossError as err:
        checkpoints.wait()
        good = checkpoints.latest_step()
        where = f"step {good} in {checkpoints.directory}" if good is not None else "none yet"
        raise NonFiniteLossError(f"{err}; nothing from it was saved; last good checkpoint: {where}. Lower the "
                                 "learning rate or check the data, then rerun the same command to resume") from None
    except OSError as err:
        if err.errno == errno.ENOSPC:
            raise OSError(errno.ENOSPC, f"disk full while writing in {workdir} ({err}); free space, then rerun the "
                                        f"same command to resume from step {checkpoints.latest_step()}") from None
        raise
    finally:
        writer.close()
        checkpoints.close()

    summary = {
        "test_accuracy": test["accuracy"], "val_accuracy": val["accuracy"], "test_loss": test["loss"],
        "best_step": best, "total_steps": total_steps, "train_seconds": train_seconds,
        "images_per_second": examples / train_seconds if train_seconds > 0 else None,
        "extract_seconds": extract_seconds, "num_classes": data.num_classes, "test_examples": test["count"],
        "mode": "cached" if config_lib.uses_cached_features(config) else "online",
        "backbone": backbone.info["name"], "dataset": data.name, **extras,
    }
    if jax.process_index() == 0:
        rundir.write_npy(workdir / "test_predictions.npy", test["predictions"])
        rundir.write_npy(workdir / "test_labels.npy", split_labels(data.splits["test"]))
        rundir.write_json(workdir / "summary.json", summary)
        _write_report(workdir, data)
    return summary


def _write_report(workdir: Path, data) -> None:
    """The HTML report; a plotting failure is logged, never allowed to fail a finished run."""
    from fxjax.runs import report

    try:
        path = report.write_report(workdir, dataset=data)
        log.info("report: %s", path)
    except Exception as err:  # noqa: BLE001
        log.warning("could not write the report (%s: %s); rerun `python -m launch.report %s`",
                    type(err).__name__, err, workdir)


def _with_optimizer(config, learning_rate: float, weight_decay: float):
    config = ml_collections.ConfigDict(config.to_dict())
    config.optimizer.learning_rate, config.optimizer.weight_decay = learning_rate, weight_decay
    return config


def _check_resumable(workdir: Path, backbone, data) -> None:
    """A workdir with checkpoints must be resumed with the same classes and backbone weights."""
    previous = workdir / "environment.json"
    if not previous.exists() or not (workdir / "checkpoints").exists():
        return
    env = json.loads(previous.read_text())
    if env.get("class_names") != data.class_names:
        raise ValueError(
            f"workdir {str(workdir)!r} holds a run with {len(env.get('class_names') or [])} classes; this config "
            f"has {data.num_classes} ({data.name}): use a new --workdir")
    if env.get("backbone", {}).get("weight_sha256") != backbone.info["weight_sha256"]:
        raise ValueError(f"workdir {str(workdir)!r} holds a run of other backbone weights "
                         f"({env['backbone'].get('name')}): use a new --workdir")


def _abstract_targets(state: TrainState, trainer: Trainer):
    shardings = lambda tree: jax.tree.map(lambda _: trainer.repl, tree)
    return abstract(state.params, shardings(state.params)), abstract(state.opt_state, shardings(state.opt_state))


def _best_first(checkpoints: Checkpoints) -> list[int]:
    """Steps to try for the final evaluation: the best by validation accuracy first, then the newest."""
    best = checkpoints.best_step()
    rest = [s for s in checkpoints.manager.all_steps() if s != best]
    return rest + ([best] if best is not None else [])  # restore_newest_good tries from the end


class _Renamed:
    """grain's training batches, keyed as the trainer expects ({"x", "label"}), keeping get/set_state."""

    def __init__(self, iterator):
        self.iterator = iterator

    def __next__(self) -> dict:
        batch = next(self.iterator)
        return {"x": batch["image"], "label": batch["label"]}

    def get_state(self):
        return self.iterator.get_state()

    def set_state(self, state) -> None:
        self.iterator.set_state(state)


class _TermFlag:
    """Turns SIGTERM into a flag the loop checks after each step (only the main thread may set handlers)."""

    def __init__(self):
        self.raised = False
        self.previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        self.raised = True

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)


def _save(checkpoints: Checkpoints, state: TrainState, train_iter, metrics: dict | None) -> None:
    if not np.isfinite(float(optax.global_norm(state.params))):
        raise NonFiniteLossError(f"parameters became non-finite at step {state.step}")
    checkpoints.save(state.step, state.params, state.opt_state, {"loaders": _loader_states(train_iter)}, metrics)


def _loader_states(train_iter) -> list:
    """Every host's data position (they differ: each reads its own shard), in process order."""
    mine = json.dumps(loader_state(train_iter))
    if jax.process_count() == 1:
        return [json.loads(mine)]
    encoded = np.frombuffer(mine.encode(), np.uint8)
    longest = int(parallel.gather(np.asarray([len(encoded)])).max())
    padded = parallel.gather(np.pad(encoded, (0, longest - len(encoded)))[None])
    return [json.loads(bytes(row).rstrip(b"\0").decode()) for row in padded]


def _agreed(flag: bool) -> bool:
    """True on every host when any host saw it: hosts must stop at the same step to save together."""
    if jax.process_count() == 1:
        return flag
    return bool(parallel.gather(np.asarray([flag])).any())


def _loop(config, trainer: Trainer, state: TrainState, train_iter, eval_iter, checkpoints: Checkpoints,
          writer: MetricsWriter, steps_per_epoch: int, total_steps: int, workdir: Path) -> tuple[float, int]:
    """Trains from `state.step` to `total_steps`; evaluates on val and checkpoints every few epochs."""
    eval_every = steps_per_epoch * config.eval_every_epochs
    save_every = steps_per_epoch * config.checkpoint.every_epochs
    seconds, examples = 0.0, 0
    with _TermFlag() as term, tqdm(total=total_steps, initial=state.step, desc="train", unit="step",
                                   file=sys.stderr, disable=jax.process_index() != 0, dynamic_ncols=True) as bar:
        while state.step < total_steps:
            start = time.perf_counter()
            state, metrics = trainer.train_step(state, next(train_iter))
            seconds += time.perf_counter() - start
            examples += config.batch_size
            bar.update(1)
            bar.set_postfix(loss=f"{metrics['loss']:.3f}", img_s=f"{examples / seconds:.0f}")
            if state.step % config.log_every_steps == 0:
                writer.write(state.step, "train", {**metrics, "images_per_second": examples / seconds})
            scheduled = state.step % eval_every == 0 or state.step % save_every == 0 or state.step == total_steps
            if scheduled:
                val = trainer.evaluate(state.params, eval_iter("val"))
                writer.write(state.step, "val", {"accuracy": val["accuracy"], "loss": val["loss"]})
                _save(checkpoints, state, train_iter, {"val_accuracy": val["accuracy"]})
            stop = _agreed(term.raised)
            if stop and not scheduled:
                _save(checkpoints, state, train_iter, None)  # no metrics: never competes for best
            if stop:
                checkpoints.wait()
                raise Preempted(state.step, workdir)
    return seconds, examples
