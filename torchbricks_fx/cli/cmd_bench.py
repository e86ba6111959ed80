"""``torchbricks-fx bench``: latency per backend and batch size (torch.utils.benchmark)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from torchbricks_fx.backends import BACKENDS, CUDA_ONLY_BACKENDS, DEFAULT_BACKENDS
from torchbricks_fx.cli.common import (
    STAGES,
    TARGET_HELP,
    CliError,
    check_backend_names,
    check_device_name,
    check_timing,
    ints,
    load_build,
    names,
    progress_printer,
    stage,
)


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    parser = sub.add_parser("bench", parents=[common],
                            help="latency per backend and batch size (torch.utils.benchmark)")
    parser.add_argument("file", metavar="FILE", help=TARGET_HELP)
    parser.add_argument("--stage", default="inference", help=f"stage to time ({STAGES}); default: inference")
    parser.add_argument("--backends", default=",".join(DEFAULT_BACKENDS),
                        help=f"comma-separated: {', '.join(BACKENDS)} ({', '.join(CUDA_ONLY_BACKENDS)} CUDA only); "
                             f"default: {','.join(DEFAULT_BACKENDS)}")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    parser.add_argument("--batch-sizes", help="comma-separated batch sizes (default: the example's)")
    parser.add_argument("--outputs", help="comma-separated outputs (default: every value the stage produces)")
    parser.add_argument("--threads", type=int, help="torch and onnxruntime intra-op threads (default: torch's; use 1 "
                                                    "on a shared machine)")
    parser.add_argument("--min-run-time", type=float, default=1.0, help="seconds of timing per measurement")
    parser.add_argument("--profile", action="store_true", help="also time each brick of the stage")
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON")
    parser.add_argument("--plot", metavar="PATH", help="write an image (.png, .svg, .pdf, .jpg) of latency per backend "
                                                      "and batch size")
    parser.add_argument("--overwrite", action="store_true", help="replace existing --json/--plot files")
    parser.set_defaults(run=run)


def _check_destinations(args: argparse.Namespace) -> None:
    """--json and --plot destinations are checked before minutes of benchmarking, not after."""
    from torchbricks_fx.errors import BrickError
    from torchbricks_fx.files import check_destination
    from torchbricks_fx.reporting import check_plot_path

    destinations = [Path(p) for p in (args.json, args.plot) if p]
    existing = [str(p) for p in destinations if p.is_file()]
    if existing and not args.overwrite:  # as export: an existing output file is exit code 1
        raise CliError(f"{', '.join(existing)} already exists; pass --overwrite to replace it.", code=1)
    try:
        if args.plot:
            check_plot_path(args.plot)
        for path in destinations:
            check_destination(path, overwrite=True)
    except BrickError as error:
        raise CliError(str(error)) from None


def run(args: argparse.Namespace) -> int:
    # Every argument is checked before torch is imported (argument errors answer at once), then the device.
    chosen = stage(args.stage)
    outputs = names(args.outputs)
    batch_sizes = ints(args.batch_sizes, "--batch-sizes")
    check_timing(args.threads, args.min_run_time)
    check_backend_names(args.backends)
    check_device_name(args.device)
    _check_destinations(args)
    # torch.utils.benchmark imports cpp_extension, which logs a warning on machines without CUDA.
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    from torchbricks_fx import benchmarking, reporting
    from torchbricks_fx.backends import parse_backends, parse_device
    from torchbricks_fx.files import write_text

    progress = progress_printer("bench")
    device = parse_device(args.device)  # validated before the (possibly slow) build
    backends = parse_backends(args.backends, device)
    collection, named_inputs = load_build(args.file)
    results = benchmarking.benchmark(collection, named_inputs, stage=chosen, outputs=outputs, backends=backends,
                                     device=device, batch_sizes=batch_sizes, threads=args.threads,
                                     min_run_time=args.min_run_time, progress=progress)
    print(reporting.to_markdown(results), end="")
    # Written before profiling: a profiling failure must not lose the benchmark's results.
    if args.json:
        write_text(args.json, reporting.to_json(results))
        progress(f"wrote {args.json}")
    if args.plot:
        reporting.plot(results, args.plot)
        progress(f"wrote {args.plot}")
    if args.profile:
        progress("profiling bricks")
        profiles = benchmarking.profile_bricks(collection, named_inputs, stage=chosen, outputs=outputs,
                                               device=device, threads=args.threads,
                                               min_run_time=min(args.min_run_time, 0.5))
        print()
        print(reporting.profile_to_markdown(profiles), end="")
    return 0
