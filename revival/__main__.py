"""`python -m revival ...` is the `revival` command."""

import sys

from .cli import main

sys.exit(main())
