"""Every named protocol behind one lookup: the recipes (pure functions of the pooled features) and the linear
evaluations that train heads in the engine (dinov2_linear, vtab1k), with the features and settings each needs.

A run names them in `config.protocols` and overrides their settings in `config.protocol_overrides.<name>`;
`on_features` runs them on a cached-features run's features and returns protocols.json / protocols.md.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from fxjax.evaluate import linear_eval, recipes, results
from fxjax.evaluate.linear_specs import LINEAR_SPECS
from fxjax.evaluate.results import ProtocolResult

NAMES = (*recipes.PROTOCOLS, *LINEAR_SPECS)


def _check_name(name: str) -> None:
    if name not in NAMES:
        raise ValueError(f"unknown protocol {name!r}; choose from {', '.join(NAMES)}")


def protocol_defaults(name: str) -> dict[str, Any]:
    """The settings protocol `name` may be given, with their defaults."""
    _check_name(name)
    if name in recipes.PROTOCOLS:
        return dict(recipes.PROTOCOLS[name].defaults)
    return linear_eval.defaults(LINEAR_SPECS[name])


def needed_variants(names: Sequence[str]) -> tuple[str, ...]:
    """The feature variants the protocols `names` read: pooled for the recipes, the spec's for linear ones."""
    out = {"pooled": None}
    for name in names:
        _check_name(name)
        if name in LINEAR_SPECS:
            out |= dict.fromkeys(linear_eval.variants(LINEAR_SPECS[name]))
    return tuple(out)


def check_overrides(name: str, overrides: Mapping[str, Any]) -> None:
    """Every override names a setting of `name`, with a value of its default's kind (numbers for numbers,
    sequences for sequences); a default of None takes a positive integer."""
    known = protocol_defaults(name)
    for key, value in overrides.items():
        if key not in known:
            raise ValueError(
                f"config.protocol_overrides.{name}.{key}: unknown setting; {name} takes {', '.join(sorted(known))}"
            )
        default = known[key]
        if default is None:
            ok = isinstance(value, int) and not isinstance(value, bool) and value > 0
        elif isinstance(default, bool):
            ok = isinstance(value, bool)
        elif isinstance(default, (int, float)):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        elif isinstance(default, (tuple, list)):
            ok = isinstance(value, (tuple, list))
        else:
            ok = isinstance(value, type(default))
        if not ok:
            raise ValueError(
                f"config.protocol_overrides.{name}.{key}={value!r}: expected a value like its default {default!r}"
            )


def check_batches(config, train_examples: int, mesh) -> None:
    """The linear protocols in `config.protocols` can train on a training split of `train_examples` over `mesh`
    with their `batch_size` overrides: checked before anything is extracted."""
    for name in config.protocols:
        if name in LINEAR_SPECS:
            overrides = config.protocol_overrides.get(name)
            linear_eval.check_batch(name, overrides.to_dict() if overrides else {}, train_examples, mesh)


def evaluate_protocol(
    name: str,
    feats: Mapping[str, Mapping[str, Any]],
    labels: Mapping[str, Any],
    num_classes: int,
    *,
    mesh=None,
    seed: int = 0,
    overrides: Mapping[str, Any] | None = None,
) -> ProtocolResult:
    """Runs protocol `name` on feats {split: {variant: [n, d]}} and labels {split: [n]} (train, test, and val
    where present). Recipes read the pooled features (their seeds are settings); linear protocols train heads
    on `mesh` from `seed`."""
    _check_name(name)
    overrides = dict(overrides or {})
    if name in LINEAR_SPECS:
        return linear_eval.run_linear(name, feats, labels, num_classes, mesh=mesh, seed=seed, **overrides)
    split = lambda s: (feats[s]["pooled"], labels[s])
    val = split("val") if "val" in feats else None
    return recipes.run(name, split("train"), split("test"), num_classes, val, **overrides)


def on_features(config, feats, labels, num_classes: int, *, mesh=None) -> tuple[dict, dict]:
    """config.protocols on a run's cached features → (summary entries, {"protocols.json": ..., "protocols.md":
    ...}); the caller owns the run directory and writes the files."""
    if not config.protocols:
        return {}, {}
    overrides = config.protocol_overrides
    done = [
        evaluate_protocol(
            name, feats, labels, num_classes, mesh=mesh, seed=config.seed,
            overrides=overrides[name].to_dict() if name in overrides else None,
        )
        for name in config.protocols
    ]  # fmt: skip
    entries = {
        "protocols": {
            r.protocol: {"test_top1": r.metrics["top1"]["value"], "chosen": r.selection.get("value")} for r in done
        }
    }
    return entries, {"protocols.json": {"results": [r.to_dict() for r in done]}, "protocols.md": _markdown(done)}


def _markdown(done: Sequence[ProtocolResult]) -> str:
    lines = ["# Protocols", "", results.markdown_table(done).rstrip("\n"), ""]
    for r in done:
        if "global_batch" in r.settings:
            lines.append(
                f"- {r.protocol}: global batch {r.settings['global_batch']} (learning rates scaled by it / 256), "
                f"{r.settings['steps']} steps, {len(r.rows)} heads; best `{r.selection['value']}`"
            )
    return "\n".join(lines) + "\n"
