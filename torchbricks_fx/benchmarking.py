"""Latency and throughput of a stage per backend and batch size, and the latency of each brick.

Timing is ``torch.utils.benchmark.Timer.blocked_autorange`` (block size chosen so that timer overhead is
negligible, accelerator synchronization at block boundaries, a fixed number of threads).  Results are
frozen dataclasses; rendering (Markdown table, JSON, PNG plot) is separate and works on any list of
results, e.g. ones loaded back from JSON.

This module is not called ``benchmark.py``: importing a submodule named like the public function
``benchmark`` would replace the function on the package.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import os
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.benchmark import Timer

from torchbricks_fx.backends import DEFAULT_BACKENDS, parse_backends, parse_device
from torchbricks_fx.errors import BrickBackendError, error_summary
from torchbricks_fx.numerics import compare_outputs, exact_float32
from torchbricks_fx.placement import kept_rng, moved_to, seeded_call, to_device, torch_threads
from torchbricks_fx.runners import BoundCall, Runner, make_runner
from torchbricks_fx.runtime import batch_size_of, check_batch_size, preserved_state, resize_batch
from torchbricks_fx.stage import Stage, parse_stage

if TYPE_CHECKING:
    from torchbricks_fx.collection import BrickCollection
    from torchbricks_fx.compiling import CompileOptions

__all__ = ["BenchmarkResult", "BrickProfile", "benchmark", "profile_bricks", "resize_batch", "time_statement"]

WARMUP_CALLS = 3

Progress = Callable[[str], None]


@dataclass(frozen=True)
class BenchmarkResult:
    """One backend at one batch size.  Times are seconds per call; ``None`` where not applicable or failed.

    ``compiles`` (compiled backends) is the number of graphs compiled at this batch size during its warm-up,
    ``StageModule.warm_up`` at that size (a graph specialized to it; the first size also compiles the
    dynamic-batch graph); a compile during the timed calls fails the row.  ``runs`` is the number of
    measurements behind the median and IQR; ``load_average`` the machine's 1-minute load when the backend
    started (above the number of cores, timings are unreliable).
    ``setup_seconds`` is the one-time preparation of the backend (building the stage module; torch.compile's
    wrapper; export + verification + session creation for onnxruntime), ``warmup_seconds`` the untimed first
    calls at this batch size (where torch.compile really compiles).  ``matched`` says whether the outputs
    equal eager's on the same inputs (within export's tolerance for the dtype and device, see
    ``compare_outputs``), ``max_abs_error`` by how much they differ.  ``peak_memory_bytes`` (CUDA, torch
    backends) is the peak of ``torch.cuda.memory_allocated`` during the timed calls above its level before
    the backend was bound (inputs and weights already there are not counted; what the backend keeps, such
    as frozen constants or a CUDA graph's pool, is; compilation's transients are not).
    """

    backend: str
    device: str
    stage: str
    batch_size: int
    threads: int
    median_s: float | None = None
    iqr_s: float | None = None
    runs: int = 0
    throughput: float | None = None
    speedup_vs_eager: float | None = None
    setup_seconds: float | None = None
    warmup_seconds: float | None = None
    peak_memory_bytes: int | None = None
    matched: bool | None = None
    max_abs_error: float | None = None
    failed: bool = False
    reason: str | None = None
    load_average: float | None = None
    compiles: int | None = None

    @property
    def compile_seconds(self) -> float | None:
        """Time spent before the first timed call: preparation plus warm-up (compilation for ``compile``)."""
        if self.setup_seconds is None and self.warmup_seconds is None:
            return None
        return (self.setup_seconds or 0.0) + (self.warmup_seconds or 0.0)


@dataclass(frozen=True)
class BrickProfile:
    """One brick's latency in a stage, timed on its real inputs; ``share`` of the sum over the bricks."""

    brick: str
    median_s: float
    iqr_s: float
    share: float


# --------------------------------------------------------------------------------------------- timing
def time_statement(stmt: str, globals: Mapping[str, Any], *, threads: int, min_run_time: float,
                   label: str = "", description: str = "") -> Any:
    """``Timer(stmt, globals, num_threads=threads).blocked_autorange(min_run_time)``: a ``Measurement``
    (``.median``, ``.iqr``, ``.times``)."""
    timer = Timer(stmt=stmt, globals=dict(globals), num_threads=threads, label=label, description=description)
    return timer.blocked_autorange(min_run_time=min_run_time)


def _warm_up(runner: Runner, bound: BoundCall, device: torch.device, named_inputs: Mapping[str, Any]) -> float:
    """Untimed first calls (compilation for compiled backends); seconds spent."""
    guard: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
    if runner.compiles:
        import torch._dynamo.config as dynamo_config

        # Dynamo falls back to eager *silently* past its recompile limit (e.g. a stage recompiled for many
        # batch sizes); make that an error so it is reported instead of timing eager as "compile".
        guard = dynamo_config.patch(fail_on_recompile_limit_hit=True)
    code = compile(bound.stmt, "<benchmark>", "eval")
    start = time.perf_counter()
    try:
        with guard:
            if runner.warm_up is not None:
                runner.warm_up(named_inputs)
            for _ in range(WARMUP_CALLS):
                eval(code, dict(bound.globals))
    except Exception as error:
        if type(error).__name__ == "FailOnRecompileLimitHit":
            import torch._dynamo.config as dynamo_config

            raise BrickBackendError(
                f"torch.compile reached torch._dynamo.config.recompile_limit "
                f"({dynamo_config.recompile_limit}) for this stage module, so the compiled stage would silently "
                f"run eagerly; raise the limit or use fewer batch sizes.") from None
        raise
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def _measure(runner: Runner, named_inputs: Mapping[str, Any], reference: Mapping[str, torch.Tensor], *,
             base: BenchmarkResult, min_run_time: float, device: torch.device) -> BenchmarkResult:
    cuda = device.type == "cuda"
    start_bytes = 0
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start_bytes = torch.cuda.memory_allocated(device)
    bound = runner.bind(named_inputs)
    count = runner.compile_count or (lambda: 0)
    before = count()
    warmup = _warm_up(runner, bound, device, named_inputs)
    matched, error = compare_outputs(reference, seeded_call(bound.fetch, device), device)
    warm = count()
    if cuda:  # the timed calls' peak: compilation and warm-up transients are not serving memory
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    measurement = time_statement(bound.stmt, bound.globals, threads=base.threads, min_run_time=min_run_time,
                                 label=base.stage, description=runner.name)
    if count() != warm:
        raise BrickBackendError(f"{runner.name} compiled {count() - warm} more graph(s) while being timed at batch "
                                f"size {base.batch_size}; the timing would include compilation.")
    # ORT allocates on the GPU outside torch's allocator: torch's peak would be meaningless there.
    peak = torch.cuda.max_memory_allocated(device) - start_bytes if cuda and runner.name != "onnxruntime" else None
    median = float(measurement.median)
    return dataclasses.replace(base, median_s=median, iqr_s=float(measurement.iqr), runs=len(measurement.times),
                               throughput=base.batch_size / median if median > 0 else None,
                               setup_seconds=runner.setup_seconds, warmup_seconds=warmup, peak_memory_bytes=peak,
                               matched=matched, max_abs_error=error,
                               compiles=warm - before if runner.compile_count else None)


def _run_backend(name: str, collection: BrickCollection, stage: Stage, outputs: Sequence[str],
                 inputs: Callable[[int], dict[str, Any]], references: Mapping[int, Mapping[str, torch.Tensor]], *,
                 device: torch.device, threads: int, min_run_time: float, progress: Progress,
                 compile_options: CompileOptions | None = None) -> list[BenchmarkResult]:
    """One backend at every batch size; ``inputs(batch_size)`` creates that batch's inputs on ``device``
    (one batch at a time, so no batch's memory counts in another's measurement)."""
    load = machine_load()
    bases = {bs: BenchmarkResult(backend=name, device=str(device), stage=stage.value, batch_size=bs, threads=threads,
                                 load_average=load) for bs in references}
    progress(f"{name}: preparing")
    try:
        runner = make_runner(name, collection, stage, outputs, named_inputs=inputs(next(iter(references))),
                             device=device, threads=threads, compile_options=compile_options)
    except Exception as error:
        progress(f"{name}: failed ({error_summary(error)})")
        return [dataclasses.replace(base, failed=True, reason=error_summary(error)) for base in bases.values()]
    results = []
    try:
        for bs in references:
            try:
                result = _measure(runner, inputs(bs), references[bs], base=bases[bs], min_run_time=min_run_time,
                                  device=device)
            except Exception as error:
                result = dataclasses.replace(bases[bs], setup_seconds=runner.setup_seconds, failed=True,
                                             reason=error_summary(error))
            progress(_progress_line(result))
            results.append(result)
    finally:
        runner.close()
    return results


def _progress_line(result: BenchmarkResult) -> str:
    head = f"{result.backend} batch {result.batch_size}:"
    if result.failed or result.median_s is None:
        return f"{head} failed ({result.reason})"
    match = "outputs match eager" if result.matched else \
        f"OUTPUTS DIFFER from eager (max error {result.max_abs_error:.3g})"
    return f"{head} {result.median_s * 1e3:.3f} ms median of {result.runs} measurements, {match}"


def _with_speedups(results: list[BenchmarkResult]) -> list[BenchmarkResult]:
    eager = {r.batch_size: r.median_s for r in results if r.backend == "eager" and not r.failed}
    out = []
    for r in results:
        base = eager.get(r.batch_size)
        speedup = base / r.median_s if base and r.median_s and not r.failed else None
        out.append(dataclasses.replace(r, speedup_vs_eager=speedup))
    return out


def machine_load(progress: Progress | None = None, warn: bool = False) -> float | None:
    """The 1-minute load average (``None`` where the OS has none); with ``warn``, a warning when it exceeds
    the cores, because then the timed code shares them and its timings mean little (a line to ``progress``
    where given, else a ``UserWarning``: a command line would show both)."""
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        return None
    cores = os.cpu_count() or 1
    if warn and load > cores:
        message = (f"The machine's load ({load:.1f}) exceeds its {cores} cores: other processes compete for them, "
                   f"so timings are unreliable; benchmark on a quiet machine (and with threads=1).")
        if progress is not None:
            progress(f"warning: {message}")
        else:
            warnings.warn(message, stacklevel=3)
    return load


def _reference_outputs(collection: BrickCollection, stage: Stage, named_inputs: Mapping[str, Any],
                       outputs: Sequence[str], device: torch.device) -> dict[str, torch.Tensor]:
    values = seeded_call(lambda: collection(dict(named_inputs), stage=stage), device)
    return {n: values[n].detach().cpu() for n in outputs if isinstance(values.get(n), torch.Tensor)}


def benchmark(collection: BrickCollection, named_inputs: Mapping[str, Any], *, stage: Stage | str = Stage.INFERENCE,
              outputs: Sequence[str] | None = None, backends: str | Sequence[str] = DEFAULT_BACKENDS,
              device: str | torch.device = "cpu", batch_sizes: Sequence[int] | None = None,
              threads: int | None = None, min_run_time: float = 1.0, progress: Progress | None = None,
              compile_options: CompileOptions | None = None) -> list[BenchmarkResult]:
    """Latency of ``stage`` of ``collection`` per backend and batch size.

    Backends: ``eager`` (the collection), ``fx`` (the StageModule), ``compile`` (the stage compiled for what it
    is: ``compile_stage(..., compile=compile_options or True)``), ``onnxruntime`` (the verified ONNX export)
    and, on CUDA, ``cudagraphs`` (the same with ``mode="reduce-overhead"``).  The batch size is dimension 0
    of the stage's first input (as for export's dynamic batch axis); ``batch_sizes`` repeats or slices
    dimension 0 of every input with that length (default: the example's batch size) and leaves other inputs
    (a fixed table) as they are.
    ``threads`` sets torch's (and ORT's intra-op) threads for the run (default: torch's current setting) and
    restores them.  With ``device="cuda"`` the collection is moved to the GPU for the run and moved back
    afterwards (one spread over several devices is refused with ``BrickBackendError``), and ``"cuda:N"`` is
    the current CUDA device while it runs.  Every backend's outputs are compared with eager's on the
    same inputs.  A backend that fails is reported with ``failed=True`` and the reason; the others still run.
    ``progress`` receives one line of text per step.  Buffers (BatchNorm statistics) and metric states are
    restored afterwards, so timing TRAIN or a stage with metrics leaves the collection as it was (only
    forward calls are timed), and so is the random number generator.  Eager's reference and each backend's
    compared call start from one RNG state, so TRAIN's dropout draws the same numbers in both (where the
    backend draws from torch's generators, as compiled TRAIN stages do; ONNX Runtime draws its own).
    Unknown backends or devices raise ``BrickBackendError`` before any work; an invalid stage raises
    ``BrickGraphError``.
    """
    stage = parse_stage(stage)
    dev = parse_device(device)
    names = parse_backends(backends, dev)
    plan = collection.plan(stage, outputs)
    order = plan.required_inputs
    sizes = list(dict.fromkeys(batch_sizes)) if batch_sizes else [batch_size_of(named_inputs, order) or 1]
    for bs in sizes:
        check_batch_size(bs)
    if batch_size_of(named_inputs, order) is None and sizes != [1]:
        raise BrickBackendError(f"batch_sizes {sizes} need a batch dimension: the stage's first input "
                                f"{order[0] if order else None!r} has none.")
    _check_min_run_time(min_run_time)
    report = progress or (lambda _: None)

    def inputs(bs: int) -> dict[str, Any]:
        return to_device(resize_batch(named_inputs, bs, order), dev)

    with torch_threads(threads) as n_threads, preserved_state(collection), moved_to(collection, dev), \
            kept_rng(dev), exact_float32(dev):
        machine_load(progress, warn=True)
        references = {bs: _reference_outputs(collection, stage, inputs(bs), plan.outputs, dev) for bs in sizes}
        results: list[BenchmarkResult] = []
        for name in names:
            results += _run_backend(name, collection, stage, plan.outputs, inputs, references, device=dev,
                                    threads=n_threads, min_run_time=min_run_time, progress=report,
                                    compile_options=compile_options)
    return _with_speedups(results)


# --------------------------------------------------------------------------------------------- per brick
def _check_min_run_time(min_run_time: object) -> None:
    # blocked_autorange would time one block for 0 or less (numbers that look measured) and never end on inf.
    if not (isinstance(min_run_time, (int, float)) and 0 < min_run_time < math.inf):
        raise BrickBackendError(f"min_run_time must be a positive, finite number of seconds, not {min_run_time!r}.")


def profile_bricks(collection: BrickCollection, named_inputs: Mapping[str, Any], *,
                   stage: Stage | str = Stage.INFERENCE, outputs: Sequence[str] | None = None,
                   device: str | torch.device = "cpu", threads: int | None = None,
                   min_run_time: float = 0.2) -> list[BrickProfile]:
    """Latency of each brick that runs in ``stage`` (in execution order), timed with ``blocked_autorange`` on
    the brick's real inputs: the eager intermediate values are captured once, then each brick's call is timed
    alone in the stage's modes.  ``share`` is the brick's fraction of the summed medians."""
    stage = parse_stage(stage)
    dev = parse_device(device)
    _check_min_run_time(min_run_time)
    bound = collection.bound_stage(stage, outputs)
    with torch_threads(threads) as n_threads, preserved_state(collection), moved_to(collection, dev), \
            kept_rng(dev), exact_float32(dev):
        values = bound.run(to_device(named_inputs, dev))
        timings = []
        with bound.modes():
            for spec in bound.plan.steps:
                brick = bound.bricks[spec.name]
                # Metric bricks update state on every call: time a copy so the user's metrics stay untouched.
                fn = brick.stage_callable(stage) if spec.in_graph else copy.deepcopy(brick).stage_callable(stage)
                args, kwargs = bound.arguments(spec, values)
                globals_ = {"fn": fn, "args": args, "kwargs": kwargs}
                timings.append((spec.name, time_statement("fn(*args, **kwargs)", globals_, threads=n_threads,
                                                          min_run_time=min_run_time, description=spec.name)))
    total = sum(float(m.median) for _, m in timings) or 1.0
    return [BrickProfile(brick=name, median_s=float(m.median), iqr_s=float(m.iqr), share=float(m.median) / total)
            for name, m in timings]
