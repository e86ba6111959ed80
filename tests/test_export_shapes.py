"""Export's shapes: the axes asked to stay dynamic are dynamic in the file or the export fails naming the
brick; axes can be kept static; the batch axis, the verification inputs and the report follow the inputs."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from torchbricks_fx import BrickCollection, BrickExportError, BrickTrainable, export_onnx, export_program


def _session(path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


class HeightSpecific(nn.Module):
    def forward(self, image: torch.Tensor) -> torch.Tensor:
        scale = 2 if image.shape[2] == 16 else 3  # specializes on the height
        return image.mean(dim=(2, 3)) * scale


class BatchSpecific(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2 if x.shape[0] == 2 else x * 3


class MatMul(nn.Module):
    def forward(self, x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        return x @ table


def test_an_axis_the_exporter_fixes_is_an_error_not_a_file_that_verifies(tmp_path):
    collection = BrickCollection({"h": BrickTrainable(HeightSpecific(), input_names=["image"], output_names=["y"])})
    with pytest.raises(BrickExportError, match=r"fixed axis 2 \('height'\) of input 'image' at 16") as caught:
        export_onnx(collection, tmp_path / "m.onnx", {"image": torch.rand(2, 3, 16, 16)},
                    dynamic_shapes={"image": {2: "height", 3: "width"}})
    assert "dynamic_shapes={input: {axis: None}}" in str(caught.value)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("verify", [True, False])
def test_a_brick_that_specializes_on_the_batch_is_named(tmp_path, verify):
    collection = BrickCollection({
        "encoder": BrickTrainable(nn.Linear(3, 4), input_names=["x"], output_names=["embedding"]),
        "specific": BrickTrainable(BatchSpecific(), input_names=["embedding"], output_names=["y"])})
    with pytest.raises(BrickExportError, match=r"brick 'specific' \(BatchSpecific\).*fixed axis 0 \('batch'\) of "
                                               r"input 'embedding'"):
        export_onnx(collection, tmp_path / "m.onnx", {"x": torch.rand(2, 3)}, verify=verify)
    assert not list(tmp_path.iterdir())
    report = export_onnx(collection, tmp_path / "m.onnx", {"x": torch.rand(2, 3)}, dynamic_batch=False)
    assert report.verified and not report.dynamic_batch


def test_an_input_with_the_batchs_length_by_chance_can_be_kept_static(tmp_path):
    collection = BrickCollection({"m": BrickTrainable(MatMul(), input_names=["x", "table"], output_names=["y"])})
    inputs = {"x": torch.rand(4, 4), "table": torch.rand(4, 8)}
    with pytest.raises(BrickExportError, match=r"brick 'm' \(MatMul\)"):
        export_onnx(collection, tmp_path / "m.onnx", inputs)
    for static in (None, torch.export.Dim.STATIC):
        report = export_onnx(collection, tmp_path / "m.onnx", inputs, dynamic_shapes={"table": {0: static}},
                             overwrite=True)
        assert report.verified and report.dynamic_batch and report.verified_batch_sizes == (4, 5)
        x, table = np.random.rand(7, 4).astype(np.float32), inputs["table"].numpy()
        (y,) = _session(tmp_path / "m.onnx").run(None, {"x": x, "table": table})
        np.testing.assert_allclose(y, x @ table, rtol=1e-5)
    program = export_program(collection, tmp_path / "m.pt2", inputs, dynamic_shapes={"table": {0: None}})
    assert program.verified_batch_sizes == (4, 5)


def test_eager_failing_on_the_verification_inputs_says_how_they_were_made(tmp_path):
    collection = BrickCollection({"m": BrickTrainable(MatMul(), input_names=["x", "table"], output_names=["y"])})
    with pytest.raises(BrickExportError, match=r"(?s)random inputs one larger along axis 0 of \['x', 'table'\].*"
                                               r"raised in brick 'm'.*\{0: None\}"):
        export_onnx(collection, tmp_path / "m.onnx", {"x": torch.rand(4, 4), "table": torch.rand(4, 8)},
                    dynamo=False)
    assert not list(tmp_path.iterdir())


def test_a_scalar_first_input_does_not_hide_the_batch(tmp_path):
    class Scaled(nn.Module):
        def forward(self, scale: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
            return x * scale

    collection = BrickCollection({"s": BrickTrainable(Scaled(), input_names=["scale", "x"], output_names=["y"])})
    report = export_onnx(collection, tmp_path / "m.onnx", {"scale": torch.tensor(2.0), "x": torch.rand(4, 3)})
    assert report.dynamic_batch and report.verified_batch_sizes == (4, 5)
    x = np.random.rand(6, 3).astype(np.float32)
    (y,) = _session(tmp_path / "m.onnx").run(None, {"scale": np.array(2.0, dtype=np.float32), "x": x})
    np.testing.assert_allclose(y, 2 * x, rtol=1e-6)


def test_requests_that_cannot_be_honoured_are_refused_before_any_work(tmp_path):
    collection = BrickCollection({"enc": BrickTrainable(nn.Linear(3, 4), input_names=["x"], output_names=["e"])})
    x = {"x": torch.rand(2, 3)}
    cases = [
        (dict(dynamic_shapes={"x": {5: "h"}}), r"axis 5 of 'x', which has 2 dimension\(s\)"),
        (dict(dynamic_shapes={"x": {1: 3}}), r"dynamic_shapes\['x'\]\[1\] is 3; give a dimension name"),
        (dict(dynamic_shapes={"x": [1]}), r"dynamic_shapes\['x'\] must be a dict"),
        (dict(external_data=True, dynamo=False), r"external_data=True needs dynamo=True"),
    ]
    for options, message in cases:
        with pytest.raises(BrickExportError, match=message):
            export_onnx(collection, tmp_path / "m.onnx", x, **options)
    with pytest.raises(BrickExportError, match="batch size 0"):
        export_onnx(collection, tmp_path / "m.onnx", {"x": torch.rand(0, 3)})
    assert not list(tmp_path.iterdir())


def test_a_brick_returning_a_dict_is_named_before_the_exporter_runs(tmp_path):
    class Parts(nn.Module):
        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"a": x + 1, "b": x * 2}

    collection = BrickCollection({
        "encoder": BrickTrainable(nn.Linear(3, 4), input_names=["x"], output_names=["embedding"]),
        "parts": BrickTrainable(Parts(), input_names=["embedding"], output_names=["parts"])})
    for dynamo in (True, False):
        with pytest.raises(BrickExportError, match=r"must be tensors; got \{'parts': 'dict'\} from 'parts' "
                                                   r"\(brick 'parts'\)"):
            export_onnx(collection, tmp_path / "m.onnx", {"x": torch.rand(2, 3)}, dynamo=dynamo)


def test_a_value_frozen_from_a_single_valued_integer_input_is_caught(tmp_path):
    class PlusMeanToken(nn.Module):
        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            return tokens + int(tokens.float().mean())  # frozen into the trace

    collection = BrickCollection({"t": BrickTrainable(PlusMeanToken(), input_names=["tokens"],
                                                      output_names=["y"])})
    for tokens in (torch.full((2, 4), 3), torch.ones(2, 4, dtype=torch.long)):  # token ids, an attention mask
        with pytest.raises(BrickExportError, match="does not reproduce eager"):
            export_onnx(collection, tmp_path / "m.onnx", {"tokens": tokens}, dynamo=False,
                        accept_tracer_warnings=True)


def test_an_all_zero_index_input_stays_a_valid_index(tmp_path):
    class TokenTypes(nn.Module):  # RoBERTa's token types: one row
        def __init__(self) -> None:
            super().__init__()
            self.embedding = nn.Embedding(1, 4)

        def forward(self, x: torch.Tensor, token_types: torch.Tensor) -> torch.Tensor:
            return x + self.embedding(token_types)

    collection = BrickCollection({"t": BrickTrainable(TokenTypes(), input_names=["x", "token_types"],
                                                      output_names=["y"])})
    report = export_onnx(collection, tmp_path / "m.onnx", {"x": torch.randn(2, 3, 4),
                                                           "token_types": torch.zeros(2, 3, dtype=torch.long)})
    assert report.verified


def test_a_bricks_own_file_error_while_tracing_is_not_blamed_on_the_output(tmp_path):
    class ReadsWhileTraced(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if torch.compiler.is_compiling():
                with open(tmp_path / "missing" / "vocab.txt"):
                    pass
            return x * 2

    collection = BrickCollection({"a": BrickTrainable(ReadsWhileTraced(), input_names=["x"], output_names=["y"])})
    with pytest.raises(BrickExportError, match=r"brick 'a'.*vocab\.txt") as caught:
        export_program(collection, tmp_path / "m.pt2", {"x": torch.randn(2, 3)})
    assert "Cannot write" not in str(caught.value)
