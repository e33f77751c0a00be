"""What a run computes on cached features besides its heads: the classic probes and the few-shot protocol, and the
tables (JSON + markdown) of the probes, the few-shot protocol and a sweep of heads."""

from __future__ import annotations

import numpy as np

from fxjax.evaluate import probes

SPLITS = ("train", "val", "test")


def on_features(
    config, variants: dict, labels: dict, num_classes: int, zero_shot=None, *, mesh=None
) -> tuple[dict, dict]:
    """Runs the probes and the few-shot protocol the config asks for on the pooled features of
    {split: {variant: features}} ("zeroshot": `zero_shot`, an `evaluate.zeroshot.ZeroShotClassifier`, on the
    "embedding" variant). → (summary entries, {file name: JSON object or markdown text}); the caller (who owns
    the run directory) writes the files. With `mesh` the features may be lazy (a cache entry's chunked arrays):
    the probes read them chunk by chunk onto the mesh, few-shot only its drawn rows."""
    out, files = {}, {}
    feats = {split: v["pooled"] for split, v in variants.items()}
    if config.probes:
        results = [
            zero_shot.probe(*((np.asarray(variants[s]["embedding"]), labels[s]) for s in ("val", "test")))
            if name == "zeroshot"
            else _probe(name, feats, labels, num_classes, mesh)
            for name in config.probes
        ]
        files["probes.json"] = {"probes": [r.to_dict() for r in results]}
        files["probes.md"] = _probes_markdown(results)
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
        files["fewshot.json"] = {"rows": rows}
        files["fewshot.md"] = fewshot_markdown(rows)
        out["fewshot"] = {int(r["k"]): r["mean_accuracy"] for r in rows}
    return out, files


def _probe(name: str, feats: dict, labels: dict, num_classes: int, mesh=None) -> probes.ProbeResult:
    """One probe; with `mesh`, sharded over it with the rows read chunk by chunk (never a whole split)."""
    splits = probes.Splits(**{s: (feats[s] if mesh is not None else np.asarray(feats[s]), labels[s]) for s in SPLITS})
    if name == "ridge":
        return probes.ridge_probe(splits, num_classes, mesh=mesh)
    if name == "logistic":
        return probes.logistic_probe(splits, num_classes, standardize=True, mesh=mesh)
    return probes.knn_probe(splits, num_classes, mesh=mesh)


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


def sweep_files(rows: list[dict], best: dict, total_steps: int, seconds: float) -> dict:
    """sweep.json (every head, the best, timings) and sweep.md (the same table for people, best marked)."""
    keys = ("variant", "learning_rate", "weight_decay", "val_accuracy", "val_loss", "test_accuracy")
    table = [{k: r[k] for k in keys} | {"diverged": not np.isfinite(r["val_loss"])} for r in rows]
    lines = [
        "# Linear-head sweep",
        "",
        f"{len(rows)} heads, {total_steps} steps, {seconds:.2f} s of training. "
        f"Best on validation: `{best['variant']}`, learning rate {best['learning_rate']:g}, weight decay "
        f"{best['weight_decay']:g}: val accuracy {best['val_accuracy']:.4f}, test accuracy "
        f"{best['test_accuracy']:.4f}.",
        "",
        "| | variant | learning rate | weight decay | val accuracy | val loss | test accuracy |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for row, entry in zip(rows, table):
        mark = "**best**" if row is best else "diverged" if entry["diverged"] else ""
        lines.append(
            f"| {mark} | {row['variant']} | {row['learning_rate']:g} | {row['weight_decay']:g} | "
            f"{row['val_accuracy']:.4f} | {row['val_loss']:.4f} | {row['test_accuracy']:.4f} |"
        )
    best_entry = table[rows.index(best)]
    summary = {
        "table": table, "best": best_entry, "num_heads": len(rows), "total_steps": total_steps,
        "train_seconds": seconds,
    }  # fmt: skip
    return {"sweep.json": summary, "sweep.md": "\n".join(lines) + "\n"}
