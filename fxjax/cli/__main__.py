"""`python -m fxjax.cli ...` is `fxjax ...` without the console script (e.g. before `pip install`)."""

import sys

from fxjax.cli.main import main

sys.exit(main())
