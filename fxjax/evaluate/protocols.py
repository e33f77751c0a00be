"""Everything a run does with cached features besides training its head: the vmapped sweep of linear heads,
the classic probes and the few-shot protocol. Each writes its table into the workdir (JSON + markdown)."""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np

from fxjax.evaluate import probes
from fxjax.heads import sweep
from fxjax.runs import rundir

SPLITS = ("train", "val", "test")


def on_features(config, variants: dict, labels: dict, num_classes: int, mesh, workdir: Path) -> dict:
    """Runs what the config asks for on {split: {variant: features}}; returns summary entries (the sweep's
    best row, probe and few-shot results). Probes and few-shot use the pooled features; the sweep every
    variant, and its best row among pooled heads gives the run's head its learning rate and weight decay."""
    out = {}
    feats = {split: v["pooled"] for split, v in variants.items()}
    if config.sweep.learning_rates or config.sweep.weight_decays or len(config.sweep.feature_variants) > 1:
        names = ("pooled", *(v for v in config.sweep.feature_variants if v != "pooled"))
        result = sweep.train_sweep(
            {name: tuple(variants[s][name] for s in SPLITS) for name in names},
            tuple(labels[s] for s in SPLITS),
            num_classes=num_classes,
            learning_rates=tuple(config.sweep.learning_rates) or (config.optimizer.learning_rate,),
            weight_decays=tuple(config.sweep.weight_decays) or (config.optimizer.weight_decay,),
            opt_config=config.optimizer,
            batch_size=config.batch_size,
            num_epochs=config.num_epochs,
            seed=config.seed,
            mesh=mesh,
            eval_batch_size=config.eval_batch_size,
        )
        if jax.process_index() == 0:
            sweep.write(result, workdir)
        best_pooled = sweep.select([row for row in result.table if row["variant"] == "pooled"])
        out["sweep"] = {
            **best_pooled,
            "best_overall": result.best,
            "heads": len(result.table),
            "seconds": result.train_seconds,
        }
    if config.probes:
        results = [_probe(name, feats, labels, num_classes) for name in config.probes]
        if jax.process_index() == 0:
            rundir.write_json(workdir / "probes.json", {"probes": [r.to_dict() for r in results]})
            rundir.write_text(workdir / "probes.md", _probes_markdown(results))
        out["probes"] = {
            r.name: {"best": r.best, "val_accuracy": r.val_accuracy, "test_accuracy": r.test_accuracy} for r in results
        }
    if config.fewshot.ks:
        rows = probes.few_shot_eval(
            feats["train"],
            labels["train"],
            feats["test"],
            labels["test"],
            num_classes,
            ks=tuple(config.fewshot.ks),
            seeds=tuple(config.fewshot.seeds),
            probe=config.fewshot.probe,
        )
        rows = [{**row, "probe": config.fewshot.probe, "seeds": list(config.fewshot.seeds)} for row in rows]
        if jax.process_index() == 0:
            rundir.write_json(workdir / "fewshot.json", {"rows": rows})
            rundir.write_text(workdir / "fewshot.md", fewshot_markdown(rows))
        out["fewshot"] = {int(r["k"]): r["mean_accuracy"] for r in rows}
    return out


def _probe(name: str, feats: dict, labels: dict, num_classes: int) -> probes.ProbeResult:
    args = [a for s in SPLITS for a in (np.asarray(feats[s]), labels[s])]
    if name == "ridge":
        return probes.ridge_probe(*args, num_classes)
    if name == "logistic":
        return probes.logistic_probe(*args, num_classes, standardize=True)
    return probes.knn_probe(*args, num_classes)


def _probes_markdown(results) -> str:
    lines = ["| probe | chosen | val accuracy | test accuracy |", "|---|---|---:|---:|"]
    lines += [f"| {r.name} | {r.param}={r.best:g} | {r.val_accuracy:.4f} | {r.test_accuracy:.4f} |" for r in results]
    return "\n".join(lines) + "\n"


def fewshot_markdown(rows) -> str:
    lines = ["| k per class | accuracy (mean ± std) | seeds |", "|---:|---|---:|"]
    lines += [
        f"| {r['k']} | {100 * r['mean_accuracy']:.1f} ± {100 * r['std_accuracy']:.1f} | {len(r['seeds'])} |"
        for r in rows
    ]
    return "\n".join(lines) + "\n"
