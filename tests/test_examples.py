"""The user journeys in examples/ run end to end, as a user would run them (subprocesses, synthetic data)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
# Each example takes well under a minute on an idle 2-core CPU; the limit leaves room for a busy machine.
TIMEOUT_S = 180


def run_example(name: str, *args: str, cwd: Path) -> str:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    start = time.perf_counter()
    result = subprocess.run([sys.executable, str(EXAMPLES / name), *args], cwd=cwd, env=env, capture_output=True,
                            text=True, timeout=TIMEOUT_S)
    elapsed = time.perf_counter() - start
    assert result.returncode == 0, f"{name} failed after {elapsed:.1f} s:\n{result.stdout}\n{result.stderr}"
    print(f"{name} {' '.join(args)}: {elapsed:.1f} s")
    return result.stdout


def test_compile_per_stage(tmp_path: Path) -> None:
    stdout = run_example("compile_per_stage.py", cwd=tmp_path)
    assert "stage inference:" in stdout and "pruned:  classify.loss (dead in stage inference)" in stdout
    assert "TRAIN inputs ['raw', 'targets', 'masks']; INFERENCE inputs ['raw']" in stdout
    assert "step 5:" in stdout
    assert "train metrics:" in stdout and "jaccard" in stdout
    assert "compiled INFERENCE == eager" in stdout


def test_export_onnx(tmp_path: Path) -> None:
    out = tmp_path / "multitask.onnx"
    stdout = run_example("export_onnx.py", "--out", str(out), cwd=tmp_path)
    assert out.is_file() and out.stat().st_size > 0
    assert "('raw', ['batch', 3, 32, 32])" in stdout  # dynamic batch
    assert stdout.count("matches eager") == 3
    assert "| NO" not in stdout


def test_benchmark_latency(tmp_path: Path) -> None:
    # One batch size: torch.compile compiles once (the script's default compares two).
    stdout = run_example("benchmark_latency.py", "--out", str(tmp_path), "--min-run-time", "0.05",
                         "--batch-sizes", "2", cwd=tmp_path)
    assert "| backend |" in stdout and "| brick |" in stdout
    data = json.loads((tmp_path / "benchmark.json").read_text())
    rows = data["results"]
    assert {row["backend"] for row in rows} == {"eager", "fx", "compile", "onnxruntime"}
    assert all(not row["failed"] and row["matched"] for row in rows), rows
    assert (tmp_path / "benchmark.md").read_text().startswith("| backend |")
    assert (tmp_path / "benchmark.png").stat().st_size > 0


def test_train_lightning(tmp_path: Path) -> None:
    pytest.importorskip("lightning")
    stdout = run_example("train_lightning.py", "--epochs", "1", "--steps-per-epoch", "3", "--log-dir", str(tmp_path),
                         cwd=tmp_path)
    assert "world size 1" in stdout
    for key in ("train/total_loss_epoch", "train/classify/accuracy", "validation/segment/jaccard",
                "test/total_loss"):
        assert f"{key}:" in stdout
    metrics_files = list(tmp_path.rglob("metrics.csv"))
    assert metrics_files
    header = metrics_files[0].read_text().splitlines()[0]
    assert "validation/classify/accuracy" in header and "train/segment/loss_segmentation_step" in header


@pytest.mark.slow
def test_train_lightning_ddp_two_processes(tmp_path: Path) -> None:
    """Trainer(strategy="ddp", devices=2) on CPU (gloo): Lightning re-runs the script for the second rank."""
    pytest.importorskip("lightning")
    stdout = run_example("train_lightning.py", "--devices", "2", "--strategy", "ddp", "--epochs", "1",
                         "--steps-per-epoch", "2", "--log-dir", str(tmp_path), cwd=tmp_path)
    assert "world size 2, strategy DDPStrategy" in stdout
    assert "validation/classify/accuracy:" in stdout and "test/total_loss:" in stdout


def _test_metrics(stdout: str) -> dict[str, float]:
    return {line.split(":")[0]: float(line.split(":")[1]) for line in stdout.splitlines()
            if line.startswith("test/") and ":" in line}


@pytest.mark.slow
def test_ddp_metrics_are_synchronized_across_processes(tmp_path: Path) -> None:
    """Testing the same initial weights on 1 and on 2 processes gives the same metrics: under DDP each process
    sees half of the test set, and summarize() (torchmetrics compute) gathers both halves."""
    pytest.importorskip("lightning")
    single = _test_metrics(run_example("train_lightning.py", "--epochs", "0", "--log-dir", str(tmp_path / "one"),
                                       cwd=tmp_path))
    ddp = _test_metrics(run_example("train_lightning.py", "--epochs", "0", "--devices", "2", "--strategy", "ddp",
                                    "--log-dir", str(tmp_path / "two"), cwd=tmp_path))
    assert {"test/classify/accuracy", "test/segment/jaccard", "test/total_loss"} <= set(single)
    for name in ("test/classify/accuracy", "test/classify/f1", "test/segment/jaccard", "test/segment/pixel_accuracy",
                 "test/total_loss"):
        assert ddp[name] == pytest.approx(single[name], abs=1e-3), (name, single, ddp)
