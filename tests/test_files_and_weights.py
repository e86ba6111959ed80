"""save_bricks in a folder the user shares with other files, kills while it writes, and the permissions of
the folders the library creates."""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from torchbricks_fx import BrickCollection, BrickError, BrickTrainable
from torchbricks_fx.files import staged_folder, staged_set, write_text


def dense(*names: str, seed: int = 0) -> BrickCollection:
    torch.manual_seed(seed)
    return BrickCollection({name: BrickTrainable(nn.Linear(2, 2), [f"in_{name}"], [f"out_{name}"]) for name in names})


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def visible(folder: Path) -> list[str]:
    return [name for name in listing(folder) if not name.startswith(".")]


def weight(folder: Path, brick: str) -> torch.Tensor:
    return torch.load(folder / f"{brick}.pt", weights_only=True)["model.weight"]


def user_files(folder: Path) -> None:
    folder.mkdir()
    (folder / "notes.txt").write_text("my precious notes")
    (folder / "other_model.ckpt").write_bytes(b"xx")
    (folder / "runs").mkdir()
    (folder / "runs" / "log.txt").write_text("log")


def assert_user_files(folder: Path) -> None:
    assert (folder / "notes.txt").read_text() == "my precious notes"
    assert (folder / "other_model.ckpt").read_bytes() == b"xx"
    assert (folder / "runs" / "log.txt").read_text() == "log"


# ------------------------------------------------------------------------------------------- other files
def test_save_bricks_keeps_the_other_files_of_the_folder(tmp_path):
    folder = tmp_path / "proj"
    user_files(folder)
    collection = dense("enc", "head")
    assert collection.save_bricks(folder) == folder
    assert visible(folder) == ["enc.pt", "head.pt", "notes.txt", "other_model.ckpt", "runs"]
    assert_user_files(folder)
    fresh = dense("enc", "head", seed=1)
    fresh.load_bricks(folder)
    assert torch.equal(fresh["enc"].model.weight, collection["enc"].model.weight)


def test_a_new_save_replaces_and_removes_only_the_previous_saves_files(tmp_path):
    folder = tmp_path / "proj"
    user_files(folder)
    dense("enc", "old_head").save_bricks(folder)
    newer = dense("enc", "new_head", seed=1)
    newer.save_bricks(folder)
    assert visible(folder) == ["enc.pt", "new_head.pt", "notes.txt", "other_model.ckpt", "runs"]
    assert torch.equal(weight(folder, "enc"), newer["enc"].model.weight)
    assert_user_files(folder)


def test_save_bricks_into_the_current_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("my precious notes")
    collection = dense("enc")
    collection.save_bricks(".")
    assert visible(tmp_path) == ["enc.pt", "notes.txt"]
    fresh = dense("enc", seed=1)
    fresh.load_bricks(".")
    assert torch.equal(fresh["enc"].model.weight, collection["enc"].model.weight)


def test_a_failed_save_changes_nothing_in_the_folder(tmp_path, monkeypatch):
    folder = tmp_path / "proj"
    user_files(folder)
    old = dense("enc", "head")
    old.save_bricks(folder)
    before = {name: (folder / name).read_bytes() for name in listing(folder) if (folder / name).is_file()}
    real_save, calls = torch.save, []

    def fail_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full")
        return real_save(*args, **kwargs)

    monkeypatch.setattr(torch, "save", fail_second)
    with pytest.raises(OSError, match="disk full"):
        dense("enc", "head", seed=1).save_bricks(folder)
    assert {name: (folder / name).read_bytes() for name in listing(folder) if (folder / name).is_file()} == before
    assert listing(folder) == sorted([*before, "runs"])  # no staging left


def test_a_brick_file_name_taken_by_a_folder_is_refused_before_any_change(tmp_path):
    folder = tmp_path / "proj"
    user_files(folder)
    (folder / "head.pt").mkdir()
    with pytest.raises(BrickError, match=r"\['head.pt'\] in .*proj: they are folders"):
        dense("enc", "head").save_bricks(folder)
    assert visible(folder) == ["head.pt", "notes.txt", "other_model.ckpt", "runs"]


# ------------------------------------------------------------------------------------------- kills
class Killed(BaseException):
    """A kill: nothing after it runs, not even the except/finally blocks that would clean up."""


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def kill_at(monkeypatch, step: int) -> None:
    """Kills the process at the ``step``-th rename, replace or unlink; after it every such call, and
    ``shutil.rmtree``, does nothing (the process is gone)."""
    state = {"calls": 0, "dead": False}

    def wrap(real):
        def call(*args, **kwargs):
            if state["dead"]:
                return None
            state["calls"] += 1
            if state["calls"] == step:
                state["dead"] = True
                raise Killed
            return real(*args, **kwargs)
        return call

    for name in ("rename", "replace", "unlink"):
        monkeypatch.setattr(os, name, wrap(getattr(os, name)))
    real_rmtree = shutil.rmtree
    monkeypatch.setattr(shutil, "rmtree", lambda *a, **k: None if state["dead"] else real_rmtree(*a, **k))


def as_dead_process(folder: Path) -> None:
    """Gives what the killed save left the name a dead process's would have."""
    mine, dead = f".bricks.tbfx-{os.getpid()}-", f".bricks.tbfx-{dead_pid()}-"
    for left in folder.glob(f"{mine}*"):
        left.rename(folder / left.name.replace(mine, dead))


@pytest.mark.parametrize("step", range(1, 7))  # 1: the commit point; 6: no kill
def test_a_save_killed_at_any_step_leaves_complete_old_or_new_weights(tmp_path, monkeypatch, step):
    folder = tmp_path / "proj"
    user_files(folder)
    old = dense("enc", "old_head")
    old.save_bricks(folder)
    new = dense("enc", "new_head", seed=1)
    kill_at(monkeypatch, step)
    with contextlib.suppress(Killed):
        new.save_bricks(folder)
    monkeypatch.undo()
    as_dead_process(folder)
    fresh = dense("enc", "new_head", seed=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the old weights lack new_head and have old_head
        fresh.load_bricks(folder)
    loaded = fresh["enc"].model.weight
    if torch.equal(loaded, old["enc"].model.weight):
        assert visible(folder) == ["enc.pt", "notes.txt", "old_head.pt", "other_model.ckpt", "runs"]
        assert torch.equal(weight(folder, "old_head"), old["old_head"].model.weight)
    else:
        assert torch.equal(loaded, new["enc"].model.weight)
        assert torch.equal(fresh["new_head"].model.weight, new["new_head"].model.weight)
        assert visible(folder) == ["enc.pt", "new_head.pt", "notes.txt", "other_model.ckpt", "runs"]
    assert_user_files(folder)
    new.save_bricks(folder)  # the next save cleans up after the killed one
    assert listing(folder) == [".bricks.tbfx.json", "enc.pt", "new_head.pt", "notes.txt", "other_model.ckpt",
                               "runs"]


# ------------------------------------------------------------------------------------------- permissions
@pytest.fixture
def umask_027():
    previous = os.umask(0o027)
    yield 0o750
    os.umask(previous)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_a_new_weights_folder_gets_the_umask_permissions(tmp_path, umask_027):
    folder = dense("enc").save_bricks(tmp_path / "weights")
    assert mode(folder) == umask_027


def test_a_staged_folder_gets_the_umask_permissions(tmp_path, umask_027):
    for overwrite in (False, True):  # new, then replacing (deploy bundles are written this way)
        with staged_folder(tmp_path / "bundle", overwrite=overwrite) as staging:
            (staging / "model.onnx").write_bytes(b"onnx")
        assert mode(tmp_path / "bundle") == umask_027


def test_a_failed_folder_write_leaves_no_folders_it_made(tmp_path):
    from torchbricks_fx.files import staged_folder

    with pytest.raises(RuntimeError, match="interrupted"), staged_folder(tmp_path / "new" / "sub" / "bundle", False):
        raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------- unwritable places
class WriteError(BrickError):
    """The error class a writer hands to files.py (exports, locks and bundles each have theirs)."""


def write_file(path: Path) -> None:
    write_text(path, "{}\n", error=WriteError)


def write_folder(path: Path) -> None:
    with staged_folder(path, False, WriteError) as staging:
        (staging / "model.onnx").write_bytes(b"onnx")


def write_set(path: Path) -> None:
    with staged_set(path, "bricks", WriteError) as staging:
        (staging / "enc.pt").write_bytes(b"pt")


@pytest.mark.parametrize("write", [write_file, write_folder, write_set])
def test_a_place_where_nothing_can_be_created_raises_the_writers_error_naming_the_destination(write):
    if not Path("/proc/self").is_dir():
        pytest.skip("needs /proc, a folder where no file can be created")
    with pytest.raises(WriteError, match=r"^Cannot write /proc/x\.out: ") as raised:
        write(Path("/proc/x.out"))
    assert ".tbfx" not in str(raised.value)  # not the hidden staging path


def test_a_failed_move_into_place_raises_the_writers_error_and_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "report.json"
    path.write_text("old\n")

    def disk_full(source: object, destination: object) -> None:
        raise OSError(28, "No space left on device", str(source))

    monkeypatch.setattr(os, "replace", disk_full)
    with pytest.raises(WriteError, match=f"^Cannot write {path}: No space left on device$"):
        write_text(path, "new\n", error=WriteError)
    assert path.read_text() == "old\n" and listing(tmp_path) == ["report.json"]
