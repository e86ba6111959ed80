"""Real data end to end: scikit-learn's handwritten digits (1,797 8x8 images shipped inside scikit-learn, no
download), split train / validation / test, a small convolutional collection trained with Lightning, then
deployed: the fastest artifact that the collection's own metrics accept on the validation split.

    python examples/digits.py                       # train (a few seconds), test, deploy, print the table
    python examples/digits.py --out digits_bundle --batch-sizes 1,32 --max-metric-drop 0.01

The same from the command line (``build()`` trains the model, ``validation()`` returns the validation batches):

    torchbricks-fx deploy examples/digits.py --validation examples/digits.py:validation -o digits_bundle

Needs the ``examples`` extra: ``pip install -e ".[examples]"`` (scikit-learn, Lightning, matplotlib).
"""

from __future__ import annotations

import argparse
import functools
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchmetrics import Metric
from torchmetrics.classification import MulticlassAccuracy

from torchbricks_fx import BrickCollection, BrickLoss, BrickMetrics, BrickNotTrainable, BrickTrainable

NUM_CLASSES = 10
BATCH_SIZE = 32
EPOCHS = 6
OUTPUTS = ["logits", "probabilities", "class_prediction"]


# --------------------------------------------------------------------------------------------- data
@dataclass(frozen=True)
class Split:
    images: torch.Tensor  # [N, 1, 8, 8] float32, pixel values 0..16 as scikit-learn ships them
    targets: torch.Tensor  # [N] int64 class ids

    def batches(self, batch_size: int = BATCH_SIZE) -> list[dict[str, torch.Tensor]]:
        """Named-input batches, targets included (what ``deploy`` feeds to the model and to its metrics)."""
        return [{"raw": self.images[start:start + batch_size], "targets": self.targets[start:start + batch_size]}
                for start in range(0, len(self.targets), batch_size)]


@functools.cache
def splits(seed: int = 0) -> dict[str, Split]:
    """60 % train, 20 % validation, 20 % test, stratified by class."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1)
    targets = torch.tensor(digits.target, dtype=torch.int64)
    index = list(range(len(targets)))
    train, rest = train_test_split(index, test_size=0.4, random_state=seed, stratify=digits.target)
    validation, test = train_test_split(rest, test_size=0.5, random_state=seed, stratify=digits.target[rest])
    return {name: Split(images[part], targets[part])
            for name, part in (("train", train), ("validation", validation), ("test", test))}


# --------------------------------------------------------------------------------------------- model
class Scale(nn.Module):
    """Pixel values 0..16 to 0..1."""

    def forward(self, raw: torch.Tensor) -> torch.Tensor:
        return raw / 16.0


class Backbone(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.layers(image)


class Head(nn.Module):
    def __init__(self, n_features: int = 64) -> None:
        super().__init__()
        self.fc = nn.Linear(n_features, NUM_CLASSES)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits = self.fc(features)
        return logits, logits.softmax(dim=1), logits.argmax(dim=1)


class MeanCrossEntropy(Metric):
    """The validation loss as a metric (lower is better): it moves with every change of the logits, where
    accuracy moves only when a prediction flips."""

    higher_is_better = False
    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.int64), dist_reduce_fx="sum")

    def update(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        losses = nn.functional.cross_entropy(logits.detach().double(), targets, reduction="sum")
        self.total += losses
        self.count += targets.numel()

    def compute(self) -> torch.Tensor:
        return (self.total / self.count).float()


def make_collection() -> BrickCollection:
    """Preprocessor, backbone, head, loss and metrics (accuracy and the mean cross-entropy)."""
    return BrickCollection({
        "preprocessor": BrickNotTrainable(Scale(), input_names=["raw"], output_names=["image"]),
        "backbone": BrickTrainable(Backbone(), input_names=["image"], output_names=["features"]),
        "head": BrickTrainable(Head(), input_names=["features"], output_names=OUTPUTS),
        "loss": BrickLoss(nn.CrossEntropyLoss(), input_names=["logits", "targets"], output_names=["loss_ce"]),
        "metrics": BrickMetrics({"accuracy": MulticlassAccuracy(num_classes=NUM_CLASSES, average="micro"),
                                 "cross_entropy": MeanCrossEntropy()}, input_names=["logits", "targets"]),
    })


def train(collection: BrickCollection, epochs: int = EPOCHS, seed: int = 0) -> dict[str, float]:
    """Trains with ``BrickLightningModule`` on the train split; returns the test split's metrics."""
    import lightning.pytorch as pl

    pl.seed_everything(seed, verbose=False)
    data = splits()
    # A model this small trains fastest on one thread: with more, they mostly wait on each other (and on a busy
    # machine training took 25x longer with two threads than with one).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _fit_and_test(collection, data, epochs)
    finally:
        torch.set_num_threads(threads)


def _fit_and_test(collection: BrickCollection, data: dict[str, Split], epochs: int) -> dict[str, float]:
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader, TensorDataset

    from torchbricks_fx.lightning import BrickLightningModule

    module = BrickLightningModule(collection, functools.partial(torch.optim.AdamW, lr=3e-3))
    trainer = pl.Trainer(accelerator="cpu", max_epochs=epochs, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    # Tuples map to batch_names ("raw", "targets").
    train_loader = DataLoader(TensorDataset(data["train"].images, data["train"].targets), batch_size=BATCH_SIZE,
                              shuffle=True)
    trainer.fit(module, train_dataloaders=train_loader)
    test_loader = DataLoader(TensorDataset(data["test"].images, data["test"].targets), batch_size=256)
    results = trainer.test(module, dataloaders=test_loader, verbose=False)[0]
    return {name: float(value) for name, value in results.items()}


# --------------------------------------------------------------------------------------------- CLI entry points
@functools.cache
def trained(epochs: int = EPOCHS) -> tuple[BrickCollection, dict[str, float]]:
    torch.manual_seed(0)
    collection = make_collection()
    return collection, train(collection, epochs=epochs)


def build() -> tuple[BrickCollection, dict[str, torch.Tensor]]:
    """``torchbricks-fx`` build function: the trained collection and an example batch (trains on first call)."""
    collection, _ = trained()
    return collection, {"raw": splits()["validation"].images[:2]}


def validation() -> list[dict[str, torch.Tensor]]:
    """``torchbricks-fx deploy --validation``: the validation split as named-input batches with targets."""
    return splits()["validation"].batches()


def main() -> None:
    from torchbricks_fx import deploy, load_bundle

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    parser.add_argument("--out", default=None, help="bundle folder (default: a temporary folder)")
    parser.add_argument("--batch-sizes", default="1,32")
    parser.add_argument("--max-metric-drop", type=float, default=0.01)
    parser.add_argument("--min-run-time", type=float, default=1.0)
    args = parser.parse_args()

    collection, test_metrics = trained(args.epochs)
    print("test metrics:", {name: round(value, 4) for name, value in test_metrics.items()})
    folder = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="torchbricks_fx_digits_")) / "bundle"
    report = deploy(collection, folder, {"raw": splits()["validation"].images[:2]}, outputs=OUTPUTS,
                    validation=validation(), max_metric_drop=args.max_metric_drop,
                    batch_sizes=[int(size) for size in args.batch_sizes.split(",")], min_run_time=args.min_run_time,
                    overwrite=True, progress=lambda line: print(f"[deploy] {line}"))
    print(report.to_markdown())

    bundle = load_bundle(folder)  # onnxruntime and numpy only for ONNX bundles
    test = splits()["test"]
    predictions: Any = bundle({"raw": test.images.numpy()})["class_prediction"]
    accuracy = float((predictions == test.targets.numpy()).mean())
    print(f"bundle {folder} ({bundle.candidate}): test accuracy {accuracy:.4f}")


if __name__ == "__main__":
    main()
