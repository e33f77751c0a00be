"""Which parameters train, decided once from the config as a set of parameter paths.

As big_vision's `config.schedule = [("img/.*", None), ...]`: freezing is data, a list of regular expressions over
the model's dotted parameter paths (`backbone.blocks.3.attn.query.kernel`, `head.out.kernel`); a parameter whose
path matches any of them is frozen. `"all"` (the whole backbone), `"none"` and `"K"` (the first K backbone stages)
are shorthands that expand to such patterns. The training step differentiates only the trainable split, so the
frozen part gets no gradient and no optimiser state; BatchNorm statistics are never parameters.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from flax import nnx

from fxjax.backbones.convert import path_str

SHORTHANDS = "'all', 'none', a number K of leading backbone stages, or 're:<pattern>' over parameter paths"


def frozen_patterns(freeze: str, stage_paths: list[tuple[str, ...]] | None) -> tuple[str, ...]:
    """config.freeze → regular expressions (over paths like `backbone.blocks.0.attn.query.kernel`) of what is
    frozen. `stage_paths` is the backbone's (`module.stage_paths()`); None only checks the syntax."""
    if freeze == "all":
        return (r"backbone\..*",)
    if freeze == "none":
        return ()
    if freeze.startswith("re:"):
        try:
            re.compile(freeze[3:])
        except re.error as err:
            raise ValueError(f"config.freeze={freeze!r}: not a regular expression ({err})") from None
        return (freeze[3:],)
    if freeze.isdigit():
        k = int(freeze)
        if stage_paths is None:
            return ()
        if k > len(stage_paths):
            raise ValueError(f"config.freeze={freeze!r}: this backbone has {len(stage_paths)} stages")
        if k == len(stage_paths):
            return (r"backbone\..*",)
        return tuple(rf"backbone\.{re.escape(p)}\..*" for stage in stage_paths[:k] for p in stage)
    raise ValueError(f"config.freeze={freeze!r}: use {SHORTHANDS}")


def trainable(patterns: tuple[str, ...]) -> Callable[[str], bool]:
    """A parameter path → whether it trains (matches none of the frozen patterns)."""
    compiled = [re.compile(p) for p in patterns]
    return lambda name: not any(c.fullmatch(name) for c in compiled)


def split_trainable(model: nnx.Module, is_trainable: Callable[[str], bool]):
    """model → (graphdef, trainable state, frozen state). Everything that is not a trainable Param (frozen
    parameters, BatchNorm statistics, buffers) lands in the frozen state."""

    def keep(path, value) -> bool:
        return isinstance(value, nnx.Param) and is_trainable(path_str(path))

    return nnx.split(model, keep, ...)
