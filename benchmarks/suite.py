"""Side-by-side latency suite: hand-written modules, torchbricks 0.4.2 and every torchbricks_fx backend.

For each workload of ``benchmarks/workloads.py`` (3-brick image model, 50-brick chain, ResNet-18
classifier, multi-task model) it times, in one process and on the same inputs and weights:

* anchors (no torchbricks_fx): the hand-written ``nn.Module`` under ``torch.no_grad()``, plain
  ``torch.compile`` of it called under ``torch.no_grad()`` (what a user writes without stage knowledge),
  and ONNX Runtime on its ``torch.onnx.export(dynamo=True)`` export (static shapes, ``session.run``);
* the peer: torchbricks 0.4.2 built from equivalent bricks (skipped when not installed);
* ours: the eager collection, the StageModule (fx), the stage compiled for what it is
  (``compile_stage(..., compile=True)``, dynamic batch; and with ``CompileOptions(dynamic_batch=False)``,
  one graph per batch size; and with ``CompileOptions(autocast=torch.bfloat16)``, whose floating outputs
  are checked at bfloat16's tolerance and which counts for no target, the anchors being float32) and ONNX
  Runtime on the verified ``export_onnx`` file (dynamic batch, IO binding), through the same runners as
  ``torchbricks_fx.benchmark``.

Everything runs with 1 thread (torch and ORT intra-op), each implementation warmed up first (compilation
and export outside the timed region, reported as setup seconds).  The implementations are timed in
interleaved rounds with ``Timer.blocked_autorange``; the reported latency is the best per-round median, so
that drift on a shared machine hits all of them alike.  Outputs are compared with the eager collection's.
Targets are checked and printed as PASS/FAIL, never tuned.

    python benchmarks/suite.py --markdown benchmarks/results/suite.md --json benchmarks/results/suite.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.peer import peer_collection, peer_status
from benchmarks.workloads import WORKLOADS, Workload
from torchbricks_fx.benchmarking import BenchmarkResult, time_statement
from torchbricks_fx.compiling import CompileOptions
from torchbricks_fx.errors import error_summary
from torchbricks_fx.files import write_text
from torchbricks_fx.numerics import compare_outputs, difference, tolerance
from torchbricks_fx.ort import ort_session
from torchbricks_fx.reporting import environment
from torchbricks_fx.runners import make_runner

COMMAND = "python benchmarks/suite.py --markdown benchmarks/results/suite.md --json benchmarks/results/suite.json"
HAND, HAND_COMPILE, HAND_ORT = "hand-written nn.Module", "hand-written + torch.compile", "hand-written -> ONNX Runtime"
PEER = "torchbricks 0.4.2 (peer)"
OURS_BACKENDS = ("eager", "fx", "compile", "onnxruntime")
STATIC = "compile, static batch"  # the compile backend with CompileOptions(dynamic_batch=False)
BF16 = "compile, bf16 autocast"  # CompileOptions(autocast=torch.bfloat16): outputs checked at bf16 tolerance
OPTIONS = {STATIC: CompileOptions(dynamic_batch=False), BF16: CompileOptions(autocast=torch.bfloat16)}
TARGET_EAGER, TARGET_FX, TARGET_BEST = 2.0, 1.10, 1.0
TARGET_COMPILE = {"resnet18": 0.6, "multitask": 0.6, "image3": 1.0, "chain50": 1.0}


def ours(backend: str) -> str:
    return f"torchbricks_fx {backend}"


def kind(implementation: str) -> str:
    """``anchor`` (no torchbricks_fx), ``peer`` or ``ours``."""
    return "ours" if implementation.startswith("torchbricks_fx") else "peer" if implementation == PEER else "anchor"


@dataclass(frozen=True)
class WorkloadResult:
    name: str
    description: str
    rows: tuple[BenchmarkResult, ...] = ()  # backend = the implementation's name
    skipped: str | None = None
    notes: Mapping[str, str] = field(default_factory=dict)  # implementation -> remark (e.g. the compiled choice)


@dataclass
class _Impl:
    """An implementation ready to time: ``stmt`` over ``globals``; ``fetch()`` gives its outputs by name."""

    name: str
    stmt: str
    globals: dict[str, Any]
    fetch: Callable[[], dict[str, torch.Tensor]]
    setup_seconds: float | None = None
    cleanup: list[Callable[[], None]] = field(default_factory=list)
    compiles: Callable[[], int] | None = None
    note: Callable[[], str] | None = None


# ------------------------------------------------------------------------------------------- anchors
def _named(outputs: Sequence[str], values: Any) -> dict[str, torch.Tensor]:
    values = values if isinstance(values, (tuple, list)) else (values,)
    return {name: torch.as_tensor(v).detach().cpu().clone() for name, v in zip(outputs, values, strict=True)}


def _hand_written(workload: Workload, args: list[torch.Tensor]) -> _Impl:
    model = workload.hand_written.eval()
    return _Impl(HAND, "model(*args)", {"model": model, "args": args}, lambda: _named(workload.outputs, model(*args)))


def _hand_compiled(workload: Workload, args: list[torch.Tensor]) -> _Impl:
    start = time.perf_counter()
    compiled = torch.compile(workload.hand_written.eval())
    for _ in range(3):
        compiled(*args)  # compiles here (under the suite's no_grad), outside the timed region
    return _Impl(HAND_COMPILE, "model(*args)", {"model": compiled, "args": args},
                 lambda: _named(workload.outputs, compiled(*args)), setup_seconds=time.perf_counter() - start)


def _hand_onnxruntime(workload: Workload, args: list[torch.Tensor], folder: Path) -> _Impl:
    path = folder / f"{workload.name}_hand_written.onnx"
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(workload.hand_written.eval(), tuple(args), f=None, dynamo=True,
                                    input_names=list(workload.input_names), output_names=list(workload.outputs),
                                    verbose=False)
    program.save(str(path))
    session = ort_session(path, "cpu", threads=1)
    feeds = {name: arg.numpy() for name, arg in zip(workload.input_names, args, strict=True)}
    names = [o.name for o in session.get_outputs()]
    return _Impl(HAND_ORT, "session.run(names, feeds)", {"session": session, "names": names, "feeds": feeds},
                 lambda: _named(workload.outputs, [torch.from_numpy(a) for a in session.run(names, feeds)]),
                 setup_seconds=time.perf_counter() - start)


def _peer(workload: Workload) -> _Impl:
    peer = peer_collection(workload.collection)
    inputs = dict(workload.named_inputs)
    tags = {"MODEL"}
    return _Impl(PEER, "peer(inputs, tags=tags)", {"peer": peer, "inputs": inputs, "tags": tags},
                 lambda: {n: v.detach().cpu().clone() for n, v in peer(inputs, tags=tags).items()
                          if n in workload.outputs})


# ------------------------------------------------------------------------------------------- ours
def _ours(workload: Workload, backend: str, label: str | None = None) -> _Impl:
    plan = workload.collection.plan(workload.stage, list(workload.outputs))
    options = OPTIONS.get(label or "")
    runner = make_runner(backend, workload.collection, workload.stage, plan.outputs,
                         named_inputs=workload.named_inputs, device=torch.device("cpu"), threads=1,
                         compile_options=options)
    bound = runner.bind(workload.named_inputs)
    module = bound.globals.get("stage_module")
    compiled = getattr(module, "compiled", None)
    def note() -> str:
        timings = ", ".join(f"{name} {seconds * 1e3:.2f} ms" for name, seconds in compiled.timings.items())
        return f"ran as {compiled.choice}" + (f"; measured {timings}" if timings else "")
    return _Impl(ours(label or backend), bound.stmt, dict(bound.globals), bound.fetch,
                 setup_seconds=runner.setup_seconds, cleanup=[runner.close], compiles=runner.compile_count,
                 note=note if compiled is not None else None)


# ------------------------------------------------------------------------------------------- running
def _prepare(workload: Workload, folder: Path, *, compile_: bool, onnx: bool, peer: bool,
             log: Callable[[str], None]) -> tuple[list[_Impl], list[BenchmarkResult]]:
    args = [workload.named_inputs[name] for name in workload.input_names]
    makers: list[tuple[str, Callable[[], _Impl]]] = [(HAND, lambda: _hand_written(workload, args))]
    if compile_:
        makers.append((HAND_COMPILE, lambda: _hand_compiled(workload, args)))
    if onnx:
        makers.append((HAND_ORT, lambda: _hand_onnxruntime(workload, args, folder)))
    if peer:
        makers.append((PEER, lambda: _peer(workload)))
    for backend in OURS_BACKENDS:
        if (backend != "compile" or compile_) and (backend != "onnxruntime" or onnx):
            makers.append((ours(backend), lambda b=backend: _ours(workload, b)))
        if backend == "compile" and compile_:
            makers += [(ours(label), lambda label=label: _ours(workload, "compile", label)) for label in OPTIONS]
    impls, failures = [], []
    for name, make in makers:
        log(f"{workload.name}: preparing {name}")
        try:
            impl = make()
            start = time.perf_counter()
            for _ in range(3):
                eval(impl.stmt, dict(impl.globals))  # warm-up (and compilation for the compiled ones)
            if impl.compiles is not None:
                impl.setup_seconds = (impl.setup_seconds or 0.0) + time.perf_counter() - start
            impls.append(impl)
        except Exception as error:
            reason = error_summary(error, 300)
            log(f"{workload.name}: {name} failed ({reason})")
            failures.append(BenchmarkResult(name, "cpu", workload.stage.value, _batch(workload), 1, failed=True,
                                            reason=reason))
    return impls, failures


def _batch(workload: Workload) -> int:
    return int(workload.named_inputs[workload.input_names[0]].shape[0])


def _time_rounds(impls: Sequence[_Impl], rounds: int, min_run_time: float, log: Callable[[str], None],
                 workload: str) -> dict[str, Any]:
    """Best per-round measurement (by median) per implementation, timed in interleaved rounds."""
    best: dict[str, Any] = {}
    for index in range(rounds):
        log(f"{workload}: timing round {index + 1}/{rounds}")
        for impl in impls:
            m = time_statement(impl.stmt, impl.globals, threads=1, min_run_time=min_run_time,
                               label=workload, description=impl.name)
            if impl.name not in best or m.median < best[impl.name].median:
                best[impl.name] = m
    return best


def run_workload(workload: Workload, *, rounds: int, min_run_time: float, compile_: bool, onnx: bool,
                 peer: bool, log: Callable[[str], None]) -> WorkloadResult:
    workload.collection.eval()
    reference = {n: v.detach().cpu() for n, v in workload.collection(dict(workload.named_inputs),
                                                                      stage=workload.stage).items()
                 if n in workload.outputs}
    batch = _batch(workload)
    with tempfile.TemporaryDirectory(prefix="torchbricks_fx_suite_") as tmp:
        impls, rows = _prepare(workload, Path(tmp), compile_=compile_, onnx=onnx, peer=peer, log=log)
        try:
            checks = {impl.name: _check(reference, impl) for impl in impls}
            timings = _time_rounds(impls, rounds, min_run_time, log, workload.name)
        finally:
            for impl in impls:
                for cleanup in impl.cleanup:
                    cleanup()
    for impl in impls:
        m, (matched, error) = timings[impl.name], checks[impl.name]
        rows.append(BenchmarkResult(impl.name, "cpu", workload.stage.value, batch, 1, median_s=float(m.median),
                                    iqr_s=float(m.iqr), runs=len(m.times), throughput=batch / float(m.median),
                                    setup_seconds=impl.setup_seconds, matched=matched,
                                    max_abs_error=error if error != float("inf") else None,
                                    compiles=impl.compiles() if impl.compiles else None))
    order = {name: i for i, name in enumerate(_ORDER)}
    notes = {impl.name: impl.note() for impl in impls if impl.note is not None}
    return WorkloadResult(workload.name, workload.description,
                          tuple(sorted(rows, key=lambda r: order.get(r.backend, len(order)))), notes=notes)


_ORDER = (HAND, HAND_COMPILE, HAND_ORT, PEER,
          *(ours(b) for b in ("eager", "fx", "compile", STATIC, BF16, "onnxruntime")))


def _check(reference: Mapping[str, torch.Tensor], impl: _Impl) -> tuple[bool, float]:
    """Outputs against the eager collection's: float32 tolerance, or bfloat16's for the autocast stage's
    floating outputs (what the stage itself verifies before it accepts autocast)."""
    got = impl.fetch()
    if impl.name != ours(BF16):
        return compare_outputs(reference, got)
    rtol, atol = tolerance(torch.bfloat16)
    diffs = [difference(got[name], want, rtol, atol) for name, want in reference.items() if want.is_floating_point()]
    return all(d.ok for d in diffs), max((d.max_abs for d in diffs), default=0.0)


# ------------------------------------------------------------------------------------------- targets
@dataclass(frozen=True)
class Targets:
    eager_ratio: float | None
    fx_ratio: float | None
    compile_ratio: float | None  # float32: the best of the compiled stage's rows without autocast
    compile_target: float
    bf16_ratio: float | None  # shown, not a target: the anchors compute in float32
    best_ours: str | None
    fastest_anchor: str | None
    best_ratio: float | None

    @property
    def passed(self) -> dict[str, bool | None]:
        def check(value: float | None, limit: float) -> bool | None:
            return None if value is None else value <= limit

        return {"eager": check(self.eager_ratio, TARGET_EAGER), "fx": check(self.fx_ratio, TARGET_FX),
                "compile": check(self.compile_ratio, self.compile_target),
                "best": check(self.best_ratio, TARGET_BEST)}


def targets(result: WorkloadResult) -> Targets:
    timed = {r.backend: r for r in result.rows if r.median_s is not None}
    hand = timed.get(HAND)

    def ratio(name: str) -> float | None:
        row = timed.get(name)
        return row.median_s / hand.median_s if row and hand and row.median_s and hand.median_s else None

    # Only implementations whose outputs match eager may set or meet a target.
    anchors = [r for r in timed.values() if kind(r.backend) == "anchor" and r.matched]
    mine = [r for r in timed.values() if kind(r.backend) == "ours" and r.matched and r.backend != ours(BF16)]
    fastest = min(anchors, key=lambda r: r.median_s or 0.0, default=None)
    best = min(mine, key=lambda r: r.median_s or 0.0, default=None)
    best_ratio = best.median_s / fastest.median_s if best and fastest and best.median_s and fastest.median_s else None
    compiled = [r for r in (ratio(ours("compile")), ratio(ours(STATIC))) if r is not None]
    bf16 = timed.get(ours(BF16))
    return Targets(ratio(ours("eager")), ratio(ours("fx")), min(compiled, default=None),
                   TARGET_COMPILE.get(result.name, 1.0), ratio(ours(BF16)) if bf16 and bf16.matched else None,
                   best and best.backend, fastest and fastest.backend, best_ratio)


# ------------------------------------------------------------------------------------------- rendering
def _us(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e6:,.1f}"


def render(data: Mapping[str, Any]) -> str:
    """The Markdown fragment, from the JSON data ``main`` writes (rendering kept apart from measuring)."""
    settings = data["settings"]
    load = data["environment"].get("load_average")
    lines = ["## Side-by-side suite", "",
             f"Command: `{data['command']}`  ",
             f"Settings: {settings['threads']} thread (torch and ONNX Runtime intra-op), gradients disabled, inference "
             f"stage, best of {settings['rounds']} interleaved per-round medians of `Timer.blocked_autorange` "
             f"(min_run_time {settings['min_run_time']} s; n = measurements behind the median); times per call in "
             f"microseconds; setup = compile or export time, outside the timed region; machine load "
             f"{load if load is None else round(load, 1)} at the end. torchbricks 0.4.2: {settings['peer']}.", ""]
    results = [_result_from_dict(w) for w in data["workloads"]]
    for result in results:
        lines += _render_workload(result)
    lines += _render_targets(results)
    return "\n".join(lines) + "\n"


def _render_workload(result: WorkloadResult) -> list[str]:
    lines = [f"### {result.name}: {result.description}", ""]
    if result.skipped:
        return [*lines, f"Skipped: {result.skipped}", ""]
    hand = next((r for r in result.rows if r.backend == HAND and r.median_s), None)
    lines += ["| implementation | median (us) | IQR (us) | n | vs hand-written | setup (s) | matches eager |",
              "|---|---:|---:|---:|---:|---:|---|"]
    for row in result.rows:
        if row.median_s is None:
            lines.append(f"| {row.backend} | {row.reason or 'not run'} | | | | | |")
            continue
        ratio = f"{row.median_s / hand.median_s:.2f}x" if hand and hand.median_s else "-"
        setup = "-" if row.setup_seconds is None else f"{row.setup_seconds:.1f}"
        match = "yes" if row.matched else f"NO (max error {row.max_abs_error})"
        name = row.backend + (f" ({result.notes[row.backend]})" if row.backend in result.notes else "")
        lines.append(f"| {name} | {_us(row.median_s)} | {_us(row.iqr_s)} | {row.runs} | {ratio} | {setup} | {match} |")
    return [*lines, ""]


def _render_targets(results: Sequence[WorkloadResult]) -> list[str]:
    lines = ["### Targets", "",
             "Anchors are the implementations without torchbricks_fx: the hand-written module, plain torch.compile "
             "of it under no_grad and ONNX Runtime on its export.", "",
             f"| workload | eager / hand (<= {TARGET_EAGER:g}x) | StageModule / hand (<= {TARGET_FX:.2f}x) "
             f"| best compiled stage / hand | best torchbricks_fx / fastest anchor (<= {TARGET_BEST:.1f}x) "
             f"| compiled stage, bf16 autocast / hand (not a target) |",
             "|---|---|---|---|---|---|"]
    for result in results:
        if result.skipped:
            lines.append(f"| {result.name} | skipped | skipped | skipped | skipped | skipped |")
            continue
        t = targets(result)
        passed = t.passed
        best = (f"{_cell(t.best_ratio, passed['best'])} ({t.best_ours} vs {t.fastest_anchor})"
                if t.best_ratio is not None else "n/a")
        lines.append(f"| {result.name} | {_cell(t.eager_ratio, passed['eager'])} | {_cell(t.fx_ratio, passed['fx'])} "
                     f"| {_cell(t.compile_ratio, passed['compile'])} (<= {t.compile_target:.1f}x) | {best} "
                     f"| {'n/a' if t.bf16_ratio is None else f'{t.bf16_ratio:.2f}x'} |")
    return [*lines, ""]


def _cell(value: float | None, passed: bool | None) -> str:
    verdict = "n/a" if passed is None else ("PASS" if passed else "FAIL")
    return "n/a" if value is None else f"{value:.2f}x {verdict}"


def _result_from_dict(data: Mapping[str, Any]) -> WorkloadResult:
    names = {f.name for f in dataclasses.fields(BenchmarkResult)}
    rows = tuple(BenchmarkResult(**{k: v for k, v in row.items() if k in names}) for row in data["rows"])
    return WorkloadResult(data["name"], data["description"], rows, data.get("skipped"), data.get("notes") or {})


# ------------------------------------------------------------------------------------------- main
def _build(name: str) -> Workload | str:
    torch.manual_seed(0)
    try:
        return WORKLOADS[name]()
    except ImportError as error:
        return f"cannot build it here ({type(error).__name__}: {error})"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", default=",".join(WORKLOADS), help=f"comma-separated; of {', '.join(WORKLOADS)}")
    parser.add_argument("--min-run-time", type=float, default=0.15, help="seconds per measurement")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds (the best median is kept)")
    parser.add_argument("--skip-compile", action="store_true", help="skip torch.compile (hand-written and ours)")
    parser.add_argument("--skip-onnx", action="store_true", help="skip ONNX Runtime (hand-written and ours)")
    parser.add_argument("--skip-peer", action="store_true", help="skip torchbricks 0.4.2 even when installed")
    parser.add_argument("--markdown", type=Path, help="write the Markdown fragment here")
    parser.add_argument("--json", type=Path, help="write the measurements as JSON here")
    args = parser.parse_args(argv)
    unknown = [n for n in args.workloads.split(",") if n not in WORKLOADS]
    if unknown:
        parser.error(f"unknown workload(s) {unknown}; choose from {', '.join(WORKLOADS)}")

    def log(line: str) -> None:
        print(f"[suite] {line}", file=sys.stderr, flush=True)

    torch.set_num_threads(1)
    peer_ok, peer_note = peer_status()
    peer_ok = peer_ok and not args.skip_peer
    workloads = []
    with torch.no_grad():
        for name in args.workloads.split(","):
            built = _build(name)
            if isinstance(built, str):
                log(f"{name}: skipped, {built}")
                workloads.append(WorkloadResult(name, name, skipped=built))
                continue
            workloads.append(run_workload(built, rounds=args.rounds, min_run_time=args.min_run_time,
                                          compile_=not args.skip_compile, onnx=not args.skip_onnx, peer=peer_ok,
                                          log=log))
    data = {"command": COMMAND, "environment": environment(),
            "settings": {"threads": 1, "rounds": args.rounds, "min_run_time": args.min_run_time,
                         "peer": peer_note if not args.skip_peer else "skipped (--skip-peer)"},
            "workloads": [dataclasses.asdict(w) for w in workloads]}
    text = render(data)
    print(text)
    if args.json:
        write_text(args.json, json.dumps(data, indent=2))
    if args.markdown:
        write_text(args.markdown, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
