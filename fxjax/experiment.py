"""One experiment, end to end: the only module that knows every stage.

config → backbone + data → (features once, or the backbone online) → head training with Orbax checkpoints
→ the best checkpoint evaluated on test → summary.json.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from pathlib import Path

import jax
import ml_collections
import numpy as np
from tqdm import tqdm

from fxjax import config as config_lib, features, parallel, rundir
from fxjax.checkpoint import Checkpoints, abstract
from fxjax.data import pipeline
from fxjax.data.sources import load_dataset
from fxjax.freeze import frozen_prefixes
from fxjax.heads import make_head
from fxjax.hub import load_backbone
from fxjax.metrics import MetricsWriter
from fxjax.train import (Classifier, FeatureBatches, Trainer, TrainState, feature_eval_batches, loader_state,
                         restore_loader_state)

log = logging.getLogger("fxjax")


def run(config: ml_collections.ConfigDict, workdir: str | Path) -> dict:
    """Runs (or resumes) the experiment in `workdir` and returns its summary."""
    config = config_lib.resolve(config)
    workdir = rundir.prepare(workdir)
    mesh = parallel.make_mesh(config.mesh.data, config.mesh.fsdp)
    parallel.check_batch_size(config.batch_size, mesh)
    parallel.check_batch_size(config.eval_batch_size, mesh, "config.eval_batch_size")
    shard = {"shard_index": jax.process_index(), "shard_count": jax.process_count()}

    backbone = load_backbone(config.backbone, revision=config.revision, dtype=config.dtype,
                             param_dtype=config.param_dtype)
    data = load_dataset(config.data.source, data_dir=config.data.data_dir, val_fraction=config.data.val_fraction,
                        test_fraction=config.data.test_fraction, seed=config.data.split_seed,
                        few_shot_k=config.data.few_shot_k)
    if config.image_size is not None:
        backbone.preprocess = backbone.preprocess.at_size(config.image_size)
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

    extract_seconds = 0.0
    if config_lib.uses_cached_features(config):
        start = time.perf_counter()
        feats = {
            split: features.extract(
                backbone,
                pipeline.eval_batches(source, backbone.preprocess, batch_size=config.eval_batch_size,
                                      worker_count=config.data.worker_count, **shard),
                total=len(source), mesh=mesh, desc=f"features[{split}]")
            for split, source in data.splits.items()
        }
        extract_seconds = time.perf_counter() - start
        labels = {split: np.asarray([source.label(i) for i in range(len(source))], np.int32)
                  for split, source in data.splits.items()}
        model, frozen = head, ()
        train_iter = FeatureBatches(feats["train"], labels["train"], batch_size=config.batch_size,
                                    seed=config.seed, **shard)

        def eval_iter(split):
            return feature_eval_batches(feats[split], labels[split], config.eval_batch_size, **shard)
    else:
        model = Classifier(backbone.module, head, frozen_stages)
        frozen = frozen_prefixes(backbone.module, frozen_stages)
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
                      total_steps=total_steps, mesh=mesh, seed=config.seed)
    checkpoints = Checkpoints(workdir / "checkpoints", keep=config.checkpoint.keep)
    state = trainer.init_state()
    resumed = checkpoints.latest_step()
    if resumed is not None:
        state = _restore(checkpoints, resumed, state, trainer, train_iter)
        log.info("resumed from step %d", resumed)
    writer = MetricsWriter(workdir, resume_step=state.step)
    try:
        train_seconds, examples = _loop(config, trainer, state, train_iter, eval_iter, checkpoints, writer,
                                        steps_per_epoch, total_steps)
        checkpoints.wait()
        best = checkpoints.best_step()
        best_state = _restore(checkpoints, best, state, trainer, None)
        val = trainer.evaluate(best_state.params, eval_iter("val"))
        test = trainer.evaluate(best_state.params, eval_iter("test"))
        writer.write(best, "test", {k: test[k] for k in ("accuracy", "loss")})
    finally:
        writer.close()
        checkpoints.close()

    summary = {
        "test_accuracy": test["accuracy"], "val_accuracy": val["accuracy"], "test_loss": test["loss"],
        "best_step": best, "total_steps": total_steps, "train_seconds": train_seconds,
        "images_per_second": examples / train_seconds if train_seconds > 0 else None,
        "extract_seconds": extract_seconds, "num_classes": data.num_classes, "test_examples": test["count"],
        "mode": "cached" if config_lib.uses_cached_features(config) else "online",
        "backbone": backbone.info["name"], "dataset": data.name,
    }
    if jax.process_index() == 0:
        test_labels = np.asarray([data.splits["test"].label(i) for i in range(len(data.splits["test"]))], np.int32)
        _save_npy(workdir / "test_predictions.npy", test["predictions"])
        _save_npy(workdir / "test_labels.npy", test_labels)
        rundir.write_json(workdir / "summary.json", summary)
    return summary


def _save_npy(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        np.save(f, array)
    tmp.replace(path)


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


def _restore(checkpoints: Checkpoints, step: int, state: TrainState, trainer: Trainer, train_iter) -> TrainState:
    shardings = lambda tree: jax.tree.map(lambda _: trainer.repl, tree)
    params, opt_state, data = checkpoints.restore(step, abstract(state.params, shardings(state.params)),
                                                  abstract(state.opt_state, shardings(state.opt_state)))
    if train_iter is not None:
        restore_loader_state(train_iter, data["loader"])
    return TrainState(step, params, opt_state)


def _loop(config, trainer: Trainer, state: TrainState, train_iter, eval_iter, checkpoints: Checkpoints,
          writer: MetricsWriter, steps_per_epoch: int, total_steps: int) -> tuple[float, int]:
    """Trains from `state.step` to `total_steps`; evaluates on val and checkpoints every few epochs."""
    eval_every = steps_per_epoch * config.eval_every_epochs
    save_every = steps_per_epoch * config.checkpoint.every_epochs
    seconds, examples = 0.0, 0
    with tqdm(total=total_steps, initial=state.step, desc="train", unit="step", file=sys.stderr,
              disable=jax.process_index() != 0, dynamic_ncols=True) as bar:
        while state.step < total_steps:
            start = time.perf_counter()
            state, metrics = trainer.train_step(state, next(train_iter))
            seconds += time.perf_counter() - start
            examples += config.batch_size
            bar.update(1)
            bar.set_postfix(loss=f"{metrics['loss']:.3f}", img_s=f"{examples / seconds:.0f}")
            if state.step % config.log_every_steps == 0:
                writer.write(state.step, "train", {**metrics, "images_per_second": examples / seconds})
            last = state.step == total_steps
            if state.step % eval_every == 0 or state.step % save_every == 0 or last:
                val = trainer.evaluate(state.params, eval_iter("val"))
                writer.write(state.step, "val", {"accuracy": val["accuracy"], "loss": val["loss"]})
                checkpoints.save(state.step, state.params, state.opt_state, {"loader": loader_state(train_iter)},
                                 {"val_accuracy": val["accuracy"]})
    if not math.isfinite(seconds):
        seconds = 0.0
    return seconds, examples
