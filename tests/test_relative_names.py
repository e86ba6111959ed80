"""Relative names (``"./x"``, ``"../x"``) let a group of bricks be reused under different parents.

They are resolved at plan time against where each brick sits (``"./x"`` in collection ``a/b`` is the value
``"a/b/x"``, ``"../x"`` is ``"a/x"``), without mutating the bricks; a name that goes above the root is a
``BrickGraphError`` naming the brick.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from torchbricks_fx import (
    BrickCollection,
    BrickGraphError,
    BrickLoss,
    BrickMetricSingle,
    BrickTrainable,
    Stage,
    compile_stage,
)


def head_group(n_classes: int = 3, features: str = "../features") -> dict[str, Any]:
    """A reusable head: reads its features from the parent, names everything it produces relatively."""
    return {
        "fc": BrickTrainable(nn.Linear(4, n_classes), input_names=[features], output_names=["./logits"]),
        "loss": BrickLoss(nn.CrossEntropyLoss(), input_names=["./logits", "targets"], output_names=["./loss"]),
        "accuracy": BrickMetricSingle(MulticlassAccuracy(num_classes=n_classes), input_names=["./logits", "targets"],
                                      metric_name="accuracy"),
    }


def two_heads() -> BrickCollection:
    torch.manual_seed(0)
    return BrickCollection({
        "backbone": BrickTrainable(nn.Linear(5, 4), input_names=["raw"], output_names=["features"]),
        "a": head_group(),
        "b": head_group(n_classes=2),
    })


def inputs() -> dict[str, torch.Tensor]:
    return {"raw": torch.randn(6, 5), "targets": torch.tensor([0, 1, 1, 0, 1, 0])}


def test_the_same_group_nested_under_two_keys_runs_twice() -> None:
    collection = two_heads()
    plan = collection.plan(Stage.TRAIN)
    assert plan.bricks == ("backbone", "a.fc", "a.loss", "a.accuracy", "b.fc", "b.loss", "b.accuracy")
    assert set(plan.outputs) == {"features", "a/logits", "a/loss", "b/logits", "b/loss"}
    outputs = collection(inputs(), Stage.TRAIN)
    assert outputs["a/logits"].shape == (6, 3)
    assert outputs["b/logits"].shape == (6, 2)


def test_eager_and_compiled_agree_on_nested_groups() -> None:
    collection = two_heads()
    named_inputs = inputs()
    for stage in (Stage.VALIDATION, Stage.INFERENCE):
        eager = collection(named_inputs, stage)
        compiled = compile_stage(collection, stage)(named_inputs)
        assert compiled.keys() <= eager.keys()
        for name, value in compiled.items():
            torch.testing.assert_close(value, eager[name])


def test_resolution_depth() -> None:
    probe = BrickCollection({
        "x_root": BrickTrainable(nn.Identity(), input_names=["raw"], output_names=["./x"]),
        "a": {
            "x_a": BrickTrainable(nn.Identity(), input_names=["../x"], output_names=["./x"]),
            "b": {
                "x_ab": BrickTrainable(nn.Identity(), input_names=["../x"], output_names=["./x"]),
                "from_root": BrickTrainable(nn.Identity(), input_names=["../../x"], output_names=["./root_copy"]),
                "same_level": BrickTrainable(nn.Identity(), input_names=["././x"], output_names=["./ab_copy"]),
            },
        },
    })
    plan = probe.plan(Stage.INFERENCE)
    assert plan.outputs == ("x", "a/x", "a/b/x", "a/b/root_copy", "a/b/ab_copy")
    assert plan.required_inputs == ("raw",)


def test_resolution_does_not_mutate_bricks() -> None:
    collection = two_heads()
    collection.plan(Stage.TRAIN)
    compile_stage(collection, Stage.TRAIN)
    fc = collection.bricks()["a.fc"]
    assert fc.input_names == ["../features"]
    assert fc.output_names == ["./logits"]


def test_moving_a_group_re_resolves_its_names() -> None:
    collection = two_heads()
    assert "a/logits" in collection.plan(Stage.INFERENCE).outputs
    collection["renamed"] = collection.pop("a")
    outputs = collection.plan(Stage.INFERENCE).outputs
    assert "renamed/logits" in outputs and "a/logits" not in outputs
    assert "renamed/logits" in compile_stage(collection, Stage.INFERENCE)(inputs())


def test_going_above_the_root_names_the_brick() -> None:
    collection = BrickCollection({
        "a": {"fc": BrickTrainable(nn.Linear(5, 4), input_names=["../../raw"], output_names=["./y"])},
    })
    pattern = r"Brick 'a\.fc': relative name '\.\./\.\./raw' goes above the root"
    with pytest.raises(BrickGraphError, match=pattern):
        collection.plan(Stage.INFERENCE)
    with pytest.raises(BrickGraphError, match=pattern):
        compile_stage(collection, Stage.INFERENCE)
    with pytest.raises(BrickGraphError, match=pattern):
        collection.check()
    with pytest.raises(BrickGraphError, match=pattern):
        collection({"raw": torch.randn(2, 5)}, Stage.INFERENCE)


def test_going_above_the_root_from_the_root() -> None:
    collection = BrickCollection({"fc": BrickTrainable(nn.Linear(5, 4), input_names=["../raw"],
                                                       output_names=["y"])})
    with pytest.raises(BrickGraphError, match=r"Brick 'fc': relative name '\.\./raw' goes above the root"):
        collection.check()


def test_an_output_above_the_root_is_an_error() -> None:
    collection = BrickCollection({"fc": BrickTrainable(nn.Linear(5, 4), input_names=["raw"], output_names=["../y"])})
    with pytest.raises(BrickGraphError, match=r"Brick 'fc'.*'\.\./y'"):
        collection.plan(Stage.INFERENCE)


def test_an_empty_relative_name_is_an_error() -> None:
    collection = BrickCollection({"a": {"fc": BrickTrainable(nn.Linear(5, 4), input_names=["raw"],
                                                             output_names=["./"])}})
    with pytest.raises(BrickGraphError, match=r"Brick 'a\.fc': relative name '\./' names no value"):
        collection.plan(Stage.INFERENCE)


def test_a_group_nested_without_its_parent_value_is_a_missing_input() -> None:
    # The head reads "../features"; nested directly at the root it needs an external "features" input...
    lonely = BrickCollection({"head": head_group()})
    assert lonely.plan(Stage.INFERENCE).required_inputs == ("features",)
    # ...and one level deeper, where nobody produces "outer/features", the error names the resolved value.
    deeper = BrickCollection({
        "backbone": BrickTrainable(nn.Linear(5, 4), input_names=["raw"], output_names=["features"]),
        "outer": {"head": head_group()},
    })
    with pytest.raises(BrickGraphError, match=r"'outer/features'.*outer\.head\.fc|outer\.head\.fc.*'outer/features'"):
        deeper({"raw": torch.randn(2, 5)}, Stage.INFERENCE)


def test_two_groups_writing_the_same_parent_value_conflict() -> None:
    writer = {"w": BrickTrainable(nn.Identity(), input_names=["raw"], output_names=["../shared"])}
    collection = BrickCollection({"a": dict(writer), "b": {"w": BrickTrainable(nn.Identity(), ["raw"], ["../shared"])}})
    with pytest.raises(BrickGraphError, match=r"'shared' is produced by more than one live brick: 'a\.w', 'b\.w'"):
        collection.plan(Stage.INFERENCE)


def test_a_failed_plan_leaves_the_collection_usable() -> None:
    collection = two_heads()
    collection["bad"] = {"fc": BrickTrainable(nn.Identity(), input_names=["../../raw"], output_names=["./y"])}
    with pytest.raises(BrickGraphError):
        collection.plan(Stage.INFERENCE)
    del collection["bad"]
    assert "a/logits" in collection(inputs(), Stage.INFERENCE)


# ----------------------------------------------------------------------------------------------------------
# Losses and metrics of reused groups: keyed by where the group sits, so two copies stay apart.


def test_extract_losses_finds_relative_loss_names() -> None:
    collection = two_heads()
    outputs = collection(inputs(), Stage.TRAIN)
    losses = collection.extract_losses(outputs)
    assert set(losses) == {"a/loss", "b/loss"}


def test_summarize_keeps_the_metrics_of_two_nested_groups_apart() -> None:
    collection = two_heads()
    collection(inputs(), Stage.VALIDATION)
    metrics = collection.summarize(Stage.VALIDATION)
    assert set(metrics) == {"a/accuracy", "b/accuracy"}


@pytest.mark.parametrize("runtime", ["eager", "stage module"])
def test_returned_metrics_are_named_like_their_summaries_in_reused_groups(runtime: str) -> None:
    def group(n_classes: int) -> dict[str, Any]:
        heads = head_group(n_classes)
        heads["accuracy"] = BrickMetricSingle(MulticlassAccuracy(num_classes=n_classes), metric_name="accuracy",
                                              input_names=["./logits", "targets"], return_metrics=True)
        return heads

    torch.manual_seed(0)
    collection = BrickCollection({"backbone": BrickTrainable(nn.Linear(5, 4), input_names=["raw"],
                                                             output_names=["features"]),
                                  "a": group(3), "b": group(2)})
    stage = compile_stage(collection, Stage.VALIDATION) if runtime == "stage module" else \
        (lambda named: collection(named, Stage.VALIDATION))
    outputs = stage(inputs())
    summary = collection.summarize(Stage.VALIDATION)
    assert {"a/accuracy", "b/accuracy"} <= outputs.keys() and "accuracy" not in outputs
    for name in ("a/accuracy", "b/accuracy"):
        torch.testing.assert_close(outputs[name], summary[name])
