"""`python -m prunectl`."""

import sys

from prunectl.cli import main

sys.exit(main())
