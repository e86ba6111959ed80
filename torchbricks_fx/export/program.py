"""``torch.export`` of a stage to a ``.pt2`` ExportedProgram (``export_program``), loaded back from disk and
verified against eager."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.fx
from torch import nn

from torchbricks_fx.errors import BrickExportError, error_summary
from torchbricks_fx.export.localize import EXPORTER_HINTS
from torchbricks_fx.export.report import ExportReport
from torchbricks_fx.export.sequence import Exporter, Runs, run_export
from torchbricks_fx.export.target import Axes, Target, export_dims
from torchbricks_fx.numerics import OutputError, exact_float32, output_errors
from torchbricks_fx.stage import Stage

if TYPE_CHECKING:
    from torchbricks_fx.collection import BrickCollection

__all__ = ["export_program"]


class NamedStage(nn.Module):
    """The stage with the user's names: ``forward({input name: tensor}) -> {output name: tensor}``."""

    def __init__(self, graph_module: torch.fx.GraphModule, input_names: Sequence[str],
                 output_names: Sequence[str]) -> None:
        super().__init__()
        self.stage = graph_module
        self.input_names = tuple(input_names)
        self.output_names = tuple(output_names)
        self.training = graph_module.training

    def forward(self, named_inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        results = self.stage(*[named_inputs[name] for name in self.input_names])
        return dict(zip(self.output_names, results, strict=True))


def program_of(target: Target, args: tuple[torch.Tensor, ...], axes: Axes, strict: bool) -> Any:
    """``torch.export.export`` of the stage as a :class:`NamedStage` on ``args``."""
    module = NamedStage(target.graph_module, target.input_names, target.output_names)
    dims = export_dims(axes, named=False) or ()  # a .pt2 has no axis names to keep
    named_dims = (dict(zip(target.input_names, dims, strict=True)),) if any(d is not None for d in dims) else None
    named = dict(zip(target.input_names, args, strict=True))
    return torch.export.export(module, (named,), dynamic_shapes=named_dims, strict=strict)


def _load(path: Path) -> Any:
    """The saved program, loaded back from disk, as a module."""
    try:
        module = torch.export.load(path).module()
    except Exception as error:
        raise BrickExportError(f"The written program cannot be loaded back: {error_summary(error)}") from error
    return module


def _verify(path: Path, target: Target, runs: Runs) -> tuple[tuple[OutputError, ...], tuple[str, ...]]:
    loaded = _load(path)
    device = runs[0][0][0].device if runs[0][0] else torch.device("cpu")
    with torch.no_grad(), exact_float32(device):  # same numerics as the eager reference
        compared = [(loaded(dict(zip(target.input_names, run_args, strict=True))), eager) for run_args, eager in runs]
    return output_errors(compared, target.output_names, device), ()


def export_program(collection: BrickCollection, path: str | os.PathLike[str],
                   named_inputs: Mapping[str, torch.Tensor], *,
                   stage: Stage | str = Stage.EXPORT, outputs: Sequence[str] | None = None,
                   dynamic_batch: bool = True, dynamic_shapes: Mapping[str, Mapping[int, Any]] | None = None,
                   verify: bool = True, overwrite: bool = False, strict: bool = False) -> ExportReport:
    """Saves ``stage`` of ``collection`` as a ``torch.export`` ExportedProgram (``.pt2``).

    The program takes one dict ``{input name: tensor}`` and returns ``{output name: tensor}``, with the
    user's names: ``torch.export.load(path).module()({"raw": x})``.  The written file is loaded back;
    dynamic batch, verification (on the example inputs and on random inputs with batch size + 1, with the
    program loaded from disk), atomic writes and failure localization work as in :func:`export_onnx`.
    """

    def write(target: Target, args: tuple[torch.Tensor, ...], axes: Axes, staged: Path) -> None:
        torch.export.save(program_of(target, args, axes, strict), staged)

    def try_brick(brick: nn.Module, brick_args: tuple[Any, ...], brick_axes: list[dict[int, Any]]) -> None:
        shapes = export_dims(brick_axes, or_none=True, named=False)
        # The wrapper takes *tensors, which torch.export sees as one tuple argument.
        torch.export.export(brick, brick_args, dynamic_shapes=(shapes,) if shapes is not None else None,
                            strict=strict)

    def read_back(staged: Path, target: Target) -> None:
        _load(staged)  # a file that does not load back is not written

    exporter = Exporter(format="pt2", what="with torch.export", artifact="exported program", dynamo=True,
                        double_batch_of_one=True, write=write, try_brick=try_brick, read_back=read_back,
                        verify=_verify, hint=EXPORTER_HINTS["torch.export"], config_hint=f"try strict={not strict}.")
    return run_export(exporter, collection, path, named_inputs, stage=stage, outputs=outputs,
                      dynamic_batch=dynamic_batch, dynamic_shapes=dynamic_shapes, verify=verify, overwrite=overwrite)

