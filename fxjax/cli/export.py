"""Exports a trained run as a self-contained classifier folder (best checkpoint, classes, preprocessing).

    fxjax export runs/quickstart exported/digits [--with-backbone]
    python -m launch.export runs/quickstart exported/digits       # the same, from a clone

Use it with `fxjax.load_classifier("exported/digits").predict(images)` or `fxjax predict`.
"""

from __future__ import annotations

import sys

from fxjax.cli.main import command_parser, print_result


def main(argv: list[str] | None = None) -> int:
    parser = command_parser("export", __doc__)
    parser.add_argument("workdir", help="a finished run directory")
    parser.add_argument("out", help="the classifier folder to create (must not exist yet)")
    parser.add_argument(
        "--with-backbone",
        action="store_true",
        help="copy the backbone's weight files too, so loading needs no download",
    )
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    from fxjax.runs.export import export

    return print_result(lambda: export(args.workdir, args.out, with_backbone=args.with_backbone))


if __name__ == "__main__":
    sys.exit(main())
