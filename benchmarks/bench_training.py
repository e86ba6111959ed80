"""Training-step latency: forward, loss, backward and optimizer step of the TRAIN stage.

For each workload it times, in one process with 1 thread and interleaved rounds (best per-round median of
``Timer.blocked_autorange``): the hand-written module with its losses (eager, and plain ``torch.compile``),
the eager collection, the compiled TRAIN stage (``compile_stage(..., Stage.TRAIN, compile=True)``: forward
and backward compiled) and ``BrickLightningModule.training_step`` without and with ``compile=True`` (what
Lightning calls each step).  Every variant trains the same shared weights with plain SGD, so they run the
same arithmetic; compilation happens in the warm-up, reported as setup seconds.

    python benchmarks/bench_training.py --markdown benchmarks/results/training.md
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.workloads import Workload, multitask, resnet18
from torchbricks_fx import Stage, compile_stage
from torchbricks_fx.benchmarking import time_statement
from torchbricks_fx.files import write_text
from torchbricks_fx.lightning import BrickLightningModule
from torchbricks_fx.reporting import cpu_model

COMMAND = "python benchmarks/bench_training.py --markdown benchmarks/results/training.md"
HAND = "hand-written module + losses"


@dataclass(frozen=True)
class StepResult:
    implementation: str
    median_s: float
    runs: int
    setup_seconds: float


def _inputs(workload: Workload, batch_size: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    raw = torch.rand(batch_size, *workload.named_inputs["raw"].shape[1:])
    if workload.name == "multitask":
        return {"raw": raw, "labels": torch.randint(0, 5, (batch_size,)),
                "masks": torch.randint(0, 4, (batch_size, *raw.shape[2:]))}
    return {"raw": raw, "targets": torch.randint(0, 10, (batch_size,))}


def _hand_loss(workload: Workload, model: Callable[..., tuple[torch.Tensor, ...]]) -> Callable[[dict], torch.Tensor]:
    cross_entropy = nn.CrossEntropyLoss()
    if workload.name == "multitask":
        def loss(inputs: dict) -> torch.Tensor:
            logits, _, seg = model(inputs["raw"])
            return cross_entropy(logits, inputs["labels"]) + cross_entropy(seg, inputs["masks"])
        return loss

    def classification_loss(inputs: dict) -> torch.Tensor:
        logits, _, _ = model(inputs["raw"])
        return cross_entropy(logits, inputs["targets"])
    return classification_loss


def _steps(workload: Workload) -> dict[str, Callable[[dict], torch.Tensor]]:
    """Each implementation as ``inputs -> total loss`` (the forward and loss part of a step)."""
    collection = workload.collection
    hand = workload.hand_written.train()
    stage = compile_stage(collection, Stage.TRAIN, compile=True)
    names = ("raw", "labels", "masks") if workload.name == "multitask" else ("raw", "targets")
    lightning = {flag: BrickLightningModule(collection, lambda p: torch.optim.SGD(p, lr=0.01), compile=flag,
                                            batch_names=names) for flag in (False, True)}

    def losses(values: dict) -> torch.Tensor:
        return sum(collection.extract_losses(values).values())  # type: ignore[return-value]

    return {
        HAND: _hand_loss(workload, hand),
        "hand-written + torch.compile": _hand_loss(workload, torch.compile(hand)),
        "torchbricks_fx eager collection": lambda inputs: losses(collection(inputs, Stage.TRAIN)),
        "torchbricks_fx compiled TRAIN stage": lambda inputs: losses(stage(inputs)),
        "BrickLightningModule.training_step": lambda inputs: lightning[False].training_step(inputs, 0),
        "BrickLightningModule(compile=True).training_step": lambda inputs: lightning[True].training_step(inputs, 0),
    }


def measure(workload: Workload, batch_size: int, rounds: int, min_run_time: float,
            log: Callable[[str], None]) -> list[StepResult]:
    inputs = _inputs(workload, batch_size)
    optimizer = torch.optim.SGD(workload.collection.parameters(), lr=0.01)

    def make_step(forward: Callable[[dict], torch.Tensor]) -> Callable[[], None]:
        def step() -> None:
            optimizer.zero_grad(set_to_none=True)
            forward(inputs).backward()
            optimizer.step()
        return step

    steps, setup = {}, {}
    for name, forward in _steps(workload).items():
        log(f"{workload.name}: warming up {name}")
        step = make_step(forward)
        start = time.perf_counter()
        for _ in range(3):
            step()  # compiles the compiled variants (forward and backward) here
        steps[name], setup[name] = step, time.perf_counter() - start
    best: dict[str, tuple[float, int]] = {}
    for index in range(rounds):
        log(f"{workload.name}: timing round {index + 1}/{rounds}")
        for name, step in steps.items():
            m = time_statement("step()", {"step": step}, threads=1, min_run_time=min_run_time)
            if name not in best or m.median < best[name][0]:
                best[name] = (float(m.median), len(m.times))
    return [StepResult(name, median, runs, setup[name]) for name, (median, runs) in best.items()]


def render(rows: dict[str, tuple[str, list[StepResult]]], rounds: int, min_run_time: float) -> str:
    lines = ["## Training step (TRAIN stage)", "", f"Command: `{COMMAND}`  ",
             f"Machine: {cpu_model()}, torch {torch.__version__}, 1 thread; one step = zero_grad, forward, losses, "
             f"backward, SGD step; best of {rounds} interleaved per-round medians of `Timer.blocked_autorange` "
             f"(min_run_time {min_run_time} s; n = measurements behind the median). Setup = the first three steps "
             f"(compilation of forward and backward for the compiled variants).", ""]
    for name, (description, results) in rows.items():
        hand = next(r for r in results if r.implementation == HAND)
        lines += [f"### {name}: {description}", "",
                  "| implementation | ms per step | n | vs hand-written | setup (s) |", "|---|---:|---:|---:|---:|"]
        lines += [f"| {r.implementation} | {r.median_s * 1e3:.2f} | {r.runs} | {r.median_s / hand.median_s:.2f}x "
                  f"| {r.setup_seconds:.1f} |" for r in results]
        lines.append("")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--min-run-time", type=float, default=0.5)
    parser.add_argument("--markdown", type=Path, help="write the Markdown fragment here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message=".*self.log.*")  # training_step outside a Trainer logs nowhere

    def log(line: str) -> None:
        print(f"[training] {line}", file=sys.stderr, flush=True)

    rows = {}
    for make in (multitask, resnet18):
        torch.manual_seed(0)
        workload = make()
        description = f"{workload.description}, batch {args.batch_size}"
        rows[workload.name] = (description, measure(workload, args.batch_size, args.rounds, args.min_run_time, log))
    text = render(rows, args.rounds, args.min_run_time)
    print(text)
    if args.markdown:
        write_text(args.markdown, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
