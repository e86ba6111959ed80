"""Building a stage lock: what each stage of a collection computes (``lock``).

A :class:`~torchbricks_fx.lockfile_format.Lock` records, per stage, the bricks in execution order, the
required inputs, the outputs, the pruned bricks with their reasons, the shape (dimension 0 written
``"batch"`` where it is the batch size) and dtype of every value on the example inputs (inside dicts,
lists and tuples too), and a sha256 of the stage's graph structure; per brick that runs in some stage, its
brick and module classes, submodule classes, parameter and buffer names with shapes and dtypes, parameter
count, ``calculate_gradients``, connections and which outputs count as losses.  Weights' values are not
recorded: training changes them.  ``lockfile_format.py`` holds the dataclasses and the file format,
``lockfile_diff.py`` compares two locks.

Nothing recorded depends on the process or the machine: classes are named without their module (a build
file's module name depends on how it was loaded), and there are no paths and no versions, except in the
optional ONNX section, whose exporter versions the diff ignores.

The module is ``lockfile``, not ``lock``: importing a submodule binds its name on the package, which
would shadow the public function ``torchbricks_fx.lock``.
"""

from __future__ import annotations

import importlib.metadata
import tempfile
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from torchbricks_fx.brick import Brick, BrickMetrics, BrickModule, CallableModule
from torchbricks_fx.errors import BrickExportError, BrickGraphError, BrickLockError, error_summary
from torchbricks_fx.lockfile_format import (
    BATCH,
    BrickLock,
    Inputs,
    Lock,
    OnnxLock,
    StageLock,
    TensorLock,
    ValueLock,
    canonical_sha256,
)
from torchbricks_fx.plan import BrickSpec, FrozenMap, StagePlan
from torchbricks_fx.runtime import BoundStage, batch_size_of, preserved_state
from torchbricks_fx.stage import Stage

if TYPE_CHECKING:
    from torchbricks_fx.collection import BrickCollection

__all__ = ["lock"]


def lock(collection: BrickCollection, named_inputs: Mapping[str, Any], *, onnx_ops: bool = False) -> Lock:
    """The lock of every stage of ``collection``: its structure, and the shapes and dtypes of its values on
    ``named_inputs`` (each stage runs once, in its modes; buffers, metric states and the random number
    generator are restored afterwards).

    An invalid stage is recorded with its problems, and a stage that cannot run on ``named_inputs`` (an
    input the examples lack, a brick that raises) with the reason its values are not recorded, so that a
    change that breaks a stage shows up in :func:`~torchbricks_fx.lockfile_diff.diff_locks`.
    ``onnx_ops=True`` also exports the EXPORT stage to ONNX (unverified, in a temporary folder) and records
    its operator histogram, or why there is none (the stage is invalid, cannot run, or fails to export).
    Lazy modules are initialized by the stages' run (their shapes are recorded after it)."""
    from torchbricks_fx.collection import BrickCollection

    if not isinstance(collection, BrickCollection):
        raise BrickLockError(f"lock() takes a BrickCollection, not {type(collection).__name__}.")
    if not isinstance(named_inputs, Mapping):
        raise BrickLockError(f"lock() takes named_inputs as a dict {{input name: tensor}}, not "
                             f"{type(named_inputs).__name__}.")
    bound = {stage: _bound_or_problems(collection, stage) for stage in Stage}
    running = {name: brick for name, brick in collection.bricks().items()
               if any(isinstance(b, BoundStage) and name in b.plan.bricks for b in bound.values())}
    specs = {spec.name: spec for spec in collection.specs()[0]}
    with preserved_state(collection), torch.random.fork_rng(devices=_initialized_cuda_devices()):
        runs = {stage: _values(b, named_inputs) for stage, b in bound.items() if isinstance(b, BoundStage)}
        reasons = [reason for _, reason in runs.values() if reason]
        _refuse_lazy(running, f"a stage did not run on the example inputs ({reasons[0]})" if reasons
                     else "running the stages did not initialize it")
        # After the runs: a lazy module's parameters have their shapes only once it ran.
        bricks = {name: _brick_lock(brick, specs[name]) for name, brick in sorted(running.items())}
        stages = {stage.value: _stage_lock(b, bricks, runs[stage]) if isinstance(b, BoundStage)
                  else StageLock(problems=b) for stage, b in bound.items()}
        onnx = _onnx_lock(collection, named_inputs, stages[Stage.EXPORT.value]) if onnx_ops else None
    return Lock(FrozenMap(stages), FrozenMap(bricks), onnx)


def _initialized_cuda_devices() -> list[int]:
    # Dropout on CUDA draws from the CUDA generators; asking for them must not initialize CUDA otherwise.
    return list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []


def _bound_or_problems(collection: BrickCollection, stage: Stage) -> BoundStage | tuple[str, ...]:
    try:
        return collection.bound_stage(stage)
    except BrickGraphError as error:
        return tuple(sorted({problem.message for problem in error.problems}))


def _refuse_lazy(bricks: Mapping[str, Brick], why: str) -> None:
    """Raises naming the first brick with an uninitialized (lazy) parameter or buffer."""
    for name, brick in bricks.items():
        module = _described_module(brick)
        tensors = [*module.named_parameters(), *module.named_buffers()]
        lazy = next((tensor_name for tensor_name, t in tensors if nn.parameter.is_lazy(t)), None)
        if lazy is not None:
            raise BrickLockError(f"Brick {name!r}: {lazy!r} is uninitialized (a lazy module): {why}.")


def _brick_lock(brick: Brick, spec: BrickSpec) -> BrickLock:
    module = _described_module(brick)
    binding = spec.binding
    # Keyword order does not matter to a call by keyword: sorted, as the file reads them back.
    inputs: Inputs = "all" if binding.takes_all else (FrozenMap(dict(sorted(binding.kwargs))) if binding.kwargs
                                                       else binding.args)
    return BrickLock(
        brick_class=type(brick).__qualname__, module_class=_class_name(module), inputs=inputs, outputs=spec.outputs,
        calculate_gradients=not brick.blocks_gradients,
        parameter_count=sum(p.numel() for p in module.parameters()),
        parameters=FrozenMap({name: TensorLock(tuple(p.shape), _dtype(p.dtype), p.requires_grad)
                              for name, p in sorted(module.named_parameters())}),
        buffers=FrozenMap({name: TensorLock(tuple(b.shape), _dtype(b.dtype))
                           for name, b in sorted(module.named_buffers())}),
        submodules=FrozenMap({name: _class_name(m) for name, m in sorted(module.named_modules()) if name}),
        loss_output_names=tuple(getattr(brick, "loss_output_names", ())))


def _described_module(brick: Brick) -> nn.Module:
    """The module a brick calls: a module brick's model; a metric brick's metrics (every alive stage holds
    a clone, so one describes them all); the brick itself otherwise (seed-style bricks)."""
    if isinstance(brick, BrickModule):
        return brick.model
    if isinstance(brick, BrickMetrics) and len(brick.metrics):
        return next(iter(brick.metrics.values()))
    return brick


def _class_name(module: nn.Module) -> str:
    # Without the module path: the CLI imports a build file under a name that varies from run to run.
    if isinstance(module, CallableModule):
        return f"CallableModule({getattr(module.fn, '__qualname__', type(module.fn).__qualname__)})"
    return type(module).__qualname__


def _dtype(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _stage_lock(bound: BoundStage, bricks: Mapping[str, BrickLock],
                run: tuple[Mapping[str, ValueLock], str | None]) -> StageLock:
    plan = bound.plan
    values, not_recorded = run
    return StageLock(bricks=plan.bricks, required_inputs=plan.required_inputs, outputs=plan.outputs,
                     pruned=FrozenMap(dict(sorted(plan.pruned.items()))), values=values,
                     values_not_recorded=not_recorded, graph_sha256=_graph_sha256(plan, bricks))


def _values(bound: BoundStage, named_inputs: Mapping[str, Any]) -> tuple[Mapping[str, ValueLock], str | None]:
    """Every input the stage reads and value it produces, on the example inputs; or why it cannot run."""
    plan = bound.plan
    try:
        values = bound.run(named_inputs)
    except BrickGraphError as error:  # an input the examples lack (e.g. targets for a training stage)
        return FrozenMap(), " ".join(problem.message for problem in error.problems)
    except Exception as error:  # a brick failing on the examples is a change worth locking, not a crash
        return FrozenMap(), error_summary(error, max_chars=300)
    batch = batch_size_of(named_inputs, plan.required_inputs)
    names = [*plan.required_inputs, *(value for step in plan.steps for value in step.outputs)]
    return FrozenMap({name: _value_lock(values[name], batch) for name in sorted(names) if name in values}), None


def _value_lock(value: Any, batch: int | None) -> ValueLock:
    if isinstance(value, Mapping):
        return ValueLock(type(value).__qualname__, items=FrozenMap(
            {key: _value_lock(item, batch) for key, item in sorted(_text_keyed(value), key=lambda kv: kv[0])}))
    if isinstance(value, (list, tuple)):
        return ValueLock(type(value).__qualname__, items=tuple(_value_lock(item, batch) for item in value))
    if not isinstance(value, torch.Tensor):
        return ValueLock(type(value).__qualname__)
    shape = tuple(BATCH if axis == 0 and size == batch else int(size) for axis, size in enumerate(value.shape))
    return ValueLock("Tensor", shape, _dtype(value.dtype))


def _text_keyed(mapping: Mapping[Any, Any]) -> list[tuple[str, Any]]:
    """A dict's items keyed by text (a lock file's keys are strings): ``str(key)``, with the type added to a
    key that is not a string when its text is also another key's (``1`` and ``"1"``)."""
    texts = [str(key) for key in mapping]
    shared = {text for text in texts if texts.count(text) > 1}
    return [(text if text not in shared or isinstance(key, str) else f"{text} ({type(key).__name__})", value)
            for text, (key, value) in zip(texts, mapping.items(), strict=True)]


def _graph_sha256(plan: StagePlan, bricks: Mapping[str, BrickLock]) -> str:
    """A fingerprint of the stage's graph: inputs, outputs, and each step's binding and brick structure."""
    steps = [{"name": step.name, "args": list(step.binding.args), "kwargs": sorted(map(list, step.binding.kwargs)),
              "takes_all": step.binding.takes_all, "all_values": list(step.binding.all_values),
              "outputs": list(step.outputs), "in_graph": step.in_graph, "brick": bricks[step.name].to_data()}
             for step in plan.steps]
    return canonical_sha256({"required_inputs": list(plan.required_inputs), "outputs": list(plan.outputs),
                             "steps": steps})


# --------------------------------------------------------------------------------------------- ONNX
def _onnx_lock(collection: BrickCollection, named_inputs: Mapping[str, Any], stage: StageLock) -> OnnxLock:
    """Exports the EXPORT stage into a temporary folder and counts its operators (subgraphs and local
    functions included); records why not, as a change the diff shows, when the stage cannot be exported."""
    import onnx

    from torchbricks_fx.export import export_onnx

    exporter = FrozenMap({package: _version(package) for package in ("torch", "onnx", "onnxscript")})
    if stage.problems or stage.values_not_recorded:
        why = "is invalid" if stage.problems else "does not run on the example inputs"
        return OnnxLock(None, FrozenMap(), exporter, f"stage {Stage.EXPORT.value} {why}")
    with tempfile.TemporaryDirectory(prefix="torchbricks_fx-lock-") as folder:
        path = Path(folder) / "export.onnx"
        try:
            export_onnx(collection, path, named_inputs, stage=Stage.EXPORT, verify=False)
        except BrickExportError as error:  # the temporary path would make the file differ from run to run
            why = error_summary(error, max_chars=300).replace(str(path), "export.onnx").replace(folder, ".")
            return OnnxLock(None, FrozenMap(), exporter, f"the ONNX export failed: {why}")
        model = onnx.load(str(path), load_external_data=False)
    counts: Counter[str] = Counter()
    _count_operators(model.graph, counts)
    for function in model.functions:
        for node in function.node:
            _count_node(node, counts)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    return OnnxLock(opset, FrozenMap(dict(sorted(counts.items()))), exporter)


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _count_operators(graph: Any, counts: Counter[str]) -> None:
    for node in graph.node:
        _count_node(node, counts)


def _count_node(node: Any, counts: Counter[str]) -> None:
    counts[node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}::{node.op_type}"] += 1
    for attribute in node.attribute:  # If/Loop/Scan bodies
        if attribute.HasField("g"):
            _count_operators(attribute.g, counts)
        for graph in attribute.graphs:
            _count_operators(graph, counts)
