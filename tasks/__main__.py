"""python -m tasks: the command line."""

import sys

from tasks.cli import main

sys.exit(main())
