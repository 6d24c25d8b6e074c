"""`python -m mini_trainer.stream` runs the doc examples of every module of the package."""

import doctest
import importlib
import sys

MODULES = ("events", "sources", "stages", "sinks", "augmenters", "plotting")

if __name__ == "__main__":  # pragma: no cover
    failed = sum(doctest.testmod(importlib.import_module(f"mini_trainer.stream.{name}")).failed for name in MODULES)
    sys.exit(failed)
