"""Deploy: the fastest artifact of a stage that the collection's own metrics accept, written as a bundle.

``deploy`` builds every candidate (``candidates.py``: ONNX Runtime float32, int8 dynamic and static
quantization, float16 on CUDA, the ``.pt2`` program), judges each (``acceptance.py``: export's tolerance for
float32 candidates, the collection's metric bricks on the validation batches for every candidate), times
them with the benchmark's rules (``timing.py``), chooses the fastest accepted file and writes the bundle
folder atomically (``writer.py``).  ``torchbricks_fx.load_bundle`` loads it without torch.
"""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from torchbricks_fx.backends import parse_device
from torchbricks_fx.benchmarking import machine_load
from torchbricks_fx.deployment.acceptance import MetricGate, check_batch_inputs, metric_stage_of, resolve_budgets
from torchbricks_fx.deployment.candidates import CANDIDATES, BuildContext, parse_candidates
from torchbricks_fx.deployment.report import CandidateResult, DeployReport, Latency
from torchbricks_fx.deployment.steps import Deployment, Gates, to_device, verification_runs, work_folder
from torchbricks_fx.deployment.timing import batch_inputs
from torchbricks_fx.deployment.writer import write_bundle
from torchbricks_fx.errors import BrickDeployError, BrickDeployInputError
from torchbricks_fx.export.target import Target, make_target
from torchbricks_fx.files import as_path, check_destination
from torchbricks_fx.numerics import exact_float32
from torchbricks_fx.placement import moved_to, torch_threads
from torchbricks_fx.runtime import batch_size_of, check_batch_size, preserved_state
from torchbricks_fx.stage import Stage, parse_stage

if TYPE_CHECKING:
    from torchbricks_fx.collection import BrickCollection

__all__ = ["CANDIDATES", "CandidateResult", "DeployReport", "Latency", "deploy"]

MetricBudget = float | Mapping[str, float] | None


def _check_numbers(threads: Any, min_run_time: Any, batch_sizes: Sequence[int]) -> None:
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise BrickDeployInputError(f"threads must be a positive integer, not {threads!r}.")
    if not (isinstance(min_run_time, (int, float)) and 0 < min_run_time < math.inf):
        raise BrickDeployInputError(f"min_run_time must be a positive, finite number of seconds, not {min_run_time!r}.")
    for size in batch_sizes:
        check_batch_size(size)


def _batches(validation: Iterable[Mapping[str, Any]] | None) -> list[Mapping[str, Any]]:
    """The validation batches, read once and kept (each candidate is judged on the same batches)."""
    if validation is None:
        return []
    if isinstance(validation, (Mapping, torch.Tensor, str)) or not isinstance(validation, Iterable):
        raise BrickDeployInputError(f"validation must be an iterable of batches (dicts {{input name: tensor}} with "
                                    f"the targets), e.g. a list or a DataLoader of dicts, not a "
                                    f"{type(validation).__name__}.")
    return list(validation)


def _samples(batches: Sequence[Mapping[str, Any]], input_names: Sequence[str]) -> int:
    return sum(batch_size_of(batch, input_names) or 1 for batch in batches)


def deploy(collection: BrickCollection, folder: str | os.PathLike[str], named_inputs: Mapping[str, torch.Tensor], *,
           stage: Stage | str = Stage.EXPORT, outputs: Sequence[str] | None = None,
           validation: Iterable[Mapping[str, Any]] | None = None, max_metric_drop: MetricBudget = 0.01,
           metric_stage: Stage | str | None = None, candidates: Sequence[str] | str | None = None,
           device: str | torch.device = "cpu", batch_sizes: Sequence[int] | None = None, threads: int = 1,
           min_run_time: float = 1.0, overwrite: bool = False,
           progress: Callable[[str], None] | None = None) -> DeployReport:
    """Writes to ``folder`` the fastest artifact of ``stage`` that the collection's own metrics accept.

    Candidates (``candidates``, default every one in ``CANDIDATES``): ``onnxruntime`` (float32, every graph
    optimization), ``onnxruntime-int8-dynamic``, ``onnxruntime-int8-static`` (QDQ, calibrated on the
    validation batches), ``onnxruntime-fp16`` (CUDA only), ``compiled`` (``compile_stage(..., compile=True)``;
    not a file, so judged and timed but never written) and ``pt2`` (``torch.export``).  A candidate whose
    package or device is missing is skipped with the reason; one that fails to build or run is recorded
    as failed; the others go on.  With ``device="cuda"`` the collection is moved there for the run and back.

    Acceptance: float32 candidates must reproduce eager within export's tolerance on the verification
    inputs (``named_inputs`` and a random batch one larger).  Every candidate is run over all of
    ``validation`` (an iterable of dicts of named inputs *with the targets*); fresh copies of the metric
    bricks of ``metric_stage`` (default VALIDATION, else TEST) get its outputs and the batch's targets and
    are compared with the same metrics on eager: a candidate is accepted when no metric drops by more than
    ``max_metric_drop`` (absolute; a dict gives one budget per metric name and none to metrics it does not
    name; "drop" follows each metric's ``higher_is_better``).  ``max_metric_drop=None`` decides by tolerance
    alone, so reduced-precision candidates are rejected.

    Every candidate that ran is timed like ``benchmark`` (``blocked_autorange`` medians at ``batch_sizes``,
    default the example's, with ``threads`` torch and onnxruntime threads, 1 by default for a like-for-like
    comparison); the fastest accepted file (geometric mean over the batch sizes) goes into ``folder`` with
    ``manifest.json``, ``report.md`` and ``latency.png``, written atomically.  An existing folder is
    refused unless ``overwrite=True``.  ``progress`` receives one line per step.

    Returns a :class:`DeployReport`.  Raises ``BrickDeployInputError`` for unusable arguments (batches
    without a target a metric brick reads, a stage without metric bricks, unknown candidates or metrics) and
    ``BrickDeployError`` when no candidate is accepted (its ``report`` holds every result) or the folder
    exists.  Nothing is written unless a candidate was chosen.
    """
    request = _request(collection, folder, named_inputs, stage=stage, outputs=outputs, validation=validation,
                       max_metric_drop=max_metric_drop, metric_stage=metric_stage, candidates=candidates, device=device,
                       batch_sizes=batch_sizes, threads=threads, min_run_time=min_run_time, overwrite=overwrite)
    work = work_folder()
    try:
        with torch_threads(threads), preserved_state(collection), moved_to(collection, request.device), \
                exact_float32(request.device):  # as ONNX Runtime runs (TF32 off): like for like
            return _run(collection, request, named_inputs, work, progress)
    finally:
        shutil.rmtree(work, ignore_errors=True)


@dataclass(frozen=True)
class _Request:
    """``deploy``'s arguments, checked before any work."""

    folder: Path
    target: Target
    candidates: tuple[str, ...]
    gate: MetricGate | None
    max_metric_drop: MetricBudget
    batches: list[Mapping[str, Any]]
    device: torch.device
    batch_sizes: tuple[int, ...]
    threads: int
    min_run_time: float
    overwrite: bool


def _request(collection: BrickCollection, folder: str | os.PathLike[str], named_inputs: Mapping[str, torch.Tensor], *,
             stage: Stage | str, outputs: Sequence[str] | None, validation: Iterable[Mapping[str, Any]] | None,
             max_metric_drop: MetricBudget, metric_stage: Stage | str | None, candidates: Sequence[str] | str | None,
             device: str | torch.device, batch_sizes: Sequence[int] | None, threads: int, min_run_time: float,
             overwrite: bool) -> _Request:
    stage = parse_stage(stage)
    dev = parse_device(device)
    names = parse_candidates(candidates)
    path = as_path(folder, "deploy's folder", BrickDeployInputError)
    check_destination(path, overwrite, BrickDeployError, is_folder=True)  # before minutes of work
    if batch_sizes is not None and (isinstance(batch_sizes, (str, int)) or not isinstance(batch_sizes, Sequence)):
        raise BrickDeployInputError(f"batch_sizes must be a list of batch sizes (e.g. [1, 32]), not {batch_sizes!r}.")
    target = make_target(collection, stage, outputs)
    sizes = tuple(dict.fromkeys(batch_sizes or [batch_size_of(named_inputs, target.input_names) or 1]))
    _check_numbers(threads, min_run_time, sizes)
    batches = _batches(validation)
    gate = None
    if max_metric_drop is not None:
        judging = metric_stage_of(collection, None if metric_stage is None else parse_stage(metric_stage))
        gate = MetricGate(collection, judging, stage, target.input_names, target.output_names)
        gate.check_batches(batches)
    else:
        check_batch_inputs(batches, target.input_names)
    return _Request(path, target, names, gate, max_metric_drop, batches, dev, sizes, threads, min_run_time, overwrite)


def _run(collection: BrickCollection, request: _Request, named_inputs: Mapping[str, torch.Tensor], work: Path,
         given_progress: Callable[[str], None] | None) -> DeployReport:
    target, gate, device = request.target, request.gate, request.device
    inputs = to_device(named_inputs, device)
    calibration = [{n: batch[n] for n in target.input_names} for batch in request.batches] or None
    context = BuildContext(collection, target.plan.stage, target.output_names, inputs, device=device,
                           threads=request.threads, work=work, calibration=calibration)
    progress = given_progress or (lambda _: None)
    progress("eager: running the verification inputs")
    gates = Gates(gate, gate.directions() if gate else {}, request.batches, verification_runs(target, inputs))
    deployment = Deployment(target, context, gates, progress=progress)
    eager = deployment.baseline()
    budgets = None if request.max_metric_drop is None else resolve_budgets(request.max_metric_drop, list(eager.metrics))
    results = [deployment.judge(CANDIDATES[name], budgets) for name in request.candidates]
    load = machine_load(given_progress, warn=True)  # timings on a busy machine say little: the report says so
    eager, results = deployment.time_all(eager, results, batch_inputs(inputs, request.batch_sizes, target.input_names,
                                                                      device), request.threads, request.min_run_time)
    report = DeployReport(folder=request.folder, stage=target.plan.stage, metric_stage=gate.stage if gate else None,
                          input_names=target.input_names, output_names=target.output_names,
                          chosen=deployment.choose(results), eager=eager, candidates=tuple(results),
                          metric_budgets=budgets, batch_sizes=request.batch_sizes, threads=request.threads,
                          device=str(device), validation_batches=len(request.batches),
                          validation_samples=_samples(request.batches, target.input_names),
                          notes=tuple(deployment.notes), load_average=load)
    _write(report, deployment, request.overwrite)
    progress(f"wrote {request.folder} ({report.chosen})")
    return report


def _write(report: DeployReport, deployment: Deployment, overwrite: bool) -> None:
    if report.chosen is None:
        accepted = [c.name for c in report.candidates if c.accepted]
        why = f"Only {accepted} were accepted, which are not files" if accepted else "No candidate was accepted"
        raise BrickDeployError(f"{why}, so nothing was written:\n" + report.to_markdown(), report)
    kind, built = deployment.artifact(report.chosen)
    specs_in, specs_out = deployment.specs()
    write_bundle(report, kind, built.files, built.providers, specs_in, specs_out, overwrite)
