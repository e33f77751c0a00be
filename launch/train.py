"""Trains a head on a pre-trained backbone from a config file.

    python -m launch.train --config configs/quickstart.py --workdir runs/quickstart [--config.a.b=value ...]

Rerunning the same command on the same workdir resumes from its last checkpoint.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import sys
from pathlib import Path


def load_config_file(path: str):
    """Imports a config file and returns its get_config()."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"config file {path!r} not found")
    spec = importlib.util.spec_from_file_location(f"fxjax_config_{file.stem}", file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise AttributeError(f"config file {path!r} has no get_config()")
    return module.get_config()


def parse_args(argv: list[str]):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="Python file with get_config()")
    parser.add_argument("--workdir", required=True, help="run directory (created; resumed if it has checkpoints)")
    args, rest = parser.parse_known_args(argv)
    overrides = []
    for item in rest:
        if not item.startswith("--config.") or "=" not in item:
            parser.error(f"unrecognised argument {item!r}; overrides look like --config.optimizer.learning_rate=0.01")
        key, value = item[len("--config."):].split("=", 1)
        overrides.append((key, value))
    return args, overrides


def main(argv: list[str] | None = None) -> int:
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("absl", "jax._src", "orbax"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from fxjax import config as config_lib, experiment

    try:
        config = load_config_file(args.config)
        for key, value in overrides:
            config_lib.override(config, key, value)
        summary = experiment.run(config, args.workdir)
    except (ValueError, FileNotFoundError, PermissionError, AttributeError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"test_accuracy={summary['test_accuracy']:.4f} val_accuracy={summary['val_accuracy']:.4f} "
          f"best_step={summary['best_step']} train_seconds={summary['train_seconds']:.1f} "
          f"images_per_second={summary['images_per_second']:.0f} workdir={args.workdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
