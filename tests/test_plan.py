"""Per-stage planning: order, pruning, required inputs, and every validation problem."""

from __future__ import annotations

import pickle

import pytest
import torch
from torch import nn

from torchbricks_fx import (
    BrickCollection,
    BrickGraphError,
    BrickLoss,
    BrickMetricSingle,
    BrickTrainable,
    Stage,
    compile_stage,
)
from torchbricks_fx.bricks import BrickModule


def linear(inputs, outputs, **kwargs) -> BrickTrainable:
    return BrickTrainable(nn.Identity() if len(inputs) == 1 and len(outputs) == 1 else Fan(len(outputs)),
                          input_names=inputs, output_names=outputs, **kwargs)


class Fan(nn.Module):
    def __init__(self, n: int) -> None:
        super().__init__()
        self.n = n

    def forward(self, *xs: torch.Tensor):
        total = sum(xs)
        return tuple(total + i for i in range(self.n)) if self.n > 1 else total


def test_plan_orders_topologically_and_lists_inputs_outputs(multitask):
    plan = multitask.plan(Stage.TRAIN)
    assert plan.bricks == ("preprocessor", "backbone", "heads.classifier", "heads.segmenter", "loss_cls",
                           "loss_seg", "accuracy")
    assert plan.required_inputs == ("raw", "labels", "masks")
    assert plan.outputs == ("image", "features", "logits", "prediction", "seg", "loss_cls", "loss_seg")
    assert dict(plan.pruned) == {}


def test_declaration_order_does_not_matter():
    collection = BrickCollection({"c": linear(["b"], ["c"]), "b": linear(["a"], ["b"]), "a": linear(["x"], ["a"])})
    assert collection.plan(Stage.INFERENCE).bricks == ("a", "b", "c")
    out = collection({"x": torch.ones(2)}, Stage.INFERENCE)
    assert torch.equal(out["c"], torch.ones(2))


def test_declaration_order_breaks_ties():
    collection = BrickCollection({"z": linear(["x"], ["z"]), "a": linear(["x"], ["a"]), "m": linear(["x"], ["m"])})
    assert collection.plan("inference").bricks == ("z", "a", "m")


def test_dead_bricks_are_pruned_with_reason(multitask):
    plan = multitask.plan(Stage.INFERENCE)
    assert plan.required_inputs == ("raw",)
    assert set(plan.pruned) == {"loss_cls", "loss_seg", "accuracy"}
    assert plan.pruned["loss_cls"] == "dead in stage inference"


def test_output_selection_keeps_only_needed_bricks(multitask):
    plan = multitask.plan(Stage.INFERENCE, outputs=["seg"])
    assert plan.bricks == ("preprocessor", "backbone", "heads.segmenter")
    assert plan.outputs == ("seg",)
    assert "not needed" in plan.pruned["heads.classifier"]


def test_metric_bricks_are_never_pruned_silently(multitask):
    plan = multitask.plan(Stage.VALIDATION, outputs=["seg"])
    # accuracy has side effects: it stays, and so do the bricks it reads from.
    assert "accuracy" in plan.bricks and "heads.classifier" in plan.bricks
    assert plan.required_inputs == ("raw", "labels")
    assert "loss_cls" in plan.pruned


def test_plan_is_frozen_and_picklable(multitask):
    plan = multitask.plan(Stage.TRAIN)
    with pytest.raises(AttributeError):
        plan.stage = Stage.TEST  # type: ignore[misc]
    assert pickle.loads(pickle.dumps(plan)) == plan
    assert "pruned" in multitask.plan(Stage.EXPORT).describe()


def test_plans_are_cached_and_invalidated_by_changes(multitask):
    assert multitask.plan(Stage.TRAIN) is multitask.plan(Stage.TRAIN)
    before = multitask.plan(Stage.INFERENCE)
    del multitask["heads"]["segmenter"]
    after = multitask.plan(Stage.INFERENCE)
    assert "heads.segmenter" not in after.bricks and "heads.segmenter" in before.bricks
    multitask["heads"]["classifier"].alive_stages = [Stage.TRAIN]
    assert multitask.plan(Stage.INFERENCE).pruned["heads.classifier"] == "dead in stage inference"


def test_stage_accepts_lower_case_names(multitask):
    assert multitask.plan("inference") is multitask.plan(Stage.INFERENCE)
    assert Stage("TRAIN") is Stage.TRAIN


def test_unknown_stage_is_a_graph_error(multitask):
    with pytest.raises(BrickGraphError, match=r"Unknown stage 'deploy'.*inference"):
        multitask.plan("deploy")


# ------------------------------------------------------------------------------------------- problems
def test_input_of_dead_producer_names_brick_name_stage_and_closest():
    collection = BrickCollection({
        "encoder": linear(["x"], ["embedding"], alive_stages=[Stage.TRAIN]),
        "head": linear(["embedding"], ["logits"]),
    })
    with pytest.raises(BrickGraphError, match=r"Brick 'head' needs 'embedding' in stage inference.*'encoder'"):
        collection.plan(Stage.INFERENCE)
    assert collection.plan(Stage.TRAIN).bricks == ("encoder", "head")


def test_an_all_model_brick_does_not_receive_metric_outputs():
    # Metric bricks run after every model brick: their returned values do not exist yet.
    from torchmetrics.classification import MulticlassAccuracy

    collection = BrickCollection({
        "acc": BrickMetricSingle(MulticlassAccuracy(num_classes=2), input_names=["p", "t"], metric_name="accuracy",
                                 return_metrics=True),
        "names": BrickTrainable(lambda values: torch.tensor(len(values)), input_names="all", output_names=["n"]),
    })
    step = next(s for s in collection.plan(Stage.TRAIN).steps if s.name == "names")
    assert step.binding.all_values == ("p", "t")
    inputs = {"p": torch.tensor([0, 1]), "t": torch.tensor([0, 1])}
    assert int(collection(inputs, Stage.TRAIN)["n"]) == 2
    assert int(compile_stage(collection, Stage.TRAIN)(inputs)["n"]) == 2


def test_missing_external_input_at_call_names_brick_and_closest_name():
    collection = BrickCollection({"head": linear(["embeding"], ["logits"])})
    with pytest.raises(BrickGraphError, match=r"Input 'embeding' needed by brick 'head'.*Closest.*'embedding'"):
        collection({"embedding": torch.ones(1)}, Stage.INFERENCE)


def test_duplicate_producer_names_both_bricks():
    collection = BrickCollection({"a": linear(["x"], ["y"]), "b": linear(["x"], ["y"])})
    with pytest.raises(BrickGraphError, match=r"'y' is produced by more than one live brick: 'a', 'b'"):
        collection.plan(Stage.TRAIN)


def test_duplicate_producers_in_different_stages_are_fine():
    collection = BrickCollection({"a": linear(["x"], ["y"], alive_stages=[Stage.TRAIN]),
                                  "b": linear(["x"], ["y"], alive_stages=[Stage.INFERENCE])})
    collection.check()


def test_cycle_names_the_bricks_on_it():
    collection = BrickCollection({"a": linear(["c"], ["a"]), "b": linear(["a"], ["b"]),
                                  "c": linear(["b"], ["c"]), "d": linear(["x"], ["d"])})
    with pytest.raises(BrickGraphError, match=r"cycle: 'a' -> 'b' -> 'c' -> 'a'") as info:
        collection.plan(Stage.TRAIN)
    assert "d" not in info.value.problems[0].message.split("cycle:")[1]
    assert info.value.problems[0].kind == "cycle" and info.value.problems[0].stages == (Stage.TRAIN,)


def test_self_loop_is_a_cycle():
    collection = BrickCollection({"a": linear(["a"], ["a"])})
    with pytest.raises(BrickGraphError, match=r"cycle: 'a' -> 'a'"):
        collection.plan(Stage.TRAIN)


@pytest.mark.parametrize(("inputs", "outputs", "message"), [
    (["x"], ["stage"], r"Brick 'bad': output name 'stage' is reserved"),
    ([""], ["y"], r"Brick 'bad': input name '' is malformed"),
    (["x"], [" y"], r"Brick 'bad': output name ' y' is malformed"),
    (["x"], [3], r"Brick 'bad': output name 3 is malformed"),
    (["x"], ["y", "y"], r"Brick 'bad': output name 'y' appears twice"),
    ({"not an argument": "x"}, ["y"], r"Brick 'bad': keyword argument 'not an argument'"),
    (["../x"], ["y"], r"Brick 'bad': relative name '../x' goes above the root"),
])
def test_malformed_or_reserved_names(inputs, outputs, message):
    collection = BrickCollection({"bad": BrickModule(nn.Identity(), input_names=inputs, output_names=outputs)})
    with pytest.raises(BrickGraphError, match=message):
        collection.check()


def test_unknown_requested_output_points_to_plan(multitask):
    message = r"(?s)Requested output 'logit' .*Closest.*'logits'.*Hint: collection.plan"
    with pytest.raises(BrickGraphError, match=message):
        multitask.plan(Stage.INFERENCE, outputs=["logit"])


def test_a_string_of_outputs_is_refused_not_split_into_characters(multitask):
    with pytest.raises(BrickGraphError, match=r"did you mean \['seg'\]"):
        multitask.plan(Stage.INFERENCE, outputs="seg")  # 's', 'e', 'g' would be looked up otherwise


def test_check_reports_every_problem_at_once():
    collection = BrickCollection({
        "a": linear(["x"], ["y"]), "b": linear(["x"], ["y"]),           # duplicate producer
        "c": linear(["d"], ["c"]), "d": linear(["c"], ["d"]),           # cycle
        "e": BrickModule(nn.Identity(), input_names=["x"], output_names=["stage"]),  # reserved
    })
    with pytest.raises(BrickGraphError) as info:
        collection.check()
    text = str(info.value)
    assert "more than one live brick" in text and "cycle" in text and "reserved" in text
    assert isinstance(info.value, ValueError)
    # one line per problem, naming the stages it occurs in, not one line per stage
    assert len(info.value.problems) == 3
    assert "In stages train, validation, test, inference and export: 'y' is produced" in text


def test_bad_constructor_arguments_are_graph_errors():
    with pytest.raises(BrickGraphError, match=r"input_names must be .* not the string 'x' \(did you mean \['x'\]"):
        BrickTrainable(nn.Identity(), input_names="x", output_names=["y"])  # type: ignore[arg-type]
    with pytest.raises(BrickGraphError, match=r"output_names must be a list"):
        BrickTrainable(nn.Identity(), input_names=["x"], output_names="y")  # type: ignore[arg-type]
    with pytest.raises(BrickGraphError, match=r"alive_stages must be"):
        BrickTrainable(nn.Identity(), input_names=["x"], output_names=["y"], alive_stages=3)  # type: ignore[arg-type]
    with pytest.raises(BrickGraphError, match=r"Unknown stage 'trian'"):
        BrickLoss(nn.MSELoss(), input_names=["x"], output_names=["y"], alive_stages=["trian"])
    with pytest.raises(BrickGraphError, match=r"Collection entry 'model' is a Linear, not a brick"):
        BrickCollection({"model": nn.Linear(2, 2)})
    with pytest.raises(BrickGraphError, match=r"loss_output_names \['z'\]"):
        BrickLoss(nn.MSELoss(), input_names=["x"], output_names=["y"], loss_output_names=["z"])


def test_failed_call_leaves_collection_usable(multitask, multitask_inputs):
    with pytest.raises(BrickGraphError):
        multitask({"raw": multitask_inputs["raw"]}, Stage.TRAIN)  # labels and masks missing
    assert all(m.training for m in multitask.modules())
    out = multitask(multitask_inputs, Stage.TRAIN)
    assert out["loss_cls"].requires_grad
    multitask["broken"] = linear(["nothing"], ["logits"])
    with pytest.raises(BrickGraphError):
        multitask.plan(Stage.TRAIN)
    del multitask["broken"]
    assert multitask.plan(Stage.TRAIN).bricks[-1] == "accuracy"
