"""Orbax checkpoints of a training run: the trainable parameters, the optimizer state and the data position
as separate items; the last N kept plus the best by validation accuracy; restored onto the current mesh from
an abstract target (shapes + shardings), so a run resumes on whatever devices it now has."""

from __future__ import annotations

from pathlib import Path

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

METRIC = "val_accuracy"


class Checkpoints:
    def __init__(self, directory: str | Path, *, keep: int = 2):
        options = ocp.CheckpointManagerOptions(
            best_fn=lambda metrics: metrics[METRIC],
            best_mode="max",
            preservation_policy=policies.AnyPreservationPolicy([
                policies.LatestN(n=keep),
                policies.BestN(get_metric_fn=lambda metrics: metrics[METRIC], n=1),
            ]),
            enable_async_checkpointing=True,
        )
        self.manager = ocp.CheckpointManager(
            Path(directory).absolute(), options=options, item_names=("params", "opt_state", "data")
        )

    def save(self, step: int, params, opt_state, data: dict, metrics: dict) -> None:
        """Asynchronous: returns once the arrays are copied off the devices; `wait` before exiting."""
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

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def best_step(self) -> int | None:
        return self.manager.best_step()

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def abstract(tree, shardings):
    """Shape/dtype/sharding stand-ins for a restore target."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
