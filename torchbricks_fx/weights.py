"""Per-brick weights: one ``<brick name>.pt`` file per brick in a folder, saved crash-safely.

``save_bricks`` stages the new files and moves them in only once all are written (``files.staged_set``): the
destination holds either the complete old weights or the complete new ones, and any other file in it stays.
``load_bricks`` checks every file against its brick before loading any, so nothing is half-loaded.
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

from torchbricks_fx.errors import BrickError, add_note, error_summary
from torchbricks_fx.files import recover_folder, recover_set, staged_set

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
    folder = Path(folder)
    recover_folder(folder)  # a backup left by an older version's save killed mid-swap
    with staged_set(folder, _SET) as staging:
        for name, _, brick in collection.named_bricks():
            state = brick.state_dict()
            if not state:
                continue
            try:
                torch.save(state, staging / weights_file(name))
            except OSError as error:
                add_note(error, f"(saving the weights of brick {name!r} to {str(folder / weights_file(name))!r}; "
                               f"nothing was changed at {str(folder)!r})")
                raise
    return folder


def load_bricks(collection: BrickCollection, folder: str | os.PathLike[str]) -> None:
    """Loads per-brick weights saved by :func:`save_bricks` (``weights_only=True``).  Bricks without a file
    keep their weights and are warned about by name; nothing is loaded unless every file reads and fits."""
    folder = Path(folder)
    recover_folder(folder)  # a backup left by an older version's save killed mid-swap
    if not folder.is_dir():
        raise BrickError(f"No brick weights folder at {str(folder)!r}.")
    recover_set(folder, _SET)  # a save killed while moving its complete new files in
    bricks = collection.bricks()
    states: dict[str, Mapping[str, Any]] = {}
    missing = []
    for name, brick in bricks.items():
        path = folder / weights_file(name)
        if path.exists():
            states[name] = _read(path, name)
        elif brick.state_dict():
            missing.append(name)
    problems = [p for name, state in states.items() for p in _state_problems(name, bricks[name], state)]
    if problems:
        raise BrickError("Brick weights do not fit; nothing was loaded:\n" + "\n".join(problems))
    for name, state in states.items():
        bricks[name].load_state_dict(state)
    known = {weights_file(name) for name in bricks}
    unknown = sorted(p.name for p in folder.glob(f"*{WEIGHTS_SUFFIX}") if p.name not in known)
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
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        problems.append(f"- brick {name!r}: missing keys {missing}, unexpected keys {unexpected}")
    for key in set(expected) & set(state):
        if tuple(expected[key].shape) != tuple(state[key].shape):
            problems.append(f"- brick {name!r}: {key} has shape {tuple(state[key].shape)} in the file, "
                            f"{tuple(expected[key].shape)} in the brick")
    return problems
