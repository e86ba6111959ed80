"""What every command shares: loading the user's build file, parsing lists, errors in one paragraph, and
keeping third-party dumps out of the terminal.  Torch-free at import: ``--help`` must answer at once."""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import math
import os
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from torchbricks_fx.errors import BrickError, add_note
from torchbricks_fx.stage import Stage

if TYPE_CHECKING:

    from torchbricks_fx.collection import BrickCollection

PROG = "torchbricks-fx"
DEFAULT_FUNCTION = "build"
TARGET_HELP = "Python file defining build() -> (collection, example_named_inputs); FILE.py:FUNCTION picks another"
STAGES = ", ".join(s.value for s in Stage)


class CliError(BrickError):
    """A user error the CLI reports in one paragraph with exit code ``code`` (2: unusable input)."""

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.code = code


def progress_printer(tag: str, stream: TextIO | None = None) -> Callable[[str], None]:
    """Prints progress lines ``[tag] ...`` on ``stream`` (default: stderr; stdout holds the command's result)."""

    def progress(line: str) -> None:
        print(f"[{tag}] {line}", file=stream or sys.stderr, flush=True)

    return progress


@contextlib.contextmanager
def terminal_stderr() -> Iterator[TextIO]:
    """stderr as it is now, still reaching the terminal inside :func:`output_to_log` (which sends file
    descriptor 2 to the log): a duplicate of the descriptor when ``sys.stderr`` has one."""
    try:
        descriptor = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # replaced by a stream without a descriptor (tests)
        yield sys.stderr
        return
    sys.stderr.flush()
    stream = os.fdopen(os.dup(descriptor), "w", buffering=1, encoding=sys.stderr.encoding or "utf-8")
    try:
        yield stream
    finally:
        stream.close()


# --------------------------------------------------------------------------------------------- loading
def split_target(target: str) -> tuple[Path, str]:
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


def import_file(path: Path) -> Any:
    """Imports a Python file as a module (its folder importable while it loads)."""
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
        raise CliError(f"Importing {str(path)!r} failed with {type(error).__name__}: {one_line(error)}") from error
    return module


def load_function(target: str, what: str) -> tuple[Path, str, Any]:
    """The function named by ``FILE.py[:FUNCTION]``, its file's folder importable while it is called."""
    path, function = split_target(target)
    if not path.is_file():
        raise CliError(f"No such file: {str(path)!r}. Give a Python file that defines {function}() returning "
                       f"{what}, optionally as FILE.py:FUNCTION.")
    with _on_sys_path(path.resolve().parent):
        module = import_file(path)
    found = getattr(module, function, None)
    if not callable(found):
        defined = sorted(n for n, v in vars(module).items() if inspect.isfunction(v) and not n.startswith("_")
                         and v.__module__ == module.__name__)
        raise CliError(f"{str(path)!r} defines no function {function!r} (functions defined there: "
                       f"{', '.join(defined) or 'none'}). Define {function}() returning {what}, or name another "
                       f"function as {path}:FUNCTION.")
    return path, function, found


def call_user_function(path: Path, function: str, fn: Any) -> Any:
    """Calls a user's function with its file's folder importable; its failures are user errors."""
    with _on_sys_path(path.resolve().parent):
        try:
            return fn()
        except BrickError:
            raise
        except Exception as error:
            raise CliError(f"{function}() in {str(path)!r} raised {type(error).__name__}: "
                           f"{one_line(error)}") from error


def load_build(target: str) -> tuple[BrickCollection, dict[str, Any]]:
    """Imports ``FILE.py[:FUNCTION]`` and returns what the function returns, checked:
    ``(BrickCollection, {input name: value})``."""
    from torchbricks_fx.collection import BrickCollection

    path, function, build = load_function(target, "(collection, example_named_inputs)")
    built = call_user_function(path, function, build)
    if not (isinstance(built, tuple) and len(built) == 2 and isinstance(built[0], BrickCollection)
            and isinstance(built[1], dict) and all(isinstance(k, str) for k in built[1])):
        raise CliError(f"{function}() in {str(path)!r} must return (collection, example_named_inputs): a "
                       f"BrickCollection and a dict {{input name: tensor}}; it returned {_describe(built)}.")
    return built[0], built[1]


def _describe(value: Any) -> str:
    if isinstance(value, tuple):
        return f"a tuple of {len(value)} ({', '.join(type(v).__name__ for v in value)})"
    return f"a value of type {type(value).__name__}"


# --------------------------------------------------------------------------------------------- arguments
def names(text: str | None) -> list[str] | None:
    if text is None:
        return None
    parsed = [n.strip() for n in text.split(",") if n.strip()]
    if not parsed:
        raise CliError(f"Expected a comma-separated list of names, got {text!r}.")
    return parsed


def ints(text: str | None, what: str) -> list[int] | None:
    if text is None:
        return None
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise CliError(f"{what} must be comma-separated positive integers, not {text!r}.") from None
    if not values or min(values) < 1:
        raise CliError(f"{what} must be comma-separated positive integers, not {text!r}.")
    return values


def stage(text: str) -> Stage:
    from torchbricks_fx.stage import parse_stage

    return parse_stage(text)  # BrickGraphError lists the valid stages


# Argument errors answer without importing torch (about 5 s): these checks come before parse_device.
def check_device_name(text: str) -> None:
    """Refuses a device that is not ``cpu``, ``cuda`` or ``cuda:N`` (``parse_device`` checks the rest)."""
    kind, _, index = text.partition(":")
    if kind not in ("cpu", "cuda") or (index and not index.isdigit()):
        raise CliError(f"Unknown device {text!r}; valid devices: 'cpu', 'cuda', 'cuda:N'.")


def check_backend_names(text: str) -> None:
    """Refuses unknown backend names (whether they fit the device is checked once it is parsed)."""
    from torchbricks_fx.backends import parse_backends

    parse_backends(text, None)


def check_timing(threads: int | None, min_run_time: float) -> None:
    if threads is not None and threads < 1:
        raise CliError(f"--threads must be a positive integer, not {threads}.")
    if not 0 < min_run_time < math.inf:
        raise CliError(f"--min-run-time must be positive and finite, not {min_run_time}.")


# --------------------------------------------------------------------------------------------- errors
def one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or "(no message)"


# The library's advice names keyword arguments; here the same advice names the options that set them.
_CLI_TERMS = (
    ("pass overwrite=True", "pass --overwrite"),
    ("give validation batches and a max_metric_drop", "give --validation and a --max-metric-drop"),
    ("max_metric_drop=None", "--max-metric-drop none"),
)


def paragraph(error: BaseException) -> str:
    """The error's message and notes as one paragraph (no blank lines; list items kept on their own lines),
    in the command line's terms (``_CLI_TERMS``)."""
    notes = [note for note in getattr(error, "__notes__", ()) if isinstance(note, str)]
    text = "\n".join(line for line in [*str(error).splitlines(), *notes] if line.strip())
    for library_terms, cli_terms in _CLI_TERMS:
        text = text.replace(library_terms, cli_terms)
    return text


@contextlib.contextmanager
def output_to_log(what: str) -> Iterator[Path]:
    """Sends everything written to stdout and stderr (Python and native code) to a log file for the block:
    exporters print progress and, on failure, long graph dumps.  The log is removed when the block
    succeeds or left empty (an argument refused before any work); otherwise, on failure, its path is added
    to the error as a note."""
    handle, name = tempfile.mkstemp(prefix=f"{PROG}-{what}-", suffix=".log")
    log = Path(name)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    failure: BaseException | None = None
    try:
        os.dup2(handle, 1)
        os.dup2(handle, 2)
        with open(handle, "w", encoding="utf-8", closefd=False) as stream, \
                contextlib.redirect_stdout(stream), contextlib.redirect_stderr(stream):
            yield log
    except BaseException as error:
        failure = error
        raise
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, handle):
            os.close(fd)
        if failure is not None and log.is_file() and log.stat().st_size > 0:
            add_note(failure, f"(the {what}'s full output is in {log})")
        else:
            log.unlink(missing_ok=True)
