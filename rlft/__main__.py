"""`python -m rlft ...` is the same as `rlft ...`."""

import sys

from rlft.cli.main import main

sys.exit(main())
