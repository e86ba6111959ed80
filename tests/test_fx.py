"""compile_stage: the per-stage GraphModule, the StageModule around it, and torch.compile on both."""

from __future__ import annotations

import operator

import pytest
import torch
import torch._dynamo
from conftest import multitask_bricks
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
from torchbricks_fx.fx import META_BRICK


def call_module_nodes(stage_module) -> list[torch.fx.Node]:
    return [n for n in stage_module.graph_module.graph.nodes if n.op == "call_module"]


def assert_same(actual: dict, expected: dict) -> None:
    assert set(actual) <= set(expected)
    for name, value in actual.items():
        torch.testing.assert_close(value, expected[name], msg=lambda m, name=name: f"{name}: {m}")


def test_graph_has_one_node_per_live_brick(multitask):
    stage_module = compile_stage(multitask, Stage.INFERENCE)
    graph = stage_module.graph_module.graph
    ops = [n.op for n in graph.nodes]
    assert ops.count("placeholder") == 1 and ops.count("output") == 1
    assert [n.meta[META_BRICK] for n in call_module_nodes(stage_module)] == [
        "preprocessor", "backbone", "heads.classifier", "heads.segmenter"]
    getitems = [n for n in graph.nodes if n.op == "call_function" and n.target is operator.getitem]
    assert len(getitems) == 2  # logits and prediction unpacked from the classifier's tuple
    assert stage_module.input_names == ("raw",)
    assert stage_module.output_names == ("image", "features", "logits", "prediction", "seg")
    assert set(stage_module.pruned) == {"loss_cls", "loss_seg", "accuracy"}
    assert stage_module.stage is Stage.INFERENCE


def test_output_selection_prunes_nodes_and_state(multitask, multitask_inputs):
    stage_module = compile_stage(multitask, Stage.INFERENCE, outputs=["seg"])
    assert [n.meta[META_BRICK] for n in call_module_nodes(stage_module)] == [
        "preprocessor", "backbone", "heads.segmenter"]
    out = stage_module({"raw": multitask_inputs["raw"]})
    assert list(out) == ["seg"]
    keys = stage_module.state_dict().keys()
    assert any(k.startswith("graph_module.backbone.") for k in keys)
    assert not any("classifier" in k for k in keys)


def test_modules_are_shared_not_copied(multitask, multitask_inputs):
    stage_module = compile_stage(multitask, Stage.INFERENCE, outputs=["logits"])
    assert stage_module.graph_module.backbone is multitask["backbone"].model
    before = stage_module(multitask_inputs)["logits"]
    with torch.no_grad():
        multitask["heads"]["classifier"].model.fc.bias += 1.0
    torch.testing.assert_close(stage_module(multitask_inputs)["logits"], before + 1.0)


@pytest.mark.parametrize("stage", list(Stage))
def test_stage_module_equals_eager(multitask, multitask_inputs, stage):
    plan = multitask.plan(stage)
    inputs = {name: multitask_inputs[name] for name in plan.required_inputs}
    expected = multitask(inputs, stage)
    eager_metrics = multitask.summarize(stage, reset=True)
    actual = compile_stage(multitask, stage)(inputs)
    assert list(actual) == list(plan.outputs)
    assert_same(actual, expected)
    assert_same(multitask.summarize(stage, reset=True), eager_metrics)


def test_gradients_equal_in_train(multitask_inputs):
    torch.manual_seed(0)
    eager = BrickCollection(multitask_bricks())
    torch.manual_seed(0)
    compiled = BrickCollection(multitask_bricks())
    out = eager(multitask_inputs, Stage.TRAIN)
    sum(eager.extract_losses(out).values()).backward()
    stage_module = compile_stage(compiled, Stage.TRAIN)
    out_fx = stage_module(multitask_inputs)
    sum(compiled.extract_losses(out_fx).values()).backward()
    grads = {n: p.grad for n, p in eager.named_parameters() if p.grad is not None}
    assert grads and {n for n, p in compiled.named_parameters() if p.grad is not None} == set(grads)
    for name, parameter in compiled.named_parameters():
        if parameter.grad is not None:
            torch.testing.assert_close(parameter.grad, grads[name])


def test_stage_modes_whatever_the_caller_left(multitask, multitask_inputs):
    inference = compile_stage(multitask, Stage.INFERENCE)
    multitask.train()
    out = inference({"raw": multitask_inputs["raw"]})
    assert not out["seg"].requires_grad
    single = inference({"raw": multitask_inputs["raw"][:1]})["logits"]
    torch.testing.assert_close(single, out["logits"][:1])  # BatchNorm used running stats
    assert all(m.training for m in multitask.modules())

    train = compile_stage(multitask, Stage.TRAIN)
    multitask.eval()
    assert train(multitask_inputs)["loss_cls"].requires_grad
    assert all(m.training for m in multitask["backbone"].model.modules())  # TRAIN leaves train mode


def test_dropout_per_stage():
    collection = BrickCollection({"drop": BrickTrainable(nn.Dropout(0.5), input_names=["x"], output_names=["y"])})
    x = torch.ones(1000)
    assert torch.equal(compile_stage(collection, Stage.TEST)({"x": x})["y"], x)
    assert not torch.equal(compile_stage(collection, Stage.TRAIN)({"x": x})["y"], x)


def test_calculate_gradients_false_blocks_gradients_in_graph():
    first = nn.Linear(3, 3)
    collection = BrickCollection({
        "first": BrickTrainable(first, input_names=["x"], output_names=["h"]),
        "frozen": BrickNotTrainable(nn.Linear(3, 3), input_names=["h"], output_names=["y"],
                                    calculate_gradients=False),
        "after": BrickTrainable(nn.Linear(3, 3), input_names=["y"], output_names=["z"]),
    })
    stage_module = compile_stage(collection, Stage.TRAIN)
    out = stage_module({"x": torch.randn(2, 3)})
    assert not out["y"].requires_grad and out["z"].requires_grad
    out["z"].sum().backward()
    assert first.weight.grad is None and collection["after"].model.weight.grad is not None


class Pair(nn.Module):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x, x


def test_output_arity_is_checked_on_first_call():
    one_for_two = BrickCollection({"head": BrickTrainable(nn.Identity(), input_names=["x"],
                                                          output_names=["a", "b"])})
    with pytest.raises(BrickOutputError, match=r"Brick 'head' returned one Tensor but declares 2"):
        compile_stage(one_for_two, Stage.INFERENCE)({"x": torch.ones(2, 2)})
    two_for_one = BrickCollection({"head": BrickTrainable(Pair(), input_names=["x"], output_names=["a"])})
    with pytest.raises(BrickOutputError, match=r"Brick 'head' returned a tuple of 2 values"):
        compile_stage(two_for_one, Stage.INFERENCE)({"x": torch.ones(2)})


class Lookup(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return {"a": x}["missing"]


class FailsOnSecondCall(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls > 1:
            raise ValueError("bad batch")
        return x


def test_brick_errors_keep_type_message_and_note():
    # As eagerly: the brick's own error, named by a note, without torch.fx's interpreter text.
    stage_module = compile_stage(BrickCollection({"a": BrickTrainable(Lookup(), input_names=["x"],
                                                                      output_names=["y"])}), Stage.INFERENCE)
    for _ in range(2):  # the first call's arity check, then again (it never completed)
        with pytest.raises(KeyError) as caught:
            stage_module({"x": torch.ones(1)})
        assert str(caught.value) == "'missing'" and caught.value.__notes__ == ["(raised in brick 'a')"]
    later = compile_stage(BrickCollection({"b": BrickTrainable(FailsOnSecondCall(), input_names=["x"],
                                                               output_names=["y"])}), Stage.INFERENCE)
    later({"x": torch.ones(1)})
    with pytest.raises(ValueError) as caught:
        later({"x": torch.ones(1)})
    assert caught.value.args == ("bad batch",) and caught.value.__notes__ == ["(raised in brick 'b')"]
    two_for_one = BrickCollection({"head": BrickTrainable(Pair(), input_names=["x"], output_names=["a"])})
    with pytest.raises(BrickOutputError) as caught:
        compile_stage(two_for_one, Stage.INFERENCE)({"x": torch.ones(2)})
    assert "While executing" not in str(caught.value) and "tlparse" not in str(caught.value)


def test_missing_input_is_a_graph_error(multitask, multitask_inputs):
    stage_module = compile_stage(multitask, Stage.TRAIN)
    with pytest.raises(BrickGraphError, match=r"Input 'masks' needed by brick 'loss_seg'"):
        stage_module({"raw": multitask_inputs["raw"], "labels": multitask_inputs["labels"]})


class StageAware(nn.Module):
    def forward(self, x: torch.Tensor, stage: Stage) -> torch.Tensor:
        return x * 10 if stage is Stage.TRAIN else x


class Everything(nn.Module):
    def forward(self, values: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.stack(list(values.values())).sum(dim=0)


class Sub(nn.Module):
    def forward(self, minuend: torch.Tensor, subtrahend: torch.Tensor) -> torch.Tensor:
        return minuend - subtrahend


def odd_collection() -> BrickCollection:
    return BrickCollection({
        "1st-brick": BrickTrainable(StageAware(), input_names=["raw input", "stage"], output_names=["scaled"]),
        "class": BrickTrainable(Sub(), input_names={"subtrahend": "raw input", "minuend": "scaled"},
                                output_names=["diff"]),
        "nested group": {"all": BrickTrainable(Everything(), input_names="all", output_names=["total"])},
    })


@pytest.mark.parametrize("stage", [Stage.TRAIN, Stage.INFERENCE])
def test_keyword_all_stage_bindings_and_odd_names(stage):
    collection = odd_collection()
    x = torch.tensor([1.0, 2.0])
    stage_module = compile_stage(collection, stage)
    assert_same(stage_module({"raw input": x}), collection({"raw input": x}, stage))
    code = stage_module.graph_module.code
    assert f"Stage.{stage.name}" in code  # the stage is a constant of the graph


class AddAndSubtract(nn.Module):
    def forward(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return a + 2 * b, a - b


@pytest.mark.parametrize("stage", [Stage.TRAIN, Stage.INFERENCE])
def test_values_and_bricks_named_self_compile_and_keep_their_names(stage):
    """``self`` is the generated forward's first argument: a value or brick of that name must not clash."""
    collection = BrickCollection({
        "first": BrickTrainable(nn.Identity(), input_names=["a"], output_names=["a2"]),
        "self": BrickTrainable(AddAndSubtract(), input_names=["a2", "self"], output_names=["sum", "b_self"]),
        "last": BrickTrainable(nn.Identity(), input_names=["sum"], output_names=["self_out"]),
        "named": BrickTrainable(nn.Identity(), input_names=["b_self"], output_names=["self_2"]),
    })
    inputs = {"a": torch.ones(1), "self": torch.full((1,), 5.0)}
    stage_module = compile_stage(collection, stage)
    assert stage_module.input_names == ("a", "self")
    outputs = stage_module(inputs)
    assert set(outputs) == {"a2", "sum", "b_self", "self_out", "self_2"}
    assert float(outputs["self_out"]) == 11.0 and float(outputs["self_2"]) == -4.0
    assert_same(outputs, collection(inputs, stage))
    single = BrickCollection({"b": BrickTrainable(nn.Identity(), input_names=["a"], output_names=["self"])})
    assert_same(compile_stage(single, stage)({"a": torch.ones(1)}), {"self": torch.ones(1)})


def test_metric_outputs_cannot_feed_graph_bricks():
    from torchmetrics.classification import MulticlassAccuracy

    collection = BrickCollection({
        "acc": BrickMetricSingle(MulticlassAccuracy(num_classes=2), input_names=["p", "t"], metric_name="accuracy",
                                 return_metrics=True),
        "use": BrickTrainable(nn.Identity(), input_names=["accuracy"], output_names=["copy"],
                              alive_stages=[Stage.TRAIN]),
    })
    with pytest.raises(BrickGraphError, match=r"Brick 'use' reads 'accuracy', returned by metric brick 'acc'"):
        compile_stage(collection, Stage.TRAIN)


# ------------------------------------------------------------------------------------------- torch.compile
@pytest.mark.parametrize("stage", list(Stage))
def test_torch_compile_of_stage_module_equals_eager(multitask, multitask_inputs, stage):
    torch._dynamo.reset()
    plan = multitask.plan(stage)
    inputs = {name: multitask_inputs[name] for name in plan.required_inputs}
    expected = multitask(inputs, stage)
    stage_module = compile_stage(multitask, stage)
    explanation = torch._dynamo.explain(stage_module)(inputs)
    # Metric updates run eagerly behind torch.compiler.disable; nothing else may break the graph.
    assert explanation.graph_break_count == 0, explanation.break_reasons
    compiled = torch.compile(stage_module)
    multitask.summarize(stage, reset=True)
    assert_same(compiled(inputs), expected)
    compiled_metrics = multitask.summarize(stage, reset=True)
    multitask(inputs, stage)
    assert_same(compiled_metrics, multitask.summarize(stage, reset=True))


def test_torch_compile_of_a_fresh_stage_checks_output_arity():
    torch._dynamo.reset()
    x = torch.ones(2)
    two_for_one = BrickCollection({"a": BrickTrainable(Pair(), input_names=["x"], output_names=["y"])})
    compiled = torch.compile(compile_stage(two_for_one, Stage.INFERENCE))
    for _ in range(2):
        with pytest.raises(BrickOutputError, match=r"Brick 'a' returned a tuple of 2 values"):
            compiled({"x": x})
    one_for_two = BrickCollection({"a": BrickTrainable(nn.Identity(), input_names=["x"], output_names=["y", "z"])})
    with pytest.raises(BrickOutputError, match=r"Brick 'a' returned one Tensor but declares 2"):
        torch.compile(compile_stage(one_for_two, Stage.INFERENCE))({"x": x})
    # A right arity is checked while tracing: no graph break, and the same values as eagerly.
    good = BrickCollection({"a": BrickTrainable(Pair(), input_names=["x"], output_names=["y", "z"]),
                            "b": BrickTrainable(nn.Linear(2, 2), input_names=["z"], output_names=["w"])})
    assert torch._dynamo.explain(compile_stage(good, Stage.TRAIN))({"x": x}).graph_break_count == 0
    assert_same(torch.compile(compile_stage(good, Stage.TRAIN), fullgraph=True)({"x": x}), good({"x": x}, Stage.TRAIN))


def test_fullgraph_compile_of_graph_module_with_dynamic_batch(multitask, multitask_inputs):
    torch._dynamo.reset()
    multitask.eval()
    stage_module = compile_stage(multitask, Stage.INFERENCE, outputs=["logits", "seg"])
    compiled = torch.compile(stage_module.graph_module, fullgraph=True, dynamic=True)
    for batch in (2, 3, 5):
        raw = torch.rand(batch, 3, 16, 16)
        logits, seg = compiled(raw)
        expected = multitask({"raw": raw}, Stage.INFERENCE)
        torch.testing.assert_close(logits, expected["logits"], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(seg, expected["seg"], rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------- diagram
def test_mermaid_diagram_per_stage(multitask):
    text = multitask.to_mermaid(Stage.INFERENCE)
    assert text.startswith("flowchart LR")
    assert 'in_raw(["raw"])' in text
    assert "b_backbone -->|features| b_heads_classifier" in text
    assert "out_seg" in text
    assert "class b_loss_cls,b_loss_seg,b_accuracy pruned" in text
    assert "-.->|labels|" in text  # the pruned loss's edges are dashed
    everything = multitask.to_mermaid()
    assert "pruned" not in everything and "b_loss_seg" in everything


def test_mermaid_draws_the_edges_of_all_bricks_and_of_every_producer():
    everything = BrickCollection({
        "a": BrickTrainable(nn.Identity(), input_names=["x"], output_names=["y"]),
        "b": BrickTrainable(lambda values: values["y"], input_names="all", output_names=["z"]),
    })
    for text in (everything.to_mermaid(Stage.INFERENCE), everything.to_mermaid()):
        assert "in_x -->|x| b_b" in text and "b_a -->|y| b_b" in text  # an "all" brick reads every value
    pruned = everything.to_mermaid(Stage.INFERENCE, outputs=["y"])
    assert "b_a -.->|y| b_b" in pruned and "class b_b pruned" in pruned
    per_stage = BrickCollection({
        "a": BrickTrainable(nn.Identity(), input_names=["in"], output_names=["x"], alive_stages=["train"]),
        "b": BrickTrainable(nn.Identity(), input_names=["in"], output_names=["x"], alive_stages=["inference"]),
        "c": BrickTrainable(nn.Identity(), input_names=["x"], output_names=["y"]),
    })
    text = per_stage.to_mermaid()
    assert "b_a -->|x| b_c" in text and "b_b -->|x| b_c" in text
    inference = per_stage.to_mermaid(Stage.INFERENCE)
    assert "b_b -->|x| b_c" in inference and "|x| b_c" not in inference.replace("b_b -->|x| b_c", "")


def test_many_compiled_stage_modules_each_get_their_own_graph():
    # One shared forward code object would hit Dynamo's recompile limit (8) and silently run eagerly.
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    x = torch.randn(2, 4)
    for _ in range(10):
        collection = BrickCollection({"a": BrickTrainable(nn.Linear(4, 4), input_names=["x"], output_names=["y"])})
        before = counters["stats"]["unique_graphs"]
        torch.compile(compile_stage(collection, Stage.INFERENCE))({"x": x})
        assert counters["stats"]["unique_graphs"] == before + 1


def test_stage_module_survives_deepcopy_and_pickle(multitask, multitask_inputs):
    import copy
    import pickle

    stage_module = compile_stage(multitask, Stage.INFERENCE)
    expected = stage_module({"raw": multitask_inputs["raw"]})
    for clone in (copy.deepcopy(stage_module), pickle.loads(pickle.dumps(stage_module))):
        assert_same(clone({"raw": multitask_inputs["raw"]}), expected)
