"""Side-by-side latency suite: hand-written modules, torchbricks 0.4.2 and every torchbricks_fx backend.

For each workload of ``benchmarks/workloads.py`` (3-brick image model, 50-brick chain, ResNet-18
classifier, multi-task model) it times, in one process and on the same inputs and weights:

* anchors (no torchbricks_fx): the hand-written ``nn.Module``, ``torch.compile`` of it, and ONNX Runtime on
  its ``torch.onnx.export(dynamo=True)`` export (static shapes, as a user exports a fixed model);
* the peer: torchbricks 0.4.2 built from equivalent bricks (skipped when not installed);
* ours: the eager collection, the StageModule (fx), ``torch.compile`` of it and ONNX Runtime on the
  verified ``export_onnx`` file (dynamic batch), through the same runners as ``torchbricks_fx.benchmark``.

Everything runs with 1 thread (torch and ORT intra-op) with gradients disabled, each implementation
warmed up first (compile/export outside the timed region, reported as setup seconds).  The
implementations are timed in interleaved rounds with ``Timer.blocked_autorange``; the reported latency is
the best per-round median, so that drift on a shared machine hits all of them alike.  Outputs are
compared with the eager collection's.  Targets are checked and printed as PASS/FAIL, never tuned.

    python benchmarks/suite.py --markdown benchmarks/results/suite.md --json benchmarks/results/suite.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.workloads import WORKLOADS, Workload
from torchbricks_fx import BrickCollection, BrickMetrics, BrickModule
from torchbricks_fx.backends import make_runner
from torchbricks_fx.benchmarking import compare_outputs, environment, time_statement

COMMAND = "python benchmarks/suite.py --markdown benchmarks/results/suite.md --json benchmarks/results/suite.json"
ANCHOR, PEER, OURS = "anchor", "peer", "torchbricks_fx"
OURS_BACKENDS = ("eager", "fx", "compile", "onnxruntime")
TARGET_EAGER, TARGET_FX, TARGET_BEST = 2.0, 1.10, 1.10


@dataclass(frozen=True)
class Row:
    """One implementation of one workload.  ``median_s`` is the best per-round median (seconds per call)."""

    implementation: str
    kind: str
    median_s: float | None = None
    iqr_s: float | None = None
    setup_seconds: float | None = None
    matched: bool | None = None
    max_abs_error: float | None = None
    note: str | None = None


@dataclass(frozen=True)
class WorkloadResult:
    name: str
    description: str
    rows: tuple[Row, ...] = ()
    skipped: str | None = None


@dataclass
class _Impl:
    """An implementation ready to time: ``stmt`` over ``globals``; ``fetch()`` gives its outputs by name."""

    name: str
    kind: str
    stmt: str
    globals: dict[str, Any]
    fetch: Callable[[], dict[str, torch.Tensor]]
    setup_seconds: float | None = None
    cleanup: list[Callable[[], None]] = field(default_factory=list)


# ------------------------------------------------------------------------------------------- anchors
def _named(outputs: Sequence[str], values: Any) -> dict[str, torch.Tensor]:
    values = values if isinstance(values, (tuple, list)) else (values,)
    return {name: torch.as_tensor(v).detach().cpu().clone() for name, v in zip(outputs, values, strict=True)}


def _hand_written(workload: Workload, args: list[torch.Tensor]) -> _Impl:
    model = workload.hand_written.eval()
    return _Impl("hand-written nn.Module", ANCHOR, "model(*args)", {"model": model, "args": args},
                 lambda: _named(workload.outputs, model(*args)))


def _hand_compiled(workload: Workload, args: list[torch.Tensor]) -> _Impl:
    start = time.perf_counter()
    compiled = torch.compile(workload.hand_written.eval())
    for _ in range(3):
        compiled(*args)  # compiles here, outside the timed region
    seconds = time.perf_counter() - start
    return _Impl("hand-written + torch.compile", ANCHOR, "model(*args)", {"model": compiled, "args": args},
                 lambda: _named(workload.outputs, compiled(*args)), setup_seconds=seconds)


def _ort_session(path: Path) -> Any:
    import onnxruntime as ort

    from torchbricks_fx.export import ort_providers

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=ort_providers("cpu"))


def _hand_onnxruntime(workload: Workload, args: list[torch.Tensor], folder: Path) -> _Impl:
    path = folder / f"{workload.name}_hand_written.onnx"
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(workload.hand_written.eval(), tuple(args), f=None, dynamo=True,
                                    input_names=list(workload.input_names), output_names=list(workload.outputs),
                                    verbose=False)
    program.save(str(path))
    session = _ort_session(path)
    seconds = time.perf_counter() - start
    feeds = {name: arg.numpy() for name, arg in zip(workload.input_names, args, strict=True)}
    names = [o.name for o in session.get_outputs()]
    return _Impl("hand-written -> ONNX Runtime", ANCHOR, "session.run(names, feeds)",
                 {"session": session, "names": names, "feeds": feeds},
                 lambda: _named(workload.outputs, [torch.from_numpy(a) for a in session.run(names, feeds)]),
                 setup_seconds=seconds)


# ------------------------------------------------------------------------------------------- the peer
def peer_collection(collection: BrickCollection, stage_tags: str = "MODEL") -> Any:
    """torchbricks 0.4.2 collection with the same modules and connections: bricks alive in inference are
    tagged MODEL, the others LOSS or METRIC (not run at inference).  Raises ImportError when it is not installed and
    ValueError for bricks it cannot express."""
    from torchbricks.brick_collection import BrickCollection as PeerCollection
    from torchbricks.bricks import BrickMetrics as PeerMetrics
    from torchbricks.bricks import BrickModule as PeerModule

    from torchbricks_fx import Stage

    def convert(members: BrickCollection) -> dict[str, Any]:
        converted: dict[str, Any] = {}
        for key, member in members.items():
            if isinstance(member, BrickCollection):
                converted[key] = convert(member)
                continue
            if member.input_names == "all" or not isinstance(member, (BrickModule, BrickMetrics)):
                raise ValueError(f"brick {key!r} ({type(member).__name__}) has no torchbricks 0.4.2 equivalent")
            if isinstance(member, BrickMetrics):
                if Stage.INFERENCE in member.alive_stages or not len(member.metrics):
                    raise ValueError(f"metric brick {key!r} is alive at inference or in no stage")
                metrics = next(iter(member.metrics.values()))
                converted[key] = PeerMetrics(metrics, input_names=member.input_names, tags="METRIC",
                                             return_metrics=member.return_metrics)
                continue
            trainable = any(p.requires_grad for p in member.model.parameters()) or not list(member.parameters())
            tags = stage_tags if Stage.INFERENCE in member.alive_stages else "LOSS"
            # BrickModule(trainable=...) calls requires_grad_ on the shared model: keep each model as it is.
            converted[key] = PeerModule(member.model, input_names=member.input_names,
                                        output_names=list(member.output_names), tags=tags, trainable=trainable)
        return converted

    return PeerCollection(convert(collection))


def _peer(workload: Workload) -> _Impl:
    peer = peer_collection(workload.collection)
    inputs = dict(workload.named_inputs)
    tags = {"MODEL"}
    return _Impl("torchbricks 0.4.2 (peer)", PEER, "peer(inputs, tags=tags)",
                 {"peer": peer, "inputs": inputs, "tags": tags},
                 lambda: {n: v.detach().cpu().clone() for n, v in peer(inputs, tags=tags).items()
                          if n in workload.outputs})


# ------------------------------------------------------------------------------------------- ours
def _ours(workload: Workload, backend: str) -> _Impl:
    plan = workload.collection.plan(workload.stage, list(workload.outputs))
    runner = make_runner(backend, workload.collection, workload.stage, plan.outputs,
                         named_inputs=workload.named_inputs, device=torch.device("cpu"), threads=1,
                         input_names=plan.required_inputs)
    bound = runner.bind(workload.named_inputs)
    return _Impl(f"torchbricks_fx {backend}", OURS, bound.stmt, dict(bound.globals), bound.fetch,
                 setup_seconds=runner.setup_seconds, cleanup=[runner.close])


# ------------------------------------------------------------------------------------------- running
def _prepare(workload: Workload, folder: Path, *, compile_: bool, onnx: bool, peer: bool,
             log: Callable[[str], None]) -> tuple[list[_Impl], list[Row]]:
    args = [workload.named_inputs[name] for name in workload.input_names]
    makers: list[tuple[str, str, Callable[[], _Impl]]] = [
        ("hand-written nn.Module", ANCHOR, lambda: _hand_written(workload, args))]
    if compile_:
        makers.append(("hand-written + torch.compile", ANCHOR, lambda: _hand_compiled(workload, args)))
    if onnx:
        makers.append(("hand-written -> ONNX Runtime", ANCHOR, lambda: _hand_onnxruntime(workload, args, folder)))
    if peer:
        makers.append(("torchbricks 0.4.2 (peer)", PEER, lambda: _peer(workload)))
    for backend in OURS_BACKENDS:
        if (backend != "compile" or compile_) and (backend != "onnxruntime" or onnx):
            makers.append((f"torchbricks_fx {backend}", OURS, lambda b=backend: _ours(workload, b)))
    impls, failures = [], []
    for name, kind, make in makers:
        log(f"{workload.name}: preparing {name}")
        try:
            impl = make()
            start = time.perf_counter()
            for _ in range(3):
                eval(impl.stmt, dict(impl.globals))  # warm-up (and compilation for torch.compile)
            if impl.setup_seconds is not None and name == "torchbricks_fx compile":
                impl.setup_seconds += time.perf_counter() - start
            impls.append(impl)
        except Exception as error:
            reason = f"{type(error).__name__}: {' '.join(str(error).split())[:300]}"
            log(f"{workload.name}: {name} failed ({reason})")
            failures.append(Row(name, kind, note=f"failed: {reason}"))
    return impls, failures


def _time_rounds(impls: Sequence[_Impl], rounds: int, min_run_time: float,
                 log: Callable[[str], None], workload: str) -> dict[str, tuple[float, float]]:
    """Best per-round median and its round's IQR, per implementation, timed in interleaved rounds."""
    best: dict[str, tuple[float, float]] = {}
    for index in range(rounds):
        log(f"{workload}: timing round {index + 1}/{rounds}")
        for impl in impls:
            m = time_statement(impl.stmt, impl.globals, threads=1, min_run_time=min_run_time,
                               label=workload, description=impl.name)
            if impl.name not in best or m.median < best[impl.name][0]:
                best[impl.name] = (float(m.median), float(m.iqr))
    return best


def run_workload(workload: Workload, *, rounds: int, min_run_time: float, compile_: bool, onnx: bool,
                 peer: bool, log: Callable[[str], None]) -> WorkloadResult:
    workload.collection.eval()
    reference = {n: v.detach().cpu() for n, v in workload.collection(dict(workload.named_inputs),
                                                                      stage=workload.stage).items()
                 if n in workload.outputs}
    with tempfile.TemporaryDirectory(prefix="torchbricks_fx_suite_") as tmp:
        impls, failures = _prepare(workload, Path(tmp), compile_=compile_, onnx=onnx, peer=peer, log=log)
        try:
            checks = {impl.name: compare_outputs(reference, impl.fetch()) for impl in impls}
            timings = _time_rounds(impls, rounds, min_run_time, log, workload.name)
        finally:
            for impl in impls:
                for cleanup in impl.cleanup:
                    cleanup()
    rows = [Row(impl.name, impl.kind, median_s=timings[impl.name][0], iqr_s=timings[impl.name][1],
                setup_seconds=impl.setup_seconds, matched=checks[impl.name][0],
                max_abs_error=checks[impl.name][1] if math.isfinite(checks[impl.name][1]) else None)
            for impl in impls]
    order = {name: i for i, name in enumerate(_ORDER)}
    rows = sorted([*rows, *failures], key=lambda r: order.get(r.implementation, len(order)))
    return WorkloadResult(workload.name, workload.description, tuple(rows))


_ORDER = ("hand-written nn.Module", "hand-written + torch.compile", "hand-written -> ONNX Runtime",
          "torchbricks 0.4.2 (peer)", *(f"torchbricks_fx {b}" for b in OURS_BACKENDS))


# ------------------------------------------------------------------------------------------- targets
@dataclass(frozen=True)
class Targets:
    eager_ratio: float | None
    fx_ratio: float | None
    best_ours: str | None
    fastest_anchor: str | None
    best_ratio: float | None

    @property
    def passed(self) -> dict[str, bool | None]:
        def check(value: float | None, limit: float) -> bool | None:
            return None if value is None else value <= limit

        return {"eager": check(self.eager_ratio, TARGET_EAGER), "fx": check(self.fx_ratio, TARGET_FX),
                "best": check(self.best_ratio, TARGET_BEST)}


def targets(result: WorkloadResult) -> Targets:
    timed = {r.implementation: r for r in result.rows if r.median_s is not None}
    hand = timed.get("hand-written nn.Module")

    def ratio(name: str) -> float | None:
        row = timed.get(name)
        return row.median_s / hand.median_s if row and hand and row.median_s and hand.median_s else None

    # Only implementations whose outputs match eager may set or meet a target.
    anchors = [r for r in timed.values() if r.kind == ANCHOR and r.matched]
    ours = [r for r in timed.values() if r.kind == OURS and r.matched]
    fastest = min(anchors, key=lambda r: r.median_s or 0.0, default=None)
    best = min(ours, key=lambda r: r.median_s or 0.0, default=None)
    best_ratio = best.median_s / fastest.median_s if best and fastest and best.median_s and fastest.median_s else None
    return Targets(ratio("torchbricks_fx eager"), ratio("torchbricks_fx fx"), best and best.implementation,
                   fastest and fastest.implementation, best_ratio)


# ------------------------------------------------------------------------------------------- rendering
def _us(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e6:,.1f}"


def _verdict(value: bool | None) -> str:
    return "n/a" if value is None else ("PASS" if value else "FAIL")


def render(data: Mapping[str, Any]) -> str:
    """The Markdown fragment, from the JSON data ``main`` writes (rendering kept apart from measuring)."""
    settings = data["settings"]
    lines = ["## Side-by-side suite", "",
             f"Command: `{data['command']}`  ",
             f"Settings: {settings['threads']} thread (torch and ONNX Runtime intra-op), gradients disabled, inference "
             f"stage, best of {settings['rounds']} interleaved per-round medians of `Timer.blocked_autorange` "
             f"(min_run_time {settings['min_run_time']} s); times per call in microseconds; setup = compile or "
             f"export time, outside the timed region. torchbricks 0.4.2: {settings['peer']}.", ""]
    results = [_result_from_dict(w) for w in data["workloads"]]
    for result in results:
        lines += _render_workload(result)
    lines += _render_targets(results)
    return "\n".join(lines) + "\n"


def _render_workload(result: WorkloadResult) -> list[str]:
    lines = [f"### {result.name}: {result.description}", ""]
    if result.skipped:
        return [*lines, f"Skipped: {result.skipped}", ""]
    hand = next((r for r in result.rows if r.implementation == "hand-written nn.Module" and r.median_s), None)
    lines += ["| implementation | median (us) | IQR (us) | vs hand-written | setup (s) | matches eager |",
              "|---|---:|---:|---:|---:|---|"]
    for row in result.rows:
        if row.median_s is None:
            lines.append(f"| {row.implementation} | {row.note or 'not run'} | | | | |")
            continue
        ratio = f"{row.median_s / hand.median_s:.2f}x" if hand and hand.median_s else "-"
        setup = "-" if row.setup_seconds is None else f"{row.setup_seconds:.1f}"
        match = "yes" if row.matched else f"NO (max error {row.max_abs_error})"
        lines.append(f"| {row.implementation} | {_us(row.median_s)} | {_us(row.iqr_s)} | {ratio} | {setup} | {match} |")
    return [*lines, ""]


def _render_targets(results: Sequence[WorkloadResult]) -> list[str]:
    lines = ["### Targets", "",
             "Anchors are the implementations without torchbricks_fx: the hand-written module, torch.compile of it "
             "and ONNX Runtime on its export.", "",
             f"| workload | eager / hand (<= {TARGET_EAGER:g}x) | StageModule / hand (<= {TARGET_FX:.2f}x) "
             f"| best torchbricks_fx / fastest anchor (<= {TARGET_BEST:.1f}x) |", "|---|---|---|---|"]
    for result in results:
        if result.skipped:
            lines.append(f"| {result.name} | skipped | skipped | skipped |")
            continue
        t = targets(result)
        passed = t.passed
        best = (f"{_cell(t.best_ratio, passed['best'])} ({t.best_ours} vs {t.fastest_anchor})"
                if t.best_ratio is not None else "n/a")
        lines.append(f"| {result.name} | {_cell(t.eager_ratio, passed['eager'])} "
                     f"| {_cell(t.fx_ratio, passed['fx'])} | {best} |")
    return [*lines, ""]


def _cell(value: float | None, passed: bool | None) -> str:
    return "n/a" if value is None else f"{value:.2f}x {_verdict(passed)}"


def _result_from_dict(data: Mapping[str, Any]) -> WorkloadResult:
    return WorkloadResult(data["name"], data["description"], tuple(Row(**row) for row in data["rows"]),
                          data.get("skipped"))


# ------------------------------------------------------------------------------------------- main
def _peer_status() -> tuple[bool, str]:
    try:
        import importlib.metadata

        import torchbricks  # noqa: F401

        return True, f"installed ({importlib.metadata.version('torchbricks')})"
    except Exception as error:  # not installed, or installed but broken: skip it either way
        return False, f"not installed, skipped ({type(error).__name__})"


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
    peer_ok, peer_note = _peer_status()
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
            "workloads": [asdict(w) for w in workloads]}
    text = render(data)
    print(text)
    if args.json:
        _write(args.json, json.dumps(data, indent=2))
    if args.markdown:
        _write(args.markdown, text)
    return 0


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(text, encoding="utf-8")
    os.replace(partial, path)


if __name__ == "__main__":
    sys.exit(main())
