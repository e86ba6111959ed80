"""``torchbricks-fx export``: a stage to a verified ONNX file."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from torchbricks_fx.cli.common import STAGES, TARGET_HELP, load_build, names, output_to_log, stage
from torchbricks_fx.errors import BrickExportError


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    parser = sub.add_parser("export", parents=[common],
                            help="export a stage to ONNX, verified against eager with onnxruntime")
    parser.add_argument("file", metavar="FILE", help=TARGET_HELP)
    parser.add_argument("--stage", default="export", help=f"stage to export ({STAGES}); default: export")
    parser.add_argument("-o", "--output", required=True, help="the .onnx file to write")
    parser.add_argument("--outputs", help="comma-separated outputs (default: every value the stage produces)")
    parser.add_argument("--no-dynamic-batch", action="store_true", help="fix the batch size to the example's")
    parser.add_argument("--opset", type=int, help="ONNX opset (default: the exporter's); refused when the "
                                                  "exporter cannot write it")
    parser.add_argument("--legacy", action="store_true", help="use the legacy TorchScript exporter (dynamo=False)")
    parser.add_argument("--accept-tracer-warnings", action="store_true",
                        help="with --legacy: write the file although the tracer warned that it may be wrong for "
                             "other inputs (verification still runs)")
    parser.add_argument("--no-verify", action="store_true", help="skip the onnxruntime verification")
    parser.add_argument("--save-optimized", action="store_true",
                        help="also write onnxruntime's optimized model beside the file (NAME.optimized.onnx)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing file")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from torchbricks_fx.files import check_destination

    chosen = stage(args.stage)
    outputs = names(args.outputs)
    output = Path(args.output)
    check_destination(output, args.overwrite, BrickExportError)  # before the (possibly slow) build
    from torchbricks_fx.export import export_onnx  # imports torch: after the argument checks

    collection, named_inputs = load_build(args.file)
    collection.plan(chosen, outputs)  # graph problems are reported before any export work
    print(f"exporting stage {chosen.value} of {args.file} to {output} ...", file=sys.stderr)
    with output_to_log("export"):
        report = export_onnx(collection, output, named_inputs, stage=chosen, outputs=outputs,
                             dynamic_batch=not args.no_dynamic_batch, opset=args.opset, verify=not args.no_verify,
                             overwrite=args.overwrite, dynamo=not args.legacy,
                             accept_tracer_warnings=args.accept_tracer_warnings,
                             save_optimized=args.save_optimized)
    print(report.to_markdown())
    return 0
