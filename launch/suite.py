"""`python -m launch.suite` (from a clone) is `fxjax suite`: the code lives in fxjax/cli/suite.py."""

import sys

from fxjax.cli.suite import main

if __name__ == "__main__":
    sys.exit(main())
