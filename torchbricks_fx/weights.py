"""Per-brick weights: one ``<brick name>.pt`` file per brick in a folder, saved crash-safely.

``save_bricks`` stages the new files and moves them in only once all are written (``fileset.staged_set``): the
destination holds either the complete old weights or the complete new ones, and any other file in it stays.
``load_bricks`` checks every file against its brick before loading any, so nothing is half-loaded, and reads
them while no save commits (``fileset.reading_set``): it sees the complete old weights or the complete new ones.
"""

from __future__ import annotations

import hashlib
import os
import urllib.parse
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch.nn.parameter import is_lazy

from torchbricks_fx.errors import BrickError, error_summary
from torchbricks_fx.files import as_path, recover_folder
from torchbricks_fx.fileset import reading_set, staged_set

if TYPE_CHECKING:
    from torchbricks_fx.brick import Brick
    from torchbricks_fx.collection import BrickCollection

__all__ = ["load_bricks", "save_bricks"]

WEIGHTS_SUFFIX = ".pt"
_SET = "bricks"  # the name of the weights' file set in the folder (its manifest is ``.bricks.tbfx.json``)
_MAX_NAME_BYTES = 200  # file systems allow 255; leave room for the suffix and staging names


def weights_file(brick_name: str) -> str:
    """The file name of a brick's weights: the name, percent-encoded; a name too long for a file system is
    shortened and made unique with a hash of the full name."""
    quoted = urllib.parse.quote(brick_name, safe="._-")
    if len(quoted.encode()) > _MAX_NAME_BYTES:
        digest = hashlib.sha256(brick_name.encode()).hexdigest()[:16]
        quoted = f"{quoted[:_MAX_NAME_BYTES - 17]}-{digest}"
    return quoted + WEIGHTS_SUFFIX


def save_bricks(collection: BrickCollection, folder: str | os.PathLike[str]) -> Path:
    """Saves each brick's weights to ``folder/<brick name>.pt`` (bricks without weights get no file) and
    returns the folder.  In an existing folder, the files of the previous ``save_bricks`` are replaced (or
    removed, for bricks gone since) only once every new file is written; the folder's other files stay."""
    folder = as_path(folder, "save_bricks' folder")
    recover_folder(folder)  # a backup left by an older version's save killed mid-swap
    with staged_set(folder, _SET) as staging:
        for name, _, brick in collection.named_bricks():
            state = brick.state_dict()
            if state:
                _write(state, staging / weights_file(name), name, folder)
    return folder


def _write(state: Mapping[str, Any], staged: Path, brick: str, folder: Path) -> None:
    try:
        with open(staged, "wb") as file:  # a file object: torch's zip writer then chains the OSError it hit
            torch.save(state, file)
    except (OSError, RuntimeError) as error:  # a full disk is a RuntimeError of the zip writer
        raise BrickError(f"Cannot write the weights of brick {brick!r} to {str(folder / staged.name)!r}: "
                         f"{_reason(error)}; nothing was changed at {str(folder)!r}.") from error


def _reason(error: BaseException) -> str:
    """The OS's reason (``No space left on device``) where one is in the chain, else the error's first line."""
    cause: BaseException | None = error
    while cause is not None:
        if isinstance(cause, OSError) and cause.strerror:
            return cause.strerror
        cause = cause.__cause__ or cause.__context__
    return error_summary(error, 160, first_line=True)


def load_bricks(collection: BrickCollection, folder: str | os.PathLike[str]) -> None:
    """Loads per-brick weights saved by :func:`save_bricks` (``weights_only=True``).  Bricks without a file
    keep their weights and are warned about by name; nothing is loaded unless every file reads and fits, and
    a folder with no file for any brick is an error.  A save running meanwhile (another process of this
    machine) is not seen half-way: the files are read while no save commits."""
    folder = as_path(folder, "load_bricks' folder")
    recover_folder(folder)  # a backup left by an older version's save killed mid-swap
    if not folder.is_dir():
        raise BrickError(f"No brick weights folder at {str(folder)!r}.")
    bricks = collection.bricks()
    with reading_set(folder, _SET, BrickError):
        states = {name: _read(folder / weights_file(name), name) for name in bricks
                  if (folder / weights_file(name)).exists()}
        files = sorted(p.name for p in folder.glob(f"*{WEIGHTS_SUFFIX}"))
    missing = [name for name, brick in bricks.items() if name not in states and brick.state_dict()]
    if missing and not states:
        raise BrickError(f"No weights file in {str(folder)!r} matches a brick, so nothing was loaded: the folder "
                         f"holds {files or 'no *' + WEIGHTS_SUFFIX + ' file'}, the bricks with weights are {missing} "
                         f"(save_bricks names a brick's file {weights_file(missing[0])!r}).")
    problems = [p for name, state in states.items() for p in _state_problems(name, bricks[name], state)]
    if problems:
        raise BrickError("Brick weights do not fit; nothing was loaded:\n" + "\n".join(problems))
    _load_all(bricks, states)
    unknown = sorted(set(files) - {weights_file(name) for name in bricks})
    if missing:
        warnings.warn(f"No weights file for brick(s) {missing} in {str(folder)!r}; they keep their weights.",
                      stacklevel=3)
    if unknown:
        warnings.warn(f"Weights files {unknown} in {str(folder)!r} match no brick; they were ignored.",
                      stacklevel=3)


def _read(path: Path, brick: str) -> Mapping[str, Any]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated, empty or foreign files fail in pickle, zip or torch
        reason = error_summary(error, 160, first_line=True)
        raise BrickError(f"Cannot read the weights of brick {brick!r} from {str(path)!r}: the file is damaged or "
                         f"not a torch weights file ({reason}); nothing was loaded.") from error
    if not isinstance(state, Mapping):
        raise BrickError(f"{str(path)!r} holds a {type(state).__name__}, not the state dict of brick {brick!r}; "
                         f"nothing was loaded.")
    return state


def _state_problems(name: str, brick: Brick, state: Mapping[str, Any]) -> list[str]:
    expected = brick.state_dict()
    problems = []
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected), key=str)
    if missing or unexpected:
        problems.append(f"- brick {name!r}: missing keys {missing}, unexpected keys {unexpected}")
    for key in sorted(set(expected) & set(state)):
        problem = _value_problem(expected[key], state[key])
        if problem:
            problems.append(f"- brick {name!r}: {key} {problem}")
    return problems


def _value_problem(target: torch.Tensor, value: object) -> str | None:
    """What keeps ``value`` from loading into ``target`` (``load_state_dict`` would fail half-way, or copy a
    list's items into the wrong places), or ``None``."""
    if not isinstance(value, torch.Tensor):
        return f"is a {type(value).__name__} in the file, not a tensor"
    if value.is_meta:
        return "is a meta tensor in the file: it holds no values"
    if value.layout != target.layout:
        return f"has layout {value.layout} in the file, {target.layout} in the brick"
    if not torch.can_cast(value.dtype, target.dtype):
        return f"has dtype {value.dtype} in the file, which does not convert to the brick's {target.dtype}"
    if not is_lazy(target) and tuple(value.shape) != tuple(target.shape):  # a lazy one takes the file's shape
        return f"has shape {tuple(value.shape)} in the file, {tuple(target.shape)} in the brick"
    return None


def _load_all(bricks: Mapping[str, Brick], states: Mapping[str, Mapping[str, Any]]) -> None:
    """Loads the checked states.  Should one still fail (a module's own load hook, memory), the bricks loaded
    before it get their weights back, so that nothing is half-loaded.  That takes a copy of each brick's
    weights (on the CPU) while it loads; a lazy module's uninitialized weights cannot be put back."""
    before: list[tuple[str, Brick, dict[str, torch.Tensor], bool]] = []
    for name, state in states.items():
        brick = bricks[name]
        current = brick.state_dict()
        kept = {k: v.detach().to("cpu", copy=True) for k, v in current.items() if not (is_lazy(v) or v.is_meta)}
        before.append((name, brick, kept, len(kept) == len(current)))
        try:
            brick.load_state_dict(state)
        except Exception as error:
            raise BrickError(f"Cannot load the weights of brick {name!r}: {error_summary(error, 300)}; "
                             f"{_put_back(before)}") from error


def _put_back(loaded: list[tuple[str, Brick, dict[str, torch.Tensor], bool]]) -> str:
    """Gives the bricks loaded so far their weights back; says whether that left nothing loaded."""
    kept_new = [name for name, _, _, whole in loaded if not whole]  # lazy or meta weights have no copy
    for name, brick, weights, _ in reversed(loaded):
        targets = brick.state_dict(keep_vars=True)
        try:
            with torch.no_grad():  # copied in directly: the brick's load hooks may be what failed
                for key, value in weights.items():
                    targets[key].copy_(value)
        except Exception:  # the original error is what the user must see; name the brick left loaded
            kept_new.append(name)
    if not kept_new:
        return "nothing was loaded."
    return f"the other bricks were put back, but {sorted(set(kept_new))} keep the new weights (lazy or meta " \
           f"weights have no copy to put back)."
