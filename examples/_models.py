"""What the examples share: a small multi-task model from the bag of bricks and synthetic data.

Nothing is downloaded: backbones start from random weights and the images come from
``torchvision.datasets.FakeData``.

The demos check the plumbing (stages, shapes, losses, metrics, export, DDP), not what the model learns:
FakeData's labels are random, and at ``IMAGE_SIZE`` 32 resnet18's layer4 map is 1x1, so the segmentation
head's upsampled logits are constant over each image (one class per image).  Real segmentation needs
larger images (224 gives a 7x7 map) and real data.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from torchbricks_fx import BrickCollection, BrickNotTrainable
from torchbricks_fx.bag_of_bricks import (
    Preprocessor,
    backbone_brick,
    classification_head_bricks,
    segmentation_head_bricks,
)

NUM_CLASSES = 10
NUM_SEGMENT_CLASSES = 3
IMAGE_SIZE = 32  # small enough for every example to run in well under a minute on a 2-core CPU


def multitask_bricks(backbone: str = "resnet18") -> BrickCollection:
    """One preprocessor and backbone shared by two heads, each a group nested under its own key: the heads'
    values are ``classify/...`` and ``segment/...``; both read the backbone's ``../features``."""
    backbone_ = backbone_brick(backbone, input_name="normalized", output_name="features")
    n_features = backbone_.model.n_backbone_features
    return BrickCollection({
        "preprocessor": BrickNotTrainable(Preprocessor(), input_names=["raw"], output_names=["normalized"]),
        "backbone": backbone_,
        "classify": classification_head_bricks(NUM_CLASSES, n_features, features_name="../features",
                                               target_name="targets"),
        "segment": segmentation_head_bricks(NUM_SEGMENT_CLASSES, n_features, features_name="../features",
                                            image_name="../normalized", target_name="masks"),
    })


class FakeImagesWithMasks(Dataset):
    """``FakeData`` images with their (random) class label and a per-pixel mask (the brightest color
    channel).  Items are dicts of named inputs.  The data only exercise the pipeline; see the module
    docstring for why the demo model cannot learn them."""

    def __init__(self, size: int = 64, image_size: int = IMAGE_SIZE, seed: int = 0) -> None:
        from torchvision.datasets import FakeData
        from torchvision.transforms import ToTensor

        self.images = FakeData(size=size, image_size=(3, image_size, image_size), num_classes=NUM_CLASSES,
                               transform=ToTensor(), random_offset=seed * 10_000)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict[str, Any]:
        image, label = self.images[index]
        return {"raw": image, "targets": torch.tensor(label), "masks": image.argmax(dim=0)}


def loader(size: int = 64, batch_size: int = 8, seed: int = 0, shuffle: bool = False) -> DataLoader:
    return DataLoader(FakeImagesWithMasks(size=size, seed=seed), batch_size=batch_size, shuffle=shuffle)


def example_batch(batch_size: int = 4) -> dict[str, torch.Tensor]:
    return next(iter(loader(size=batch_size, batch_size=batch_size)))
