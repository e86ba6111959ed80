"""Staging folders: where a write is assembled before :mod:`torchbricks_fx.files` moves it into place.

They are named ``.<name>.tbfx-<pid>-<random>.<kind>`` next to the destination.  A writer holds an advisory
lock (``flock``) on its staging folder while it lives, so the next write to the same place can tell the
staging folder of a killed write (lock free) from one being written (lock held), also when the writer runs
in another PID namespace (a container sharing the volume), where its pid says nothing.  Without ``flock``
(Windows, some network file systems) the pid decides: a staging folder of a process that does not run here
is stale.

Locks are held through open descriptors, which a fork shares: a child forked meanwhile (a DataLoader worker)
closes its copies, so that only the writer holds them.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
from pathlib import Path

try:
    import fcntl
except ImportError:  # not POSIX (Windows): no advisory locks
    fcntl = None  # type: ignore[assignment]

_TAG = "tbfx"
_UNLOCKED = "-unlocked"  # in the name of a staging folder its writer could not lock
_HELD: set[int] = set()  # descriptors holding a lock in this process
_STAGING_LOCKS: dict[Path, int] = {}  # this process's staging folders: the descriptor holding each one's lock


def staging_prefix(name: str) -> str:
    return f".{name}.{_TAG}-{os.getpid()}-"


def staging_glob(name: str, kind: str) -> str:
    """The glob pattern of every process's staging of ``name`` (escaped: names such as ``model[1].onnx``)."""
    return f"{glob.escape(f'.{name}.{_TAG}-')}*.{kind}"


def make_staging(path: Path, kind: str) -> Path:
    """A new, empty staging folder for ``path``, locked until :func:`release_staging`.  It is locked under a
    name that no cleaner looks for (``.new``) and then renamed: no other process sees it unlocked."""
    # Not tempfile.mkdtemp: its 0o700 would stay on a folder swapped in whole (bundles, new weights folders).
    while True:
        stem = f"{staging_prefix(path.name)}{os.urandom(4).hex()}"
        fresh = path.parent / f"{stem}.new"
        try:
            fresh.mkdir(mode=0o777)  # less the umask
        except FileExistsError:
            continue
        descriptor = _lock(fresh)
        # One that could not be locked (no flock here, no descriptor left) says so: judged by its pid.
        staging = path.parent / f"{stem}{'' if descriptor is not None else _UNLOCKED}.{kind}"
        try:
            os.rename(fresh, staging)
        except BaseException:
            _close(descriptor)
            fresh.rmdir()
            raise
        if descriptor is not None:
            _STAGING_LOCKS[staging] = descriptor
        return staging


def release_staging(staging: Path) -> None:
    """Lets go of ``staging``'s lock (after it was moved into place or removed)."""
    _close(_STAGING_LOCKS.pop(staging, None))


def owner_pid(staging: Path, name: str) -> int | None:
    rest = staging.name[len(f".{name}.{_TAG}-"):]
    pid = rest.split("-", 1)[0]
    return int(pid) if pid.isdigit() else None


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, owned by someone else
    return True


def writer_gone(staging: Path, name: str) -> bool:
    """Whether the process that made ``staging`` is gone: its lock is free (or, where locks cannot tell or
    its writer could not lock it, its pid does not run here)."""
    free = None if staging.name.rpartition(".")[0].endswith(_UNLOCKED) else _lock_free(staging)
    if free is not None:
        return free
    pid = owner_pid(staging, name)
    return pid is not None and pid != os.getpid() and not alive(pid)


def remove_stale_staging(path: Path) -> None:
    """Removes staging folders of ``path`` whose writer is gone (killed mid-write)."""
    for staging in path.parent.glob(staging_glob(path.name, "tmp")):
        if writer_gone(staging, path.name):
            remove(staging)


def remove(path: Path) -> None:
    """Removes a folder tree, or a link in its place (``rmtree`` refuses links: one would stay forever)."""
    if path.is_symlink():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


# ------------------------------------------------------------------------------------------- the locks
def hold(descriptor: int) -> None:
    """Counts ``descriptor`` among those a forked child closes (it holds a lock)."""
    _HELD.add(descriptor)


def close_held(descriptor: int) -> None:
    _HELD.discard(descriptor)
    os.close(descriptor)


def _lock(folder: Path) -> int | None:
    """An open descriptor of ``folder`` holding its exclusive lock; ``None`` where it cannot be locked."""
    try:
        descriptor = _try_lock(folder)
    except BlockingIOError:
        return None
    if descriptor is not None:
        hold(descriptor)
    return descriptor


def _lock_free(folder: Path) -> bool | None:
    """Whether nobody holds ``folder``'s lock; ``None`` where locks cannot tell."""
    try:
        descriptor = _try_lock(folder)
    except BlockingIOError:
        return False
    if descriptor is None:
        return None
    os.close(descriptor)
    return True


def _try_lock(folder: Path) -> int | None:
    """An open descriptor of ``folder`` holding its exclusive lock; ``BlockingIOError`` when someone else
    holds it; ``None`` where it cannot be had (no ``flock``, no descriptor left, a vanished folder)."""
    if fcntl is None:
        return None
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(descriptor)
        raise
    except OSError:  # a file system without flock
        os.close(descriptor)
        return None
    return descriptor


def _close(descriptor: int | None) -> None:
    if descriptor is not None:
        with contextlib.suppress(OSError):
            close_held(descriptor)


def _close_held_in_child() -> None:
    for descriptor in list(_HELD):
        with contextlib.suppress(OSError):
            os.close(descriptor)
    _HELD.clear()
    _STAGING_LOCKS.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_held_in_child)
