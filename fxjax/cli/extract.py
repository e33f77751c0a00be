"""Computes a config's features for every split into the feature cache (reused by later runs).

    fxjax extract --config quickstart [--config.a.b=value ...]
    python -m launch.extract --config configs/quickstart.py       # the same, from a clone

--config takes a Python file with get_config() or a shipped config's name; --config.KEY=VALUE overrides any key.
"""

from __future__ import annotations

import logging
import sys

from fxjax.cli.config import load_config_file
from fxjax.cli.train import parse_args


def main(argv: list[str] | None = None) -> int:
    args, overrides = parse_args(
        sys.argv[1:] if argv is None else argv, workdir_required=False, command="extract", doc=__doc__
    )
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from fxjax import config as config_lib, parallel
    from fxjax.backbones.hub import load_backbone
    from fxjax.data.sources import load_dataset
    from fxjax.features import extract as features, store as cache

    try:
        config = load_config_file(args.config)
        for key, value in overrides:
            config_lib.override(config, key, value)
        config = config_lib.resolve(config)
        mesh = parallel.make_mesh(config.mesh.data, config.mesh.fsdp)
        parallel.check_batch_size(config.eval_batch_size, mesh, "config.eval_batch_size")
        backbone = load_backbone(
            config.backbone, revision=config.revision, dtype=config.dtype, param_dtype=config.param_dtype
        )
        if config.image_size is not None:
            backbone.preprocess = backbone.preprocess.at_size(config.image_size)
        data = load_dataset(
            config.data.source,
            data_dir=config.data.data_dir,
            val_fraction=config.data.val_fraction,
            test_fraction=config.data.test_fraction,
            seed=config.data.split_seed,
            few_shot_k=config.data.few_shot_k,
        )
        feats, _, hits = features.cached_features(
            backbone,
            data,
            mesh=mesh,
            batch_size=config.eval_batch_size,
            cache_dir=config.cache_dir,
            dtype=config.dtype,
            param_dtype=config.param_dtype,
            worker_count=config.data.worker_count,
            variants=tuple(config.sweep.feature_variants),
        )
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    store = cache.FeatureCache(cache.cache_root(config.cache_dir))
    for split, variants in feats.items():
        key = features.fingerprint(backbone, data, split, config.dtype, config.param_dtype, tuple(variants))
        shapes = ", ".join(f"{name} {a.shape[0]} x {a.shape[1]}" for name, a in variants.items())
        print(f"{split}: {shapes} ({'cached' if hits[split] else 'extracted'}) {store.path(key)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
