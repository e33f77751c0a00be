"""DINOv2's linear evaluation and VTAB-1k on cached features, through the head engine.

Every head of a `LinearEvalSpec` (52 for dinov2_linear: 4 feature variants x 13 learning rates scaled by global
batch / 256) trains in ONE engine: one pass over the feature batches feeds every head, as DINOv2's
`AllClassifiers` does with the backbone in the loop. SGD with momentum, no weight decay, cosine decay to 0 over
the spec's steps (torch's CosineAnnealingLR stepped per iteration), heads N(0, std²) with bias 0; the best head
on validation by top-1 (ties: the first in DINOv2's order) is reported on test with bootstrap intervals.
"""

from __future__ import annotations

import dataclasses
import logging
import types
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx

from fxjax import parallel
from fxjax.data.features import FeatureBatches, feature_eval_batches
from fxjax.evaluate.linear_specs import LINEAR_SPECS, LinearEvalSpec, VtabSpec
from fxjax.evaluate.metrics import bootstrap_metrics
from fxjax.evaluate.results import ProtocolResult
from fxjax.heads import freeze
from fxjax.heads.engine import Engine, NonFiniteLossError
from fxjax.heads.heads import Classifier, Head
from fxjax.progress import Progress

log = logging.getLogger("fxjax")

Features = Mapping[str, Mapping[str, Any]]  # split → variant → [n, d]

# Settings a run may override besides the spec's own fields (steps: instead of epochs x epoch_length).
EXTRA_DEFAULTS: dict[str, Any] = {"steps": None, "batch_size": None, "eval_batch_size": None, **{
    "bootstrap": 1000, "bootstrap_seed": 0,
}}  # fmt: skip
SPEC_OVERRIDES = ("epochs", "epoch_length", "base_learning_rates", "momentum", "head_init_std")
VTAB_OVERRIDES = ("train_examples", "val_examples")


def defaults(spec: LinearEvalSpec | VtabSpec) -> dict[str, Any]:
    """The settings a run of `spec` may override, with their default values."""
    heads = spec.heads if isinstance(spec, VtabSpec) else spec
    out = {k: getattr(heads, k) for k in SPEC_OVERRIDES} | EXTRA_DEFAULTS
    if isinstance(spec, VtabSpec):
        out |= {k: getattr(spec, k) for k in VTAB_OVERRIDES}
    return out


def variants(spec: LinearEvalSpec | VtabSpec) -> tuple[str, ...]:
    """The feature variants `spec`'s heads train on (they must be extracted)."""
    heads = spec.heads if isinstance(spec, VtabSpec) else spec
    return tuple(v for v, _, _ in heads.variants)


@dataclasses.dataclass
class FittedHeads:
    """Trained heads: the engine, its parameters (group → stacked [H, ...]) and one row per head (spec order)."""

    engine: Engine
    params: dict
    rows: list[dict[str, Any]]

    def model(self, row: dict[str, Any]) -> Classifier:
        """One head as a module of its own (its slice of the stacked parameters)."""
        group = row["variant"]
        params = jax.tree.map(lambda a: a[row["index"]], self.params[group])
        return nnx.merge(self.engine.graphdefs[group], params, self.engine.frozen[group])

    def logits(self, row: dict[str, Any], x: np.ndarray, chunk: int = 4096) -> np.ndarray:
        """One head's class scores [n, c] on features x [n, d]."""
        model = self.model(row)
        return np.concatenate([np.asarray(model(x[i : i + chunk])) for i in range(0, len(x), chunk)])


def _opt_config(spec: LinearEvalSpec) -> types.SimpleNamespace:
    if spec.optimizer != "sgd" or spec.schedule != "cosine" or spec.final_learning_rate != 0.0:
        raise ValueError(f"{spec.name}: the engine runs SGD, cosine decay to 0; not {spec.optimizer}/{spec.schedule}")
    return types.SimpleNamespace(
        name="sgd", learning_rate=0.0, weight_decay=spec.weight_decay, momentum=spec.momentum, warmup_steps=0,
        schedule="cosine", grad_clip=0.0, label_smoothing=0.0,
    )  # fmt: skip


def fit_heads(
    spec: LinearEvalSpec,
    rows: Sequence[dict[str, Any]],
    feats: Mapping[str, np.ndarray],
    labels: np.ndarray,
    num_classes: int,
    *,
    steps: int,
    global_batch: int,
    mesh,
    seed: int = 0,
) -> FittedHeads:
    """Trains every head in `rows` (spec.heads(...) rows) for `steps` SGD steps on feats {variant: [n, d]}, in one
    engine: one group per variant, its heads stacked with their own learning rates."""
    rows = [dict(r) for r in rows]
    groups: dict[str, list[dict]] = {}
    for r in rows:
        r["index"] = len(groups.setdefault(r["variant"], []))
        groups[r["variant"]].append(r)
    missing = sorted(set(groups) - set(feats))
    if missing:
        raise ValueError(f"{spec.name}: feature variant(s) {missing} were not extracted; have {sorted(feats)}")
    if global_batch > len(labels):
        raise ValueError(
            f"{spec.name}: global batch {global_batch} exceeds the {len(labels)} training examples; "
            "set a smaller batch_size override"
        )
    parallel.check_batch_size(global_batch, mesh, f"{spec.name} batch_size")
    models = {
        g: Classifier(None, Head(feats[g].shape[1], num_classes, init_std=spec.head_init_std, rngs=nnx.Rngs(seed)), g)
        for g in groups
    }
    hyper = {
        g: {"learning_rate": [r["learning_rate"] for r in rs], "weight_decay": [spec.weight_decay] * len(rs)}
        for g, rs in groups.items()
    }
    engine = Engine(
        models, freeze.trainable(()), num_classes=num_classes, opt_config=_opt_config(spec), total_steps=steps,
        mesh=mesh, seed=seed, hyper=hyper,
    )  # fmt: skip
    batches = FeatureBatches(
        {g: np.asarray(feats[g]) for g in groups}, np.asarray(labels), batch_size=global_batch, seed=seed,
        shard_index=jax.process_index(), shard_count=jax.process_count(),
    )  # fmt: skip
    state = engine.init_state()
    with Progress(steps, desc=spec.name, unit="step") as bar:
        for _ in range(steps):
            state, _ = engine.train_step(state, next(batches))
            bar.update(1)
    engine.finish()
    return FittedHeads(engine, state.params, rows)


def _score(fitted: FittedHeads, split: str, feats: Mapping[str, np.ndarray], labels: np.ndarray, batch: int) -> None:
    """Adds `<split>_top1` / `<split>_loss` of every head to its row."""
    shard = {"shard_index": jax.process_index(), "shard_count": jax.process_count()}
    groups = {r["variant"] for r in fitted.rows}
    batches = feature_eval_batches({g: np.asarray(feats[g]) for g in groups}, np.asarray(labels), batch, **shard)
    result = fitted.engine.evaluate(fitted.params, batches)
    for r in fitted.rows:
        r[f"{split}_top1"] = float(result[r["variant"]]["accuracy"][r["index"]])
        r[f"{split}_loss"] = float(result[r["variant"]]["loss"][r["index"]])


def best_on_val(rows: Sequence[dict[str, Any]], split: str = "val") -> dict[str, Any]:
    """DINOv2's choice: the highest top-1 on `split`, ties to the first head in its order (blocks, avgpool, lr);
    heads whose loss there is not finite are out."""
    finite = [r for r in rows if np.isfinite(r[f"{split}_loss"])]
    if not finite:
        raise NonFiniteLossError(f"every head diverged on {split}: lower the learning rates, or check the features")
    return max(finite, key=lambda r: (r[f"{split}_top1"], -rows.index(r)))


def _resolve(spec_name_or_spec, overrides: dict[str, Any]) -> tuple[LinearEvalSpec | VtabSpec, dict[str, Any]]:
    spec = LINEAR_SPECS.get(spec_name_or_spec) if isinstance(spec_name_or_spec, str) else spec_name_or_spec
    if spec is None:
        raise ValueError(f"unknown linear protocol {spec_name_or_spec!r}; known: {sorted(LINEAR_SPECS)}")
    known = defaults(spec)
    unknown = sorted(set(overrides) - set(known))
    if unknown:
        raise ValueError(f"{spec.name}: unknown setting {unknown[0]!r}; known: {sorted(known)}")
    settings = known | overrides
    fields = {k: settings[k] for k in SPEC_OVERRIDES}
    fields["base_learning_rates"] = tuple(float(v) for v in fields["base_learning_rates"])
    if isinstance(spec, VtabSpec):
        spec = dataclasses.replace(spec, heads=dataclasses.replace(spec.heads, **fields), **{
            k: settings[k] for k in VTAB_OVERRIDES
        })  # fmt: skip
    else:
        spec = dataclasses.replace(spec, **fields)
    for key in ("steps", "batch_size", "eval_batch_size", "epochs", "epoch_length"):
        if settings[key] is not None and int(settings[key]) < 1:
            raise ValueError(f"{spec.name}: {key}={settings[key]} must be a positive integer")
    return spec, settings


def _splits(feats: Features, labels: Mapping[str, Any], names: Sequence[str]) -> None:
    for split in names:
        if split not in feats or split not in labels:
            raise ValueError(f"the linear protocols need a {split!r} split; have {sorted(feats)}")


def run_linear(
    spec_name_or_spec: str | LinearEvalSpec | VtabSpec,
    feats: Features,
    labels: Mapping[str, Any],
    num_classes: int,
    *,
    mesh=None,
    seed: int = 0,
    batch_size: int | None = None,
    **overrides: Any,
) -> ProtocolResult:
    """Runs dinov2_linear or vtab1k (a name in LINEAR_SPECS, or a spec) on feats {split: {variant: [n, d]}} and
    labels {split: [n]} (splits train, val, test). `batch_size` is the global batch (default: the spec's per-device
    batch x the mesh's devices, clipped to the training examples); it scales every learning rate, and is logged and
    stored in the result."""
    if batch_size is not None:
        overrides = {**overrides, "batch_size": batch_size}
    spec, settings = _resolve(spec_name_or_spec, overrides)
    mesh = parallel.make_mesh() if mesh is None else mesh
    heads = spec.heads if isinstance(spec, VtabSpec) else spec
    _splits(feats, labels, ("train", "val", "test"))
    n_train = _first_train_examples(spec, len(labels["train"]))
    global_batch, clipped_from = _global_batch(spec.name, heads, settings["batch_size"], n_train, mesh)
    steps = int(settings["steps"] or heads.steps)
    eval_batch = int(settings["eval_batch_size"] or global_batch)
    parallel.check_batch_size(eval_batch, mesh, f"{spec.name} eval_batch_size")
    rows = heads.heads(global_batch)
    log.info(
        "%s: %d heads, global batch %d (learning rates x %d / %d)%s, %d steps",
        spec.name, len(rows), global_batch, global_batch, heads.reference_batch,
        f", the default {clipped_from} clipped to the {n_train} training examples" if clipped_from else "", steps,
    )  # fmt: skip
    run = _vtab1k if isinstance(spec, VtabSpec) else _dinov2_linear
    result = run(spec, rows, feats, labels, num_classes, steps, global_batch, eval_batch, mesh, seed, settings)
    result.settings |= {"global_batch": global_batch, "steps": steps, "eval_batch_size": eval_batch}
    if clipped_from:
        result.settings["global_batch_clipped_from"] = clipped_from
    result.splits["global_batch"] = global_batch
    return result


def check_batch(spec_name_or_spec, overrides: Mapping[str, Any], train_examples: int, mesh) -> None:
    """Refuses, before anything is extracted, a `batch_size` override that `run_linear` would refuse on a
    training split of `train_examples` over `mesh`."""
    spec, settings = _resolve(spec_name_or_spec, dict(overrides))
    heads = spec.heads if isinstance(spec, VtabSpec) else spec
    _global_batch(spec.name, heads, settings["batch_size"], _first_train_examples(spec, train_examples), mesh)


def _first_train_examples(spec: LinearEvalSpec | VtabSpec, train_examples: int) -> int:
    """The heads first train on vtab1k's train800 (its final stage on 1000), on dinov2_linear's whole split."""
    return min(train_examples, spec.train_examples) if isinstance(spec, VtabSpec) else train_examples


def _global_batch(name: str, heads: LinearEvalSpec, given: int | None, n_train: int, mesh) -> tuple[int, int | None]:
    """The global batch and, where the default had to be clipped, that default. A batch_size given is checked
    (it fits the training examples and divides over the devices) before any head trains. The default, the
    spec's per-device batch x the devices, is clipped to the training examples rounded down to a multiple of the
    devices: on 8 devices vtab1k's 128 x 8 = 1024 would exceed train800."""
    devices = mesh.devices.size
    if given is not None:
        batch = int(given)
        if batch > n_train:
            raise ValueError(
                f"{name}: global batch {batch} exceeds the {n_train} training examples; set a smaller batch_size "
                "override"
            )
        parallel.check_batch_size(batch, mesh, f"{name} batch_size")
        return batch, None
    default = heads.batch_size_per_device * devices
    batch = min(default, n_train // devices * devices)
    if batch < 1:
        raise ValueError(f"{name}: {n_train} training examples are fewer than the {devices} devices of the mesh")
    return batch, default if batch < default else None


def _row_table(rows: Sequence[dict[str, Any]], splits: Sequence[str]) -> list[dict[str, Any]]:
    scores = (f"{s}_{m}" for s in splits for m in ("top1", "loss"))
    keys = ("name", "variant", "base_learning_rate", "learning_rate", *scores)
    return [{k: r[k] for k in keys} for r in rows]


def _selection(winner: dict[str, Any], on: str) -> dict[str, Any]:
    return {
        "param": "head", "value": winner["name"], "on": on, "metric": "top1", "variant": winner["variant"],
        "learning_rate": winner["learning_rate"], f"{on}_top1": winner[f"{on}_top1"],
    }  # fmt: skip


def _metrics(fitted: FittedHeads, winner: dict, x: np.ndarray, y: np.ndarray, settings: dict) -> dict:
    return bootstrap_metrics(fitted.logits(winner, x), y, settings["bootstrap"], settings["bootstrap_seed"])


def _dinov2_linear(spec, rows, feats, labels, num_classes, steps, global_batch, eval_batch, mesh, seed, settings):
    fitted = fit_heads(
        spec, rows, feats["train"], labels["train"], num_classes, steps=steps, global_batch=global_batch, mesh=mesh,
        seed=seed,
    )  # fmt: skip
    for split in ("val", "test"):
        _score(fitted, split, feats[split], labels[split], eval_batch)
    winner = best_on_val(fitted.rows)
    test_x = np.asarray(feats["test"][winner["variant"]])
    return ProtocolResult(
        protocol=spec.name,
        settings={**spec.to_dict(), **settings},
        selection=_selection(winner, "val"),
        metrics=_metrics(fitted, winner, test_x, np.asarray(labels["test"]), settings),
        splits={**{s: int(len(labels[s])) for s in ("train", "val", "test")}, "fit_on": "train"},
        rows=_row_table(fitted.rows, ("val", "test")),
    )


def _vtab1k(spec, rows, feats, labels, num_classes, steps, global_batch, eval_batch, mesh, seed, settings):
    """Stage "select": every head on train800, scored on val200; stage "final": the winner's variant and learning
    rate trained afresh on all 1000, scored on the full test split (VtabSpec.stages)."""
    n_train, n_val = spec.train_examples, spec.val_examples
    for split, n in (("train", n_train), ("val", n_val)):
        if len(labels[split]) < n:
            raise ValueError(f"vtab1k: the {split} split has {len(labels[split])} examples, needs {n} (VTAB-1k)")
    train = {v: np.asarray(f)[:n_train] for v, f in feats["train"].items()}
    val = {v: np.asarray(f)[:n_val] for v, f in feats["val"].items()}
    train_y, val_y = np.asarray(labels["train"])[:n_train], np.asarray(labels["val"])[:n_val]
    fitted = fit_heads(
        spec.heads, rows, train, train_y, num_classes, steps=steps, global_batch=global_batch, mesh=mesh, seed=seed
    )
    _score(fitted, "val", val, val_y, eval_batch)
    winner = best_on_val(fitted.rows)
    both = {v: np.concatenate([train[v], val[v]]) for v in (winner["variant"],)}
    final = fit_heads(
        spec.heads, [winner], both, np.concatenate([train_y, val_y]), num_classes, steps=steps,
        global_batch=global_batch, mesh=mesh, seed=seed,
    )  # fmt: skip
    (final_row,) = final.rows
    test_x = np.asarray(feats["test"][winner["variant"]])
    return ProtocolResult(
        protocol=spec.name,
        settings={**{k: v for k, v in spec.to_dict().items() if k != "tasks"}, **settings},
        selection=_selection(winner, "val"),
        metrics=_metrics(final, final_row, test_x, np.asarray(labels["test"]), settings),
        splits={
            "train": n_train,
            "val": n_val,
            "test": int(len(labels["test"])),
            "fit_on": f"train{n_train}+val{n_val}",
        },
        rows=_row_table(fitted.rows, ("val",)),
    )
