"""A small collection for the ``torchbricks-fx`` command line (used in the CLI docs and tests).

    torchbricks-fx inspect examples/cli_model.py
    torchbricks-fx export examples/cli_model.py --stage export -o model.onnx
    torchbricks-fx bench examples/cli_model.py --backends eager,fx --batch-sizes 1,8
    torchbricks-fx check examples/cli_model.py --lock examples/cli_model.lock.json
"""

from __future__ import annotations

import torch
from torch import nn

from torchbricks_fx import BrickCollection, BrickLoss, BrickNotTrainable, BrickTrainable


class Normalize(nn.Module):
    def forward(self, raw: torch.Tensor) -> torch.Tensor:
        return (raw - 0.5) / 0.25


class Backbone(nn.Module):
    def __init__(self, channels: int = 8) -> None:
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(3, channels, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                  nn.Flatten())

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.conv(image)


class Head(nn.Module):
    def __init__(self, channels: int = 8, num_classes: int = 3) -> None:
        super().__init__()
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.fc(features)
        return logits, logits.softmax(dim=1)


def build() -> tuple[BrickCollection, dict[str, torch.Tensor]]:
    """(collection, example named inputs): a 3-brick image classifier plus a loss alive in training stages."""
    torch.manual_seed(0)
    collection = BrickCollection({
        "preprocessor": BrickNotTrainable(Normalize(), input_names=["raw"], output_names=["normalized"]),
        "backbone": BrickTrainable(Backbone(), input_names=["normalized"], output_names=["features"]),
        "head": BrickTrainable(Head(), input_names=["features"], output_names=["logits", "probabilities"]),
        "loss": BrickLoss(nn.CrossEntropyLoss(), input_names=["logits", "targets"], output_names=["loss_ce"]),
    })
    return collection, {"raw": torch.rand(2, 3, 16, 16), "targets": torch.tensor([0, 2])}
