"""``torchbricks-fx deploy``: the fastest artifact of a stage that the collection's own metrics accept, written
as a bundle folder (``torchbricks_fx.deploy``)."""

from __future__ import annotations

import argparse
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torchbricks_fx.backends import DEPLOY_CANDIDATES, parse_device
from torchbricks_fx.cli.common import (
    DEFAULT_FUNCTION,
    STAGES,
    TARGET_HELP,
    CliError,
    call_user_function,
    check_device_name,
    check_timing,
    ints,
    load_build,
    load_function,
    names,
    output_to_log,
    progress_printer,
    split_target,
    stage,
    terminal_stderr,
)
from torchbricks_fx.errors import BrickDeployError

VALIDATION_FUNCTION = "validation"
BATCHES = "an iterable of validation batches (dicts of named inputs including the targets)"


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    parser = sub.add_parser("deploy", parents=[common],
                            help="write the fastest artifact the collection's own metrics accept as a bundle folder")
    parser.add_argument("file", metavar="FILE", help=TARGET_HELP + " (the trained collection)")
    parser.add_argument("--validation", metavar="FILE[:FUNCTION]",
                        help=f"Python file whose function (default: {VALIDATION_FUNCTION}) returns {BATCHES}; "
                             "needed unless --max-metric-drop none")
    parser.add_argument("-o", "--output", required=True, help="the bundle folder to write")
    parser.add_argument("--stage", default="export", help=f"stage to deploy ({STAGES}); default: export")
    parser.add_argument("--outputs", help="comma-separated outputs (default: every value the stage produces)")
    parser.add_argument("--max-metric-drop", default="0.01",
                        help="largest accepted drop of every metric (absolute, default 0.01), NAME=VALUE,... per "
                             "metric, or 'none' to decide by export tolerance alone (float32 candidates only)")
    parser.add_argument("--metric-stage", help="stage whose metric bricks judge (default: validation, else test)")
    parser.add_argument("--candidates", help=f"comma-separated: {', '.join(DEPLOY_CANDIDATES)} (default: all)")
    parser.add_argument("--batch-sizes", help="comma-separated batch sizes to time (default: the example's)")
    parser.add_argument("--threads", type=int, default=1, help="torch and onnxruntime intra-op threads (default: 1)")
    parser.add_argument("--min-run-time", type=float, default=1.0, help="seconds of timing per measurement")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing bundle folder")
    parser.set_defaults(run=run)


def metric_budget(text: str) -> float | dict[str, float] | None:
    """``"none"``, ``"0.01"`` or ``"accuracy=0.01,f1=0.02"``."""
    def number(value: str) -> float:
        try:
            parsed = float(value)
        except ValueError:
            parsed = math.nan
        if not 0 <= parsed < math.inf:
            raise CliError(f"--max-metric-drop needs non-negative numbers, NAME=VALUE pairs or 'none', not {text!r}.")
        return parsed

    if text.strip().lower() == "none":
        return None
    if "=" not in text:
        return number(text)
    budgets = {}
    for item in text.split(","):
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise CliError(f"--max-metric-drop: {item!r} is not NAME=VALUE (in {text!r}).")
        budgets[name.strip()] = number(value)
    return budgets


def _candidates(text: str | None) -> list[str] | None:
    """``--candidates``, checked without torch (``deploy`` checks them again, after the build)."""
    chosen = names(text)
    unknown = [name for name in chosen or () if name not in DEPLOY_CANDIDATES]
    if unknown:
        raise CliError(f"Unknown candidate(s) {unknown}; valid candidates: {', '.join(DEPLOY_CANDIDATES)}.")
    return chosen


def _validation_function(spec: str) -> tuple[Path, str, Any]:
    """The function named by ``--validation``, found before the build (called after it)."""
    _, function = split_target(spec)
    if function == DEFAULT_FUNCTION and not spec.endswith(f":{DEFAULT_FUNCTION}"):
        spec = f"{spec}:{VALIDATION_FUNCTION}"
    return load_function(spec, BATCHES)


def _batches(path: Path, function: str, fn: Any) -> Any:
    batches = call_user_function(path, function, fn)
    if isinstance(batches, Mapping) or not hasattr(batches, "__iter__"):
        raise CliError(f"{function}() in {str(path)!r} must return {BATCHES}; it returned a "
                       f"{type(batches).__name__}.")
    return batches


def _arguments(args: argparse.Namespace) -> dict[str, Any]:
    """``deploy``'s keyword arguments from the command line, every one checked before the build (which may
    train a model for minutes) and without importing torch, except the device's availability."""
    from torchbricks_fx.files import check_destination

    budget = metric_budget(args.max_metric_drop)
    if budget is not None and not args.validation:
        raise CliError("--validation FILE:FUNCTION is needed to judge candidates by the collection's metrics; or pass "
                       "--max-metric-drop none to decide by export tolerance alone (float32 candidates only).")
    chosen = {"stage": stage(args.stage), "outputs": names(args.outputs), "max_metric_drop": budget,
              "metric_stage": stage(args.metric_stage) if args.metric_stage else None,
              "candidates": _candidates(args.candidates), "batch_sizes": ints(args.batch_sizes, "--batch-sizes"),
              "threads": args.threads, "min_run_time": args.min_run_time, "overwrite": args.overwrite}
    check_timing(args.threads, args.min_run_time)
    check_device_name(args.device)
    check_destination(Path(args.output), args.overwrite, BrickDeployError, is_folder=True)
    return {**chosen, "device": parse_device(args.device)}  # imports torch: after the checks that need none


def run(args: argparse.Namespace) -> int:
    arguments = _arguments(args)
    validation = _validation_function(args.validation) if args.validation else None
    collection, named_inputs = load_build(args.file)
    from torchbricks_fx.deployment import deploy
    from torchbricks_fx.deployment.acceptance import metric_stage_of

    # What the collection alone can refuse, before the validation batches are read (possibly slow).
    collection.plan(arguments["stage"], arguments["outputs"])
    if arguments["max_metric_drop"] is not None:
        metric_stage_of(collection, arguments["metric_stage"])
    batches = _batches(*validation) if validation else None
    with terminal_stderr() as terminal:
        progress = progress_printer("deploy", terminal)
        with output_to_log("deploy"):  # exporters and quantizers print; the terminal gets progress lines only
            report = deploy(collection, args.output, named_inputs, validation=batches, progress=progress,
                            **arguments)
    print(report.to_markdown(), end="")
    return 0
