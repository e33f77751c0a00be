"""timm architecture names → the constructor arguments timm's registry gives them, without importing timm.

timm names its transformers by a grammar: `vit_{size}_patch{N}[_{variant}...][_{resolution}]` (e.g.
`vit_base_patch16_clip_quickgelu_224`, `vit_medium_patch16_reg4_gap_256`); `deit3_*` and `eva02_*` likewise.
`vit_args` / `eva02_args` read the name by that grammar; `IRREGULAR` holds the names whose registry entry departs
from it. A name the grammar does not cover (a new size, an unknown variant) is an error, not a guess.
tests/backbones/test_timm_vit.py checks every registry name this module accepts against timm's own entry points.
"""

from __future__ import annotations

import re

# size → (embed_dim, depth, num_heads, mlp_ratio), as timm's entry points spell them.
VIT_SIZES: dict[str, tuple[int, int, int, float]] = {
    "tiny": (192, 12, 3, 4.0),
    "xsmall": (256, 10, 4, 4.0),
    "small": (384, 12, 6, 4.0),
    "medium": (512, 12, 8, 4.0),
    "mediumd": (512, 20, 8, 4.0),
    "betwixt": (640, 12, 10, 4.0),
    "base": (768, 12, 12, 4.0),
    "so150m": (896, 18, 14, 2.572),
    "large": (1024, 24, 16, 4.0),
    "so400m": (1152, 27, 16, 3.7362),
    "huge": (1280, 32, 16, 4.0),
    "giant": (1408, 40, 16, 48 / 11),
    "giantopt": (1536, 40, 16, 4.0),
    "gigantic": (1664, 48, 16, 64 / 13),
}

# variant token → arguments it sets (`reg{N}` and resolutions are read separately).
VIT_VARIANTS: dict[str, dict] = {
    "clip": dict(pre_norm=True, norm_eps=1e-5),
    "quickgelu": dict(act_layer="quick_gelu"),
    "siglip": dict(class_token=False, global_pool="map"),
    "gap": dict(class_token=False, global_pool="avg"),
    "map": dict(class_token=False, global_pool="map"),
    "dinov2": dict(init_values=1e-5),
}

# Registry entries whose arguments the grammar does not give (resolution-free names; checked by the tests).
IRREGULAR: dict[str, dict] = {
    "vit_base_patch16_224_miil": dict(qkv_bias=False),
    "vit_base_patch16_gap": dict(num_heads=16),
    "vit_medium_patch16_gap": dict(qkv_bias=False, init_values=1e-6),
    "vit_betwixt_patch16_gap": dict(qkv_bias=False, init_values=1e-6),
    "vit_base_patch16_plus": dict(embed_dim=896, num_heads=14, init_values=1e-5),
    "vit_base_patch32_plus": dict(embed_dim=896, num_heads=14, init_values=1e-5),
    "vit_base_patch16_plus_clip": dict(embed_dim=896, num_heads=14),
    "vit_so150m_patch16_reg4_gap": dict(no_embed_class=False, init_values=None, fc_norm=False),
    "vit_so150m_patch16_reg4_map": dict(no_embed_class=False, init_values=None),
    "vit_base_patch16_reg4_gap": dict(init_values=None),
}
# DINOv2 giant: its own width and SwiGLU ("packed": one fc1 giving [gate, up])
for _name in ("vit_giant_patch14_dinov2", "vit_giant_patch14_reg4_dinov2"):
    IRREGULAR[_name] = dict(
        embed_dim=1536, num_heads=24, mlp_ratio=2.66667 * 2, mlp_layer="swiglu_packed", act_layer="silu"
    )
# siglip towers trained with the tanh GELU
for _name in (
    "vit_base_patch32_siglip",
    "vit_base_patch32_siglip_gap",
    "vit_so400m_patch16_siglip",
    "vit_so400m_patch16_siglip_gap",
    "vit_giantopt_patch16_siglip",
    "vit_giantopt_patch16_siglip_gap",
):
    IRREGULAR[_name] = dict(act_layer="gelu_tanh")
# large siglip at 512 only (its 256 / 384 siblings use the exact GELU)
IRREGULAR["vit_large_patch16_siglip_512"] = dict(act_layer="gelu_tanh")
IRREGULAR["vit_large_patch16_siglip_gap_512"] = dict(act_layer="gelu_tanh")

_VIT_NAME = re.compile(r"(?P<family>vit|deit3)_(?P<size>[a-z0-9]+)_patch(?P<patch>\d+)(?P<rest>(?:_[a-z0-9]+)*)")


def _strip_resolution(name: str) -> str:
    return re.sub(r"_\d+$", "", name)


def vit_args(architecture: str) -> dict:
    """The registry's `VisionTransformer` arguments of a `vit_*` / `deit3_*` architecture (timm names and
    values; `norm_eps` and `act_layer` by name stand for timm's layer arguments)."""
    match = _VIT_NAME.fullmatch(architecture)
    if match is None or match["size"] not in VIT_SIZES:
        raise ValueError(
            f"timm architecture {architecture!r}: not a vit_{{size}}_patch{{N}}_... / deit3_... name fxjax reads; "
            f"sizes: {', '.join(VIT_SIZES)}"
        )
    dim, depth, heads, mlp_ratio = VIT_SIZES[match["size"]]
    args = dict(patch_size=int(match["patch"]), embed_dim=dim, depth=depth, num_heads=heads)
    if mlp_ratio != 4.0:
        args["mlp_ratio"] = mlp_ratio
    tokens = [t for t in match["rest"].split("_")[1:] if not t.isdigit()]
    registers = next((int(t[3:]) for t in tokens if re.fullmatch(r"reg\d+", t)), 0)
    if match["family"] == "deit3":
        args.update(no_embed_class=True, init_values=1e-6)
    for token in tokens:
        if re.fullmatch(r"reg\d+", token):
            args.update(reg_tokens=registers, no_embed_class=True, init_values=1e-5)
        elif token in VIT_VARIANTS:
            args.update(VIT_VARIANTS[token])
        elif architecture not in IRREGULAR and _strip_resolution(architecture) not in IRREGULAR:
            raise ValueError(
                f"timm architecture {architecture!r}: unknown variant {token!r}; "
                f"supported: {', '.join(VIT_VARIANTS)}, reg{{N}}"
            )
    if "gap" in tokens and not registers:
        args["fc_norm"] = False  # the plain `_gap` models keep the final norm before pooling
    args.update(IRREGULAR.get(architecture, IRREGULAR.get(_strip_resolution(architecture), {})))
    return args


EVA02_SIZES: dict[str, tuple[int, int, int]] = {  # size → (embed_dim, depth, num_heads)
    "tiny": (192, 12, 3),
    "small": (384, 12, 6),
    "base": (768, 12, 12),
    "large": (1024, 24, 16),
}
_EVA02_NAME = re.compile(r"eva02_(?P<size>[a-z]+)_patch(?P<patch>\d+)(?P<clip>_clip)?_(?P<res>\d+)")


def eva02_args(architecture: str) -> dict:
    """The registry's `Eva` arguments of an `eva02_{size}_patch{N}[_clip]_{resolution}` architecture: SwiGLU MLPs
    (with their inner LayerNorm, and three separate q / k / v projections, from base up), RoPE on the 16x16
    pre-training grid; the CLIP towers add the attention-output LayerNorm and pool their class token."""
    match = _EVA02_NAME.fullmatch(architecture)
    if match is None or match["size"] not in EVA02_SIZES:
        raise ValueError(
            f"timm architecture {architecture!r}: not an eva02_{{size}}_patch{{N}}[_clip]_{{resolution}} name fxjax "
            f"reads; sizes: {', '.join(EVA02_SIZES)}"
        )
    dim, depth, heads = EVA02_SIZES[match["size"]]
    args = dict(img_size=int(match["res"]), patch_size=int(match["patch"]), embed_dim=dim, depth=depth)
    args.update(num_heads=heads, mlp_ratio=4 * 2 / 3, swiglu_mlp=True, use_rot_pos_emb=True, ref_feat_shape=(16, 16))
    if match["size"] in ("base", "large"):
        args.update(qkv_fused=False, scale_mlp=True)
    if match["clip"]:
        args.update(scale_attn_inner=True, global_pool="token")
    return args
