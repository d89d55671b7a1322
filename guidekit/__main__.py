"""``python -m guidekit demo|sweep``: the command line of the bundled models (guidekit.models.cli)."""

from __future__ import annotations

import sys

from guidekit.models.cli import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
