"""Deployment artifacts for one stage of a collection: ONNX (verified with ONNX Runtime) and ``torch.export``.

Both exporters work on the stage's GraphModule (one positional tensor per required input, a tuple of
outputs), so the artifact holds only the bricks the requested outputs need.  Around that:

* **names**: ONNX inputs/outputs carry the user's value names, not the graph's sanitized identifiers;
* **modes**: the stage's modes (eval for every stage but TRAIN) are set for the export and the caller's
  modes restored;
* **verification**: every output is compared with eager on the example inputs *and* on random inputs with
  another batch size, which catches values frozen at trace time (``.numpy()``, ``.item()``, shapes);
* **atomic files**: everything is written into a private folder next to the destination and moved into
  place only once verified; an existing file is kept unless ``overwrite=True``; a failure leaves nothing;
* **localization**: when the whole stage does not export, each live brick is exported alone (on its eager
  inputs) and the error names the bricks that fail, with their reasons.

onnx / onnxruntime are imported here only, and this module is imported lazily by the package.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import math
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.fx
from torch import nn

from torchbricks_fx.bricks import STAGE_INPUT, Brick
from torchbricks_fx.collection import BrickCollection
from torchbricks_fx.errors import BrickExportError, BrickGraphError
from torchbricks_fx.fx import build_graph_module
from torchbricks_fx.plan import BrickSpec, StagePlan, make_plan
from torchbricks_fx.runtime import (
    all_reads,
    bind_steps,
    check_inputs,
    enter_modes,
    exit_modes,
    preserved_state,
    run_steps,
    stage_modules,
    step_arguments,
)
from torchbricks_fx.stage import Stage, parse_stage

__all__ = ["ExportReport", "OutputError", "compare_tensors", "export_onnx", "export_program", "ort_providers",
           "tolerance"]

BATCH = "batch"
"""Name of the dynamic batch dimension in exported artifacts."""

# (rtol, atol) per dtype.  atol is scaled by the output's largest magnitude (at least 1), so that large
# logits are compared relatively and outputs near zero (ReLU features) do not need an rtol miracle.
_TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-7, 1e-7),
    torch.float32: (1e-4, 1e-4),
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (5e-2, 5e-2),
}
# cuDNN / cuBLAS pick other algorithms than onnxruntime's CUDA kernels; float32 sums differ a little more.
_CUDA_FLOAT32 = (1e-3, 1e-3)

# Keyword arguments of torch.onnx.export that export_onnx sets itself.
_RESERVED_ONNX_KWARGS = frozenset({"model", "args", "f", "kwargs", "input_names", "output_names", "dynamo",
                                   "dynamic_shapes", "dynamic_axes", "opset_version", "external_data"})


# ============================================================================================ results
@dataclass(frozen=True)
class OutputError:
    """How far one exported output is from eager, over every verification input.

    ``max_rel_error`` is the largest absolute error divided by the output's largest eager magnitude (an
    elementwise ratio explodes on values near zero).  ``ok`` is the dtype-aware check
    ``|exported - eager| <= atol * max(1, max|eager|) + rtol * |eager|`` on every element (exact for
    integer and bool outputs); ``note`` says why an output failed when it is not a plain value mismatch.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    max_abs_error: float
    max_rel_error: float
    rtol: float
    atol: float
    ok: bool
    note: str = ""


@dataclass(frozen=True)
class ExportReport:
    """What was written and how well it reproduces eager.  Data only; ``to_markdown()`` renders it."""

    path: Path
    format: str  # "onnx" | "pt2"
    stage: Stage
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    opset: int | None
    file_size_bytes: int
    providers: tuple[str, ...]  # onnxruntime execution providers used to verify (empty for .pt2)
    errors: tuple[OutputError, ...]
    verified: bool
    verified_batch_sizes: tuple[int, ...]
    dynamic_batch: bool
    dynamo: bool
    export_seconds: float
    verify_seconds: float

    @property
    def max_abs_error(self) -> float:
        return max((e.max_abs_error for e in self.errors), default=0.0)

    @property
    def max_rel_error(self) -> float:
        return max((e.max_rel_error for e in self.errors), default=0.0)

    def to_markdown(self) -> str:
        exporter = "torch.export" if self.format == "pt2" else ("dynamo" if self.dynamo else "legacy (TorchScript)")
        lines = [f"**{self.path.name}** ({self.format}, {self.file_size_bytes / 1e6:.2f} MB), stage "
                 f"`{self.stage.value}`, exporter {exporter}" + (f", opset {self.opset}" if self.opset else ""),
                 "",
                 f"- inputs: {', '.join(self.input_names)}; dynamic batch: {self.dynamic_batch}",
                 f"- export: {self.export_seconds:.2f} s; verification: "
                 + (f"{self.verify_seconds:.2f} s on batch sizes {list(self.verified_batch_sizes)}"
                    + (f" with {', '.join(self.providers)}" if self.providers else "") if self.verified else "skipped")]
        if self.errors:
            lines += ["", "| output | dtype | shape | max abs error | max rel error | ok |",
                      "|---|---|---|---|---|---|"]
            lines += [f"| {e.name} | {e.dtype} | {list(e.shape)} | {e.max_abs_error:.3g} | {e.max_rel_error:.3g} | "
                      f"{'yes' if e.ok else 'NO ' + e.note} |" for e in self.errors]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.to_markdown()


# ============================================================================================ the target
@dataclass(frozen=True)
class _Target:
    """The exported part of a stage: a metric-free plan, its GraphModule and the modules to put in mode."""

    plan: StagePlan
    graph_module: torch.fx.GraphModule
    bricks: dict[str, Brick]
    modules: tuple[nn.Module, ...]

    @property
    def input_names(self) -> tuple[str, ...]:
        return self.plan.required_inputs

    @property
    def output_names(self) -> tuple[str, ...]:
        return self.plan.outputs

    @property
    def training(self) -> bool:
        return self.plan.stage is Stage.TRAIN


def _target(collection: BrickCollection, stage: Stage, outputs: Sequence[str] | None) -> _Target:
    plan = _exported_plan(collection, stage, outputs)
    if not plan.outputs:
        raise BrickExportError(f"Stage {stage.value} produces no output to export (bricks: {list(plan.bricks)}).")
    bricks = collection.bricks()
    graph_module, graph_outputs = build_graph_module(plan, bricks)
    if tuple(graph_outputs) != tuple(plan.outputs):
        raise BrickExportError(f"The stage graph returns {list(graph_outputs)}, expected {list(plan.outputs)}.")
    modules = stage_modules([bricks[step.name] for step in plan.steps])
    # The GraphModule is listed too: the exporter warns when the top module is in training mode.
    return _Target(plan, graph_module, bricks, (graph_module, *modules))


def _exported_plan(collection: BrickCollection, stage: Stage, outputs: Sequence[str] | None) -> StagePlan:
    """The stage's plan without its metric bricks.  Metric bricks run outside the graph and only read it: an
    artifact has no use for them, nor for the outputs and bricks that only feed them, nor for their inputs
    (targets).  Planned from the collection's specs, so no collection is built or changed (adding a brick
    anywhere invalidates every collection's cached plans)."""
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


@contextlib.contextmanager
def _stage_modes(target: _Target) -> Iterator[None]:
    """The stage's modes, without gradients, while inside; afterwards the caller's modes (only the modules
    that were flipped are flipped back)."""
    flipped = enter_modes(target.modules, target.training)
    try:
        with torch.no_grad():
            yield
    finally:
        exit_modes(flipped, target.training)


@contextlib.contextmanager
def _exact_cuda_float32(device: torch.device) -> Iterator[None]:
    """TF32 off for the eager reference on CUDA: the artifact is exported in float32 and onnxruntime runs
    it with ``use_tf32=0``, so TF32 noise would only blur the comparison.  Uses the ``fp32_precision``
    settings where torch has them (reading the legacy ``allow_tf32`` flags raises once a user set the new
    ones), the legacy flags otherwise; the caller's settings are restored."""
    if device.type != "cuda":
        yield
        return
    settings = [getattr(torch.backends.cuda, "matmul", None), getattr(torch.backends.cudnn, "conv", None),
                getattr(torch.backends.cudnn, "rnn", None)]
    precision = [s for s in settings if s is not None and hasattr(s, "fp32_precision")]
    if len(precision) >= 2:  # torch >= 2.9: matmul and cuDNN convolutions (RNNs too where present)
        saved_precision = [s.fp32_precision for s in precision]
        try:
            for setting in precision:
                setting.fp32_precision = "ieee"
            yield
        finally:
            for setting, value in zip(precision, saved_precision, strict=True):
                setting.fp32_precision = value
        return
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


# ============================================================================================ inputs
def _example_args(target: _Target, named_inputs: Mapping[str, Any]) -> tuple[torch.Tensor, ...]:
    if not isinstance(named_inputs, Mapping):
        raise BrickExportError(f"named_inputs must be a dict {{input name: tensor}}, "
                               f"not {type(named_inputs).__name__}.")
    check_inputs(target.plan, dict(named_inputs))  # names the bricks that need a missing input
    bad = {n: type(named_inputs[n]).__name__ for n in target.input_names
           if not isinstance(named_inputs[n], torch.Tensor)}
    if bad:
        raise BrickExportError(f"Exported inputs must be tensors; got {bad} (stage {target.plan.stage.value} needs "
                               f"{list(target.input_names)}).")
    return tuple(named_inputs[n] for n in target.input_names)


def _dynamic_axes(target: _Target, args: Sequence[torch.Tensor], dynamic_batch: bool,
                  dynamic_shapes: Mapping[str, Mapping[int, Any]] | None,
                  batch_name: str = BATCH) -> list[dict[int, Any]]:
    """Per input, ``{axis: dim name or torch.export.Dim}``.  The batch axis is axis 0 of every input whose
    first size equals the first input's (inputs without it, e.g. a fixed anchor table, stay static);
    ``dynamic_shapes`` adds axes to it (and can rename or replace axis 0)."""
    axes: list[dict[int, Any]] = [{} for _ in args]
    batch = args[0].shape[0] if args and args[0].dim() else None
    if dynamic_batch and batch is not None:
        for axis_map, arg in zip(axes, args, strict=True):
            if arg.dim() and arg.shape[0] == batch:
                axis_map[0] = batch_name
    unknown = sorted(set(dynamic_shapes or {}) - set(target.input_names))
    if unknown:
        raise BrickGraphError([f"dynamic_shapes names {unknown}, which are not inputs of the exported stage."],
                              hint=f"the exported inputs are {list(target.input_names)}.")
    for index, name in enumerate(target.input_names):
        if dynamic_shapes and name in dynamic_shapes:
            axes[index] = {**axes[index], **dynamic_shapes[name]}
    return axes


def _dim_name(dim: Any, input_name: str, axis: int) -> str:
    return dim if isinstance(dim, str) else getattr(dim, "__name__", None) or f"{input_name}_dim{axis}"


def _export_dims(axes: Sequence[Mapping[int, Any]], or_none: bool = False,
                 named: bool = True) -> tuple[dict[int, Any] | None, ...] | None:
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


def _shapes_for(module: nn.Module, axes: Sequence[Mapping[int, Any]], named: bool = True) -> Any:
    shapes = _export_dims(axes, or_none=True, named=named)
    # A lone brick's wrapper takes *tensors, which torch.export sees as one tuple argument.
    return (shapes,) if shapes is not None and isinstance(module, _BrickAlone) else shapes


def _trace_args(args: tuple[torch.Tensor, ...], axes: Sequence[Mapping[int, Any]]) -> tuple[torch.Tensor, ...]:
    """The inputs to trace with: a dynamic axis 0 of size 1 is doubled (the example repeated), because
    torch.export specializes sizes 0 and 1 and would then refuse a dynamic batch."""
    if not any(0 in axis_map and arg.dim() and arg.shape[0] == 1 for arg, axis_map in zip(args, axes, strict=True)):
        return args
    return tuple(torch.cat([arg, arg]) if 0 in axis_map and arg.dim() and arg.shape[0] == 1 else arg
                 for arg, axis_map in zip(args, axes, strict=True))


def _second_args(args: Sequence[torch.Tensor], axes: Sequence[Mapping[int, Any]]) -> tuple[torch.Tensor, ...]:
    """Random inputs like the examples, one larger along every dynamic axis 0: values or sizes frozen at
    trace time then show up as a mismatch."""
    generator = torch.Generator().manual_seed(1234)
    second = []
    for arg, axis_map in zip(args, axes, strict=True):
        shape = list(arg.shape)
        if 0 in axis_map:
            shape[0] += 1
        second.append(_random_like(arg, shape, generator))
    return tuple(second)


def _random_like(example: torch.Tensor, shape: list[int], generator: torch.Generator) -> torch.Tensor:
    if example.dtype == torch.bool:
        value = torch.randint(0, 2, shape, generator=generator).bool()
    elif example.is_floating_point():
        finite = example[torch.isfinite(example)]
        low, high = (float(finite.min()), float(finite.max())) if finite.numel() else (0.0, 1.0)
        high = high if high > low else low + 1.0
        value = torch.rand(shape, generator=generator, dtype=torch.float64) * (high - low) + low
    elif example.is_complex():
        raise BrickExportError("Complex inputs cannot be verified; pass verify=False.")
    else:  # integers stay within the example's range (they are often indices or class ids)
        low_i, high_i = (int(example.min()), int(example.max())) if example.numel() else (0, 1)
        value = torch.randint(low_i, high_i + 1, shape, generator=generator)
    return value.to(dtype=example.dtype, device=example.device)


# ============================================================================================ eager
def _eager_values(target: _Target, args: Sequence[torch.Tensor]) -> dict[str, Any]:
    """Every value of the exported part of the stage on ``args``, computed by the eager runtime in plan
    order (metric bricks left out: verifying updates no metric)."""
    plan = target.plan
    named_inputs = dict(zip(target.input_names, args, strict=True))
    values: dict[str, Any] = {**named_inputs, STAGE_INPUT: plan.stage}
    steps = bind_steps(plan, [step for step in plan.steps if step.in_graph], target.bricks)
    device = args[0].device if args else torch.device("cpu")
    with _stage_modes(target), torch.set_grad_enabled(target.training), _exact_cuda_float32(device):
        run_steps(steps, values, named_inputs)
    return values


def _eager_outputs(target: _Target, values: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    bad = {n: type(values[n]).__name__ for n in target.output_names if not isinstance(values[n], torch.Tensor)}
    if bad:
        producers = _producers(target.plan, list(bad))
        raise BrickExportError(f"Exported outputs must be tensors; got {bad} from {producers}. Request tensor "
                               f"outputs with outputs=[...].")
    return {n: values[n].detach() for n in target.output_names}


def _producers(plan: StagePlan, values: Sequence[str]) -> str:
    owner = {v: step.name for step in plan.steps for v in step.outputs}
    return ", ".join(f"{v!r} (brick {owner.get(v, '?')!r})" for v in values)


# ============================================================================================ comparison
def tolerance(dtype: torch.dtype, device: torch.device | str = "cpu") -> tuple[float, float]:
    """``(rtol, atol)`` used to verify an output of ``dtype`` (integers and bool are exact)."""
    if dtype == torch.float32 and torch.device(device).type == "cuda":
        return _CUDA_FLOAT32
    return _TOLERANCES.get(dtype, (0.0, 0.0))


@dataclass(frozen=True)
class _Diff:
    max_abs: float
    max_rel: float
    ok: bool
    note: str = ""


def _compare(got: torch.Tensor, want: torch.Tensor, rtol: float, atol: float) -> _Diff:
    """``got`` against ``want`` elementwise: equal values (equal infinities included) and NaN against NaN
    count as no error; a NaN or infinity against anything else is an infinite error.  The rtol term uses
    the finite ``want`` values only.  Compared in float64 (complex128) on the CPU, after the dtypes were
    found equal, so no conversion hides a dtype change."""
    if tuple(got.shape) != tuple(want.shape):
        return _Diff(math.inf, math.inf, False, f"shape {list(got.shape)} != eager {list(want.shape)}")
    if got.dtype != want.dtype:
        return _Diff(math.inf, math.inf, False, f"dtype {got.dtype} != eager {want.dtype}")
    if not want.numel():
        return _Diff(0.0, 0.0, True)
    got, want = got.detach().cpu(), want.detach().cpu()
    if not (want.is_floating_point() or want.is_complex()):  # integers and bool: exact
        equal = bool(torch.equal(got, want))
        max_abs = float((got.double() - want.double()).abs().max())
        max_abs = max_abs if equal else max(max_abs, 1.0)  # float64 rounds large int64 differences to 0
        scale = float(want.double().abs().max())
        return _Diff(max_abs, max_abs / scale if scale > 0 else max_abs, equal)
    wide = torch.complex128 if want.is_complex() else torch.float64
    got64, want64 = got.to(wide), want.to(wide)
    same = (got64 == want64) | (torch.isnan(got64) & torch.isnan(want64))  # == covers equal infinities
    diff = torch.where(same, torch.zeros((), dtype=torch.float64), (got64 - want64).abs())
    diff = torch.nan_to_num(diff, nan=math.inf, posinf=math.inf)  # one-sided NaN: an error, never 0
    finite = torch.isfinite(want64)
    magnitude = torch.where(finite, want64.abs(), torch.zeros((), dtype=torch.float64))
    scale = float(magnitude.max())
    max_abs = float(diff.max())
    ok = bool((diff <= atol * max(1.0, scale) + rtol * magnitude).all())
    return _Diff(max_abs, max_abs / scale if scale > 0 else max_abs, ok)


def compare_tensors(got: torch.Tensor, want: torch.Tensor,
                    device: torch.device | str = "cpu") -> tuple[bool, float, float]:
    """``(ok, max_abs_error, max_rel_error)`` of ``got`` against the reference ``want``, with export's
    tolerance for ``want``'s dtype on ``device`` (see :func:`tolerance`).

    Equal infinities and NaN against NaN are no error (a ``masked_fill(-inf)`` output compares equal);
    a different shape or dtype is a mismatch with infinite error; the relative term uses finite ``want``
    values only; ``max_rel_error`` is the largest absolute error over ``want``'s largest finite magnitude."""
    diff = _compare(got, want, *tolerance(want.dtype, device))
    return diff.ok, diff.max_abs, diff.max_rel


def _output_errors(runs: Sequence[tuple[Mapping[str, torch.Tensor], Mapping[str, torch.Tensor]]],
                   names: Sequence[str], device: torch.device) -> tuple[OutputError, ...]:
    """One :class:`OutputError` per output over every ``(exported, eager)`` run."""
    errors = []
    for name in names:
        want = runs[0][1][name]
        rtol, atol = tolerance(want.dtype, device)
        diffs = [_compare(got[name], eager[name], rtol, atol) if name in got
                 else _Diff(math.inf, math.inf, False, "missing from the artifact") for got, eager in runs]
        notes = [d.note for d in diffs if d.note]
        errors.append(OutputError(name=name, dtype=str(want.dtype).replace("torch.", ""), shape=tuple(want.shape),
                                  max_abs_error=max(d.max_abs for d in diffs),
                                  max_rel_error=max(d.max_rel for d in diffs), rtol=rtol, atol=atol,
                                  ok=all(d.ok for d in diffs), note=notes[0] if notes else ""))
    return tuple(errors)


_TRAIN_HINT = (" The stage is TRAIN: modules run in train mode (BatchNorm batch statistics, random dropout), which "
               "an exporter may write in eval form or which differs from run to run; export an eval stage (EXPORT, "
               "INFERENCE) for deployment.")


def _check_errors(errors: Sequence[OutputError], target: _Target, what: str) -> None:
    bad = [e for e in errors if not e.ok]
    if not bad:
        return
    details = "\n".join(f"- {_producers(target.plan, [e.name])}: max abs error {e.max_abs_error:.3g}, max rel "
                        f"error {e.max_rel_error:.3g} (rtol {e.rtol:g}, atol {e.atol:g})"
                        + (f"; {e.note}" if e.note else "") for e in bad)
    raise BrickExportError(f"The {what} does not reproduce eager for outputs {[e.name for e in bad]}:\n{details}\n"
                           "Hint: a mismatch only on the second (random, other batch size) input means a value was "
                           "frozen at trace time: .numpy()/.item()/Python numbers from tensors, or a shape used as a "
                           "constant." + (_TRAIN_HINT if target.training else "") + " Nothing was written.")


# ============================================================================================ files
@contextlib.contextmanager
def _staged_file(path: Path, overwrite: bool) -> Iterator[Path]:
    """Yields a file path in a private folder next to ``path``; when the block succeeds, moves what was
    written there into place (:func:`_commit`).  Removes the folder in any case, and the folders it created
    when nothing was written."""
    _refuse_existing(path, overwrite)
    created = _make_parents(path.parent)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    committed = False
    try:
        yield staging / path.name
        _commit(staging, path, overwrite)
        committed = True
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if not committed:
            for folder in reversed(created):
                with contextlib.suppress(OSError):
                    folder.rmdir()


def _refuse_existing(path: Path, overwrite: bool) -> None:
    if path.exists() and not overwrite:
        raise BrickExportError(f"{path} already exists; pass overwrite=True to replace it.")


def _make_parents(folder: Path) -> list[Path]:
    missing = [p for p in [folder, *folder.parents] if not p.exists()][::-1]
    folder.mkdir(parents=True, exist_ok=True)
    return missing


def _commit(staging: Path, path: Path, overwrite: bool) -> None:
    """Moves the staged files next to ``path``: external data first, the main file last, so a partial move
    never leaves a loadable new artifact.  Replacing (``overwrite``), the files it replaces are kept in the
    staging folder until the main file is in place and put back on failure; the previous file's external
    data that the new file does not have (``<name>.data``) is removed only after the new file is in place."""
    folder = path.parent
    names = [*sorted(p.name for p in staging.iterdir() if p.name != path.name), path.name]
    if not overwrite:
        _move_all(staging, folder, names)
        return
    stale = [folder / n for n in (f"{path.name}.data",) if n not in names and (folder / n).exists()]
    previous = Path(tempfile.mkdtemp(prefix=".previous.", dir=staging))  # removed with the staging folder
    kept = {name: _keep(folder / name, previous / name) for name in names if (folder / name).exists()}
    moved: list[str] = []
    try:
        for name in names:
            os.replace(staging / name, folder / name)
            moved.append(name)
    except BaseException:
        for name in reversed(moved):
            if name in kept:
                os.replace(kept[name], folder / name)
            else:
                (folder / name).unlink(missing_ok=True)
        raise
    for sidecar in stale:
        sidecar.unlink(missing_ok=True)


def _keep(source: Path, copy: Path) -> Path:
    """A second name (or, without hard links, a copy) of ``source``, to put it back after a failed move."""
    try:
        os.link(source, copy)
    except OSError:
        shutil.copy2(source, copy)
    return copy


def _move_all(staging: Path, folder: Path, names: Sequence[str]) -> None:
    moved: list[Path] = []
    try:
        for name in names:
            _move_new(staging / name, folder / name)
            moved.append(folder / name)
    except BaseException:
        for done in moved:
            done.unlink(missing_ok=True)
        raise


def _move_new(source: Path, destination: Path) -> None:
    try:
        os.link(source, destination)  # atomic "create only if absent"
    except FileExistsError:
        raise BrickExportError(f"{destination} already exists; pass overwrite=True to replace it.") from None
    except OSError:  # file systems without hard links
        if destination.exists():
            raise BrickExportError(f"{destination} already exists; pass overwrite=True to replace it.") from None
        os.replace(source, destination)


def _size(staged: Path) -> int:
    """The artifact's bytes, external data files included (the staging folder holds nothing else)."""
    return sum(p.stat().st_size for p in staged.parent.iterdir() if p.is_file())


# ============================================================================================ failures
class _BrickAlone(nn.Module):
    """One brick as a module of positional tensors, fed its eager inputs, for localizing export failures;
    called as the stage calls it (:func:`runtime.step_arguments`), its non-tensor inputs held constant."""

    def __init__(self, module: nn.Module, plan: StagePlan, step: BrickSpec, tensor_names: Sequence[str],
                 constants: dict[str, Any]) -> None:
        super().__init__()
        self.brick = module
        self.plan = plan
        self.step = step
        self.tensor_names = tuple(tensor_names)
        self.constants = constants

    def forward(self, *tensors: torch.Tensor) -> Any:
        values = {**self.constants, **dict(zip(self.tensor_names, tensors, strict=True))}
        args, kwargs = step_arguments(self.plan, self.step, values)
        return self.brick(*args, **kwargs)


def _brick_alone(target: _Target, step: BrickSpec, values: Mapping[str, Any]) -> tuple[_BrickAlone, tuple[Any, ...]]:
    names = all_reads(target.plan, step) if step.takes_all else step.input_values
    names = tuple(n for n in dict.fromkeys(names) if n in values)
    tensors = [n for n in names if isinstance(values[n], torch.Tensor)]
    constants = {n: values[n] for n in names if n not in tensors}
    module = _BrickAlone(target.bricks[step.name].graph_module(), target.plan, step, tensors, constants)
    return module, tuple(values[n] for n in tensors)


def _reason(error: BaseException) -> str:
    """The informative line of an exporter error (torch.onnx wraps the cause under "Exception summary")."""
    text = str(error)
    if "## Exception summary" in text:
        text = text.split("## Exception summary", 1)[1]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    line = lines[0] if lines else ""
    if len(line) > 300:
        line = line[:297] + "..."
    return f"{type(error).__name__}: {line}"


_TryExport = Callable[[nn.Module, tuple[Any, ...], list[dict[int, Any]]], None]


def _localized_failure(exporter: _Exporter, target: _Target, trace_args: tuple[torch.Tensor, ...],
                       axes: Sequence[Mapping[int, Any]], values: Mapping[str, Any],
                       error: Exception) -> BrickExportError:
    """:func:`_localized_error` on the values of the traced inputs (those differ when a batch of one was
    doubled for tracing)."""
    missing = _missing_module(error)
    if missing is not None:  # an environment problem, not a brick's: do not blame the bricks
        return BrickExportError(f"Exporting stage {target.plan.stage.value} {exporter.what} needs the module "
                                f"{missing!r}, which is not installed (the dynamo exporter needs onnxscript); "
                                f"install it or pass dynamo=False.")
    batch = _batch_size(trace_args) if any(0 in axis_map for axis_map in axes) else None
    traced_example = all(a is values[n] for n, a in zip(target.input_names, trace_args, strict=True))
    trace_values = values if traced_example else _eager_values(target, trace_args)
    return _localized_error(exporter, target, trace_values, error, batch)


def _missing_module(error: BaseException) -> str | None:
    """The module that is not installed, when ``error`` (or what it was raised from) says so."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if isinstance(current, ModuleNotFoundError):
            return current.name or str(current)
        seen.add(id(current))
        current = current.__cause__  # explicit chaining only: handled optional imports are not the problem
    return None


def _localized_error(exporter: _Exporter, target: _Target, values: Mapping[str, Any], error: Exception,
                     batch: int | None) -> BrickExportError:
    """Exports every live brick alone to find the ones that cannot be exported.  When every brick (of two or
    more) fails alone exactly as the whole stage did, the bricks are not the cause: the export's
    configuration is (options, opset, installed exporter)."""
    stage, what = target.plan.stage.value, exporter.what
    failures: list[tuple[BrickSpec, nn.Module, Exception]] = []
    with _stage_modes(target), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for step in target.plan.steps:
            module, args = _brick_alone(target, step, values)
            axes = [{0: BATCH} if batch is not None and a.dim() and a.shape[0] == batch else {} for a in args]
            module.training = target.training  # the wrapper only; the bricks are in the stage's mode already
            try:
                exporter.try_brick(module, args, axes)
            except Exception as brick_error:
                failures.append((step, module.brick, brick_error))
    same = [(type(e), _reason(e)) == (type(error), _reason(error)) for _, _, e in failures]
    if len(failures) > 1 and len(failures) == len(target.plan.steps) and all(same):
        return BrickExportError(f"Exporting stage {stage} {what} failed, and every brick fails alone with the same "
                                f"error, so the cause is the export's configuration (options, opset, installed "
                                f"exporter), not a brick: {_reason(error)}\nHint: {exporter.config_hint}")
    if failures:
        message = (f"Exporting stage {stage} {what} failed; these bricks cannot be exported:\n"
                   + "\n".join(f"- brick {step.name!r} ({type(brick).__name__}): {_reason(brick_error)}"
                                for step, brick, brick_error in failures))
    else:
        message = (f"Exporting stage {stage} {what} failed although every brick ({', '.join(target.plan.bricks)}) "
                   f"exports on its own; the failure comes from their combination: {_reason(error)}")
    return BrickExportError(f"{message}\nHint: {exporter.hint}")


_TORCH_EXPORT_HINT = ("torch.export needs code without data-dependent Python control flow (no if/for on tensor "
                      "values, no .item()/.numpy()); see the chained exception for the full trace")
_EXPORTER_HINTS = {
    "dynamo": f"the dynamo exporter traces with torch.export: {_TORCH_EXPORT_HINT}; or try dynamo=False / "
              "dynamic_batch=False.",
    "legacy": "the legacy exporter traces with TorchScript (torch.jit.trace), which needs tensor inputs and "
              "outputs and ONNX-convertible operators; see the chained exception for the full trace, or try "
              "dynamo=True.",
    "torch.export": f"{_TORCH_EXPORT_HINT}; or try strict=True/False or dynamic_batch=False.",
}


# ============================================================================================ the sequence
_Runs = Sequence[tuple[tuple[torch.Tensor, ...], dict[str, torch.Tensor]]]


@dataclass(frozen=True)
class _Exporter:
    """What differs between the artifacts; :func:`_export` runs the sequence they share."""

    format: str  # "onnx" | "pt2"
    what: str  # "to ONNX": how messages name the export
    artifact: str  # "ONNX file": how messages name the file
    dynamo: bool
    double_batch_of_one: bool  # torch.export specializes sizes 0 and 1 (the legacy exporter does not)
    write: Callable[[_Target, tuple[torch.Tensor, ...], Sequence[Mapping[int, Any]], Path], None]
    try_brick: _TryExport
    verify: Callable[[Path, _Target, _Runs], tuple[tuple[OutputError, ...], tuple[str, ...]]]
    inspect: Callable[[Path, _Target], int | None]  # checks the written file; returns its opset
    hint: str
    config_hint: str


def _export(exporter: _Exporter, collection: BrickCollection, path: str | os.PathLike[str],
            named_inputs: Mapping[str, torch.Tensor], *, stage: Stage | str, outputs: Sequence[str] | None,
            dynamic_batch: bool, dynamic_shapes: Mapping[str, Mapping[int, Any]] | None, verify: bool,
            overwrite: bool, batch_name: str = BATCH) -> ExportReport:
    """Target, inputs, axes, eager reference, export into a staged file (localizing a failure), verification,
    report; the file is moved into place only when all of it succeeded.  A TRAIN stage runs its eager
    references in train mode: the model's buffers (BatchNorm statistics) are restored afterwards."""
    stage = parse_stage(stage)
    path = Path(path)
    _refuse_existing(path, overwrite)  # fail before any work; checked again when the file is moved in
    target = _target(collection, stage, outputs)
    args = _example_args(target, named_inputs)
    axes = _dynamic_axes(target, args, dynamic_batch, dynamic_shapes, batch_name)
    trace_args = _trace_args(args, axes) if exporter.double_batch_of_one else args
    live = nn.ModuleList([target.bricks[step.name] for step in target.plan.steps])  # the bricks, not a copy
    kept = preserved_state(live) if target.training else contextlib.nullcontext()
    with kept:
        values = _eager_values(target, args)  # before exporting: eager errors are the user's; localizing needs them
        with _staged_file(path, overwrite) as staged:
            start = time.perf_counter()
            try:
                with _stage_modes(target):
                    exporter.write(target, trace_args, axes, staged)
            except (BrickExportError, OSError):
                raise  # our own checks and file system errors are not the bricks'
            except Exception as error:
                raise _localized_failure(exporter, target, trace_args, axes, values, error) from error
            export_seconds = time.perf_counter() - start
            opset = exporter.inspect(staged, target)
            errors: tuple[OutputError, ...] = ()
            providers: tuple[str, ...] = ()
            batches: tuple[int, ...] = ()
            verify_seconds = 0.0
            if verify:
                start = time.perf_counter()
                runs = _verification_runs(target, args, axes, values)
                errors, providers = exporter.verify(staged, target, runs)
                verify_seconds = time.perf_counter() - start
                batches = tuple(_batch_size(run_args) for run_args, _ in runs)
                _check_errors(errors, target, exporter.artifact)
            size = _size(staged)
    return ExportReport(path=path, format=exporter.format, stage=stage, input_names=target.input_names,
                        output_names=target.output_names, opset=opset, file_size_bytes=size, providers=providers,
                        errors=errors, verified=verify, verified_batch_sizes=batches,
                        dynamic_batch=any(0 in a for a in axes), dynamo=exporter.dynamo,
                        export_seconds=export_seconds, verify_seconds=verify_seconds)


# ============================================================================================ onnx
def _onnx_export(module: nn.Module, args: tuple[Any, ...], destination: Path | None, *,
                 input_names: Sequence[str] | None, output_names: Sequence[str] | None,
                 axes: Sequence[Mapping[int, Any]], opset: int | None, dynamo: bool, external_data: bool | None,
                 extra: Mapping[str, Any], batch_name: str = BATCH) -> None:
    """Runs ``torch.onnx.export``; with ``destination`` the model is saved there (and only there)."""
    names = list(input_names) if input_names is not None else [f"input_{k}" for k in range(len(args))]
    options: dict[str, Any] = {"opset_version": opset, "input_names": names,
                               "output_names": list(output_names) if output_names is not None else None, **extra}
    if dynamo:
        options.setdefault("verbose", False)
        program = torch.onnx.export(module, args, None, dynamo=True, dynamic_shapes=_shapes_for(module, axes),
                                    **options)
        if destination is not None and program is not None:
            # f=None and an explicit save: f=path would also write path.data next to it (see DESIGN pitfalls).
            program.save(destination, external_data=external_data)
        return
    dynamic_axes = {name: {axis: _dim_name(dim, name, axis) for axis, dim in axis_map.items()}
                    for name, axis_map in zip(names, axes, strict=True) if axis_map}
    if output_names is not None and any(_dim_name(a.get(0), "", 0) == batch_name for a in axes if 0 in a):
        dynamic_axes.update({name: {0: batch_name} for name in output_names})
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
        sink: Any = str(destination) if destination is not None else io.BytesIO()
        torch.onnx.export(module, args, sink, dynamo=False, dynamic_axes=dynamic_axes or None, **options)


def _onnx_names(path: Path) -> tuple[list[str], list[str], int | None]:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    return [i.name for i in model.graph.input], [o.name for o in model.graph.output], opset


def ort_providers(device: torch.device | str) -> list[Any]:
    """The onnxruntime execution providers for inputs on ``device``: CUDA (TF32 off, ``use_tf32="0"``, so
    results match the float32 numerics export verified) when ``device`` is CUDA and this onnxruntime has it,
    then CPU as fallback; CPU only otherwise."""
    import onnxruntime as ort

    device = torch.device(device)
    if device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
        options = {"device_id": str(device.index or 0), "use_tf32": "0"}
        return [("CUDAExecutionProvider", options), "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def _ort_outputs(session: Any, names: Sequence[str], args: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
    by_name = dict(zip(names, args, strict=True))
    unknown = [i.name for i in session.get_inputs() if i.name not in by_name]
    if unknown:
        raise BrickExportError(f"The ONNX file has inputs {unknown} that the stage does not have ({list(names)}).")
    if any(a.dtype == torch.bfloat16 for a in args):
        raise BrickExportError("bfloat16 inputs cannot be fed to onnxruntime from numpy; pass verify=False.")
    # Feed the session's own input list: the legacy exporter drops inputs whose values it froze.
    feed = {i.name: by_name[i.name].detach().cpu().numpy() for i in session.get_inputs()}
    results = session.run(None, feed)
    return {o.name: torch.from_numpy(r) for o, r in zip(session.get_outputs(), results, strict=True)}


def _verify_onnx(path: Path, target: _Target, runs: Sequence[tuple[tuple[torch.Tensor, ...], dict[str, torch.Tensor]]]
                 ) -> tuple[tuple[OutputError, ...], tuple[str, ...]]:
    import onnxruntime as ort

    device = runs[0][0][0].device if runs[0][0] else torch.device("cpu")
    try:
        session = ort.InferenceSession(str(path), providers=ort_providers(device))
        dropped = [n for n in target.input_names if n not in {i.name for i in session.get_inputs()}]
        if dropped:
            warnings.warn(f"The ONNX file has no input {dropped}: the exporter found that no output depends on "
                          f"them (or froze their values; verification checks that).", stacklevel=3)
        compared = [(_ort_outputs(session, target.input_names, args), eager) for args, eager in runs]
    except BrickExportError:
        raise
    except Exception as error:  # the file is only worth writing if onnxruntime can run it
        raise BrickExportError(f"ONNX Runtime cannot run the exported file: {_reason(error)}\nNothing was "
                               f"written; pass verify=False to keep an unverified file.") from error
    return _output_errors(compared, target.output_names, device), tuple(session.get_providers())


def _check_onnx_kwargs(extra: Mapping[str, Any]) -> None:
    reserved = sorted(_RESERVED_ONNX_KWARGS & set(extra))
    if reserved:
        raise BrickExportError(f"onnx_export_kwargs must not set {reserved}: export_onnx sets them itself (use "
                               f"dynamic_batch / dynamic_shapes / opset / dynamo).")
    parameters = inspect.signature(torch.onnx.export).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return
    unknown = sorted(set(extra) - set(parameters))
    if unknown:
        accepted = sorted(set(parameters) - _RESERVED_ONNX_KWARGS)
        raise BrickExportError(f"onnx_export_kwargs {unknown} are not arguments of torch.onnx.export; this torch "
                               f"accepts {accepted}.")


def export_onnx(collection: BrickCollection, path: str | os.PathLike[str], named_inputs: Mapping[str, torch.Tensor], *,
                stage: Stage | str = Stage.EXPORT, outputs: Sequence[str] | None = None, dynamic_batch: bool = True,
                dynamic_shapes: Mapping[str, Mapping[int, Any]] | None = None, opset: int | None = None,
                verify: bool = True, overwrite: bool = False, dynamo: bool = True,
                external_data: bool | None = None,
                onnx_export_kwargs: Mapping[str, Any] | None = None) -> ExportReport:
    """Exports ``stage`` of ``collection`` to an ONNX file and verifies it with onnxruntime against eager.

    ONNX input names are the stage's required inputs, output names the requested ``outputs`` (default:
    every value the stage's bricks produce).  ``dynamic_batch`` makes axis 0 of the inputs (those with the
    first input's batch size) and of the outputs dynamic; ``dynamic_shapes`` ``{input name: {axis: name or
    torch.export.Dim}}`` adds other axes.  ``dynamo=True`` uses the torch.export-based exporter,
    ``dynamo=False`` the legacy TorchScript one.  ``verify`` compares every output with eager on the example
    inputs and on random inputs with batch size + 1.  ``external_data`` (dynamo only; default: only above
    2 GB) stores the weights in ``<path>.data``.  ``onnx_export_kwargs`` go to ``torch.onnx.export``.

    Raises ``BrickExportError`` (export failed: names the bricks; outputs differ; file exists; unknown
    ``onnx_export_kwargs``) and ``BrickGraphError`` (unknown outputs, missing inputs).  Nothing is written
    unless everything succeeded.
    """
    return _export_onnx(collection, path, named_inputs, stage=stage, outputs=outputs, dynamic_batch=dynamic_batch,
                        dynamic_shapes=dynamic_shapes, opset=opset, verify=verify, overwrite=overwrite,
                        dynamo=dynamo, external_data=external_data, onnx_export_kwargs=onnx_export_kwargs)


def _export_onnx(collection: BrickCollection, path: str | os.PathLike[str], named_inputs: Mapping[str, torch.Tensor],
                 *, stage: Stage | str, outputs: Sequence[str] | None, dynamic_batch: bool,
                 dynamic_shapes: Mapping[str, Mapping[int, Any]] | None, opset: int | None, verify: bool,
                 overwrite: bool, dynamo: bool, external_data: bool | None,
                 onnx_export_kwargs: Mapping[str, Any] | None, batch_name: str = BATCH) -> ExportReport:
    """:func:`export_onnx` with the name of the batch dimension (the seed helper calls it ``batch_size``)."""
    extra = dict(onnx_export_kwargs or {})
    _check_onnx_kwargs(extra)

    def write(target: _Target, args: tuple[torch.Tensor, ...], axes: Sequence[Mapping[int, Any]],
              staged: Path) -> None:
        _onnx_export(target.graph_module, args, staged, input_names=target.input_names,
                     output_names=target.output_names, axes=axes, opset=opset, dynamo=dynamo,
                     external_data=external_data, extra=extra, batch_name=batch_name)

    def try_brick(module: nn.Module, brick_args: tuple[Any, ...], brick_axes: list[dict[int, Any]]) -> None:
        _onnx_export(module, brick_args, None, input_names=None, output_names=None, axes=brick_axes, opset=opset,
                     dynamo=dynamo, external_data=None, extra=extra)

    exporter = _Exporter(format="onnx", what="to ONNX", artifact="ONNX file", dynamo=dynamo,
                         double_batch_of_one=dynamo, write=write, try_brick=try_brick, verify=_verify_onnx,
                         inspect=_inspect_onnx, hint=_EXPORTER_HINTS["dynamo" if dynamo else "legacy"],
                         config_hint="check opset and onnx_export_kwargs, or try dynamo=" + str(not dynamo) + ".")
    return _export(exporter, collection, path, named_inputs, stage=stage, outputs=outputs,
                   dynamic_batch=dynamic_batch, dynamic_shapes=dynamic_shapes, verify=verify, overwrite=overwrite,
                   batch_name=batch_name)


def _inspect_onnx(staged: Path, target: _Target) -> int | None:
    inputs, outputs, opset = _onnx_names(staged)
    if outputs != list(target.output_names) or not set(inputs) <= set(target.input_names):
        raise BrickExportError(f"The exporter named the ONNX inputs {inputs} and outputs {outputs}, expected "
                               f"{list(target.input_names)} and {list(target.output_names)}.")
    return opset


def _batch_size(args: Sequence[torch.Tensor]) -> int:
    return int(args[0].shape[0]) if args and args[0].dim() else 1


def _verification_runs(target: _Target, args: tuple[torch.Tensor, ...], axes: Sequence[Mapping[int, Any]],
                       values: Mapping[str, Any]) -> list[tuple[tuple[torch.Tensor, ...], dict[str, torch.Tensor]]]:
    """``(inputs, eager outputs)`` for the example inputs and for random inputs with another batch size."""
    second = _second_args(args, axes)
    return [(args, _eager_outputs(target, values)),
            (second, _eager_outputs(target, _eager_values(target, second)))]


# ============================================================================================ torch.export
class _NamedStage(nn.Module):
    """The stage with the user's names: ``forward({input name: tensor}) -> {output name: tensor}``."""

    def __init__(self, graph_module: torch.fx.GraphModule, input_names: Sequence[str],
                 output_names: Sequence[str]) -> None:
        super().__init__()
        self.stage = graph_module
        self.input_names = tuple(input_names)
        self.output_names = tuple(output_names)

    def forward(self, named_inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        results = self.stage(*[named_inputs[name] for name in self.input_names])
        return dict(zip(self.output_names, results, strict=True))


def _program(module: nn.Module, args: tuple[Any, ...], axes: Sequence[Mapping[int, Any]], strict: bool) -> Any:
    return torch.export.export(module, args, dynamic_shapes=_shapes_for(module, axes, named=False), strict=strict)


def export_program(collection: BrickCollection, path: str | os.PathLike[str],
                   named_inputs: Mapping[str, torch.Tensor], *,
                   stage: Stage | str = Stage.EXPORT, outputs: Sequence[str] | None = None,
                   dynamic_batch: bool = True, dynamic_shapes: Mapping[str, Mapping[int, Any]] | None = None,
                   verify: bool = True, overwrite: bool = False, strict: bool = False) -> ExportReport:
    """Saves ``stage`` of ``collection`` as a ``torch.export`` ExportedProgram (``.pt2``).

    The program takes one dict ``{input name: tensor}`` and returns ``{output name: tensor}``, with the
    user's names: ``torch.export.load(path).module()({"raw": x})``.  Dynamic batch, verification (on the
    example inputs and on random inputs with batch size + 1, after loading the saved file), atomic writes
    and failure localization work as in :func:`export_onnx`.
    """

    def write(target: _Target, args: tuple[torch.Tensor, ...], axes: Sequence[Mapping[int, Any]],
              staged: Path) -> None:
        module = _NamedStage(target.graph_module, target.input_names, target.output_names)
        module.training = target.training
        dims = _export_dims(axes, named=False) or ()  # a .pt2 has no axis names to keep
        named_dims = (dict(zip(target.input_names, dims, strict=True)),) if any(d is not None for d in dims) else None
        named = dict(zip(target.input_names, args, strict=True))
        program = torch.export.export(module, (named,), dynamic_shapes=named_dims, strict=strict)
        torch.export.save(program, staged)

    def try_brick(brick: nn.Module, brick_args: tuple[Any, ...], brick_axes: list[dict[int, Any]]) -> None:
        _program(brick, brick_args, brick_axes, strict)

    exporter = _Exporter(format="pt2", what="with torch.export", artifact="exported program", dynamo=True,
                         double_batch_of_one=True, write=write, try_brick=try_brick, verify=_verify_program,
                         inspect=lambda staged, target: None, hint=_EXPORTER_HINTS["torch.export"],
                         config_hint=f"try strict={not strict}.")
    return _export(exporter, collection, path, named_inputs, stage=stage, outputs=outputs,
                   dynamic_batch=dynamic_batch, dynamic_shapes=dynamic_shapes, verify=verify, overwrite=overwrite)


def _verify_program(staged: Path, target: _Target, runs: _Runs) -> tuple[tuple[OutputError, ...], tuple[str, ...]]:
    loaded = torch.export.load(staged).module()
    device = runs[0][0][0].device if runs[0][0] else torch.device("cpu")
    with torch.no_grad(), _exact_cuda_float32(device):  # same numerics as the eager reference
        compared = [(loaded(dict(zip(target.input_names, run_args, strict=True))), eager) for run_args, eager in runs]
    return _output_errors(compared, target.output_names, device), ()
