"""Reusable bricks: preprocessors, torchvision backbones, task heads and ready-made collections.

Importing this package imports torchvision (the core package does not).
"""

from __future__ import annotations

from torchbricks_fx.bag_of_bricks.backbones import BackboneResnet, resnet_to_brick
from torchbricks_fx.bag_of_bricks.heads import ImageClassifier, SegmentationHead
from torchbricks_fx.bag_of_bricks.preprocessors import IMAGENET_MEAN, IMAGENET_STD, Preprocessor

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "BackboneResnet",
    "ImageClassifier",
    "Preprocessor",
    "SegmentationHead",
    "resnet_to_brick",
]
