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
from torchbricks_fx.files import staged_folder, write_text
from torchbricks_fx.fileset import staged_set


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
    with pytest.raises(BrickError, match=r"brick 'head' to '.*proj/head\.pt': OSError: disk full; nothing was changed"):
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
    assert listing(folder) == [".bricks.tbfx.json", ".bricks.tbfx.lock", "enc.pt", "new_head.pt", "notes.txt",
                               "other_model.ckpt", "runs"]


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


# ------------------------------------------------------------------------------------------- loading
def test_a_full_disk_while_saving_names_the_brick_and_folder_and_keeps_the_old_weights(tmp_path):
    resource = pytest.importorskip("resource")
    import signal

    folder = tmp_path / "proj"
    old = BrickCollection({"big": BrickTrainable(nn.Linear(256, 256), ["x"], ["y"])})
    old.save_bricks(folder)
    limits, handler = resource.getrlimit(resource.RLIMIT_FSIZE), signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, limits[1]))  # writes past 100 kB fail, like a full disk
    try:
        with pytest.raises(BrickError, match=rf"^Cannot write the weights of brick 'big' to '{folder}/big\.pt': "
                                             rf"File too large; nothing was changed at '{folder}'\.$"):
            BrickCollection({"big": BrickTrainable(nn.Linear(256, 256), ["x"], ["y"])}).save_bricks(folder)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, handler)
    assert torch.equal(weight(folder, "big"), old["big"].model.weight)
    assert listing(folder) == [".bricks.tbfx.json", "big.pt"]  # no staging left


@pytest.mark.filterwarnings("ignore:Validating sparse tensor invariants")
@pytest.mark.parametrize(("value", "problem"), [
    ([1.0, 2.0], "is a list in the file, not a tensor"),
    (torch.zeros(2, 2).to_sparse(), "has layout torch.sparse_coo in the file, torch.strided in the brick"),
    (torch.zeros(2, 2, device="meta"), "is a meta tensor in the file"),
    (torch.zeros(2, 2, dtype=torch.complex64), "has dtype torch.complex64 in the file, which does not convert"),
], ids=["list", "sparse", "meta", "complex"])
def test_a_value_that_cannot_load_is_refused_before_any_brick_loads(tmp_path, value, problem):
    folder = dense("enc", "head").save_bricks(tmp_path / "proj")
    torch.save({"model.weight": value, "model.bias": torch.zeros(2)}, folder / "head.pt")
    fresh = dense("enc", "head", seed=1)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(BrickError, match=rf"nothing was loaded:\n- brick 'head': model\.weight {problem}"):
        fresh.load_bricks(folder)
    assert all(torch.equal(before[k], v) for k, v in fresh.state_dict().items())  # not even 'enc'


def test_a_brick_failing_to_load_after_the_checks_puts_the_loaded_ones_back(tmp_path):
    folder = dense("enc", "head").save_bricks(tmp_path / "proj")
    fresh = dense("enc", "head", seed=1)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}

    def refuse(module: nn.Module, keys: object) -> None:
        raise RuntimeError("my hook refuses")

    fresh["head"].model.register_load_state_dict_post_hook(refuse)
    with pytest.raises(BrickError, match=r"brick 'head': RuntimeError: my hook refuses; nothing was loaded"):
        fresh.load_bricks(folder)
    assert all(torch.equal(before[k], v) for k, v in fresh.state_dict().items())


def test_load_bricks_fills_lazy_modules_as_load_state_dict_does(tmp_path):
    def lazy() -> BrickCollection:
        return BrickCollection({"enc": BrickTrainable(nn.Linear(2, 3), ["x"], ["h"]),
                                "head": BrickTrainable(nn.LazyLinear(2), ["h"], ["y"])})

    trained = lazy()
    trained(named_inputs={"x": torch.ones(1, 2)}, stage="inference")  # initializes the lazy layer
    folder = trained.save_bricks(tmp_path / "proj")
    fresh = lazy()
    fresh.load_bricks(folder)
    assert torch.equal(fresh["head"].model.weight, trained["head"].model.weight)


def test_a_folder_with_no_file_for_any_brick_is_an_error_naming_files_and_bricks(tmp_path):
    folder = dense("enc", "head").save_bricks(tmp_path / "proj")
    renamed = dense("encoder", "classifier", seed=1)
    with pytest.raises(BrickError, match=rf"No weights file in '{folder}' matches a brick.*\['enc\.pt', 'head\.pt'\]"
                                         r".*\['encoder', 'classifier'\]"):
        renamed.load_bricks(folder)


# ------------------------------------------------------------------------------------------- files.py
def test_a_folder_made_meanwhile_by_someone_else_is_not_replaced_without_overwrite(tmp_path):
    bundle = tmp_path / "bundle"
    with pytest.raises(BrickError, match="bundle already exists; pass overwrite=True"), \
            staged_folder(bundle, overwrite=False) as staging:
        (staging / "mine.txt").write_text("mine")
        bundle.mkdir()
        (bundle / "theirs.txt").write_text("theirs")  # another process's finished bundle
    assert listing(bundle) == ["theirs.txt"] and listing(tmp_path) == ["bundle"]
    with staged_folder(tmp_path / "empty", overwrite=False) as staging:  # an empty one loses nothing: replaced
        (staging / "mine.txt").write_text("mine")
        (tmp_path / "empty").mkdir()
    assert listing(tmp_path / "empty") == ["mine.txt"]


@pytest.mark.parametrize("name", ["model[1].onnx", "run*.json", "bundle[v2]"])
def test_staging_left_by_a_killed_write_is_removed_also_when_the_name_has_glob_characters(tmp_path, name):
    left = tmp_path / f".{name}.tbfx-{dead_pid()}-0123abcd.tmp"
    left.mkdir()
    (left / name).write_bytes(b"half")
    if "." in name:
        write_text(tmp_path / name, "{}\n")
    else:
        with staged_folder(tmp_path / name, overwrite=True) as staging:
            (staging / "m").write_text("ok")
    assert listing(tmp_path) == [name]


def test_staged_files_are_flushed_to_disk_before_they_are_moved_in(tmp_path, monkeypatch):
    if not Path("/proc/self/fd").is_dir():
        pytest.skip("names the flushed files through /proc")
    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(descriptor: int) -> None:
        events.append("fsync " + os.readlink(f"/proc/self/fd/{descriptor}"))
        real_fsync(descriptor)

    def replace(source: object, destination: object) -> None:
        events.append(f"move {destination}")
        real_replace(source, destination)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    write_text(tmp_path / "lock.json", "{}\n")
    move = events.index(f"move {tmp_path / 'lock.json'}")
    assert any(e.startswith("fsync ") and e.endswith("/lock.json") for e in events[:move])  # the staged file
    assert f"fsync {tmp_path}" in events[move:]  # the folder's new entry


def test_replacing_a_linked_folder_leaves_no_hidden_entry(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "old.txt").write_text("old")
    (tmp_path / "bundle").symlink_to(tmp_path / "real")
    with staged_folder(tmp_path / "bundle", overwrite=True) as staging:
        (staging / "new.txt").write_text("new")
    assert listing(tmp_path) == ["bundle", "real"]
    assert listing(tmp_path / "bundle") == ["new.txt"] and listing(tmp_path / "real") == ["old.txt"]


def test_a_file_system_that_refuses_fsync_still_gets_its_files_but_a_failing_disk_is_an_error(tmp_path, monkeypatch):
    import errno

    from torchbricks_fx.files import write_text

    def refused(descriptor):
        raise OSError(errno.EINVAL, "Invalid argument")  # FUSE, SMB, or Windows on a read-only handle

    monkeypatch.setattr(os, "fsync", refused)
    assert write_text(tmp_path / "a.txt", "kept").read_text() == "kept"

    def failing(descriptor):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fsync", failing)
    with pytest.raises(BrickError, match=r"Cannot write .*b\.txt: Input/output error"):
        write_text(tmp_path / "b.txt", "lost")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


def test_meta_bricks_load_as_load_state_dict_does(tmp_path):
    source = BrickCollection({"a": BrickTrainable(nn.Linear(3, 2), ["x"], ["y"])})
    source.save_bricks(tmp_path)
    with torch.device("meta"):
        target = BrickCollection({"a": BrickTrainable(nn.Linear(3, 2), ["x"], ["y"])})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch: copying into a meta parameter is a no-op
        target.load_bricks(tmp_path)
    assert target["a"].model.weight.is_meta


def test_a_failed_load_names_the_bricks_it_could_not_put_back(tmp_path):
    def two_bricks(first: nn.Module) -> BrickCollection:
        return BrickCollection({"a": BrickTrainable(first, ["x"], ["h"]),
                                "b": BrickTrainable(nn.Linear(2, 2), ["h"], ["y"])})

    two_bricks(nn.Linear(3, 2)).save_bricks(tmp_path)
    target = two_bricks(nn.LazyLinear(2))  # no weights to put back

    def refuse(module, incompatible_keys):
        raise RuntimeError("load hook refuses")

    target["b"].register_load_state_dict_post_hook(refuse)
    with pytest.raises(BrickError, match=r"brick 'b'.*load hook refuses; the other bricks were put back, but "
                                         r"\['a'\] keep the new weights"):
        target.load_bricks(tmp_path)
