"""Deployment export: ONNX files and torch.export programs that match eager, carry the users' names, have a
free batch size, and are written atomically (or not at all)."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torchvision
from conftest import cuda, multitask_bricks
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from torchbricks_fx import (
    BrickCollection,
    BrickExportError,
    BrickGraphError,
    BrickLoss,
    BrickMetricSingle,
    BrickNotTrainable,
    BrickTrainable,
    Stage,
    export_onnx,
    export_program,
)
from torchbricks_fx.bag_of_bricks import ImageClassifier, Preprocessor, resnet_to_brick
from torchbricks_fx.brick_utils import export_bricks_as_onnx
from torchbricks_fx.export import ExportReport
from torchbricks_fx.numerics import compare_tensors, tolerance
from torchbricks_fx.numerics import difference as _compare
from torchbricks_fx.ort import ort_providers


def seed_resnet18_collection(num_classes: int = 10) -> BrickCollection:
    """The seed README's ResNet-18 classifier collection (metric and loss included)."""
    torch.manual_seed(0)
    resnet = torchvision.models.resnet18(weights=None, num_classes=num_classes)
    backbone = resnet_to_brick(resnet=resnet, input_name="normalized", output_name="features")
    return BrickCollection({
        "preprocessor": BrickNotTrainable(Preprocessor(), input_names=["raw"], output_names=["normalized"]),
        "backbone": backbone,
        "head": BrickTrainable(ImageClassifier(num_classes=num_classes, n_features=backbone.model.n_backbone_features),
                               input_names=["features"], output_names=["logits", "probabilities", "class_prediction"]),
        "accuracy": BrickMetricSingle(MulticlassAccuracy(num_classes=num_classes),
                                      input_names=["class_prediction", "targets"]),
        "loss": BrickLoss(model=nn.CrossEntropyLoss(), input_names=["logits", "targets"], output_names=["loss_ce"]),
    })


def run_onnx(path: Path, named_inputs: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {i.name: named_inputs[i.name].numpy() for i in session.get_inputs()}
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, feed), strict=True))


def leftovers(folder: Path) -> list[str]:
    """Every entry of ``folder``, hidden staging folders included."""
    return sorted(p.name for p in folder.iterdir())


class NumpyDouble(nn.Module):
    """Leaves the graph: the value goes through numpy."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(x.numpy() * 2.0)


class DataDependentBranch(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # Python control flow on a tensor value: torch.export cannot trace it
            return x * 2
        return x - 1


class Linear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


def tiny(middle: nn.Module) -> BrickCollection:
    torch.manual_seed(0)
    return BrickCollection({
        "scale": BrickNotTrainable(lambda x: x * 0.5, input_names=["in put"], output_names=["scaled"]),
        "middle": BrickTrainable(middle, input_names=["scaled"], output_names=["middle out"]),
        "linear": BrickTrainable(Linear(), input_names=["middle out"], output_names=["y"]),
    })


# ------------------------------------------------------------------------------------------------ ONNX
def test_seed_resnet18_exports_with_dynamic_batch_and_verifies(tmp_path):
    collection = seed_resnet18_collection()
    collection.train()  # the caller's modes: restored after the export
    x = torch.rand(2, 3, 64, 64)
    report = export_onnx(collection, tmp_path / "resnet18.onnx", {"raw": x})

    assert report.verified and report.verified_batch_sizes == (2, 3)
    assert report.dynamic_batch and report.dynamo
    assert report.input_names == ("raw",)
    expected = ("normalized", "features", "logits", "probabilities", "class_prediction")
    assert report.output_names == expected
    assert [e.name for e in report.errors] == list(expected) and all(e.ok for e in report.errors)
    assert report.max_abs_error < 1e-3
    assert report.providers == ("CPUExecutionProvider",)
    assert report.file_size_bytes == (tmp_path / "resnet18.onnx").stat().st_size > 40e6
    assert report.opset and report.opset >= 17
    assert "resnet18.onnx" in report.to_markdown() and "class_prediction" in str(report)
    assert all(module.training for module in collection.modules())
    assert leftovers(tmp_path) == ["resnet18.onnx"]

    model = onnx.load(str(tmp_path / "resnet18.onnx"))
    assert [i.name for i in model.graph.input] == ["raw"]
    assert [o.name for o in model.graph.output] == list(expected)
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # symbolic batch

    x5 = torch.rand(5, 3, 64, 64)
    got = run_onnx(tmp_path / "resnet18.onnx", {"raw": x5})
    want = collection({"raw": x5}, stage=Stage.EXPORT)
    assert got["logits"].shape == (5, 10)
    np.testing.assert_allclose(got["logits"], want["logits"].numpy(), rtol=1e-3, atol=1e-4)
    np.testing.assert_array_equal(got["class_prediction"], want["class_prediction"].numpy())


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "legacy"])
def test_requested_output_exports_only_its_path(tmp_path, dynamo):
    torch.manual_seed(0)
    collection = BrickCollection(multitask_bricks())
    x = torch.rand(2, 3, 16, 16)
    report = export_onnx(collection, tmp_path / "seg.onnx", {"raw": x}, outputs=["seg"], dynamo=dynamo)

    assert report.output_names == ("seg",) and report.verified_batch_sizes == (2, 3)
    model = onnx.load(str(tmp_path / "seg.onnx"))
    assert [o.name for o in model.graph.output] == ["seg"]
    classifier = collection["heads"]["classifier"].model.fc.weight.detach().numpy()
    for initializer in model.graph.initializer:
        array = onnx.numpy_helper.to_array(initializer).reshape(-1)
        assert "classifier" not in initializer.name
        if array.size == classifier.size:
            assert not np.allclose(array, classifier.reshape(-1)) and not np.allclose(array, classifier.T.reshape(-1))
    got = run_onnx(tmp_path / "seg.onnx", {"raw": torch.rand(4, 3, 16, 16)})
    assert got["seg"].shape == (4, 2, 16, 16)


def test_metric_and_loss_bricks_stay_out_of_the_file(tmp_path):
    torch.manual_seed(0)
    collection = BrickCollection(multitask_bricks())
    x = torch.rand(2, 3, 16, 16)
    report = export_onnx(collection, tmp_path / "val.onnx", {"raw": x}, stage=Stage.VALIDATION, outputs=["logits"])
    assert report.input_names == ("raw",)  # the metric's "labels" is not needed
    assert report.output_names == ("logits",)
    metric = collection["accuracy"].metrics["VALIDATION"]["MulticlassAccuracy"]
    assert metric.update_count == 0  # verifying updated no metric


def test_existing_file_is_kept_unless_overwrite(tmp_path):
    collection = tiny(nn.Identity())
    path = tmp_path / "model.onnx"
    path.write_bytes(b"precious")
    with pytest.raises(BrickExportError, match=r"already exists.*overwrite=True"):
        export_onnx(collection, path, {"in put": torch.rand(2, 4)})
    assert path.read_bytes() == b"precious" and leftovers(tmp_path) == ["model.onnx"]

    report = export_onnx(collection, path, {"in put": torch.rand(2, 4)}, overwrite=True)
    assert report.verified and path.read_bytes() != b"precious"
    assert [i.name for i in onnx.load(str(path)).graph.input] == ["in put"]  # the user's name, space included
    assert leftovers(tmp_path) == ["model.onnx"]


def test_failed_export_names_the_brick_and_leaves_nothing(tmp_path):
    collection = tiny(DataDependentBranch())
    folder = tmp_path / "new" / "folder"
    with pytest.raises(BrickExportError, match=r"brick 'middle' \(DataDependentBranch\)") as info:
        export_onnx(collection, folder / "model.onnx", {"in put": torch.rand(2, 4)})
    message = str(info.value)
    assert "'linear'" not in message and "'scale'" not in message  # the bricks that export are not blamed
    assert info.value.__cause__ is not None
    assert leftovers(tmp_path) == []  # not even the folders it created


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_failed_verification_names_outputs_and_leaves_nothing(tmp_path):
    # The legacy tracer freezes the numpy result into a constant: right on the example, wrong elsewhere.
    collection = tiny(NumpyDouble())
    with pytest.raises(BrickExportError, match=r"(?s)outputs \['middle out', 'y'\].*brick 'middle'"):
        export_onnx(collection, tmp_path / "model.onnx", {"in put": torch.rand(2, 4)}, dynamo=False,
                    accept_tracer_warnings=True)
    assert leftovers(tmp_path) == []


def test_numpy_brick_with_dynamo_is_verified_correct_or_named(tmp_path):
    collection = tiny(NumpyDouble())
    try:
        report = export_onnx(collection, tmp_path / "model.onnx", {"in put": torch.rand(2, 4)})
    except BrickExportError as error:
        assert "'middle'" in str(error)
        assert leftovers(tmp_path) == []
        return
    assert report.verified and report.verified_batch_sizes == (2, 3)
    x = torch.rand(7, 4)
    got = run_onnx(tmp_path / "model.onnx", {"in put": x})
    np.testing.assert_allclose(got["y"], collection({"in put": x}, stage=Stage.EXPORT)["y"].numpy(), rtol=1e-5,
                               atol=1e-6)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_static_batch_still_verifies_on_other_values(tmp_path):
    collection = tiny(NumpyDouble())
    with pytest.raises(BrickExportError, match="does not reproduce eager"):
        export_onnx(collection, tmp_path / "m.onnx", {"in put": torch.rand(2, 4)}, dynamo=False, dynamic_batch=False,
                    accept_tracer_warnings=True)
    report = export_onnx(collection, tmp_path / "m.onnx", {"in put": torch.rand(2, 4)}, dynamic_batch=False)
    assert report.verified_batch_sizes == (2, 2) and not report.dynamic_batch
    model = onnx.load(str(tmp_path / "m.onnx"))
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 2


def test_external_data_files_move_together(tmp_path):
    report = export_onnx(tiny(nn.Identity()), tmp_path / "m.onnx", {"in put": torch.rand(2, 4)}, external_data=True)
    assert leftovers(tmp_path) == ["m.onnx", "m.onnx.data"]
    assert report.file_size_bytes == sum(p.stat().st_size for p in tmp_path.iterdir())
    assert run_onnx(tmp_path / "m.onnx", {"in put": torch.rand(3, 4)})["y"].shape == (3, 5)


def test_bad_requests_are_clear_errors(tmp_path):
    collection = tiny(nn.Identity())
    with pytest.raises(BrickGraphError, match="'logits'"):
        export_onnx(collection, tmp_path / "m.onnx", {"in put": torch.rand(2, 4)}, outputs=["logits"])
    with pytest.raises(BrickGraphError, match="'in put'"):
        export_onnx(collection, tmp_path / "m.onnx", {"input": torch.rand(2, 4)})
    with pytest.raises(BrickExportError, match="must be tensors"):
        export_onnx(collection, tmp_path / "m.onnx", {"in put": [1.0, 2.0]})
    with pytest.raises(BrickExportError, match="opset_version"):
        export_onnx(collection, tmp_path / "m.onnx", {"in put": torch.rand(2, 4)},
                    onnx_export_kwargs={"opset_version": 17})
    with pytest.raises(BrickGraphError, match="dynamic_shapes"):
        export_onnx(collection, tmp_path / "m.onnx", {"in put": torch.rand(2, 4)}, dynamic_shapes={"x": {0: "b"}})
    assert leftovers(tmp_path) == []


def test_comparison_is_dtype_aware():
    rtol, atol = tolerance(torch.float32)
    assert (rtol, atol) == (1e-4, 1e-4) and tolerance(torch.int64) == (0.0, 0.0)
    want = torch.tensor([100.0, 0.0, -3.0])
    assert _compare(want + 1e-3, want, rtol, atol).ok  # 1e-3 on values up to 100
    assert not _compare(want + 1e-1, want, rtol, atol).ok
    assert not _compare(torch.tensor([1, 2]), torch.tensor([1, 3]), 0.0, 0.0).ok
    assert _compare(torch.tensor([math.nan, 1.0]), torch.tensor([math.nan, 1.0]), rtol, atol).ok
    assert not _compare(torch.tensor([math.nan, 1.0]), torch.tensor([0.0, 1.0]), rtol, atol).ok
    assert not _compare(torch.zeros(3), torch.zeros(2), rtol, atol).ok
    assert not _compare(torch.zeros(2, dtype=torch.int32), torch.zeros(2, dtype=torch.int64), 0, 0).ok


def test_compare_tensors_handles_infinities_nans_and_dtypes():
    inf, nan = math.inf, math.nan
    assert compare_tensors(torch.tensor([-inf, inf, 1.0]), torch.tensor([-inf, inf, 1.0]), "cpu") == (True, 0.0, 0.0)
    assert compare_tensors(torch.tensor([nan, 2.0]), torch.tensor([nan, 2.0]), "cpu") == (True, 0.0, 0.0)
    ok, max_abs, _ = compare_tensors(torch.tensor([inf, 1.0]), torch.tensor([-inf, 1.0]), "cpu")
    assert not ok and max_abs == inf
    ok, max_abs, max_rel = compare_tensors(torch.tensor([nan, 1.0]), torch.tensor([0.0, 1.0]), "cpu")
    assert not ok and max_abs == inf and max_rel == inf  # a NaN difference is never an error of 0
    ok, max_abs, _ = compare_tensors(torch.tensor([1.0, 2.0]), torch.tensor([nan, 2.0]), "cpu")
    assert not ok and max_abs == inf
    # the rtol term uses finite references only: an infinite reference does not excuse a finite error
    assert not compare_tensors(torch.tensor([-inf, 5.0]), torch.tensor([-inf, 1.0]), "cpu")[0]
    assert not compare_tensors(torch.ones(2, dtype=torch.float64), torch.ones(2), "cpu")[0]  # dtype change
    big = torch.tensor([2**62], dtype=torch.int64)
    ok, max_abs, _ = compare_tensors(big + 1, big, "cpu")
    assert not ok and max_abs >= 1.0
    assert compare_tensors(torch.tensor([1e-6, 1.0]), torch.tensor([0.0, 1.0]), "cpu")[0]
    assert ort_providers("cpu") == ["CPUExecutionProvider"]


class MaskedScores(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.masked_fill(torch.arange(x.shape[-1]) % 2 == 0, -math.inf)


def test_outputs_with_infinities_export_and_verify(tmp_path):
    collection = BrickCollection({"mask": BrickNotTrainable(MaskedScores(), input_names=["x"],
                                                            output_names=["scores"])})
    report = export_onnx(collection, tmp_path / "m.onnx", {"x": torch.rand(2, 4)})
    assert report.verified and report.max_abs_error == 0.0


# ------------------------------------------------------------------------------------------------ torch.export
def test_export_program_keeps_names_and_dynamic_batch(tmp_path):
    torch.manual_seed(0)
    collection = BrickCollection(multitask_bricks())
    x = torch.rand(2, 3, 16, 16)
    report = export_program(collection, tmp_path / "model.pt2", {"raw": x}, outputs=["logits", "seg"])
    assert isinstance(report, ExportReport) and report.format == "pt2"
    assert report.verified_batch_sizes == (2, 3) and all(e.ok for e in report.errors)
    assert leftovers(tmp_path) == ["model.pt2"]

    program = torch.export.load(tmp_path / "model.pt2").module()
    x5 = torch.rand(5, 3, 16, 16)
    got = program({"raw": x5})
    want = collection({"raw": x5}, stage=Stage.EXPORT)
    assert set(got) == {"logits", "seg"}
    torch.testing.assert_close(got["seg"], want["seg"])
    with pytest.raises(BrickExportError, match="already exists"):
        export_program(collection, tmp_path / "model.pt2", {"raw": x})


def test_export_program_failure_names_the_brick(tmp_path):
    with pytest.raises(BrickExportError, match="brick 'middle'"):
        export_program(tiny(DataDependentBranch()), tmp_path / "m.pt2", {"in put": torch.rand(2, 4)})
    assert leftovers(tmp_path) == []


# ------------------------------------------------------------------------------------------------ seed helper
def test_seed_export_bricks_as_onnx(tmp_path):
    torch.manual_seed(0)
    collection = BrickCollection(multitask_bricks())
    path = tmp_path / "seed.onnx"
    path.write_bytes(b"old")  # the seed overwrote silently
    named_inputs = {"raw": torch.rand(2, 3, 16, 16)}
    report = export_bricks_as_onnx(path, collection, named_inputs, dynamic_batch_size=True, opset_version=18)
    assert report.opset == 18 and report.verified
    outputs = collection(named_inputs, stage=Stage.EXPORT, return_inputs=False)
    assert [o.name for o in onnx.load(str(path)).graph.output] == list(outputs)
    with pytest.raises(ValueError, match="dynamic_axes"):
        export_bricks_as_onnx(path, collection, named_inputs, dynamic_batch_size=True, dynamic_axes={"raw": [0]})
    report = export_bricks_as_onnx(path, collection, named_inputs, dynamic_batch_size=False,
                                   dynamic_axes={"raw": {0: "n"}, "seg": {0: "n"}}, dynamo=False)
    assert report.verified_batch_sizes == (2, 3) and not report.dynamo


@cuda
def test_cuda_inputs_verify_with_the_cuda_provider_when_available(tmp_path):
    collection = tiny(nn.Identity()).cuda()
    report = export_onnx(collection, tmp_path / "m.onnx", {"in put": torch.rand(2, 4, device="cuda")})
    cuda_ep = "CUDAExecutionProvider" in ort.get_available_providers()
    assert report.providers[0] == ("CUDAExecutionProvider" if cuda_ep else "CPUExecutionProvider")
    assert report.verified


@pytest.mark.skipif("CUDAExecutionProvider" in ort.get_available_providers(), reason="onnxruntime has CUDA here")
def test_without_onnxruntimes_cuda_provider_cuda_inputs_verify_on_its_cpu_provider(tmp_path):
    """A GPU machine with the CPU onnxruntime package: verification of CUDA inputs falls back to the CPU
    provider (as the README says) instead of failing.  Needs no GPU: only the device's name reaches it."""
    from torchbricks_fx.ort import ort_session

    path = export_onnx(tiny(nn.Identity()), tmp_path / "m.onnx", {"in put": torch.rand(2, 4)}).path
    assert ort_session(path, "cuda:0").get_providers() == ["CPUExecutionProvider"]


def test_batch_of_one_still_gives_a_dynamic_batch(tmp_path):
    # torch.export specializes a size-1 axis; the example is doubled for tracing and verified as given.
    torch.manual_seed(0)
    collection = BrickCollection(multitask_bricks())
    one = {"raw": torch.rand(1, 3, 16, 16)}
    report = export_program(collection, tmp_path / "m.pt2", one, outputs=["seg"])
    assert report.verified_batch_sizes == (1, 2)
    assert torch.export.load(tmp_path / "m.pt2").module()({"raw": torch.rand(4, 3, 16, 16)})["seg"].shape[0] == 4
    report = export_onnx(collection, tmp_path / "m.onnx", one, outputs=["seg"])
    assert report.verified_batch_sizes == (1, 2)
    assert run_onnx(tmp_path / "m.onnx", {"raw": torch.rand(4, 3, 16, 16)})["seg"].shape[0] == 4


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "legacy"])
def test_aliases_pass_throughs_and_all_bindings(tmp_path, dynamo):
    class Twice(nn.Module):
        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            y = x + 1
            return y, y  # one tensor under two names

    collection = BrickCollection({
        "identity": BrickNotTrainable(lambda x: x, input_names=["x"], output_names=["same"]),
        "twice": BrickTrainable(Twice(), input_names=["same"], output_names=["a", "b"]),
        "concat": BrickTrainable(lambda values: torch.cat(list(values.values()), dim=1), input_names="all",
                                 output_names=["everything"]),
    })
    report = export_onnx(collection, tmp_path / "m.onnx", {"x": torch.rand(2, 3)}, dynamo=dynamo)
    assert report.output_names == ("same", "a", "b", "everything") and report.verified_batch_sizes == (2, 3)
    assert [o.name for o in onnx.load(str(tmp_path / "m.onnx")).graph.output] == list(report.output_names)


def test_metric_stage_of_a_nested_collection_with_relative_names(tmp_path):
    from torchbricks_fx.bag_of_bricks import image_classification_bricks

    torch.manual_seed(0)
    collection = BrickCollection({"cls": image_classification_bricks(num_classes=4, backbone="mobilenet_v3_small")})
    report = export_onnx(collection, tmp_path / "m.onnx", {"raw": torch.rand(2, 3, 32, 32)}, stage=Stage.VALIDATION,
                         outputs=["cls/probabilities"])
    assert report.input_names == ("raw",) and report.output_names == ("cls/probabilities",)
    with pytest.raises(BrickGraphError, match="cls/probabilitie"):
        export_onnx(collection, tmp_path / "x.onnx", {"raw": torch.rand(2, 3, 32, 32)}, outputs=["cls/probabilitie"])


def test_missing_onnxscript_is_not_blamed_on_the_bricks(tmp_path, monkeypatch):
    def no_onnxscript(*args, **kwargs):
        raise ModuleNotFoundError("No module named 'onnxscript'", name="onnxscript")

    monkeypatch.setattr(torch.onnx, "export", no_onnxscript)
    with pytest.raises(BrickExportError, match=r"(?s)'onnxscript'.*dynamo=False") as info:
        export_onnx(tiny(nn.Identity()), tmp_path / "m.onnx", {"in put": torch.rand(2, 4)})
    assert "brick" not in str(info.value)
    assert leftovers(tmp_path) == []


def test_a_file_onnxruntime_cannot_run_is_not_written(tmp_path, monkeypatch):
    def broken_session(*args, **kwargs):
        raise RuntimeError("[ONNXRuntimeError] : 9 : NOT_IMPLEMENTED : Could not find an implementation")

    monkeypatch.setattr(ort, "InferenceSession", broken_session)
    with pytest.raises(BrickExportError, match=r"ONNX Runtime cannot run the exported file.*NOT_IMPLEMENTED"):
        export_onnx(tiny(nn.Identity()), tmp_path / "m.onnx", {"in put": torch.rand(2, 4)})
    assert leftovers(tmp_path) == []


# ------------------------------------------------------------------------------------------------ review fixes
def test_exact_float32_context_works_after_the_new_tf32_api_was_used():
    from torchbricks_fx.numerics import exact_float32 as _exact_cuda_float32

    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    saved = matmul.fp32_precision, conv.fp32_precision
    try:
        matmul.fp32_precision = "tf32"  # reading the legacy allow_tf32 flag now raises
        with _exact_cuda_float32(torch.device("cuda")):  # touches only the flags: no GPU needed
            assert (matmul.fp32_precision, conv.fp32_precision) == ("ieee", "ieee")
        assert (matmul.fp32_precision, conv.fp32_precision) == ("tf32", saved[1])
    finally:
        matmul.fp32_precision, conv.fp32_precision = saved


@pytest.mark.filterwarnings("ignore:Exporting a model while it is in training mode")
def test_train_stage_export_keeps_batchnorm_statistics(tmp_path):
    torch.manual_seed(0)
    norm = nn.BatchNorm1d(4)
    collection = BrickCollection({"bn": BrickTrainable(nn.Sequential(nn.Linear(4, 4), norm), input_names=["x"],
                                                       output_names=["y"])})
    mean, count = norm.running_mean.clone(), int(norm.num_batches_tracked)
    report = export_program(collection, tmp_path / "m.pt2", {"x": torch.randn(3, 4)}, stage=Stage.TRAIN)
    assert report.verified
    assert torch.equal(norm.running_mean, mean) and int(norm.num_batches_tracked) == count
    # the ONNX exporters write BatchNorm in eval form: refused by verification, saying why
    with pytest.raises(BrickExportError, match=r"The stage is TRAIN.*export an eval stage"):
        export_onnx(collection, tmp_path / "m.onnx", {"x": torch.randn(3, 4)}, stage=Stage.TRAIN)
    assert torch.equal(norm.running_mean, mean) and int(norm.num_batches_tracked) == count


def test_missing_export_input_names_the_brick(tmp_path):
    collection = BrickCollection({
        "first": BrickTrainable(nn.Identity(), input_names=["x"], output_names=["y"]),
        "second": BrickTrainable(lambda y, z: y + z, input_names=["y", "z"], output_names=["w"]),
    })
    with pytest.raises(BrickGraphError, match=r"Input 'z' needed by brick 'second'"):
        export_onnx(collection, tmp_path / "m.onnx", {"x": torch.rand(2, 3)})
    assert leftovers(tmp_path) == []


def test_dynamic_shapes_add_to_the_batch_axis(tmp_path):
    collection = BrickCollection({"twice": BrickTrainable(lambda x: x * 2, input_names=["x"], output_names=["y"])})
    export_onnx(collection, tmp_path / "m.onnx", {"x": torch.rand(2, 3, 5)}, dynamic_shapes={"x": {2: "width"}})
    dims = onnx.load(str(tmp_path / "m.onnx")).graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and dims[1].dim_value == 3 and dims[2].dim_param  # batch kept, width added
    assert run_onnx(tmp_path / "m.onnx", {"x": torch.rand(4, 3, 7)})["y"].shape == (4, 3, 7)


def test_configuration_errors_are_not_blamed_on_the_bricks(tmp_path):
    collection = tiny(nn.ReLU())
    with pytest.raises(BrickExportError, match=r"\['bogus'\] are not arguments of torch.onnx.export"):
        export_onnx(collection, tmp_path / "m.onnx", {"in put": torch.rand(2, 4)}, onnx_export_kwargs={"bogus": 1})
    with pytest.raises(BrickExportError, match=r"(?s)every brick fails alone with the same error.*configuration"):
        export_onnx(collection, tmp_path / "m.onnx", {"in put": torch.rand(2, 4)},
                    onnx_export_kwargs={"custom_translation_table": 5})
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize(("dynamo", "option", "message"), [
    (True, {"keep_initializers_as_inputs": True}, "makes"),
    (True, {"export_params": False}, "makes"),
    (False, {"keep_initializers_as_inputs": True}, "makes"),
    (True, {"do_constant_folding": False}, "ignores"),
    (True, {"training": torch.onnx.TrainingMode.TRAINING}, "ignores"),
    (True, {"custom_opsets": {"custom": 1}}, "ignores"),
    (False, {"optimize": False}, "ignores"),
    (False, {"report": True}, "ignores"),
])
def test_onnx_export_kwargs_the_exporter_would_not_honour_are_refused(tmp_path, dynamo, option, message):
    (name, value), = option.items()
    expected = (rf"{name}={value!r}.*whose inputs are the stage's inputs" if message == "makes" else
                rf"{name}={value!r} has no effect with dynamo={dynamo}.*pass dynamo={not dynamo}")
    with pytest.raises(BrickExportError, match=expected):
        export_onnx(tiny(nn.ReLU()), tmp_path / "m.onnx", {"in put": torch.rand(2, 4)}, dynamo=dynamo,
                    onnx_export_kwargs=option)
    assert leftovers(tmp_path) == []


def test_onnx_export_kwargs_at_torchs_defaults_change_nothing_and_are_accepted(tmp_path):
    defaults = {"do_constant_folding": True, "export_params": True, "keep_initializers_as_inputs": False}
    export_onnx(tiny(nn.ReLU()), tmp_path / "m.onnx", {"in put": torch.rand(2, 4)}, onnx_export_kwargs=defaults)
    assert [i.name for i in onnx.load(str(tmp_path / "m.onnx")).graph.input] == ["in put"]


def test_reexport_removes_the_previous_optimized_model(tmp_path):
    path, x = tmp_path / "m.onnx", {"in put": torch.rand(2, 4)}
    export_onnx(tiny(nn.ReLU()), path, x, save_optimized=True)
    assert leftovers(tmp_path) == ["m.onnx", "m.optimized.onnx"]
    export_onnx(tiny(nn.Identity()), path, x, overwrite=True)
    assert leftovers(tmp_path) == ["m.onnx"]  # the old optimized model would no longer match m.onnx
    export_onnx(tiny(nn.Tanh()), path, x, overwrite=True, save_optimized=True)
    ops = {node.op_type for node in onnx.load(str(tmp_path / "m.optimized.onnx")).graph.node}
    assert "Tanh" in ops and "Relu" not in ops


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_failure_hint_follows_the_exporter(tmp_path):
    with pytest.raises(BrickExportError, match=r"(?s)brick 'middle'.*dynamo exporter traces with torch.export"):
        export_onnx(tiny(DataDependentBranch()), tmp_path / "m.onnx", {"in put": torch.rand(2, 4)})
    with pytest.raises(BrickExportError, match=r"(?s)brick 'middle'.*TorchScript"):
        export_onnx(tiny(RunningMax()), tmp_path / "m.onnx", {"in put": torch.rand(2, 4)}, dynamo=False)


class RunningMax(nn.Module):
    """aten::cummax has no ONNX symbolic for the legacy (TorchScript) exporter."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cummax(x, 1)[0]


def test_metric_stage_export_changes_no_collection(tmp_path):
    torch.manual_seed(0)
    collection = BrickCollection(multitask_bricks())
    collection.plan(Stage.VALIDATION)
    version = collection.revision
    report = export_onnx(collection, tmp_path / "val.onnx", {"raw": torch.rand(2, 3, 16, 16)},
                         stage=Stage.VALIDATION, outputs=["logits"])
    assert report.input_names == ("raw",) and collection.revision == version  # cached plans stay valid


def test_overwrite_removes_stale_external_data_and_keeps_the_old_files_on_failure(tmp_path, monkeypatch):
    path, x = tmp_path / "m.onnx", {"in put": torch.rand(2, 4)}
    export_onnx(tiny(nn.Identity()), path, x, external_data=True)
    old_model, old_data = path.read_bytes(), (tmp_path / "m.onnx.data").read_bytes()

    real_replace = os.replace

    def failing_replace(source, destination):
        if Path(destination) == path:
            raise OSError("disk full")
        return real_replace(source, destination)

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(BrickExportError, match=r"Cannot write .*m\.onnx: OSError: disk full"):
        export_onnx(tiny(nn.ReLU()), path, x, external_data=True, overwrite=True)
    assert path.read_bytes() == old_model and (tmp_path / "m.onnx.data").read_bytes() == old_data
    assert leftovers(tmp_path) == ["m.onnx", "m.onnx.data"]
    monkeypatch.setattr(os, "replace", real_replace)

    export_onnx(tiny(nn.ReLU()), path, x, external_data=False, overwrite=True)
    assert leftovers(tmp_path) == ["m.onnx"]  # the previous file's weights are gone with it
    assert run_onnx(path, {"in put": torch.rand(3, 4)})["y"].shape == (3, 5)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_seed_export_bricks_as_onnx_rejects_what_it_cannot_honour(tmp_path):
    torch.manual_seed(0)
    collection = BrickCollection(multitask_bricks())
    path, named_inputs = tmp_path / "seed.onnx", {"raw": torch.rand(2, 3, 16, 16)}
    with pytest.raises(BrickExportError, match=r"\['input_names', 'output_names'\]") as info:
        export_bricks_as_onnx(path, collection, named_inputs, dynamic_batch_size=True, input_names=["a"],
                              output_names=["b"])
    assert isinstance(info.value, TypeError)  # what the seed raised
    with pytest.raises(BrickExportError, match=r"(?s)\['rwa'\].*inputs: \['raw'\]"):
        export_bricks_as_onnx(path, collection, named_inputs, dynamic_batch_size=False, dynamic_axes={"rwa": [0]})
    scored = BrickCollection({
        "head": BrickTrainable(Linear(), input_names=["x"], output_names=["y"]),
        "predict": BrickNotTrainable(lambda y: y.argmax(1), input_names=["y"], output_names=["class"]),
        "accuracy": BrickMetricSingle(MulticlassAccuracy(num_classes=5), input_names=["class", "targets"]),
    })
    with pytest.raises(BrickExportError, match=r"\['targets'\]"):  # a metric's input is not in the file
        export_bricks_as_onnx(path, scored, {"x": torch.rand(2, 4)}, dynamic_batch_size=False,
                              dynamic_axes={"targets": [0]}, stage=Stage.VALIDATION)
    assert leftovers(tmp_path) == []
    for dynamo in (True, False):
        export_bricks_as_onnx(path, collection, named_inputs, dynamic_batch_size=True, dynamo=dynamo)
        model = onnx.load(str(path))
        assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch_size"  # the seed's name
        assert model.graph.output[0].type.tensor_type.shape.dim[0].dim_param == "batch_size"


def test_a_full_disk_while_exporting_names_the_file_and_leaves_nothing(tmp_path, monkeypatch):
    def disk_full(self, destination, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch.onnx.ONNXProgram, "save", disk_full)
    with pytest.raises(BrickExportError, match=r"Cannot write .*m\.onnx: No space left on device"):
        export_onnx(tiny(nn.ReLU()), tmp_path / "m.onnx", {"in put": torch.rand(2, 4)})
    assert not list(tmp_path.iterdir())
