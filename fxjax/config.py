"""The complete experiment configuration with its defaults, and the checks that make a config file or a
command-line override with a misspelled key fail loudly instead of being ignored."""

from __future__ import annotations

import difflib

import ml_collections
from ml_collections import config_dict

MODES = ("auto", "cached", "online")


def default_config() -> ml_collections.ConfigDict:
    """Every key an experiment may set. Config files start from this; `resolve` rejects any key it lacks."""
    c = ml_collections.ConfigDict(type_safe=False)  # freeze takes a name or a stage count
    c.seed = 0  # head initialisation, shuffling and dropout
    c.backbone = "efficientnet-lite0"  # built-in name, local Hugging Face folder or Hub repo id
    c.revision = config_dict.placeholder(str)  # Hub branch, tag or commit; unset: the default branch
    c.dtype = "float32"  # compute dtype; bfloat16 on accelerators
    c.param_dtype = "float32"  # dtype the weights are stored in
    # Input resolution; unset: the backbone's own. Convolutional backbones and ViTs (interpolated position
    # embeddings) run at other sizes; small inputs (e.g. 8x8 digits) gain little from upscaling to 224.
    c.image_size = config_dict.placeholder(int)
    # What stays frozen: "all" (the whole backbone), "none", or K = the first K backbone stages.
    c.freeze = "all"
    # cached: features computed once, heads trained on them; online: backbone forward in every step
    # (needed for augmentation and partial unfreezing); auto: cached when nothing needs the backbone online.
    c.mode = "auto"
    c.cache_dir = config_dict.placeholder(str)  # feature cache; else $FXJAX_CACHE_DIR, else ~/.cache/fxjax

    c.data = ml_collections.ConfigDict()
    c.data.source = "digits"  # digits | fashion_mnist | mnist | folder:<path> | tfds:<name>[:<version>]
    c.data.data_dir = config_dict.placeholder(str)  # TFDS data_dir, or the folder of IDX files
    c.data.val_fraction = 0.1  # of the training data carved out for validation where there is no val split
    c.data.test_fraction = 0.2  # carved out for testing where the data has no test split
    c.data.split_seed = 0  # seed of those carve-outs (fixed: runs with other seeds see the same splits)
    c.data.few_shot_k = config_dict.placeholder(int)  # keep k training images per class; unset: all
    c.data.augment = False  # random crops and flips of training images (needs the backbone online)
    c.data.worker_count = 0  # grain worker processes decoding images; 0: in the main process

    c.head = ml_collections.ConfigDict()
    c.head.kind = "linear"  # linear | mlp
    c.head.hidden_dims = (512,)  # mlp only
    c.head.dropout = 0.0  # mlp only: on the hidden layers, training only

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.name = "adamw"  # adamw | sgd
    c.optimizer.learning_rate = 1e-3  # peak, reached after warmup_steps
    c.optimizer.weight_decay = 1e-4  # applied to kernels only, never to frozen weights
    c.optimizer.momentum = 0.9  # sgd only
    c.optimizer.warmup_steps = 0  # linear warm-up from 0 to learning_rate
    c.optimizer.schedule = "cosine"  # cosine | constant
    c.optimizer.grad_clip = 1.0  # global norm; 0 disables
    c.optimizer.label_smoothing = 0.0  # in [0, 1)

    # Many linear heads at once on cached features (one vmapped pass per epoch): the grid of learning rates
    # x weight decays; the best on validation is then trained as the run's head and evaluated on test.
    c.sweep = ml_collections.ConfigDict()
    c.sweep.learning_rates = ()  # e.g. (1e-3, 3e-3, 1e-2); empty: the optimizer's learning_rate
    c.sweep.weight_decays = ()  # e.g. (0.0, 1e-4); empty: the optimizer's weight_decay
    # Feature variants swept alongside the pooled features (DINOv2 linear evaluation): "cls_last4",
    # "pooled_avgpool", "cls_last4_avgpool" (ViT-family backbones). The run's own head stays on "pooled".
    c.sweep.feature_variants = ()
    # Classic probes on the cached features: any of "ridge", "logistic" (L-BFGS), "knn".
    c.probes = ()
    # Few-shot protocol on the cached features: k examples per class, several seeds, mean ± std.
    c.fewshot = ml_collections.ConfigDict()
    c.fewshot.ks = ()  # e.g. (1, 5, 10); empty: no few-shot protocol
    c.fewshot.seeds = (0, 1, 2)  # one draw of the k examples per seed
    c.fewshot.probe = "logistic"  # ridge | logistic

    c.batch_size = 64  # global, over all devices and hosts
    c.eval_batch_size = 256  # feature extraction and evaluation; global
    c.num_epochs = 10  # passes over the training split
    c.eval_every_epochs = 1  # validation accuracy, which picks the best checkpoint
    c.log_every_steps = 10  # training loss into metrics.jsonl and TensorBoard

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.keep = 2  # the last N, plus the best by validation accuracy
    c.checkpoint.every_epochs = 1  # how often a checkpoint is saved

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1  # -1: all devices not used by fsdp
    c.mesh.fsdp = 1  # devices each frozen backbone tensor is sharded over; data x fsdp = all devices
    return c


def _unknown_keys(user, reference, prefix="") -> list[str]:
    problems = []
    for key in user.keys():
        name = f"{prefix}{key}"
        if key not in reference:
            close = difflib.get_close_matches(key, list(reference.keys()), n=1)
            problems.append(f"{name!r}" + (f" (did you mean {prefix + close[0]!r}?)" if close else ""))
        elif isinstance(user[key], ml_collections.ConfigDict) and isinstance(reference[key], ml_collections.ConfigDict):
            problems += _unknown_keys(user[key], reference[key], f"{name}.")
    return problems


def _merge(dst: ml_collections.ConfigDict, src: ml_collections.ConfigDict) -> None:
    for key in src.keys():
        if isinstance(src[key], ml_collections.ConfigDict):
            _merge(dst[key], src[key])
        else:
            dst[key] = src[key]


def resolve(user: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Defaults overlaid with the user's config; an unknown key anywhere is an error that names it."""
    reference = default_config()
    problems = _unknown_keys(user, reference)
    if problems:
        raise ValueError(f"unknown config key(s): {', '.join(problems)}")
    _merge(reference, user)
    validate(reference)
    reference.lock()
    return reference


def override(config: ml_collections.ConfigDict, dotted: str, text: str) -> None:
    """Applies a command-line override `--config.a.b=text`, parsed as the existing field's type."""
    keys = dotted.split(".")
    node = config
    for i, key in enumerate(keys):
        if not isinstance(node, ml_collections.ConfigDict) or key not in node:
            choices = list(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
            close = difflib.get_close_matches(key, choices, n=1)
            hint = f" (did you mean {'.'.join(keys[:i] + close[:1])!r}?)" if close else ""
            raise ValueError(f"unknown config key {dotted!r}{hint}")
        if i < len(keys) - 1:
            node = node[key]
    node[keys[-1]] = _parse(text, node[keys[-1]])


def _parse(text: str, current):
    import ast

    if isinstance(current, bool):
        if text.lower() not in ("true", "false", "1", "0"):
            raise ValueError(f"expected true/false, got {text!r}")
        return text.lower() in ("true", "1")
    if isinstance(current, (int, float, tuple, list)) or current is None:
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text
        if isinstance(current, (tuple, list)) and isinstance(value, (tuple, list)):
            return type(current)(value)
        return value
    return text


def validate(c: ml_collections.ConfigDict) -> None:
    """Value checks that can be made before anything is loaded."""

    def check(ok: bool, message: str) -> None:
        if not ok:
            raise ValueError(message)

    frozen_stages(c.freeze, num_stages=None)
    check(c.mode in MODES, f"config.mode={c.mode!r}: use one of {', '.join(MODES)}")
    check(c.head.kind in ("linear", "mlp"), f"config.head.kind={c.head.kind!r}: use 'linear' or 'mlp'")
    check(c.optimizer.name in ("adamw", "sgd"), f"config.optimizer.name={c.optimizer.name!r}: use 'adamw' or 'sgd'")
    check(
        c.optimizer.schedule in ("cosine", "constant"),
        f"config.optimizer.schedule={c.optimizer.schedule!r}: use 'cosine' or 'constant'",
    )
    check(c.batch_size > 0 and c.eval_batch_size > 0, "config.batch_size and config.eval_batch_size must be > 0")
    check(c.num_epochs > 0, f"config.num_epochs={c.num_epochs}: must be > 0")
    check(
        c.dtype in ("float32", "bfloat16") and c.param_dtype in ("float32", "bfloat16"),
        "config.dtype and config.param_dtype must be 'float32' or 'bfloat16'",
    )
    check(0 <= c.optimizer.label_smoothing < 1, "config.optimizer.label_smoothing must be in [0, 1)")
    check(
        set(c.probes) <= {"ridge", "logistic", "knn"},
        f"config.probes={tuple(c.probes)}: choose from 'ridge', 'logistic', 'knn'",
    )
    check(c.fewshot.probe in ("ridge", "logistic"), f"config.fewshot.probe={c.fewshot.probe!r}: 'ridge' or 'logistic'")
    from fxjax.backbones.backbone import VARIANTS

    unknown = [v for v in c.sweep.feature_variants if v not in VARIANTS]
    check(not unknown, f"config.sweep.feature_variants: unknown {unknown}; choose from {', '.join(VARIANTS)}")
    needs_features = bool(
        c.sweep.learning_rates or c.sweep.weight_decays or c.sweep.feature_variants or c.probes or c.fewshot.ks
    )
    check(
        not needs_features or uses_cached_features(c),
        "config.sweep, config.probes and config.fewshot work on cached features: they need config.freeze='all' "
        "and config.data.augment=False",
    )
    check(
        not (c.sweep.learning_rates or c.sweep.weight_decays) or c.head.kind == "linear",
        "config.sweep trains linear heads: set config.head.kind='linear'",
    )
    check(
        c.mode != "cached" or (c.freeze == "all" and not c.data.augment),
        "config.mode='cached' needs config.freeze='all' and config.data.augment=False (features must not change)",
    )


def frozen_stages(freeze, num_stages: int | None) -> int | None:
    """config.freeze → how many leading backbone stages stay frozen ("all" → every stage, "none" → 0)."""
    if freeze == "all":
        return num_stages
    if freeze == "none":
        return 0
    if isinstance(freeze, int) or (isinstance(freeze, str) and freeze.isdigit()):
        k = int(freeze)
        if k >= 0 and (num_stages is None or k <= num_stages):
            return k
    limit = f" (this backbone has {num_stages} stages)" if num_stages is not None else ""
    raise ValueError(f"config.freeze={freeze!r}: use 'all', 'none' or a number of leading stages to freeze{limit}")


def uses_cached_features(c: ml_collections.ConfigDict) -> bool:
    if c.mode == "auto":
        return c.freeze == "all" and not c.data.augment
    return c.mode == "cached"
