from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, settings
from torch import nn

from torchbricks_fx import BrickCollection, BrickLoss, BrickMetricSingle, BrickNotTrainable, BrickTrainable

settings.register_profile("default", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("default")

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


class Halve(nn.Module):
    def forward(self, raw: torch.Tensor) -> torch.Tensor:
        return raw / 2


class Backbone(nn.Module):
    def __init__(self, channels: int = 8) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, channels, 3, padding=1)
        self.bn = nn.BatchNorm2d(channels)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn(self.conv(image)))


class Classifier(nn.Module):
    def __init__(self, channels: int = 8, num_classes: int = 3) -> None:
        super().__init__()
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.fc(features.mean(dim=(2, 3)))
        return logits, logits.argmax(dim=1)


class Segmenter(nn.Module):
    def __init__(self, channels: int = 8, num_classes: int = 2) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, num_classes, 1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.conv(features)


def multitask_bricks(num_classes: int = 3) -> dict:
    """Shared backbone, two heads, two losses and a metric (the hand-written reference case)."""
    from torchmetrics.classification import MulticlassAccuracy

    return {
        "preprocessor": BrickNotTrainable(Halve(), input_names=["raw"], output_names=["image"]),
        "backbone": BrickTrainable(Backbone(), input_names=["image"], output_names=["features"]),
        "heads": {
            "classifier": BrickTrainable(Classifier(num_classes=num_classes), input_names=["features"],
                                         output_names=["logits", "prediction"]),
            "segmenter": BrickTrainable(Segmenter(), input_names=["features"], output_names=["seg"]),
        },
        "loss_cls": BrickLoss(nn.CrossEntropyLoss(), input_names={"input": "logits", "target": "labels"},
                              output_names=["loss_cls"]),
        "loss_seg": BrickLoss(nn.CrossEntropyLoss(), input_names=["seg", "masks"], output_names=["loss_seg"]),
        "accuracy": BrickMetricSingle(MulticlassAccuracy(num_classes=num_classes),
                                      input_names=["prediction", "labels"]),
    }


@pytest.fixture
def multitask() -> BrickCollection:
    torch.manual_seed(0)
    return BrickCollection(multitask_bricks())


@pytest.fixture
def multitask_inputs() -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    return {"raw": torch.rand(4, 3, 16, 16), "labels": torch.tensor([0, 1, 2, 1]),
            "masks": torch.randint(0, 2, (4, 16, 16))}
