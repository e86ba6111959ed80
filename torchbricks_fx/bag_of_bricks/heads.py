"""Task heads: image classification and semantic segmentation."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from torchbricks_fx.errors import BrickError

__all__ = ["ImageClassifier", "SegmentationHead"]


def _check_positive(owner: str, **values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise BrickError(f"{owner}: {name} must be a positive integer, got {value!r}.")


class ImageClassifier(nn.Module):
    """Backbone feature maps ``(N, C, H, W)`` -> ``(logits, probabilities, class_prediction)``.

    Features are average-pooled over space first unless ``use_average_pooling=False`` (then the input must
    already hold ``n_features`` values per sample, e.g. ``(N, n_features)`` or ``(N, n_features, 1, 1)``);
    either way they are flattened to ``(N, n_features)``, as in torchbricks.
    """

    def __init__(self, num_classes: int, n_features: int, use_average_pooling: bool = True) -> None:
        super().__init__()
        _check_positive("ImageClassifier", num_classes=num_classes, n_features=n_features)
        self.use_average_pooling = use_average_pooling
        self.fc = nn.Linear(n_features, num_classes)

    def forward(self, backbone_features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = backbone_features
        if self.use_average_pooling:
            x = F.adaptive_avg_pool2d(x, 1)
        x = torch.flatten(x, start_dim=1)
        logits = self.fc(x)
        probabilities = torch.softmax(logits, dim=1)
        class_prediction = torch.argmax(logits, dim=1)
        return logits, probabilities, class_prediction


class SegmentationHead(nn.Module):
    """Backbone feature maps + the input image -> per-pixel ``(logits, class_prediction)`` at image size.

    A 1x1 convolution scores every feature-map cell, and the scores are upsampled bilinearly to the image's
    height and width (the image is read only for its size).
    """

    def __init__(self, num_classes: int, n_features: int, align_corners: bool = False) -> None:
        super().__init__()
        _check_positive("SegmentationHead", num_classes=num_classes, n_features=n_features)
        self.align_corners = align_corners
        self.classifier = nn.Conv2d(n_features, num_classes, kernel_size=1)

    def forward(self, backbone_features: torch.Tensor, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores = self.classifier(backbone_features)
        logits = F.interpolate(scores, size=image.shape[-2:], mode="bilinear", align_corners=self.align_corners)
        return logits, torch.argmax(logits, dim=1)
