"""`python -m launch.predict` (from a clone) is `fxjax predict`: the code lives in fxjax/cli/predict.py."""

import sys

from fxjax.cli.predict import main

if __name__ == "__main__":
    sys.exit(main())
