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

from torchmetrics import Metric  # noqa: E402
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix  # noqa: E402

from torchbricks_fx import (  # noqa: E402
    BrickCollection,
    BrickError,
    BrickLoss,
    BrickMetricSingle,
    BrickTrainable,
    Stage,
)
from torchbricks_fx.compiling import CompileOptions  # noqa: E402
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
    for key in ("train/a/loss_ce_epoch", "train/b/loss_ce_epoch", "train/total_loss_epoch", "train/total_loss_step",
                "validation/a/loss_ce", "validation/total_loss"):
        assert key in logged, sorted(logged)
    # Metrics per stage and per nested head, after learning the blobs.
    assert float(logged["validation/a/accuracy"]) > 0.9
    assert float(logged["validation/b/accuracy"]) > 0.9
    assert "train/a/accuracy" in logged
    total = float(logged["validation/total_loss"])
    assert total == pytest.approx(float(logged["validation/a/loss_ce"]) + float(logged["validation/b/loss_ce"]),
                                  rel=1e-4)


def test_test_and_predict_stages() -> None:
    module = BrickLightningModule(make_collection(), sgd())
    runner = trainer(max_epochs=1)
    loader = DataLoader(blobs(32), batch_size=16)
    results = runner.test(module, dataloaders=loader, verbose=False)
    assert {"test/total_loss", "test/a/accuracy", "test/b/accuracy"} <= set(results[0])

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


# ------------------------------------------------------------------------------------------------ logged keys
def test_a_loss_named_loss_does_not_clash_with_the_total() -> None:
    """The total is logged as "<stage>/total_loss", so a loss output named "loss" logs fine."""
    collection = BrickCollection({
        "fc": BrickTrainable(nn.Linear(N_FEATURES, N_CLASSES), ["raw"], ["logits"]),
        "ce": BrickLoss(nn.CrossEntropyLoss(), ["logits", "targets"], ["loss"]),
    })
    fit = trainer(max_epochs=1)
    fit.fit(BrickLightningModule(collection, sgd()), train_dataloaders=DataLoader(blobs(32), batch_size=16),
            val_dataloaders=DataLoader(blobs(16), batch_size=16))
    logged = fit.logged_metrics
    for key in ("train/loss_step", "train/loss_epoch", "train/total_loss_step", "train/total_loss_epoch",
                "validation/loss", "validation/total_loss"):
        assert key in logged, sorted(logged)


def test_a_loss_named_total_loss_is_a_clear_error() -> None:
    collection = BrickCollection({
        "fc": BrickTrainable(nn.Linear(N_FEATURES, N_CLASSES), ["raw"], ["logits"]),
        "ce": BrickLoss(nn.CrossEntropyLoss(), ["logits", "targets"], ["total_loss"]),
    })
    with pytest.raises(BrickError, match=r"named 'total_loss'.*rename"):
        BrickLightningModule(collection, sgd()).training_step(blobs(4)[:], 0)


def test_train_logs_step_values_unsynced_and_epoch_values_synced(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under DDP, sync_dist on a step value all-reduces at every step; only epoch values are synchronized."""
    module = BrickLightningModule(make_collection(), sgd())
    calls: dict[str, dict[str, Any]] = {}
    monkeypatch.setattr(module, "log", lambda name, value, **kwargs: calls.__setitem__(name, kwargs))
    module.training_step(blobs(8)[:], 0)
    for key in ("train/a/loss_ce_step", "train/total_loss_step"):
        assert calls[key]["on_step"] and not calls[key]["on_epoch"] and not calls[key]["sync_dist"], key
    for key in ("train/a/loss_ce_epoch", "train/total_loss_epoch"):
        assert not calls[key]["on_step"] and calls[key]["on_epoch"] and calls[key]["sync_dist"], key
    calls.clear()
    module.validation_step(blobs(8)[:], 0)
    assert set(calls) == {"validation/a/loss_ce", "validation/b/loss_ce", "validation/total_loss"}
    assert all(not kw["on_step"] and kw["on_epoch"] and kw["sync_dist"] for kw in calls.values())


# ------------------------------------------------------------------------------------------------ loss-free stages
def losses_in_train_metrics_in_validation() -> BrickCollection:
    torch.manual_seed(0)
    return BrickCollection({
        "fc": BrickTrainable(nn.Linear(N_FEATURES, N_CLASSES), ["raw"], ["logits"]),
        "loss": BrickLoss(nn.CrossEntropyLoss(), ["logits", "targets"], ["loss_ce"], alive_stages=[Stage.TRAIN]),
        "accuracy": BrickMetricSingle(MulticlassAccuracy(num_classes=N_CLASSES), ["logits", "targets"],
                                      metric_name="accuracy", alive_stages=[Stage.VALIDATION, Stage.TEST]),
    })


def test_validation_and_test_need_no_loss() -> None:
    module = BrickLightningModule(losses_in_train_metrics_in_validation(), sgd())
    assert module.validation_step(blobs(8)[:], 0) is None
    assert module.test_step(blobs(8)[:], 0) is None
    fit = trainer(max_epochs=2)
    fit.fit(module, train_dataloaders=DataLoader(blobs(), batch_size=16),
            val_dataloaders=DataLoader(blobs(32), batch_size=16))
    logged = fit.logged_metrics
    assert "validation/accuracy" in logged and "train/loss_ce_epoch" in logged
    assert not any(key.startswith("validation/") and "loss" in key for key in logged), sorted(logged)
    results = fit.test(module, dataloaders=DataLoader(blobs(32), batch_size=16), verbose=False)
    assert set(results[0]) == {"test/accuracy"}


# ------------------------------------------------------------------------------------------------ stage cache
def test_unrelated_bricks_built_elsewhere_do_not_rebuild_the_stage_modules() -> None:
    module = BrickLightningModule(make_collection(), sgd())
    x, y = blobs(8)[:]
    module.training_step((x, y), 0)
    train_module = module.stage_module(Stage.TRAIN)
    unrelated = BrickCollection({"other": BrickTrainable(nn.Linear(2, 2), ["u"], ["v"])})  # bumps the global version
    unrelated["more"] = BrickTrainable(nn.Linear(2, 2), ["v"], ["w"])
    module.training_step((x, y), 0)
    assert module.stage_module(Stage.TRAIN) is train_module
    assert module.stage_module("train") is train_module  # a stage's name shares the entry
    assert len(module._stage_modules) == 1


def test_swapping_a_bricks_model_rebuilds_the_stage_module() -> None:
    module = BrickLightningModule(make_collection(), sgd())
    x = blobs(8)[:][0]
    before = module({"raw": x})["a/logits"]
    inference_module = module.stage_module(Stage.INFERENCE)
    replacement = nn.Linear(8, N_CLASSES)
    nn.init.zeros_(replacement.weight)
    nn.init.constant_(replacement.bias, 5.0)
    module.collection["a"]["fc"].model = replacement
    after = module({"raw": x})["a/logits"]
    assert module.stage_module(Stage.INFERENCE) is not inference_module
    assert not torch.equal(before, after)
    torch.testing.assert_close(after, torch.full((8, N_CLASSES), 5.0))


# ------------------------------------------------------------------------------------------------ predict outputs
def test_predict_returns_the_selected_outputs() -> None:
    module = BrickLightningModule(make_collection(), sgd(), outputs={"inference": ["a/logits"]})
    predictions = trainer(max_epochs=1).predict(module, dataloaders=DataLoader(blobs(32), batch_size=16))
    assert predictions is not None and len(predictions) == 2
    assert all(set(prediction) == {"a/logits"} for prediction in predictions)
    assert predictions[0]["a/logits"].shape == (16, N_CLASSES)
    # Other stages keep every value.
    assert "b/logits" in module.stage_module(Stage.TRAIN)({"raw": blobs(4)[:][0], "targets": blobs(4)[:][1]})


def test_outputs_with_an_unknown_stage_name_is_an_error() -> None:
    with pytest.raises(BrickError, match="Unknown stage 'inferenc'"):
        BrickLightningModule(make_collection(), sgd(), outputs={"inferenc": ["a/logits"]})


# ------------------------------------------------------------------------------------------------ metric values
class Constant(Metric):
    """A metric whose result is a fixed value (a matrix, a dict, ...)."""

    def __init__(self, value: Any) -> None:
        super().__init__()
        self.value = value
        self.add_state("count", default=torch.tensor(0), dist_reduce_fx="sum")

    def update(self, *args: Any) -> None:
        self.count += 1

    def compute(self) -> Any:
        return self.value


def test_metrics_log_0d_and_1d_tensors_and_warn_once_for_others() -> None:
    collection = BrickCollection({
        "fc": BrickTrainable(nn.Linear(N_FEATURES, N_CLASSES), ["raw"], ["logits"]),
        "loss": BrickLoss(nn.CrossEntropyLoss(), ["logits", "targets"], ["loss_ce"]),
        "per_class": BrickMetricSingle(MulticlassAccuracy(num_classes=N_CLASSES, average="none"),
                                       ["logits", "targets"], metric_name="per_class"),
        "confusion": BrickMetricSingle(MulticlassConfusionMatrix(num_classes=N_CLASSES), ["logits", "targets"],
                                       metric_name="confusion"),
        "label": BrickMetricSingle(Constant("a string"), ["logits"], metric_name="label"),
    })
    fit = trainer(max_epochs=2)
    with pytest.warns(UserWarning) as record:
        fit.fit(BrickLightningModule(collection, sgd()), train_dataloaders=DataLoader(blobs(32), batch_size=16),
                val_dataloaders=DataLoader(blobs(16), batch_size=16))
    logged = fit.logged_metrics
    assert {f"validation/per_class/{i}" for i in range(N_CLASSES)} <= set(logged)
    assert not any("confusion" in key or "label" in key for key in logged), sorted(logged)
    messages = [str(w.message) for w in record if "is not logged" in str(w.message)]
    assert len([m for m in messages if "confusion" in m]) == 1, messages  # once, over stages and epochs
    assert len([m for m in messages if "label" in m]) == 1, messages
    assert any(f"shape ({N_CLASSES}, {N_CLASSES})" in m for m in messages)
    assert any("a str" in m for m in messages)


def test_autocast_options_compile_the_eval_stages_and_leave_training_in_float32() -> None:
    torch._dynamo.reset()
    options = CompileOptions(autocast=torch.bfloat16)
    module = BrickLightningModule(make_collection(), sgd(), compile=options)
    x, y = blobs(16)[:]
    loss = module.training_step((x, y), 0)  # TRAIN refuses autocast: the module leaves it out there
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert module({"raw": x})["a/logits"].dtype == torch.float32  # the eval stage, verified in bfloat16


def test_several_validation_and_test_dataloaders() -> None:
    module = BrickLightningModule(make_collection(), sgd())
    runner = trainer(max_epochs=1)
    loaders = [DataLoader(blobs(32, seed=seed), batch_size=16) for seed in (1, 2)]
    runner.fit(module, train_dataloaders=DataLoader(blobs(), batch_size=16), val_dataloaders=loaders)
    logged = runner.logged_metrics
    assert {"validation/total_loss/dataloader_idx_0", "validation/total_loss/dataloader_idx_1"} <= set(logged)
    results = runner.test(module, dataloaders=loaders, verbose=False)
    assert len(results) == 2 and all("test/a/accuracy" in result for result in results)
