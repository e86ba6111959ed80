"""torchvision classification models as backbone bricks returning feature maps (no pooling, no classifier).

torchvision is imported here, not at ``import torchbricks_fx``.  No weights are downloaded unless the user
passes ``weights``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from torchbricks_fx.bricks import BrickTrainable

if TYPE_CHECKING:
    from torchvision.models import ResNet

__all__ = ["BackboneResnet", "resnet_to_brick"]


class BackboneResnet(nn.Module):
    """A torchvision ResNet without its pooling and classifier: images -> layer4 feature maps.

    ``n_backbone_features`` is the number of channels of those maps (512 for resnet18/34, 2048 for
    resnet50 and deeper).  The ResNet's own layers are reused (shared), so its weights stay loadable.
    """

    def __init__(self, resnet: ResNet) -> None:
        super().__init__()
        self.conv1 = resnet.conv1
        self.bn1 = resnet.bn1
        self.relu = resnet.relu
        self.maxpool = resnet.maxpool
        self.layer1 = resnet.layer1
        self.layer2 = resnet.layer2
        self.layer3 = resnet.layer3
        self.layer4 = resnet.layer4
        # The classifier's input width is the channel count of layer4's output.
        self.n_backbone_features: int = resnet.fc.in_features

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(images))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


def resnet_to_brick(resnet: ResNet, input_name: str, output_name: str) -> BrickTrainable:
    """Wraps a torchvision ResNet as a trainable backbone brick: ``input_name`` images -> ``output_name``
    feature maps.  ``brick.model.n_backbone_features`` gives the feature width for a head."""
    return BrickTrainable(BackboneResnet(resnet), input_names=[input_name], output_names=[output_name])
