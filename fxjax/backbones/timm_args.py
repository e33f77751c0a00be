"""timm's constructor arguments as fxjax reads them, shared by the timm transformer families (ViT, EVA): the
fields both take, the training-only ones every timm model accepts, and the sorting of a checkpoint's arguments into
what fxjax builds and what it cannot."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class TimmTransformerArgs:
    """The arguments timm's `VisionTransformer` and `Eva` spell alike (names and defaults as timm's), plus the
    LayerNorm eps (timm's `norm_layer=partial(LayerNorm, eps=...)`)."""

    img_size: int = 224
    patch_size: int = 16
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    init_values: float | None = None
    class_token: bool = True
    no_embed_class: bool = False
    act_layer: str = "gelu"
    norm_eps: float = 1e-6

    def trunk_fields(self, prefix_tokens: int) -> dict:
        """The `TransformerSpec` fields both families derive alike from these arguments."""
        return dict(
            dim=self.embed_dim,
            depth=self.depth,
            heads=self.num_heads,
            image_size=self.img_size,
            patch_size=self.patch_size,
            eps=self.norm_eps,
            layer_scale=self.init_values,
            cls_token=self.class_token,
            positioned_prefix=0 if self.no_embed_class else prefix_tokens,
            antialias_positions=True,  # timm's resample_abs_pos_embed (other input sizes)
        )


# Arguments every timm model takes that do not change the inference maths: training-time rates, head size.
TRAINING_ONLY_ARGS = frozenset(
    {"num_classes", "drop_rate", "pos_drop_rate", "patch_drop_rate", "proj_drop_rate", "attn_drop_rate",
     "drop_path_rate", "dynamic_img_size"}
)  # fmt: skip


def sort_args(
    args: Mapping, cls: type, fixed: Mapping, ignored: set[str], square: tuple[str, ...] = ()
) -> tuple[dict, list[str]]:
    """A reference library's constructor arguments → (the ones the dataclass `cls` takes, problems): an argument
    fixed to one value must have it, an ignored one (training-only, `TRAINING_ONLY_ARGS` included) is dropped, any
    other is unknown. Sizes named in `square` may come as (height, width): equal ones become one number."""
    fields, ignored = {f.name for f in dataclasses.fields(cls)}, TRAINING_ONLY_ARGS | ignored
    known, problems = {}, []
    for key, value in args.items():
        if key in fields:
            known[key] = value
        elif key in fixed:
            if value != fixed[key]:
                problems.append(f"{key}={value!r}")
        elif key not in ignored:
            problems.append(f"{key}={value!r} (unknown)")
    for key in square:
        if isinstance(known.get(key), (list, tuple)):
            if len(set(known[key])) != 1:
                problems.append(f"{key}={known[key]!r} (not square)")
            known[key] = known[key][0]
    return known, problems


def pool_problems(global_pool: str, class_token: bool, pools: Sequence[str]) -> list[str]:
    """timm's `global_pool` checks shared by its transformer families."""
    problems = [] if global_pool in pools else [f"global_pool={global_pool!r} (supported: {', '.join(pools)})"]
    if global_pool == "token" and not class_token:
        problems.append("global_pool='token' with class_token=False")
    return problems
