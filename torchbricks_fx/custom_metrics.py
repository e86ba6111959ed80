"""Seed-compatible metrics (``from torchbricks.custom_metrics import ConcatenatePredictionAndTarget``)."""

from __future__ import annotations

from typing import Any

import torch
from torchmetrics import Metric
from torchmetrics.utilities.data import dim_zero_cat

from torchbricks_fx.errors import BrickError

__all__ = ["ConcatenatePredictionAndTarget"]


class ConcatenatePredictionAndTarget(Metric):
    """Collects every batch's predictions and targets over an epoch; ``compute()`` returns both,
    concatenated along the batch axis (gathered across processes under DDP), e.g. for a confusion matrix
    or a plot made at epoch end."""

    full_state_update = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("predictions", default=[], dist_reduce_fx="cat")
        self.add_state("targets", default=[], dist_reduce_fx="cat")

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        if preds.shape[:1] != target.shape[:1]:
            raise BrickError(f"ConcatenatePredictionAndTarget: predictions and targets differ in batch size "
                             f"({tuple(preds.shape)} vs {tuple(target.shape)}).")
        predictions: list[torch.Tensor] = self.predictions  # type: ignore[assignment]
        targets: list[torch.Tensor] = self.targets  # type: ignore[assignment]
        predictions.append(preds)
        targets.append(target)

    def compute(self) -> tuple[torch.Tensor, torch.Tensor]:
        return _concatenated(self.predictions), _concatenated(self.targets)


def _concatenated(state: Any) -> torch.Tensor:
    # After a DDP sync the state is already one tensor; before any update it is an empty list.
    if isinstance(state, list):
        return dim_zero_cat(state) if state else torch.empty(0)
    return state
