"""``python -m convmat``: the command."""

import sys

from .cli import main

sys.exit(main())
