"""``python -m convmat``: the command."""

import sys

from .presentation import main

sys.exit(main())
