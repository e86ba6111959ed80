"""The sequence every exporter shares: target, inputs, axes, eager reference, export into a staged file
(localizing a failure), read-back, verification, report; the file is moved into place only when all of it
succeeded."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from torchbricks_fx.arity import check_arity
from torchbricks_fx.errors import BrickExportError, error_summary
from torchbricks_fx.export.localize import (
    SPECIALIZED_HINT,
    SpecializedAxes,
    TraceWarnings,
    TryExport,
    localized_failure,
)
from torchbricks_fx.export.report import ExportReport
from torchbricks_fx.export.target import (
    BATCH,
    Axes,
    Target,
    dynamic_axes,
    eager_outputs,
    eager_values,
    example_args,
    make_target,
    producers,
    second_args,
    trace_args,
)
from torchbricks_fx.files import as_path, check_destination, staged_file
from torchbricks_fx.numerics import OutputError
from torchbricks_fx.runtime import batch_size_of, preserved_state
from torchbricks_fx.stage import Stage, parse_stage

if TYPE_CHECKING:
    from torchbricks_fx.collection import BrickCollection

Runs = Sequence[tuple[tuple[torch.Tensor, ...], dict[str, torch.Tensor]]]
"""``(inputs, eager outputs)`` pairs the artifact is verified on."""


@dataclass(frozen=True)
class Exporter:
    """What differs between the artifacts; :func:`run_export` runs the sequence they share."""

    format: str  # "onnx" | "pt2"
    what: str  # "to ONNX": how messages name the export
    artifact: str  # "ONNX file": how messages name the file
    dynamo: bool
    double_batch_of_one: bool  # torch.export specializes sizes 0 and 1 (the legacy exporter does not)
    write: Callable[[Target, tuple[torch.Tensor, ...], Axes, Path], None]
    try_brick: TryExport
    read_back: Callable[[Path, Target], int | None]  # loads and checks the written file; returns its opset
    verify: Callable[[Path, Target, Runs], tuple[tuple[OutputError, ...], tuple[str, ...]]]
    hint: str
    config_hint: str
    warning_hint: str = ""  # used instead of ``hint`` when the tracer warned (see ``TraceWarnings``)
    sidecars: Callable[[Path], Sequence[str]] = lambda path: ()  # files beside ``path`` that belong to it


_TRAIN_HINT = (" The stage is TRAIN: modules run in train mode (BatchNorm batch statistics, random dropout), which "
               "an exporter may write in eval form or which differs from run to run; export an eval stage (EXPORT, "
               "INFERENCE) for deployment.")


def check_errors(errors: Sequence[OutputError], target: Target, artifact: str) -> None:
    bad = [e for e in errors if not e.ok]
    if not bad:
        return
    details = "\n".join(f"- {producers(target.plan, [e.name])}: max abs error {e.max_abs_error:.3g}, max rel "
                        f"error {e.max_rel_error:.3g} (rtol {e.rtol:g}, atol {e.atol:g})"
                        + (f"; {e.note}" if e.note else "") for e in bad)
    raise BrickExportError(f"The {artifact} does not reproduce eager for outputs {[e.name for e in bad]}:\n{details}\n"
                           "Hint: a mismatch only on the second (random, other batch size) input means a value was "
                           "frozen at trace time: .numpy()/.item()/Python numbers from tensors, or a shape used as a "
                           "constant." + (_TRAIN_HINT if target.training else "") + " Nothing was written.")


def _verification_runs(target: Target, args: tuple[torch.Tensor, ...], axes: Axes,
                       values: Mapping[str, Any]) -> list[tuple[tuple[torch.Tensor, ...], dict[str, torch.Tensor]]]:
    """``(inputs, eager outputs)`` for the example inputs and for random inputs with another batch size."""
    second = second_args(args, axes)
    try:
        second_values = eager_values(target, second)
    except Exception as error:  # the stage's own code failed on inputs we made up: say how they were made
        batched = [n for n, axis_map in zip(target.input_names, axes, strict=True) if 0 in axis_map]
        made = f"one larger along axis 0 of {batched}" if batched else "of the examples' shapes"
        raise BrickExportError(
            f"Verification runs the stage on random inputs {made} as well, and eager failed on them: "
            f"{error_summary(error, 300, True)}\nHint: an input whose axis 0 is not the batch (a table that has "
            f"the batch's length by chance) keeps its size with dynamic_shapes={{name: {{0: None}}}}; or pass "
            f"dynamic_batch=False, or verify=False.") from error
    return [(args, eager_outputs(target, values)), (second, eager_outputs(target, second_values))]


def _hint(exporter: Exporter, error: Exception) -> str:
    if isinstance(error, TraceWarnings):
        return exporter.warning_hint
    return SPECIALIZED_HINT if isinstance(error, SpecializedAxes) else exporter.hint


def _writing_failed(error: OSError, staged: Path) -> bool:
    """Whether ``error`` is the OS failing to write the staged artifact (it names the hidden staged file, or
    nothing), not a brick's own file (a vocabulary read while tracing), which is the brick's error."""
    return error.filename is None or Path(error.filename).parent == staged.parent


def _batch_size(target: Target, args: Sequence[torch.Tensor]) -> int:
    size = batch_size_of(dict(zip(target.input_names, args, strict=True)), target.input_names)
    return 1 if size is None else size  # inputs without a batch axis: one sample


def _size(staged: Path) -> int:
    """The artifact's bytes, its external data file included."""
    return sum(p.stat().st_size for p in (staged, staged.with_name(f"{staged.name}.data")) if p.is_file())


def run_export(exporter: Exporter, collection: BrickCollection, path: str | os.PathLike[str],
               named_inputs: Mapping[str, torch.Tensor], *, stage: Stage | str, outputs: Sequence[str] | None,
               dynamic_batch: bool, dynamic_shapes: Mapping[str, Mapping[int, Any]] | None, verify: bool,
               overwrite: bool, batch_name: str = BATCH) -> ExportReport:
    """Exports, reads back, verifies and reports.  A TRAIN stage runs its eager references in train mode:
    the model's buffers (BatchNorm statistics) are restored afterwards."""
    stage = parse_stage(stage)
    path = as_path(path, "The export's path", BrickExportError)
    check_destination(path, overwrite, BrickExportError)  # before any work; checked again when moved in
    target = make_target(collection, stage, outputs)
    args = example_args(target, named_inputs)
    axes = dynamic_axes(target, args, dynamic_batch, dynamic_shapes, batch_name)
    traced = trace_args(args, axes) if exporter.double_batch_of_one else args
    live = nn.ModuleList(list(target.bound.bricks.values()))  # the bricks, not a copy
    kept = preserved_state(live) if target.training else contextlib.nullcontext()
    with kept:
        values = eager_values(target, args)  # before exporting: eager errors are the user's; localizing needs them
        eager_outputs(target, values)  # non-tensor outputs are refused before an exporter misreports them
        with target.bound.modes(grad=False):
            check_arity(target.graph_module, args)  # a brick's tuple of one gets its getitem before tracing
        with staged_file(path, overwrite, BrickExportError, exporter.sidecars(path)) as staged:
            start = time.perf_counter()
            try:
                with target.bound.modes(grad=False):
                    exporter.write(target, traced, axes, staged)
            except BrickExportError:
                raise  # our own checks are not the bricks'
            except Exception as error:
                if isinstance(error, OSError) and _writing_failed(error, staged):  # a full disk: not the bricks'
                    raise BrickExportError(f"Cannot write {path}: {error.strerror or error_summary(error)}") from error
                raise localized_failure(exporter.what, exporter.try_brick, _hint(exporter, error),
                                        exporter.config_hint, target, traced, axes, values, error) from error
            export_seconds = time.perf_counter() - start
            opset = exporter.read_back(staged, target)
            errors: tuple[OutputError, ...] = ()
            providers: tuple[str, ...] = ()
            batches: tuple[int, ...] = ()
            verify_seconds = 0.0
            if verify:
                start = time.perf_counter()
                runs = _verification_runs(target, args, axes, values)
                errors, providers = exporter.verify(staged, target, runs)
                verify_seconds = time.perf_counter() - start
                batches = tuple(_batch_size(target, run_args) for run_args, _ in runs)
                check_errors(errors, target, exporter.artifact)
            size = _size(staged)
    return ExportReport(path=path, format=exporter.format, stage=stage, input_names=target.input_names,
                        output_names=target.output_names, opset=opset, file_size_bytes=size, providers=providers,
                        errors=errors, verified=verify, verified_batch_sizes=batches,
                        dynamic_batch=any(0 in a for a in axes), dynamo=exporter.dynamo,
                        export_seconds=export_seconds, verify_seconds=verify_seconds)
