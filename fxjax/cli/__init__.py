"""The command line: `fxjax <command>` (fxjax/cli/main.py) and, from a clone, `python -m launch.<command>`; both
run the same `main(argv) -> int` of the command's module here."""
