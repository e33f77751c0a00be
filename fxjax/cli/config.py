"""Shows a config resolved: every key with its value, its default and its comment from fxjax/config.py.

    fxjax config show quickstart                                  # a shipped config, by name
    fxjax config show configs/quickstart.py --config.num_epochs=5   # or a file, with overrides as for train

A config is named either by a path to a Python file with get_config() or by the name of a shipped example
(quickstart, pixels_digits, ...: the repository's configs/ folder, installed as fxjax/configs).
"""

from __future__ import annotations

import ast
import inspect
import io
import sys
import textwrap
import tokenize
from typing import Any

import ml_collections
import numpy as np

from fxjax import config as config_lib


def split_overrides(parser, rest: list[str]) -> list[tuple[str, str]]:
    """`--config.a.b=value` arguments → [("a.b", "value")]; anything else is a usage error (exit 2)."""
    overrides = []
    for item in rest:
        if not item.startswith("--config.") or "=" not in item:
            parser.error(f"unrecognised argument {item!r}; overrides look like --config.optimizer.learning_rate=0.01")
        key, value = item[len("--config.") :].split("=", 1)
        overrides.append((key, value))
    return overrides


def _dotted(target: ast.expr) -> str | None:
    """`c.data.source` → "data.source"; None for anything that is not an attribute of `c`."""
    names = []
    while isinstance(target, ast.Attribute):
        names.insert(0, target.attr)
        target = target.value
    return ".".join(names) if names and isinstance(target, ast.Name) and target.id == "c" else None


def key_comments() -> dict[str, str]:
    """Every key and group that default_config() assigns, in source order → its comment (the comment lines just
    above the assignment, then the one beside it), read from the source so the defaults stay their own docs."""
    source = textwrap.dedent(inspect.getsource(config_lib.default_config))
    lines = source.splitlines()
    comments = {
        token.start[0]: token.string.lstrip("#").strip()
        for token in tokenize.generate_tokens(io.StringIO(source).readline)
        if token.type == tokenize.COMMENT
    }
    docs = {}
    for node in ast.parse(source).body[0].body:  # the function's statements, in source order
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1 and (key := _dotted(node.targets[0]))):
            continue
        above, line = [], node.lineno - 1
        while line in comments and lines[line - 1].lstrip().startswith("#"):
            above.insert(0, comments[line])
            line -= 1
        beside = [comments[n] for n in range(node.lineno, node.end_lineno + 1) if n in comments]
        docs[key] = " ".join(above + beside)
    return docs


def _plain(value: Any) -> Any:
    """numpy scalars (in grids built with np.logspace) as Python numbers, so they print as the numbers they are."""
    if isinstance(value, (tuple, list)):
        return tuple(_plain(v) for v in value)
    return value.item() if isinstance(value, np.generic) else value


def protocol_settings(config: ml_collections.ConfigDict) -> list[str]:
    """Lines `protocol_overrides.<name>.<setting> = value  # default: ...` for every setting of every protocol in
    config.protocols: its default from the protocol's own table, the override where one is given."""
    from fxjax.evaluate import catalog

    out = []
    for name in config.protocols:
        given = config.protocol_overrides[name].to_dict() if name in config.protocol_overrides else {}
        for setting, default in catalog.protocol_defaults(name).items():
            value = given.get(setting, default)
            out.append(f"protocol_overrides.{name}.{setting} = {_plain(value)!r}  # default: {_plain(default)!r}")
    return out


def describe(config: ml_collections.ConfigDict) -> list[str]:
    """Lines `key = value  # default: ...; comment` for every key of a resolved config, groups headed by theirs."""
    defaults = config_lib.default_config()
    out, previous = [], ""
    for key, comment in key_comments().items():
        if "." not in key and "." in previous:
            out.append("")  # a top-level key after a group's keys
        previous = key
        default = defaults
        value = config
        for part in key.split("."):
            default, value = default[part], value[part]
        if isinstance(default, ml_collections.ConfigDict):
            out += ["", f"# {key}" + (f": {comment}" if comment else "")]
            if key == "protocol_overrides" and config.protocols:
                out += protocol_settings(config)
                previous = f"{key}."  # a blank line before the next top-level key, as after any group's keys
            continue
        out.append(f"{key} = {value!r}  # default: {default!r}" + (f"; {comment}" if comment else ""))
    return out


def main(argv: list[str] | None = None) -> int:
    from fxjax.cli.main import command_parser, input_error

    parser = command_parser("config", __doc__)
    actions = parser.add_subparsers(dest="action", required=True, metavar="<action>")
    show = actions.add_parser(
        "show",
        help="print the resolved config: every key, its value, default and comment",
        description=__doc__.splitlines()[0],
        epilog="Overrides: --config.KEY=VALUE, any key shown (e.g. --config.optimizer.learning_rate=0.01).",
    )
    show.add_argument(
        "config", help="a shipped config name (" + ", ".join(config_lib.shipped_names()) + ") or a .py file"
    )
    args, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    overrides = split_overrides(show, rest)
    try:
        config = config_lib.load_config(args.config, overrides)
        config = config_lib.resolve(config)
    except (ValueError, OSError, AttributeError) as err:
        return input_error(err)
    print(f"# {config_lib.find_config(args.config)}: resolved, every key with its default and comment")
    print("\n".join(describe(config)))
    return 0
