"""`python -m launch.verify` (from a clone) is `fxjax verify`: the code lives in fxjax/cli/verify.py."""

import sys

from fxjax.cli.verify import main

if __name__ == "__main__":
    sys.exit(main())
