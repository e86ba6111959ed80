"""Never silently wrong: what a new user ran into with bad input and interruptions, each pinned by a test."""

from __future__ import annotations

import contextlib
import json
import math
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from torchbricks_fx import (
    BrickCollection,
    BrickError,
    BrickExportError,
    BrickGraphError,
    BrickNotTrainable,
    BrickTrainable,
    Stage,
    export_onnx,
)
from torchbricks_fx.cli import main

ROOT = Path(__file__).resolve().parents[1]


class DataDependentBranch(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # right for positive inputs only, once traced
            return x * 2
        return x - 1


class Subtract(nn.Module):
    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a - b


def tiny(middle: nn.Module) -> BrickCollection:
    torch.manual_seed(0)
    return BrickCollection({
        "scale": BrickNotTrainable(lambda x: x * 0.5, input_names=["x"], output_names=["scaled"]),
        "middle": BrickTrainable(middle, input_names=["scaled"], output_names=["y"]),
    })


def dead_pid() -> int:
    """The pid of a process that has exited (its staging folders are stale)."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


# ------------------------------------------------------------------------------------------- wrong results
def test_legacy_tracer_warnings_are_errors_naming_the_brick(tmp_path):
    collection = tiny(DataDependentBranch())
    with pytest.raises(BrickExportError, match=r"(?s)brick 'middle'.*Converting a tensor to a Python boolean.*"
                                               r"accept_tracer_warnings=True"):
        export_onnx(collection, tmp_path / "m.onnx", {"x": torch.rand(2, 4)}, dynamo=False)
    assert list(tmp_path.iterdir()) == []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = export_onnx(collection, tmp_path / "m.onnx", {"x": torch.rand(2, 4)}, dynamo=False,
                             accept_tracer_warnings=True)  # explicitly accepted: written, verified on positives
    assert report.verified


def test_the_dynamo_hint_no_longer_sends_data_dependent_bricks_to_the_legacy_tracer(tmp_path):
    with pytest.raises(BrickExportError, match="brick 'middle'") as info:
        export_onnx(tiny(DataDependentBranch()), tmp_path / "m.onnx", {"x": torch.rand(2, 4)})
    assert "dynamo=False" not in str(info.value)


@pytest.mark.parametrize("argument", ["input_names", "output_names"])
def test_unordered_names_are_refused(argument):
    names = {"input_names": ["a", "b"], "output_names": ["d"]}
    names[argument] = {"a", "b"} if argument == "input_names" else {"d", "e"}
    with pytest.raises(BrickGraphError, match=rf"{argument} must be ordered \(a list or tuple\), not a set"):
        BrickTrainable(Subtract(), **names)


def test_a_requested_opset_is_honoured_or_refused(tmp_path, capsys):
    collection = tiny(nn.ReLU())
    with pytest.raises(BrickExportError, match="opset"):
        export_onnx(collection, tmp_path / "m.onnx", {"x": torch.rand(2, 4)}, opset=3)
    assert not (tmp_path / "m.onnx").exists()
    build = tmp_path / "model.py"
    build.write_text(textwrap.dedent("""
        import torch
        from torch import nn
        from torchbricks_fx import BrickCollection, BrickTrainable

        def build():
            return BrickCollection({"relu": BrickTrainable(nn.ReLU(), ["x"], ["y"])}), {"x": torch.rand(2, 4)}
    """))
    assert main(["export", str(build), "-o", str(tmp_path / "cli.onnx"), "--opset", "99"]) == 1
    assert "opset" in capsys.readouterr().err and not (tmp_path / "cli.onnx").exists()
    report = export_onnx(collection, tmp_path / "m.onnx", {"x": torch.rand(2, 4)}, opset=18)
    assert report.opset == 18


# ------------------------------------------------------------------------------------------- naming the brick
BOOM = """
import torch
from torch import nn
from torchbricks_fx import BrickCollection, BrickTrainable

class Boom(nn.Module):
    def forward(self, x):
        raise RuntimeError("boom in forward")

def build():
    return BrickCollection({"ok": BrickTrainable(nn.Identity(), ["x"], ["y"]),
                            "broken": BrickTrainable(Boom(), ["y"], ["z"])}), {"x": torch.rand(2, 4)}
"""


@pytest.mark.parametrize("command", [["export", "-o", "{d}/m.onnx"], ["bench", "--backends", "fx",
                                                                      "--min-run-time", "0.01", "--profile"]])
def test_cli_errors_name_the_brick(tmp_path, capsys, command):
    (tmp_path / "boom.py").write_text(BOOM)
    code = main([command[0], str(tmp_path / "boom.py"), *[a.format(d=tmp_path) for a in command[1:]]])
    captured = capsys.readouterr()
    assert code == 1
    assert "boom in forward" in captured.err + captured.out
    assert "(raised in brick 'broken')" in captured.err + captured.out


def test_a_failed_dynamo_export_keeps_its_dumps_out_of_the_terminal(tmp_path, capfd):
    (tmp_path / "branchy.py").write_text(textwrap.dedent("""
        import torch
        from torch import nn
        from torchbricks_fx import BrickCollection, BrickTrainable

        class Branchy(nn.Module):
            def forward(self, x):
                if x.sum() > 0:
                    return x * 2
                return x - 1

        def build():
            return BrickCollection({"branchy": BrickTrainable(Branchy(), ["x"], ["y"])}), {"x": torch.rand(2, 4)}
    """))
    assert main(["export", str(tmp_path / "branchy.py"), "-o", str(tmp_path / "m.onnx")]) == 1
    err = capfd.readouterr().err
    assert "brick 'branchy'" in err and len(err.strip().splitlines()) < 15, err
    log = Path(err.split("full output is in ")[1].split(")")[0])
    assert log.is_file() and log.stat().st_size > 0
    log.unlink()


# ------------------------------------------------------------------------------------------- weights files
@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 truncated", os.urandom(256)],
                         ids=["empty", "truncated", "random"])
def test_load_bricks_names_the_file_and_brick_of_a_damaged_file(tmp_path, content):
    collection = BrickCollection({"dense": BrickTrainable(nn.Linear(2, 2), ["x"], ["y"])})
    folder = collection.save_bricks(tmp_path / "weights")
    (folder / "dense.pt").write_bytes(content)
    with pytest.raises(BrickError, match=r"brick 'dense' from '.*dense\.pt'.*nothing was loaded"):
        collection.load_bricks(folder)


def test_a_brick_key_too_long_for_a_file_name_saves_and_loads(tmp_path):
    key = "k" * 300
    collection = BrickCollection({key: BrickTrainable(nn.Linear(2, 2), ["x"], ["y"])})
    folder = collection.save_bricks(tmp_path / "weights")
    other = BrickCollection({key: BrickTrainable(nn.Linear(2, 2), ["x"], ["y"])})
    other.load_bricks(folder)
    assert torch.equal(other[key].model.weight, collection[key].model.weight)


def test_keys_that_shadow_module_attributes_are_refused_clearly():
    with pytest.raises(BrickGraphError, match=r"'training' clashes with the nn\.Module attribute"):
        BrickCollection({"training": BrickTrainable(nn.Identity(), ["x"], ["y"])})


def test_mermaid_keeps_names_apart_that_differ_in_dropped_characters():
    collection = BrickCollection({
        "a b": BrickTrainable(nn.Identity(), ["x"], ["c|d"]),
        "a_b": BrickTrainable(nn.Identity(), ["c|d"], ["out"]),
    })
    text = collection.to_mermaid(Stage.INFERENCE)
    assert "b_a_b[" in text and "b_a_b_1[" in text  # two nodes
    assert "c#124;d" in text and "|c|d|" not in text  # the pipe does not end the edge label


# ------------------------------------------------------------------------------------------- interruptions
class Killed(BaseException):
    """A kill: nothing after it runs, not even except/finally blocks that would repair the folder."""


def _killing_rename(real, kill_at: int):
    calls = {"n": 0, "dead": False}

    def rename(source, destination):
        if calls["dead"]:
            return None  # the process is gone: no more renames, repairs included
        calls["n"] += 1
        if calls["n"] == kill_at:
            calls["dead"] = True
            raise Killed
        return real(source, destination)

    return rename


@pytest.mark.parametrize("exchange", [True, False], ids=["atomic-exchange", "two-renames"])
@pytest.mark.parametrize("kill_at", [1, 2, 3])
def test_save_bricks_killed_at_any_step_leaves_complete_weights(tmp_path, monkeypatch, exchange, kill_at):
    from torchbricks_fx import files

    collection = BrickCollection({"dense": BrickTrainable(nn.Linear(2, 2), ["x"], ["y"])})
    folder = collection.save_bricks(tmp_path / "weights")
    old = collection["dense"].model.weight.detach().clone()
    with torch.no_grad():
        collection["dense"].model.weight.add_(1.0)
    new = collection["dense"].model.weight.detach().clone()
    real_rename = os.rename
    if not exchange:
        monkeypatch.setattr(files, "_exchange", lambda first, second: False)
    else:
        real_exchange = files._exchange
        monkeypatch.setattr(files, "_exchange", lambda first, second: (_ for _ in ()).throw(Killed)
                            if kill_at == 1 else real_exchange(first, second))
    monkeypatch.setattr(os, "rename", _killing_rename(real_rename, kill_at if not exchange else 99))
    with contextlib.suppress(Killed):
        collection.save_bricks(folder)
    monkeypatch.undo()
    fresh = BrickCollection({"dense": BrickTrainable(nn.Linear(2, 2), ["x"], ["y"])})
    fresh.load_bricks(folder)  # complete old or complete new weights, never none
    loaded = fresh["dense"].model.weight
    assert torch.equal(loaded, old) or torch.equal(loaded, new)
    collection.save_bricks(folder)  # the next save cleans up after the killed one
    assert sorted(p.name for p in tmp_path.iterdir()) == ["weights"]


def test_an_export_removes_stale_staging_folders_of_killed_exports(tmp_path):
    stale = tmp_path / f".m.onnx.tbfx-{dead_pid()}-abc.tmp"
    stale.mkdir()
    (stale / "m.onnx").write_bytes(b"partial")
    export_onnx(tiny(nn.ReLU()), tmp_path / "m.onnx", {"x": torch.rand(2, 4)})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


@pytest.mark.parametrize(("make", "message"), [
    (lambda d: (d / "m.onnx").mkdir(), "it is a folder"),
    (lambda d: (d / "parent").write_text("a file"), "is a file, not a folder"),
])
def test_export_to_an_unwritable_path_fails_before_any_work(tmp_path, make, message):
    make(tmp_path)
    target = tmp_path / "m.onnx" if message == "it is a folder" else tmp_path / "parent" / "m.onnx"
    with pytest.raises(BrickExportError, match=message):
        export_onnx(BrickCollection({"boom": BrickTrainable(nn.Identity(), ["x"], ["y"])}), target,
                    {"wrong name": torch.rand(2)})  # the destination is checked before the inputs


# ------------------------------------------------------------------------------------------- bench arguments
CHAIN = """
import torch
from torch import nn
from torchbricks_fx import BrickCollection, BrickTrainable

def build():
    return BrickCollection({"a": BrickTrainable(nn.Linear(4, 4), ["x"], ["y"])}), {"x": torch.randn(2, 4)}
"""


@pytest.mark.parametrize(("extra", "fragment", "code"), [
    (["--json", "{d}"], "it is a folder", 2),
    (["--json", "{d}/existing.json"], "already exists", 1),
    (["--plot", "{d}/latency.bmpx"], "not an image type", 2),
    (["--min-run-time", "inf"], "--min-run-time must be positive and finite", 2),
    (["--min-run-time", "nan"], "--min-run-time must be positive and finite", 2),
    (["--batch-sizes", str(2**40)], "does not fit in memory", 2),
])
def test_bench_refuses_bad_destinations_and_values_before_benchmarking(tmp_path, capsys, extra, fragment, code):
    (tmp_path / "chain.py").write_text(CHAIN)
    (tmp_path / "existing.json").write_text("{}")
    argv = ["bench", str(tmp_path / "chain.py"), "--backends", "eager", "--min-run-time", "0.01",
            *[a.format(d=tmp_path) for a in extra]]
    assert main(argv) == code
    captured = capsys.readouterr()
    assert fragment in captured.err and "[bench] eager batch" not in captured.err
    assert json.loads((tmp_path / "existing.json").read_text()) == {}


# ------------------------------------------------------------------------------------------- speed a user feels
def _python(code: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)


def test_help_and_argument_errors_import_no_torch():
    done = _python("import sys\nfrom torchbricks_fx.cli import main\n"
                   "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
                   "try:\n    main(['bench'])\nexcept SystemExit:\n    pass\n"
                   "print('torch' in sys.modules)")
    assert done.stdout.strip().splitlines()[-1] == "False", done.stderr


def test_importing_the_package_imports_nothing_heavy():
    done = _python("import sys\nimport torchbricks_fx\nbare = 'torch' in sys.modules\n"
                   "from torchbricks_fx import BrickCollection, compile_stage\n"
                   "heavy = [m for m in ('torch._dynamo', 'onnx', 'onnxruntime', 'torchvision') if m in sys.modules]\n"
                   "print(bare, heavy)")
    assert done.stdout.strip() == "False []", done.stderr


# ------------------------------------------------------------------------------------------- benchmark tables
def test_tables_state_threads_load_and_measurements_and_warn_on_overload(monkeypatch):
    from torchbricks_fx import benchmark
    from torchbricks_fx.reporting import to_markdown

    monkeypatch.setattr(os, "getloadavg", lambda: (64.0, 64.0, 64.0))
    collection = BrickCollection({"a": BrickTrainable(nn.Linear(4, 4), ["x"], ["y"])})
    with pytest.warns(UserWarning, match="load .* exceeds its .* cores"):
        results = benchmark(collection, {"x": torch.randn(2, 4)}, backends=["eager"], threads=1, min_run_time=0.01)
    lines: list[str] = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # given a progress callback, the warning is its line, not a second copy
        benchmark(collection, {"x": torch.randn(2, 4)}, backends=["eager"], threads=1, min_run_time=0.01,
                  progress=lines.append)
    assert sum("warning: The machine's load (64.0) exceeds" in line for line in lines) == 1
    table = to_markdown(results)
    assert "| n |" in table and f"| {results[0].runs} |" in table and results[0].runs >= 1
    assert "1 thread(s), load 64.0 on" in table and "LOAD ABOVE THE CORES" in table
    assert math.isclose(results[0].load_average or 0.0, 64.0)


# ------------------------------------------------------------------------------------------- argument types
def _wrong_type_calls(tmp_path: Path) -> list[tuple[object, str]]:
    from torchbricks_fx import deploy, export_onnx
    from torchbricks_fx.lockfile import lock
    from torchbricks_fx.lockfile_format import read_lock, write_lock
    from torchbricks_fx.reporting import plot, results_from_json, to_json, to_markdown
    from torchbricks_fx.weights import load_bricks, save_bricks

    collection = BrickCollection({"a": BrickTrainable(nn.Linear(4, 4), ["x"], ["y"])})
    x = {"x": torch.randn(2, 4)}
    return [
        (lambda: save_bricks(collection, None), "save_bricks' folder must be a path (str or os.PathLike), not None"),
        (lambda: load_bricks(collection, 3), "load_bricks' folder must be a path (str or os.PathLike), not 3"),
        (lambda: export_onnx(collection, None, x), "The export's path must be a path"),
        (lambda: deploy(collection, None, x, max_metric_drop=None), "deploy's folder must be a path"),
        (lambda: deploy(collection, tmp_path / "b", x, max_metric_drop=None, batch_sizes=4),
         "batch_sizes must be a list of batch sizes"),
        (lambda: read_lock(None), "read_lock's path must be a path"),
        (lambda: write_lock(lock(collection, x), 7), "write_lock's path must be a path"),
        (lambda: write_lock("lock", tmp_path / "l.json"), "write_lock takes a Lock"),
        (lambda: to_markdown("eager"), "to_markdown takes the list of BenchmarkResults"),
        (lambda: to_json("eager"), "to_json takes the list of BenchmarkResults"),
        (lambda: plot("eager", tmp_path / "p.png"), "plot takes the list of BenchmarkResults"),
        (lambda: results_from_json("{not json"), "Not torchbricks_fx benchmark JSON: "),
        (lambda: results_from_json('{"schema": "torchbricks_fx.benchmark/1"}'), "malformed results"),
        (lambda: results_from_json('{"schema": "torchbricks_fx.benchmark/1", "results": [{"backend": "eager"}]}'),
         "malformed results"),
    ]


def test_arguments_of_the_wrong_type_are_the_librarys_errors_naming_the_argument(tmp_path):
    for call, message in _wrong_type_calls(tmp_path):
        with pytest.raises(BrickError) as caught:
            call()
        assert message in str(caught.value), (message, str(caught.value))
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_rendering_takes_any_iterable_of_results():
    from torchbricks_fx import benchmark
    from torchbricks_fx.reporting import results_from_json, to_json

    collection = BrickCollection({"a": BrickTrainable(nn.Linear(4, 4), ["x"], ["y"])})
    results = benchmark(collection, {"x": torch.randn(2, 4)}, backends=["eager", "fx"], threads=1, min_run_time=0.01)
    assert results_from_json(to_json(r for r in results if r.backend == "fx")) == results[1:]
