"""``torchbricks-fx lock`` and ``torchbricks-fx check``: write a collection's stage lockfile, and compare a
collection with it (in CI: exit 0 when equal, 1 with a per-stage diff, 2 for unusable input)."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torchbricks_fx.cli.common import PROG, TARGET_HELP, CliError, load_build, output_to_log, progress_printer

if TYPE_CHECKING:
    from torchbricks_fx.lockfile_format import Lock

NAMES = ("lock", "check")  # the subcommands this module registers
SCHEMA_PREFIX = "torchbricks_fx.lock/"  # lockfile_format.SCHEMA_PREFIX, which imports torch


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    lock = sub.add_parser("lock", parents=[common],
                          help="write the stage lockfile: per stage, bricks, inputs, outputs, shapes and dtypes")
    lock.add_argument("file", metavar="FILE", help=TARGET_HELP)
    lock.add_argument("-o", "--output", required=True, metavar="LOCKFILE",
                      help="the lock file to write, e.g. bricks.lock.json; a lock file there is replaced (and the "
                           "changes printed), any other file only with --overwrite")
    lock.add_argument("--onnx-ops", action="store_true",
                      help="also record the ONNX operator histogram of the export stage (exports it once; "
                           "check then compares it too)")
    lock.add_argument("--overwrite", action="store_true", help="replace an existing file that is not a lock file")
    lock.set_defaults(run=run_lock)

    check = sub.add_parser("check", parents=[common],
                           help="compare a collection with its lockfile: exit 0 when equal, 1 with a per-stage diff")
    check.add_argument("file", metavar="FILE", help=TARGET_HELP)
    check.add_argument("--lock", required=True, metavar="LOCKFILE", help="the lock file written by `lock`")
    check.set_defaults(run=run_check)


def _build_lock(target: str, onnx_ops: bool) -> Lock:
    from torchbricks_fx.lockfile import lock

    collection, named_inputs = load_build(target)
    # The exporter prints progress and, on failure, graph dumps: kept in a log named by the error.
    with output_to_log("lock") if onnx_ops else contextlib.nullcontext():
        return lock(collection, named_inputs, onnx_ops=onnx_ops)


def _replaces_lock(path: Path, overwrite: bool) -> bool:
    """Whether ``path`` holds a lock file to replace (and print the changes from); refuses, before any work
    and without importing torch, to replace a file that is not a lock file (a mistyped ``-o model.py``)
    unless ``--overwrite``."""
    if path.is_dir():
        raise CliError(f"Cannot write {path}: it is a folder; give a file path, e.g. {path / 'bricks.lock.json'}.")
    if not path.exists():
        return False
    if _is_lock_file(path):
        return True
    if overwrite:
        return False
    raise CliError(f"{path} exists and is not a lock file; pass --overwrite to replace it.", code=1)


def _is_lock_file(path: Path) -> bool:
    """A JSON object with a lock ``"schema"``, of any version: the JSON alone, read without torch."""
    with contextlib.suppress(OSError, UnicodeDecodeError, ValueError):
        data = json.loads(path.read_text(encoding="utf-8"))
        return isinstance(data, dict) and str(data.get("schema")).startswith(SCHEMA_PREFIX)
    return False


def _previous_lock(path: Path, progress: Callable[[str], None]) -> Lock | None:
    from torchbricks_fx.errors import BrickLockError
    from torchbricks_fx.lockfile_format import read_lock

    try:
        return read_lock(path)
    except BrickLockError:  # another schema version, or damaged: regenerating it is the fix
        progress(f"replacing {path} without listing the changes (another lock schema version, or damaged)")
        return None


def run_lock(args: argparse.Namespace) -> int:
    progress = progress_printer("lock")
    output = Path(args.output)
    replacing = _replaces_lock(output, args.overwrite)
    from torchbricks_fx.lockfile_diff import diff_locks, render_lock_diff  # imports torch: after the checks
    from torchbricks_fx.lockfile_format import write_lock

    previous = _previous_lock(output, progress) if replacing else None
    new = _build_lock(args.file, args.onnx_ops)
    write_lock(new, output)
    progress(f"wrote {output}: {len(new.stages)} stages, {len(new.bricks)} bricks")
    for stage, stage_lock in new.stages.items():
        for problem in stage_lock.problems:
            progress(f"warning: stage {stage} is invalid: {problem}")
        if stage_lock.values_not_recorded:
            progress(f"warning: stage {stage} did not run on the example inputs: {stage_lock.values_not_recorded}")
    if new.onnx is not None and new.onnx.not_exported:
        progress(f"warning: no ONNX operator histogram: {new.onnx.not_exported}")
    if previous is not None:
        changes = diff_locks(previous, new)
        print(f"changes from the previous {output}:\n{render_lock_diff(changes)}" if changes
              else f"{output} is unchanged.")
    return 0


def run_check(args: argparse.Namespace) -> int:
    if Path(args.lock).is_dir():  # answered without importing torch, as argument errors are
        raise CliError(f"{args.lock!r} is a folder, not a lock file; give the path of the file written by "
                       f"{PROG} lock {args.file} -o LOCKFILE.")
    if not Path(args.lock).exists():
        raise CliError(f"No lock file {args.lock!r}; write one with {PROG} lock {args.file} -o {args.lock}.")
    from torchbricks_fx.lockfile_diff import diff_locks, render_lock_diff
    from torchbricks_fx.lockfile_format import read_lock

    expected = read_lock(args.lock)  # a missing or bad lock file is reported before the (slower) build
    actual = _build_lock(args.file, onnx_ops=expected.onnx is not None)
    changes = diff_locks(expected, actual)
    if not changes:
        print(f"{args.file} matches {args.lock} ({len(actual.stages)} stages, {len(actual.bricks)} bricks).")
        return 0
    print(render_lock_diff(changes))
    onnx = " --onnx-ops" if expected.onnx is not None else ""
    print(f"{PROG} check: {args.file} differs from {args.lock}. If these changes are intended, regenerate the lock "
          f"and commit it: {PROG} lock {args.file} -o {args.lock}{onnx}", file=sys.stderr)
    return 1
