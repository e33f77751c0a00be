"""Orbax checkpoints of a training run: the trainable parameters, the optimizer state and the data position
as separate items; the last N kept plus the best by validation accuracy; restored onto the current mesh from
an abstract target (shapes + shardings), so a run resumes on whatever devices it now has."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

METRIC = "val_accuracy"
log = logging.getLogger("fxjax")


class Checkpoints:
    def __init__(self, directory: str | Path, *, keep: int = 2):
        options = ocp.CheckpointManagerOptions(
            best_fn=lambda metrics: metrics[METRIC],
            best_mode="max",
            preservation_policy=policies.AnyPreservationPolicy(
                [
                    policies.LatestN(n=keep),
                    policies.BestN(get_metric_fn=lambda metrics: metrics[METRIC], n=1),
                ]
            ),
            enable_async_checkpointing=True,
        )
        self.directory = Path(directory).absolute()
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("params", "opt_state", "data")
        )

    def save(self, step: int, params, opt_state, data: dict, metrics: dict | None) -> None:
        """Asynchronous: returns once the arrays are copied off the devices; `wait` before exiting.
        A checkpoint without metrics (a preemption save) never competes for best."""
        self.manager.save(
            step,
            args=ocp.args.Composite(
                params=ocp.args.StandardSave(params),
                opt_state=ocp.args.StandardSave(opt_state),
                data=ocp.args.JsonSave(data),
            ),
            metrics=metrics,
        )

    def restore(self, step: int, abstract_params, abstract_opt_state):
        """→ (params, opt_state, data) at `step`, laid out as the abstract targets' shardings say."""
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                params=ocp.args.StandardRestore(abstract_params),
                opt_state=ocp.args.StandardRestore(abstract_opt_state),
                data=ocp.args.JsonRestore(),
            ),
        )
        return restored.params, restored.opt_state, restored.data

    def restore_newest_good(self, abstract_params, abstract_opt_state, *, steps=None):
        """Restores the newest readable checkpoint (or the newest of `steps`). A damaged one (truncated, partly
        written) is reported, moved aside as `damaged-<step>` so it is never tried again, and skipped."""
        for step in sorted(self.manager.all_steps() if steps is None else steps, reverse=True):
            try:
                return step, self.restore(step, abstract_params, abstract_opt_state)
            except Exception as err:  # noqa: BLE001 - any failure to read means the checkpoint is unusable
                self.quarantine(step, err)
        return None, None

    def quarantine(self, step: int, err: Exception) -> None:
        source = self.directory / str(step)
        target = self.directory / f"damaged-{step}"
        log.warning(
            "checkpoint at step %d is damaged (%s: %s); moved to %s, trying an older one",
            step,
            type(err).__name__,
            str(err).splitlines()[0][:200] if str(err) else "",
            target,
        )
        if jax.process_index() == 0 and source.exists():
            shutil.rmtree(target, ignore_errors=True)
            source.rename(target)
        self.manager.reload()

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def best_step(self) -> int | None:
        return self.manager.best_step()

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()

    def __enter__(self) -> Checkpoints:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def abstract(tree, shardings):
    """Shape/dtype/sharding stand-ins for a restore target."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def read_params(directory: str | Path, step: int) -> dict[str, np.ndarray]:
    """The params item saved at `step` → {dotted path: array}, onto this process's first device whatever mesh
    saved it (a run trained on 8 devices exports on a laptop). A missing checkpoint is a FileNotFoundError."""
    item = Path(directory).absolute() / str(step) / "params"
    if not item.is_dir():
        raise FileNotFoundError(f"{item} is missing: the checkpoint of step {step} is gone")
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    tree = ocp.StandardCheckpointHandler().metadata(item).tree  # the item's own metadata, no step
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), tree)
    restored = ocp.StandardCheckpointer().restore(item, target)
    flat = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(restored)[0]:
        name = jax.tree_util.keystr(path, simple=True, separator=".")
        flat[name.removesuffix(".value")] = np.asarray(leaf)  # NNX Variables store their array under "value"
    return flat
