"""`python -m launch.train` (from a clone) is `fxjax train`: the code lives in fxjax/cli/train.py."""

import sys

from fxjax.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
