"""The bound stage: plan caches owned by the collection tree, one binding rule, metrics after the model."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

from torchbricks_fx import (
    BrickCollection,
    BrickGraphError,
    BrickMetricSingle,
    BrickNotTrainable,
    BrickOutputError,
    BrickTrainable,
    Stage,
    compile_stage,
)


class Scale(nn.Module):
    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor


def chain() -> BrickCollection:
    return BrickCollection({
        "first": BrickNotTrainable(Scale(2.0), input_names=["x"], output_names=["y"]),
        "group": {"second": BrickTrainable(Scale(3.0), input_names=["y"], output_names=["z"])},
    })


def run(collection: BrickCollection, stage: Stage = Stage.INFERENCE) -> dict[str, torch.Tensor]:
    return collection({"x": torch.ones(2)}, stage)


# ------------------------------------------------------------------------------------------- invalidation
def test_calculate_gradients_flipped_after_a_train_call_blocks_gradients():
    collection = chain()
    x = torch.ones(2, requires_grad=True)
    collection({"x": x}, Stage.TRAIN)["z"].sum().backward()
    assert x.grad is not None
    collection["first"].calculate_gradients = False
    x.grad = None
    out = collection({"x": x}, Stage.TRAIN)["z"]
    assert not out.requires_grad  # the bound step now wraps the model in no_grad, as a new collection would
    assert not BrickCollection(dict(collection.items()))({"x": x}, Stage.TRAIN)["z"].requires_grad


@pytest.mark.parametrize("change", ["input_names", "output_names", "input_names_in_place",
                                    "output_names_in_place", "alive_stages", "model", "nested_add", "nested_remove"])
def test_every_plan_attribute_invalidates_the_collections_holding_the_brick(change):
    collection = chain()
    assert torch.equal(run(collection)["z"], torch.full((2,), 6.0))
    revision = collection.revision
    second = collection["group"]["second"]
    if change == "input_names":
        second.input_names = ["x"]
        assert torch.equal(run(collection)["z"], torch.full((2,), 3.0))
    elif change == "output_names":
        second.output_names = ["w"]
        assert "w" in run(collection) and "z" not in run(collection)
    elif change == "input_names_in_place":
        second.input_names[0] = "x"
        assert torch.equal(run(collection)["z"], torch.full((2,), 3.0))
    elif change == "output_names_in_place":
        second.output_names.append("w")  # one value named twice: Scale returns one tensor, not two
        with pytest.raises(BrickOutputError, match="second"):
            run(collection)
    elif change == "alive_stages":
        second.alive_stages = [Stage.TRAIN]
        assert "z" not in run(collection)
    elif change == "model":
        second.model = Scale(5.0)
        assert torch.equal(run(collection)["z"], torch.full((2,), 10.0))
    elif change == "nested_add":
        collection["group"]["third"] = BrickTrainable(Scale(7.0), input_names=["z"], output_names=["u"])
        assert torch.equal(run(collection)["u"], torch.full((2,), 42.0))
    else:
        del collection["group"]["second"]
        assert "z" not in run(collection)
    assert collection.revision > revision


def test_names_edited_in_place_change_the_brick_they_were_read_from_only():
    brick = chain()["group"]["second"]
    clone = copy.deepcopy(brick)
    clone.input_names.append("extra")
    mapped = BrickTrainable(Scale(1.0), input_names={"x": "a"}, output_names=["b"])
    mapped.input_names["x"] = "c"
    clone.input_names.sort(key=str)  # keywords too
    assert brick.input_names == ["y"] and clone.input_names == ["extra", "y"]
    assert mapped.input_names == {"x": "c"} and type(pickle.loads(pickle.dumps(clone.input_names))) is list


def test_building_unrelated_bricks_invalidates_nothing():
    collection = chain()
    bound = collection.bound_stage(Stage.INFERENCE)
    revision = collection.revision
    other = chain()
    other["group"]["second"].input_names = ["x"]
    BrickTrainable(nn.Linear(2, 2), input_names=["a"], output_names=["b"])
    assert collection.revision == revision
    assert collection.bound_stage(Stage.INFERENCE) is bound


def test_a_brick_in_two_collections_invalidates_both():
    shared = BrickTrainable(Scale(2.0), input_names=["x"], output_names=["y"])
    first, second = BrickCollection({"s": shared}), BrickCollection({"s": shared})
    run(first), run(second)
    shared.model = Scale(4.0)
    assert torch.equal(run(first)["y"], torch.full((2,), 4.0))
    assert torch.equal(run(second)["y"], torch.full((2,), 4.0))


@pytest.mark.parametrize("clone", [copy.deepcopy, lambda c: pickle.loads(pickle.dumps(c))], ids=["deepcopy", "pickle"])
def test_copies_invalidate_their_own_plans(clone):
    collection = chain()
    run(collection)
    copied = clone(collection)
    run(copied)
    copied["group"]["second"].model = Scale(10.0)
    assert torch.equal(run(copied)["z"], torch.full((2,), 20.0))
    assert torch.equal(run(collection)["z"], torch.full((2,), 6.0))  # the original is untouched


# ------------------------------------------------------------------------------------------- one runtime
class Everything(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[str, ...]] = []

    def forward(self, values: dict[str, torch.Tensor]) -> torch.Tensor:
        self.seen.append(tuple(values))
        return sum(values.values())  # type: ignore[return-value]


def test_all_bindings_receive_the_same_values_eagerly_and_compiled():
    everything = Everything()
    collection = BrickCollection({
        "twice": BrickTrainable(Scale(2.0), input_names=["x"], output_names=["y"]),
        "all": BrickTrainable(everything, input_names="all", output_names=["total"]),
    })
    inputs = {"x": torch.ones(2), "unused": torch.zeros(2)}
    eager = collection(inputs, Stage.INFERENCE)["total"]
    compiled = compile_stage(collection, Stage.INFERENCE)(inputs)["total"]
    assert torch.equal(eager, compiled)
    assert everything.seen[0] == everything.seen[-1] == ("x", "y")


class Boom(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("boom in forward")


def failing_with_metric_and_batchnorm() -> BrickCollection:
    from torchmetrics.classification import MulticlassAccuracy

    return BrickCollection({
        "norm": BrickTrainable(nn.BatchNorm1d(3), input_names=["x"], output_names=["normed"]),
        "accuracy": BrickMetricSingle(MulticlassAccuracy(num_classes=3), input_names=["labels", "labels"]),
        "boom": BrickTrainable(Boom(), input_names=["normed"], output_names=["out"]),
    })


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_a_failed_call_updates_no_metric_and_names_the_brick(compiled):
    collection = failing_with_metric_and_batchnorm()
    call = compile_stage(collection, Stage.TRAIN) if compiled else (lambda inputs: collection(inputs, Stage.TRAIN))
    inputs = {"x": torch.randn(4, 3), "labels": torch.tensor([0, 1, 2, 1])}
    for _ in range(2):  # the second call of a compiled stage runs the graph's own code
        with pytest.raises(RuntimeError, match="boom in forward") as info:
            call(inputs)
        assert "(raised in brick 'boom')" in getattr(info.value, "__notes__", [])
    metric = collection["accuracy"].metrics["TRAIN"]
    assert metric.MulticlassAccuracy._update_count == 0  # metrics run only after every model brick succeeded
    assert int(collection["norm"].model.num_batches_tracked) == 2  # what did run may have moved its statistics


def test_model_bricks_cannot_read_metric_outputs_in_any_runtime():
    from torchmetrics.classification import MulticlassAccuracy

    collection = BrickCollection({
        "acc": BrickMetricSingle(MulticlassAccuracy(num_classes=2), input_names=["p", "t"], metric_name="accuracy",
                                 return_metrics=True),
        "use": BrickTrainable(nn.Identity(), input_names=["accuracy"], output_names=["copy"]),
    })
    with pytest.raises(BrickGraphError, match=r"Brick 'use' reads 'accuracy', returned by metric brick 'acc'"):
        collection({"p": torch.tensor([0]), "t": torch.tensor([0])}, Stage.TRAIN)


def test_graph_problems_are_dataclasses_naming_kind_brick_name_and_stages():
    collection = BrickCollection({"head": BrickTrainable(nn.Identity(), input_names=["features"],
                                                         output_names=["logits"]),
                                  "encoder": BrickTrainable(nn.Identity(), input_names=["x"], output_names=["features"],
                                                            alive_stages=[Stage.TRAIN])})
    with pytest.raises(BrickGraphError) as info:
        collection.check()
    (problem,) = info.value.problems
    assert (problem.kind, problem.brick, problem.name) == ("dead_producer", "head", "features")
    assert problem.stages == (Stage.VALIDATION, Stage.TEST, Stage.INFERENCE, Stage.EXPORT)
    assert str(problem) == problem.message and "stages validation, test, inference and export" in problem.message


# ------------------------------------------------------------------------------------------- plain graph
def test_the_plain_graph_honours_hooks_registered_at_any_time(multitask):
    """The plain graph calls bricks' forward directly only while that is all calling them would do."""
    stage = compile_stage(multitask, Stage.INFERENCE, outputs=["seg"])
    inputs = {"raw": torch.rand(2, 3, 16, 16)}
    expected = stage(inputs)["seg"]
    backbone = multitask["backbone"].model
    handle = backbone.register_forward_hook(lambda module, args, output: output * 0)
    bias = multitask["heads"]["segmenter"].model.conv.bias
    assert torch.equal(stage(inputs)["seg"], bias.view(1, -1, 1, 1).expand_as(expected))  # zeroed features
    handle.remove()
    assert torch.equal(stage(inputs)["seg"], expected)
    seen = []
    handle = torch.nn.modules.module.register_module_forward_pre_hook(lambda module, args: seen.append(module))
    try:
        stage(inputs)
    finally:
        handle.remove()
    assert backbone in seen
    calls = []  # what Module.compile() installs
    backbone._compiled_call_impl = lambda *args: calls.append(args) or backbone.forward(*args)
    assert torch.equal(stage(inputs)["seg"], expected) and calls


def test_the_plain_graph_follows_a_forward_replaced_on_the_instance(multitask):
    stage = compile_stage(multitask, Stage.INFERENCE, outputs=["features"])
    inputs = {"raw": torch.rand(2, 3, 16, 16)}
    stage(inputs)
    backbone = multitask["backbone"].model
    backbone.forward = lambda image: torch.zeros(1)  # type: ignore[method-assign]  # as wrappers do
    assert torch.equal(stage(inputs)["features"], torch.zeros(1))
    stage.graph_module.graph.lint()  # the graph still belongs to the stage's GraphModule


def test_every_called_module_gets_the_stage_mode_even_a_linear_with_a_hook():
    """spectral_norm's pre-hook reads the Linear's mode: in train mode it would update weight_u."""
    linear = nn.utils.spectral_norm(nn.Linear(4, 4))
    collection = BrickCollection({"layer": BrickTrainable(linear, input_names=["x"], output_names=["y"])})
    collection.train()
    stage = compile_stage(collection, Stage.INFERENCE)
    u = linear.weight_u.clone()
    x = torch.rand(3, 4)
    assert torch.equal(stage({"x": x})["y"], stage({"x": x})["y"])
    assert torch.equal(linear.weight_u, u) and linear.training


class Head(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


@pytest.mark.parametrize("runtime", ["eager", "stage module"])
def test_a_submodule_swapped_in_after_the_first_call_runs_in_the_stage_mode(runtime):
    """Fine-tuning replaces a layer inside a brick's model: the new dropout is off in INFERENCE, the new
    BatchNorm learns its statistics in TRAIN, whatever mode the collection was left in."""
    collection = BrickCollection({"head": BrickTrainable(Head(), input_names=["x"], output_names=["y"])})
    stage = compile_stage(collection, Stage.INFERENCE) if runtime == "stage module" else None
    call = stage or (lambda inputs: collection(inputs, Stage.INFERENCE))
    x = torch.ones(8, 4)
    call({"x": x})
    collection["head"].model.fc = nn.Sequential(nn.Dropout(p=0.5), nn.Linear(4, 4))
    collection.train()
    assert torch.equal(call({"x": x})["y"], call({"x": x})["y"])
    assert collection["head"].model.fc[0].training  # the caller's mode afterwards

    normalized = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    collection["head"].model.fc = normalized
    collection.eval()
    collection({"x": torch.randn(8, 4)}, Stage.TRAIN)
    assert normalized[1].num_batches_tracked.item() == 1
    assert normalized[1].training  # TRAIN leaves train mode (backward may run the forward again)


def test_a_copied_stage_module_watches_its_own_modules():
    collection = BrickCollection({"head": BrickTrainable(Head(), input_names=["x"], output_names=["y"])})
    stage = copy.deepcopy(compile_stage(collection, Stage.INFERENCE))
    x = torch.ones(8, 4)
    stage({"x": x})
    head = next(m for m in stage.graph_module.modules() if isinstance(m, Head))  # the copy's own
    head.fc = nn.Sequential(nn.Dropout(p=0.5), nn.Linear(4, 4))
    head.train()
    assert torch.equal(stage({"x": x})["y"], stage({"x": x})["y"])


@pytest.mark.parametrize("runtime", ["eager", "stage module"])
def test_a_tensor_instead_of_a_dict_of_inputs_says_what_the_stage_takes(runtime):
    collection = chain()
    call = compile_stage(collection, Stage.INFERENCE) if runtime == "stage module" else \
        (lambda inputs: collection(inputs, Stage.INFERENCE))
    with pytest.raises(BrickGraphError, match=r"takes a dict \{input name: value\}, not a Tensor.*\['x'\]"):
        call(torch.ones(2))


class Checkpointed(nn.Module):
    """Recomputes its block in backward (activation checkpointing): the recomputation must run in the
    modes of the forward."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Dropout(0.5), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.utils.checkpoint.checkpoint(self.block, x, use_reentrant=False)


@pytest.mark.parametrize("runtime", ["eager", "stage module"])
def test_activation_checkpointing_trains_when_the_modules_were_left_in_eval_mode(runtime):
    torch.manual_seed(0)
    collection = BrickCollection({"body": BrickTrainable(Checkpointed(), input_names=["x"], output_names=["y"])})
    collection.eval()  # e.g. after a validation run
    stage = compile_stage(collection, Stage.TRAIN) if runtime == "stage module" else None
    out = stage({"x": torch.randn(8, 4)}) if stage else collection({"x": torch.randn(8, 4)}, Stage.TRAIN)
    out["y"].sum().backward()
    assert collection["body"].model.block[0].weight.grad is not None


def test_warming_up_a_train_stage_leaves_the_random_number_generator_alone():
    collection = BrickCollection({"drop": BrickTrainable(nn.Dropout(0.5), input_names=["x"], output_names=["y"])})
    stage = compile_stage(collection, Stage.TRAIN)
    torch.manual_seed(0)
    expected = stage({"x": torch.ones(100)})["y"]
    torch.manual_seed(0)
    stage.warm_up({"x": torch.ones(100)}, batch_sizes=[1, 2])
    torch.testing.assert_close(stage({"x": torch.ones(100)})["y"], expected)  # the same dropout mask
