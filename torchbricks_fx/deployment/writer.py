"""Writing the bundle folder: the chosen artifact, ``manifest.json``, ``report.md`` and ``latency.png``,
staged and swapped in whole by ``files.staged_folder`` (nothing half-written on failure or interruption).

The manifest is deterministic JSON (sorted keys, no timestamps): stage, inputs and outputs with dtypes,
shapes (dynamic axes named) and dynamic axes, the chosen candidate, every candidate's status, reasons,
metrics, drops, output errors and latencies, library versions and the sha256 of every other file."""

from __future__ import annotations

import importlib.metadata
import json
import math
import platform
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from torchbricks_fx.benchmarking import BenchmarkResult
from torchbricks_fx.bundle import BUNDLE_SCHEMA, MANIFEST_NAME, TensorSpec, file_sha256
from torchbricks_fx.deployment.candidates import CandidateKind, copy_files
from torchbricks_fx.deployment.report import CandidateResult, DeployReport
from torchbricks_fx.errors import BrickBackendError, BrickDeployError
from torchbricks_fx.files import staged_folder
from torchbricks_fx.reporting import cpu_model, plot

__all__: list[str] = []  # internals of deploy(); the public API is torchbricks_fx.deployment

REPORT_NAME = "report.md"
PLOT_NAME = "latency.png"
BATCH_AXIS = "batch"


def _dtype_name(dtype: torch.dtype) -> str:
    try:
        return torch.empty(0, dtype=dtype).numpy().dtype.name
    except TypeError:  # bfloat16 and others numpy has no dtype for
        return str(dtype).replace("torch.", "")


def tensor_specs(first: Mapping[str, torch.Tensor], second: Mapping[str, torch.Tensor]) -> list[TensorSpec]:
    """Specs of the tensors of two runs whose batch sizes differ (the verification runs): an axis whose size
    differs between them is the dynamic batch axis."""
    specs = []
    for name, tensor in first.items():
        other = second[name]
        shape = tuple(BATCH_AXIS if other.dim() == tensor.dim() and other.shape[axis] != size else int(size)
                      for axis, size in enumerate(tensor.shape))
        specs.append(TensorSpec(name, _dtype_name(tensor.dtype), shape))
    return specs


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def _candidate_json(result: CandidateResult, eager: CandidateResult) -> dict[str, Any]:
    speedups = {}
    for latency in result.latencies:
        base = eager.latency(latency.batch_size)
        if base is not None and latency.median_s > 0:
            speedups[str(latency.batch_size)] = base.median_s / latency.median_s
    return {
        "name": result.name, "status": result.status, "precision": result.precision, "format": result.format,
        "reasons": list(result.reasons), "notes": list(result.notes),
        "metrics": {name: _finite(value) for name, value in result.metrics.items()},
        "metric_drops": {name: _finite(value) for name, value in result.metric_drops.items()},
        "output_errors": {e.name: {"max_abs_error": _finite(e.max_abs_error), "max_rel_error": _finite(e.max_rel_error),
                                   "rtol": e.rtol, "atol": e.atol, "ok": e.ok} for e in result.output_errors},
        "tolerance_ok": result.tolerance_ok,
        "latencies": [{"batch_size": lat.batch_size, "median_s": lat.median_s, "iqr_s": lat.iqr_s, "runs": lat.runs}
                      for lat in result.latencies],
        "speedup_vs_eager": speedups, "file_size_bytes": result.file_size_bytes,
        "build_seconds": result.build_seconds,
    }


def versions() -> dict[str, str | None]:
    """Library versions and machine facts the bundle was measured with."""
    found: dict[str, str | None] = {}
    for package in ("torchbricks_fx", "torch", "onnxruntime", "onnx", "onnxscript", "numpy", "torchmetrics"):
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found[package] = None
    return {**found, "python": platform.python_version(), "platform": platform.platform(), "processor": cpu_model()}


def manifest(report: DeployReport, kind: CandidateKind, artifact_files: Sequence[str], providers: Sequence[str],
             inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec], hashes: Mapping[str, str]) -> dict[str, Any]:
    chosen = report.candidate(kind.name)
    return {
        "schema": BUNDLE_SCHEMA,
        "stage": report.stage.value,
        "inputs": [spec.to_json() for spec in inputs],
        "outputs": [spec.to_json() for spec in outputs],
        "artifact": {"candidate": kind.name, "format": kind.format, "precision": kind.precision,
                     "description": kind.description, "files": list(artifact_files), "providers": list(providers),
                     "needs": ["onnxruntime", "numpy"] if kind.format == "onnx" else ["torch"]},
        "chosen": {"candidate": kind.name, "speedup_vs_eager": {str(bs): x for bs, x in report.speedups.items()},
                   "metrics": {name: _finite(value) for name, value in chosen.metrics.items()}},
        "acceptance": {"metric_stage": report.metric_stage.value if report.metric_stage else None,
                       "max_metric_drop": dict(report.metric_budgets) if report.metric_budgets is not None else None,
                       "validation_batches": report.validation_batches,
                       "validation_samples": report.validation_samples,
                       "tolerance": "float32 candidates: export_onnx's verification tolerance on the example batch "
                                    "and a random batch of another size"},
        "timing": {"device": report.device, "threads": report.threads, "batch_sizes": list(report.batch_sizes),
                   "method": "torch.utils.benchmark blocked_autorange, median", "load_average": report.load_average},
        "eager": _candidate_json(report.eager, report.eager),
        "candidates": [_candidate_json(c, report.eager) for c in report.candidates],
        "notes": list(report.notes),
        "versions": versions(),
        "files": dict(hashes),
    }


def _plot(report: DeployReport, path: Path) -> bool:
    """``latency.png`` (median latency per candidate over batch sizes); ``False`` without matplotlib."""
    results = [BenchmarkResult(backend=c.name, device=report.device, stage=report.stage.value,
                               batch_size=lat.batch_size, threads=report.threads, median_s=lat.median_s)
               for c in (report.eager, *report.candidates) for lat in c.latencies]
    try:
        plot(results, path)
    except BrickBackendError:  # matplotlib is missing: the report says so
        return False
    return True


def write_bundle(report: DeployReport, kind: CandidateKind, files: Sequence[Path], providers: Sequence[str],
                 inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec], overwrite: bool) -> None:
    """Writes the bundle folder ``report.folder`` atomically."""
    from torchbricks_fx.reporting import render_deploy_report

    with staged_folder(report.folder, overwrite, BrickDeployError) as staging:
        names = copy_files(files, staging)
        plotted = _plot(report, staging / PLOT_NAME)
        text = render_deploy_report(report, plot=PLOT_NAME if plotted else None)
        if not plotted:
            text += "\nNo latency plot: matplotlib is not installed (pip install 'torchbricks_fx[plot]').\n"
        (staging / REPORT_NAME).write_text(text, encoding="utf-8")
        hashes = {path.name: file_sha256(path) for path in sorted(staging.iterdir())}
        data = manifest(report, kind, names, providers, inputs, outputs, hashes)
        (staging / MANIFEST_NAME).write_text(json.dumps(data, indent=2, sort_keys=True, allow_nan=False) + "\n",
                                             encoding="utf-8")
