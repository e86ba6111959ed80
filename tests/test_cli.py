"""torchbricks-fx: every command and its error paths (in-process through ``main``, once as a subprocess)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from torchbricks_fx.cli import main

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = str(ROOT / "examples" / "cli_model.py")
STAGES = ("train", "validation", "test", "inference", "export")


@pytest.fixture
def user_files(tmp_path: Path) -> Path:
    (tmp_path / "models.py").write_text(textwrap.dedent("""
        import torch
        from torch import nn
        from torchbricks_fx import BrickCollection, BrickTrainable
        from helper import WIDTH  # a neighbour module: the file's folder is importable

        def chain():
            import helper  # still importable while build runs

            assert helper.WIDTH == WIDTH
            return BrickCollection({"a": BrickTrainable(nn.Linear(WIDTH, WIDTH), ["x"], ["y"]),
                                    "b": BrickTrainable(nn.ReLU(), ["y"], ["z"])}), {"x": torch.randn(2, WIDTH)}

        def duplicate():
            return BrickCollection({"a": BrickTrainable(nn.Linear(4, 4), ["x"], ["y"]),
                                    "b": BrickTrainable(nn.Linear(4, 4), ["x"], ["y"])}), {"x": torch.randn(2, 4)}

        def not_a_pair():
            return 3

        def raises():
            raise RuntimeError("cannot build today")
    """))
    (tmp_path / "helper.py").write_text("WIDTH = 4\n")
    (tmp_path / "broken_import.py").write_text("import module_that_does_not_exist\n")
    return tmp_path


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_user_error(code: int, err: str, *fragments: str) -> None:
    assert code == 2
    assert "Traceback" not in err
    assert err.startswith("torchbricks-fx ") and ": error: " in err
    assert "\n\n" not in err.strip()  # one paragraph
    for fragment in fragments:
        assert fragment in err


# ------------------------------------------------------------------------------------------- inspect
def test_inspect_prints_every_stage(capsys):
    code, out, _ = run(capsys, "inspect", EXAMPLE)
    assert code == 0
    for stage in STAGES:
        assert f"stage {stage}\n" in out
    assert "bricks:   preprocessor -> backbone -> head -> loss" in out
    assert "inputs:   raw, targets" in out
    assert "- loss: dead in stage inference" in out
    assert "example inputs: raw [2, 3, 16, 16] float32, targets [2] int64" in out


def test_inspect_one_stage_with_outputs_and_mermaid(capsys):
    code, out, _ = run(capsys, "inspect", EXAMPLE, "--stage", "inference", "--outputs", "features", "--mermaid")
    assert code == 0
    assert "stage train" not in out and "outputs:  features" in out
    assert "- head: not needed for the requested outputs ['features']" in out
    assert "```mermaid\nflowchart LR" in out and out.rstrip().endswith("```")


def test_inspect_reports_validation_problems_with_exit_code_1(capsys, user_files):
    code, out, err = run(capsys, "inspect", f"{user_files}/models.py:duplicate")
    assert code == 1
    assert out.count("produced by more than one live brick") == len(STAGES)
    assert "validation problem(s) found" in err and "Traceback" not in err


def test_function_other_than_build_and_neighbour_imports(capsys, user_files):
    code, out, _ = run(capsys, "inspect", f"{user_files}/models.py:chain", "--stage", "export")
    assert code == 0 and "bricks:   a -> b" in out


@pytest.mark.parametrize(("argv", "fragments"), [
    (["inspect", "missing.py"], ["No such file: 'missing.py'", "build()"]),
    (["inspect", "{d}/models.py"], ["defines no function 'build'", "chain, duplicate, not_a_pair, raises"]),
    (["inspect", "{d}/models.py:nope"], ["defines no function 'nope'"]),
    (["inspect", "{d}/models.py:not_a_pair"], ["must return (collection, example_named_inputs)", "type int"]),
    (["inspect", "{d}/models.py:raises"], ["raises() in", "RuntimeError: cannot build today"]),
    (["inspect", "{d}/broken_import.py"], ["Importing", "ModuleNotFoundError"]),
    (["inspect", "{d}/models.py:chain", "--stage", "deploy"], ["Unknown stage 'deploy'", "valid stages: train"]),
    (["inspect", "{d}/models.py:chain", "--outputs", "nope"], []),  # reported per stage, see below
])
def test_inspect_user_errors(capsys, user_files, argv, fragments):
    code, out, err = run(capsys, *[a.format(d=user_files) for a in argv])
    if argv[-1] == "nope" and argv[-2] == "--outputs":
        assert code == 1 and "Requested output 'nope'" in out
        return
    assert_user_error(code, err, *fragments)


# ------------------------------------------------------------------------------------------- export
def test_export_writes_a_verified_onnx_file(capsys, tmp_path):
    target = tmp_path / "model.onnx"
    code, out, err = run(capsys, "export", EXAMPLE, "--stage", "export", "-o", str(target), "--outputs",
                         "logits,probabilities")
    assert code == 0 and target.is_file()
    assert "model.onnx" in out and "| logits |" in out and "dynamic batch: True" in out
    assert "exporting stage export" in err

    # export_onnx refuses an existing file before any export work: a BrickExportError, so exit code 1.
    code, _, err = run(capsys, "export", EXAMPLE, "-o", str(target))
    assert code == 1 and "already exists; pass --overwrite to replace it" in err and "Traceback" not in err
    assert "overwrite=True" not in err  # the Python API's wording, not the command line's

    code, out, _ = run(capsys, "export", EXAMPLE, "-o", str(target), "--overwrite", "--no-dynamic-batch")
    assert code == 0 and "dynamic batch: False" in out


@pytest.mark.parametrize(("argv", "fragments"), [
    (["export", "{d}/models.py:duplicate", "-o", "{d}/x.onnx"], ["produced by more than one live brick"]),
    (["export", "{d}/models.py:chain", "-o", "{d}/x.onnx", "--outputs", "nope"], ["'nope'"]),
    (["export", "{d}/models.py:chain", "-o", "{d}/x.onnx", "--stage", "deploy"], ["Unknown stage"]),
    (["export", "missing.py", "-o", "{d}/x.onnx"], ["No such file"]),
])
def test_export_user_errors(capsys, user_files, argv, fragments):
    code, _, err = run(capsys, *[a.format(d=user_files) for a in argv])
    assert_user_error(code, err, *fragments)
    assert not (user_files / "x.onnx").exists()


def test_export_requires_an_output_path(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["export", EXAMPLE])
    assert exit_info.value.code == 2
    assert "-o/--output" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- bench
def test_bench_prints_a_table_progress_json_and_plot(capsys, tmp_path):
    pytest.importorskip("matplotlib")
    out_json, out_png = tmp_path / "out" / "bench.json", tmp_path / "bench.png"
    code, out, err = run(capsys, "bench", EXAMPLE, "--backends", "eager,fx", "--batch-sizes", "1,4",
                         "--min-run-time", "0.01", "--threads", "1", "--json", str(out_json), "--plot", str(out_png),
                         "--profile")
    assert code == 0
    assert out.startswith("| backend | device | batch |")
    assert out.count("| eager | cpu |") == 2 and out.count("| fx | cpu |") == 2
    assert "| brick | median ms |" in out and "| backbone |" in out
    assert "[bench] eager batch 1:" in err and "[bench] fx batch 4:" in err
    data = json.loads(out_json.read_text())
    assert data["schema"] == "torchbricks_fx.benchmark/1"
    assert [(r["backend"], r["batch_size"], r["threads"]) for r in data["results"]] == [
        ("eager", 1, 1), ("eager", 4, 1), ("fx", 1, 1), ("fx", 4, 1)]
    assert out_png.read_bytes()[:4] == b"\x89PNG"


def test_bench_writes_json_and_plot_before_profiling(capsys, tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from torchbricks_fx import benchmarking

    def failing_profile(*args: object, **kwargs: object) -> None:
        raise RuntimeError("profiling broke")

    monkeypatch.setattr(benchmarking, "profile_bricks", failing_profile)
    out_json, out_png = tmp_path / "bench.json", tmp_path / "bench.png"
    code, out, err = run(capsys, "bench", EXAMPLE, "--backends", "eager", "--min-run-time", "0.01", "--json",
                         str(out_json), "--plot", str(out_png), "--profile")
    assert code == 1 and "RuntimeError: profiling broke" in err
    assert out.startswith("| backend | device | batch |")
    assert [r["backend"] for r in json.loads(out_json.read_text())["results"]] == ["eager"]
    assert out_png.read_bytes()[:4] == b"\x89PNG"


def test_help_examples_name_the_real_subcommands(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    examples = [line.split()[1] for line in out.splitlines() if line.strip().startswith("torchbricks-fx ")]
    assert examples == ["inspect", "export", "bench", "deploy", "lock", "check"]


def test_bench_backends_default_is_the_librarys(capsys):
    from torchbricks_fx.backends import DEFAULT_BACKENDS
    from torchbricks_fx.cli import _parser

    assert _parser().parse_args(["bench", "model.py"]).backends == ",".join(DEFAULT_BACKENDS)
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    assert f"default: {','.join(DEFAULT_BACKENDS)}" in " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize(("argv", "fragments"), [
    (["--backends", "eager,tensorrt"], ["Unknown backend(s) 'tensorrt'", "valid backends: eager, fx, compile"]),
    (["--backends", "cudagraphs"], ["need device='cuda'"]),
    (["--device", "tpu"], ["valid devices"]),
    (["--stage", "deploy"], ["Unknown stage 'deploy'"]),
    (["--batch-sizes", "1,x"], ["--batch-sizes must be comma-separated positive integers"]),
    (["--batch-sizes", "0"], ["positive integers"]),
    (["--threads", "0"], ["threads must be a positive integer"]),
    (["--min-run-time", "0"], ["--min-run-time must be positive"]),
    (["--outputs", "nope"], ["Requested output 'nope'"]),
])
def test_bench_user_errors(capsys, user_files, argv, fragments):
    code, out, err = run(capsys, "bench", f"{user_files}/models.py:chain", "--min-run-time", "0.01", *argv)
    assert_user_error(code, err, *fragments)
    assert out == ""


def test_bench_invalid_collection_is_a_user_error(capsys, user_files):
    code, _, err = run(capsys, "bench", f"{user_files}/models.py:duplicate", "--backends", "eager")
    assert_user_error(code, err, "produced by more than one live brick", "Hint:")


def test_traceback_flag_shows_the_real_exception(capsys):
    with pytest.raises(Exception, match="No such file"):
        main(["inspect", "missing.py", "--traceback"])


def test_unknown_command_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["deploy", EXAMPLE])
    assert exit_info.value.code == 2


# ------------------------------------------------------------------------------------------- deploy's arguments
DEPLOY_MODEL = """
    from pathlib import Path

    import torch
    from torch import nn
    from torchmetrics.classification import MulticlassAccuracy
    from torchbricks_fx import BrickCollection, BrickMetricSingle, BrickTrainable

    def build():
        Path(__file__).with_name("build_ran").touch()  # a real build() may train for minutes
        return BrickCollection({"head": BrickTrainable(nn.Linear(4, 3), ["x"], ["logits"]),
                                "accuracy": BrickMetricSingle(MulticlassAccuracy(num_classes=3),
                                                              ["logits", "targets"])}), {"x": torch.randn(2, 4)}

    def validation():
        return [{"x": torch.randn(2, 4), "targets": torch.tensor([0, 1])}]

    def without_targets():
        return [{"x": torch.randn(2, 4)}]

    def without_metrics():
        return BrickCollection({"head": BrickTrainable(nn.Linear(4, 3), ["x"], ["logits"])}), {"x": torch.randn(2, 4)}
"""


@pytest.fixture
def deploy_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "model.py").write_text(textwrap.dedent(DEPLOY_MODEL))
    (tmp_path / "logs").mkdir()
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path / "logs"))  # where output_to_log keeps its logs
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))  # else made in tempdir on first use
    return tmp_path / "model.py"


@pytest.mark.parametrize(("extra", "fragment"), [
    (["--candidates", "onnxruntime,tensorrt"], "Unknown candidate(s) ['tensorrt']; valid candidates: onnxruntime"),
    (["--threads", "0"], "--threads must be a positive integer"),
    (["--min-run-time", "0"], "--min-run-time must be positive and finite"),
    (["--metric-stage", "bogus"], "Unknown stage 'bogus'"),
    (["--device", "gpu"], "Unknown device 'gpu'"),
    (["--validation", "{d}/model.py:nope"], "defines no function 'nope'"),
])
def test_deploy_refuses_bad_arguments_before_the_build_runs(capsys, deploy_model, extra, fragment):
    argv = ["deploy", str(deploy_model), "--validation", str(deploy_model), "-o", str(deploy_model.parent / "bundle"),
            *[a.format(d=deploy_model.parent) for a in extra]]
    code, _, err = run(capsys, *argv)
    assert_user_error(code, err, fragment)
    assert not (deploy_model.parent / "build_ran").exists()
    assert "full output is in" not in err and not any((deploy_model.parent / "logs").iterdir())


def test_deploy_input_errors_after_the_build_leave_no_log(capsys, deploy_model):
    argv = ["deploy", str(deploy_model), "--validation", f"{deploy_model}:without_targets", "-o",
            str(deploy_model.parent / "bundle")]
    code, _, err = run(capsys, *argv)
    assert_user_error(code, err, "has no 'targets'")
    assert "full output is in" not in err and not any((deploy_model.parent / "logs").iterdir())


def test_deploy_refuses_an_existing_folder_in_the_command_lines_words(capsys, deploy_model):
    (deploy_model.parent / "bundle").mkdir()
    code, _, err = run(capsys, "deploy", str(deploy_model), "--max-metric-drop", "none", "-o",
                       str(deploy_model.parent / "bundle"))
    assert code == 1 and "bundle already exists; pass --overwrite to replace it" in err
    assert "overwrite=True" not in err and not (deploy_model.parent / "build_ran").exists()


def test_deploy_advice_names_the_command_lines_options(capsys, deploy_model):
    code, _, err = run(capsys, "deploy", f"{deploy_model}:without_metrics", "--validation", str(deploy_model), "-o",
                       str(deploy_model.parent / "bundle"))
    assert_user_error(code, err, "no metric bricks alive in stage validation nor test")
    assert "--max-metric-drop none" in err and "max_metric_drop=None" not in err


# ------------------------------------------------------------------------------------------- no torch
NO_TORCH_ERRORS = [
    (["bench", EXAMPLE, "--backends", "eager,fx,tensorrt"], "Unknown backend(s) 'tensorrt'"),
    (["bench", EXAMPLE, "--stage", "deploy"], "Unknown stage 'deploy'"),
    (["bench", EXAMPLE, "--device", "tpu"], "Unknown device 'tpu'"),
    (["bench", EXAMPLE, "--threads", "0"], "--threads must be a positive integer"),
    (["export", EXAMPLE, "--stage", "deploy", "-o", "{d}/x.onnx"], "Unknown stage 'deploy'"),
    (["deploy", EXAMPLE, "--candidates", "tensorrt", "--max-metric-drop", "none", "-o", "{d}/b"], "'tensorrt'"),
    (["lock", EXAMPLE, "-o", "{d}"], "it is a folder"),
    (["check", EXAMPLE, "--lock", "{d}/missing.lock.json"], "No lock file"),
]


def test_argument_errors_answer_without_importing_torch(tmp_path):
    argvs = [[a.format(d=tmp_path) for a in argv] for argv, _ in NO_TORCH_ERRORS]
    script = ("import json, sys\nsys.modules['torch'] = None  # importing torch now fails\n"
              "from torchbricks_fx.cli import main\nprint(json.dumps([main(a) for a in json.loads(sys.argv[1])]))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-c", script, json.dumps(argvs)], env=env, capture_output=True, text=True,
                          timeout=120)
    assert json.loads(done.stdout) == [2] * len(argvs), done.stderr
    for _, fragment in NO_TORCH_ERRORS:
        assert fragment in done.stderr
    assert not list(tmp_path.iterdir())


# ------------------------------------------------------------------------------------------- as a program
def _python_m(*argv: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-m", "torchbricks_fx", *argv], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)


def test_python_dash_m_runs_the_cli(tmp_path):
    done = _python_m("inspect", EXAMPLE, "--stage", "inference", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "stage inference" in done.stdout and "bricks:   preprocessor -> backbone -> head" in done.stdout

    done = _python_m("bench", "missing.py", cwd=tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr and "No such file" in done.stderr
