"""``python -m torchbricks_fx``: the ``torchbricks-fx`` command line."""

from __future__ import annotations

import sys

from torchbricks_fx.cli import main

if __name__ == "__main__":
    sys.exit(main())
