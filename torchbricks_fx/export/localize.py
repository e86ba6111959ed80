"""Failure localization: when a stage does not export, export each live brick alone (on its eager inputs)
and name the bricks that fail, with their reasons."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from torchbricks_fx.binding import STAGE_INPUT, Binding
from torchbricks_fx.errors import BrickExportError, error_summary
from torchbricks_fx.export.target import BATCH, Axes, Target, eager_values
from torchbricks_fx.plan import BrickSpec
from torchbricks_fx.runtime import batch_size_of
from torchbricks_fx.stage import Stage

TryExport = Callable[[nn.Module, tuple[Any, ...], list[dict[int, Any]]], None]
"""Exports one module (a brick alone) on example arguments with dynamic axes; raises when it cannot."""

_TORCH_EXPORT_HINT = ("torch.export needs code without data-dependent Python control flow (no if/for on tensor "
                      "values, no .item()/.numpy()); see the chained exception for the full trace")
EXPORTER_HINTS = {
    "dynamo": f"the dynamo exporter traces with torch.export: {_TORCH_EXPORT_HINT}; or try dynamic_batch=False.",
    "legacy": "the legacy exporter traces with TorchScript (torch.jit.trace), which needs tensor inputs and "
              "outputs and ONNX-convertible operators; see the chained exception for the full trace, or try "
              "dynamo=True.",
    "torch.export": f"{_TORCH_EXPORT_HINT}; or try strict=True/False or dynamic_batch=False.",
}


class TraceWarnings(Exception):
    """An exporter's tracer warned that its trace may be wrong for other inputs; raised (instead of writing a
    file that verifies on the examples only) so that the failure is localized to the bricks that warn."""


class SpecializedAxes(Exception):
    """The exporter fixed an axis that was asked to stay dynamic (the ONNX exporter does so quietly when
    torch.export finds code that specializes on its size); raised so that the failure is localized."""


SPECIALIZED_HINT = ("code specializes on that axis's size, e.g. a Python branch on it (if x.shape[0] == 2); "
                    "make the code size-generic, or keep the axis at its example size (dynamic_shapes={input: "
                    "{axis: None}}; dynamic_batch=False for the batch axis).")


class BrickAlone(nn.Module):
    """One brick as a module of positional tensors, fed its eager inputs, called as the stage calls it
    (:meth:`Binding.arguments`), its non-tensor inputs held constant."""

    def __init__(self, module: nn.Module, binding: Binding, stage: Stage, tensor_names: Sequence[str],
                 constants: dict[str, Any], training: bool) -> None:
        super().__init__()
        self.brick = module
        self.binding = binding
        self.stage = stage
        self.tensor_names = tuple(tensor_names)
        self.constants = constants
        self.training = training  # this wrapper only: the brick is already in the stage's mode

    def forward(self, *tensors: torch.Tensor) -> Any:
        values = {**self.constants, **dict(zip(self.tensor_names, tensors, strict=True)), STAGE_INPUT: self.stage}
        args, kwargs = self.binding.arguments(values)
        return self.brick(*args, **kwargs)


def brick_alone(target: Target, step: BrickSpec, values: Mapping[str, Any]) -> tuple[BrickAlone, tuple[Any, ...]]:
    names = step.binding.all_values if step.takes_all else step.input_values
    names = tuple(n for n in dict.fromkeys(names) if n in values)
    tensors = [n for n in names if isinstance(values[n], torch.Tensor)]
    constants = {n: values[n] for n in names if n not in tensors}
    brick = target.bound.bricks[step.name].graph_module(target.plan.stage)
    module = BrickAlone(brick, step.binding, target.plan.stage, tensors, constants, target.training)
    return module, tuple(values[n] for n in tensors)


def missing_module(error: BaseException) -> str | None:
    """The module that is not installed, when ``error`` (or what it was raised from) says so."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if isinstance(current, ModuleNotFoundError):
            return current.name or str(current)
        seen.add(id(current))
        current = current.__cause__  # explicit chaining only: handled optional imports are not the problem
    return None


def localized_failure(what: str, try_brick: TryExport, hint: str, config_hint: str, target: Target,
                      traced: tuple[torch.Tensor, ...], axes: Axes, values: Mapping[str, Any],
                      error: Exception) -> BrickExportError:
    """The error to raise when exporting ``target`` (``what``: "to ONNX") on ``traced`` failed with
    ``error``: an environment problem, or the bricks that fail alone, or their combination."""
    missing = missing_module(error)
    if missing is not None:  # an environment problem, not a brick's: do not blame the bricks
        return BrickExportError(f"Exporting stage {target.plan.stage.value} {what} needs the module "
                                f"{missing!r}, which is not installed (the dynamo exporter needs onnxscript); "
                                f"install it or pass dynamo=False.")
    batch = batch_size_of(dict(zip(target.input_names, traced, strict=True)), target.input_names) \
        if any(0 in axis_map for axis_map in axes) else None
    traced_example = all(a is values[n] for n, a in zip(target.input_names, traced, strict=True))
    trace_values = values if traced_example else eager_values(target, traced)  # a batch of one was doubled
    failures = _failing_bricks(try_brick, target, trace_values, batch)
    stage = target.plan.stage.value
    same = [(type(e), error_summary(e, 300, True)) == (type(error), error_summary(error, 300, True))
            for _, _, e in failures]
    if len(failures) > 1 and len(failures) == len(target.plan.steps) and all(same):
        return BrickExportError(f"Exporting stage {stage} {what} failed, and every brick fails alone with the same "
                                f"error, so the cause is the export's configuration (options, opset, installed "
                                f"exporter), not a brick: {error_summary(error, 300, True)}\nHint: {config_hint}")
    if failures:
        message = f"Exporting stage {stage} {what} failed; these bricks cannot be exported:\n" + "\n".join(
            f"- brick {step.name!r} ({type(brick).__name__}): {error_summary(brick_error, 300, True)}"
            for step, brick, brick_error in failures)
    else:
        message = (f"Exporting stage {stage} {what} failed although every brick ({', '.join(target.plan.bricks)}) "
                   f"exports on its own; the failure comes from their combination: {error_summary(error, 300, True)}")
    return BrickExportError(f"{message}\nHint: {hint}")


def _failing_bricks(try_brick: TryExport, target: Target, values: Mapping[str, Any],
                    batch: int | None) -> list[tuple[BrickSpec, nn.Module, Exception]]:
    failures: list[tuple[BrickSpec, nn.Module, Exception]] = []
    with target.bound.modes(grad=False), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for step in target.plan.steps:
            module, args = brick_alone(target, step, values)
            axes = [{0: BATCH} if batch is not None and a.dim() and a.shape[0] == batch else {} for a in args]
            try:
                try_brick(module, args, axes)
            except Exception as brick_error:
                failures.append((step, module.brick, brick_error))
    return failures
