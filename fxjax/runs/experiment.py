"""One experiment, end to end: the only module that knows every stage.

config → setup (mesh, backbone, data, provenance) → the input (cached features, or images through the backbone)
→ the head engine (H heads, Orbax checkpoints) → the best checkpoint's best head evaluated on test → summary.json.
A rerun on the same workdir resumes.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from fxjax import config as config_lib, parallel
from fxjax.data import images
from fxjax.data.features import FeatureBatches, feature_eval_batches
from fxjax.data.sources import split_labels
from fxjax.evaluate import catalog, protocols
from fxjax.heads import freeze
from fxjax.heads.engine import Engine, NonFiniteLossError, TrainState, head_rows, score, select
from fxjax.heads.heads import Classifier, make_head
from fxjax.progress import Progress
from fxjax.runs.checkpoint import Checkpoints, abstract
from fxjax.runs.metrics import MetricsWriter
from fxjax.runs.rundir import RunDir
from fxjax.runs.setup import Setup

log = logging.getLogger("fxjax")


class Preempted(Exception):
    """SIGTERM or Ctrl-C arrived; a checkpoint at the current step was saved. Rerunning the command resumes."""

    def __init__(self, step: int, run: RunDir):
        super().__init__(
            f"preempted at step {step}: checkpoint saved in {run.checkpoints}; rerun the same command to resume"
        )
        self.step = step


@dataclass
class Inputs:
    """What the engine trains on: models per group (feature variant), their heads' hyperparameters, batches."""

    models: dict
    hyper: dict
    train: Iterator[dict]
    eval: Callable[[str], Iterator[dict]]
    trainable: Callable[[str], bool]
    options: dict = field(default_factory=dict)  # XLA options (an online backbone's)
    frozen_sharding: parallel.ShardingFn | None = None
    extras: dict = field(default_factory=dict)  # summary entries: cache hits, probes, few-shot


def run(config: ml_collections.ConfigDict, workdir) -> dict:
    """Runs (or resumes) the experiment in `workdir` and returns its summary."""
    setup = Setup.from_config(config)  # keys and values first: nothing is loaded or written for a bad config
    run_dir = RunDir(workdir).check()
    setup.check(run_dir)  # data, backbone, the recorded run: a refused run leaves the workdir as it was
    run_dir.prepare()
    lock = run_dir.lock() if jax.process_index() == 0 else None
    try:
        return _run(setup, run_dir)
    finally:
        if lock is not None:
            lock.close()


def _run(setup: Setup, run: RunDir) -> dict:
    config = setup.config
    setup.record(run)
    steps_per_epoch = len(setup.data.splits["train"]) // config.batch_size
    total_steps = steps_per_epoch * config.num_epochs
    inputs = _cached_inputs(setup, run) if config_lib.uses_cached_features(config) else _online_inputs(setup)
    engine = _engine(setup, inputs, total_steps)
    with Checkpoints(run.checkpoints, keep=config.checkpoint.keep) as checkpoints, _explained(run, checkpoints):
        state, targets = _restore(engine, checkpoints, inputs.train)
        if state.step >= total_steps and run.has(RunDir.SUMMARY):
            log.info("the run in %s is finished; its record is left as it is", run.path)
            return run.read(RunDir.SUMMARY)
        with MetricsWriter(run, resume_step=state.step) as writer:
            seconds, examples = _fit(config, engine, state, inputs, checkpoints, writer, steps_per_epoch, run)
            best_step, rows, test = _final_evaluation(engine, checkpoints, targets, inputs)
            winner = select(rows)
            writer.write(best_step, "test", {"accuracy": winner["test_accuracy"], "loss": winner["test_loss"]})
    summary = _summary(setup, rows, winner, best_step, total_steps, seconds, examples, test["count"], inputs.extras)
    if jax.process_index() == 0:
        _finish(setup, run, rows, winner, summary, test[winner["variant"]]["predictions"][:, winner["index"]])
    return summary


def _engine(setup: Setup, inputs: Inputs, total_steps: int) -> Engine:
    config = setup.config
    return Engine(
        inputs.models, inputs.trainable, num_classes=setup.data.num_classes, opt_config=config.optimizer,
        total_steps=total_steps, mesh=setup.mesh, seed=config.seed, hyper=inputs.hyper,
        frozen_sharding=inputs.frozen_sharding, compiler_options=inputs.options,
    )  # fmt: skip


def _final_evaluation(engine: Engine, checkpoints: Checkpoints, targets, inputs: Inputs) -> tuple[int, list, dict]:
    """The best checkpoint's heads scored on val and test: → (its step, one row per head, the test outputs)."""
    checkpoints.wait()
    best_step, (params, _, _) = checkpoints.restore_newest_good(*targets, steps=_best_first(checkpoints))
    val, test = engine.evaluate(params, inputs.eval("val")), engine.evaluate(params, inputs.eval("test"))
    return best_step, score(score(head_rows(engine, inputs.hyper), "val", val), "test", test), test


@contextlib.contextmanager
def _explained(run: RunDir, checkpoints: Checkpoints) -> Iterator[None]:
    """Divergence and a full disk end as one message that says what was saved and how to resume."""
    try:
        yield
    except NonFiniteLossError as err:
        checkpoints.wait()
        good = checkpoints.latest_step()
        where = f"step {good} in {checkpoints.directory}" if good is not None else "none yet"
        raise NonFiniteLossError(
            f"{err}; nothing from it was saved; last good checkpoint: {where}. Lower the "
            "learning rate or check the data, then rerun the same command to resume"
        ) from None
    except OSError as err:
        if err.errno != errno.ENOSPC:
            raise
        raise OSError(
            errno.ENOSPC,
            f"disk full while writing in {run.path} ({err}); free space, then rerun the "
            f"same command to resume from step {checkpoints.latest_step()}",
        ) from None


def _cached_inputs(setup: Setup, run: RunDir) -> Inputs:
    """Heads on features extracted once (or read from the cache): one group per feature variant, each with the
    sweep's grid of (learning rate, weight decay) heads, or the optimizer's one head."""
    config, data = setup.config, setup.data
    variants = setup.variants
    start = time.perf_counter()
    feats, labels, hits = setup.cached_features(rows="host")  # heads train and evaluate on the host's rows
    extras = {"feature_cache_hits": hits, "extract_seconds": time.perf_counter() - start}
    extras |= _feature_evaluations(setup, run)
    grid = [
        (lr, wd)
        for lr in (config.sweep.learning_rates or (config.optimizer.learning_rate,))
        for wd in (config.sweep.weight_decays or (config.optimizer.weight_decay,))
    ]
    hyper = {"learning_rate": [lr for lr, _ in grid], "weight_decay": [wd for _, wd in grid]}
    models = {
        v: Classifier(None, make_head(config.head, feats["train"][v].shape[1], data.num_classes, config.seed), v)
        for v in variants
    }
    if config.head.init == "text":  # the run's heads start as the zero-shot classifier
        _assign_linear(models["embedding"].head.out, setup.zero_shot.head())
    shard, eval_batch, total = setup.shard, config.eval_batch_size, {s: len(data.splits[s]) for s in data.splits}
    train_feats, train_labels = {v: feats["train"][v] for v in variants}, labels["train"]
    if config.data.views:  # K cached augmented views per image; each epoch draws one
        train_feats, train_labels = setup.cached_views()
    train = FeatureBatches(
        train_feats, train_labels, batch_size=config.batch_size, seed=config.seed, total=total["train"],
        views=config.data.views, **shard,
    )  # fmt: skip
    return Inputs(
        models,
        {v: hyper for v in variants},
        train,
        lambda split: feature_eval_batches(feats[split], labels[split], eval_batch, total=total[split], **shard),
        freeze.trainable(()),  # a head alone: all of it trains; XLA's default options suit its skinny matmuls
        extras=extras,
    )


def _assign_linear(layer, weights: dict) -> None:
    layer.kernel.set_value(jnp.asarray(weights["kernel"], layer.kernel.get_value().dtype))
    layer.bias.set_value(jnp.asarray(weights["bias"], layer.bias.get_value().dtype))


def _feature_evaluations(setup: Setup, run: RunDir) -> dict:
    """What the run computes on its cached features besides the heads — probes, few-shot, zero-shot and the
    named config.protocols: their tables go into the run directory, their summary entries are returned."""
    config, classes = setup.config, setup.data.num_classes
    if not (config.probes or config.fewshot.ks or config.protocols):
        return {}
    feats, labels, _ = setup.cached_features()  # every row, lazily: the probes gather them in chunks onto the mesh
    entries, files = protocols.on_features(config, feats, labels, classes, setup.zero_shot, mesh=setup.mesh)
    named, named_files = catalog.on_features(config, feats, labels, classes, mesh=setup.mesh)
    if jax.process_index() == 0:
        for name, content in (files | named_files).items():
            run.write(name, content)
    return entries | named


def _online_inputs(setup: Setup) -> Inputs:
    """One classifier with the backbone in the step (augmentation, partial unfreezing); what trains is decided
    by config.freeze as parameter-path patterns."""
    config, data, backbone = setup.config, setup.data, setup.backbone
    head = make_head(config.head, backbone.feature_dim, data.num_classes, config.seed)
    patterns = freeze.frozen_patterns(config.freeze, backbone.module.stage_paths())
    d, shard, opt = config.data, setup.shard, config.optimizer
    loader = images.train_loader(
        data.splits["train"], backbone.preprocess, batch_size=config.batch_size, seed=config.seed,
        augment=d.augment, worker_count=d.worker_count, **shard,
    )  # fmt: skip
    return Inputs(
        {"pooled": Classifier(backbone.module, head)},
        {"pooled": {"learning_rate": [opt.learning_rate], "weight_decay": [opt.weight_decay]}},
        iter(loader),
        lambda split: images.eval_batches(
            data.splits[split],
            backbone.preprocess,
            batch_size=config.eval_batch_size,
            worker_count=d.worker_count,
            **shard,
        ),  # fmt: skip
        freeze.trainable(patterns),
        options=backbone.compiler_options,
        frozen_sharding=setup.param_sharding,
    )


def _restore(engine: Engine, checkpoints: Checkpoints, train_iter):
    """The newest good checkpoint (params, optimizer state, loader positions), or a fresh state."""
    state = engine.init_state()
    shardings = lambda tree: jax.tree.map(lambda _: engine.repl, tree)
    targets = abstract(state.params, shardings(state.params)), abstract(state.opt_state, shardings(state.opt_state))
    step, restored = checkpoints.restore_newest_good(*targets)
    if restored is not None:
        params, opt_state, position = restored
        _restore_loader(train_iter, position["loaders"][jax.process_index()])
        state = TrainState(step, params, opt_state)
        log.info("resumed from step %d", step)
    return state, targets


def _summary(setup, rows, winner, best_step, total_steps, seconds, examples, test_count, extras) -> dict:
    config, data = setup.config, setup.data
    summary = {
        "test_accuracy": winner["test_accuracy"],
        "val_accuracy": winner["val_accuracy"],
        "test_loss": winner["test_loss"],
        "best_step": best_step,
        "total_steps": total_steps,
        "train_seconds": seconds,
        "images_per_second": examples / seconds if seconds > 0 else None,
        "extract_seconds": 0.0,
        "num_classes": data.num_classes,
        "test_examples": test_count,
        "mode": "cached" if config_lib.uses_cached_features(config) else "online",
        "backbone": setup.backbone.info["name"],
        "dataset": data.name,
        "head": {k: winner[k] for k in ("variant", "index", "learning_rate", "weight_decay")},
        **extras,
    }
    if len(rows) > 1:
        summary["sweep"] = {**winner, "heads": len(rows), "seconds": seconds}
    return summary


def _finish(setup: Setup, run: RunDir, rows, winner, summary, predictions) -> None:
    """The run's record: the winning head's hyperparameters in config.json (a sweep's grid stays beside them),
    the sweep table, predictions, labels, summary and report."""
    config = ml_collections.ConfigDict(setup.config.to_dict())
    config.optimizer.learning_rate, config.optimizer.weight_decay = winner["learning_rate"], winner["weight_decay"]
    run.write(RunDir.CONFIG, config.to_dict())
    if len(rows) > 1:
        files = protocols.sweep_files(rows, winner, summary["total_steps"], summary["train_seconds"])
        for name, content in files.items():
            run.write(name, content)
    run.write(RunDir.PREDICTIONS, predictions)
    run.write(RunDir.LABELS, split_labels(setup.data.splits["test"]))
    run.write(RunDir.SUMMARY, summary)
    _write_report(run, setup.data)


def _write_report(run: RunDir, data) -> None:
    """The HTML report; a plotting failure is logged, never allowed to fail a finished run."""
    from fxjax.runs import report

    try:
        log.info("report: %s", report.write_report(run.path, dataset=data))
    except Exception as err:  # noqa: BLE001
        log.warning(
            "could not write the report (%s: %s); rerun `python -m launch.report %s`", type(err).__name__, err, run.path
        )


def _best_first(checkpoints: Checkpoints) -> list[int]:
    """Steps to try for the final evaluation: the best by validation accuracy first, then the newest."""
    best = checkpoints.best_step()
    rest = [s for s in checkpoints.manager.all_steps() if s != best]
    return rest + ([best] if best is not None else [])  # restore_newest_good tries from the end


class _TermFlag:
    """Turns SIGTERM (a preemption) and a first Ctrl-C into a flag the loop checks after each step, so both end in
    a checkpoint at the current step; a second Ctrl-C interrupts at once. Only the main thread may set handlers."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.raised = False
        self.previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def _handle(self, signum, frame):
        self.raised = True
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def _loader_state(iterator) -> dict:
    """A data iterator's position as JSON (grain gives bytes)."""
    state = iterator.get_state()
    return {"grain": state.decode()} if isinstance(state, bytes) else state


def _restore_loader(iterator, state: dict) -> None:
    iterator.set_state(state["grain"].encode() if "grain" in state else state)


def _loader_states(train_iter) -> list:
    """Every host's data position (they differ: each reads its own shard), in process order."""
    mine = json.dumps(_loader_state(train_iter))
    if jax.process_count() == 1:
        return [json.loads(mine)]
    encoded = np.frombuffer(mine.encode(), np.uint8)
    longest = int(parallel.gather(np.asarray([len(encoded)])).max())
    padded = parallel.gather(np.pad(encoded, (0, longest - len(encoded)))[None])
    return [json.loads(bytes(row).rstrip(b"\0").decode()) for row in padded]


def _save(checkpoints: Checkpoints, state: TrainState, train_iter, metrics: dict | None) -> None:
    if metrics is not None and not metrics["finite"]:
        raise NonFiniteLossError(f"parameters became non-finite at step {state.step}")
    metrics = None if metrics is None else {"val_accuracy": metrics["val_accuracy"]}
    checkpoints.save(state.step, state.params, state.opt_state, {"loaders": _loader_states(train_iter)}, metrics)


def _agreed(flag: bool) -> bool:
    """True on every host when any host saw it: hosts must stop at the same step to save together."""
    if jax.process_count() == 1:
        return flag
    return bool(parallel.gather(np.asarray([flag])).any())


def _best_val(val: dict, groups) -> dict:
    """The best head's validation accuracy and loss (the checkpoint's metric), and whether any head is finite."""
    pairs = [(a, loss) for g in groups for a, loss in zip(val[g]["accuracy"], val[g]["loss"]) if np.isfinite(loss)]
    if not pairs:
        return {"val_accuracy": 0.0, "loss": float("nan"), "finite": False}
    accuracy, loss = max(pairs, key=lambda p: p[0])
    return {"val_accuracy": float(accuracy), "loss": float(loss), "finite": True}


def _fit(config, engine: Engine, state: TrainState, inputs: Inputs, checkpoints: Checkpoints,
         writer: MetricsWriter, steps_per_epoch: int, run: RunDir) -> tuple[float, int]:  # fmt: skip
    """Trains from `state.step` to the last step; evaluates on val and checkpoints every few epochs."""
    total_steps = steps_per_epoch * config.num_epochs
    eval_every = steps_per_epoch * config.eval_every_epochs
    save_every = steps_per_epoch * config.checkpoint.every_epochs
    seconds, examples = 0.0, 0
    with _TermFlag() as term, Progress(total_steps, initial=state.step, desc="train", unit="step") as bar:
        while state.step < total_steps:
            start = time.perf_counter()
            state, metrics = engine.train_step(state, next(inputs.train))
            seconds += time.perf_counter() - start
            examples += config.batch_size
            if state.step % config.log_every_steps == 0:  # reading metrics waits for the step: only when logged
                writer.write(state.step, "train", {**metrics, "images_per_second": examples / seconds})
                bar.update(1, loss=metrics["loss"], img_s=examples / seconds)
            else:
                bar.update(1)
            scheduled = state.step % eval_every == 0 or state.step % save_every == 0 or state.step == total_steps
            if scheduled:
                engine.finish()  # the step about to be saved had a finite loss
                val = _best_val(engine.evaluate(state.params, inputs.eval("val")), engine.groups)
                writer.write(state.step, "val", {"accuracy": val["val_accuracy"], "loss": val["loss"]})
                _save(checkpoints, state, inputs.train, val)
            stop = _agreed(term.raised)
            if stop and not scheduled:
                engine.finish()
                _save(checkpoints, state, inputs.train, None)  # no metrics: never competes for best
            if stop:
                checkpoints.wait()
                raise Preempted(state.step, run)
    return seconds, examples
