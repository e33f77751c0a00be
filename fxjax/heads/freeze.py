"""Which parameters train: the head always; backbone stages after the first `frozen_stages` ones.

Freezing is data (a stage count turned into module-path prefixes), not code in the models: the split gives
the training step a trainable state to differentiate and a frozen state it never touches. BatchNorm running
statistics are never trainable (backbones run BatchNorm in inference mode).
"""

from __future__ import annotations

from flax import nnx

from fxjax.backbones.convert import path_str


def frozen_prefixes(backbone: nnx.Module, frozen_stages: int) -> tuple[str, ...]:
    """Module-path prefixes (relative to the backbone) of the first `frozen_stages` stages; "" (everything)
    when all stages are frozen, so that no parameter outside the listed stages can slip through."""
    stages = backbone.stage_paths()
    if frozen_stages >= len(stages):
        return ("",)
    return tuple(p for stage in backbone.stage_paths()[:frozen_stages] for p in stage)


def trainable_filter(frozen: tuple[str, ...], backbone_key: str = "backbone"):
    """An NNX filter: Params outside the frozen prefixes (paths under `backbone_key` are the backbone's)."""

    def is_trainable(path, value) -> bool:
        if not isinstance(value, nnx.Param):
            return False
        name = path_str(path)
        if not name.startswith(backbone_key + "."):
            return True
        name = name[len(backbone_key) + 1 :]
        return not any(p == "" or name == p or name.startswith(p + ".") for p in frozen)

    return is_trainable


def split_trainable(model: nnx.Module, frozen: tuple[str, ...]):
    """model → (graphdef, trainable state, frozen state). Everything not trainable lands in the frozen state."""
    return nnx.split(model, trainable_filter(frozen), ...)
