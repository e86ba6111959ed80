"""deploy / load_bundle: candidates judged by the collection's own metrics on real data (scikit-learn's digits),
bundles written atomically and loaded without torch, and every bad input named."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from torchbricks_fx import (
    BrickCollection,
    BrickDeployError,
    BrickDeployInputError,
    BrickLoss,
    BrickMetricSingle,
    BrickTrainable,
    DeployReport,
    Stage,
    deploy,
    load_bundle,
)
from torchbricks_fx.bundle import MANIFEST_NAME, file_sha256
from torchbricks_fx.cli import main
from torchbricks_fx.deployment.candidates import CANDIDATES, BuildContext, Built, CandidateKind, ort_built

ROOT = Path(__file__).resolve().parents[1]
INT8 = ("onnxruntime-int8-dynamic", "onnxruntime-int8-static")
FAST = {"batch_sizes": [1], "min_run_time": 0.01}  # timing is not what these tests check


# ------------------------------------------------------------------------------------------- helpers
def _damaged(context: BuildContext) -> Built:
    """The float32 export with the classifier's rows rolled by one after export: every class id shifts, while
    the file stays a valid, fast model."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(context.float32_onnx()))
    for initializer in model.graph.initializer:
        if initializer.name in ("head.fc.weight", "head.fc.bias", "head.weight", "head.bias"):
            rolled = np.roll(numpy_helper.to_array(initializer), 1, axis=0)
            initializer.CopyFrom(numpy_helper.from_array(rolled, initializer.name))
    path = context.folder("damaged") / "model.onnx"
    onnx.save(model, str(path))
    return ort_built(path, context)


DAMAGED = CandidateKind("onnxruntime-damaged", "float32", "onnx", "classifier rows rolled after export", _damaged)


def _broken(context: BuildContext) -> Built:
    raise RuntimeError("this candidate cannot be built today")


BROKEN = CandidateKind("broken", "float32", "onnx", "always fails", _broken)


def _not_a_file(context: BuildContext) -> Built:
    from torchbricks_fx.deployment.steps import eager_bind
    from torchbricks_fx.export.target import make_target

    return Built(bind=eager_bind(make_target(context.collection, context.stage, context.outputs)))


NOT_A_FILE = CandidateKind("not-a-file", "float32", "torch", "eager under another name", _not_a_file)


@pytest.fixture(scope="module")
def extra_candidates() -> Iterator[None]:
    with pytest.MonkeyPatch.context() as patch:
        for kind in (DAMAGED, BROKEN, NOT_A_FILE):
            patch.setitem(CANDIDATES, kind.name, kind)
        yield


# ------------------------------------------------------------------------------------------- digits
@pytest.fixture(scope="module")
def digits() -> ModuleType:
    pytest.importorskip("sklearn")
    pytest.importorskip("lightning")
    spec = importlib.util.spec_from_file_location("digits_example", ROOT / "examples" / "digits.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def trained(digits: ModuleType) -> tuple[BrickCollection, dict[str, float]]:
    return digits.trained()


@pytest.fixture(scope="module")
def small_budget(digits: ModuleType, trained: Any, extra_candidates: None,
                 tmp_path_factory: pytest.TempPathFactory) -> DeployReport:
    collection, _ = trained
    folder = tmp_path_factory.mktemp("digits") / "bundle"
    return deploy(collection, folder, {"raw": digits.splits()["validation"].images[:2]}, outputs=digits.OUTPUTS,
                  validation=digits.validation(), max_metric_drop=0.02,
                  candidates=["onnxruntime", *INT8, "onnxruntime-fp16", "pt2", DAMAGED.name], **FAST)


def test_digits_example_trains_to_95_percent(trained):
    _, test_metrics = trained
    assert test_metrics["test/accuracy"] >= 0.95


def test_int8_is_accepted_with_a_small_budget(small_budget):
    for name in INT8:
        result = small_budget.candidate(name)
        assert result.status == "accepted", result.reason
        assert set(result.metric_drops) == {"accuracy", "cross_entropy"}
        assert all(drop <= 0.02 for drop in result.metric_drops.values())
        assert result.tolerance_ok is None  # reduced precision: the metrics decide, not the tolerance
    assert small_budget.candidate("onnxruntime").tolerance_ok is True
    assert small_budget.candidate("pt2").status == "accepted"
    assert small_budget.chosen in ("onnxruntime", *INT8, "pt2")
    assert small_budget.speedups
    assert any((small_budget.folder / name).is_file() for name in ("model.onnx", "model.pt2"))


def test_int8_is_rejected_with_a_zero_budget(digits, trained, small_budget, extra_candidates, tmp_path):
    # The drops are read from the small-budget report: with a zero budget exactly the int8 candidates whose
    # metrics got worse there must be rejected, and the quantization noise made at least one worse.
    worse = {name for name in INT8 if any(d > 0 for d in small_budget.candidate(name).metric_drops.values())}
    assert worse, {name: dict(small_budget.candidate(name).metric_drops) for name in INT8}
    collection, _ = trained
    try:
        report = deploy(collection, tmp_path / "bundle", {"raw": digits.splits()["validation"].images[:2]},
                        outputs=digits.OUTPUTS, validation=digits.validation(), max_metric_drop=0.0,
                        candidates=list(INT8), **FAST)
    except BrickDeployError as error:  # both rejected: nothing written, the report comes with the error
        assert isinstance(error.report, DeployReport) and "No candidate was accepted" in str(error)
        assert not (tmp_path / "bundle").exists()
        report = error.report
    for name in INT8:
        result = report.candidate(name)
        assert dict(result.metric_drops) == dict(small_budget.candidate(name).metric_drops)  # deterministic
        assert result.status == ("rejected" if name in worse else "accepted")
        if name in worse:
            assert "drops by" in result.reason and "(> 0)" in result.reason


def test_a_damaged_candidate_is_rejected_by_the_metric(small_budget):
    damaged = small_budget.candidate(DAMAGED.name)
    assert damaged.status == "rejected"
    assert damaged.metric_drops["accuracy"] > 0.5
    assert "accuracy drops by" in damaged.reason
    assert small_budget.chosen != DAMAGED.name


def test_missing_packages_and_devices_are_skipped_with_a_reason(small_budget):
    fp16 = small_budget.candidate("onnxruntime-fp16")
    assert fp16.status == "skipped" and "CUDA" in fp16.reason and not fp16.latencies


def test_manifest_and_report(small_budget):
    folder = small_budget.folder
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    assert manifest["schema"] == "torchbricks_fx.bundle/1" and manifest["stage"] == "export"
    assert manifest["inputs"] == [{"name": "raw", "dtype": "float32", "shape": ["batch", 1, 8, 8],
                                   "dynamic_axes": {"0": "batch"}}]
    outputs = {o["name"]: o for o in manifest["outputs"]}
    assert outputs["class_prediction"]["dtype"] == "int64" and outputs["logits"]["shape"] == ["batch", 10]
    assert manifest["artifact"]["candidate"] == small_budget.chosen
    statuses = {c["name"]: c["status"] for c in manifest["candidates"]}
    assert statuses[DAMAGED.name] == "rejected" and statuses["onnxruntime-fp16"] == "skipped"
    for candidate in manifest["candidates"]:
        if candidate["status"] in ("accepted", "rejected"):
            assert candidate["metrics"] and candidate["latencies"][0]["median_s"] > 0
        else:
            assert candidate["reasons"]
    assert manifest["acceptance"]["max_metric_drop"] == {"accuracy": 0.02, "cross_entropy": 0.02}
    assert {"torch", "onnxruntime", "python"} <= set(manifest["versions"])
    files = sorted(p.name for p in folder.iterdir() if p.name != MANIFEST_NAME)
    assert sorted(manifest["files"]) == files and "report.md" in files and "latency.png" in files
    assert all(manifest["files"][name] == file_sha256(folder / name) for name in files)
    report = (folder / "report.md").read_text()
    assert f"**Chosen: {small_budget.chosen}**" in report and "| candidate | precision |" in report
    assert "![median latency per candidate](latency.png)" in report


def test_bundle_round_trip_without_torch(small_budget, digits, tmp_path):
    test = digits.splits()["test"]
    np.save(tmp_path / "images.npy", test.images.numpy())
    script = textwrap.dedent(f"""
        import sys
        sys.modules["torch"] = None  # any import of torch now raises ImportError
        import numpy as np
        from torchbricks_fx.bundle import load_bundle
        bundle = load_bundle({str(small_budget.folder)!r})
        outputs = bundle({{"raw": np.load({str(tmp_path / "images.npy")!r})}})
        np.save({str(tmp_path / "predictions.npy")!r}, outputs["class_prediction"])
        try:
            import torch
        except ImportError:
            print("no torch")
    """)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "no torch"
    predictions = np.load(tmp_path / "predictions.npy")
    if small_budget.chosen != "pt2":
        assert (predictions == test.targets.numpy()).mean() >= 0.95
    # In this process (torch loaded), tensors are accepted too and give the same outputs.
    bundle = load_bundle(small_budget.folder)
    assert np.array_equal(bundle({"raw": test.images})["class_prediction"], predictions)


def test_bundle_refuses_a_modified_artifact_and_bad_inputs(small_budget, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(small_budget.folder, copy)
    bundle = load_bundle(copy)
    with pytest.raises(BrickDeployInputError, match="'raw' has dtype float64; the bundle takes float32"):
        bundle({"raw": np.zeros((2, 1, 8, 8))})
    with pytest.raises(BrickDeployInputError, match=r"shape \[2, 8, 8\]; the bundle takes \['batch', 1, 8, 8\]"):
        bundle({"raw": np.zeros((2, 8, 8), np.float32)})
    with pytest.raises(BrickDeployInputError, match=r"Inputs \['raw'\] are missing"):
        bundle({"image": np.zeros((2, 1, 8, 8), np.float32)})
    native = np.random.default_rng(0).random((2, 1, 8, 8), dtype=np.float32)
    swapped = native.astype(native.dtype.newbyteorder(">" if sys.byteorder == "little" else "<"))
    for name, values in bundle({"raw": native}).items():  # a byte-swapped array is read by value
        np.testing.assert_array_equal(bundle({"raw": swapped})[name], values)
    artifact = copy / bundle.manifest["artifact"]["files"][0]
    with artifact.open("ab") as file:
        file.write(b"\0")
    with pytest.raises(BrickDeployError, match=f"{artifact.name} was modified .* Refusing to load it"):
        load_bundle(copy)
    with pytest.raises(BrickDeployError, match=r"has no manifest\.json"):
        load_bundle(tmp_path)


@pytest.mark.parametrize(("edit", "message"), [
    (lambda m: m.pop("artifact"), r"artifact: expected an object"),
    (lambda m: m.update(files=[]), r"files: expected an object of sha256 strings"),
    (lambda m: m["artifact"].update(files="model.onnx"), r"artifact\.files: expected a list of file names"),
    (lambda m: m["artifact"].update(providers="CUDAExecutionProvider"), r"artifact\.providers: expected a list"),
    (lambda m: m["inputs"][0].update(shape="batch"), r"inputs: expected a list of \{name, dtype, shape\}"),
])
def test_a_damaged_manifest_is_refused_naming_the_field(small_budget, tmp_path, edit, message):
    import json
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(small_budget.folder, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    edit(manifest)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BrickDeployError, match=rf"not a well-formed bundle manifest \({message}"):
        load_bundle(copy)


@pytest.mark.parametrize(("arguments", "message"), [
    (dict(folder=None), "takes the bundle's folder as a path, not NoneType"),
    (dict(threads="2"), "threads must be a positive integer or None, not '2'"),
    (dict(providers="CUDAExecutionProvider"), "providers must be a list of onnxruntime provider names"),
])
def test_load_bundle_refuses_arguments_of_the_wrong_type(small_budget, arguments, message):
    arguments = {"folder": small_budget.folder, **arguments}
    with pytest.raises(BrickDeployInputError, match=message):
        load_bundle(arguments.pop("folder"), **arguments)


# ------------------------------------------------------------------------------------------- a tiny model
def tiny_bricks() -> dict[str, Any]:
    torch.manual_seed(0)
    return {
        "encoder": BrickTrainable(nn.Sequential(nn.Linear(4, 16), nn.ReLU()), ["x"], ["features"]),
        "head": BrickTrainable(nn.Linear(16, 3), ["features"], ["logits"]),
        "loss": BrickLoss(nn.CrossEntropyLoss(), ["logits", "targets"], ["loss_ce"]),
        "accuracy": BrickMetricSingle(MulticlassAccuracy(num_classes=3), ["logits", "targets"]),
    }


def tiny_batches(count: int = 3) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [{"x": torch.randn(8, 4, generator=generator), "targets": torch.randint(0, 3, (8,), generator=generator)}
            for _ in range(count)]


EXAMPLE = {"x": torch.randn(2, 4)}


def test_metric_states_of_the_collection_are_untouched(tmp_path):
    collection = BrickCollection(tiny_bricks())
    collection(tiny_batches(1)[0], Stage.VALIDATION)
    before = collection.summarize(Stage.VALIDATION)
    report = deploy(collection, tmp_path / "bundle", EXAMPLE, validation=tiny_batches(), candidates=["onnxruntime"],
                    **FAST)
    assert report.chosen == "onnxruntime" and report.metric_stage is Stage.VALIDATION
    assert report.validation_samples == 24 and report.validation_batches == 3
    assert collection.summarize(Stage.VALIDATION) == before


def test_batches_without_targets_name_the_metric_brick_and_the_input(tmp_path):
    batches = [{"x": batch["x"]} for batch in tiny_batches()]
    with pytest.raises(BrickDeployInputError, match="batch 0 has no 'targets', which metric brick 'accuracy' reads"):
        deploy(BrickCollection(tiny_bricks()), tmp_path / "bundle", EXAMPLE, validation=batches)
    assert not (tmp_path / "bundle").exists()
    with pytest.raises(BrickDeployInputError, match=r"batch 0 has no 'x', an input of the deployed stage"):
        deploy(BrickCollection(tiny_bricks()), tmp_path / "bundle", EXAMPLE,
               validation=[{"targets": batch["targets"]} for batch in tiny_batches()])
    with pytest.raises(BrickDeployInputError, match="validation set is empty"):
        deploy(BrickCollection(tiny_bricks()), tmp_path / "bundle", EXAMPLE)


def test_a_stage_without_metric_bricks_says_how_to_deploy_on_tolerance_alone(tmp_path):
    bricks = tiny_bricks()
    del bricks["accuracy"]
    with pytest.raises(BrickDeployInputError, match=r"no metric bricks alive in stage validation nor test.*"
                                                    r"max_metric_drop=None"):
        deploy(BrickCollection(bricks), tmp_path / "bundle", EXAMPLE, validation=tiny_batches())
    report = deploy(BrickCollection(bricks), tmp_path / "bundle", EXAMPLE, max_metric_drop=None,
                    candidates=["onnxruntime", "onnxruntime-int8-dynamic"], **FAST)
    assert report.chosen == "onnxruntime" and report.metric_budgets is None
    int8 = report.candidate("onnxruntime-int8-dynamic")
    assert int8.status == "rejected" and "reduced precision is accepted only by the metric gate" in int8.reason


def test_a_metric_reading_an_output_not_deployed_is_named(tmp_path):
    bricks = tiny_bricks()
    with pytest.raises(BrickDeployInputError, match=r"Metric brick 'accuracy' reads 'logits'.*outputs=\[\.\.\., "
                                                    r"'logits'\]"):
        deploy(BrickCollection(bricks), tmp_path / "bundle", EXAMPLE, outputs=["features"],
               validation=tiny_batches())


class ShiftLabels(nn.Module):
    def forward(self, targets: torch.Tensor) -> torch.Tensor:
        return (targets + 1) % 3


def test_a_value_made_by_a_brick_outside_the_deployed_stage_comes_from_the_batches(tmp_path):
    bricks = tiny_bricks()
    bricks["label_map"] = BrickTrainable(ShiftLabels(), ["targets"], ["labels"],
                                         alive_stages=["train", "validation", "test"])
    bricks["accuracy"] = BrickMetricSingle(MulticlassAccuracy(num_classes=3), ["logits", "labels"])
    with pytest.raises(BrickDeployInputError, match=r"no 'labels'.*brick 'label_map' makes it in stage validation"):
        deploy(BrickCollection(bricks), tmp_path / "bundle", EXAMPLE, outputs=["logits"], validation=tiny_batches())
    batches = [{**batch, "labels": ShiftLabels()(batch["targets"])} for batch in tiny_batches()]
    report = deploy(BrickCollection(bricks), tmp_path / "bundle", EXAMPLE, outputs=["logits"], validation=batches,
                    candidates=["onnxruntime"], **FAST)
    assert report.chosen == "onnxruntime" and "MulticlassAccuracy" in report.eager.metrics


def test_batches_without_the_inputs_are_refused_also_on_tolerance_alone(tmp_path):
    with pytest.raises(BrickDeployInputError, match=r"batch 0 has no 'x', an input of the deployed stage"):
        deploy(BrickCollection(tiny_bricks()), tmp_path / "bundle", EXAMPLE, max_metric_drop=None,
               validation=[{"wrong": torch.zeros(1)}], candidates=["onnxruntime-int8-static"], **FAST)


def test_reduced_precision_needs_a_metric_that_is_compared(tmp_path):
    from torchmetrics.classification import MulticlassConfusionMatrix

    bricks = tiny_bricks()
    bricks["accuracy"] = BrickMetricSingle(MulticlassConfusionMatrix(num_classes=3), ["logits", "targets"])
    with pytest.raises(BrickDeployError) as raised:  # the matrix is not compared: int8 has no judge
        deploy(BrickCollection(bricks), tmp_path / "bundle", EXAMPLE, validation=tiny_batches(),
               max_metric_drop=0.0, candidates=["onnxruntime-int8-dynamic"], **FAST)
    int8 = raised.value.report.candidate("onnxruntime-int8-dynamic")
    assert int8.status == "rejected" and "scalar metric" in int8.reason
    assert not (tmp_path / "bundle").exists()


def test_metric_drops_keep_the_resolution_of_small_metrics():
    from torchbricks_fx.deployment.acceptance import metric_drops

    drops = metric_drops({"mse": 1e-4, "accuracy": 0.9}, {"mse": 1e-4 + 9e-7, "accuracy": 0.9 - 1e-8},
                         {"mse": False, "accuracy": True})
    assert drops["mse"] == pytest.approx(9e-7) and drops["accuracy"] == 0.0  # 0.9% worse; float32 rounding


def test_a_failing_candidate_is_recorded_and_the_others_go_on(extra_candidates, tmp_path):
    report = deploy(BrickCollection(tiny_bricks()), tmp_path / "bundle", EXAMPLE, validation=tiny_batches(),
                    candidates=[BROKEN.name, "onnxruntime"], **FAST)
    broken = report.candidate(BROKEN.name)
    assert broken.status == "failed" and "cannot be built today" in broken.reason
    assert report.chosen == "onnxruntime"
    manifest = json.loads((tmp_path / "bundle" / MANIFEST_NAME).read_text())
    assert any("cannot be built today" in r for c in manifest["candidates"] for r in c["reasons"])


def test_unknown_candidates_and_metric_names_are_refused(tmp_path):
    with pytest.raises(BrickDeployInputError, match=r"Unknown candidate.*'tensorrt'.*valid candidates: onnxruntime"):
        deploy(BrickCollection(tiny_bricks()), tmp_path / "b", EXAMPLE, validation=tiny_batches(),
               candidates=["tensorrt"])
    with pytest.raises(BrickDeployInputError, match=r"names \['f1'\].*metrics are \['MulticlassAccuracy'\]"):
        deploy(BrickCollection(tiny_bricks()), tmp_path / "b", EXAMPLE, validation=tiny_batches(),
               candidates=["onnxruntime"], max_metric_drop={"f1": 0.1}, **FAST)
    report = deploy(BrickCollection(tiny_bricks()), tmp_path / "b", EXAMPLE, validation=tiny_batches(),
                    candidates=["onnxruntime"], max_metric_drop={"MulticlassAccuracy": 0.1}, **FAST)
    assert report.metric_budgets == {"MulticlassAccuracy": 0.1}


def test_existing_folder_refused_unless_overwrite_and_kept_on_failure(extra_candidates, tmp_path):
    folder = tmp_path / "bundle"
    folder.mkdir()
    (folder / "keep.txt").write_text("old")
    with pytest.raises(BrickDeployError, match="already exists; pass overwrite=True"):
        deploy(BrickCollection(tiny_bricks()), folder, EXAMPLE, validation=tiny_batches())
    # Every candidate rejected: the old folder stays as it was, and no staging is left next to it.
    with pytest.raises(BrickDeployError, match="No candidate was accepted"):
        deploy(BrickCollection(tiny_bricks()), folder, EXAMPLE, validation=tiny_batches(), overwrite=True,
               candidates=[DAMAGED.name, BROKEN.name], **FAST)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"] and (folder / "keep.txt").read_text() == "old"
    deploy(BrickCollection(tiny_bricks()), folder, EXAMPLE, validation=tiny_batches(), overwrite=True,
           candidates=["onnxruntime"], **FAST)
    assert not (folder / "keep.txt").exists() and (folder / MANIFEST_NAME).is_file()


def test_an_interrupted_write_leaves_nothing_half_written(monkeypatch, tmp_path):
    import torchbricks_fx.deployment.writer as writer

    def interrupted(*args: Any, **kwargs: Any) -> bool:
        raise KeyboardInterrupt

    monkeypatch.setattr(writer, "_plot", interrupted)  # after the artifact was copied into the staging folder
    with pytest.raises(KeyboardInterrupt):
        deploy(BrickCollection(tiny_bricks()), tmp_path / "bundle", EXAMPLE, validation=tiny_batches(),
               candidates=["onnxruntime"], **FAST)
    assert list(tmp_path.iterdir()) == []


def test_the_compiled_stage_is_judged_and_timed_but_never_written(extra_candidates, tmp_path):
    report = deploy(BrickCollection(tiny_bricks()), tmp_path / "bundle", EXAMPLE, validation=tiny_batches(),
                    candidates=["compiled", "onnxruntime"], **FAST)
    compiled = report.candidate("compiled")
    assert compiled.status == "accepted" and compiled.format == "torch" and compiled.latencies
    assert compiled.tolerance_ok is True and "not a file" in " ".join(compiled.notes)
    assert report.chosen == "onnxruntime"
    if compiled.mean_latency_s < report.candidate("onnxruntime").mean_latency_s:  # type: ignore[operator]
        assert any("compiled was the fastest accepted candidate but is not a file" in n for n in report.notes)
    with pytest.raises(BrickDeployError, match=r"Only \['not-a-file'\] were accepted, which are not files") as caught:
        deploy(BrickCollection(tiny_bricks()), tmp_path / "other", EXAMPLE, validation=tiny_batches(),
               candidates=[NOT_A_FILE.name], **FAST)
    assert not (tmp_path / "other").exists()
    summary = caught.value.report.to_markdown()  # its headline agrees with its table
    assert "**No file was accepted** (only ['not-a-file'], which are not files, passed)." in summary
    assert "No candidate was accepted" not in summary


def test_a_pt2_bundle(tmp_path):
    report = deploy(BrickCollection(tiny_bricks()), tmp_path / "bundle", EXAMPLE, validation=tiny_batches(),
                    candidates=["pt2"], **FAST)
    bundle = load_bundle(tmp_path / "bundle")
    assert report.chosen == "pt2" and bundle.format == "pt2" and bundle.manifest["artifact"]["needs"] == ["torch"]
    x = torch.randn(5, 4)
    expected = BrickCollection(tiny_bricks())({"x": x}, Stage.EXPORT)["logits"]
    np.testing.assert_allclose(bundle({"x": x.numpy()})["logits"], expected.numpy(), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------- command line
@pytest.fixture
def model_file(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.py"
    path.write_text(textwrap.dedent("""
        import torch
        from test_deploy import EXAMPLE, tiny_batches, tiny_bricks
        from torchbricks_fx import BrickCollection

        def build():
            return BrickCollection(tiny_bricks()), EXAMPLE

        def validation():
            return tiny_batches()

        def without_targets():
            return [{"x": batch["x"]} for batch in tiny_batches()]
    """))
    return path


def test_cli_deploy(capsys, monkeypatch, model_file, tmp_path):
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    out = tmp_path / "bundle"
    argv = ["deploy", str(model_file), "--validation", str(model_file), "-o", str(out), "--candidates",
            "onnxruntime,onnxruntime-int8-dynamic", "--batch-sizes", "1,4", "--min-run-time", "0.01"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "| candidate | precision |" in captured.out and "[deploy] onnxruntime: accepted" in captured.err
    assert load_bundle(out).candidate in ("onnxruntime", "onnxruntime-int8-dynamic")
    assert main(argv) == 1  # the folder exists
    assert "already exists" in capsys.readouterr().err
    code = main(["deploy", str(model_file), "--validation", f"{model_file}:without_targets", "-o",
                 str(tmp_path / "other")])
    assert code == 2 and "has no 'targets', which metric brick 'accuracy' reads" in capsys.readouterr().err
    assert main(["deploy", str(model_file), "-o", str(tmp_path / "other")]) == 2
    assert "--validation FILE:FUNCTION is needed" in capsys.readouterr().err
    assert main(["deploy", str(model_file), "--max-metric-drop", "accuracy", "-o", str(tmp_path / "x")]) == 2
    assert main(["deploy", str(model_file), "--max-metric-drop", "none", "--candidates", "onnxruntime",
                 "--batch-sizes", "1", "--min-run-time", "0.01", "-o", str(tmp_path / "tolerance")]) == 0


# ------------------------------------------------------------------------------------------- the example script
def test_digits_example_trains_and_deploys_on_real_data(tmp_path):
    pytest.importorskip("sklearn")
    pytest.importorskip("lightning")
    out = tmp_path / "bundle"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore"}  # this checkout's package
    done = subprocess.run([sys.executable, str(ROOT / "examples" / "digits.py"), "--out", str(out), "--batch-sizes",
                           "1", "--min-run-time", "0.05"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert float(done.stdout.split("'test/accuracy': ")[1].split(",")[0]) >= 0.95
    assert "| candidate | precision | format | status | accuracy | cross_entropy |" in done.stdout
    assert (out / MANIFEST_NAME).is_file() and "): test accuracy 0.9" in done.stdout
