"""`python -m launch.report` (from a clone) is `fxjax report`: the code lives in fxjax/cli/report.py."""

import sys

from fxjax.cli.report import main

if __name__ == "__main__":
    sys.exit(main())
