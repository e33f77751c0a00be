"""The complete experiment configuration with its defaults, and the checks that make a config file or a
command-line override with a misspelled key fail loudly instead of being ignored."""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from pathlib import Path

import ml_collections
from ml_collections import config_dict

MODES = ("auto", "cached", "online")


def default_config() -> ml_collections.ConfigDict:
    """Every key an experiment may set. Config files start from this; `resolve` rejects any key it lacks."""
    c = ml_collections.ConfigDict()  # every key keeps its default's type
    c.seed = 0  # head initialisation, shuffling and dropout
    c.backbone = "efficientnet-lite0"  # built-in name, local Hugging Face folder or Hub repo id
    c.revision = config_dict.placeholder(str)  # Hub branch, tag or commit; unset: the default branch
    c.dtype = "float32"  # compute dtype; bfloat16 on accelerators
    c.param_dtype = "float32"  # dtype the weights are stored in
    # Input resolution; unset: the backbone's own. Convolutional backbones and ViTs (interpolated position
    # embeddings) run at other sizes; small inputs (e.g. 8x8 digits) gain little from upscaling to 224.
    c.image_size = config_dict.placeholder(int)
    # What stays frozen: "all" (the whole backbone), "none", "K" (the first K backbone stages), or
    # "re:<pattern>" (parameter paths such as backbone.blocks.0.attn.query.kernel that match).
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
    # Cached runs: K seeded augmented views (random resized crop + flip, seeded by config.seed) of every
    # training image are extracted once; each epoch trains on one view per image. 0: no views.
    c.data.views = 0

    c.head = ml_collections.ConfigDict()
    c.head.kind = "linear"  # linear | mlp
    c.head.hidden_dims = (512,)  # mlp only
    c.head.dropout = 0.0  # mlp only: on the hidden layers, training only
    # random: the output layer starts at zero; text: a linear head starts as the zero-shot classifier (the class
    # text embeddings, config.zeroshot) and trains on the "embedding" variant (CLIP-family backbones, cached).
    c.head.init = "random"

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
    # x weight decays; the best on validation is the run's head (checkpointed and exported), evaluated on test.
    c.sweep = ml_collections.ConfigDict()
    c.sweep.learning_rates = ()  # e.g. (1e-3, 3e-3, 1e-2); empty: the optimizer's learning_rate
    c.sweep.weight_decays = ()  # e.g. (0.0, 1e-4); empty: the optimizer's weight_decay
    # Feature variants swept alongside the pooled features (DINOv2 linear evaluation): "cls_last4",
    # "pooled_avgpool", "cls_last4_avgpool" (ViT-family backbones), "embedding" (CLIP-family). The run's own
    # head stays on "pooled" ("embedding" with head.init="text").
    c.sweep.feature_variants = ()
    # Classic probes on the cached features: any of "ridge", "logistic" (L-BFGS), "knn", and "zeroshot" (the
    # class text embeddings scored against the "embedding" variant; CLIP-family backbones: HF clip / siglip,
    # open_clip, whose text tower is loaded from the same checkpoint).
    c.probes = ()
    # The zero-shot classifier (the "zeroshot" probe, head.init="text"): prompts and class names.
    c.zeroshot = ml_collections.ConfigDict()
    c.zeroshot.templates = ("a photo of a {}.",)  # each with one "{}" for the class name; averaged per class
    c.zeroshot.classnames = ()  # the class names in the prompts, in label order; empty: the dataset's own
    # open_clip models with OpenAI's BPE tokenizer: its bpe_simple_vocab_16e6.txt.gz; unset: beside the weights.
    c.zeroshot.bpe_vocab = config_dict.placeholder(str)
    # Few-shot protocol on the cached features: k examples per class, several seeds, mean ± std.
    c.fewshot = ml_collections.ConfigDict()
    c.fewshot.ks = ()  # e.g. (1, 5, 10); empty: no few-shot protocol
    c.fewshot.seeds = (0, 1, 2)  # one draw of the k examples per seed
    c.fewshot.probe = "logistic"  # ridge | logistic
    # Named evaluation protocols on the cached features, with the papers' settings (docs/protocols.md): any of
    # dinov2_knn, dinov2_logreg, clip_linear_probe, bigvision_fewshot, fewshot_logistic, dinov2_linear, vtab1k.
    # Results go to protocols.json / protocols.md and the summary.
    c.protocols = ()
    # Per-protocol settings over its defaults, checked against them: protocol_overrides.dinov2_linear.steps = 500.
    c.protocol_overrides = ml_collections.ConfigDict()

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


# Keys whose sub-keys are free-form here and checked by `validate` (each protocol's own settings).
FREE_FORM = ("protocol_overrides",)


def _unknown_keys(user, reference, prefix="") -> list[str]:
    problems = []
    for key in user.keys():
        name = f"{prefix}{key}"
        if name in FREE_FORM:
            continue
        if key not in reference:
            close = difflib.get_close_matches(key, list(reference.keys()), n=1)
            problems.append(f"{name!r}" + (f" (did you mean {prefix + close[0]!r}?)" if close else ""))
        elif isinstance(user[key], ml_collections.ConfigDict) and isinstance(reference[key], ml_collections.ConfigDict):
            problems += _unknown_keys(user[key], reference[key], f"{name}.")
    return problems


def _set(node: ml_collections.ConfigDict, key: str, value, name: str) -> None:
    """Assigns with the default's type fixed: a value of another type is an error naming the key."""
    expected = node.get_type(key)
    if expected is tuple and isinstance(value, list):
        value = tuple(value)
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    wrong = value is not None and expected is not type(None) and not isinstance(value, expected)
    if wrong or (expected is int and isinstance(value, bool)):
        raise ValueError(f"config.{name}={value!r}: expected {_TYPE_NAMES.get(expected, expected.__name__)}")
    node[key] = value


_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false", tuple: "a tuple"}


def _merge(dst: ml_collections.ConfigDict, src: ml_collections.ConfigDict, prefix: str = "") -> None:
    for key in src.keys():
        if prefix + key in FREE_FORM:
            dst[key] = ml_collections.ConfigDict(_as_dict(src[key], prefix + key))
        elif isinstance(src[key], ml_collections.ConfigDict):
            _merge(dst[key], src[key], f"{prefix}{key}.")
        else:
            _set(dst, key, src[key], prefix + key)


def _as_dict(node, name: str) -> dict:
    if not isinstance(node, (dict, ml_collections.ConfigDict)):
        raise ValueError(f"config.{name}={node!r}: expected a group of keys (config.{name}.<protocol>.<setting>)")
    return node.to_dict() if isinstance(node, ml_collections.ConfigDict) else dict(node)


def overlay(user: ml_collections.ConfigDict, reference: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """`reference` (a schema's defaults) overlaid in place with the user's config; an unknown key anywhere, or a
    value of the wrong type, is an error that names it."""
    problems = _unknown_keys(user, reference)
    if problems:
        raise ValueError(f"unknown config key(s): {', '.join(problems)}")
    _merge(reference, user)
    return reference


def resolve(user: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Defaults overlaid with the user's config (`overlay`), then checked (`validate`)."""
    reference = overlay(user, default_config())
    validate(reference)
    reference.lock()
    return reference


def override(
    config: ml_collections.ConfigDict, dotted: str, text: str, schema: ml_collections.ConfigDict | None = None
) -> None:
    """Applies a command-line override `--config.a.b=text`, parsed by ml_collections' `config_flags` as the type of
    the key's default in `schema` (default: the run schema, `default_config()`). Keys are checked here first, so a
    misspelled one is "did you mean"; `protocol_overrides` settings are Python literals, checked by `validate`."""
    keys = dotted.split(".")
    if schema is None and keys[0] in FREE_FORM:
        if len(keys) != 3:
            raise ValueError(f"config.{dotted}: set one setting, as config.{keys[0]}.<protocol>.<setting>=<value>")
        if keys[0] not in config:
            config[keys[0]] = ml_collections.ConfigDict()
        group = config[keys[0]]
        if keys[1] not in group:
            group[keys[1]] = ml_collections.ConfigDict()
        group[keys[1]][keys[2]] = _literal(text)
        return
    root = default_config() if schema is None else schema
    node, reference = config, root
    for i, key in enumerate(keys):
        if not isinstance(reference, ml_collections.ConfigDict) or key not in reference:
            choices = list(reference.keys()) if isinstance(reference, ml_collections.ConfigDict) else []
            close = difflib.get_close_matches(key, choices, n=1)
            hint = f" (did you mean {'.'.join(keys[:i] + close[:1])!r}?)" if close else ""
            raise ValueError(f"unknown config key {dotted!r}{hint}")
        if i < len(keys) - 1:
            if key not in node:
                node[key] = ml_collections.ConfigDict()
            node, reference = node[key], reference[key]
    if isinstance(reference[keys[-1]], ml_collections.ConfigDict):
        raise ValueError(f"config.{dotted} is a group of keys; set one of them, e.g. config.{dotted}.<key>")
    node[keys[-1]] = _parsed(root, dotted, text, reference.get_type(keys[-1]))


def _literal(text: str):
    """A free-form value from the command line: a Python literal (number, tuple, bool), else the text."""
    import ast

    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text
    return tuple(value) if isinstance(value, list) else value


def _parsed(schema: ml_collections.ConfigDict, dotted: str, text: str, expected: type):
    """`text` parsed as ml_collections' `config_flags` parses `--config.<dotted>=<text>` on an absl command line
    (`expected`, the type of the key's default in `schema`), or a one-line error naming the key. A tuple may also
    be given as bare words, `ridge,knn`."""
    import copy

    from absl import flags
    from ml_collections import config_flags

    given = text
    if expected is tuple and not isinstance(_literal(text), (int, float, tuple)):  # bare words: `ridge,knn`
        given = repr(tuple(part.strip() for part in text.split(",") if part.strip()))
    argv = ["fxjax", f"--config.{dotted}={given}"]
    parsed = flags.FlagValues()  # private: no global absl state, so several commands can run in one process
    config_flags.DEFINE_config_dict("config", copy.deepcopy(schema), flag_values=parsed, sys_argv=argv)
    try:
        parsed(argv)
    except flags.IllegalFlagValueError:
        raise ValueError(f"config.{dotted}={text!r}: expected {_TYPE_NAMES.get(expected, expected.__name__)}") from None
    value = parsed["config"].value
    for key in dotted.split("."):
        value = value[key]
    return value


def shipped_dir() -> Path:
    """The example configs: fxjax/configs once installed (the wheel maps configs/ there), configs/ in a clone."""
    installed = Path(__file__).resolve().parent / "configs"
    return installed if installed.is_dir() else Path(__file__).resolve().parents[1] / "configs"


def shipped_names() -> list[str]:
    return sorted(p.stem for p in shipped_dir().glob("*.py") if not p.name.startswith("_"))


def find_config(name_or_path: str) -> Path:
    """A config file: the path if it is a file, else the shipped config of that bare name (no folder, no .py)."""
    file = Path(name_or_path)
    if file.is_file():
        return file
    shipped = shipped_dir() / f"{name_or_path}.py"
    if file.name == name_or_path and not file.suffix and shipped.is_file():
        return shipped
    if file.is_dir():
        raise IsADirectoryError(f"config file {name_or_path!r} is a folder; give a .py file with get_config() in it")
    raise FileNotFoundError(
        f"config file {name_or_path!r} not found; give a path to a .py file with get_config() or a shipped "
        f"config name: {', '.join(shipped_names())}"
    )


def load_config_file(name_or_path: str) -> ml_collections.ConfigDict:
    """Imports a config file (or a shipped config by name) and returns its get_config(); an import failure
    names the file and line."""
    import importlib.machinery
    import importlib.util
    import traceback

    file = find_config(name_or_path)
    name = f"fxjax_config_{file.stem}"
    # An explicit loader: a config file need not end in .py.
    loader = importlib.machinery.SourceFileLoader(name, str(file))
    spec = importlib.util.spec_from_file_location(name, file, loader=loader)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
        if not hasattr(module, "get_config"):
            raise ValueError(f"config file {str(file)!r} has no get_config()")
        return module.get_config()
    except ValueError:
        raise
    except Exception as err:  # noqa: BLE001 - any failure inside the user's file is bad input
        here = file.resolve()
        frames = [f for f in traceback.extract_tb(err.__traceback__) if Path(f.filename).resolve() == here]
        line = err.lineno if isinstance(err, SyntaxError) else (frames[-1].lineno if frames else None)
        where = f"{file}, line {line}" if line else str(file)
        raise ValueError(f"config file {where}: {type(err).__name__}: {err}") from None


def load_config(name_or_path: str, overrides: Iterable[tuple[str, str]] = ()) -> ml_collections.ConfigDict:
    """A config file (or a shipped config by name) with the command line's `--config.<key>=<text>` overrides
    applied, not yet resolved."""
    config = load_config_file(name_or_path)
    for key, text in overrides:
        override(config, key, text)
    return config


def validate(c: ml_collections.ConfigDict) -> None:
    """Value checks that can be made before anything is loaded."""

    def check(ok: bool, message: str) -> None:
        if not ok:
            raise ValueError(message)

    from fxjax.heads.freeze import frozen_patterns

    frozen_patterns(str(c.freeze), None)
    check(c.mode in MODES, f"config.mode={c.mode!r}: use one of {', '.join(MODES)}")
    check(c.head.kind in ("linear", "mlp"), f"config.head.kind={c.head.kind!r}: use 'linear' or 'mlp'")
    check(c.optimizer.name in ("adamw", "sgd"), f"config.optimizer.name={c.optimizer.name!r}: use 'adamw' or 'sgd'")
    check(
        c.optimizer.schedule in ("cosine", "constant"),
        f"config.optimizer.schedule={c.optimizer.schedule!r}: use 'cosine' or 'constant'",
    )
    for key in (
        "batch_size", "eval_batch_size", "num_epochs", "eval_every_epochs", "log_every_steps",
        "checkpoint.keep", "checkpoint.every_epochs",
    ):  # fmt: skip
        value = c
        for part in key.split("."):
            value = value[part]
        check(value > 0, f"config.{key}={value}: must be > 0")
    check(c.image_size is None or c.image_size > 0, f"config.image_size={c.image_size}: must be > 0")
    check(c.data.worker_count >= 0, f"config.data.worker_count={c.data.worker_count}: must be >= 0")
    check(c.data.views >= 0, f"config.data.views={c.data.views}: must be >= 0 (0: no augmented views)")
    check(
        not c.data.views or uses_cached_features(c),
        "config.data.views caches augmented views for heads on cached features: it needs config.freeze='all' "
        "and config.data.augment=False (online augmentation is config.data.augment)",
    )
    k = c.data.few_shot_k
    check(k is None or k > 0, f"config.data.few_shot_k={k}: must be > 0")
    check(all(k > 0 for k in c.fewshot.ks), f"config.fewshot.ks={tuple(c.fewshot.ks)}: every k must be > 0")
    check(
        all(isinstance(v, (int, float)) and v > 0 for v in c.sweep.learning_rates),
        f"config.sweep.learning_rates={tuple(c.sweep.learning_rates)}: numbers > 0",
    )
    check(
        all(isinstance(v, (int, float)) and v >= 0 for v in c.sweep.weight_decays),
        f"config.sweep.weight_decays={tuple(c.sweep.weight_decays)}: numbers >= 0",
    )
    check(c.optimizer.learning_rate > 0, f"config.optimizer.learning_rate={c.optimizer.learning_rate}: must be > 0")
    check(
        c.dtype in ("float32", "bfloat16") and c.param_dtype in ("float32", "bfloat16"),
        "config.dtype and config.param_dtype must be 'float32' or 'bfloat16'",
    )
    check(0 <= c.optimizer.label_smoothing < 1, "config.optimizer.label_smoothing must be in [0, 1)")
    fractions = (c.data.val_fraction, c.data.test_fraction)
    check(
        min(fractions) >= 0 and sum(fractions) < 1,
        f"config.data.val_fraction={fractions[0]}, config.data.test_fraction={fractions[1]}: each must be >= 0 "
        "and their sum < 1",
    )
    check(
        set(c.probes) <= {"ridge", "logistic", "knn", "zeroshot"},
        f"config.probes={tuple(c.probes)}: choose from 'ridge', 'logistic', 'knn', 'zeroshot'",
    )
    check(c.head.init in ("random", "text"), f"config.head.init={c.head.init!r}: use 'random' or 'text'")
    check(
        c.head.init == "random" or (c.head.kind == "linear" and uses_cached_features(c)),
        "config.head.init='text' starts a linear head on cached features: set config.head.kind='linear', "
        "config.freeze='all' and config.data.augment=False",
    )
    templates = tuple(c.zeroshot.templates)
    bad = [t for t in templates if not isinstance(t, str) or t.count("{}") != 1]
    check(
        bool(templates) and not bad,
        f"config.zeroshot.templates={templates}: each needs exactly one '{{}}', e.g. 'a photo of a {{}}.'",
    )
    check(c.fewshot.probe in ("ridge", "logistic"), f"config.fewshot.probe={c.fewshot.probe!r}: 'ridge' or 'logistic'")
    from fxjax.backbones.backbone import VARIANTS

    unknown = [v for v in c.sweep.feature_variants if v not in VARIANTS]
    check(not unknown, f"config.sweep.feature_variants: unknown {unknown}; choose from {', '.join(VARIANTS)}")
    _check_protocols(c)
    needs_features = bool(
        c.sweep.learning_rates
        or c.sweep.weight_decays
        or c.sweep.feature_variants
        or c.probes
        or c.fewshot.ks
        or c.protocols
    )
    check(
        not needs_features or uses_cached_features(c),
        "config.sweep, config.probes, config.fewshot and config.protocols work on cached features: they need "
        "config.freeze='all' and config.data.augment=False",
    )
    check(
        not (c.sweep.learning_rates or c.sweep.weight_decays) or c.head.kind == "linear",
        "config.sweep trains linear heads: set config.head.kind='linear'",
    )
    check(
        c.mode != "cached" or (c.freeze == "all" and not c.data.augment),
        "config.mode='cached' needs config.freeze='all' and config.data.augment=False (features must not change)",
    )


def _check_protocols(c: ml_collections.ConfigDict) -> None:
    """config.protocols names known protocols, once each; every override is a known setting of a listed one."""
    from fxjax.evaluate import catalog

    names = tuple(c.protocols)
    unknown = [n for n in names if n not in catalog.NAMES]
    if unknown or len(set(names)) != len(names):
        raise ValueError(
            f"config.protocols={names}: {'unknown ' + repr(unknown[0]) if unknown else 'a name is repeated'}; "
            f"choose from {', '.join(catalog.NAMES)}"
        )
    for name in c.protocol_overrides.keys():
        if name not in names:
            raise ValueError(
                f"config.protocol_overrides.{name}: {name!r} is not in config.protocols={names}; add it, or drop "
                "the overrides"
            )
        catalog.check_overrides(name, _as_dict(c.protocol_overrides[name], f"protocol_overrides.{name}"))


def uses_cached_features(c: ml_collections.ConfigDict) -> bool:
    if c.mode == "auto":
        return c.freeze == "all" and not c.data.augment
    return c.mode == "cached"
