"""Sets of files written together into a folder that holds other files (the per-brick weights).

:func:`staged_set` replaces only the files of the set's previous write, listed in a hidden manifest
(``.<name>.tbfx.json``); every other file of the folder stays.  :func:`reading_set` holds the set steady while
a reader reads it.  Readers and writers of one machine are kept apart by an advisory lock (``flock``) on the
hidden ``.<name>.tbfx.lock`` in the folder: exclusive while a set is committed or a killed write is finished,
shared while a reader reads.  Files are staged without the lock, so a slow write blocks nobody.  Where the
lock cannot be had (a read-only folder without the lock file, a system without ``flock``), kills stay safe
but concurrent processes are not kept apart; ``flock`` on network file systems (NFS) is unreliable.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from torchbricks_fx.errors import BrickError
from torchbricks_fx.files import check_destination, make_parents, named, rename_new_folder, sync_folder, sync_tree
from torchbricks_fx.staging import (
    alive,
    close_held,
    hold,
    make_staging,
    owner_pid,
    release_staging,
    remove,
    remove_stale_staging,
    staging_glob,
    staging_prefix,
)

try:
    import fcntl
except ImportError:  # not POSIX (Windows): no advisory locks
    fcntl = None  # type: ignore[assignment]

__all__ = ["reading_set", "staged_set"]

_TAG = "tbfx"


@contextlib.contextmanager
def staged_set(folder: str | os.PathLike[str], name: str, error: type[BrickError] = BrickError) -> Iterator[Path]:
    """Yields an empty staging folder for a set of files written together (``name`` says which set).  When
    the block succeeds, the staged files replace, inside ``folder``, the files of the set's previous write;
    every other file of ``folder`` stays.

    A new folder is renamed into place whole.  Into an existing one (or one that another process made
    meanwhile), the staging folder is marked complete by a rename into the folder, the commit point, and its
    files are then moved in, all under the exclusive lock; a process killed while moving them leaves the
    complete new set staged, which the next access under the lock moves in (:func:`reading_set`)."""
    folder = Path(folder)
    check_destination(folder, True, error, is_folder=True)
    new = not folder.exists()
    place = folder if new else folder / name  # a new folder is staged next to it, a set inside its folder
    with named(folder, error):
        created = make_parents(folder.parent) if new else []
        remove_stale_staging(place)
        staging = make_staging(place, "tmp")
    try:
        yield staging
        _check_targets(staging, folder, error)
        with named(folder, error):
            _write_manifest(staging, name)
            sync_tree(staging)
            if not (new and rename_new_folder(staging, folder)):
                _commit(folder, name, staging, error)
            sync_folder(folder.parent)
    except BaseException:
        remove(staging)
        for parent in reversed(created):  # a failure leaves no folders it made
            with contextlib.suppress(OSError):
                parent.rmdir()
        raise
    finally:
        release_staging(staging)


def _commit(folder: Path, name: str, staging: Path, error: type[BrickError]) -> None:
    with _locked(folder, name, exclusive=True) as locked:
        _finish_abandoned(folder, name, locked, error)  # older sets first, so this one wins
        ready = folder / f"{staging_prefix(name)}{os.urandom(4).hex()}.ready"
        os.rename(staging, ready)  # the commit point
        sync_folder(folder)
        _complete_set(folder, name, ready)
        sync_folder(folder)


@contextlib.contextmanager
def reading_set(folder: str | os.PathLike[str], name: str, error: type[BrickError] = BrickError) -> Iterator[None]:
    """Holds the set of ``folder`` steady while the block reads it: no write commits meanwhile (shared lock),
    so the block sees the complete old set or the complete new one.  A write killed after its commit point is
    finished first (under the exclusive lock); where it cannot be (a read-only folder), ``error`` says how."""
    folder = Path(folder)
    remove_stale_staging(folder / name)  # of writes killed before their commit point
    with _locked(folder, name, exclusive=False) as locked:
        if not _abandoned(folder, name, locked):
            yield
            return
    with _locked(folder, name, exclusive=True) as locked:
        _finish_abandoned(folder, name, locked, error)
        yield  # under the exclusive lock, rare: only after a killed write


# ------------------------------------------------------------------------------------------- the lock
@contextlib.contextmanager
def _locked(folder: Path, name: str, exclusive: bool) -> Iterator[bool]:
    """Holds the set's lock; yields whether it is held (see the module's docstring for when it is not).
    Closing the file releases the lock, also when the process is killed."""
    descriptor = _open_lock(folder / f".{name}.{_TAG}.lock")
    locked = descriptor is not None and _flock(descriptor, exclusive)
    if descriptor is not None:
        hold(descriptor)  # a flock belongs to the open file, which a fork shares: a forked child closes its copy
    try:
        yield locked
    finally:
        if descriptor is not None:
            close_held(descriptor)


def _open_lock(path: Path) -> int | None:
    if fcntl is None:
        return None
    for flags in (os.O_RDWR | os.O_CREAT, os.O_RDONLY):  # read-only: a read-only folder's existing lock file
        with contextlib.suppress(OSError):
            return os.open(path, flags, 0o666)  # less the umask: every user who may write the set may lock it
    return None


def _flock(descriptor: int, exclusive: bool) -> bool:
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
    except OSError:  # a file system without flock
        return False
    return True


# ------------------------------------------------------------------------------------------- killed writes
def _abandoned(folder: Path, name: str, locked: bool) -> list[Path]:
    """The committed sets that no write is completing, oldest first.  Under the lock that is every one (a
    writer completes its set while it holds the lock, so a set left over was killed or failed); without
    it, those of processes that are gone (or of this one: a completion that raised)."""
    found = []
    for ready in folder.glob(staging_glob(name, "ready")):
        with contextlib.suppress(FileNotFoundError):  # completed meanwhile by its writer (no lock)
            found.append((ready.stat().st_mtime, ready))
    abandoned = []
    for _, ready in sorted(found):
        pid = owner_pid(ready, name)
        if locked or pid is None or pid == os.getpid() or not alive(pid):
            abandoned.append(ready)
    return abandoned


def _finish_abandoned(folder: Path, name: str, locked: bool, error: type[BrickError]) -> None:
    """Moves in the complete sets that killed writes left staged (the newest wins), and removes the staging
    of killed writes that had not committed."""
    for ready in _abandoned(folder, name, locked):
        try:
            _complete_set(folder, name, ready)
        except OSError as cause:  # a read-only folder, typically: reading the half-moved set would mix
            raise error(f"A write to {folder} was interrupted after it was complete, and it cannot be finished: "
                        f"{cause.strerror or cause}. Its new files wait in {ready} (some may be moved in already). "
                        f"Make the folder writable once and access it again: the next read or write finishes it."
                        ) from cause
    remove_stale_staging(folder / name)


# ------------------------------------------------------------------------------------------- manifests
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
    moved = contextlib.suppress(FileNotFoundError)  # by another process completing the same set (no lock)
    with moved:
        for staged in sorted(ready.iterdir()):
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
