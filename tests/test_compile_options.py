"""Compile options as users pass them: invalid ones refused when made, graphs Inductor cannot build left out
(or named), and benchmarks that warm the compiled stage up as its users would."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch._dynamo
from torch import nn

from torchbricks_fx import (
    BrickBackendError,
    BrickCollection,
    BrickTrainable,
    Stage,
    benchmark,
    compile_stage,
    compiling,
)
from torchbricks_fx.compiling import CompileOptions
from torchbricks_fx.lightning import BrickLightningModule


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def conv_collection() -> BrickCollection:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(8, 3))
    return BrickCollection({"net": BrickTrainable(model, input_names=["raw"], output_names=["logits"])})


def frozen_fastest(calls):
    return {name: 1.0 if name.startswith("compiled-frozen") else 2.0 for name in calls}


@pytest.mark.parametrize(("options", "message"), [
    (dict(freeze="yes"), "freeze takes True, False or None"),
    (dict(freeze=0), "freeze takes True, False or None"),
    (dict(dynamic_batch=None), "dynamic_batch takes True or False"),
    (dict(fail_on_recompile="no"), "fail_on_recompile takes True or False"),
    (dict(channels_last=1), "channels_last takes True or False"),
    (dict(mode="bogus"), "torch.compile's modes are default, reduce-overhead"),
    (dict(autocast=torch.float64), "autocast takes torch.bfloat16 or torch.float16"),
])
def test_invalid_options_are_refused_when_made(options, message):
    with pytest.raises(BrickBackendError, match=message):
        CompileOptions(**options)


@pytest.mark.parametrize("value", [1, "yes", {"freeze": True}])
def test_compile_takes_true_false_or_options(value):
    with pytest.raises(BrickBackendError, match=r"compile takes True, False or a CompileOptions"):
        compile_stage(conv_collection(), Stage.INFERENCE, compile=value)
    with pytest.raises(BrickBackendError, match=r"compile takes True, False or a CompileOptions"):
        BrickLightningModule(conv_collection(), optimizer_factory=torch.optim.SGD, compile=value)


def test_a_frozen_graph_inductor_cannot_build_is_left_out_with_a_warning():
    collection = conv_collection().double()
    images = {"raw": torch.rand(2, 3, 16, 16, dtype=torch.float64)}
    fast = compile_stage(collection, Stage.INFERENCE, compile=True)
    with pytest.warns(UserWarning, match=r"could not compile the 'compiled-frozen' graph \(RuntimeError: "):
        got = fast(images)["logits"]
    assert fast.compiled.choice in ("compiled", "eager") and "compiled-frozen" not in fast.compiled.timings
    torch.testing.assert_close(got, collection(images, Stage.INFERENCE)["logits"])


def test_asking_for_a_frozen_graph_inductor_cannot_build_says_what_to_do():
    collection = conv_collection().double()
    fast = compile_stage(collection, Stage.INFERENCE, compile=CompileOptions(freeze=True))
    with pytest.raises(torch._dynamo.exc.BackendCompilerFailed) as raised:
        fast({"raw": torch.rand(2, 3, 16, 16, dtype=torch.float64)})
    assert "CompileOptions(freeze=False) keeps the weights graph inputs" in str(raised.value.__notes__)


def test_a_frozen_stage_moved_to_float64_runs_another_graph(monkeypatch):
    monkeypatch.setattr(compiling, "seconds_per_call", frozen_fastest)
    collection = conv_collection()
    fast = compile_stage(collection, Stage.INFERENCE, compile=True)
    fast({"raw": torch.rand(2, 3, 16, 16)})
    assert fast.compiled.choice == "compiled-frozen"
    collection.to(torch.float64)  # the next call refreezes, and Inductor cannot freeze float64 convolutions
    images = {"raw": torch.rand(2, 3, 16, 16, dtype=torch.float64)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the warning is the test above's
        got = fast(images)["logits"]
    assert fast.compiled.choice == "compiled" and got.dtype == torch.float64
    torch.testing.assert_close(got, collection(images, Stage.INFERENCE)["logits"])


def test_benchmark_warms_the_compiled_stage_up_at_every_batch_size():
    options = CompileOptions(fail_on_recompile=True, freeze=False)
    results = benchmark(conv_collection(), {"raw": torch.rand(2, 3, 16, 16)}, backends=("eager", "compile"),
                        batch_sizes=[1, 32, 4], threads=1, min_run_time=0.01, compile_options=options)
    compiled = [r for r in results if r.backend == "compile"]
    assert [r.batch_size for r in compiled] == [1, 32, 4]
    assert all(not r.failed and r.matched for r in compiled), [r.reason for r in compiled]
    assert all(r.compiles for r in compiled)  # each size warmed up: a graph specialized to it
