"""`fxjax`: one command with a subcommand per stage; each subcommand is the `main(argv)` of its module.

    fxjax train --config quickstart --workdir runs/quickstart
    fxjax config show quickstart --config.num_epochs=5

A new subcommand is one line in COMMANDS and a module with a docstring and `main(argv: list[str]) -> int`.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path

import fxjax

COMMANDS = {
    "train": "fxjax.cli.train",
    "extract": "fxjax.cli.extract",
    "verify": "fxjax.cli.verify",
    "report": "fxjax.cli.report",
    "export": "fxjax.cli.export",
    "predict": "fxjax.cli.predict",
    "suite": "fxjax.cli.suite",
    "config": "fxjax.cli.config",
}


def prog(command: str) -> str:
    """The command as the user typed it, for usage lines: `python -m launch.train` from a clone, else `fxjax train`."""
    return f"python -m launch.{command}" if Path(sys.argv[0]).parent.name == "launch" else f"fxjax {command}"


def command_parser(command: str, doc: str) -> argparse.ArgumentParser:
    """A subcommand's parser: its module docstring (usage examples, exit codes) shown as written in `--help`."""
    return argparse.ArgumentParser(
        prog=prog(command), description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )


def input_error(err: BaseException | str) -> int:
    """Bad input: one `error:` line on stderr and exit status 2 (checked before anything was written)."""
    print(f"error: {err}", file=sys.stderr)
    return 2


def print_result(work: Callable[[], object]) -> int:
    """Runs a command's work and prints what it returns (exit 0); bad input is `input_error` (exit 2)."""
    try:
        result = work()
    except (OSError, ValueError) as err:
        return input_error(err)
    print(result)
    return 0


def summary(module: str) -> str:
    """A command module's one-line docstring summary, read without importing it (keeps `fxjax --help` instant)."""
    source = Path(importlib.util.find_spec(module).origin).read_text()
    return (ast.get_docstring(ast.parse(source)) or "").splitlines()[0]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    listing = "\n".join(f"  {name:<9} {summary(module)}" for name, module in COMMANDS.items())
    parser = argparse.ArgumentParser(
        prog="fxjax",
        usage="fxjax [-h] [--version] <command> [its arguments ...]",
        description=f"{fxjax.__doc__}\n\ncommands:\n{listing}",
        epilog="`fxjax <command> --help` explains each command's arguments. Exit status: 0 done, 1 training "
        "diverged, 2 bad input, 75 preempted (rerun to resume).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"fxjax {fxjax.__version__}", help="print the version")
    parser.add_argument("command", choices=COMMANDS, metavar="<command>", help="one of: " + ", ".join(COMMANDS))
    args = parser.parse_args(argv[:1])
    return importlib.import_module(COMMANDS[args.command]).main(argv[1:])
