"""CUDA paths of the core runtime (skipped without a GPU; run on a GPU machine)."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from conftest import multitask_bricks

from torchbricks_fx import BrickCollection, Stage, compile_stage

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture
def on_cuda():
    torch.manual_seed(0)
    collection = BrickCollection(multitask_bricks()).cuda()
    inputs = {"raw": torch.rand(4, 3, 16, 16, device="cuda"), "labels": torch.tensor([0, 1, 2, 1], device="cuda"),
              "masks": torch.randint(0, 2, (4, 16, 16), device="cuda")}
    return collection, inputs


@pytest.mark.parametrize("stage", list(Stage))
def test_stage_module_equals_eager_on_cuda(on_cuda, stage):
    collection, inputs = on_cuda
    plan = collection.plan(stage)
    named = {name: inputs[name] for name in plan.required_inputs}
    expected = collection(named, stage)
    actual = compile_stage(collection, stage)(named)
    for name, value in actual.items():
        assert value.is_cuda
        torch.testing.assert_close(value, expected[name])
    assert collection.summarize(stage, reset=True).keys() == collection.summarize(stage).keys()


def test_torch_compile_on_cuda_equals_eager(on_cuda):
    torch._dynamo.reset()
    collection, inputs = on_cuda
    stage_module = compile_stage(collection, Stage.INFERENCE)
    expected = collection({"raw": inputs["raw"]}, Stage.INFERENCE)
    compiled = torch.compile(stage_module)
    for name, value in compiled({"raw": inputs["raw"]}).items():
        torch.testing.assert_close(value, expected[name], rtol=1e-3, atol=1e-4)


def test_train_stage_backward_on_cuda(on_cuda):
    collection, inputs = on_cuda
    out = compile_stage(collection, Stage.TRAIN)(inputs)
    sum(collection.extract_losses(out).values()).backward()
    assert collection["backbone"].model.conv.weight.grad is not None
    assert collection["backbone"].model.conv.weight.grad.is_cuda
