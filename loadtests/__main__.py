"""`python -m dvd_serve.loadtests`: see `cli.py`."""

import sys

from dvd_serve.loadtests.cli import main

sys.exit(main())
