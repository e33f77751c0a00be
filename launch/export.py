"""`python -m launch.export` (from a clone) is `fxjax export`: the code lives in fxjax/cli/export.py."""

import sys

from fxjax.cli.export import main

if __name__ == "__main__":
    sys.exit(main())
