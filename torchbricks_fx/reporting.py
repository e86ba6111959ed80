"""Rendering, apart from measuring: plans, export reports and benchmark results as Markdown, JSON and plots,
and the environment stored with them.  Works on any list of results, e.g. ones loaded back from JSON.
Used by the library's ``describe``/``to_markdown`` methods, the command line and ``benchmarks/``."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import platform
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from torchbricks_fx.errors import BrickBackendError
from torchbricks_fx.files import as_path, staged_file

if TYPE_CHECKING:
    from torchbricks_fx.benchmarking import BenchmarkResult, BrickProfile
    from torchbricks_fx.deployment.report import CandidateResult, DeployReport
    from torchbricks_fx.export.report import ExportReport
    from torchbricks_fx.plan import StagePlan

__all__ = ["JSON_SCHEMA", "environment", "plot", "profile_to_markdown", "render_deploy_report", "render_export_report",
           "render_plan", "results_from_json", "to_json", "to_markdown"]

JSON_SCHEMA = "torchbricks_fx.benchmark/1"


# --------------------------------------------------------------------------------------------- plans, exports
def _plan_lines(plan: StagePlan) -> list[str]:
    return [f"  bricks:   {' -> '.join(plan.bricks) or '(none)'}",
            f"  inputs:   {', '.join(plan.required_inputs) or '(none)'}",
            f"  outputs:  {', '.join(plan.outputs) or '(none)'}"]


def render_plan(plan: StagePlan) -> str:
    """A stage's plan as text: bricks in execution order, inputs, outputs, and each pruned brick with why."""
    lines = [f"stage {plan.stage.value}:", *_plan_lines(plan)]
    lines += [f"  pruned:  {name} ({reason})" for name, reason in plan.pruned.items()] or ["  pruned:   (none)"]
    return "\n".join(lines)


def render_plan_listing(plan: StagePlan) -> str:
    """The same, without the stage line and with the pruned bricks as a list (``torchbricks-fx inspect``)."""
    lines = _plan_lines(plan)
    if plan.pruned:
        lines += ["  pruned:", *(f"    - {name}: {reason}" for name, reason in plan.pruned.items())]
    else:
        lines.append("  pruned:   (none)")
    return "\n".join(lines)


def render_export_report(report: ExportReport) -> str:
    exporter = "torch.export" if report.format == "pt2" else ("dynamo" if report.dynamo else "legacy (TorchScript)")
    verification = "skipped"
    if report.verified:
        verification = f"{report.verify_seconds:.2f} s on batch sizes {list(report.verified_batch_sizes)}"
        verification += f" with {', '.join(report.providers)}" if report.providers else ""
    lines = [f"**{report.path.name}** ({report.format}, {report.file_size_bytes / 1e6:.2f} MB), stage "
             f"`{report.stage.value}`, exporter {exporter}" + (f", opset {report.opset}" if report.opset else ""),
             "",
             f"- inputs: {', '.join(report.input_names)}; dynamic batch: {report.dynamic_batch}",
             f"- export: {report.export_seconds:.2f} s; verification: {verification}"]
    if report.errors:
        lines += ["", "| output | dtype | shape | max abs error | max rel error | ok |", "|---|---|---|---|---|---|"]
        lines += [f"| {e.name} | {e.dtype} | {list(e.shape)} | {e.max_abs_error:.3g} | {e.max_rel_error:.3g} | "
                  f"{'yes' if e.ok else 'NO ' + e.note} |" for e in report.errors]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- numbers
def ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.3f}"


def number(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def cell(text: str | None) -> str:
    """Text safe inside a Markdown table cell."""
    return (text or "").replace("|", "\\|").replace("\n", " ")


# --------------------------------------------------------------------------------------------- benchmarks
def checked_results(results: object, what: str) -> Sequence[BenchmarkResult]:
    """``results`` if it is a list of ``BenchmarkResult``s (as ``benchmark`` returns), else an error naming
    ``what`` took it."""
    from torchbricks_fx.benchmarking import BenchmarkResult

    if isinstance(results, Iterable) and not isinstance(results, (str, bytes, Mapping)):
        results = list(results)  # a generator of results (a filtered list) is fine too
        if all(isinstance(r, BenchmarkResult) for r in results):
            return results
    raise BrickBackendError(f"{what} takes the list of BenchmarkResults benchmark() returns, not {results!r:.80}.")


def to_markdown(results: Sequence[BenchmarkResult]) -> str:
    """A Markdown table, one row per backend and batch size (failed backends with their reason), and a line
    with the stage, the threads and the machine's load."""
    results = checked_results(results, "to_markdown")
    header = ("| backend | device | batch | median ms | IQR ms | n | items/s | vs eager | setup s | warm-up s "
              "| compiles | peak MiB | matches eager |")
    lines = [header, "|" + "---|" * header.count(" | ") + "---|"]
    for r in results:
        if r.failed:
            lines.append(f"| {r.backend} | {r.device} | {r.batch_size} | failed: {cell(r.reason)} | | | | | | | | | |")
            continue
        peak = None if r.peak_memory_bytes is None else r.peak_memory_bytes / 2**20
        match = "yes" if r.matched else f"NO (max error {number(r.max_abs_error, '.3g')})"
        lines.append(f"| {r.backend} | {r.device} | {r.batch_size} | {ms(r.median_s)} | {ms(r.iqr_s)} | {r.runs} "
                     f"| {number(r.throughput, ',.0f')} | {number(r.speedup_vs_eager, '.2f')}x "
                     f"| {number(r.setup_seconds, '.2f')} | {number(r.warmup_seconds, '.2f')} "
                     f"| {'-' if r.compiles is None else r.compiles} | {number(peak, '.1f')} | {match} |")
    if results:
        lines.append(f"\n{conditions(results)}; times per call, median and IQR over n measurements.")
    return "\n".join(lines) + "\n"


def conditions(results: Sequence[BenchmarkResult]) -> str:
    """"Stage inference, 1 thread(s), load 0.4 on 2 cores" (with a warning when the load exceeded them)."""
    first = results[0]
    loads = [r.load_average for r in results if r.load_average is not None]
    cores = os.cpu_count() or 1
    text = f"Stage {first.stage}, {first.threads} thread(s)"
    if loads:
        text += f", load {max(loads):.1f} on {cores} cores"
        if max(loads) > cores:
            text += " (LOAD ABOVE THE CORES: timings unreliable)"
    return text


def profile_to_markdown(profiles: Sequence[BrickProfile]) -> str:
    """A Markdown table of per-brick latencies, in execution order."""
    lines = ["| brick | median ms | IQR ms | share |", "|---|---:|---:|---:|"]
    lines += [f"| {p.brick} | {ms(p.median_s)} | {ms(p.iqr_s)} | {p.share:.1%} |" for p in profiles]
    return "\n".join(lines) + "\n"


def environment() -> dict[str, Any]:
    """Versions and machine facts stored with JSON results and reports."""
    import importlib.metadata

    import torch

    versions: dict[str, str | None] = {}
    for package in ("onnxruntime", "onnx", "onnxscript", "torchvision"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    try:
        load: float | None = os.getloadavg()[0]
    except (AttributeError, OSError):
        load = None
    return {"torch": torch.__version__, **versions, "python": platform.python_version(),
            "platform": platform.platform(), "processor": cpu_model(), "cpu_count": os.cpu_count(),
            "load_average": load, "threads": torch.get_num_threads(),
            "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux, ``platform.processor()`` elsewhere)."""
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
        for line in cpuinfo:
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def to_json(results: Sequence[BenchmarkResult], *, indent: int | None = 2) -> str:
    """JSON text: ``{"schema": "torchbricks_fx.benchmark/1", "environment": {...}, "results": [...]}``; each
    result has every ``BenchmarkResult`` field plus ``compile_seconds``; times in seconds, ``null`` where
    not applicable (and ``max_abs_error`` is ``null`` instead of infinity for mismatched shapes)."""
    rows = []
    for r in checked_results(results, "to_json"):
        row = dataclasses.asdict(r)
        row["compile_seconds"] = r.compile_seconds
        if row["max_abs_error"] is not None and not math.isfinite(row["max_abs_error"]):
            row["max_abs_error"] = None
        rows.append(row)
    return json.dumps({"schema": JSON_SCHEMA, "environment": environment(), "results": rows}, indent=indent)


def results_from_json(text: str) -> list[BenchmarkResult]:
    """Results back from ``to_json`` text (for re-rendering or plotting)."""
    from torchbricks_fx.benchmarking import BenchmarkResult

    try:
        data = json.loads(text)
    except (TypeError, ValueError) as error:
        raise BrickBackendError(f"Not torchbricks_fx benchmark JSON: {error}.") from None
    if not isinstance(data, dict) or data.get("schema") != JSON_SCHEMA:
        raise BrickBackendError(f"Not torchbricks_fx benchmark JSON (expected schema {JSON_SCHEMA!r}).")
    names = {f.name for f in dataclasses.fields(BenchmarkResult)}
    rows = data.get("results")
    try:
        if not isinstance(rows, list):
            raise TypeError(f"'results' is {type(rows).__name__}, not a list")
        return [BenchmarkResult(**{k: v for k, v in row.items() if k in names}) for row in rows]
    except (TypeError, AttributeError) as error:  # a row that is not an object, or lacks a field
        raise BrickBackendError(f"Benchmark JSON with malformed results: {error}.") from None


PLOT_SUFFIXES = (".png", ".svg", ".pdf", ".jpg", ".jpeg")


def check_plot_path(path: str | os.PathLike[str]) -> None:
    """Refuses, before any work, a plot destination matplotlib cannot write (unknown image type, a folder)."""
    suffix = os.path.splitext(as_path(path, "The plot's path", BrickBackendError))[1].lower()
    if suffix not in PLOT_SUFFIXES:
        raise BrickBackendError(f"Cannot plot to {os.fspath(path)!r}: the file type {suffix or '(none)'!r} is not "
                                f"an image type; use one of {', '.join(PLOT_SUFFIXES)}.")
    if os.path.isdir(path):
        raise BrickBackendError(f"Cannot plot to {os.fspath(path)!r}: it is a folder; give a file path.")


def plot(results: Sequence[BenchmarkResult], path: str | os.PathLike[str]) -> str:
    """Writes an image (PNG, SVG, PDF or JPEG, by the suffix) of median latency per backend over batch sizes
    (needs matplotlib: ``pip install torchbricks_fx[plot]``); returns the path."""
    results = checked_results(results, "plot")
    check_plot_path(path)
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display needed
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
    except ImportError:
        raise BrickBackendError("Plotting needs matplotlib: pip install 'torchbricks_fx[plot]'.") from None
    figure, axes = plt.subplots(figsize=(7, 4.5))
    try:
        for backend in dict.fromkeys(r.backend for r in results):
            points = sorted((r.batch_size, r.median_s * 1e3) for r in results
                            if r.backend == backend and not r.failed and r.median_s is not None)
            if points:
                axes.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=backend)
        axes.set_xscale("log", base=2)
        axes.set_yscale("log")
        plain = FuncFormatter(lambda value, _: f"{value:g}")
        axes.set_xticks(sorted({r.batch_size for r in results}))
        axes.xaxis.set_major_formatter(plain)
        axes.xaxis.set_minor_formatter(NullFormatter())
        axes.yaxis.set_major_formatter(plain)
        axes.yaxis.set_minor_locator(LogLocator(base=10, subs=(2.0, 5.0)))
        axes.yaxis.set_minor_formatter(plain)
        axes.set_xlabel("batch size")
        axes.set_ylabel("median latency per call (ms)")
        if results:
            axes.set_title(f"{conditions(results)}, {results[0].device}")
        axes.grid(True, which="both", alpha=0.3)
        axes.legend()
        figure.tight_layout()
        with staged_file(path, overwrite=True) as staged:  # matplotlib picks the format by the suffix
            figure.savefig(os.fspath(staged), dpi=120, format=os.path.splitext(os.fspath(path))[1][1:].lower())
    finally:
        plt.close(figure)
    return os.fspath(path)


# --------------------------------------------------------------------------------------------- deployments
def _speedup(candidate: CandidateResult, eager: CandidateResult) -> float | None:
    """Geometric mean over the batch sizes of eager's median over the candidate's."""
    ratios = [base.median_s / mine.median_s for base in eager.latencies
              if (mine := candidate.latency(base.batch_size)) is not None and mine.median_s > 0]
    return math.exp(sum(map(math.log, ratios)) / len(ratios)) if ratios else None


def _metric_cell(candidate: CandidateResult, name: str) -> str:
    value = candidate.metrics.get(name)
    if value is None:
        return "-"
    drop = candidate.metric_drops.get(name)
    return f"{value:.4g}" if drop is None else f"{value:.4g} (drop {drop:.3g})"


def _deploy_row(candidate: CandidateResult, report: DeployReport, metrics: Sequence[str]) -> str:
    chosen = candidate.name == report.chosen
    name = f"**{candidate.name}**" if chosen else candidate.name
    status = "**chosen**" if chosen else candidate.status
    error = candidate.max_abs_error
    cells = [name, candidate.precision, candidate.format, status, *(_metric_cell(candidate, m) for m in metrics),
             "-" if error is None else f"{error:.2g}",
             *(ms(lat.median_s) if (lat := candidate.latency(bs)) else "-" for bs in report.batch_sizes),
             number(_speedup(candidate, report.eager), ".2f") + ("x" if candidate.latencies else ""),
             cell(candidate.reason)]
    return "| " + " | ".join(cells) + " |"


def _deploy_summary(report: DeployReport) -> list[str]:
    chosen = report.chosen_result
    lines = []
    if chosen is not None:
        speedups = ", ".join(f"{x:.2f}x at batch {bs}" for bs, x in report.speedups.items())
        lines.append(f"**Chosen: {chosen.name}** ({chosen.precision}, {chosen.format}): {speedups} against eager.")
    elif any(c.accepted for c in report.candidates):
        accepted = [c.name for c in report.candidates if c.accepted]
        lines.append(f"**No file was accepted** (only {accepted}, which are not files, passed).")
    else:
        lines.append("**No candidate was accepted.**")
    if report.metric_budgets is None:
        judged = "tolerance alone (max_metric_drop=None): only float32 candidates can pass"
    else:
        budgets = sorted(set(report.metric_budgets.values()))
        budget = "none (no metric could be compared)" if not budgets else f"{budgets[0]:g} per metric" \
            if len(budgets) == 1 else ", ".join(f"{name} {value:g}" for name, value in report.metric_budgets.items())
        stage = report.metric_stage.value if report.metric_stage else "?"
        judged = (f"the metric bricks of stage {stage} on {report.validation_samples} validation samples in "
                  f"{report.validation_batches} batch(es), largest accepted drop: {budget}; float32 candidates also "
                  f"by export's tolerance")
    load = ""
    if report.load_average is not None:
        cores = os.cpu_count() or 1
        load = f", load {report.load_average:.1f} on {cores} cores" + \
            (" (LOAD ABOVE THE CORES: timings unreliable)" if report.load_average > cores else "")
    lines.append(f"Stage `{report.stage.value}` ({', '.join(report.input_names)} -> {', '.join(report.output_names)}),"
                 f" judged by {judged}. Latency: median ms per call (torch.utils.benchmark blocked_autorange), "
                 f"{report.threads} thread(s) for torch and onnxruntime, device {report.device}{load}; *vs eager* is "
                 f"the geometric mean of the speed-ups over the batch sizes.")
    return lines


def render_deploy_report(report: DeployReport, plot: str | None = None) -> str:
    """A deployment as Markdown: the chosen candidate, how candidates were judged, one row per candidate
    (metrics with their drop, largest output error against eager, latency per batch size, speed-up, why
    rejected) and notes; ``plot`` names the latency image to embed."""
    metrics = list(report.eager.metrics)
    header = ["candidate", "precision", "format", "status", *metrics, "max abs error",
              *(f"batch {bs} ms" for bs in report.batch_sizes), "vs eager", "why"]
    lines = [*_deploy_summary(report), "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += [_deploy_row(c, report, metrics) for c in (report.eager, *report.candidates)]
    if report.notes:
        lines += ["", *(f"- {note}" for note in report.notes)]
    if plot is not None:
        lines += ["", f"![median latency per candidate]({plot})"]
    return "\n".join(lines) + "\n"
