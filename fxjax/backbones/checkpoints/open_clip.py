"""open_clip's Hub layout (LAION and others): `open_clip_config.json` (`model_cfg`, `preprocess_cfg`) with
`open_clip_model.safetensors` or `open_clip_pytorch_model.bin`, as `open_clip.push_to_hf_hub` writes them.

The vision tower is open_clip's own ViT (CLIP's maths: `clip.CLIPVision` with open_clip's names). Its `pooled`
is the post-LN CLS token before the projection (what linear probes use, as in CLIP's paper); `embedding` is the
projected one, open_clip's `encode_image` (for zero-shot). `load_text` gives the text tower (`TextTower`).
Towers open_clip borrows from timm or transformers (`timm_model_name`, `hf_model_name`), ModifiedResNet, CoCa
and the custom attention blocks are refused with the option that needs them.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
from flax import nnx

from fxjax.backbones import formats
from fxjax.backbones.backbone import Backbone
from fxjax.backbones.convert import Rule, load_state
from fxjax.backbones.families.clip import CLIPVision
from fxjax.backbones.families.clip_text import TextSpec, TextTransformer
from fxjax.backbones.text import TextTower, logit_info
from fxjax.backbones.transformer import TransformerSpec, block_rules
from fxjax.data.preprocess import PreprocessSpec

CONFIG = "open_clip_config.json"
WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")  # preferred first
BPE_VOCAB = "bpe_simple_vocab_16e6.txt.gz"  # OpenAI's BPE vocabulary, read from beside the weights if there
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)

# open_clip's residual attention block names → the trunk's (nn.MultiheadAttention's in-projection: rules below).
LAYER_NAMES = {
    r"attn\.out_proj": "attn.out",
    r"mlp\.c_fc": "mlp.fc1",
    r"mlp\.c_proj": "mlp.fc2",
    "ln_1": "norm1",
    "ln_2": "norm2",
    r"ls_1\.gamma": "ls1",
    r"ls_2\.gamma": "ls2",
}

# Options fxjax does not implement, with the value that it does (open_clip's default).
# Options both towers share, at the values fxjax's blocks implement.
_TOWER_DEFAULTS = dict(
    final_ln_after_pool=False,
    act_kwargs=None,
    qk_norm=False,
    scaled_cosine_attn=False,
    scale_heads=False,
    scale_attn_inner=False,
    scale_attn=False,
    scale_fc=False,
)
_VISION_DEFAULTS = dict(
    _TOWER_DEFAULTS,
    timm_model_name=None,
    attentional_pool=False,
    no_ln_pre=False,
    pos_embed_type="learnable",
    pool_type="tok",
)
_TEXT_DEFAULTS = dict(_TOWER_DEFAULTS, hf_model_name=None, embed_cls=False, use_pad_mask=False)


def matches(path: Path) -> bool:
    """A folder holding `open_clip_config.json`, or one of its weight files."""
    path = Path(path)
    if path.is_dir():
        return (path / CONFIG).is_file()
    return path.name in WEIGHT_FILES and (path.parent / CONFIG).is_file()


def read_config(path: Path) -> dict:
    folder = path if path.is_dir() else path.parent
    config = json.loads((folder / CONFIG).read_text())
    if "model_cfg" not in config:
        raise ValueError(f"{folder / CONFIG}: no 'model_cfg'; is this an open_clip_config.json?")
    return config


def weight_file(path: Path) -> Path:
    if path.is_file():
        return path
    for name in WEIGHT_FILES:
        if (path / name).is_file():
            return path / name
    raise FileNotFoundError(f"{path}: no open_clip weight file; expected one of {', '.join(WEIGHT_FILES)}")


def _check_supported(cfg: dict, defaults: dict, what: str) -> None:
    unsupported = {k: cfg[k] for k, default in defaults.items() if cfg.get(k, default) != default}
    if cfg.get("block_type") not in (None, "default"):
        unsupported["block_type"] = cfg["block_type"]
    if not isinstance(cfg.get("layers", 12), int):
        unsupported["layers"] = cfg["layers"]  # ModifiedResNet
    if unsupported:
        raise ValueError(f"open_clip {what} options fxjax does not implement: {unsupported}")


def _eps(cfg: dict) -> float:
    return float((cfg.get("norm_kwargs") or {}).get("eps", 1e-5))  # torch LayerNorm's default


def _act(model_cfg: dict) -> str:
    return "quick_gelu" if model_cfg.get("quick_gelu", False) else "gelu"


def _tower(cfg: dict, model_cfg: dict, width: int, heads: int, **fields) -> TransformerSpec:
    """What open_clip's vision and text towers spell alike: their residual attention blocks."""
    return TransformerSpec(
        dim=width,
        depth=cfg.get("layers", 12),
        heads=heads,
        mlp_dim=int(width * cfg.get("mlp_ratio", 4.0)),
        act=_act(model_cfg),
        eps=_eps(cfg),
        fused_qkv=True,  # nn.MultiheadAttention: one [3d, d] in-projection
        layer_scale=cfg.get("ls_init_value"),
        **fields,
    )


def vision_spec(model_cfg: dict) -> TransformerSpec:
    if "multimodal_cfg" in model_cfg:
        raise ValueError("open_clip CoCa models (multimodal_cfg) are not supported")
    cfg = model_cfg["vision_cfg"]
    _check_supported(cfg, _VISION_DEFAULTS, "vision_cfg")
    width, size = cfg.get("width", 768), cfg.get("image_size", 224)
    if isinstance(size, (list, tuple)):
        if size[0] != size[1]:
            raise ValueError(f"open_clip vision_cfg.image_size {size}: only square images are supported")
        size = size[0]
    heads = width // cfg.get("head_width", 64)
    return _tower(cfg, model_cfg, width, heads, image_size=size, patch_size=cfg.get("patch_size", 16),
                  patch_bias=False, pre_norm=True, batch_dims=False)  # fmt: skip


def text_spec(model_cfg: dict) -> TextSpec:
    cfg = model_cfg["text_cfg"]
    _check_supported(cfg, _TEXT_DEFAULTS, "text_cfg")
    width = cfg.get("width", 512)
    projected = cfg.get("proj_type", "linear") != "none" and model_cfg.get("embed_dim")
    return TextSpec(
        _tower(cfg, model_cfg, width, cfg.get("heads", 8), image_size=1, patch_size=1),  # no patches
        vocab_size=cfg.get("vocab_size", 49408),
        context_length=cfg.get("context_length", 77),
        embed_dim=model_cfg["embed_dim"] if projected else None,
        causal=not cfg.get("no_causal_mask", False),
        pool=cfg.get("pool_type", "argmax"),
        eos_id=cfg.get("eos_id", 2),
        proj_bias=cfg.get("proj_bias", False),
    )


def _blocks(prefix: str) -> list[Rule]:
    src = rf"{prefix}transformer\.resblocks\.(\d+)"
    return [
        Rule(rf"{src}\.attn\.in_proj_weight", r"blocks.\1.attn.qkv.kernel", "dense"),  # [3d, d]: q | k | v
        Rule(rf"{src}\.attn\.in_proj_bias", r"blocks.\1.attn.qkv.bias"),
        *block_rules(src, LAYER_NAMES),
    ]


def _norm(src: str, dst: str) -> list[Rule]:
    return [Rule(rf"{src}\.weight", f"{dst}.scale"), Rule(rf"{src}\.bias", f"{dst}.bias")]


def vision_rules() -> list[Rule]:
    return [
        Rule(r"visual\.conv1\.weight", "embeddings.patch_embed.kernel", "conv"),
        Rule(r"visual\.class_embedding", "embeddings.cls_token"),
        Rule(r"visual\.positional_embedding", "embeddings.position"),
        *_norm(r"visual\.ln_pre", "embeddings.pre_norm"),
        *_blocks(r"visual\."),
        *_norm(r"visual\.ln_post", "norm"),
        Rule(r"visual\.proj", "projection.kernel"),  # a [d, e] parameter, used as x @ proj
        Rule(r"(?!visual\.).*", None),  # the text tower and the logit scale / bias
    ]


def text_rules() -> list[Rule]:
    prefix = r"(?:text\.)?"  # CustomTextCLIP keeps the text tower under `text.`, CLIP at the top level
    return [
        Rule(rf"{prefix}token_embedding\.weight", "token_embedding"),
        Rule(rf"{prefix}positional_embedding", "position"),
        *_blocks(prefix),
        *_norm(rf"{prefix}ln_final", "norm"),
        Rule(rf"{prefix}text_projection", "projection.kernel"),  # a [d, e] parameter (proj_type "linear")
        Rule(rf"{prefix}text_projection\.weight", "projection.kernel", "dense"),  # an nn.Linear (proj_bias)
        Rule(rf"{prefix}text_projection\.bias", "projection.bias"),
        Rule(r"(?:visual\..*|logit_scale|logit_bias)", None),
    ]


class OpenCLIPVision(CLIPVision):
    """CLIP's vision tower; the projected CLS token is named `embedding`, as the text tower's."""

    def finish(self, x: jax.Array) -> dict:
        out = super().finish(x)
        out["embedding"] = out.pop("image_embeds")
        return out


def preprocess_spec(config: dict, image_size: int) -> PreprocessSpec:
    """open_clip's eval transform: resize (shortest edge + centre crop, or squash), then mean / std."""
    cfg = config.get("preprocess_cfg", {})
    resize_mode = cfg.get("resize_mode", "shortest")
    if resize_mode not in ("shortest", "squash"):
        raise ValueError(f"open_clip preprocess_cfg.resize_mode {resize_mode!r} is not supported: shortest, squash")
    interpolation = cfg.get("interpolation", "bicubic")
    if interpolation not in ("bicubic", "bilinear", "nearest"):
        raise ValueError(f"open_clip preprocess_cfg.interpolation {interpolation!r}: use bicubic, bilinear or nearest")
    return PreprocessSpec(
        size=(image_size, image_size),
        resize_shortest=image_size if resize_mode == "shortest" else None,
        mean=tuple(cfg.get("mean", OPENAI_MEAN)),
        std=tuple(cfg.get("std", OPENAI_STD)),
        resample=interpolation,
        crop_rounding="round",  # torchvision's CenterCrop
    )


def _info(name: str, revision: str | None, file: Path) -> dict:
    return {
        "name": name,
        "model_type": "open_clip",
        "revision": revision,
        "weight_files": [str(file)],
        "weight_sha256": formats.sha256_files([file]),
    }


def load(path: Path, *, name: str, revision: str | None, dtype, param_dtype) -> Backbone:
    """The vision tower as a backbone (pooled: pre-projection CLS; also `embedding`, the projected one)."""
    path = Path(path)
    config = read_config(path)
    model_cfg = config["model_cfg"]
    spec = vision_spec(model_cfg)
    file = weight_file(path)
    module = formats.load_module(
        lambda: OpenCLIPVision(spec, model_cfg["embed_dim"], dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0)),
        file,
        vision_rules(),
        param_dtype=param_dtype,
    )
    return Backbone(module, preprocess_spec(config, spec.image_size), _info(name, revision, file), dtype)


def tokenizer(path: Path, config: dict, bpe_vocab: str | Path | None):
    """open_clip's tokenizer for this model: the HF tokenizer its config names (saved in the folder, as
    `push_to_hf_hub` does, or by name from the Hub cache), else OpenAI's BPE from `bpe_vocab` (default: the
    BPE_VOCAB file beside the weights)."""
    from fxjax.backbones.text_tokenizers import ClipBpe, HFTokens

    cfg = config["model_cfg"]["text_cfg"]
    context = cfg.get("context_length", 77)
    kwargs = dict(cfg.get("tokenizer_kwargs") or {})
    clean = kwargs.pop("clean", None)
    hf_name = cfg.get("hf_tokenizer_name")
    folder = path if path.is_dir() else path.parent
    if hf_name:
        from transformers import AutoTokenizer

        source = folder if (folder / "tokenizer_config.json").is_file() else hf_name
        return HFTokens(AutoTokenizer.from_pretrained(source, **kwargs), context, clean or "whitespace")
    if bpe_vocab is None and (folder / BPE_VOCAB).is_file():
        bpe_vocab = folder / BPE_VOCAB
    if bpe_vocab is None:
        raise ValueError(
            f"{path}: this open_clip model uses OpenAI's CLIP BPE tokenizer; pass bpe_vocab= the path of its "
            f"{BPE_VOCAB} (shipped inside the open_clip_torch package and openai/CLIP), or put it beside the weights"
        )
    return ClipBpe(bpe_vocab, context, clean or "lower")


def load_text(path: Path, *, name: str, revision: str | None, dtype, param_dtype, bpe_vocab=None):
    """The text tower (`fxjax.backbones.text.TextTower`): open_clip's `encode_text`, with its tokenizer."""
    path = Path(path)
    config = read_config(path)
    spec = text_spec(config["model_cfg"])
    file = weight_file(path)
    tensors = formats.read_checkpoint(file)
    module = load_state(
        lambda: TextTransformer(spec, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0)),
        tensors,
        text_rules(),
        source=str(file),
        param_dtype=param_dtype,
    )
    info = _info(name, revision, file) | logit_info(tensors)
    return TextTower(module, tokenizer(path, config, bpe_vocab), info)
