"""`python -m mini_trainer ...` (what `torchrun -m mini_trainer ...` runs)."""

import sys

from .cli import main

sys.exit(main())
