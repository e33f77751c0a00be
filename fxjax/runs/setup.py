"""One setup for every command: the mesh, the backbone at its image size, the data, the provenance files and the
resume check. `train`, `extract`, `export` and the report all start here, so they can never disagree on how a
config turns into a backbone and a dataset."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import jax
import ml_collections

from fxjax import config as config_lib, parallel
from fxjax.parallel.sharding import fsdp_shardings
from fxjax.runs import rundir
from fxjax.runs.rundir import RunDir


@dataclass
class Setup:
    """A resolved config and what it builds; the backbone and the data load on first use, so a command that
    needs only one of them (the report needs the data, export the backbone) never pays for the other."""

    config: ml_collections.ConfigDict
    mesh: jax.sharding.Mesh = field(repr=False)

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict) -> Setup:
        """Resolves `config` (unknown keys and bad values are errors) and builds the mesh."""
        config = config_lib.resolve(config)
        mesh = parallel.make_mesh(config.mesh.data, config.mesh.fsdp)
        parallel.check_batch_size(config.batch_size, mesh)
        parallel.check_batch_size(config.eval_batch_size, mesh, "config.eval_batch_size")
        return cls(config, mesh)

    @classmethod
    def from_record(cls, recorded: dict) -> Setup:
        """The setup of a finished run, from its config.json, on this machine's devices (one mesh axis)."""
        config = config_lib.resolve(ml_collections.ConfigDict(recorded))
        return cls(config, parallel.make_mesh())

    @property
    def shard(self) -> dict:
        """This host's place among the hosts: each reads its own shard of every split."""
        return {"shard_index": jax.process_index(), "shard_count": jax.process_count()}

    @property
    def param_sharding(self) -> parallel.ShardingFn | None:
        """How a frozen backbone is laid out: 1/fsdp per device with FSDP, else replicated."""
        return fsdp_shardings if self.config.mesh.fsdp > 1 else None

    @cached_property
    def backbone(self):
        from fxjax.backbones.hub import load_backbone

        c = self.config
        return load_backbone(
            c.backbone, revision=c.revision, dtype=c.dtype, param_dtype=c.param_dtype, image_size=c.image_size
        )

    @cached_property
    def data(self):
        from fxjax.data.sources import load_dataset

        d = self.config.data
        return load_dataset(
            d.source,
            data_dir=d.data_dir,
            val_fraction=d.val_fraction,
            test_fraction=d.test_fraction,
            seed=d.split_seed,
            few_shot_k=d.few_shot_k,
            cache_dir=self.config.cache_dir,  # where `verify` keeps a folder's index of unreadable files
        )

    def record(self, run: RunDir) -> None:
        """Checks that `run` may be (re)started with this setup, then writes config.json and environment.json."""
        check_resumable(run, self.backbone, self.data)
        if jax.process_index() == 0:
            run.write(RunDir.CONFIG, self.config.to_dict())
            run.write(RunDir.ENVIRONMENT, self.environment())

    def environment(self) -> dict:
        data, backbone = self.data, self.backbone
        return rundir.environment(
            backbone=backbone.info,
            preprocess=backbone.preprocess.to_dict(),
            dataset=data.name,
            class_names=data.class_names,
            dataset_fingerprint=data.fingerprint,
        )


def check_resumable(run: RunDir, backbone, data) -> None:
    """A workdir with checkpoints must be resumed with the same classes and backbone weights."""
    if not run.has(RunDir.ENVIRONMENT) or not run.checkpoints.exists():
        return
    env = run.read(RunDir.ENVIRONMENT)
    if env.get("class_names") != data.class_names:
        raise ValueError(
            f"workdir {str(run.path)!r} holds a run with {len(env.get('class_names') or [])} classes; this config "
            f"has {data.num_classes} ({data.name}): use a new --workdir"
        )
    if env.get("backbone", {}).get("weight_sha256") != backbone.info["weight_sha256"]:
        raise ValueError(
            f"workdir {str(run.path)!r} holds a run of other backbone weights "
            f"({env['backbone'].get('name')}): use a new --workdir"
        )
