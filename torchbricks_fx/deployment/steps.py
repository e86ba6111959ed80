"""The deployment's steps: the eager reference, each candidate built and judged, then timed, the fastest
accepted file chosen.  ``deploy`` (in ``__init__``) checks the arguments and calls :class:`Deployment`."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from torchbricks_fx.deployment.acceptance import (
    MetricGate,
    metric_drops,
    metric_reasons,
    tolerance_errors,
    tolerance_reasons,
)
from torchbricks_fx.deployment.candidates import CANDIDATES, BuildContext, Built, CandidateKind, Skip
from torchbricks_fx.deployment.report import ACCEPTED, BASELINE, FAILED, REJECTED, SKIPPED, CandidateResult
from torchbricks_fx.deployment.timing import time_candidate
from torchbricks_fx.errors import error_summary
from torchbricks_fx.export.target import Target, dynamic_axes, eager_outputs, eager_values, example_args, second_args
from torchbricks_fx.numerics import OutputError
from torchbricks_fx.plan import FrozenMap
from torchbricks_fx.runners import BoundCall

if TYPE_CHECKING:
    from torchbricks_fx.bundle import TensorSpec

__all__: list[str] = []  # internals of deploy(); the public API is torchbricks_fx.deployment

Progress = Callable[[str], None]
Runs = list[tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]]

_REDUCED_NEEDS_METRICS = ("reduced precision is accepted only by the metric gate, which max_metric_drop=None turned "
                          "off (give validation batches and a max_metric_drop)")
_REDUCED_NEEDS_A_SCALAR = ("reduced precision is accepted only by a metric the gate compares, and the stage's metrics "
                           "are all left out (not 0-D or 1-D values); add a scalar metric, such as accuracy")


@dataclass(frozen=True)
class Gates:
    """How candidates are judged: the metric gate (``None``: tolerance alone) and its metrics' directions,
    the validation batches, the verification runs ``(inputs, eager outputs)`` for the tolerance gate."""

    metric_gate: MetricGate | None
    directions: Mapping[str, bool | None]
    batches: Sequence[Mapping[str, Any]]
    runs: Runs


def to_device(named: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    return {name: value.to(device) if isinstance(value, torch.Tensor) else value for name, value in named.items()}


def verification_runs(target: Target, named_inputs: Mapping[str, torch.Tensor]) -> Runs:
    """``(inputs, eager outputs)`` on the example batch and on random inputs with batch size + 1, as
    export verifies (``export.target``)."""
    args = example_args(target, named_inputs)
    axes = dynamic_axes(target, args, True, None)
    runs = []
    for run_args in (args, second_args(args, axes)):
        values = eager_values(target, run_args)
        runs.append((dict(zip(target.input_names, run_args, strict=True)), eager_outputs(target, values)))
    return runs


def eager_bind(target: Target) -> Callable[[Mapping[str, torch.Tensor]], BoundCall]:
    """The eager baseline: the stage's bound runtime without its metric bricks, as the export's reference."""
    bound, outputs = target.bound, target.output_names

    def bind(named_inputs: Mapping[str, torch.Tensor]) -> BoundCall:
        inputs = dict(named_inputs)

        def fetch() -> dict[str, torch.Tensor]:
            values = bound.run(inputs, metrics=False)
            return {name: values[name].detach().to("cpu", copy=True) for name in outputs}

        return BoundCall(stmt="bound.run(named_inputs, metrics=False)",
                         globals={"bound": bound, "named_inputs": inputs}, fetch=fetch)

    return bind


class Deployment:
    """One deployment's state: the target, the gates, the built candidates and their results."""

    def __init__(self, target: Target, context: BuildContext, gates: Gates, *, progress: Progress) -> None:
        self.target = target
        self.context = context
        self.gates = gates
        self.progress = progress
        self.built: dict[str, Built] = {}
        self.eager_metrics: dict[str, float] = {}
        self.notes: list[str] = []

    @property
    def device(self) -> torch.device:
        return self.context.device

    def _runner(self, bind: Callable[[Mapping[str, torch.Tensor]], BoundCall]) -> Callable[..., dict[str, Any]]:
        return lambda inputs: bind(to_device(inputs, self.device)).fetch()

    def _metrics(self, bind: Callable[[Mapping[str, torch.Tensor]], BoundCall]) -> dict[str, float]:
        gate = self.gates.metric_gate
        if gate is None:
            return {}
        metrics, skipped = gate.evaluate(self._runner(bind), self.gates.batches)
        for name in skipped:
            note = f"metric {name!r} is not compared (only 0-D and 1-D results are)"
            if note not in self.notes:
                self.notes.append(note)
        return metrics

    # ------------------------------------------------------------------ eager
    def baseline(self) -> CandidateResult:
        self.progress("eager: computing the reference metrics")
        self.eager_metrics = self._metrics(eager_bind(self.target))
        return CandidateResult("eager", BASELINE, "float32", "torch", metrics=FrozenMap(self.eager_metrics))

    # ------------------------------------------------------------------ candidates
    def judge(self, kind: CandidateKind, budgets: Mapping[str, float] | None) -> CandidateResult:
        """Builds ``kind`` and runs both gates; a candidate that cannot be built or run is ``failed``, one whose
        package or device is missing ``skipped``."""
        base = CandidateResult(kind.name, FAILED, kind.precision, kind.format)
        outcome = self._build(kind)
        if isinstance(outcome, CandidateResult):
            return outcome
        built, seconds = outcome
        base = dataclasses.replace(base, notes=built.notes, build_seconds=seconds,
                                   file_size_bytes=sum(p.stat().st_size for p in built.files) if built.files else None)
        try:
            errors = tolerance_errors(self._runner(built.bind), self.gates.runs, self.target.output_names, self.device)
            metrics = self._metrics(built.bind)
        except Exception as error:
            self.progress(f"{kind.name}: failed to run ({error_summary(error, 300)})")
            return dataclasses.replace(base, reasons=(f"could not be run: {error_summary(error)}",))
        self.built[kind.name] = built
        result = self._verdict(base, errors, metrics, budgets)
        self.progress(f"{kind.name}: {result.status}" + (f" ({result.reason})" if result.reasons else ""))
        return result

    def _build(self, kind: CandidateKind) -> tuple[Built, float] | CandidateResult:
        """The built candidate and the seconds it took, or its result when it is skipped or cannot be built."""
        self.progress(f"{kind.name}: building")
        start = time.perf_counter()
        try:
            built = kind.build(self.context)
        except Skip as skip:
            self.progress(f"{kind.name}: skipped ({skip})")
            return CandidateResult(kind.name, SKIPPED, kind.precision, kind.format, reasons=(str(skip),))
        except Exception as error:
            self.progress(f"{kind.name}: failed ({error_summary(error, 300)})")
            return CandidateResult(kind.name, FAILED, kind.precision, kind.format,
                                   reasons=(f"could not be built: {error_summary(error)}",))
        return built, time.perf_counter() - start

    def _verdict(self, base: CandidateResult, errors: tuple[OutputError, ...], metrics: dict[str, float],
                 budgets: Mapping[str, float] | None) -> CandidateResult:
        """Accepted or rejected, with every reason: tolerance for float32, the metric budgets for all, and
        reduced precision refused when there are no budgets (a tolerance check cannot accept it)."""
        drops = metric_drops(self.eager_metrics, metrics, self.gates.directions) if budgets is not None else {}
        float32 = base.precision == "float32"
        reasons = tolerance_reasons(errors) if float32 else []
        reasons += metric_reasons(drops, budgets) if budgets is not None else []
        if budgets is None and not float32:
            reasons.append(_REDUCED_NEEDS_METRICS)
        elif not float32 and not drops:  # every metric left out (matrices): nothing judged it
            reasons.append(_REDUCED_NEEDS_A_SCALAR)
        return dataclasses.replace(base, status=REJECTED if reasons else ACCEPTED, reasons=tuple(reasons),
                                   metrics=FrozenMap(metrics), metric_drops=FrozenMap(drops), output_errors=errors,
                                   tolerance_ok=all(e.ok for e in errors) if float32 else None)

    # ------------------------------------------------------------------ timing
    def timed(self, result: CandidateResult, bind: Callable[[Mapping[str, torch.Tensor]], BoundCall] | None,
              inputs: Mapping[int, Mapping[str, torch.Tensor]], threads: int, min_run_time: float) -> CandidateResult:
        """``result`` with its latencies (a timing failure makes it ``failed``)."""
        if bind is None:
            return result
        try:
            latencies = time_candidate(bind, inputs, threads=threads, min_run_time=min_run_time, name=result.name)
        except Exception as error:
            self.built.pop(result.name, None)
            return dataclasses.replace(result, status=FAILED,
                                       reasons=(*result.reasons, f"could not be timed: {error_summary(error)}"))
        self.progress(f"{result.name}: " + ", ".join(f"batch {lat.batch_size} {lat.median_s * 1e3:.3f} ms"
                                                     for lat in latencies))
        return dataclasses.replace(result, latencies=latencies)

    def time_all(self, eager: CandidateResult, results: Sequence[CandidateResult],
                 inputs: Mapping[int, Mapping[str, torch.Tensor]], threads: int,
                 min_run_time: float) -> tuple[CandidateResult, list[CandidateResult]]:
        eager = self.timed(eager, eager_bind(self.target), inputs, threads, min_run_time)
        timed = [self.timed(r, self.built[r.name].bind if r.name in self.built else None, inputs, threads,
                            min_run_time) for r in results]
        return eager, timed

    # ------------------------------------------------------------------ choice
    def choose(self, results: Sequence[CandidateResult]) -> str | None:
        """The fastest accepted candidate that is a file (lowest geometric mean of the median latencies over
        the batch sizes)."""
        accepted = [r for r in results if r.accepted and r.mean_latency_s is not None]
        files = [r for r in accepted if self.built[r.name].files]
        fastest = min(accepted, key=lambda r: r.mean_latency_s or 0.0, default=None)
        chosen = min(files, key=lambda r: r.mean_latency_s or 0.0, default=None)
        if fastest is not None and chosen is not None and fastest is not chosen:
            self.notes.append(f"{fastest.name} was the fastest accepted candidate but is not a file, so the bundle "
                              f"holds {chosen.name}; see the table for what {fastest.name} would gain.")
        return chosen.name if chosen is not None else None

    def artifact(self, name: str) -> tuple[CandidateKind, Built]:
        return CANDIDATES[name], self.built[name]

    def specs(self) -> tuple[list[TensorSpec], list[TensorSpec]]:
        from torchbricks_fx.deployment.writer import tensor_specs

        (first_in, first_out), (second_in, second_out) = self.gates.runs
        return tensor_specs(first_in, second_in), tensor_specs(first_out, second_out)


def work_folder() -> Path:
    import tempfile

    return Path(tempfile.mkdtemp(prefix="torchbricks_fx_deploy_"))
