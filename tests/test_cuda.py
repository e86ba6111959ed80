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
    for name, value in collection.summarize(stage, reset=True).items():
        assert torch.isfinite(torch.as_tensor(value)).all(), name  # metric states updated on the GPU


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


def test_deploy_on_cuda_judges_candidates_with_per_class_metric_states(tmp_path):
    """deploy moves the collection to the GPU, metric bricks with it; candidates are judged on the CPU with
    fresh copies of those bricks (macro accuracy keeps one state per class: a GPU state would not mix)."""
    from torch import nn
    from torchmetrics.classification import MulticlassAccuracy

    from torchbricks_fx import BrickLoss, BrickMetricSingle, BrickTrainable, deploy

    torch.manual_seed(0)
    collection = BrickCollection({
        "head": BrickTrainable(nn.Linear(4, 3), ["x"], ["logits"]),
        "loss": BrickLoss(nn.CrossEntropyLoss(), ["logits", "targets"], ["loss_ce"]),
        "accuracy": BrickMetricSingle(MulticlassAccuracy(num_classes=3), ["logits", "targets"]),
    })
    batches = [{"x": torch.randn(8, 4), "targets": torch.randint(0, 3, (8,))} for _ in range(3)]
    report = deploy(collection, tmp_path / "bundle", {"x": torch.randn(2, 4)}, validation=batches, device="cuda",
                    candidates=["onnxruntime", "pt2"], batch_sizes=[1], min_run_time=0.01)
    chosen = report.chosen_result
    assert chosen is not None and chosen.accepted
    drops = chosen.metric_drops
    assert drops and all(abs(drop) < 1e-6 for drop in drops.values())  # the same predictions as eager


def _tf32_settings() -> tuple[object, ...]:
    conv, matmul = torch.backends.cudnn.conv, torch.backends.cuda.matmul
    if hasattr(conv, "fp32_precision"):  # torch >= 2.9 (the legacy flags raise once these were set)
        return conv.fp32_precision, matmul.fp32_precision
    return torch.backends.cudnn.allow_tf32, matmul.allow_tf32


class _PrecisionRecorder(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[object, ...]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(_tf32_settings())
        return x * 2


def test_benchmark_on_cuda_computes_float32_as_onnxruntime_does():
    """ONNX Runtime runs with TF32 off; torch's backends are timed the same way, then the caller's TF32
    settings are back."""
    from torchbricks_fx import BrickTrainable, benchmark

    recorder = _PrecisionRecorder()
    collection = BrickCollection({"double": BrickTrainable(recorder, ["x"], ["y"])})
    before = _tf32_settings()
    benchmark(collection, {"x": torch.rand(2, 4)}, device="cuda", backends=["eager"], min_run_time=0.01)
    assert recorder.seen and all(seen in {("ieee", "ieee"), (False, False)} for seen in recorder.seen)
    assert _tf32_settings() == before
