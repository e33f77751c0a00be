"""Computes a config's features for every split into the feature cache (reused by later runs).

    fxjax extract --config quickstart [--config.a.b=value ...]
    python -m launch.extract --config configs/quickstart.py       # the same, from a clone

--config takes a Python file with get_config() or a shipped config's name; --config.KEY=VALUE overrides any key.
Multi-host as `fxjax train` (the same --coordinator_address / --num_processes / --process_id / --distributed).
"""

from __future__ import annotations

import sys

from fxjax.cli.main import input_error
from fxjax.cli.train import parse_args, start


def main(argv: list[str] | None = None) -> int:
    args, overrides = parse_args(
        sys.argv[1:] if argv is None else argv, workdir_required=False, command="extract", doc=__doc__
    )
    primary = start(args)
    from fxjax import config as config_lib
    from fxjax.features import extract, store
    from fxjax.runs.setup import Setup

    try:
        config = config_lib.load_config(args.config, overrides)
        setup = Setup.from_config(config)
        config, data, backbone = setup.config, setup.data, setup.backbone  # the cheap data first
        feats, _, hits = setup.cached_features(rows="host")  # what a host reads: never gathers the split
    except (ValueError, OSError) as err:
        return input_error(err)
    if not primary:
        return 0
    root = store.as_path(store.cache_root(config.cache_dir))  # an epath: a gs:// root prints as its URI
    for split, arrays in feats.items():
        key = extract.fingerprint(backbone, data, split, config.dtype, config.param_dtype, tuple(arrays))
        n = len(data.splits[split])
        shapes = ", ".join(f"{name} {n} x {a.shape[1]}" for name, a in arrays.items())
        print(f"{split}: {shapes} ({'cached' if hits[split] else 'extracted'}) {root / store.fingerprint_key(key)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
