"""``torchbricks-fx`` (also ``python -m torchbricks_fx``): inspect, export, benchmark, deploy and lock a
collection.

Every command works on a Python file that defines a function (``build`` by default) returning
``(collection, example_named_inputs)``: ``torchbricks-fx inspect model.py`` or ``model.py:make_model``.
Each command lives in its own module (``cmd_*.py``) and is thin over the public API; this module parses
the command line and turns errors into exit codes without importing torch, so ``--help`` and argument
errors answer at once.

Exit codes: 0 success; 1 the work failed or found problems (``inspect`` reporting validation problems, any
``BrickExportError``: a failed export, or an existing output file without ``--overwrite``; ``deploy``
accepting no candidate, or an existing bundle folder); 2 unusable input (missing file, no build function,
invalid collection, unknown stage/backend/device/candidate, validation batches without the targets,
missing or bad lock file).  ``check`` exits 1 when the collection differs from its lock file.  Errors are one
paragraph on stderr, without a traceback unless ``--traceback`` is given.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from torchbricks_fx.cli import cmd_bench, cmd_deploy, cmd_export, cmd_inspect, cmd_lock
from torchbricks_fx.cli.common import PROG, CliError, load_build, paragraph
from torchbricks_fx.errors import BrickDeployError, BrickDeployInputError, BrickError, BrickExportError

__all__ = ["CliError", "load_build", "main"]

COMMANDS = (cmd_inspect, cmd_export, cmd_bench, cmd_deploy, cmd_lock)


def _command_names() -> list[str]:
    """Each module registers the command it is named after (``cmd_export``), or those in its ``NAMES``."""
    return [name for c in COMMANDS for name in getattr(c, "NAMES", (c.__name__.rsplit("_", 1)[1],))]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Inspect, export, benchmark, deploy and lock a torchbricks_fx collection defined in a "
                               "Python file whose build() returns (collection, example_named_inputs).",
        epilog="examples:\n"
               "  torchbricks-fx inspect model.py --mermaid\n"
               "  torchbricks-fx export model.py --stage export -o model.onnx\n"
               "  torchbricks-fx bench model.py --backends eager,fx,compile,onnxruntime --batch-sizes 1,8,32\n"
               "  torchbricks-fx deploy model.py --validation data.py:validation --max-metric-drop 0.01 -o bundle\n"
               "  torchbricks-fx lock model.py -o bricks.lock.json\n"
               "  torchbricks-fx check model.py --lock bricks.lock.json\n"
               "exit codes: 0 ok; 1 the work failed (export, deploy: also an existing -o without --overwrite; "
               "deploy: no candidate accepted), inspect found problems or check found differences; 2 unusable "
               "input",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--traceback", action="store_true", help="show the full traceback of errors")
    sub = parser.add_subparsers(dest="command", required=True,
                                metavar="{" + ",".join(_command_names()) + "}")
    for command in COMMANDS:
        command.register(sub, common)
    return parser


def _exit_code(error: BrickError) -> int:
    if isinstance(error, CliError):
        return error.code
    if isinstance(error, BrickDeployInputError):
        return 2
    return 1 if isinstance(error, (BrickExportError, BrickDeployError)) else 2


def _quiet_torch_import_noise() -> None:
    """torch's C++-extension module (imported by ``torch.utils.benchmark``) logs a warning on every machine
    with a CUDA wheel but no CUDA runtime; it is about building extensions, which no command does."""
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line; returns the exit code (0 ok, 1 failed or problems found, 2 bad input)."""
    args = _parser().parse_args(argv)
    _quiet_torch_import_noise()
    try:
        return int(args.run(args))
    except BrickError as error:
        if args.traceback:
            raise
        print(f"{PROG} {args.command}: error: {paragraph(error)}", file=sys.stderr)
        return _exit_code(error)
    except KeyboardInterrupt:
        print(f"{PROG} {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:
        # An error inside the user's bricks or a library: still one paragraph, the traceback on request.
        if args.traceback:
            raise
        print(f"{PROG} {args.command}: error: {type(error).__name__}: {paragraph(error)}\n"
              f"(run with --traceback for the full traceback)", file=sys.stderr)
        return 1
