"""Reusable bricks: preprocessors, torchvision backbones, task heads and ready-made collections.

torchvision and torchmetrics are imported only when a backbone or a ready-made collection is built.
"""

from __future__ import annotations

from torchbricks_fx.bag_of_bricks.backbones import (
    Backbone,
    BackboneResnet,
    BackboneTorchvision,
    backbone_brick,
    backbone_names,
    resnet_to_brick,
    torchvision_backbone,
)
from torchbricks_fx.bag_of_bricks.heads import ImageClassifier, SegmentationHead
from torchbricks_fx.bag_of_bricks.preprocessors import IMAGENET_MEAN, IMAGENET_STD, Preprocessor
from torchbricks_fx.bag_of_bricks.tasks import (
    classification_head_bricks,
    image_classification_bricks,
    segmentation_bricks,
    segmentation_head_bricks,
)

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "Backbone",
    "BackboneResnet",
    "BackboneTorchvision",
    "ImageClassifier",
    "Preprocessor",
    "SegmentationHead",
    "backbone_brick",
    "backbone_names",
    "classification_head_bricks",
    "image_classification_bricks",
    "resnet_to_brick",
    "segmentation_bricks",
    "segmentation_head_bricks",
    "torchvision_backbone",
]
