"""save_bricks and load_bricks from several processes at once: a reader sees the complete old or the complete new
weights, two writers leave one complete set, and a save killed after its commit point in a folder that cannot be
written says how to finish it.  Each test pauses a forked writer half-way through moving its files in, so the
overlap is certain (no timing luck) and each test takes well under a second."""

from __future__ import annotations

import contextlib
import errno
import os
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
from torch import nn

from torchbricks_fx import BrickCollection, BrickError, BrickTrainable

pytestmark = pytest.mark.skipif(not hasattr(os, "fork") or sys.platform == "darwin",
                                reason="forks a writer process; the lock is POSIX flock")

BRICKS = 12
PAUSE_S = 0.4


def filled(value: float) -> BrickCollection:
    bricks = {}
    for i in range(BRICKS):
        layer = nn.Linear(2, 2)
        nn.init.constant_(layer.weight, value)
        nn.init.constant_(layer.bias, value)
        bricks[f"b{i}"] = BrickTrainable(layer, [f"x{i}"], [f"y{i}"])
    return BrickCollection(bricks)


def fills(collection: BrickCollection) -> set[float]:
    return {float(brick.model.weight.detach()[0, 0]) for brick in collection.bricks().values()}


def loaded(folder: Path) -> set[float]:
    probe = filled(-1.0)
    probe.load_bricks(folder)
    return fills(probe)


def paused_save(collection: BrickCollection, folder: Path, marker: Path) -> int:
    """Forks a process that saves ``collection``, pausing after it moved half of its files in (``marker``
    appears then); returns its pid.  The process exits 0 when the save succeeded."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            real, moved = os.replace, []

            def replace(source: object, destination: object) -> None:
                real(source, destination)  # type: ignore[arg-type]
                moved.append(destination)
                if len(moved) == BRICKS // 2:
                    marker.touch()
                    time.sleep(PAUSE_S)

            os.replace = replace  # type: ignore[assignment]
            collection.save_bricks(folder)
            code = 0
        finally:
            os._exit(code)
    return pid


def wait_for(marker: Path) -> None:
    deadline = time.monotonic() + 30
    while not marker.exists():
        assert time.monotonic() < deadline, "the writer never reached the pause"
        time.sleep(0.005)


def exit_code(pid: int) -> int:
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def while_a_save_is_half_moved_in(folder: Path, tmp_path: Path, action: Callable[[], object]) -> object:
    """Runs ``action`` while a forked save of weights 1.0 over weights 0.0 has moved half of its files in."""
    filled(0.0).save_bricks(folder)
    filled(0.0).save_bricks(folder)  # an existing folder: the set is moved in file by file
    marker = tmp_path / "paused"
    writer = paused_save(filled(1.0), folder, marker)
    try:
        wait_for(marker)
        result = action()
    finally:
        assert exit_code(writer) == 0
    return result


def test_a_load_during_a_save_gets_the_complete_old_or_new_weights(tmp_path):
    folder = tmp_path / "weights"
    seen = while_a_save_is_half_moved_in(folder, tmp_path, lambda: loaded(folder))
    assert seen in ({0.0}, {1.0})  # never a mix (without a lock: {0.0, 1.0})
    assert loaded(folder) == {1.0}


def test_two_saves_at_once_leave_one_complete_set(tmp_path):
    folder = tmp_path / "weights"
    other = filled(2.0)
    while_a_save_is_half_moved_in(folder, tmp_path, lambda: other.save_bricks(folder))
    assert loaded(folder) in ({1.0}, {2.0})  # never a mix, also after both returned
    hidden = sorted(p.name for p in folder.iterdir() if p.name.startswith("."))
    assert hidden == [".bricks.tbfx.json", ".bricks.tbfx.lock"]  # no staging left


class Killed(BaseException):
    """A kill: nothing after it runs."""


def test_a_save_killed_after_its_commit_in_a_read_only_folder_says_how_to_finish_it(tmp_path, monkeypatch):
    from torchbricks_fx import fileset

    folder = tmp_path / "weights"
    filled(0.0).save_bricks(folder)
    filled(0.0).save_bricks(folder)

    def killed(*args: object) -> None:
        raise Killed

    monkeypatch.setattr(fileset, "_complete_set", killed)
    with contextlib.suppress(Killed):
        filled(1.0).save_bricks(folder)  # committed, not moved in: the next access finishes it
    monkeypatch.undo()

    def read_only(source: object, destination: object) -> None:
        raise PermissionError(errno.EACCES, "Permission denied", str(source))

    monkeypatch.setattr(os, "replace", read_only)  # what a read-only folder does to the move (even for root)
    probe = filled(-1.0)
    with pytest.raises(BrickError, match=rf"(?s)A write to {folder} was interrupted after it was complete.*"
                                         r"Permission denied.*Make the folder writable once"):
        probe.load_bricks(folder)
    assert fills(probe) == {-1.0}  # nothing was loaded
    monkeypatch.undo()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert loaded(folder) == {1.0}  # writable again: the load finishes the save, then reads it


def test_a_load_removes_the_staging_of_a_save_killed_before_its_commit(tmp_path):
    folder = filled(0.0).save_bricks(tmp_path / "weights")
    pid = os.fork()
    if pid == 0:
        os.kill(os.getpid(), 9)  # a dead writer's pid, for the staging it left
    os.waitpid(pid, 0)
    left = folder / f".bricks.tbfx-{pid}-0123abcd.tmp"
    left.mkdir()
    (left / "b0.pt").write_bytes(b"half")
    assert loaded(folder) == {0.0}
    assert not left.exists()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_child_forked_while_the_lock_is_held_does_not_keep_it(tmp_path):
    import fcntl

    from torchbricks_fx.fileset import reading_set

    filled(0.0).save_bricks(tmp_path)
    started, signal = os.pipe()
    with reading_set(tmp_path, "bricks"):
        child = os.fork()  # a DataLoader worker forked meanwhile
        if child == 0:
            os.write(signal, b"1")  # the fork hooks have run by now
            time.sleep(3)
            os._exit(0)
    os.read(started, 1)
    descriptor = os.open(tmp_path / ".bricks.tbfx.lock", os.O_RDWR)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a save could take it now
    finally:
        os.close(descriptor)
        os.waitpid(child, 0)
        os.close(started)
        os.close(signal)


def is_locked(folder: Path) -> bool:
    import fcntl

    descriptor = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(descriptor)
    return False


def test_a_staging_folder_being_written_in_another_pid_namespace_is_left_alone(tmp_path):
    """A container sharing the volume: its writer's pid does not run here, but its lock on the staging
    folder is held, so the next access leaves the folder alone (and removes it once the writer is gone)."""
    import fcntl

    folder = filled(0.0).save_bricks(tmp_path / "weights")
    other = folder / ".bricks.tbfx-99999999-0123abcd.tmp"  # no such pid here
    other.mkdir()
    (other / "b0.pt").write_bytes(b"being written")
    ready, signal = os.pipe()
    done, finish = os.pipe()
    writer = os.fork()
    if writer == 0:
        descriptor = os.open(other, os.O_RDONLY)
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        os.write(signal, b"1")
        os.read(done, 1)
        os._exit(0)
    try:
        os.read(ready, 1)
        assert loaded(folder) == {0.0}
        assert (other / "b0.pt").read_bytes() == b"being written"
    finally:
        os.write(finish, b"1")
        assert exit_code(writer) == 0
        for end in (ready, signal, done, finish):
            os.close(end)
    assert loaded(folder) == {0.0}
    assert not other.exists()


def test_a_writer_holds_the_lock_of_its_staging_folder_until_it_is_done(tmp_path):
    from torchbricks_fx.files import staged_file

    with staged_file(tmp_path / "report.md", overwrite=False) as staged:
        staged.write_text("x")
        staging = staged.parent
        assert is_locked(staging)
    assert not staging.exists()
    assert (tmp_path / "report.md").read_text() == "x"
    assert not list(tmp_path.glob(".*"))  # nothing of the staging is left


def test_a_staging_folder_its_writer_could_not_lock_is_judged_by_its_pid(tmp_path, monkeypatch):
    """Where the writer's lock failed (no flock on that file system, no descriptor left), the folder's lock
    is free to anyone, so its name says so and the pid decides: a running writer's folder stays."""
    import subprocess

    from torchbricks_fx import staging
    from torchbricks_fx.staging import make_staging, release_staging, writer_gone

    monkeypatch.setattr(staging, "_lock", lambda folder: None)
    made = make_staging(tmp_path / "m.onnx", "tmp")
    assert made.name.endswith("-unlocked.tmp") and not writer_gone(made, "m.onnx")  # this process runs
    release_staging(made)
    monkeypatch.undo()

    writer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        unlocked = tmp_path / f".m.onnx.tbfx-{writer.pid}-0123abcd-unlocked.tmp"
        unlocked.mkdir()
        assert not writer_gone(unlocked, "m.onnx")
    finally:
        writer.kill()
        writer.wait()
    assert writer_gone(unlocked, "m.onnx")
