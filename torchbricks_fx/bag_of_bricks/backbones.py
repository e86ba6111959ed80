"""torchvision classification models as backbone bricks returning feature maps (no pooling, no classifier).

torchvision is imported here, not at ``import torchbricks_fx``.  No weights are downloaded unless the user
passes ``weights``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from torchbricks_fx.bricks import BrickModule, BrickNotTrainable, BrickTrainable
from torchbricks_fx.errors import BrickError

if TYPE_CHECKING:
    from torchvision.models import ResNet

__all__ = ["Backbone", "BackboneResnet", "BackboneTorchvision", "backbone_brick", "backbone_names",
           "resnet_to_brick", "torchvision_backbone"]


class Backbone(nn.Module):
    """Base of the backbones here: images ``(N, 3, H, W)`` -> feature maps ``(N, n_backbone_features, h, w)``.
    A head reads ``n_backbone_features`` for its input width."""

    n_backbone_features: int


class BackboneResnet(Backbone):
    """A torchvision ResNet without its pooling and classifier: images -> layer4 feature maps.

    ``n_backbone_features`` is the number of channels of those maps (512 for resnet18/34, 2048 for
    resnet50 and deeper), read from layer4's last convolution (``resnet.fc`` may have been replaced, e.g. by
    ``nn.Identity()``; the norm layers may be any: BatchNorm2d, FrozenBatchNorm2d, SyncBatchNorm, GroupNorm).
    The ResNet's own layers are reused (shared), so its weights stay loadable.  The state-dict keys are
    ``conv1.weight``, ``layer4.1.bn2.weight``, ... (no ``resnet.`` prefix, no ``fc``): torchbricks'
    checkpoints need their keys mapped.
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
        self.n_backbone_features = _resnet_width(resnet)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(images))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


def _resnet_width(resnet: ResNet) -> int:
    """Channels of layer4's output: the last convolution of its last block (conv3 in Bottleneck, conv2 in
    BasicBlock).  Read from the convolution, not the norm after it: ResNets built with another norm layer
    (FrozenBatchNorm2d, SyncBatchNorm, GroupNorm) have the same widths.  A block of another shape is measured
    with one small forward pass."""
    last_block = resnet.layer4[-1]
    for name in ("conv3", "conv2"):
        conv = getattr(last_block, name, None)
        if isinstance(conv, nn.Conv2d):
            return conv.out_channels
    return _count_channels(nn.Sequential(resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool, resnet.layer1,
                                         resnet.layer2, resnet.layer3, resnet.layer4))


def resnet_to_brick(resnet: ResNet, input_name: str, output_name: str) -> BrickTrainable:
    """Wraps a torchvision ResNet as a trainable backbone brick: ``input_name`` images -> ``output_name``
    feature maps.  ``brick.model.n_backbone_features`` gives the feature width for a head."""
    return BrickTrainable(BackboneResnet(resnet), input_names=[input_name], output_names=[output_name])


class BackboneTorchvision(Backbone):
    """Feature maps ``(N, n_backbone_features, h, w)`` from the layers of a torchvision classification model
    that come before its global pooling and classifier."""

    def __init__(self, layers: nn.Module, n_backbone_features: int, model_name: str) -> None:
        super().__init__()
        self.layers = layers
        self.n_backbone_features = n_backbone_features
        self.model_name = model_name

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.layers(images)

    def extra_repr(self) -> str:
        return f"model_name={self.model_name!r}, n_backbone_features={self.n_backbone_features}"


# How to cut each torchvision family before its pooling; the key is a model-name prefix.  Families left out
# (googlenet, inception_v3, maxvit, vit) have auxiliary outputs, token outputs or no clean cut.
_FAMILIES: dict[str, Callable[[Any], nn.Module]] = {
    "resnet": BackboneResnet,
    "resnext": BackboneResnet,
    "wide_resnet": BackboneResnet,
    "regnet": lambda m: nn.Sequential(m.stem, m.trunk_output),
    "shufflenet": lambda m: nn.Sequential(m.conv1, m.maxpool, m.stage2, m.stage3, m.stage4, m.conv5),
    "mnasnet": lambda m: m.layers,
    # densenet applies its final ReLU in forward(), not as a layer.
    "densenet": lambda m: nn.Sequential(m.features, nn.ReLU()),
    # swin's features are channels-last; its own forward normalizes and permutes them back.
    "swin": lambda m: nn.Sequential(m.features, m.norm, m.permute),
    "alexnet": lambda m: m.features,
    "vgg": lambda m: m.features,
    "squeezenet": lambda m: m.features,
    "mobilenet": lambda m: m.features,
    "efficientnet": lambda m: m.features,
    "convnext": lambda m: m.features,
}


def backbone_names() -> list[str]:
    """The torchvision classification models that ``backbone_brick`` accepts."""
    return list(_backbone_families())


@functools.cache
def _backbone_families() -> dict[str, str]:
    """Each accepted model name and its family (a key of ``_FAMILIES``), computed once per process."""
    from torchvision import models

    # Longest prefix first: "resnext" must not match "resnet".
    prefixes = sorted(_FAMILIES, key=len, reverse=True)
    families = {name: next((p for p in prefixes if name.startswith(p)), None)
                for name in models.list_models(module=models)}
    return {name: family for name, family in families.items() if family is not None}


def _count_channels(layers: nn.Module) -> int:
    """Channels of the feature maps, from one small forward pass (weights do not change the shape), on the
    layers' device and dtype; each module's mode is put back."""
    modes = [(module, module.training) for module in layers.modules()]
    layers.eval()  # a batch of one would break BatchNorm in train mode
    weight = next(layers.parameters(), torch.zeros(()))
    try:
        with torch.no_grad():
            return int(layers(torch.zeros(1, 3, 64, 64, device=weight.device, dtype=weight.dtype)).shape[1])
    finally:
        for module, training in modes:
            module.training = training


def torchvision_backbone(name: str, weights: Any = None, **model_kwargs: Any) -> Backbone:
    """A torchvision classification model ``name`` cut before its pooling, with ``n_backbone_features``.

    ``weights=None`` (default) initializes randomly and downloads nothing; pass a torchvision weights enum or
    name (e.g. ``"DEFAULT"``) to load pretrained weights.
    """
    from torchvision import models

    family = _backbone_families().get(name)
    if family is None:
        raise BrickError(f"Unknown backbone {name!r}. Valid backbones: {', '.join(backbone_names())}.")
    layers = _FAMILIES[family](models.get_model(name, weights=weights, **model_kwargs))
    if isinstance(layers, Backbone):
        return layers
    return BackboneTorchvision(layers, _count_channels(layers), name)


def backbone_brick(name: str, input_name: str = "normalized", output_name: str = "features", *,
                   weights: Any = None, trainable: bool = True, **model_kwargs: Any) -> BrickModule:
    """A torchvision classification model as a backbone brick: ``input_name`` images -> ``output_name``
    feature maps.  ``brick.model.n_backbone_features`` gives the feature width for a head;
    ``backbone_names()`` lists the valid ``name`` values.  ``trainable=False`` freezes the weights (useful
    with pretrained ``weights``)."""
    model = torchvision_backbone(name, weights=weights, **model_kwargs)
    if trainable:
        return BrickTrainable(model, input_names=[input_name], output_names=[output_name])
    return BrickNotTrainable(model, input_names=[input_name], output_names=[output_name])
