"""What an export exports and checks against: the metric-free part of a stage, its example inputs, the
dynamic axes, and the eager reference computed by the stage's bound runtime."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.fx

from torchbricks_fx.errors import BrickExportError, BrickGraphError
from torchbricks_fx.fx import build_graph_module
from torchbricks_fx.numerics import exact_float32
from torchbricks_fx.plan import StagePlan, make_plan
from torchbricks_fx.runtime import BoundStage, batch_size_of, check_inputs
from torchbricks_fx.stage import Stage

if TYPE_CHECKING:
    from torchbricks_fx.collection import BrickCollection

BATCH = "batch"
"""Name of the dynamic batch dimension in exported artifacts."""

Axes = Sequence[Mapping[int, Any]]
"""Per exported input, ``{axis: dim name or torch.export.Dim}``."""


@dataclass(frozen=True)
class Target:
    """The exported part of a stage: its bound plan (metric bricks left out) and its GraphModule."""

    bound: BoundStage
    graph_module: torch.fx.GraphModule

    @property
    def plan(self) -> StagePlan:
        return self.bound.plan

    @property
    def input_names(self) -> tuple[str, ...]:
        return self.plan.required_inputs

    @property
    def output_names(self) -> tuple[str, ...]:
        return self.plan.outputs

    @property
    def training(self) -> bool:
        return self.bound.training


def make_target(collection: BrickCollection, stage: Stage, outputs: Sequence[str] | None) -> Target:
    plan = exported_plan(collection, stage, outputs)
    if not plan.outputs:
        raise BrickExportError(f"Stage {stage.value} produces no output to export (bricks: {list(plan.bricks)}).")
    bound = BoundStage.bind(plan, collection.bricks())
    graph_module, graph_outputs = build_graph_module(bound)
    if tuple(graph_outputs) != tuple(plan.outputs):
        raise BrickExportError(f"The stage graph returns {list(graph_outputs)}, expected {list(plan.outputs)}.")
    return Target(bound, graph_module)


def exported_plan(collection: BrickCollection, stage: Stage, outputs: Sequence[str] | None) -> StagePlan:
    """The stage's plan without its metric bricks.  Metric bricks run outside the graph and only read it: an
    artifact has no use for them, nor for the outputs and bricks that only feed them, nor for their inputs
    (targets).  Planned from the collection's specs, so the collection is not changed."""
    plan = collection.plan(stage, outputs)  # validates; errors name bricks and names
    if all(step.in_graph for step in plan.steps):
        return plan
    metric_values = {v for step in plan.steps if not step.in_graph for v in step.outputs}
    asked = [v for v in (outputs or ()) if v in metric_values]
    if asked:
        raise BrickExportError(f"Outputs {asked} are returned by metric bricks, which run outside the graph and "
                               f"cannot be exported; request model outputs instead.")
    specs, problems = collection.specs()
    kept = tuple(v for v in plan.outputs if v not in metric_values)
    return make_plan([spec for spec in specs if spec.in_graph], problems, stage, kept)


# --------------------------------------------------------------------------------------------- inputs
def example_args(target: Target, named_inputs: Mapping[str, Any]) -> tuple[torch.Tensor, ...]:
    if not isinstance(named_inputs, Mapping):
        raise BrickExportError(f"named_inputs must be a dict {{input name: tensor}}, "
                               f"not {type(named_inputs).__name__}.")
    check_inputs(target.plan, named_inputs)  # names the bricks that need a missing input
    bad = {n: type(named_inputs[n]).__name__ for n in target.input_names
           if not isinstance(named_inputs[n], torch.Tensor)}
    if bad:
        raise BrickExportError(f"Exported inputs must be tensors; got {bad} (stage {target.plan.stage.value} needs "
                               f"{list(target.input_names)}).")
    return tuple(named_inputs[n] for n in target.input_names)


def dynamic_axes(target: Target, args: Sequence[torch.Tensor], dynamic_batch: bool,
                 dynamic_shapes: Mapping[str, Mapping[int, Any]] | None,
                 batch_name: str = BATCH) -> list[dict[int, Any]]:
    """Per input, ``{axis: dim name or torch.export.Dim}``.  The batch axis is axis 0 of every input whose
    first size equals the batch size (the first input with a dimension's; inputs without it, e.g. a fixed
    anchor table, stay static); ``dynamic_shapes`` adds axes to it, renames or replaces axis 0, and makes an
    axis static with ``None`` or ``Dim.STATIC`` (an input whose first size equals the batch by chance)."""
    axes: list[dict[int, Any]] = [{} for _ in args]
    batch = batch_size_of(dict(zip(target.input_names, args, strict=True)), target.input_names)
    if dynamic_batch and batch == 0:
        raise BrickExportError("The example inputs have batch size 0; give at least one example (its values "
                               "are what the export is verified on), or pass dynamic_batch=False.")
    if dynamic_batch and batch is not None:
        for axis_map, arg in zip(axes, args, strict=True):
            if arg.dim() and arg.shape[0] == batch:
                axis_map[0] = batch_name
    unknown = sorted(set(dynamic_shapes or {}) - set(target.input_names))
    if unknown:
        raise BrickGraphError([f"dynamic_shapes names {unknown}, which are not inputs of the exported stage."],
                              hint=f"the exported inputs are {list(target.input_names)}.")
    for index, (name, arg) in enumerate(zip(target.input_names, args, strict=True)):
        if dynamic_shapes and name in dynamic_shapes:
            merged = {**axes[index], **_checked_axes(name, arg, dynamic_shapes[name])}
            axes[index] = {axis: dim for axis, dim in merged.items() if not is_static(dim)}
    return axes


def is_static(dim: Any) -> bool:
    """``None`` and ``Dim.STATIC`` in ``dynamic_shapes`` keep an axis at its example size."""
    return dim is None or dim is torch.export.Dim.STATIC


def is_checked_dynamic(dim: Any) -> bool:
    """Whether an artifact must keep this axis free: every dynamic axis but ``Dim.AUTO``, which lets the
    exporter decide."""
    return not is_static(dim) and dim is not torch.export.Dim.AUTO


def _checked_axes(name: str, arg: torch.Tensor, axes: Any) -> dict[int, Any]:
    if not isinstance(axes, Mapping):
        raise BrickExportError(f"dynamic_shapes[{name!r}] must be a dict {{axis: dimension name}}, not "
                               f"{type(axes).__name__}.")
    for axis, dim in axes.items():
        if not isinstance(axis, int) or isinstance(axis, bool) or not 0 <= axis < arg.dim():
            raise BrickExportError(f"dynamic_shapes names axis {axis!r} of {name!r}, which has {arg.dim()} "
                                   f"dimension(s) (shape {tuple(arg.shape)}); axes are 0 to {arg.dim() - 1}.")
        if not (is_static(dim) or isinstance(dim, (str, torch.export.Dim))
                or dim in (torch.export.Dim.AUTO, torch.export.Dim.DYNAMIC)):
            raise BrickExportError(f"dynamic_shapes[{name!r}][{axis}] is {dim!r}; give a dimension name (str), a "
                                   f"torch.export.Dim, Dim.AUTO or Dim.DYNAMIC, or None / Dim.STATIC to keep the "
                                   f"axis at its example size.")
    return dict(axes)


def export_dims(axes: Axes, or_none: bool = False, named: bool = True) -> tuple[dict[int, Any] | None, ...] | None:
    """``torch.export`` dynamic shapes: one ``Dim`` object per name, shared by every input that uses it
    (``None`` for a static input; with ``or_none``, ``None`` when no input is dynamic).  ``named=False``
    gives ``Dim.DYNAMIC`` instead, which lets torch.export infer ranges and equalities (e.g. cuDNN's
    batch <= 65535 guard on CUDA) where a plain named ``Dim`` is an error."""
    dims: dict[str, Any] = {}

    def dim(value: Any) -> Any:
        if not isinstance(value, str):
            return value  # a Dim (or Dim.AUTO / Dim.DYNAMIC) given by the user
        if not named:
            return torch.export.Dim.DYNAMIC
        return dims.setdefault(value, torch.export.Dim(value))

    shapes = tuple({axis: dim(value) for axis, value in axis_map.items()} or None for axis_map in axes)
    return None if or_none and all(shape is None for shape in shapes) else shapes


def trace_args(args: tuple[torch.Tensor, ...], axes: Axes) -> tuple[torch.Tensor, ...]:
    """The inputs to trace with: a dynamic axis 0 of size 1 is doubled (the example repeated), because
    torch.export specializes sizes 0 and 1 and would then refuse a dynamic batch."""
    if not any(0 in axis_map and arg.dim() and arg.shape[0] == 1 for arg, axis_map in zip(args, axes, strict=True)):
        return args
    return tuple(torch.cat([arg, arg]) if 0 in axis_map and arg.dim() and arg.shape[0] == 1 else arg
                 for arg, axis_map in zip(args, axes, strict=True))


def second_args(args: Sequence[torch.Tensor], axes: Axes) -> tuple[torch.Tensor, ...]:
    """Random inputs like the examples, one larger along every dynamic axis 0: values or sizes frozen at
    trace time then show up as a mismatch."""
    generator = torch.Generator().manual_seed(1234)
    second = []
    for arg, axis_map in zip(args, axes, strict=True):
        shape = list(arg.shape)
        if 0 in axis_map:
            shape[0] += 1
        second.append(random_like(arg, shape, generator))
    return tuple(second)


def random_like(example: torch.Tensor, shape: list[int], generator: torch.Generator) -> torch.Tensor:
    """Random values of ``example``'s dtype and device within its range (integers: often class ids or
    indices, so a single positive value is widened downwards, which keeps an index valid)."""
    if example.dtype == torch.bool:
        value = torch.randint(0, 2, shape, generator=generator).bool()
    elif example.is_floating_point():
        finite = example[torch.isfinite(example)]
        low, high = (float(finite.min()), float(finite.max())) if finite.numel() else (0.0, 1.0)
        high = high if high > low else low + 1.0
        value = torch.rand(shape, generator=generator, dtype=torch.float64) * (high - low) + low
    elif example.is_complex():
        raise BrickExportError("Complex inputs cannot be verified; pass verify=False.")
    else:
        low_i, high_i = (int(example.min()), int(example.max())) if example.numel() else (0, 1)
        if low_i == high_i > 0:  # one value (an all-ones mask, one token id): vary it, or a frozen value goes
            low_i -= 1  # unseen; downwards, so an index stays valid (0 stays: a table may have one row)
        value = torch.randint(low_i, high_i + 1, shape, generator=generator)
    return value.to(dtype=example.dtype, device=example.device)


# --------------------------------------------------------------------------------------------- eager
def eager_values(target: Target, args: Sequence[torch.Tensor]) -> dict[str, Any]:
    """Every value of the exported part of the stage on ``args``, computed by the stage's bound runtime in
    float32 without TF32 (the artifacts are compared in exact float32)."""
    device = args[0].device if args else torch.device("cpu")
    with exact_float32(device):
        return target.bound.run(dict(zip(target.input_names, args, strict=True)), metrics=False)


def eager_outputs(target: Target, values: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    bad = {n: type(values[n]).__name__ for n in target.output_names if not isinstance(values[n], torch.Tensor)}
    if bad:
        raise BrickExportError(f"Exported outputs must be tensors; got {bad} from {producers(target.plan, list(bad))}. "
                               f"Request tensor outputs with outputs=[...].")
    return {n: values[n].detach() for n in target.output_names}


def producers(plan: StagePlan, values: Sequence[str]) -> str:
    """``"'logits' (brick 'head'), ..."`` for messages."""
    return ", ".join(f"{v!r} (brick {plan.producer(v) or '?'!r})" for v in values)
