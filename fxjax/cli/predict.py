"""Classifies images with an exported classifier: one line per image with its top classes.

    fxjax predict exported/digits photo.jpg more/ [--top-k 5] [--json] [--batch-size 32]
    python -m launch.predict exported/digits photo.jpg            # the same, from a clone

Folders are searched recursively for images. An image that cannot be read (damaged, not an image, or over
PIL's pixel limit, Image.MAX_IMAGE_PIXELS) is skipped with one `warning:` line on stderr naming it (and an
"error" entry with --json); the others are still classified. Exit status: 0 when at least one image was
classified, 2 on bad input (no image readable, a damaged or missing classifier folder).
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from fxjax.cli.main import command_parser, input_error
from fxjax.data.sources import DECODE_ERRORS, IMAGE_EXTENSIONS, decode_rgb


def expand(inputs: list[str]) -> list[Path]:
    """Files as given, folders replaced by the images under them (sorted, hidden files skipped)."""
    paths = []
    for item in map(Path, inputs):
        if item.is_dir():
            paths += sorted(
                p
                for p in item.rglob("*")
                if p.suffix.lower() in IMAGE_EXTENSIONS
                and p.is_file()
                and not any(part.startswith(".") for part in p.relative_to(item).parts)
            )
        else:
            paths.append(item)
    return paths


def read_images(paths: list[Path]) -> tuple[dict[int, np.ndarray], dict[int, str]]:
    """→ ({position: uint8 [H, W, 3]}, {position: why it could not be read})."""
    images, errors = {}, {}
    for i, path in enumerate(paths):
        try:
            with warnings.catch_warnings():  # PIL only warns up to twice its pixel limit: still a bomb to decode
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                images[i] = decode_rgb(str(path))
        except (*DECODE_ERRORS, Image.DecompressionBombWarning) as err:
            errors[i] = str(err) or type(err).__name__
    return images, errors


def main(argv: list[str] | None = None) -> int:
    parser = command_parser("predict", __doc__)
    parser.add_argument("classifier", help="a folder written by `fxjax export`")
    parser.add_argument("images", nargs="+", help="image files or folders of images")
    parser.add_argument("--top-k", type=int, default=5, help="classes shown per image, most probable first")
    parser.add_argument("--json", action="store_true", help="print one JSON list instead of lines")
    parser.add_argument("--batch-size", type=int, default=32, help="images classified per forward pass")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.top_k < 1 or args.batch_size < 1:
        parser.error("--top-k and --batch-size must be positive")
    from fxjax.runs.export import load_classifier

    paths = expand(args.images)
    if not paths:
        print("error: no images found in " + ", ".join(args.images), file=sys.stderr)
        return 2
    images, errors = read_images(paths)  # before the backbone loads: unreadable input costs no load
    for i, why in errors.items():
        print(f"warning: skipped {paths[i]}: {why}", file=sys.stderr)
    if not images:
        return input_error(f"none of the {len(paths)} images could be read")
    try:
        classifier = load_classifier(args.classifier)
    except (OSError, ValueError) as err:
        return input_error(err)
    order = sorted(images)
    probs = classifier.predict([images[i] for i in order], batch_size=args.batch_size)
    row_of = {i: row for row, i in enumerate(order)}
    k = min(args.top_k, len(classifier.class_names))
    results = []
    for i, path in enumerate(paths):
        if i in errors:
            results.append({"path": str(path), "error": errors[i]})
            continue
        row = probs[row_of[i]]
        top = np.argsort(-row, kind="stable")[:k]
        results.append(
            {
                "path": str(path),
                "predictions": [
                    {"class": classifier.class_names[c], "index": int(c), "probability": float(row[c])} for c in top
                ],
            }
        )
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for r in results:
            if "predictions" in r:  # the skipped ones are on stderr
                print(f"{r['path']}: " + ", ".join(f"{p['class']} {p['probability']:.3f}" for p in r["predictions"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
