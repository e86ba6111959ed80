"""Latency per backend on a CUDA device, against the hand-written module on the same device.

Needs a GPU, so `run_all.py` does not run it; its fragment (`results/gpu_latency.md`) is stitched into
RESULTS.md as last produced.

    python benchmarks/gpu_latency.py --markdown benchmarks/results/gpu_latency.md
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.utils.benchmark import Timer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.workloads import Workload, build_workloads
from torchbricks_fx.benchmarking import benchmark, resize_batch
from torchbricks_fx.reporting import to_markdown

COMMAND = "python benchmarks/gpu_latency.py --markdown benchmarks/results/gpu_latency.md"
BACKENDS = ("eager", "fx", "compile", "cudagraphs", "onnxruntime")


def hand_written_us(workload: Workload, batch_size: int, min_run_time: float) -> float:
    module = workload.hand_written.cuda().eval()
    inputs = resize_batch({k: v.cuda() for k, v in workload.named_inputs.items()}, batch_size)
    positional = [inputs[name] for name in workload.input_names]

    def run() -> object:
        with torch.no_grad():
            return module(*positional)

    measurement = Timer(stmt="run()", globals={"run": run}, num_threads=torch.get_num_threads()).blocked_autorange(
        min_run_time=min_run_time)
    workload.hand_written.cpu()
    return measurement.median * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--markdown", type=Path)
    parser.add_argument("--batch-sizes", default="1,32")
    parser.add_argument("--min-run-time", type=float, default=0.3)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_latency.py needs a CUDA device")
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    lines = ["## Latency on CUDA", "", f"Command: `{COMMAND}`  ",
             f"Device: {torch.cuda.get_device_name()}, torch {torch.__version__}; inference stage; medians of "
             "`Timer.blocked_autorange` (CUDA-synchronized).", ""]
    for workload in build_workloads():
        print(f"{workload.name} ...", file=sys.stderr)
        lines += [f"### {workload.name}: {workload.description}", ""]
        hand = {b: hand_written_us(workload, b, args.min_run_time) for b in batch_sizes}
        lines.append("Hand-written module on the same device: "
                     + ", ".join(f"batch {b}: {us:,.1f} us" for b, us in hand.items()) + ".")
        lines.append("")
        results = benchmark(workload.collection, workload.named_inputs, outputs=list(workload.outputs),
                            backends=BACKENDS, device="cuda", batch_sizes=batch_sizes,
                            min_run_time=args.min_run_time)
        lines += [to_markdown(results), ""]
    report = "\n".join(lines)
    print(report)
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(report)


if __name__ == "__main__":
    main()
