"""``python -m convmat``: the command."""

import sys

from .presentation.cli import main

sys.exit(main())
