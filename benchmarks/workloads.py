"""Benchmark workloads: each is a brick collection plus an equivalent hand-written ``nn.Module`` that
shares its weights, the example inputs, and the outputs compared.

``hand_written(*[named_inputs[n] for n in workload.input_names])`` returns the tuple of ``outputs``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from torchbricks_fx import BrickCollection, BrickLoss, BrickNotTrainable, BrickTrainable, Stage


@dataclass(frozen=True)
class Workload:
    name: str
    description: str
    collection: BrickCollection
    hand_written: nn.Module
    named_inputs: dict[str, torch.Tensor]
    outputs: tuple[str, ...]
    stage: Stage = Stage.INFERENCE
    input_names: tuple[str, ...] = field(default=("raw",))


# ------------------------------------------------------------------------------------- 3-brick image
class Halve(nn.Module):
    def forward(self, raw: torch.Tensor) -> torch.Tensor:
        return raw / 2


class TinyModel(nn.Module):
    def __init__(self, n_channels: int = 3, n_features: int = 10) -> None:
        super().__init__()
        self.conv = nn.Conv2d(n_channels, n_features, kernel_size=1)

    def forward(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.conv(tensor)


class Classifier(nn.Module):
    def __init__(self, num_classes: int = 3, in_features: int = 10) -> None:
        super().__init__()
        self.fc = nn.Linear(in_features, num_classes)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.softmax = nn.Softmax(dim=1)

    def forward(self, tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.fc(torch.flatten(self.avgpool(tensor), start_dim=1))
        return logits, self.softmax(logits)


class HandWrittenImage3(nn.Module):
    def __init__(self, preprocessor: nn.Module, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.preprocessor, self.backbone, self.head = preprocessor, backbone, head

    def forward(self, raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.head(self.backbone(self.preprocessor(raw)))


def image3(batch_size: int = 2) -> Workload:
    bricks = {
        "preprocessor": BrickNotTrainable(Halve(), input_names=["raw"], output_names=["processed"]),
        "backbone": BrickTrainable(TinyModel(), input_names=["processed"], output_names=["embedding"]),
        "head": BrickTrainable(Classifier(), input_names=["embedding"], output_names=["logits", "softmaxed"]),
        "loss": BrickLoss(nn.CrossEntropyLoss(), input_names=["logits", "targets"], output_names=["loss_ce"]),
    }
    collection = BrickCollection(bricks)
    hand = HandWrittenImage3(*(collection[k].model for k in ("preprocessor", "backbone", "head")))
    return Workload("image3", "3-brick image model (seed README), 3x32x32", collection, hand.eval(),
                    {"raw": torch.rand(batch_size, 3, 32, 32)}, ("logits", "softmaxed"))


# ------------------------------------------------------------------------------------- 50-brick chain
class HandWrittenChain(nn.Module):
    def __init__(self, layers: Sequence[nn.Module]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor]:
        for layer in self.layers:
            x = layer(x)
        return (x,)


def chain(n_bricks: int = 50, batch_size: int = 8, width: int = 16) -> Workload:
    bricks = {f"linear_{i}": BrickTrainable(nn.Linear(width, width), input_names=[f"x{i}"],
                                            output_names=[f"x{i + 1}"]) for i in range(n_bricks)}
    collection = BrickCollection(bricks)
    hand = HandWrittenChain([collection[f"linear_{i}"].model for i in range(n_bricks)])
    return Workload(f"chain{n_bricks}", f"{n_bricks}-brick chain of nn.Linear({width}, {width}), batch {batch_size}",
                    collection, hand.eval(), {"x0": torch.randn(batch_size, width)}, (f"x{n_bricks}",),
                    input_names=("x0",))


# ------------------------------------------------------------------------------------- ResNet-18
class HandWrittenClassifier(nn.Module):
    def __init__(self, preprocessor: nn.Module, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.preprocessor, self.backbone, self.head = preprocessor, backbone, head

    def forward(self, raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.head(self.backbone(self.preprocessor(raw)))


def resnet18(batch_size: int = 2, image_size: int = 64, num_classes: int = 10) -> Workload:
    import torchvision
    from torchmetrics.classification import MulticlassAccuracy

    from torchbricks_fx import BrickMetricSingle
    from torchbricks_fx.bag_of_bricks import ImageClassifier, Preprocessor, resnet_to_brick

    resnet_brick = resnet_to_brick(resnet=torchvision.models.resnet18(weights=None, num_classes=num_classes),
                                   input_name="normalized", output_name="features")
    bricks = {
        "preprocessor": BrickNotTrainable(Preprocessor(), input_names=["raw"], output_names=["normalized"]),
        "backbone": resnet_brick,
        "head": BrickTrainable(ImageClassifier(num_classes=num_classes,
                                               n_features=resnet_brick.model.n_backbone_features),
                               input_names=["features"], output_names=["logits", "probabilities", "class_prediction"]),
        "accuracy": BrickMetricSingle(MulticlassAccuracy(num_classes=num_classes),
                                      input_names=["class_prediction", "targets"]),
        "loss": BrickLoss(nn.CrossEntropyLoss(), input_names=["logits", "targets"], output_names=["loss_ce"]),
    }
    collection = BrickCollection(bricks)
    hand = HandWrittenClassifier(*(collection[k].model for k in ("preprocessor", "backbone", "head")))
    return Workload("resnet18", f"ResNet-18 classifier (seed README), 3x{image_size}x{image_size}", collection,
                    hand.eval(), {"raw": torch.rand(batch_size, 3, image_size, image_size)},
                    ("logits", "probabilities", "class_prediction"))


# ------------------------------------------------------------------------------------- multi-task
class ConvBackbone(nn.Module):
    def __init__(self, channels: int = 32) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU(),
                                  nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU())

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.body(image)


class SegmentationHead(nn.Module):
    def __init__(self, channels: int = 32, num_classes: int = 4) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, num_classes, 1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.conv(features)


class HandWrittenMultiTask(nn.Module):
    def __init__(self, preprocessor: nn.Module, backbone: nn.Module, classifier: nn.Module,
                 segmenter: nn.Module) -> None:
        super().__init__()
        self.preprocessor, self.backbone = preprocessor, backbone
        self.classifier, self.segmenter = classifier, segmenter

    def forward(self, raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        features = self.backbone(self.preprocessor(raw))
        logits, probabilities = self.classifier(features)
        return logits, probabilities, self.segmenter(features)


def multitask(batch_size: int = 2, image_size: int = 64) -> Workload:
    bricks = {
        "preprocessor": BrickNotTrainable(Halve(), input_names=["raw"], output_names=["image"]),
        "backbone": BrickTrainable(ConvBackbone(), input_names=["image"], output_names=["features"]),
        "heads": {
            "classifier": BrickTrainable(Classifier(num_classes=5, in_features=32), input_names=["features"],
                                         output_names=["logits", "probabilities"]),
            "segmenter": BrickTrainable(SegmentationHead(), input_names=["features"], output_names=["seg"]),
        },
        "losses": {
            "classification": BrickLoss(nn.CrossEntropyLoss(), input_names=["logits", "labels"],
                                        output_names=["loss_classification"]),
            "segmentation": BrickLoss(nn.CrossEntropyLoss(), input_names=["seg", "masks"],
                                      output_names=["loss_segmentation"]),
        },
    }
    collection = BrickCollection(bricks)
    hand = HandWrittenMultiTask(collection["preprocessor"].model, collection["backbone"].model,
                                collection["heads"]["classifier"].model, collection["heads"]["segmenter"].model)
    description = f"shared backbone + classification and segmentation heads, 3x{image_size}x{image_size}"
    return Workload("multitask", description,
                    collection, hand.eval(), {"raw": torch.rand(batch_size, 3, image_size, image_size)},
                    ("logits", "probabilities", "seg"))


WORKLOADS: dict[str, Callable[[], Workload]] = {
    "image3": image3, "chain50": chain, "resnet18": resnet18, "multitask": multitask,
}


def build_workloads(names: Sequence[str] | None = None) -> list[Workload]:
    torch.manual_seed(0)
    return [WORKLOADS[name]() for name in (names or WORKLOADS)]
