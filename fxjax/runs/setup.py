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
        from fxjax.evaluate import zeroshot

        config = config_lib.resolve(config)
        zeroshot.check_text_tower(config)  # reads the checkpoint's config file only
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

    @property
    def variants(self) -> tuple[str, ...]:
        """The feature variants a run's heads train on: pooled ("embedding" for a text-initialised head), plus the
        sweep's others."""
        first = "embedding" if self.config.head.init == "text" else "pooled"
        return (first, *(v for v in self.config.sweep.feature_variants if v != first))

    @cached_property
    def zero_shot(self):
        """The zero-shot classifier (`evaluate.zeroshot.ZeroShotClassifier`) of the backbone's text tower for the
        dataset's classes, where the "zeroshot" probe or a text-initialised head needs it; else None."""
        from fxjax.evaluate import zeroshot

        c = self.config
        if not zeroshot.text_keys(c):
            return None
        names = list(c.zeroshot.classnames) or self.data.class_names
        if len(names) != self.data.num_classes:
            raise ValueError(
                f"config.zeroshot.classnames has {len(names)} names but {self.data.name} has {self.data.num_classes} "
                "classes: give one name per class, in label order (or none: the dataset's own)"
            )
        return zeroshot.zero_shot_classifier(
            c.backbone, names, tuple(c.zeroshot.templates), revision=c.revision, bpe_vocab=c.zeroshot.bpe_vocab,
            dtype=c.dtype, param_dtype=c.param_dtype,
        )  # fmt: skip

    @property
    def extract_variants(self) -> tuple[str, ...]:
        """The feature variants extracted: the heads', the zero-shot probe's embedding, and those config.protocols
        read (dinov2_linear's four)."""
        from fxjax.evaluate import catalog

        zero_shot = ("embedding",) if "zeroshot" in self.config.probes else ()
        return tuple(dict.fromkeys((*self.variants, *zero_shot, *catalog.needed_variants(self.config.protocols))))

    def _extraction(self, rows: str) -> dict:
        """How every cached split is extracted and read (the same for features and views)."""
        c = self.config
        return dict(
            mesh=self.mesh,
            batch_size=c.eval_batch_size,
            cache_dir=c.cache_dir,
            dtype=c.dtype,
            param_dtype=c.param_dtype,
            worker_count=c.data.worker_count,
            param_sharding=self.param_sharding,
            rows=rows,
        )

    def cached_features(self, rows: str = "all"):
        """Every split's features from the cache, extracted into it first where missing: → (features {split:
        {variant: [n, d]}}, labels {split: [n]}, hits {split: bool}), lazily. rows="host": this host's
        contiguous rows only (`shard_bounds`: what head training and evaluation read)."""
        from fxjax.features import extract

        data = self.data  # the data first: a bad source is refused before the backbone loads
        return extract.cached_features(self.backbone, data, variants=self.extract_variants, **self._extraction(rows))

    def cached_views(self, rows: str = "host"):
        """config.data.views augmented views (seeded by config.seed) of every training image from the cache,
        extracted into it first where missing: → ({variant: [n, views, d]}, labels [n]), lazily; this host's
        rows by default."""
        from fxjax.features import views

        c, data = self.config, self.data
        feats, labels, _ = views.cached_views(
            self.backbone, data, views=c.data.views, seed=c.seed, variants=self.variants, **self._extraction(rows)
        )
        return feats, labels

    def check(self, run: RunDir) -> None:
        """Refuses a run that cannot start or may not continue in `run`, reading only: the splits, the batch size,
        then (for a workdir that holds a run) the recorded meaning — before the backbone loads — and the classes
        and weights."""
        c, data = self.config, self.data
        for split in ("train", "val", "test"):
            if len(data.splits[split]) == 0:
                raise ValueError(
                    f"the {split} split of {data.name} is empty (config.data.val_fraction / test_fraction carve val "
                    "and test where a dataset has none): the run could not be selected or scored"
                )
        if len(data.splits["train"]) < c.batch_size:
            train = len(data.splits["train"])
            raise ValueError(f"config.batch_size={c.batch_size} is larger than the training split ({train})")
        if c.protocols:
            from fxjax.evaluate import catalog

            catalog.check_batches(c, len(data.splits["train"]), self.mesh)
        if run.has(RunDir.CONFIG) and (run.checkpoints.exists() or run.has(RunDir.SUMMARY)):
            check_same_meaning(run, run.read(RunDir.CONFIG), c.to_dict())
        check_resumable(run, self.backbone, data)

    def record(self, run: RunDir) -> None:
        """Checks that `run` may be (re)started with this setup, then writes config.json and environment.json
        (a finished run's record is never rewritten)."""
        self.check(run)
        if jax.process_index() == 0 and not run.has(RunDir.SUMMARY):
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


# Settings a rerun or resume may change: how the work is done, not what it computes (docs/reliability.md).
RERUN_FREE = (
    "data.worker_count", "cache_dir", "log_every_steps", "eval_batch_size", "mesh.data", "mesh.fsdp",
    "checkpoint.keep",
)  # fmt: skip


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out |= _flat(value, f"{prefix}{key}.")
        else:
            out[prefix + key] = list(value) if isinstance(value, (tuple, list)) else value
    return out


def check_same_meaning(run: RunDir, recorded: dict, config: dict, what: str = "a run") -> None:
    """A run directory is the record of one experiment: a config that would change what its results mean (data,
    split, backbone, preprocessing, head, optimisation, protocol) is refused, naming every key that changed.
    `what` names the record in the message (a suite's cell, say)."""
    old, new = _flat(recorded), _flat(config)
    free = set(RERUN_FREE)
    if new.get("sweep.learning_rates") or new.get("sweep.weight_decays"):
        free |= {"optimizer.learning_rate", "optimizer.weight_decay"}  # config.json records the sweep's winner
    changed = sorted(k for k in old.keys() | new.keys() if k not in free and old.get(k) != new.get(k))
    if changed:
        shown = ", ".join(f"{k} ({old.get(k)!r} → {new.get(k)!r})" for k in changed[:5])
        more = f" and {len(changed) - 5} more" if len(changed) > 5 else ""
        raise ValueError(
            f"workdir {str(run.path)!r} holds {what} made with another config: {shown}{more} changed; that would "
            "change what its results mean: use a new --workdir"
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
