"""`python -m launch.extract` (from a clone) is `fxjax extract`: the code lives in fxjax/cli/extract.py."""

import sys

from fxjax.cli.extract import main

if __name__ == "__main__":
    sys.exit(main())
