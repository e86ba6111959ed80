"""The seed's import path: ``from torchbricks.bricks import BrickCollection, BrickTrainable, Stage`` works with
the import root changed.  The classes live in ``brick.py`` and ``collection.py``."""

from __future__ import annotations

from torchbricks_fx.brick import (
    Brick,
    BrickInterface,
    BrickLoss,
    BrickMetrics,
    BrickMetricSingle,
    BrickModule,
    BrickNotTrainable,
    BrickTrainable,
)
from torchbricks_fx.collection import BrickCollection
from torchbricks_fx.stage import Stage

__all__ = [
    "Brick",
    "BrickCollection",
    "BrickInterface",
    "BrickLoss",
    "BrickMetricSingle",
    "BrickMetrics",
    "BrickModule",
    "BrickNotTrainable",
    "BrickTrainable",
    "Stage",
]
