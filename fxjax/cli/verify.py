"""Decodes every image of a folder dataset once, in parallel, and stores which ones are unreadable.

    fxjax verify --folder /data/imagenet [--cache_dir DIR] [--workers 32]
    python -m launch.verify --folder /data/imagenet [--cache_dir DIR] [--workers 32]
    python -m launch.verify --config configs/my_folder_config.py [--config.data.source=folder:/data/x]

Optional: runs never decode a folder up front (an unreadable image is flagged when read and skipped), but
after this pass they skip the known-bad files without opening them. The index goes beside the feature
cache (config.cache_dir, else $FXJAX_CACHE_DIR, else ~/.cache/fxjax) at folders/<sha256 of the path>.json;
a file whose size or mtime changed since is read again. Prints a JSON summary; exit status 2 on bad input.
"""

from __future__ import annotations

import json
import sys


def main(argv: list[str] | None = None) -> int:
    from fxjax.cli.main import command_parser, input_error

    parser = command_parser("verify", __doc__)
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--folder", help="the dataset folder (class subfolders, or train/ val/ test/ of them)")
    what.add_argument("--config", help="a config file whose config.data.source is folder:<path>")
    parser.add_argument("--cache_dir", help="where the index goes (default: the config's cache_dir or the cache)")
    parser.add_argument("--workers", type=int, help="decoding threads (default: 4 per CPU, at most 32)")
    args, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)

    from fxjax.data.sources import verify_folder

    try:
        folder, cache_dir = args.folder, args.cache_dir
        if args.config:
            from fxjax import config as config_lib
            from fxjax.cli.config import split_overrides

            config = config_lib.resolve(config_lib.load_config(args.config, split_overrides(parser, rest)))
            if not config.data.source.startswith("folder:"):
                raise ValueError(f"config.data.source={config.data.source!r} is not a folder:<path> dataset")
            folder, cache_dir = config.data.source.removeprefix("folder:"), cache_dir or config.cache_dir
        elif rest:
            parser.error(f"unrecognised arguments {rest}; --config.* overrides need --config")
        summary = verify_folder(folder, cache_dir=cache_dir, workers=args.workers)
    except (OSError, ValueError) as err:
        return input_error(err)
    print(json.dumps({**summary, "unreadable_count": len(summary["unreadable"])}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
