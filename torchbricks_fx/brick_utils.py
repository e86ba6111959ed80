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
    from torchbricks_fx.export.report import ExportReport

__all__ = ["export_bricks_as_onnx"]


class _ConflictingExportArguments(BrickExportError, ValueError):
    """The seed raised ``ValueError`` for these; keep that type for callers that catch it."""


class _FixedExportArguments(BrickExportError, TypeError):
    """The seed passed these to ``torch.onnx.export`` itself, so giving them raised ``TypeError``."""


SEED_BATCH = "batch_size"
"""The seed's name of the dynamic batch dimension."""


def export_bricks_as_onnx(path_onnx: str | os.PathLike[str], brick_collection: BrickCollection,
                          named_inputs: Mapping[str, torch.Tensor], dynamic_batch_size: bool,
                          stage: Stage | str = Stage.EXPORT, **onnx_export_kwargs: Any) -> ExportReport:
    """Exports every output of ``stage`` to ``path_onnx``, as the seed did, through :func:`export_onnx`.

    Like the seed it replaces an existing file and names the dynamic batch dimension ``batch_size``; unlike
    the seed the file is verified with onnxruntime (against eager, on a second batch size too) before it
    replaces anything, and the report is returned.  ``opset_version``, ``dynamo`` and ``dynamic_axes``
    (``{input name: {axis: name}}``; output entries are accepted and ignored, output shapes follow the
    inputs) are understood; ``input_names`` / ``output_names`` are the stage's own and cannot be given;
    other keyword arguments go to ``torch.onnx.export``.
    """
    from torchbricks_fx.export.onnx import export_onnx_named_batch
    from torchbricks_fx.export.target import exported_plan
    from torchbricks_fx.stage import parse_stage

    kwargs = dict(onnx_export_kwargs)
    fixed = sorted({"input_names", "output_names"} & set(kwargs))
    if fixed:
        raise _FixedExportArguments(f"export_bricks_as_onnx sets {fixed} itself (the stage's input and output "
                                    f"names, as the seed did); remove them from the keyword arguments.")
    dynamic_axes = kwargs.pop("dynamic_axes", None)
    if dynamic_batch_size and dynamic_axes is not None:
        raise _ConflictingExportArguments("Setting both 'dynamic_batch_size=True' and 'dynamic_axes' in "
                                          "onnx_export_kwargs is not allowed.")
    opset = kwargs.pop("opset_version", None)
    dynamo = bool(kwargs.pop("dynamo", True))
    dynamic_shapes = None
    if dynamic_axes is not None:
        plan = exported_plan(brick_collection, parse_stage(stage), None)  # the exported inputs, not metric targets
        inputs, outputs = set(plan.required_inputs), set(plan.outputs)
        unknown = sorted(str(name) for name in dynamic_axes if name not in inputs | outputs)
        if unknown:
            raise BrickExportError(f"dynamic_axes names {unknown}, which are neither inputs nor outputs of the "
                                   f"exported stage; inputs: {sorted(inputs)}, outputs: {sorted(outputs)}.")
        dynamic_shapes = {name: _axis_map(axes, name) for name, axes in dynamic_axes.items() if name in inputs}
    return export_onnx_named_batch(brick_collection, path_onnx, named_inputs, stage=stage, outputs=None,
                        dynamic_batch=dynamic_batch_size, dynamic_shapes=dynamic_shapes, opset=opset, verify=True,
                        overwrite=True, dynamo=dynamo, external_data=None, onnx_export_kwargs=kwargs,
                        batch_name=SEED_BATCH)


def _axis_map(axes: Mapping[int, str] | list[int], name: str) -> dict[int, str]:
    """``dynamic_axes`` entries are a dict ``{axis: name}`` or a list of axes (named after the input)."""
    if isinstance(axes, Mapping):
        return {int(axis): str(dim) for axis, dim in axes.items()}
    return {int(axis): f"{name}_dim{axis}" for axis in axes}
