"""Journey 3: benchmark the INFERENCE stage of the multi-task model on several backends and batch sizes;
print the table and save it as Markdown, JSON and a PNG plot.

    python examples/benchmark_latency.py --out bench/ [--backends eager fx compile onnxruntime]

Numbers depend on the machine: ``--threads`` fixes torch's (and onnxruntime's) thread count for the run.
Use ``--device cuda`` on a GPU machine (adds the ``cudagraphs`` backend when you list it).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from _models import example_batch, multitask_bricks

from torchbricks_fx import Stage, benchmark, profile_bricks
from torchbricks_fx.reporting import plot, profile_to_markdown, to_json, to_markdown

OUTPUTS = ["classify/class_prediction", "segment/class_prediction"]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="folder for benchmark.md/.json/.png (default: temporary)")
    parser.add_argument("--backends", nargs="+", default=["eager", "fx", "compile", "onnxruntime"])
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 4])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--min-run-time", type=float, default=0.2, help="seconds of timing per measurement")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG (needs matplotlib)")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="torchbricks_fx_bench_"))
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    collection = multitask_bricks()
    named_inputs = {"raw": example_batch(batch_size=max(args.batch_sizes))["raw"]}

    results = benchmark(collection, named_inputs, stage=Stage.INFERENCE, outputs=OUTPUTS,
                        backends=tuple(args.backends), device=args.device, batch_sizes=args.batch_sizes,
                        threads=args.threads, min_run_time=args.min_run_time, progress=print)
    table = to_markdown(results)
    print(table)
    (out / "benchmark.md").write_text(table, encoding="utf-8")
    (out / "benchmark.json").write_text(to_json(results), encoding="utf-8")
    if not args.no_plot:
        print("plot:", plot(results, out / "benchmark.png"))

    # Where the time goes inside the eager stage, brick by brick.
    profile = profile_bricks(collection, named_inputs, stage=Stage.INFERENCE, outputs=OUTPUTS, device=args.device,
                             threads=args.threads, min_run_time=args.min_run_time)
    print(profile_to_markdown(profile))
    print(f"results in {out}")


if __name__ == "__main__":
    main()
