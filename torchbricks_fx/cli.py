"""``torchbricks-fx`` (also ``python -m torchbricks_fx``): inspect, export and benchmark a collection.

Every command works on a Python file that defines a function (``build`` by default) returning
``(collection, example_named_inputs)``: ``torchbricks-fx inspect model.py`` or ``model.py:make_model``.
The commands are thin over the public API.  Exit codes: 0 success, 1 the work failed or found problems
(``inspect`` reporting validation problems, any ``BrickExportError``: a failed export, or an existing
output file without ``--overwrite``, which export_onnx refuses before any export work), 2 unusable input
(missing file, no build function, invalid collection, unknown stage/backend/device); errors are one
paragraph on stderr, without a traceback unless ``--traceback`` is given.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import inspect
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from torchbricks_fx.backends import BACKENDS, CUDA_ONLY_BACKENDS, DEFAULT_BACKENDS
from torchbricks_fx.errors import BrickError, BrickExportError, BrickGraphError
from torchbricks_fx.stage import Stage, parse_stage

__all__ = ["CliError", "load_build", "main"]

PROG = "torchbricks-fx"
DEFAULT_FUNCTION = "build"


class CliError(Exception):
    """A user error the CLI reports in one paragraph with exit code ``code``."""

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.code = code


# --------------------------------------------------------------------------------------------- loading
def _split_target(target: str) -> tuple[Path, str]:
    """``FILE.py[:FUNCTION]`` to ``(path, function)``; a Windows drive letter is not a function."""
    head, sep, tail = target.rpartition(":")
    if sep and tail.isidentifier() and len(head) > 1:
        return Path(head), tail
    return Path(target), DEFAULT_FUNCTION


@contextlib.contextmanager
def _on_sys_path(folder: Path) -> Iterator[None]:
    # The user's file may import its neighbours, as it would when run as a script.
    entry = str(folder)
    sys.path.insert(0, entry)
    try:
        yield
    finally:
        with contextlib.suppress(ValueError):
            sys.path.remove(entry)


def _import_file(path: Path) -> Any:
    name = f"_torchbricks_fx_user_{abs(hash(str(path.resolve())))}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise CliError(f"Cannot import {str(path)!r} as a Python module (is it a .py file?).")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling look their module up here
    try:
        spec.loader.exec_module(module)
    except Exception as error:
        sys.modules.pop(name, None)
        raise CliError(f"Importing {str(path)!r} failed with {type(error).__name__}: {_one_line(error)}") from error
    return module


def load_build(target: str) -> tuple[Any, dict[str, Any]]:
    """Imports ``FILE.py[:FUNCTION]`` and returns what the function returns, checked:
    ``(BrickCollection, {input name: value})``.  The file's folder is importable while it loads and builds."""
    path, function = _split_target(target)
    if not path.is_file():
        raise CliError(f"No such file: {str(path)!r}. Give a Python file that defines build() returning "
                       f"(collection, example_named_inputs), optionally as FILE.py:FUNCTION.")
    with _on_sys_path(path.resolve().parent):
        return _load_build(path, function)


def _load_build(path: Path, function: str) -> tuple[Any, dict[str, Any]]:
    from torchbricks_fx.collection import BrickCollection

    module = _import_file(path)
    build = getattr(module, function, None)
    if not callable(build):
        found = sorted(n for n, v in vars(module).items() if inspect.isfunction(v) and not n.startswith("_")
                       and v.__module__ == module.__name__)
        raise CliError(f"{str(path)!r} defines no function {function!r} (functions defined there: "
                       f"{', '.join(found) or 'none'}). Define {function}() returning (collection, "
                       f"example_named_inputs), or name another function as {path}:FUNCTION.")
    try:
        built = build()
    except BrickError:
        raise
    except Exception as error:
        raise CliError(f"{function}() in {str(path)!r} raised {type(error).__name__}: {_one_line(error)}") from error
    if not (isinstance(built, tuple) and len(built) == 2 and isinstance(built[0], BrickCollection)
            and isinstance(built[1], dict) and all(isinstance(k, str) for k in built[1])):
        raise CliError(f"{function}() in {str(path)!r} must return (collection, example_named_inputs): a "
                       f"BrickCollection and a dict {{input name: tensor}}; it returned {_describe(built)}.")
    return built[0], built[1]


def _describe(value: Any) -> str:
    if isinstance(value, tuple):
        return f"a tuple of {len(value)} ({', '.join(type(v).__name__ for v in value)})"
    return f"a value of type {type(value).__name__}"


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or "(no message)"


def _names(text: str | None) -> list[str] | None:
    if text is None:
        return None
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise CliError(f"Expected a comma-separated list of names, got {text!r}.")
    return names


def _ints(text: str | None, what: str) -> list[int] | None:
    if text is None:
        return None
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise CliError(f"{what} must be comma-separated positive integers, not {text!r}.") from None
    if not values or min(values) < 1:
        raise CliError(f"{what} must be comma-separated positive integers, not {text!r}.")
    return values


def _stage(text: str) -> Stage:
    return parse_stage(text)  # BrickGraphError lists the valid stages


# --------------------------------------------------------------------------------------------- inspect
def _inspect_stage(collection: Any, stage: Stage, outputs: list[str] | None, mermaid: bool) -> list[str]:
    """Prints one stage's plan (or its problems); returns the problems."""
    print(f"stage {stage.value}")
    try:
        plan = collection.plan(stage, outputs)
    except BrickGraphError as error:
        print("  problems:")
        for problem in error.problems:
            print(f"    - {problem}")
        return list(error.problems)
    print(f"  bricks:   {' -> '.join(plan.bricks) or '(none)'}")
    print(f"  inputs:   {', '.join(plan.required_inputs) or '(none)'}")
    print(f"  outputs:  {', '.join(plan.outputs) or '(none)'}")
    if plan.pruned:
        print("  pruned:")
        for name, reason in plan.pruned.items():
            print(f"    - {name}: {reason}")
    else:
        print("  pruned:   (none)")
    if mermaid:
        print("```mermaid")
        print(collection.to_mermaid(stage, outputs), end="")
        print("```")
    return []


def _cmd_inspect(args: argparse.Namespace) -> int:
    stages = [_stage(args.stage)] if args.stage else list(Stage)
    outputs = _names(args.outputs)
    collection, named_inputs = load_build(args.file)
    n_bricks = len(collection.bricks())
    print(f"{args.file}: {n_bricks} brick{'' if n_bricks == 1 else 's'}; example inputs: "
          f"{', '.join(_input_summary(named_inputs)) or '(none)'}")
    problems: list[str] = []
    for stage in stages:
        print()
        problems += _inspect_stage(collection, stage, outputs, args.mermaid)
    if problems:
        print(f"\n{len(dict.fromkeys(problems))} validation problem(s) found.", file=sys.stderr)
        return 1
    return 0


def _input_summary(named_inputs: dict[str, Any]) -> list[str]:
    parts = []
    for name, value in named_inputs.items():
        shape = getattr(value, "shape", None)
        parts.append(f"{name} {list(shape)} {str(getattr(value, 'dtype', '')).replace('torch.', '')}".strip()
                     if shape is not None else f"{name} ({type(value).__name__})")
    return parts


# --------------------------------------------------------------------------------------------- export
def _cmd_export(args: argparse.Namespace) -> int:
    from torchbricks_fx.export import export_onnx

    stage = _stage(args.stage)
    outputs = _names(args.outputs)
    output = Path(args.output)
    collection, named_inputs = load_build(args.file)
    collection.plan(stage, outputs)  # graph problems are reported before any export work
    print(f"exporting stage {stage.value} of {args.file} to {output} ...", file=sys.stderr)
    report = export_onnx(collection, output, named_inputs, stage=stage, outputs=outputs,
                         dynamic_batch=not args.no_dynamic_batch, opset=args.opset, verify=not args.no_verify,
                         overwrite=args.overwrite)
    print(report.to_markdown())
    return 0


# --------------------------------------------------------------------------------------------- bench
def _cmd_bench(args: argparse.Namespace) -> int:
    # torch.utils.benchmark imports cpp_extension, which logs a warning on machines without CUDA.
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    from torchbricks_fx import benchmarking
    from torchbricks_fx.backends import parse_backends, parse_device

    stage = _stage(args.stage)
    device = parse_device(args.device)  # validated before the (possibly slow) build
    backends = parse_backends(args.backends, device)
    outputs = _names(args.outputs)
    batch_sizes = _ints(args.batch_sizes, "--batch-sizes")
    if args.min_run_time <= 0:
        raise CliError(f"--min-run-time must be positive, not {args.min_run_time}.")
    collection, named_inputs = load_build(args.file)

    def progress(line: str) -> None:
        print(f"[bench] {line}", file=sys.stderr, flush=True)

    results = benchmarking.benchmark(collection, named_inputs, stage=stage, outputs=outputs, backends=backends,
                                     device=device, batch_sizes=batch_sizes, threads=args.threads,
                                     min_run_time=args.min_run_time, progress=progress)
    print(benchmarking.to_markdown(results), end="")
    # Written before profiling: a profiling failure must not lose the benchmark's results.
    if args.json:
        _write_text(Path(args.json), benchmarking.to_json(results))
        progress(f"wrote {args.json}")
    if args.plot:
        benchmarking.plot(results, args.plot)
        progress(f"wrote {args.plot}")
    if args.profile:
        progress("profiling bricks")
        profiles = benchmarking.profile_bricks(collection, named_inputs, stage=stage, outputs=outputs,
                                               device=device, threads=args.threads,
                                               min_run_time=min(args.min_run_time, 0.5))
        print()
        print(benchmarking.profile_to_markdown(profiles), end="")
    return 0


def _write_text(path: Path, text: str) -> None:
    # Written next to the destination and renamed: a reader never sees half a file.
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(text, encoding="utf-8")
    os.replace(partial, path)


# --------------------------------------------------------------------------------------------- parser
def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Inspect, export and benchmark a torchbricks_fx collection defined in a Python file "
                               "whose build() returns (collection, example_named_inputs).",
        epilog="examples:\n"
               "  torchbricks-fx inspect model.py --mermaid\n"
               "  torchbricks-fx export model.py --stage export -o model.onnx\n"
               "  torchbricks-fx bench model.py --backends eager,fx,compile,onnxruntime --batch-sizes 1,8,32\n"
               "exit codes: 0 ok; 1 the work failed (export: also an existing -o file without --overwrite) or "
               "inspect found problems; 2 unusable input",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--traceback", action="store_true", help="show the full traceback of errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{inspect,export,bench}")
    target = "Python file defining build() -> (collection, example_named_inputs); FILE.py:FUNCTION picks another"
    stages = ", ".join(s.value for s in Stage)

    inspect_cmd = sub.add_parser("inspect", parents=[common],
                                 help="per stage: bricks in order, inputs, outputs, pruned bricks, problems")
    inspect_cmd.add_argument("file", metavar="FILE", help=target)
    inspect_cmd.add_argument("--stage", help=f"one stage only ({stages}); default: every stage")
    inspect_cmd.add_argument("--outputs", help="comma-separated outputs to keep (prunes what they do not need)")
    inspect_cmd.add_argument("--mermaid", action="store_true", help="also print each stage's mermaid diagram")
    inspect_cmd.set_defaults(run=_cmd_inspect)

    export = sub.add_parser("export", parents=[common],
                            help="export a stage to ONNX, verified against eager with onnxruntime")
    export.add_argument("file", metavar="FILE", help=target)
    export.add_argument("--stage", default="export", help=f"stage to export ({stages}); default: export")
    export.add_argument("-o", "--output", required=True, help="the .onnx file to write")
    export.add_argument("--outputs", help="comma-separated outputs (default: every value the stage produces)")
    export.add_argument("--no-dynamic-batch", action="store_true", help="fix the batch size to the example's")
    export.add_argument("--opset", type=int, help="ONNX opset (default: the exporter's)")
    export.add_argument("--no-verify", action="store_true", help="skip the onnxruntime verification")
    export.add_argument("--overwrite", action="store_true", help="replace an existing file")
    export.set_defaults(run=_cmd_export)

    bench = sub.add_parser("bench", parents=[common], help="latency per backend and batch size (torch.utils.benchmark)")
    bench.add_argument("file", metavar="FILE", help=target)
    bench.add_argument("--stage", default="inference", help=f"stage to time ({stages}); default: inference")
    bench.add_argument("--backends", default=",".join(DEFAULT_BACKENDS),
                       help=f"comma-separated: {', '.join(BACKENDS)} ({', '.join(CUDA_ONLY_BACKENDS)} CUDA only); "
                            f"default: {','.join(DEFAULT_BACKENDS)}")
    bench.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    bench.add_argument("--batch-sizes", help="comma-separated batch sizes (default: the example's)")
    bench.add_argument("--outputs", help="comma-separated outputs (default: every value the stage produces)")
    bench.add_argument("--threads", type=int, help="torch and onnxruntime intra-op threads (default: torch's)")
    bench.add_argument("--min-run-time", type=float, default=1.0, help="seconds of timing per measurement")
    bench.add_argument("--profile", action="store_true", help="also time each brick of the stage")
    bench.add_argument("--json", metavar="PATH", help="write the results as JSON")
    bench.add_argument("--plot", metavar="PATH", help="write a PNG of latency per backend and batch size")
    bench.set_defaults(run=_cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line; returns the exit code (0 ok, 1 failed or problems found, 2 bad input)."""
    args = _parser().parse_args(argv)
    try:
        return int(args.run(args))
    except (CliError, BrickError) as error:
        if args.traceback:
            raise
        code = error.code if isinstance(error, CliError) else (1 if isinstance(error, BrickExportError) else 2)
        print(f"{PROG} {args.command}: error: {_paragraph(error)}", file=sys.stderr)
        return code
    except KeyboardInterrupt:
        print(f"{PROG} {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:
        # An error inside the user's bricks or a library: still one paragraph, the traceback on request.
        if args.traceback:
            raise
        print(f"{PROG} {args.command}: error: {type(error).__name__}: {_paragraph(error)}\n"
              f"(run with --traceback for the full traceback)", file=sys.stderr)
        return 1


def _paragraph(error: BaseException) -> str:
    """The error's message as one paragraph (no blank lines; list items kept on their own lines)."""
    return "\n".join(line for line in str(error).splitlines() if line.strip())
