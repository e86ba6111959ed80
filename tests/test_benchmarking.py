"""benchmark / profile_bricks / rendering: structure and behaviour, never speed."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from torchbricks_fx import (
    BenchmarkResult,
    BrickBackendError,
    BrickCollection,
    BrickExportError,
    BrickGraphError,
    BrickLoss,
    BrickMetricSingle,
    BrickNotTrainable,
    BrickProfile,
    BrickTrainable,
    Stage,
    benchmark,
    profile_bricks,
)
from torchbricks_fx import runners as backends_module
from torchbricks_fx.benchmarking import resize_batch
from torchbricks_fx.compiling import CompileOptions
from torchbricks_fx.numerics import compare_outputs, compare_tensors, tolerance
from torchbricks_fx.ort import ort_providers, require_cuda_provider
from torchbricks_fx.reporting import JSON_SCHEMA, plot, profile_to_markdown, results_from_json, to_json, to_markdown

FAST = 0.01
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


class Scale(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2


class Counting(nn.Module):
    """Counts its calls: proves that argument errors are raised before any work."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 4)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.linear(x)


def tiny_collection() -> BrickCollection:
    torch.manual_seed(0)
    return BrickCollection({
        "pre": BrickNotTrainable(Scale(), input_names=["x"], output_names=["scaled"]),
        "body": BrickTrainable(nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5)), input_names=["scaled"],
                               output_names=["features"]),
        "head": BrickTrainable(nn.Linear(4, 2), input_names=["features"], output_names=["logits"]),
        "loss": BrickLoss(nn.CrossEntropyLoss(), input_names=["logits", "targets"], output_names=["loss"]),
    })


@pytest.fixture
def collection() -> BrickCollection:
    return tiny_collection()


@pytest.fixture
def inputs() -> dict[str, torch.Tensor]:
    return {"x": torch.randn(3, 4)}


# ------------------------------------------------------------------------------------------- results
def test_eager_and_fx_results_have_the_documented_structure(collection, inputs):
    results = benchmark(collection, inputs, backends=("eager", "fx"), batch_sizes=[1, 5], min_run_time=FAST)
    assert [(r.backend, r.batch_size) for r in results] == [("eager", 1), ("eager", 5), ("fx", 1), ("fx", 5)]
    for r in results:
        assert isinstance(r, BenchmarkResult)
        assert not r.failed and r.reason is None
        assert r.device == "cpu" and r.stage == "inference" and r.threads == torch.get_num_threads()
        assert r.median_s > 0 and r.iqr_s >= 0 and r.runs >= 1
        assert r.throughput == pytest.approx(r.batch_size / r.median_s)
        assert r.matched is True and r.max_abs_error == 0.0
        assert r.peak_memory_bytes is None  # CPU
        assert r.warmup_seconds is not None and r.warmup_seconds >= 0
    eager = {r.batch_size: r for r in results if r.backend == "eager"}
    for r in results:
        assert r.speedup_vs_eager == pytest.approx(eager[r.batch_size].median_s / r.median_s)
    assert eager[1].setup_seconds is None and eager[1].compile_seconds == eager[1].warmup_seconds
    fx = results[2]
    assert fx.setup_seconds is not None and fx.compile_seconds == pytest.approx(fx.setup_seconds + fx.warmup_seconds)


def test_results_are_frozen(collection, inputs):
    result = benchmark(collection, inputs, backends=["eager"], min_run_time=FAST)[0]
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.median_s = 0.0  # type: ignore[misc]


def test_default_batch_size_is_the_examples_and_stage_is_inference(collection, inputs):
    (result,) = benchmark(collection, inputs, backends="eager", min_run_time=FAST)
    assert result.batch_size == 3 and result.stage == Stage.INFERENCE.value


def test_threads_are_set_for_the_run_and_restored(collection, inputs):
    before = torch.get_num_threads()
    seen = []
    results = benchmark(collection, inputs, backends=["eager"], threads=1, min_run_time=FAST,
                        progress=lambda line: seen.append(torch.get_num_threads()))
    assert results[0].threads == 1 and set(seen) == {1}
    assert torch.get_num_threads() == before


def test_modes_and_grad_mode_are_left_as_found(collection, inputs):
    collection.train()
    benchmark(collection, inputs, backends=["eager", "fx"], min_run_time=FAST)
    assert all(m.training for m in collection.modules())
    assert torch.is_grad_enabled()


def test_outputs_select_what_is_compared_and_returned(collection, inputs):
    results = benchmark(collection, inputs, outputs=["features"], backends=["eager", "fx"], min_run_time=FAST)
    assert all(r.matched for r in results)


def test_train_stage_runs_with_its_inputs(collection):
    results = benchmark(collection, {"x": torch.randn(3, 4), "targets": torch.tensor([0, 1, 1])},
                        stage="train", outputs=["logits"], backends=["eager", "fx"], min_run_time=FAST)
    assert [r.stage for r in results] == ["train", "train"] and not any(r.failed for r in results)


def test_train_with_dropout_matches_eager_and_leaves_the_random_generator_as_it_was(collection):
    # "body" has Dropout(0.5): every compared call must draw the same mask as eager's reference.
    named_inputs = {"x": torch.randn(4, 4), "targets": torch.tensor([0, 1, 1, 0])}
    before = torch.get_rng_state()
    results = benchmark(collection, named_inputs, stage="train", backends=["eager", "fx"], batch_sizes=[4, 6],
                        min_run_time=FAST)
    assert [(r.backend, r.matched, r.max_abs_error) for r in results] == [
        ("eager", True, 0.0), ("eager", True, 0.0), ("fx", True, 0.0), ("fx", True, 0.0)]
    assert torch.equal(torch.get_rng_state(), before)
    profile_bricks(collection, named_inputs, stage="train", min_run_time=FAST)
    assert torch.equal(torch.get_rng_state(), before)


def test_progress_reports_each_backend_and_batch_size(collection, inputs):
    lines: list[str] = []
    benchmark(collection, inputs, backends=["eager", "fx"], batch_sizes=[1, 2], min_run_time=FAST,
              progress=lines.append)
    assert any(line.startswith("fx batch 2:") for line in lines)
    assert sum("batch" in line for line in lines) == 4


def test_timing_train_or_metric_stages_leaves_buffers_and_metrics_as_they_were():
    from torchmetrics.classification import MulticlassAccuracy

    torch.manual_seed(0)
    collection = BrickCollection({
        "body": BrickTrainable(nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3)), input_names=["x"],
                               output_names=["logits"]),
        "argmax": BrickNotTrainable(lambda t: t.argmax(dim=1), input_names=["logits"], output_names=["pred"]),
        "accuracy": BrickMetricSingle(MulticlassAccuracy(num_classes=3), input_names=["pred", "labels"]),
    })
    named_inputs = {"x": torch.randn(4, 4), "labels": torch.tensor([0, 1, 2, 0])}
    collection(named_inputs, stage=Stage.TRAIN)
    buffers = {k: v.clone() for k, v in collection.state_dict().items()}
    metrics = collection.summarize(Stage.TRAIN)
    for stage in (Stage.TRAIN, Stage.TEST):
        benchmark(collection, named_inputs, stage=stage, backends=["eager", "fx"], min_run_time=FAST)
        profile_bricks(collection, named_inputs, stage=stage, min_run_time=FAST)
    assert all(torch.equal(v, buffers[k]) for k, v in collection.state_dict().items())
    assert collection.summarize(Stage.TRAIN) == metrics
    assert [m.update_count for m in collection["accuracy"].metrics["TEST"].values()] == [0]


# ------------------------------------------------------------------------------------------- bad arguments
@pytest.mark.parametrize(("kwargs", "match"), [
    ({"backends": ["eager", "tensorrt"]}, r"'tensorrt'.*valid backends: eager, fx, compile, onnxruntime, cudagraphs"),
    ({"backends": []}, "valid backends"),
    ({"device": "tpu"}, "valid devices"),
    ({"backends": ["cudagraphs"]}, "need device='cuda'"),
    ({"batch_sizes": [0]}, "positive integers"),
    ({"threads": 0}, "threads"),
    ({"min_run_time": 0}, "min_run_time"),
])
def test_bad_arguments_raise_before_any_work(kwargs, match):
    counting = Counting()
    collection = BrickCollection({"a": BrickTrainable(counting, input_names=["x"], output_names=["y"])})
    with pytest.raises(BrickBackendError, match=match):
        benchmark(collection, {"x": torch.randn(2, 4)}, **{"min_run_time": FAST, **kwargs})
    assert counting.calls == 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_without_cuda_is_a_backend_error(collection, inputs):
    with pytest.raises(BrickBackendError, match="CUDA is not available"):
        benchmark(collection, inputs, device="cuda", backends=["eager"])


def test_invalid_stage_and_outputs_are_graph_errors(collection, inputs):
    with pytest.raises(BrickGraphError, match="valid stages"):
        benchmark(collection, inputs, stage="deploy", backends=["eager"])
    with pytest.raises(BrickGraphError, match="nope"):
        benchmark(collection, inputs, outputs=["nope"], backends=["eager"])


# ------------------------------------------------------------------------------------------- failures
def test_a_backend_failing_at_setup_is_reported_and_the_others_run(collection, inputs, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no fx today")

    monkeypatch.setattr(backends_module, "_fx_runner", broken)
    results = benchmark(collection, inputs, backends=["fx", "eager"], batch_sizes=[1, 2], min_run_time=FAST)
    failed = [r for r in results if r.backend == "fx"]
    assert len(failed) == 2 and all(r.failed and r.median_s is None for r in failed)
    assert failed[0].reason == "RuntimeError: no fx today"
    assert all(not r.failed and r.median_s for r in results if r.backend == "eager")


def test_a_backend_failing_while_running_is_reported_per_batch_size(collection, inputs, monkeypatch):
    original = backends_module._eager_runner

    def flaky(*args, **kwargs):
        runner = original(*args, **kwargs)
        bind = runner.bind

        def bind_or_fail(named_inputs):
            if next(iter(named_inputs.values())).shape[0] == 2:
                raise ValueError("batch 2 is cursed")
            return bind(named_inputs)

        runner.bind = bind_or_fail
        return runner

    monkeypatch.setattr(backends_module, "_eager_runner", flaky)
    results = benchmark(collection, inputs, backends=["eager", "fx"], batch_sizes=[1, 2], min_run_time=FAST)
    by_key = {(r.backend, r.batch_size): r for r in results}
    assert by_key["eager", 2].failed and "cursed" in by_key["eager", 2].reason
    assert not by_key["eager", 1].failed and not by_key["fx", 2].failed
    assert by_key["fx", 2].speedup_vs_eager is None and by_key["fx", 1].speedup_vs_eager is not None


def test_outputs_that_differ_from_eager_are_flagged(collection, inputs, monkeypatch):
    original = backends_module._fx_runner

    def wrong(*args, **kwargs):
        runner = original(*args, **kwargs)
        bind = runner.bind

        def bind_wrong(named_inputs):
            bound = bind(named_inputs)
            return dataclasses.replace(bound, fetch=lambda: {k: v + 1 for k, v in bound.fetch().items()})

        runner.bind = bind_wrong
        return runner

    monkeypatch.setattr(backends_module, "_fx_runner", wrong)
    fx = benchmark(collection, inputs, backends=["fx"], min_run_time=FAST)[0]
    assert not fx.failed and fx.matched is False and fx.max_abs_error == pytest.approx(1.0)


# ------------------------------------------------------------------------------------------- compiled backends
@pytest.fixture
def fresh_dynamo():
    # Other tests in the process may have used up Dynamo's per-code-object cache.
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_compile_backend_compiles_outside_the_timed_region(collection, inputs, fresh_dynamo):
    (result,) = benchmark(collection, inputs, backends=["compile"], min_run_time=FAST)
    assert not result.failed, result.reason
    assert result.matched and result.warmup_seconds > 0 and result.setup_seconds is not None


def test_compile_backend_reports_dynamos_recompile_limit_instead_of_timing_eager(collection, inputs, fresh_dynamo):
    import torch._dynamo.config

    # One stage module recompiled for a second batch size passes a limit of 1: reported, not timed as eager.
    # (With a dynamic batch axis, batch 1 would get a graph of its own instead.)
    with torch._dynamo.config.patch(recompile_limit=1, automatic_dynamic_shapes=False):
        first, second = benchmark(collection, inputs, backends=["compile"], batch_sizes=[2, 1], min_run_time=FAST,
                                  compile_options=CompileOptions(freeze=False, dynamic_batch=False))
    assert not first.failed
    assert second.failed and "recompile_limit" in second.reason


def test_onnxruntime_backend_times_the_verified_export(collection, inputs):
    results = benchmark(collection, inputs, backends=["onnxruntime"], batch_sizes=[1, 4], threads=1, min_run_time=FAST)
    for r in results:
        assert not r.failed, r.reason
        assert r.matched and r.max_abs_error < 1e-4 and r.setup_seconds > 0


# ------------------------------------------------------------------------------------------- inputs
def test_resize_batch_repeats_or_slices_dimension_zero():
    x = torch.arange(6.0).reshape(3, 2)
    scalar = torch.tensor(1.0)
    resized = resize_batch({"x": x, "scalar": scalar, "flag": True}, 5)
    assert torch.equal(resized["x"], x[[0, 1, 2, 0, 1]])
    assert resized["scalar"] is scalar and resized["flag"] is True
    assert torch.equal(resize_batch({"x": x}, 2)["x"], x[:2])
    with pytest.raises(BrickBackendError):
        resize_batch({"x": x}, 0)


class Lookup(nn.Module):
    """Scores every row of ``x`` against a fixed table whose length is not the batch size."""

    def forward(self, x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        return x @ table.T


def table_collection() -> BrickCollection:
    return BrickCollection({"lookup": BrickNotTrainable(Lookup(), input_names=["x", "table"],
                                                        output_names=["scores"])})


def test_resize_batch_leaves_inputs_of_another_length_alone():
    x, table = torch.randn(4, 4), torch.randn(100, 4)
    resized = resize_batch({"x": x, "table": table}, 2)
    assert resized["x"].shape == (2, 4) and resized["table"] is table
    # The first input decides the batch size, not the longest one.
    resized = resize_batch({"table": table, "x": x}, 2, ["x", "table"])
    assert resized["x"].shape == (2, 4) and resized["table"] is table
    with pytest.raises(BrickBackendError, match="no input has a batch"):
        resize_batch({"scalar": torch.tensor(1.0)}, 3)
    with pytest.raises(BrickBackendError, match="their batch is empty"):
        resize_batch({"x": torch.randn(0, 4)}, 3)
    # A scalar (a temperature) has no batch; the first input that has one decides.
    scale = torch.tensor(2.0)
    resized = resize_batch({"scale": scale, "x": x}, 3)
    assert resized["x"].shape == (3, 4) and resized["scale"] is scale


def test_a_static_table_input_is_not_the_batch_size():
    named_inputs = {"x": torch.randn(4, 4), "table": torch.randn(100, 4)}
    results = benchmark(table_collection(), named_inputs, backends=["eager", "fx", "onnxruntime"],
                        min_run_time=FAST)
    assert [r.batch_size for r in results] == [4, 4, 4]
    assert all(not r.failed and r.matched for r in results), [r.reason for r in results]


def test_other_batch_sizes_resize_only_the_batched_inputs():
    seen: list[tuple[int, int]] = []

    class Recording(Lookup):
        def forward(self, x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
            if not torch.compiler.is_compiling():  # export traces with symbolic sizes
                seen.append((int(x.shape[0]), int(table.shape[0])))
            return super().forward(x, table)

    collection = BrickCollection({"lookup": BrickNotTrainable(Recording(), input_names=["x", "table"],
                                                              output_names=["scores"])})
    named_inputs = {"x": torch.randn(4, 4), "table": torch.randn(100, 4)}
    results = benchmark(collection, named_inputs, backends=["eager", "onnxruntime"], batch_sizes=[1, 3],
                        min_run_time=FAST)
    assert all(not r.failed and r.matched for r in results), [r.reason for r in results]
    assert {table for _, table in seen} == {100} and {1, 3} <= {batch for batch, _ in seen}


def test_batch_sizes_without_a_batch_dimension_are_refused_before_any_work():
    counting = Counting()
    collection = BrickCollection({"c": BrickTrainable(counting, input_names=["x"], output_names=["y"])})
    with pytest.raises(BrickBackendError, match="batch dimension"):
        benchmark(collection, {"x": torch.tensor(1.0)}, backends=["eager"], batch_sizes=[2], min_run_time=FAST)
    assert counting.calls == 0


def test_a_collection_on_several_devices_is_refused_and_left_where_it_was():
    collection = BrickCollection({
        "a": BrickTrainable(nn.Linear(4, 4), input_names=["x"], output_names=["y"]),
        "b": BrickTrainable(nn.Linear(4, 4, device="meta"), input_names=["y"], output_names=["z"]),
    })
    for run in (benchmark, profile_bricks):
        with pytest.raises(BrickBackendError, match="several devices"):
            run(collection, {"x": torch.randn(2, 4)}, min_run_time=FAST)
        assert {p.device.type for p in collection.parameters()} == {"cpu", "meta"}


def test_onnx_names_other_than_the_stages_are_an_error_not_paired_by_position():
    from types import SimpleNamespace

    from torchbricks_fx.ort import numpy_feeds

    session = SimpleNamespace(get_inputs=lambda: [SimpleNamespace(name="input_0")])
    with pytest.raises(BrickExportError, match=r"inputs \['input_0'\] that the stage does not have"):
        numpy_feeds(session, {"x": torch.zeros(1)})


def test_onnxruntime_on_cuda_without_its_provider_fails_clearly_before_exporting():
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime has a CUDAExecutionProvider")
    with pytest.raises(BrickBackendError, match=r"no CUDAExecutionProvider.*onnxruntime-gpu"):
        require_cuda_provider(torch.device("cuda", 0))
    assert ort_providers(torch.device("cpu")) == ["CPUExecutionProvider"]


def test_compare_outputs_never_reports_a_nan_difference_as_zero():
    reference = {"y": torch.tensor([1.0, 2.0])}
    matched, error = compare_outputs(reference, {"y": torch.tensor([1.0, float("nan")])})
    assert not matched and error == float("inf")
    assert compare_outputs({"y": torch.tensor([float("nan"), -float("inf")])},
                           {"y": torch.tensor([float("nan"), -float("inf")])}) == (True, 0.0)
    assert compare_outputs(reference, {"y": torch.ones(3)}) == (False, float("inf"))
    assert compare_outputs(reference, {}) == (False, float("inf"))
    assert compare_outputs({"n": torch.tensor([1, 2])}, {"n": torch.tensor([1, 3])})[0] is False


def test_complex_outputs_are_compared_with_their_parts_tolerance():
    """An FFT round trip in complex64 is off by float32 rounding, as its real part is: both pass."""
    x = torch.randn(64, 64, generator=torch.Generator().manual_seed(0))
    want = torch.fft.fft(x)
    got = torch.fft.fft(torch.fft.ifft(want))
    assert not torch.equal(got, want)
    assert compare_tensors(got.real.contiguous(), want.real.contiguous())[0]
    assert compare_tensors(got, want)[0]
    assert tolerance(torch.complex64) == tolerance(torch.float32)
    assert tolerance(torch.complex64, "cuda") == tolerance(torch.float32, "cuda")
    assert tolerance(torch.complex128) == tolerance(torch.float64)
    assert tolerance(torch.complex32) == tolerance(torch.float16)
    assert not compare_tensors(want + 1e-2, want)[0]  # still a tolerance, not a pass


def test_complex_nans_and_infinities_are_judged_part_by_part():
    inf, nan = float("inf"), float("nan")
    ok, max_abs, _ = compare_tensors(torch.tensor([complex(nan, 5.0)]), torch.tensor([complex(nan, 1.0)]))
    assert not ok and max_abs == 4.0  # a NaN real part does not hide the imaginary difference
    assert compare_tensors(torch.tensor([complex(inf, 1.0), complex(nan, nan)]),
                           torch.tensor([complex(inf, 1.0), complex(nan, nan)])) == (True, 0.0, 0.0)
    assert compare_tensors(torch.tensor([complex(-inf, 1.0 + 1e-7)]), torch.tensor([complex(-inf, 1.0)]))[0]
    ok, max_abs, _ = compare_tensors(torch.tensor([complex(3.0, 4.0)]), torch.tensor([complex(0.0, 0.0)]))
    assert not ok and max_abs == 5.0  # the modulus of the difference


# ------------------------------------------------------------------------------------------- per brick
def test_profile_bricks_times_each_live_brick_in_order(collection, inputs):
    profiles = profile_bricks(collection, inputs, min_run_time=FAST)
    assert [p.brick for p in profiles] == ["pre", "body", "head"]
    assert all(isinstance(p, BrickProfile) and p.median_s > 0 for p in profiles)
    assert sum(p.share for p in profiles) == pytest.approx(1.0)
    table = profile_to_markdown(profiles)
    assert "| body |" in table and table.count("\n") == 5


@pytest.mark.parametrize("min_run_time", [0, -1, "1"])
def test_profile_bricks_refuses_a_min_run_time_benchmark_refuses(collection, inputs, min_run_time):
    with pytest.raises(BrickBackendError, match=r"min_run_time must be a positive, finite number"):
        profile_bricks(collection, inputs, min_run_time=min_run_time)


def test_profile_bricks_times_all_bricks_with_the_external_inputs_and_the_stage():
    seen: list[tuple[str, ...]] = []

    def everything(values: dict[str, torch.Tensor]) -> torch.Tensor:
        seen.append(tuple(values))
        return values["x"] + values["y"]

    collection = BrickCollection({
        "twice": BrickNotTrainable(Scale(), input_names=["x"], output_names=["y"]),
        "sum": BrickNotTrainable(everything, input_names="all", output_names=["total"]),
        "staged": BrickNotTrainable(lambda total, stage: total * (stage == Stage.INFERENCE),
                                    input_names=["total", "stage"], output_names=["out"]),
    })
    profiles = profile_bricks(collection, {"x": torch.randn(2, 4)}, min_run_time=FAST)
    assert [p.brick for p in profiles] == ["twice", "sum", "staged"]
    assert set(seen) == {("x", "y")}


def test_profile_bricks_leaves_metric_state_untouched():
    from torchmetrics.classification import MulticlassAccuracy

    collection = BrickCollection({
        "head": BrickTrainable(nn.Linear(4, 3), input_names=["x"], output_names=["logits"]),
        "argmax": BrickNotTrainable(lambda t: t.argmax(dim=1), input_names=["logits"], output_names=["pred"]),
        "accuracy": BrickMetricSingle(MulticlassAccuracy(num_classes=3), input_names=["pred", "labels"]),
    })
    named_inputs = {"x": torch.randn(4, 4), "labels": torch.tensor([0, 1, 2, 0])}
    collection(named_inputs, stage=Stage.TEST)
    before = collection.summarize(Stage.TEST)
    profiles = profile_bricks(collection, named_inputs, stage=Stage.TEST, min_run_time=FAST)
    assert [p.brick for p in profiles] == ["head", "argmax", "accuracy"]
    assert collection.summarize(Stage.TEST) == before


# ------------------------------------------------------------------------------------------- rendering
def _results() -> list[BenchmarkResult]:
    ok = BenchmarkResult(backend="eager", device="cpu", stage="inference", batch_size=2, threads=1, median_s=1e-3,
                         iqr_s=1e-4, runs=10, throughput=2000.0, speedup_vs_eager=1.0, warmup_seconds=0.01,
                         matched=True, max_abs_error=0.0)
    failed = BenchmarkResult(backend="onnxruntime", device="cpu", stage="inference", batch_size=2, threads=1,
                             failed=True, reason="BrickExportError: cannot | export")
    differs = dataclasses.replace(ok, backend="fx", matched=False, max_abs_error=float("inf"), setup_seconds=0.5)
    return [ok, failed, differs]


def test_json_has_a_stable_documented_shape():
    data = json.loads(to_json(_results()))
    assert set(data) == {"schema", "environment", "results"} and data["schema"] == JSON_SCHEMA
    environment_keys = {"torch", "onnxruntime", "python", "platform", "processor", "cpu_count", "cuda_device"}
    assert environment_keys <= set(data["environment"])
    expected_keys = {f.name for f in dataclasses.fields(BenchmarkResult)} | {"compile_seconds"}
    assert all(set(row) == expected_keys for row in data["results"])
    ok, failed, differs = data["results"]
    assert ok["median_s"] == 1e-3 and ok["compile_seconds"] == 0.01 and ok["setup_seconds"] is None
    assert failed["failed"] is True and failed["median_s"] is None and failed["reason"].startswith("BrickExportError")
    assert differs["max_abs_error"] is None  # infinity is not JSON
    assert differs["compile_seconds"] == pytest.approx(0.51)


def test_json_round_trips():
    results = _results()
    back = results_from_json(to_json(results))
    assert back[:2] == results[:2]
    with pytest.raises(BrickBackendError, match="schema"):
        results_from_json('{"results": []}')


def test_markdown_has_one_row_per_result_and_shows_failures():
    table = to_markdown(_results())
    lines = table.splitlines()
    assert lines[0].startswith("| backend | device | batch | median ms |")
    assert len([line for line in lines if line.startswith("| ")]) == 4  # header + 3 rows
    assert "failed: BrickExportError: cannot \\| export" in table
    assert "NO (max error inf)" in table and "| 1.000 |" in table


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    path = plot(_results(), tmp_path / "latency.png")
    assert Path(path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------------------- CUDA
@needs_cuda
def test_cuda_backends_run_and_leave_the_collection_where_it_was(collection, inputs, fresh_dynamo):
    results = benchmark(collection, inputs, device="cuda", backends=["eager", "fx", "compile", "cudagraphs"],
                        batch_sizes=[2, 4], min_run_time=FAST)
    for r in results:
        assert not r.failed, r.reason
        assert r.device.startswith("cuda") and r.matched and r.peak_memory_bytes > 0
    assert all(p.device.type == "cpu" for p in collection.parameters())


@needs_cuda
def test_cuda_onnxruntime_uses_io_binding_or_reports_why_not(collection, inputs):
    import onnxruntime

    (result,) = benchmark(collection, inputs, device="cuda", backends=["onnxruntime"], min_run_time=FAST)
    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        assert not result.failed, result.reason
        assert result.matched and result.peak_memory_bytes is None
    else:
        assert result.failed and "CUDAExecutionProvider" in result.reason
