"""Seed-compatible helpers (``from torchbricks.brick_utils import export_bricks_as_onnx``)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from torchbricks_fx.errors import BrickExportError
from torchbricks_fx.stage import Stage

if TYPE_CHECKING:
    import torch

    from torchbricks_fx.collection import BrickCollection
    from torchbricks_fx.export import ExportReport

__all__ = ["export_bricks_as_onnx"]


class _ConflictingExportArguments(BrickExportError, ValueError):
    """The seed raised ``ValueError`` for these; keep that type for callers that catch it."""


def export_bricks_as_onnx(path_onnx: str | os.PathLike[str], brick_collection: BrickCollection,
                          named_inputs: Mapping[str, torch.Tensor], dynamic_batch_size: bool,
                          stage: Stage | str = Stage.EXPORT, **onnx_export_kwargs: Any) -> ExportReport:
    """Exports every output of ``stage`` to ``path_onnx``, as the seed did, through :func:`export_onnx`.

    Like the seed it replaces an existing file; unlike the seed the file is verified with onnxruntime
    (against eager, on a second batch size too) before it replaces anything, and the report is returned.
    ``opset_version``, ``dynamo`` and ``dynamic_axes`` (``{input name: {axis: name}}``; output entries are
    ignored, output shapes follow the inputs) are understood; other keyword arguments go to
    ``torch.onnx.export``.
    """
    from torchbricks_fx.export import export_onnx

    kwargs = dict(onnx_export_kwargs)
    dynamic_axes = kwargs.pop("dynamic_axes", None)
    if dynamic_batch_size and dynamic_axes is not None:
        raise _ConflictingExportArguments("Setting both 'dynamic_batch_size=True' and 'dynamic_axes' in "
                                          "onnx_export_kwargs is not allowed.")
    opset = kwargs.pop("opset_version", None)
    dynamo = bool(kwargs.pop("dynamo", True))
    kwargs.pop("input_names", None)  # the stage's input and output names are used, as in the seed
    kwargs.pop("output_names", None)
    dynamic_shapes = None
    if dynamic_axes is not None:
        inputs = set(brick_collection.plan(stage).required_inputs)
        dynamic_shapes = {name: _axis_map(axes, name) for name, axes in dynamic_axes.items() if name in inputs}
    return export_onnx(brick_collection, path_onnx, named_inputs, stage=stage, dynamic_batch=dynamic_batch_size,
                       dynamic_shapes=dynamic_shapes, opset=opset, dynamo=dynamo, overwrite=True,
                       onnx_export_kwargs=kwargs)


def _axis_map(axes: Mapping[int, str] | list[int], name: str) -> dict[int, str]:
    """``dynamic_axes`` entries are a dict ``{axis: name}`` or a list of axes (named after the input)."""
    if isinstance(axes, Mapping):
        return {int(axis): str(dim) for axis, dim in axes.items()}
    return {int(axis): f"{name}_dim{axis}" for axis in axes}
