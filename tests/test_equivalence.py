"""Randomly generated valid collections: eager == StageModule (== torch.compile on a sample), per stage.

Collections are random DAGs (built in a hidden order, declared shuffled), with random alive stages that
keep every stage valid, random bindings (positional, keyword, "all", the stage constant), single outputs
returned alone or as a tuple of one, and random output selections.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest
import torch
import torch._dynamo
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from torchbricks_fx import BrickCollection, BrickInterface, BrickModule, BrickOutputError, Stage, compile_stage
from torchbricks_fx.compile_options import CompileOptions

WIDTH = 4


class Mix(nn.Module):
    """Weighted sum of its inputs, then ``n_outputs`` different views; uses the stage when given one.  One
    output is returned alone, or (``as_tuple``) as a tuple of one."""

    def __init__(self, n_inputs: int, n_outputs: int, as_tuple: bool = False) -> None:
        super().__init__()
        self.weights = nn.Parameter(torch.randn(n_inputs, WIDTH))
        self.n_outputs = n_outputs
        self.as_tuple = as_tuple

    def mix(self, xs: list[torch.Tensor]) -> tuple[torch.Tensor, ...] | torch.Tensor:
        total = sum(x * w for x, w in zip(xs, self.weights, strict=True))
        outputs = tuple(torch.tanh(total + i) for i in range(self.n_outputs))
        return outputs if self.n_outputs > 1 or self.as_tuple else outputs[0]


class PositionalMix(Mix):
    def forward(self, *xs: torch.Tensor):
        return self.mix(list(xs))


class KeywordMix(Mix):
    def forward(self, **xs: torch.Tensor):
        return self.mix([xs[k] for k in sorted(xs)])


class StagedMix(Mix):
    def forward(self, *xs):
        *tensors, stage = xs
        scale = 2.0 if stage is Stage.TRAIN else 0.5
        result = self.mix([t * scale for t in tensors])
        return result


class AllMix(nn.Module):
    def __init__(self, n_outputs: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.randn(WIDTH))
        self.n_outputs = n_outputs

    def forward(self, values: dict[str, torch.Tensor]):
        total = sum(values.values()) * self.scale if values else self.scale.expand(1, WIDTH)
        outputs = tuple(torch.sin(total + i) for i in range(self.n_outputs))
        return outputs if self.n_outputs > 1 else outputs[0]


@dataclass
class RandomCase:
    collection: BrickCollection
    externals: list[str]


@st.composite
def random_cases(draw) -> RandomCase:
    rng = random.Random(draw(st.integers(0, 2**32 - 1)))
    torch.manual_seed(rng.randrange(2**31))
    externals = [f"in{i}" for i in range(draw(st.integers(1, 3)))]
    available = {name: frozenset(Stage) for name in externals}  # value -> stages where it exists
    bricks: list[tuple[str, BrickModule]] = []
    for index in range(draw(st.integers(1, 8))):
        kind = rng.choice(["positional", "positional", "keyword", "stage"])
        n_outputs = rng.choice([1, 1, 2, 3])
        outputs = [f"v{index}_{k}" for k in range(n_outputs)]
        inputs = rng.sample(sorted(available), k=rng.randint(1, min(3, len(available))))
        stages = frozenset.intersection(*(available[name] for name in inputs))
        alive = frozenset(s for s in stages if rng.random() < 0.8)
        as_tuple = rng.random() < 0.25
        if kind == "keyword":
            brick = BrickModule(KeywordMix(len(inputs), n_outputs, as_tuple),
                                input_names={f"arg{i}": name for i, name in enumerate(inputs)},
                                output_names=outputs, alive_stages=alive)
        elif kind == "stage":
            brick = BrickModule(StagedMix(len(inputs), n_outputs, as_tuple), input_names=[*inputs, "stage"],
                                output_names=outputs, alive_stages=alive)
        else:
            brick = BrickModule(PositionalMix(len(inputs), n_outputs, as_tuple), input_names=inputs,
                                output_names=outputs, alive_stages=alive)
        bricks.append((f"brick_{index}", brick))
        for output in outputs:
            available[output] = alive
    if draw(st.booleans()):
        # An "all" brick reads every value available before it; it is declared (and so runs) last.
        n_outputs = rng.choice([1, 2])
        alive = frozenset(s for s in Stage if rng.random() < 0.9)
        bricks.append(("all_last", BrickModule(AllMix(n_outputs), input_names="all",
                                               output_names=[f"all_{k}" for k in range(n_outputs)],
                                               alive_stages=alive)))
    all_bricks = [b for b in bricks if b[0].startswith("all")]
    others = [b for b in bricks if not b[0].startswith("all")]
    rng.shuffle(others)
    declared = others + all_bricks
    # nest some bricks one level down to exercise nested collections
    spec: dict = {}
    for name, brick in declared:
        if rng.random() < 0.3:
            spec.setdefault("group", {})[name] = brick
        else:
            spec[name] = brick
    return RandomCase(BrickCollection(spec), externals)


def inputs_for(plan, batch: int = 3) -> dict[str, torch.Tensor]:
    return {name: torch.randn(batch, WIDTH) for name in plan.required_inputs}


@settings(max_examples=200)
@given(case=random_cases(), data=st.data())
def test_random_collections_eager_equals_stage_module(case: RandomCase, data):
    case.collection.check()
    for stage in Stage:
        plan = case.collection.plan(stage)
        named_inputs = inputs_for(plan)
        expected = case.collection(named_inputs, stage)
        outputs = data.draw(st.one_of(st.none(), st.lists(st.sampled_from(plan.outputs), unique=True, min_size=1)
                                      if plan.outputs else st.none()))
        stage_module = compile_stage(case.collection, stage, outputs=outputs)
        selected = stage_module.plan
        actual = stage_module({name: named_inputs[name] for name in stage_module.input_names})
        assert list(actual) == list(outputs if outputs is not None else plan.outputs)
        for name, value in actual.items():
            torch.testing.assert_close(value, expected[name])
        # exactly the bricks the outputs need: one call_module node per graph brick
        nodes = [n for n in stage_module.graph_module.graph.nodes if n.op in ("call_module", "call_function")
                 and n.meta.get("torchbricks_fx.brick")]
        assert len(nodes) == len(selected.bricks)
        if stage is Stage.TRAIN and actual:
            check_gradients(case.collection, named_inputs, stage_module)


def check_gradients(collection: BrickCollection, named_inputs, stage_module) -> None:
    collection.zero_grad()
    eager_out = collection(named_inputs, Stage.TRAIN)
    eager_total = sum(eager_out[name].sum() for name in stage_module.output_names)
    eager_total.backward()
    eager_grads = {n: p.grad.clone() for n, p in collection.named_parameters() if p.grad is not None}
    collection.zero_grad()
    compiled_total = sum(v.sum() for v in stage_module(named_inputs).values())
    compiled_total.backward()
    compiled_grads = {n: p.grad for n, p in collection.named_parameters() if p.grad is not None}
    assert compiled_grads.keys() == eager_grads.keys()
    for name, grad in compiled_grads.items():
        torch.testing.assert_close(grad, eager_grads[name])


@pytest.mark.slow
@settings(max_examples=6)
@given(case=random_cases(), stage=st.sampled_from(list(Stage)))
def test_random_collections_torch_compile_equals_eager(case: RandomCase, stage: Stage):
    torch._dynamo.reset()
    plan = case.collection.plan(stage)
    named_inputs = inputs_for(plan)
    expected = case.collection(named_inputs, stage)
    compiled = torch.compile(compile_stage(case.collection, stage))
    for name, value in compiled(named_inputs).items():
        torch.testing.assert_close(value, expected[name], rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------- hand-written cases
class Thrice(nn.Module):
    """Returns its one output as a tuple of one, as torchbricks accepted."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor]:
        return (x * 3,)


class SeedPair(BrickInterface):
    """A seed-era brick whose one output is a tuple of two tensors."""

    def __init__(self) -> None:
        super().__init__(input_names=["y"], output_names=["pair"])

    def forward(self, named_inputs: dict, stage: Stage) -> dict:
        return {"pair": (named_inputs["y"], named_inputs["y"] * 2)}


def tuple_of_one_collection() -> BrickCollection:
    return BrickCollection({
        "thrice": BrickModule(Thrice(), input_names=["x"], output_names=["y"]),  # read by the next bricks
        "linear": BrickModule(nn.Linear(WIDTH, WIDTH), input_names=["y"], output_names=["z"]),
        "last": BrickModule(Thrice(), input_names=["z"], output_names=["w"]),  # a graph output
        "pair": SeedPair(),
    })


def assert_tuple_of_one_outputs(outputs: dict, x: torch.Tensor, linear: nn.Module) -> None:
    y = x * 3
    assert isinstance(outputs["y"], torch.Tensor) and isinstance(outputs["w"], torch.Tensor)
    torch.testing.assert_close(outputs["w"], linear(y) * 3)
    assert isinstance(outputs["pair"], tuple) and len(outputs["pair"]) == 2
    torch.testing.assert_close(outputs["pair"][1], y * 2)


@pytest.mark.parametrize("stage", [Stage.TRAIN, Stage.INFERENCE])
def test_a_tuple_of_one_is_unpacked_eagerly_and_in_stage_modules(stage):
    collection = tuple_of_one_collection()
    linear = collection["linear"].model
    x = torch.randn(3, WIDTH)
    assert_tuple_of_one_outputs(collection({"x": x}, stage), x, linear)
    stage_module = compile_stage(collection, stage)
    for _ in range(2):  # the first call checks arities, later ones run the graph directly
        assert_tuple_of_one_outputs(stage_module({"x": x}), x, linear)
    torch._dynamo.reset()
    traced = torch.compile(compile_stage(collection, stage), backend="eager", fullgraph=True)  # traced first
    assert_tuple_of_one_outputs(traced({"x": x}), x, linear)


def test_a_stage_with_tuples_of_one_exports_to_onnx(tmp_path):
    from torchbricks_fx import export_onnx

    collection = BrickCollection({name: collection_brick for name, collection_brick in
                                  tuple_of_one_collection().items() if name != "pair"})  # ONNX: tensors only
    report = export_onnx(collection, tmp_path / "m.onnx", {"x": torch.randn(2, WIDTH)})
    assert report.verified and report.output_names == ("y", "z", "w")


def test_an_all_brick_may_change_the_dict_it_receives():
    def pop_x(values: dict) -> torch.Tensor:
        return values.pop("x") * 2

    collection = BrickCollection({"copy": BrickModule(nn.Identity(), input_names=["x"], output_names=["y"]),
                                  "all": BrickModule(pop_x, input_names="all", output_names=["z"])})
    x = torch.ones(2)
    expected = collection({"x": x}, Stage.INFERENCE)
    stage_module = compile_stage(collection, Stage.INFERENCE)
    for _ in range(2):  # the first call runs the arity check, which handed the dict over read-only
        torch.testing.assert_close(stage_module({"x": x})["z"], expected["z"])


@pytest.mark.slow
def test_a_tuple_of_one_is_unpacked_in_a_fast_stage():
    torch._dynamo.reset()
    collection = tuple_of_one_collection()
    x = torch.randn(3, WIDTH)
    fast = compile_stage(collection, Stage.INFERENCE, compile=CompileOptions(freeze=False))
    for _ in range(2):
        assert_tuple_of_one_outputs(fast({"x": x}), x, collection["linear"].model)
    # Warmed up on several sizes with recompiles refused: the first call's unpacking keeps the stage's
    # compiled graph, which the warm-up holds (each size gets its own graph, later sizes compile nothing).
    torch._dynamo.reset()
    strict = compile_stage(collection, Stage.INFERENCE,
                           compile=CompileOptions(freeze=False, fail_on_recompile=True))
    compiled = strict.compiled
    strict.warm_up({"x": x}, batch_sizes=[1, 2])
    assert strict.compiled is compiled and compiled.batch_sizes == (1, 2)
    for batch_size in (1, 2, 5):
        inputs = torch.randn(batch_size, WIDTH)
        assert_tuple_of_one_outputs(strict({"x": inputs}), inputs, collection["linear"].model)


def test_a_brick_without_output_names_must_return_none():
    x = torch.ones(1, 2)
    returns = BrickCollection({"head": BrickModule(nn.Linear(2, 3), input_names=["x"], output_names=[])})
    message = r"Brick 'head' returned one Tensor but declares no output names"
    with pytest.raises(BrickOutputError, match=message):
        returns({"x": x}, Stage.INFERENCE)
    with pytest.raises(BrickOutputError, match=message):
        compile_stage(returns, Stage.INFERENCE)({"x": x})
    torch._dynamo.reset()
    with pytest.raises(BrickOutputError, match=message):
        torch.compile(compile_stage(returns, Stage.INFERENCE), backend="eager")({"x": x})
    seen: list[torch.Tensor] = []
    side_effect = BrickCollection({"log": BrickModule(seen.append, input_names=["x"], output_names=[])})
    assert side_effect({"x": x}, Stage.INFERENCE).keys() == {"x"}
    assert compile_stage(side_effect, Stage.INFERENCE)({"x": x}) == {}
    assert len(seen) == 2
