"""Per-call overhead of torchbricks_fx against hand-written modules, and the cost of planning.

1. Latency (inference, 1 thread, median of ``torch.utils.benchmark.Timer.blocked_autorange``) of the
   eager collection and of the StageModule, against an equivalent hand-written ``nn.Module`` sharing the
   same weights.  Targets: eager <= 2x, StageModule <= 1.10x hand-written.
2. Planning + graph construction (``compile_stage`` on a fresh n-brick chain) for n = 100 ... 5000.
   Target: 1000 bricks in under 1 s, growing linearly.

    python benchmarks/bench_overhead.py --markdown benchmarks/results/overhead.md
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.benchmark import Timer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.workloads import Workload, build_workloads, chain
from torchbricks_fx import Stage, compile_stage

COMMAND = "python benchmarks/bench_overhead.py --markdown benchmarks/results/overhead.md"


@dataclass(frozen=True)
class OverheadRow:
    workload: str
    hand_written_us: float
    eager_us: float
    stage_module_us: float

    @property
    def eager_ratio(self) -> float:
        return self.eager_us / self.hand_written_us

    @property
    def stage_module_ratio(self) -> float:
        return self.stage_module_us / self.hand_written_us


@dataclass(frozen=True)
class PlanningRow:
    n_bricks: int
    seconds: float

    @property
    def us_per_brick(self) -> float:
        return self.seconds / self.n_bricks * 1e6


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def median_us(fn, min_run_time: float) -> float:
    timer = Timer(stmt="fn()", globals={"fn": fn}, num_threads=1)
    return timer.blocked_autorange(min_run_time=min_run_time).median * 1e6


def measure_overhead(workload: Workload, min_run_time: float) -> OverheadRow:
    collection, named_inputs = workload.collection, workload.named_inputs
    collection.eval()
    stage_module = compile_stage(collection, Stage.INFERENCE, outputs=list(workload.outputs))
    positional = [named_inputs[name] for name in workload.input_names]
    hand_written = workload.hand_written

    def run_hand_written():
        with torch.no_grad():
            return hand_written(*positional)

    stage_module(named_inputs)  # first call checks output arity
    # Interleave the three a few times so that drift on a shared machine hits them alike.
    samples: dict[str, list[float]] = {"hand": [], "eager": [], "fx": []}
    for _ in range(3):
        samples["hand"].append(median_us(run_hand_written, min_run_time))
        samples["eager"].append(median_us(lambda: collection(named_inputs, Stage.INFERENCE), min_run_time))
        samples["fx"].append(median_us(lambda: stage_module(named_inputs), min_run_time))
    best = {k: min(v) for k, v in samples.items()}
    return OverheadRow(workload.name, best["hand"], best["eager"], best["fx"])


def measure_planning(n_bricks: int) -> PlanningRow:
    collection = chain(n_bricks=n_bricks, batch_size=1).collection
    start = time.perf_counter()
    compile_stage(collection, Stage.INFERENCE)  # a fresh collection: nothing cached
    return PlanningRow(n_bricks, time.perf_counter() - start)


def render(overhead: list[OverheadRow], planning: list[PlanningRow]) -> str:
    lines = ["## Per-call overhead and planning cost", "",
             f"Command: `{COMMAND}`  ", f"Machine: {cpu_name()}, "
             f"torch {torch.__version__}, 1 thread, inference stage, best of 3 interleaved medians "
             "(`torch.utils.benchmark.Timer.blocked_autorange`).", "",
             "| workload | hand-written (us) | eager collection (us) | eager / hand | StageModule (us) "
             "| StageModule / hand | targets (eager <= 2x, StageModule <= 1.10x) |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for row in overhead:
        ok = row.eager_ratio <= 2.0 and row.stage_module_ratio <= 1.10
        lines.append(f"| {row.workload} | {row.hand_written_us:.1f} | {row.eager_us:.1f} | {row.eager_ratio:.2f}x "
                     f"| {row.stage_module_us:.1f} | {row.stage_module_ratio:.2f}x | {'PASS' if ok else 'FAIL'} |")
    lines += ["", "Planning + graph construction (`compile_stage` on a fresh n-brick chain of nn.Linear):", "",
              "| bricks | seconds | us per brick |", "|---:|---:|---:|"]
    lines += [f"| {row.n_bricks} | {row.seconds:.3f} | {row.us_per_brick:.0f} |" for row in planning]
    thousand = next(row for row in planning if row.n_bricks == 1000)
    per_brick = [row.us_per_brick for row in planning]
    lines += ["", f"1000 bricks: {thousand.seconds:.3f} s ({'PASS' if thousand.seconds < 1.0 else 'FAIL'}, "
              f"target < 1 s); time per brick ranges {min(per_brick):.0f}-{max(per_brick):.0f} us from "
              f"{planning[0].n_bricks} to {planning[-1].n_bricks} bricks (linear growth = a flat column).", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--markdown", type=Path, help="write the report section here")
    parser.add_argument("--min-run-time", type=float, default=0.5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    overhead = []
    for workload in build_workloads(["image3", "chain50"]):
        print(f"timing {workload.name} ...", file=sys.stderr)
        overhead.append(measure_overhead(workload, args.min_run_time))
    planning = []
    for n_bricks in (100, 500, 1000, 2000, 5000):
        print(f"planning {n_bricks} bricks ...", file=sys.stderr)
        planning.append(min((measure_planning(n_bricks) for _ in range(2)), key=lambda r: r.seconds))
    report = render(overhead, planning)
    print(report)
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(report)


if __name__ == "__main__":
    main()
