"""Eager BrickCollection: bindings, stages and modes, losses, metrics, dict behaviour, weights on disk."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import Classifier
from torch import nn

from torchbricks_fx import (
    BrickCollection,
    BrickError,
    BrickGraphError,
    BrickMetrics,
    BrickMetricSingle,
    BrickNotTrainable,
    BrickOutputError,
    BrickTrainable,
    Stage,
)
from torchbricks_fx.bricks import BrickInterface


class AddMul(nn.Module):
    def forward(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return a + b, a * b


class Sub(nn.Module):
    def forward(self, minuend: torch.Tensor, subtrahend: torch.Tensor) -> torch.Tensor:
        return minuend - subtrahend


class Everything(nn.Module):
    def forward(self, values: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.stack(list(values.values())).sum(dim=0)


class StageAware(nn.Module):
    def forward(self, x: torch.Tensor, stage: Stage) -> torch.Tensor:
        return x * 10 if stage is Stage.TRAIN else x


def test_positional_keyword_all_and_stage_bindings():
    collection = BrickCollection({
        "add_mul": BrickTrainable(AddMul(), input_names=["a", "b"], output_names=["sum", "product"]),
        # keyword binding is {argument: value name}
        "sub": BrickTrainable(Sub(), input_names={"subtrahend": "a", "minuend": "sum"}, output_names=["diff"]),
        "all": BrickTrainable(Everything(), input_names="all", output_names=["total"]),
        "staged": BrickTrainable(StageAware(), input_names=["a", "stage"], output_names=["scaled"]),
    })
    a, b = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0])
    out = collection({"a": a, "b": b}, Stage.INFERENCE)
    assert torch.equal(out["diff"], b)
    assert torch.equal(out["total"], a + b + (a + b) + a * b + b)
    assert torch.equal(out["scaled"], a)
    assert torch.equal(collection({"a": a, "b": b}, Stage.TRAIN)["scaled"], a * 10)
    assert "stage" not in out


def test_seed_outputs_keys_and_return_inputs(multitask, multitask_inputs):
    out = multitask(named_inputs=multitask_inputs, stage=Stage.TRAIN)
    assert list(out) == ["raw", "labels", "masks", "image", "features", "logits", "prediction", "seg",
                         "loss_cls", "loss_seg"]
    without = multitask(named_inputs=multitask_inputs, stage=Stage.TRAIN, return_inputs=False)
    assert "raw" not in without and "seg" in without
    assert multitask_inputs.keys() == {"raw", "labels", "masks"}  # the caller's dict is untouched


def test_stage_modes_are_applied_and_restored(multitask, multitask_inputs):
    multitask.train()
    out = multitask(multitask_inputs, Stage.INFERENCE)
    assert not out["features"].requires_grad
    assert all(m.training for m in multitask.modules())  # the caller's modes are back
    # BatchNorm in eval mode uses running stats: inference is batch-independent.
    single = multitask({"raw": multitask_inputs["raw"][:1]}, Stage.INFERENCE)["logits"]
    torch.testing.assert_close(single, out["logits"][:1])

    multitask.eval()
    running_mean = multitask["backbone"].model.bn.running_mean.clone()
    train_out = multitask(multitask_inputs, Stage.TRAIN)
    assert train_out["loss_cls"].requires_grad
    assert not torch.equal(running_mean, multitask["backbone"].model.bn.running_mean)  # train-mode BN
    assert all(m.training for m in multitask["backbone"].model.modules())  # TRAIN leaves train mode (test_runtime)


def test_dropout_is_off_outside_train():
    collection = BrickCollection({"drop": BrickTrainable(nn.Dropout(0.5), input_names=["x"], output_names=["y"])})
    x = torch.ones(1000)
    for stage in (Stage.VALIDATION, Stage.TEST, Stage.INFERENCE, Stage.EXPORT):
        assert torch.equal(collection({"x": x}, stage)["y"], x)
    assert not torch.equal(collection({"x": x}, Stage.TRAIN)["y"], x)


def test_not_trainable_freezes_and_calculate_gradients_false_blocks_gradients():
    torch.manual_seed(0)
    first = nn.Linear(3, 3)

    def build(calculate_gradients: bool) -> BrickCollection:
        return BrickCollection({
            "first": BrickTrainable(first, input_names=["x"], output_names=["h"]),
            "frozen": BrickNotTrainable(nn.Linear(3, 3), input_names=["h"], output_names=["y"],
                                        calculate_gradients=calculate_gradients),
        })

    flowing = build(calculate_gradients=True)
    assert not any(p.requires_grad for p in flowing["frozen"].parameters())
    flowing({"x": torch.randn(2, 3)}, Stage.TRAIN)["y"].sum().backward()
    assert first.weight.grad is not None

    first.weight.grad = None
    blocked = build(calculate_gradients=False)
    y = blocked({"x": torch.randn(2, 3)}, Stage.TRAIN)["y"]
    assert not y.requires_grad  # really ran without recording gradients
    assert first.weight.grad is None


def test_extract_losses_and_summarize(multitask, multitask_inputs):
    for _ in range(2):
        out = multitask(multitask_inputs, Stage.TRAIN)
    losses = multitask.extract_losses(out)
    assert set(losses) == {"loss_cls", "loss_seg"}
    from torchmetrics.functional.classification import multiclass_accuracy

    expected = multiclass_accuracy(out["prediction"], multitask_inputs["labels"], num_classes=3)
    summary = multitask.summarize(Stage.TRAIN, reset=True)
    assert set(summary) == {"MulticlassAccuracy"}
    torch.testing.assert_close(summary["MulticlassAccuracy"], expected, check_dtype=False)
    assert multitask.summarize(Stage.INFERENCE) == {}


def test_metrics_are_per_stage_and_can_be_returned():
    from torchmetrics import MetricCollection
    from torchmetrics.classification import MulticlassAccuracy, MulticlassPrecision

    brick = BrickMetrics(MetricCollection({"acc": MulticlassAccuracy(num_classes=2, average="micro"),
                                           "prec": MulticlassPrecision(num_classes=2)}),
                         input_names=["pred", "target"], return_metrics=True)
    assert set(brick.metrics) == {"TRAIN", "VALIDATION", "TEST"}
    assert brick.metrics["TRAIN"] is not brick.metrics["TEST"]
    collection = BrickCollection({"metrics": brick})
    out = collection({"pred": torch.tensor([0, 1]), "target": torch.tensor([0, 0])}, Stage.TEST)
    assert set(out) >= {"acc", "prec"}
    assert float(collection.summarize(Stage.TEST)["acc"]) == pytest.approx(0.5)
    single = BrickMetricSingle(MulticlassAccuracy(num_classes=2), input_names=["pred", "target"],
                               metric_name="accuracy")
    assert list(single.metrics["TRAIN"].keys()) == ["accuracy"]


def two_accuracies(**second) -> BrickCollection:
    from torchmetrics.classification import MulticlassAccuracy

    return BrickCollection({
        "acc_a": BrickMetricSingle(MulticlassAccuracy(num_classes=2), input_names=["pa", "t"]),
        "acc_b": BrickMetricSingle(MulticlassAccuracy(num_classes=2), input_names=["pb", "t"], **second),
    })


def test_two_metric_bricks_with_one_metric_name_are_a_plan_error():
    # summarize keys metrics by name: one of the two would be dropped silently.
    clash = two_accuracies()
    with pytest.raises(BrickGraphError, match=r"metric 'MulticlassAccuracy' is computed by more than one brick: "
                                              r"'acc_a', 'acc_b'.*metric_name=") as caught:
        clash.check()
    assert [p.kind for p in caught.value.problems] == ["duplicate_metric"]
    with pytest.raises(BrickGraphError, match=r"more than one brick"):
        clash({"pa": torch.tensor([0, 1]), "pb": torch.tensor([1, 1]), "t": torch.tensor([0, 1])}, Stage.TEST)
    named = two_accuracies(metric_name="accuracy_b")
    named.check()
    named({"pa": torch.tensor([0, 1]), "pb": torch.tensor([1, 1]), "t": torch.tensor([0, 1])}, Stage.TEST)
    summary = named.summarize(Stage.TEST)
    assert float(summary["MulticlassAccuracy"]) == 1.0 and float(summary["accuracy_b"]) == 0.5
    grouped = BrickCollection({"a": two_accuracies()["acc_a"], "b": {"acc": two_accuracies()["acc_b"]}})
    grouped.check()  # "MulticlassAccuracy" and "b/MulticlassAccuracy"


def classwise(prefix: str) -> BrickMetricSingle:
    from torchmetrics.classification import MulticlassAccuracy
    from torchmetrics.wrappers import ClasswiseWrapper

    metric = ClasswiseWrapper(MulticlassAccuracy(num_classes=2, average=None), labels=["cat", "dog"], prefix=prefix)
    return BrickMetricSingle(metric, input_names=["p", "t"], metric_name="per_class")


def test_wrapped_metrics_are_judged_by_the_names_they_compute():
    # Two wrappers under one name computing different keys are fine; under other names computing the same
    # keys, summarize refuses (naming both bricks) and resets nothing.
    batch = {"p": torch.tensor([0, 1, 1]), "t": torch.tensor([0, 1, 0])}
    apart = BrickCollection({"first": classwise("first_"), "second": classwise("second_")})
    apart.check()
    apart(batch, Stage.TEST)
    assert sorted(apart.summarize(Stage.TEST)) == ["first_cat", "first_dog", "second_cat", "second_dog"]
    clash = BrickCollection({"first": classwise("same_"), "second": classwise("same_")})
    clash(batch, Stage.TEST)
    with pytest.raises(BrickGraphError, match=r"Metric 'same_cat' is computed by bricks 'first' and 'second'"):
        clash.summarize(Stage.TEST, reset=True)
    assert float(clash["first"].summarize(Stage.TEST)["same_cat"]) == 0.5  # still accumulated


def test_check_takes_one_stage_or_a_list():
    bad_in_train = BrickCollection({
        "a": BrickTrainable(nn.Identity(), input_names=["x"], output_names=["y"], alive_stages=["inference"]),
        "b": BrickTrainable(nn.Identity(), input_names=["y"], output_names=["z"], alive_stages=["train"]),
    })
    for good in ("inference", Stage.INFERENCE, [Stage.INFERENCE, "export"]):
        bad_in_train.check(good)
    for bad in ("train", Stage.TRAIN, ["train"]):
        with pytest.raises(BrickGraphError, match=r"Brick 'b' needs 'y' in stage train"):
            bad_in_train.check(bad)


def test_wrong_output_arity_names_the_brick():
    collection = BrickCollection({"head": BrickTrainable(nn.Identity(), input_names=["x"],
                                                         output_names=["a", "b"])})
    with pytest.raises(BrickOutputError, match=r"Brick 'head' returned one Tensor but declares 2 output names"):
        collection({"x": torch.ones(2)}, Stage.INFERENCE)
    collection = BrickCollection({"head": BrickTrainable(AddMul(), input_names=["x", "x"], output_names=["a"])})
    with pytest.raises(BrickOutputError, match=r"Brick 'head' returned a tuple of 2 values but declares one"):
        collection({"x": torch.ones(2)}, Stage.INFERENCE)


def test_errors_inside_a_brick_are_annotated_with_its_name():
    collection = BrickCollection({"bad": BrickTrainable(nn.Linear(3, 3), input_names=["x"], output_names=["y"])})
    with pytest.raises(RuntimeError) as info:
        collection({"x": torch.ones(2, 5)}, Stage.INFERENCE)
    assert "(raised in brick 'bad')" in getattr(info.value, "__notes__", ["(raised in brick 'bad')"])


def test_swapping_a_bricks_model_takes_effect(multitask, multitask_inputs):
    before = multitask(multitask_inputs, Stage.INFERENCE)["logits"]
    multitask["heads"]["classifier"].model = Classifier(num_classes=5)
    assert multitask(multitask_inputs, Stage.INFERENCE)["logits"].shape == (4, 5)
    assert before.shape == (4, 3)


def test_plain_callables_become_modules():
    collection = BrickCollection({"twice": BrickNotTrainable(lambda x: x * 2, input_names=["x"],
                                                              output_names=["y"])})
    assert torch.equal(collection({"x": torch.ones(2)}, Stage.INFERENCE)["y"], torch.full((2,), 2.0))


def test_nested_dicts_and_dict_operations(multitask):
    assert isinstance(multitask["heads"], BrickCollection)
    assert list(multitask.bricks())[:4] == ["preprocessor", "backbone", "heads.classifier", "heads.segmenter"]
    head = multitask["heads"].pop("segmenter")
    assert "seg" not in multitask.plan(Stage.INFERENCE).outputs
    multitask["heads"]["segmenter"] = head
    assert "seg" in multitask.plan(Stage.INFERENCE).outputs
    multitask.update({"extra": {"twice": BrickTrainable(nn.Identity(), input_names=["seg"],
                                                        output_names=["seg2"])}})
    assert multitask.plan(Stage.INFERENCE).bricks[-1] == "extra.twice"
    with pytest.raises(BrickGraphError, match=r"Brick name 'double' clashes with the nn.Module attribute"):
        multitask["double"] = head
    assert "heads" in multitask and len(multitask) == 7


def test_seed_single_brick_forward():
    brick = BrickTrainable(AddMul(), input_names=["a", "b"], output_names=["s", "p"])
    out = brick(named_inputs={"a": torch.ones(1), "b": torch.ones(1)}, stage=Stage.INFERENCE)
    assert set(out) == {"s", "p"}
    assert brick.run_now(Stage.TRAIN)


# ------------------------------------------------------------------------------------------- weights
def test_save_and_load_bricks_round_trip(tmp_path, multitask, multitask_inputs):
    folder = multitask.save_bricks(tmp_path / "weights")
    assert sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) == [
        "backbone.pt", "heads.classifier.pt", "heads.segmenter.pt"]
    reference = multitask(multitask_inputs, Stage.INFERENCE)["logits"]
    torch.manual_seed(123)
    from conftest import multitask_bricks

    fresh = BrickCollection(multitask_bricks())
    assert not torch.allclose(fresh(multitask_inputs, Stage.INFERENCE)["logits"], reference)
    fresh.load_bricks(folder)
    torch.testing.assert_close(fresh(multitask_inputs, Stage.INFERENCE)["logits"], reference)


def test_load_bricks_warns_about_missing_files_by_name(tmp_path, multitask):
    folder = multitask.save_bricks(tmp_path / "weights")
    (folder / "heads.segmenter.pt").unlink()
    with pytest.warns(UserWarning, match=r"No weights file for brick\(s\) \['heads.segmenter'\]"):
        multitask.load_bricks(folder)


def test_load_bricks_is_all_or_nothing(tmp_path, multitask):
    folder = multitask.save_bricks(tmp_path / "weights")
    torch.save({"conv.weight": torch.zeros(1)}, folder / "backbone.pt")
    before = {k: v.clone() for k, v in multitask.state_dict().items()}
    with pytest.raises(BrickError, match=r"(?s)nothing was loaded.*brick 'backbone'"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        multitask.load_bricks(folder)
    assert all(torch.equal(before[k], v) for k, v in multitask.state_dict().items())


def test_save_bricks_failure_leaves_no_partial_folder(tmp_path, multitask, monkeypatch):
    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", fail)
    with pytest.raises(BrickError, match="disk full"):
        multitask.save_bricks(tmp_path / "weights")
    assert list(tmp_path.iterdir()) == []


def test_save_bricks_replaces_only_its_own_files(tmp_path, multitask):
    folder = multitask.save_bricks(tmp_path / "weights")
    (folder / "marker.txt").write_text("old")
    multitask.save_bricks(folder)
    assert (folder / "marker.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["weights"]


def test_load_bricks_refuses_missing_folder(tmp_path, multitask):
    with pytest.raises(BrickError, match="No brick weights folder"):
        multitask.load_bricks(tmp_path / "nothing")


# ------------------------------------------------------------------------------------------- seed-era bricks
class L1Counter(BrickInterface):
    """A torchbricks 0.0.8-style custom brick: its own extract_losses, and summarize(stage, reset) with reset
    required (as the seed's abstract method declares it)."""

    def __init__(self) -> None:
        super().__init__(input_names=["pred", "target"], output_names=["l1"], alive_stages=[Stage.TRAIN])
        self.calls = 0

    def forward(self, named_inputs: dict, stage: Stage) -> dict:
        self.calls += 1
        return {"l1": (named_inputs["pred"] - named_inputs["target"]).abs().mean()}

    def extract_losses(self, named_outputs: dict) -> dict:
        return {"l1": named_outputs["l1"]}

    def summarize(self, stage: Stage, reset: bool) -> dict:
        calls = self.calls
        if reset:
            self.calls = 0
        return {"calls": calls}


def test_seed_era_bricks_report_their_losses_and_summaries():
    collection = BrickCollection({"l1": L1Counter(), "head": BrickTrainable(nn.Identity(), ["pred"], ["copy"])})
    out = collection({"pred": torch.ones(2), "target": torch.zeros(2)}, Stage.TRAIN)
    assert collection.extract_losses(out) == {"l1": torch.tensor(1.0)}
    assert collection.summarize(Stage.TRAIN) == {"calls": 1}
    assert collection.summarize(Stage.TRAIN, reset=True) == {"calls": 1}
    assert collection.summarize(Stage.TRAIN) == {"calls": 0}  # the reset reached the brick
    with pytest.raises(KeyError) as info:  # the brick's own code failing: the collection names the brick
        collection.extract_losses({"pred": torch.ones(2)})
    assert "(raised in brick 'l1')" in getattr(info.value, "__notes__", [])


def test_replacing_one_use_of_a_shared_group_keeps_the_other_use_planned():
    def head() -> BrickCollection:
        return BrickCollection({"fc": BrickTrainable(nn.Linear(4, 2), ["../emb"], ["./logits"])})

    shared = head()
    multi = BrickCollection({"bb": BrickTrainable(nn.Identity(), ["raw"], ["emb"]), "a": shared, "b": shared})
    x = {"raw": torch.randn(3, 4)}
    assert "b/logits" in multi(x, Stage.INFERENCE)
    multi["a"] = head()  # the group is still used under "b"
    assert "b/logits" in multi(x, Stage.INFERENCE)
    multi["b"]["fc"].alive_stages = [Stage.TRAIN]
    assert "b/logits" not in multi(x, Stage.INFERENCE)
    assert multi.plan(Stage.INFERENCE).pruned == {"b.fc": "dead in stage inference"}

    brick = BrickTrainable(nn.Identity(), ["raw"], ["y"])
    twice = BrickCollection({"one": brick, "two": BrickTrainable(nn.Identity(), ["y"], ["z"])})
    twice["three"] = brick
    del twice["one"]  # still held as "three"
    assert "y" in twice.plan(Stage.INFERENCE).outputs
    brick.output_names = ["w"]
    assert "w" in twice.plan(Stage.INFERENCE).outputs


def test_editing_a_metric_bricks_alive_stages_gives_new_stages_their_own_metric():
    from torchmetrics.classification import MulticlassAccuracy

    from torchbricks_fx import compile_stage

    def accuracy_brick(name: str, **alive) -> BrickMetricSingle:
        return BrickMetricSingle(MulticlassAccuracy(num_classes=3, average="micro"), ["p", "t"], metric_name=name,
                                 **alive)

    accuracy, late = accuracy_brick("accuracy"), accuracy_brick("late", alive_stages="none")
    collection = BrickCollection({"accuracy": accuracy, "late": late})
    collection({"p": torch.tensor([1, 1, 1]), "t": torch.tensor([0, 0, 0])}, Stage.VALIDATION)  # all wrong
    accuracy.alive_stages = "all"
    late.alive_stages = [Stage.INFERENCE]
    batch = {"p": torch.tensor([0, 1, 2]), "t": torch.tensor([0, 2, 2])}
    collection(batch, Stage.INFERENCE)
    compile_stage(collection, Stage.INFERENCE)(batch)
    summary = collection.summarize(Stage.INFERENCE)
    assert set(summary) == {"accuracy", "late"}
    assert float(summary["accuracy"]) == float(summary["late"]) == pytest.approx(2 / 3)  # fresh: no validation
    assert float(collection.summarize(Stage.VALIDATION)["accuracy"]) == 0.0

    moved = accuracy_brick("moved", alive_stages="none").to("meta")  # no clone yet: the template moves
    moved.alive_stages = [Stage.TEST]
    states = [state for metric in moved.metrics["TEST"].values() for state in metric.metric_state.values()]
    assert states and {state.device.type for state in states} == {"meta"}
