"""ONNX export of a stage, verified with ONNX Runtime (``export_onnx``).

ONNX inputs and outputs carry the user's value names.  The legacy (TorchScript) tracer's warnings that a
trace may be wrong for other inputs (data-dependent branches, ``.numpy()``, shapes turned into constants)
are errors naming the brick unless the caller accepts them; an opset the exporter did not write is an
error too: nothing is reported as done that was not done as asked.
"""

from __future__ import annotations

import inspect
import io
import os
import sys
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from torchbricks_fx.errors import BrickExportError, error_summary
from torchbricks_fx.export.localize import EXPORTER_HINTS, BrickAlone, SpecializedAxes, TraceWarnings
from torchbricks_fx.export.report import ExportReport
from torchbricks_fx.export.sequence import Exporter, Runs, run_export
from torchbricks_fx.export.target import BATCH, Axes, Target, export_dims, is_checked_dynamic
from torchbricks_fx.numerics import OutputError, output_errors
from torchbricks_fx.ort import ort_session, run_session
from torchbricks_fx.stage import Stage

if TYPE_CHECKING:
    from torchbricks_fx.collection import BrickCollection

__all__ = ["export_onnx"]

# Keyword arguments of torch.onnx.export that export_onnx sets itself.
_RESERVED_KWARGS = frozenset({"model", "args", "f", "kwargs", "input_names", "output_names", "dynamo",
                              "dynamic_shapes", "dynamic_axes", "opset_version", "external_data"})

# torch.onnx.export (torch 2.14) hands these only to the legacy TorchScript exporter (its "deprecated options").
_LEGACY_ONLY = frozenset({"training", "operator_export_type", "do_constant_folding", "custom_opsets",
                          "export_modules_as_functions", "autograd_inlining"})
# ... and these only to the dynamo one ("dynamo only options").
_DYNAMO_ONLY = frozenset({"custom_translation_table", "report", "optimize", "verify", "profile",
                          "dump_exported_program", "artifacts_dir"})
# The dynamo exporter applies these only when it saves to ``f`` (export_onnx saves the program itself); with
# either exporter they make the weights graph inputs, which breaks the file's inputs and its verification.
_WEIGHTS_AS_INPUTS = frozenset({"export_params", "keep_initializers_as_inputs"})

_TRACER_HINT = ("the legacy (TorchScript) tracer warned that the trace may be wrong for other inputs: it records "
                "one path through Python control flow on tensor values, and freezes .numpy()/.item() results and "
                "shapes used as numbers into constants. Use dynamo=True (torch.export refuses such code instead of "
                "freezing it), rewrite the brick with tensor operations (torch.where), or pass "
                "accept_tracer_warnings=True to export anyway (verification still runs, on two inputs only).")


def _shapes_for(module: nn.Module, axes: Axes) -> Any:
    shapes = export_dims(axes, or_none=True)
    # A lone brick's wrapper takes *tensors, which torch.export sees as one tuple argument.
    return (shapes,) if shapes is not None and isinstance(module, BrickAlone) else shapes


def _legacy_export(module: nn.Module, args: tuple[Any, ...], sink: Any, dynamic_axes: dict[str, dict[int, str]],
                   accept_tracer_warnings: bool, options: Mapping[str, Any]) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
        torch.onnx.export(module, args, sink, dynamo=False, dynamic_axes=dynamic_axes or None, **options)
    tracer = [w for w in caught if issubclass(w.category, torch.jit.TracerWarning)]
    modules = {getattr(m, "__file__", None): name for name, m in list(sys.modules.items())}
    for other in caught:
        if other not in tracer:  # re-emitted as their module's, so the caller's filters apply as usual
            warnings.warn_explicit(other.message, other.category, other.filename, other.lineno,
                                   module=modules.get(other.filename))
    if tracer and not accept_tracer_warnings:
        lines = list(dict.fromkeys(str(w.message).splitlines()[0] for w in tracer))
        raise TraceWarnings("the tracer warned: " + " | ".join(lines))


def onnx_export(module: nn.Module, args: tuple[Any, ...], destination: Path | None, *,
                input_names: Sequence[str] | None, output_names: Sequence[str] | None, axes: Axes, opset: int | None,
                dynamo: bool, external_data: bool | None, extra: Mapping[str, Any], batch_name: str = BATCH,
                accept_tracer_warnings: bool = False) -> None:
    """Runs ``torch.onnx.export``; with ``destination`` the model is saved there (and only there)."""
    names = list(input_names) if input_names is not None else [f"input_{k}" for k in range(len(args))]
    options: dict[str, Any] = {"opset_version": opset, "input_names": names,
                               "output_names": list(output_names) if output_names is not None else None, **extra}
    if dynamo:
        options.setdefault("verbose", False)
        program = torch.onnx.export(module, args, None, dynamo=True, dynamic_shapes=_shapes_for(module, axes),
                                    **options)
        if program is not None:
            _check_free_axes(program.model_proto, names, args, axes)
        if destination is not None and program is not None:
            # f=None and an explicit save: f=path would also write path.data next to it (see DESIGN pitfalls).
            program.save(destination, external_data=external_data)
        return
    dynamic_axes = {name: {axis: _dim_name(dim, name, axis) for axis, dim in axis_map.items()}
                    for name, axis_map in zip(names, axes, strict=True) if axis_map}
    if output_names is not None and any(_dim_name(a.get(0), "", 0) == batch_name for a in axes if 0 in a):
        dynamic_axes.update({name: {0: batch_name} for name in output_names})
    sink: Any = str(destination) if destination is not None else io.BytesIO()
    _legacy_export(module, args, sink, dynamic_axes, accept_tracer_warnings, options)


def _check_free_axes(model: Any, names: Sequence[str], args: tuple[Any, ...], axes: Axes) -> None:
    """``SpecializedAxes`` when the file fixes an axis that was asked to stay dynamic: when torch.export
    finds code that specializes on a size, the ONNX exporter re-exports with that size fixed, silently."""
    graph_inputs = {i.name: i for i in model.graph.input}
    fixed = []
    for name, axis_map in zip(names, axes, strict=True):
        dims = graph_inputs[name].type.tensor_type.shape.dim if name in graph_inputs else ()
        for axis, dim in axis_map.items():
            if is_checked_dynamic(dim) and axis < len(dims) and dims[axis].HasField("dim_value"):
                fixed.append(f"axis {axis} ({_dim_name(dim, name, axis)!r}) of input {name!r} at "
                             f"{dims[axis].dim_value}")
    if fixed:
        raise SpecializedAxes(f"the exporter fixed {', '.join(fixed)}, which were asked to stay dynamic: the "
                              f"code specializes on their sizes (example shapes: "
                              f"{ {n: tuple(a.shape) for n, a in zip(names, args, strict=True)} })")


def _dim_name(dim: Any, input_name: str, axis: int) -> str:
    return dim if isinstance(dim, str) else getattr(dim, "__name__", None) or f"{input_name}_dim{axis}"


def optimized_name(path: Path) -> str:
    """Where ``save_optimized`` puts the optimized model: ``model.onnx`` -> ``model.optimized.onnx``."""
    return f"{path.stem}.optimized{path.suffix or '.onnx'}"


def sidecars(path: Path) -> tuple[str, ...]:
    """The files beside an ONNX file that belong to it: its external weights and the optimized model (with
    its own); a re-export that does not write them removes the previous file's."""
    optimized = optimized_name(path)
    return f"{path.name}.data", optimized, f"{optimized}.data"


def _read_back(path: Path, target: Target, opset: int | None, save_optimized: bool) -> int | None:
    """Loads the written file's graph; checks its names and that it has the requested opset; with
    ``save_optimized``, lets onnxruntime write its optimized model beside it."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as error:
        raise BrickExportError(f"The written ONNX file cannot be read back: {error_summary(error)}") from error
    written = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    inputs, outputs = [i.name for i in model.graph.input], [o.name for o in model.graph.output]
    if outputs != list(target.output_names) or not set(inputs) <= set(target.input_names):
        raise BrickExportError(f"The exporter named the ONNX inputs {inputs} and outputs {outputs}, expected "
                               f"{list(target.input_names)} and {list(target.output_names)}.")
    if opset is not None and written != opset:
        raise BrickExportError(f"opset {opset} was requested but the exporter wrote opset {written} (it cannot "
                               f"write the requested one); nothing was written. Request opset {written} or leave "
                               f"opset unset for the exporter's default.")
    if save_optimized:
        ort_session(path, "cpu", optimized_path=path.with_name(optimized_name(path)))
    return written


def _verify(path: Path, target: Target, runs: Runs) -> tuple[tuple[OutputError, ...], tuple[str, ...]]:
    device = runs[0][0][0].device if runs[0][0] else torch.device("cpu")
    try:
        session = ort_session(path, device)
        dropped = [n for n in target.input_names if n not in {i.name for i in session.get_inputs()}]
        if dropped:
            warnings.warn(f"The ONNX file has no input {dropped}: the exporter found that no output depends on "
                          f"them (or froze their values; verification checks that).", stacklevel=4)
        compared = [(run_session(session, dict(zip(target.input_names, args, strict=True))), eager)
                    for args, eager in runs]
    except BrickExportError:
        raise
    except Exception as error:  # the file is only worth writing if onnxruntime can run it
        raise BrickExportError(f"ONNX Runtime cannot run the exported file: {error_summary(error, 300, True)}\n"
                               f"Nothing was written; pass verify=False to keep an unverified file.") from error
    return output_errors(compared, target.output_names, device), tuple(session.get_providers())


def _check_kwargs(extra: Mapping[str, Any], dynamo: bool) -> None:
    reserved = sorted(_RESERVED_KWARGS & set(extra))
    if reserved:
        raise BrickExportError(f"onnx_export_kwargs must not set {reserved}: export_onnx sets them itself (use "
                               f"dynamic_batch / dynamic_shapes / opset / dynamo).")
    parameters = inspect.signature(torch.onnx.export).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        unknown = sorted(set(extra) - set(parameters))
        if unknown:
            accepted = sorted(set(parameters) - _RESERVED_KWARGS)
            raise BrickExportError(f"onnx_export_kwargs {unknown} are not arguments of torch.onnx.export; this "
                                   f"torch accepts {accepted}.")
    _check_honoured(extra, dynamo, parameters)


def _check_honoured(extra: Mapping[str, Any], dynamo: bool, parameters: Mapping[str, inspect.Parameter]) -> None:
    """Refuses options the chosen exporter would ignore, or that would break the file's contract; passing
    torch's default value changes nothing and is accepted (seed code passes ``do_constant_folding=True``)."""
    ignored = _LEGACY_ONLY if dynamo else _DYNAMO_ONLY
    for name, value in sorted(extra.items()):
        if name in parameters and _is_default(value, parameters[name].default):
            continue
        if name in _WEIGHTS_AS_INPUTS:
            raise BrickExportError(f"onnx_export_kwargs {name}={value!r} is not supported: export_onnx writes the "
                                   f"weights into the file, whose inputs are the stage's inputs (verification "
                                   f"feeds only those); drop the option.")
        if name in ignored:
            honoured_by = ("the torch.export-based exporter (dynamo=True)" if not dynamo
                           else "the legacy TorchScript exporter (dynamo=False)")
            raise BrickExportError(f"onnx_export_kwargs {name}={value!r} has no effect with dynamo={dynamo}: "
                                   f"torch.onnx.export passes it only to {honoured_by}; drop it or pass "
                                   f"dynamo={not dynamo}.")


def _is_default(value: Any, default: Any) -> bool:
    try:
        return type(value) is type(default) and bool(value == default)
    except Exception:  # a value without a plain equality is not the default
        return False


def export_onnx(collection: BrickCollection, path: str | os.PathLike[str], named_inputs: Mapping[str, torch.Tensor], *,
                stage: Stage | str = Stage.EXPORT, outputs: Sequence[str] | None = None, dynamic_batch: bool = True,
                dynamic_shapes: Mapping[str, Mapping[int, Any]] | None = None, opset: int | None = None,
                verify: bool = True, overwrite: bool = False, dynamo: bool = True,
                external_data: bool | None = None, onnx_export_kwargs: Mapping[str, Any] | None = None,
                accept_tracer_warnings: bool = False, save_optimized: bool = False) -> ExportReport:
    """Exports ``stage`` of ``collection`` to an ONNX file and verifies it with onnxruntime against eager.

    ONNX input names are the stage's required inputs, output names the requested ``outputs`` (default:
    every value the stage's bricks produce).  ``dynamic_batch`` makes axis 0 of the inputs (those with the
    first input's batch size) and of the outputs dynamic; ``dynamic_shapes`` ``{input name: {axis: name or
    torch.export.Dim}}`` adds other axes.  ``dynamo=True`` uses the torch.export-based exporter,
    ``dynamo=False`` the legacy TorchScript one, whose tracer warnings are errors naming the brick unless
    ``accept_tracer_warnings=True``.  ``opset`` is honoured or refused, never silently replaced.
    ``verify`` compares every output with eager on the example inputs and on random inputs with batch size
    + 1.  ``external_data`` (dynamo only; default: only above 2 GB) stores the weights in ``<path>.data``.
    ``onnx_export_kwargs`` go to ``torch.onnx.export``; one the chosen exporter ignores (``do_constant_folding``
    with dynamo, ``optimize`` without) or that makes the weights inputs is refused.  ``save_optimized`` also
    writes onnxruntime's optimized model beside the file (``model.optimized.onnx``; graph optimizations up to
    ``ORT_ENABLE_EXTENDED``, portable across machines), which loads faster; an export that does not removes
    the one a previous export left there (with ``overwrite``).

    Raises ``BrickExportError`` (export failed: names the bricks; outputs differ; file exists; unknown or
    ignored ``onnx_export_kwargs``) and ``BrickGraphError`` (unknown outputs, missing inputs).  Nothing is written
    unless everything succeeded.
    """
    return export_onnx_named_batch(collection, path, named_inputs, stage=stage, outputs=outputs,
                                   dynamic_batch=dynamic_batch, dynamic_shapes=dynamic_shapes, opset=opset,
                                   verify=verify, overwrite=overwrite, dynamo=dynamo, external_data=external_data,
                                   onnx_export_kwargs=onnx_export_kwargs,
                                   accept_tracer_warnings=accept_tracer_warnings, save_optimized=save_optimized)


def export_onnx_named_batch(collection: BrickCollection, path: str | os.PathLike[str],
                            named_inputs: Mapping[str, torch.Tensor], *, stage: Stage | str,
                            outputs: Sequence[str] | None, dynamic_batch: bool,
                            dynamic_shapes: Mapping[str, Mapping[int, Any]] | None, opset: int | None, verify: bool,
                            overwrite: bool, dynamo: bool, external_data: bool | None,
                            onnx_export_kwargs: Mapping[str, Any] | None, accept_tracer_warnings: bool = False,
                            save_optimized: bool = False, batch_name: str = BATCH) -> ExportReport:
    """:func:`export_onnx` with the name of the batch dimension (the seed helper calls it ``batch_size``)."""
    extra = dict(onnx_export_kwargs or {})
    _check_kwargs(extra, dynamo)
    if external_data and not dynamo:
        raise BrickExportError("external_data=True needs dynamo=True: the legacy exporter writes the weights "
                               "into the file itself (and on its own only above 2 GB).")

    def write(target: Target, args: tuple[torch.Tensor, ...], axes: Axes, staged: Path) -> None:
        onnx_export(target.graph_module, args, staged, input_names=target.input_names,
                    output_names=target.output_names, axes=axes, opset=opset, dynamo=dynamo,
                    external_data=external_data, extra=extra, batch_name=batch_name,
                    accept_tracer_warnings=accept_tracer_warnings)

    def try_brick(module: nn.Module, brick_args: tuple[Any, ...], brick_axes: list[dict[int, Any]]) -> None:
        names = module.tensor_names if isinstance(module, BrickAlone) else None  # messages name the values
        onnx_export(module, brick_args, None, input_names=names, output_names=None, axes=brick_axes, opset=opset,
                    dynamo=dynamo, external_data=None, extra=extra, accept_tracer_warnings=accept_tracer_warnings)

    exporter = Exporter(format="onnx", what="to ONNX", artifact="ONNX file", dynamo=dynamo,
                        double_batch_of_one=dynamo, write=write, try_brick=try_brick,
                        read_back=lambda staged, target: _read_back(staged, target, opset, save_optimized),
                        sidecars=sidecars,
                        verify=_verify,
                        hint=EXPORTER_HINTS["dynamo"] if dynamo else EXPORTER_HINTS["legacy"],
                        warning_hint=_TRACER_HINT,
                        config_hint="check opset and onnx_export_kwargs, or try dynamo=" + str(not dynamo) + ".")
    return run_export(exporter, collection, path, named_inputs, stage=stage, outputs=outputs,
                      dynamic_batch=dynamic_batch, dynamic_shapes=dynamic_shapes, verify=verify, overwrite=overwrite,
                      batch_name=batch_name)
