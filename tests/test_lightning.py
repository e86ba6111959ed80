"""BrickLightningModule: each Lightning step runs the compiled stage for that step, sums and logs the losses,
and logs the stage's metrics at epoch end."""

from __future__ import annotations

import functools
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

pl = pytest.importorskip("lightning.pytorch")

from torchmetrics.classification import MulticlassAccuracy  # noqa: E402

from torchbricks_fx import BrickCollection, BrickError, BrickLoss, BrickMetricSingle, BrickTrainable  # noqa: E402
from torchbricks_fx.lightning import BrickLightningModule  # noqa: E402

# Some tests call the steps directly, outside a Trainer, where self.log() warns and does nothing.
pytestmark = pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")

N_FEATURES, N_CLASSES = 4, 3


def blobs(n: int = 96, seed: int = 0) -> TensorDataset:
    """A learnable problem: each class is a gaussian blob around its own center."""
    generator = torch.Generator().manual_seed(seed)
    centers = torch.randn(N_CLASSES, N_FEATURES, generator=generator) * 3
    targets = torch.randint(0, N_CLASSES, (n,), generator=generator)
    points = centers[targets] + 0.3 * torch.randn(n, N_FEATURES, generator=generator)
    return TensorDataset(points, targets)


def head_group() -> dict[str, Any]:
    return {
        "fc": BrickTrainable(nn.Linear(8, N_CLASSES), input_names=["../hidden"], output_names=["./logits"]),
        "loss": BrickLoss(nn.CrossEntropyLoss(), input_names=["./logits", "targets"], output_names=["./loss_ce"]),
        "accuracy": BrickMetricSingle(MulticlassAccuracy(num_classes=N_CLASSES), input_names=["./logits", "targets"],
                                      metric_name="accuracy"),
    }


def make_collection() -> BrickCollection:
    torch.manual_seed(0)
    return BrickCollection({
        "body": BrickTrainable(nn.Sequential(nn.Linear(N_FEATURES, 8), nn.ReLU()), input_names=["raw"],
                               output_names=["hidden"]),
        "a": head_group(),
        "b": head_group(),
    })


class Recorder(pl.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.losses.append(float(outputs["loss"]))


def trainer(**kwargs: Any) -> Any:
    defaults: dict[str, Any] = dict(accelerator="cpu", devices=1, max_epochs=4, logger=False,
                                    enable_checkpointing=False, enable_progress_bar=False,
                                    enable_model_summary=False, num_sanity_val_steps=0)
    return pl.Trainer(**{**defaults, **kwargs})


def sgd() -> Any:
    return functools.partial(torch.optim.SGD, lr=0.2)


def test_losses_decrease_and_are_logged_per_stage() -> None:
    module = BrickLightningModule(make_collection(), sgd())
    recorder = Recorder()
    fit = trainer(callbacks=[recorder])
    loader = DataLoader(blobs(), batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(0))
    fit.fit(module, train_dataloaders=loader, val_dataloaders=DataLoader(blobs(seed=0), batch_size=32))

    first, last = sum(recorder.losses[:6]) / 6, sum(recorder.losses[-6:]) / 6
    assert last < 0.5 * first, recorder.losses
    logged = fit.logged_metrics
    # Both nested heads' losses, resolved to where they sit, plus the total.
    for key in ("train/a/loss_ce_epoch", "train/b/loss_ce_epoch", "train/loss_epoch", "validation/a/loss_ce",
                "validation/loss"):
        assert key in logged, sorted(logged)
    # Metrics per stage and per nested head, after learning the blobs.
    assert float(logged["validation/a/accuracy"]) > 0.9
    assert float(logged["validation/b/accuracy"]) > 0.9
    assert "train/a/accuracy" in logged
    total = float(logged["validation/loss"])
    assert total == pytest.approx(float(logged["validation/a/loss_ce"]) + float(logged["validation/b/loss_ce"]),
                                  rel=1e-4)


def test_test_and_predict_stages() -> None:
    module = BrickLightningModule(make_collection(), sgd())
    runner = trainer(max_epochs=1)
    loader = DataLoader(blobs(32), batch_size=16)
    results = runner.test(module, dataloaders=loader, verbose=False)
    assert {"test/loss", "test/a/accuracy", "test/b/accuracy"} <= set(results[0])

    predictions = runner.predict(module, dataloaders=loader)
    assert predictions is not None and len(predictions) == 2
    first = predictions[0]
    assert isinstance(first, dict)
    assert first["a/logits"].shape == (16, N_CLASSES)
    assert not any("loss" in name for name in first)  # losses are dead in INFERENCE


def test_dict_batches_and_batch_names() -> None:
    module = BrickLightningModule(make_collection(), sgd(), batch_names=("raw", "targets"))
    x, y = blobs(8)[:]
    assert module.named_inputs((x, y)).keys() == {"raw", "targets"}
    assert module.named_inputs({"raw": x}).keys() == {"raw"}
    loss = module.training_step({"raw": x, "targets": y}, 0)
    loss.backward()
    assert module.collection.bricks()["body"].model[0].weight.grad is not None


def test_collection_is_a_registered_submodule() -> None:
    collection = make_collection()
    module = BrickLightningModule(collection, sgd())
    module.training_step(blobs(8)[:], 0)  # builds the TRAIN stage module
    assert {id(p) for p in module.parameters()} == {id(p) for p in collection.parameters()}
    keys = list(module.state_dict())
    assert keys and all(key.startswith("collection.") for key in keys)
    optimizer = module.configure_optimizers()
    assert sum(p.numel() for group in optimizer.param_groups for p in group["params"]) == \
        sum(p.numel() for p in collection.parameters())


def test_stage_modules_run_in_the_stage_mode() -> None:
    collection = BrickCollection({
        "body": BrickTrainable(nn.Sequential(nn.Linear(N_FEATURES, 8), nn.Dropout(0.9)), input_names=["raw"],
                               output_names=["hidden"]),
    })
    module = BrickLightningModule(collection, sgd())
    module.train()  # Lightning's mode; INFERENCE must still run without dropout and without gradients
    x = torch.randn(4, N_FEATURES)
    first, second = module({"raw": x})["hidden"], module({"raw": x})["hidden"]
    assert torch.equal(first, second)
    assert not first.requires_grad


def test_a_stage_without_loss_is_an_error() -> None:
    collection = BrickCollection({"body": BrickTrainable(nn.Linear(N_FEATURES, 2), ["raw"], ["out"])})
    module = BrickLightningModule(collection, sgd())
    with pytest.raises(BrickError, match="No loss in stage train"):
        module.training_step(blobs(4)[:], 0)


def test_bad_batches_are_errors() -> None:
    module = BrickLightningModule(make_collection(), sgd(), batch_names=("raw",))
    with pytest.raises(Exception, match="batch_names"):
        module.named_inputs((torch.zeros(1), torch.zeros(1)))
    with pytest.raises(Exception, match="dicts of named inputs"):
        module.named_inputs(3)


def test_compile_true_trains() -> None:
    torch._dynamo.reset()
    module = BrickLightningModule(make_collection(), sgd(), compile=True)
    x, y = blobs(16)[:]
    optimizer = module.configure_optimizers()
    losses = []
    for _ in range(5):
        optimizer.zero_grad()
        loss = module.training_step((x, y), 0)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]
    eager = BrickLightningModule(module.collection, sgd())
    torch.testing.assert_close(module({"raw": x})["a/logits"], eager({"raw": x})["a/logits"])


def test_checkpoint_round_trip(tmp_path: Any) -> None:
    module = BrickLightningModule(make_collection(), sgd())
    runner = trainer(max_epochs=1, default_root_dir=str(tmp_path))
    runner.fit(module, train_dataloaders=DataLoader(blobs(32), batch_size=16))
    path = tmp_path / "model.ckpt"
    runner.save_checkpoint(str(path))

    fresh = BrickLightningModule(make_collection(), sgd())
    fresh.collection.bricks()["body"].model[0].weight.data.zero_()
    state = torch.load(path, map_location="cpu", weights_only=False)["state_dict"]
    fresh.load_state_dict(state)
    x = blobs(8)[:][0]
    torch.testing.assert_close(fresh({"raw": x})["a/logits"], module({"raw": x})["a/logits"])


def test_stage_modules_are_rebuilt_after_the_collection_changes() -> None:
    module = BrickLightningModule(make_collection(), sgd())
    x = blobs(8)[:][0]
    assert "c/logits" not in module({"raw": x})
    module.collection["c"] = head_group()
    assert "c/logits" in module({"raw": x})


def test_non_scalar_losses_are_an_error() -> None:
    collection = BrickCollection({
        "fc": BrickTrainable(nn.Linear(N_FEATURES, N_CLASSES), ["raw"], ["logits"]),
        "loss": BrickLoss(nn.CrossEntropyLoss(reduction="none"), ["logits", "targets"], ["loss_ce"]),
    })
    with pytest.raises(BrickError, match=r"Losses must be scalars.*'loss_ce': \(8,\)"):
        BrickLightningModule(collection, sgd()).training_step(blobs(8)[:], 0)
