"""Ready-made collections: image classification and semantic segmentation, with losses and metrics.

Every value a group produces is named relatively (``"./logits"``), so a group can be nested under any key
of a parent collection: nested under ``"cls"`` its logits are ``"cls/logits"``, at the root plain
``"logits"``.  External inputs (images, targets) are plain names, shared by every group.

A group reads the values it does not produce by the names you pass: nested next to a shared backbone and
preprocessor, pass ``features_name="../features"`` and, for ``segmentation_head_bricks``,
``image_name="../normalized"`` (its default ``"./normalized"`` names a value of its own group).

Losses are alive in TRAIN, VALIDATION and TEST, so ``BrickLightningModule`` logs them in every stage;
metrics are summarized per group (``"cls/accuracy"``).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from torchbricks_fx.bag_of_bricks.backbones import torchvision_backbone
from torchbricks_fx.bag_of_bricks.heads import ImageClassifier, SegmentationHead
from torchbricks_fx.bag_of_bricks.preprocessors import Preprocessor
from torchbricks_fx.bricks import BrickLoss, BrickMetrics, BrickNotTrainable, BrickTrainable
from torchbricks_fx.collection import BrickCollection

__all__ = [
    "classification_head_bricks",
    "image_classification_bricks",
    "segmentation_bricks",
    "segmentation_head_bricks",
]


def _backbone_bricks(backbone: str, weights: Any, input_name: str, uint8_input: bool,
                     trainable_backbone: bool) -> tuple[dict[str, Any], int]:
    model = torchvision_backbone(backbone, weights=weights)
    brick_class = BrickTrainable if trainable_backbone else BrickNotTrainable
    bricks = {
        "preprocessor": BrickNotTrainable(Preprocessor(uint8_input=uint8_input), input_names=[input_name],
                                          output_names=["./normalized"]),
        "backbone": brick_class(model, input_names=["./normalized"], output_names=["./features"]),
    }
    return bricks, model.n_backbone_features


def classification_head_bricks(num_classes: int, n_features: int, features_name: str = "./features",
                               target_name: str = "targets") -> dict[str, Any]:
    """Classifier head, cross-entropy loss and metrics as a group of bricks.

    Metrics: ``accuracy`` (the fraction of samples classified correctly, i.e. micro-averaged) and ``f1``
    (macro-averaged over classes).  Produces ``./logits``, ``./probabilities``, ``./class_prediction`` and
    the loss ``./loss_ce``.  Nest it under a key next to a backbone with ``features_name="../features"``.
    """
    from torchmetrics import MetricCollection
    from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

    # "accuracy" means correct / total; MulticlassAccuracy's default (macro) is the mean per-class recall.
    metrics = MetricCollection({"accuracy": MulticlassAccuracy(num_classes=num_classes, average="micro"),
                                "f1": MulticlassF1Score(num_classes=num_classes)})
    return {
        "head": BrickTrainable(ImageClassifier(num_classes=num_classes, n_features=n_features),
                               input_names=[features_name],
                               output_names=["./logits", "./probabilities", "./class_prediction"]),
        "loss": BrickLoss(nn.CrossEntropyLoss(), input_names=["./logits", target_name], output_names=["./loss_ce"]),
        "metrics": BrickMetrics(metrics, input_names=["./class_prediction", target_name]),
    }


def segmentation_head_bricks(num_classes: int, n_features: int, features_name: str = "./features",
                             image_name: str = "./normalized", target_name: str = "masks",
                             ignore_index: int = -100) -> dict[str, Any]:
    """Segmentation head (1x1 conv, upsampled to the image size), pixel cross-entropy loss and metrics
    (mean IoU, pixel accuracy) as a group of bricks.

    Targets are ``(N, H, W)`` integer class maps; pixels equal to ``ignore_index`` count neither in the loss
    nor in the metrics.  Produces ``./logits`` ``(N, num_classes, H, W)``, ``./class_prediction``
    ``(N, H, W)`` and the loss ``./loss_segmentation``.  The head reads the image (for its size) from
    ``image_name``: nested under a key next to a shared preprocessor, pass ``image_name="../normalized"``
    (and ``features_name="../features"``).
    """
    from torchmetrics import MetricCollection
    from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex

    metrics = MetricCollection({
        "jaccard": MulticlassJaccardIndex(num_classes=num_classes, ignore_index=ignore_index),
        "pixel_accuracy": MulticlassAccuracy(num_classes=num_classes, average="micro", ignore_index=ignore_index),
    })
    return {
        "head": BrickTrainable(SegmentationHead(num_classes=num_classes, n_features=n_features),
                               input_names=[features_name, image_name],
                               output_names=["./logits", "./class_prediction"]),
        "loss": BrickLoss(nn.CrossEntropyLoss(ignore_index=ignore_index), input_names=["./logits", target_name],
                          output_names=["./loss_segmentation"]),
        "metrics": BrickMetrics(metrics, input_names=["./class_prediction", target_name]),
    }


def image_classification_bricks(num_classes: int, backbone: str = "resnet18", *, weights: Any = None,
                                input_name: str = "raw", target_name: str = "targets", uint8_input: bool = False,
                                trainable_backbone: bool = True) -> BrickCollection:
    """Preprocessor, torchvision backbone, classifier head, cross-entropy loss and metrics.

    Inputs: ``input_name`` images ``(N, 3, H, W)`` (float in [0, 1], or uint8 with ``uint8_input=True``) and,
    in TRAIN/VALIDATION/TEST, ``target_name`` class indices ``(N,)``.  ``weights=None`` downloads nothing.
    """
    bricks, n_features = _backbone_bricks(backbone, weights, input_name, uint8_input, trainable_backbone)
    bricks.update(classification_head_bricks(num_classes, n_features, target_name=target_name))
    return BrickCollection(bricks)


def segmentation_bricks(num_classes: int, backbone: str = "resnet18", *, weights: Any = None,
                        input_name: str = "raw", target_name: str = "masks", uint8_input: bool = False,
                        trainable_backbone: bool = True, ignore_index: int = -100) -> BrickCollection:
    """Preprocessor, torchvision backbone, segmentation head, pixel cross-entropy loss and metrics.

    Inputs: ``input_name`` images ``(N, 3, H, W)`` and, in TRAIN/VALIDATION/TEST, ``target_name`` class maps
    ``(N, H, W)``.  Logits come back at the input's size.  ``weights=None`` downloads nothing.
    """
    bricks, n_features = _backbone_bricks(backbone, weights, input_name, uint8_input, trainable_backbone)
    bricks.update(segmentation_head_bricks(num_classes, n_features, target_name=target_name,
                                           ignore_index=ignore_index))
    return BrickCollection(bricks)
