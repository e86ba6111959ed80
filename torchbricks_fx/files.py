"""Atomic writes: every file or folder the library writes (exports, weights, reports, bundles) goes through here.

Everything is written into a private staging folder next to the destination and moved into place only
when complete, so a failure or a kill never leaves a half-written artifact under the destination's name:

* :func:`staged_file`: a file (plus sidecars such as ONNX external data) replacing at most its own names;
* :func:`staged_folder`: a whole folder, swapped in so that at every instant the destination holds either
  the complete old folder or the complete new one (an atomic exchange where the OS has one; otherwise a
  backup that the next access restores, see :func:`recover_folder`);
* :func:`staged_set`: a set of files written together into a folder that may hold other files (the
  per-brick weights): only the previous write's files are replaced or removed, the rest of the folder stays;
* :func:`write_text`: a small text file (JSON, Markdown).

Staging folders are created like ``os.makedirs`` would (mode ``0o777`` less the umask), so a folder swapped
in whole is as readable as any other.  They are named ``.<name>.tbfx-<pid>-<random>.<kind>``; the next write
to the same place removes those whose process is gone (a killed export or save).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from torchbricks_fx.errors import BrickError, error_summary

__all__ = ["recover_folder", "recover_set", "staged_file", "staged_folder", "staged_set", "write_text"]

_TAG = "tbfx"


def _staging_prefix(name: str) -> str:
    return f".{name}.{_TAG}-{os.getpid()}-"


@contextlib.contextmanager
def _named(path: Path, error: type[BrickError]) -> Iterator[None]:
    """An ``OSError`` of the block (a read-only or missing parent, a full disk) as ``error`` naming ``path``:
    the OS would name the hidden staging path, which the user never asked for."""
    try:
        yield
    except OSError as cause:
        raise error(f"Cannot write {path}: {cause.strerror or error_summary(cause)}") from cause


def _make_staging(path: Path, kind: str) -> Path:
    # Not tempfile.mkdtemp: its 0o700 would stay on a folder swapped in whole (bundles, new weights folders).
    while True:
        staging = path.parent / f"{_staging_prefix(path.name)}{os.urandom(4).hex()}.{kind}"
        try:
            staging.mkdir(mode=0o777)  # less the umask
        except FileExistsError:
            continue
        return staging


def _owner_pid(staging: Path, name: str) -> int | None:
    rest = staging.name[len(f".{name}.{_TAG}-"):]
    pid = rest.split("-", 1)[0]
    return int(pid) if pid.isdigit() else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, owned by someone else
    return True


def remove_stale_staging(path: Path) -> None:
    """Removes staging folders of ``path`` left by processes that no longer run (killed mid-write)."""
    for staging in path.parent.glob(f".{path.name}.{_TAG}-*.tmp"):
        pid = _owner_pid(staging, path.name)
        if pid is not None and pid != os.getpid() and not _alive(pid):
            shutil.rmtree(staging, ignore_errors=True)


def check_destination(path: Path, overwrite: bool, error: type[BrickError] = BrickError,
                      is_folder: bool = False) -> None:
    """Refuses, before any work, a destination that cannot be written: an existing one without
    ``overwrite``, a folder where a file goes (or the reverse), a parent that is a file."""
    blocking = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise error(f"Cannot write {path}: {blocking} is a file, not a folder.")
    if path.exists():
        if path.is_dir() != is_folder:
            what = "a folder" if path.is_dir() else "a file"
            raise error(f"Cannot write {path}: it is {what}; give a {'folder' if is_folder else 'file'} path.")
        if not overwrite:
            raise error(f"{path} already exists; pass overwrite=True to replace it.")


@contextlib.contextmanager
def staged_file(path: str | os.PathLike[str], overwrite: bool, error: type[BrickError] = BrickError,
                sidecars: Sequence[str] = ()) -> Iterator[Path]:
    """Yields a path in a private folder next to ``path``; when the block succeeds, moves what was written
    there into place (sidecars first, the main file last).  ``sidecars`` names the files beside ``path``
    that belong to it (``model.onnx.data``): replacing, those the new write lacks are removed.  Removes the
    folder in any case, and the folders it created when nothing was written."""
    path = Path(path)
    check_destination(path, overwrite, error)
    with _named(path, error):
        created = _make_parents(path.parent)
        remove_stale_staging(path)
        staging = _make_staging(path, "tmp")
    committed = False
    try:
        yield staging / path.name
        with _named(path, error):
            _commit(staging, path, overwrite, error, sidecars)
        committed = True
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if not committed:
            for folder in reversed(created):
                with contextlib.suppress(OSError):
                    folder.rmdir()


def write_text(path: str | os.PathLike[str], text: str, overwrite: bool = True,
               error: type[BrickError] = BrickError) -> Path:
    """Writes ``text`` to ``path`` atomically (a reader never sees half a file)."""
    with staged_file(path, overwrite, error) as staged, _named(Path(path), error):
        staged.write_text(text, encoding="utf-8")
    return Path(path)


def _make_parents(folder: Path) -> list[Path]:
    missing = [p for p in [folder, *folder.parents] if not p.exists()][::-1]
    folder.mkdir(parents=True, exist_ok=True)
    return missing


def _commit(staging: Path, path: Path, overwrite: bool, error: type[BrickError], sidecars: Sequence[str]) -> None:
    """Moves the staged files next to ``path``: sidecars first, the main file last, so a partial move never
    leaves a loadable new artifact.  Replacing, the files it replaces are kept until the main file is in
    place and put back on failure; the previous file's ``sidecars`` that the new one lacks are removed only
    after the new file is in place."""
    folder = path.parent
    names = [*sorted(p.name for p in staging.iterdir() if p.name != path.name), path.name]
    if not overwrite:
        _move_all_new(staging, folder, names, error)
        return
    stale = [folder / n for n in sidecars if n not in names and (folder / n).exists()]
    previous = Path(tempfile.mkdtemp(prefix=".previous.", dir=staging))  # removed with the staging folder
    kept = {name: _keep(folder / name, previous / name) for name in names if (folder / name).exists()}
    moved: list[str] = []
    try:
        for name in names:
            os.replace(staging / name, folder / name)
            moved.append(name)
    except BaseException:
        for name in reversed(moved):
            if name in kept:
                os.replace(kept[name], folder / name)
            else:
                (folder / name).unlink(missing_ok=True)
        raise
    for sidecar in stale:
        sidecar.unlink(missing_ok=True)


def _keep(source: Path, copy: Path) -> Path:
    """A second name (or, without hard links, a copy) of ``source``, to put it back after a failed move."""
    try:
        os.link(source, copy)
    except OSError:
        shutil.copy2(source, copy)
    return copy


def _move_all_new(staging: Path, folder: Path, names: Sequence[str], error: type[BrickError]) -> None:
    moved: list[Path] = []
    try:
        for name in names:
            _move_new(staging / name, folder / name, error)
            moved.append(folder / name)
    except BaseException:
        for done in moved:
            done.unlink(missing_ok=True)
        raise


def _move_new(source: Path, destination: Path, error: type[BrickError]) -> None:
    try:
        os.link(source, destination)  # atomic "create only if absent"
    except FileExistsError:
        raise error(f"{destination} already exists; pass overwrite=True to replace it.") from None
    except OSError:  # file systems without hard links
        if destination.exists():
            raise error(f"{destination} already exists; pass overwrite=True to replace it.") from None
        os.replace(source, destination)


# --------------------------------------------------------------------------------------------- folders
@contextlib.contextmanager
def staged_folder(folder: str | os.PathLike[str], overwrite: bool,
                  error: type[BrickError] = BrickError) -> Iterator[Path]:
    """Yields an empty staging folder next to ``folder``; when the block succeeds, it replaces ``folder``
    (see :func:`replace_folder`).  On failure the staging folder is removed and ``folder`` is untouched."""
    folder = Path(folder)
    with _named(folder, error):
        recover_folder(folder)
    check_destination(folder, overwrite, error, is_folder=True)
    with _named(folder, error):
        created = _make_parents(folder.parent)
        remove_stale_staging(folder)
        staging = _make_staging(folder, "tmp")
    done = False
    try:
        yield staging
        with _named(folder, error):
            replace_folder(staging, folder)
        done = True
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        for parent in reversed(created if not done else []):  # a failure leaves no folders it made
            with contextlib.suppress(OSError):
                parent.rmdir()


def replace_folder(staging: Path, folder: Path) -> None:
    """Puts ``staging`` at ``folder``.  An existing folder is exchanged with it atomically where the OS can
    (Linux ``renameat2(RENAME_EXCHANGE)``) and then removed; elsewhere it is first renamed to a backup, which
    :func:`recover_folder` puts back if the process dies before the new folder is in place."""
    if not folder.exists():
        os.rename(staging, folder)
        return
    if _exchange(staging, folder):
        shutil.rmtree(staging, ignore_errors=True)  # now holds the old folder
        return
    backup = folder.parent / f".{folder.name}.{_TAG}-{os.getpid()}-{os.urandom(4).hex()}.old"
    os.rename(folder, backup)
    try:
        os.rename(staging, folder)
    except BaseException:
        os.rename(backup, folder)
        raise
    shutil.rmtree(backup, ignore_errors=True)


def recover_folder(folder: str | os.PathLike[str]) -> None:
    """Puts back the backup of ``folder`` left by a process killed between the two renames of
    :func:`replace_folder`, and removes backups whose replacement is in place."""
    folder = Path(folder)
    for backup in sorted(folder.parent.glob(f".{folder.name}.{_TAG}-*.old")):
        pid = _owner_pid(backup, folder.name)
        if pid is not None and pid != os.getpid() and _alive(pid):
            continue  # another process is replacing the folder right now
        if folder.exists():
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.rename(backup, folder)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(first: Path, second: Path) -> bool:
    """Atomically swaps two paths (Linux ``renameat2``); ``False`` where unavailable."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    result = renameat2(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE)
    return result == 0


# ------------------------------------------------------------------------------------------- file sets
@contextlib.contextmanager
def staged_set(folder: str | os.PathLike[str], name: str, error: type[BrickError] = BrickError) -> Iterator[Path]:
    """Yields an empty staging folder for a set of files written together (``name`` says which set).  When
    the block succeeds, the staged files replace, inside ``folder``, the files of the set's previous write
    (listed in the hidden manifest ``.<name>.tbfx.json``); every other file of ``folder`` stays.

    A new folder is renamed into place whole.  Into an existing one, the staging folder (inside it) is first
    marked complete by a rename, the commit point, and then its files are moved in; a process killed while
    moving them leaves the complete new set staged, which :func:`recover_set` moves in on the next access."""
    folder = Path(folder)
    check_destination(folder, True, error, is_folder=True)
    if not folder.exists():
        with staged_folder(folder, False, error) as staging:
            yield staging
            _write_manifest(staging, name)
        return
    with _named(folder, error):
        recover_set(folder, name)
        staging = _make_staging(folder / name, "tmp")
    try:
        yield staging
        _check_targets(staging, folder, error)
        with _named(folder, error):
            _write_manifest(staging, name)
            ready = staging.with_name(staging.name.removesuffix(".tmp") + ".ready")
            os.rename(staging, ready)  # the commit point
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    with _named(folder, error):
        _complete_set(folder, name, ready)


def recover_set(folder: str | os.PathLike[str], name: str) -> None:
    """Moves in the complete sets that a process killed after the commit point left staged in ``folder``
    (oldest first, so the newest wins), and removes the staging of killed writes that had not committed."""
    folder = Path(folder)
    readies = sorted(folder.glob(f".{name}.{_TAG}-*.ready"), key=lambda p: p.stat().st_mtime)
    for ready in readies:
        pid = _owner_pid(ready, name)
        if pid is None or pid == os.getpid() or not _alive(pid):  # our own: a completion that raised
            _complete_set(folder, name, ready)
    remove_stale_staging(folder / name)


def _manifest(folder: Path, name: str) -> Path:
    return folder / f".{name}.{_TAG}.json"


def _write_manifest(staging: Path, name: str) -> None:
    files = sorted(p.name for p in staging.iterdir())
    _manifest(staging, name).write_text(json.dumps({"files": files}, indent=1) + "\n", encoding="utf-8")


def _listed(manifest: Path) -> set[str]:
    """The plain file names a manifest lists; none when it is missing or unreadable (nothing is removed)."""
    try:
        files = json.loads(manifest.read_text(encoding="utf-8"))["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return set()
    return {f for f in files if isinstance(f, str) and f not in ("", ".", "..", manifest.name) and Path(f).name == f}


def _check_targets(staging: Path, folder: Path, error: type[BrickError]) -> None:
    """Refuses, before the commit point, a set whose files would replace folders (the move would fail)."""
    blocked = sorted(p.name for p in staging.iterdir() if (folder / p.name).is_dir())
    if blocked:
        raise error(f"Cannot write {blocked} in {folder}: they are folders there; nothing was changed.")


def _complete_set(folder: Path, name: str, ready: Path) -> None:
    """Moves a committed set in: its files, then the removal of the previous set's files it lacks, then its
    manifest, then the staging folder.  Idempotent, so a kill at any step is completed by running it again."""
    manifest, staged_manifest = _manifest(folder, name), _manifest(ready, name)
    moved = contextlib.suppress(FileNotFoundError)  # by another thread completing the same set
    for staged in sorted(ready.iterdir()) if ready.is_dir() else ():
        if staged.name != manifest.name:
            with moved:
                os.replace(staged, folder / staged.name)
    if staged_manifest.exists():  # else it is in place already, and so is everything before it
        new = _listed(staged_manifest)
        for gone in sorted(_listed(manifest) - new):
            if not (folder / gone).is_dir():
                (folder / gone).unlink(missing_ok=True)
        with moved:
            os.replace(staged_manifest, manifest)
    shutil.rmtree(ready, ignore_errors=True)
