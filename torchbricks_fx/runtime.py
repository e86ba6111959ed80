"""The bound stage: the one way a stage runs.

A :class:`BoundStage` is a plan bound to the collection's modules: the callable of every live brick, the
modules whose mode matters, and :meth:`BoundStage.modes`, the only place that puts modules in a stage's
mode (TRAIN: train mode with gradients; every other stage: eval mode without) and, after an eval stage,
restores the caller's modes (TRAIN leaves train mode: backward may run the forward again).  The eager
collection, :class:`~torchbricks_fx.fx.StageModule`, export's reference run,
``benchmark`` and ``profile_bricks`` all run stages through it.

Metric bricks run after every model brick of a call has succeeded, so a failing call updates no metric.
This module is the per-call hot path: kept allocation-light.
"""

from __future__ import annotations

import contextlib
import copy
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.parameter import is_lazy

from torchbricks_fx.binding import STAGE_INPUT, Binding, name_outputs
from torchbricks_fx.brick import Brick
from torchbricks_fx.errors import BrickBackendError, BrickError, BrickGraphError, GraphProblem, add_note, error_summary
from torchbricks_fx.plan import PLAN_HINT, BrickSpec, StagePlan, closest_names
from torchbricks_fx.stage import Stage

__all__ = ["BoundStage", "BoundStep", "resize_batch"]

# Watchers of module trees (bound stages, compiled graphs), told by torch's global module-registration hook
# when a submodule is registered under one of their modules (``model.fc = nn.Sequential(...)`` after the
# first call): they collect their modules again then, so that per-call paths read plain tuples.
_WATCHERS: weakref.WeakSet[Any] = weakref.WeakSet()
_REGISTRATION_HOOK: list[Any] = []


def _on_registration(parent: nn.Module, name: str, submodule: nn.Module | None) -> None:
    if submodule is None:
        return
    for watcher in tuple(_WATCHERS):
        if id(parent) in watcher.module_ids:
            watcher.walk_modules(submodule)


def watch_module_tree(watcher: Any) -> None:
    """Calls ``watcher.walk_modules(submodule)`` whenever a submodule is registered under a module whose id
    is in ``watcher.module_ids`` (torch's hook runs before the submodule is attached)."""
    if not _REGISTRATION_HOOK:
        from torch.nn.modules.module import (
            register_module_module_registration_hook,
            register_module_parameter_registration_hook,
        )

        _REGISTRATION_HOOK.extend([register_module_module_registration_hook(_on_registration),
                                   register_module_parameter_registration_hook(_on_parameter)])
    _WATCHERS.add(watcher)


def _on_parameter(module: nn.Module, name: str, parameter: nn.Parameter | None) -> None:
    for watcher in tuple(_WATCHERS):  # a parameter object replaced (load_state_dict(assign=True), setattr)
        if id(module) in watcher.module_ids and hasattr(watcher, "parameters_changed"):
            watcher.parameters_changed()


@dataclass(frozen=True)
class BoundStep:
    """A plan step bound to the callable that runs it in the plan's stage."""

    name: str
    fn: Callable[..., Any]
    binding: Binding
    outputs: tuple[str, ...]
    returns_dict: bool  # a metric collection returning {metric name: value}
    result_keys: tuple[str, ...] = ()  # its metric names, in ``outputs`` order (outputs are "./name" resolved)


def enter_modes(modules: Sequence[nn.Module], training: bool) -> list[nn.Module]:
    """Puts ``modules`` in the stage's mode; returns the ones it flipped (only those are restored).  On every
    call of a stage, so a plain loop (in Python 3.11 a comprehension costs a frame)."""
    flipped = []
    for module in modules:
        if module.training is not training:
            flipped.append(module)
            module.training = training
    return flipped


def exit_modes(flipped: Sequence[nn.Module], training: bool) -> None:
    """Restores the caller's modes after an eval stage.  TRAIN leaves the modules in train mode: backward
    may run the forward again (activation checkpointing), and must find the modes the forward ran in."""
    if training:
        return
    for module in flipped:
        module.training = True


class StageModes:
    """Context manager: modules in the stage's mode and grad mode for the block, the caller's afterwards
    (only the modules that were flipped are flipped back; TRAIN leaves them in train mode, see
    :func:`exit_modes`).  A class, not a generator: it is on every call."""

    __slots__ = ("_flipped", "_grad", "_modules", "_previous_grad", "_training")

    def __init__(self, modules: Sequence[nn.Module], training: bool, grad: bool) -> None:
        self._modules = modules
        self._training = training
        self._grad = grad

    def __enter__(self) -> None:
        self._flipped = enter_modes(self._modules, self._training)
        self._previous_grad = torch.is_grad_enabled()
        _set_grad_enabled(self._grad)

    def __exit__(self, *exc_info: object) -> None:
        _set_grad_enabled(self._previous_grad)
        exit_modes(self._flipped, self._training)


# What torch.set_grad_enabled calls, without building its context-manager object on every call.
_set_grad_enabled = torch._C._set_grad_enabled


@dataclass(frozen=True, eq=False)
class BoundStage:
    """A :class:`StagePlan` bound to its bricks: model steps (the graph's bricks) in execution order, then
    metric steps, and the modules whose mode matters (every module a model brick calls: even a Linear's mode
    may matter, to a hook such as spectral norm's)."""

    plan: StagePlan
    model_steps: tuple[BoundStep, ...]
    metric_steps: tuple[BoundStep, ...]
    roots: tuple[nn.Module, ...]  # the modules the model steps call
    bricks: Mapping[str, Brick]
    modules: tuple[nn.Module, ...] = ()  # every module under ``roots``, kept current by walk_modules
    module_ids: frozenset[int] = field(default=frozenset(), repr=False)

    @classmethod
    def bind(cls, plan: StagePlan, bricks: Mapping[str, Brick]) -> BoundStage:
        """Binds ``plan`` to ``bricks`` (dotted name -> brick).  Raises ``BrickGraphError`` when a model brick
        reads a metric brick's output: metrics run after the model bricks (and outside compiled graphs)."""
        _check_metric_consumers(plan)
        live = {step.name: bricks[step.name] for step in plan.steps}
        model = tuple(_bind_step(plan.stage, spec, live[spec.name]) for spec in plan.steps if spec.in_graph)
        metrics = tuple(_bind_step(plan.stage, spec, live[spec.name]) for spec in plan.steps if not spec.in_graph)
        called = tuple(live[spec.name].graph_module(plan.stage) for spec in plan.steps if spec.in_graph)
        bound = cls(plan, model, metrics, called, live)
        bound.walk_modules()
        watch_module_tree(bound)
        return bound

    def __setstate__(self, state: dict[str, Any]) -> None:  # a copy (deepcopy, pickle) watches its own modules
        self.__dict__.update(state)
        self.walk_modules()
        watch_module_tree(self)

    def walk_modules(self, joining: nn.Module | None = None) -> None:
        """Collects every module under the called ones, and under ``joining``: a submodule being registered
        under one of them (torch's hook runs before it is attached), so that a layer swapped in after the
        first call runs in the stage's mode too.  A module it replaces stays listed: a detached module whose
        mode is switched and restored is harmless."""
        modules = _unique_modules((*self.roots, joining) if joining is not None else self.roots)
        object.__setattr__(self, "modules", modules)  # frozen for users; kept current here only
        object.__setattr__(self, "module_ids", frozenset(map(id, modules)))

    @property
    def stage(self) -> Stage:
        return self.plan.stage

    @property
    def training(self) -> bool:
        return self.plan.stage is Stage.TRAIN

    def modes(self, grad: bool | None = None) -> StageModes:
        """The stage's modes for a block; ``grad`` overrides the stage's grad mode (export traces without)."""
        training = self.training
        return StageModes(self.modules, training, training if grad is None else grad)

    def run(self, named_inputs: Mapping[str, Any], *, metrics: bool = True) -> dict[str, Any]:
        """Runs the stage eagerly in its modes; returns the inputs and every value the bricks produce (and
        updates the metric bricks unless ``metrics=False``)."""
        check_inputs(self.plan, named_inputs)
        values = dict(named_inputs)
        values[STAGE_INPUT] = self.plan.stage
        with self.modes():
            run_steps(self.model_steps, values)
            if metrics and self.metric_steps:
                run_steps(self.metric_steps, values)
        del values[STAGE_INPUT]
        return values

    def update_metrics(self, named_inputs: Mapping[str, Any], graph_values: Mapping[str, Any]) -> dict[str, Any]:
        """Runs the metric steps on the model's values (a compiled graph's outputs); returns every value."""
        values = {**named_inputs, **graph_values, STAGE_INPUT: self.plan.stage}
        run_steps(self.metric_steps, values)
        return values

    def arguments(self, spec: BrickSpec, values: Mapping[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """The arguments one brick is called with, read from ``values`` (for tools that call one brick at a
        time: profiling, export's failure localization)."""
        return spec.binding.arguments({**values, STAGE_INPUT: self.plan.stage})


def _bind_step(stage: Stage, spec: BrickSpec, brick: Brick) -> BoundStep:
    returns_dict = not spec.in_graph and bool(spec.outputs)
    keys = tuple(name.removeprefix("./") for name in brick.output_names) if returns_dict else ()
    return BoundStep(name=spec.name, fn=brick.stage_callable(stage), binding=spec.binding, outputs=spec.outputs,
                     returns_dict=returns_dict, result_keys=keys)


def _unique_modules(roots: Sequence[nn.Module]) -> tuple[nn.Module, ...]:
    seen: dict[int, nn.Module] = {}
    for root in roots:
        for module in root.modules():
            seen.setdefault(id(module), module)
    return tuple(seen.values())


def _check_metric_consumers(plan: StagePlan) -> None:
    metric_values = {v: step.name for step in plan.steps if not step.in_graph for v in step.outputs}
    problems = [GraphProblem("metric_consumer", f"Brick {step.name!r} reads {value!r}, returned by metric brick "
                                                f"{metric_values[value]!r}: metrics run after the model bricks (and "
                                                f"outside compiled graphs), so model bricks cannot read their values.",
                             step.name, value)
                for step in plan.steps if step.in_graph for value in step.input_values if value in metric_values]
    if problems:
        raise BrickGraphError(problems, hint=PLAN_HINT)


def run_steps(steps: Sequence[BoundStep], values: dict[str, Any]) -> None:
    """Runs ``steps`` in order, reading and writing ``values`` by name (which holds the stage constant).
    An error raised inside a brick gets a note naming the brick."""
    step = None
    try:
        for step in steps:
            args, kwargs = step.binding.arguments(values)
            result = step.fn(*args, **kwargs) if kwargs else step.fn(*args)
            outputs = step.outputs
            if len(outputs) == 1 and not isinstance(result, (tuple, dict)):
                values[outputs[0]] = result
            elif step.returns_dict:
                values.update(zip(outputs, [result[key] for key in step.result_keys], strict=True))
            else:  # also a brick without outputs: it must return None
                values.update(zip(outputs, name_outputs(step.name, result, outputs), strict=True))
    except Exception as error:
        if step is not None and not isinstance(error, BrickError):
            add_brick_note(error, step.name)
        raise


def add_brick_note(error: BaseException, brick: str) -> None:
    """Adds "(raised in brick 'name')" to ``error`` once."""
    add_note(error, f"(raised in brick {brick!r})")


def check_inputs(plan: StagePlan, named_inputs: Mapping[str, Any]) -> None:
    """Raises a :class:`BrickGraphError` naming each missing input and the bricks that need it."""
    if not hasattr(named_inputs, "keys"):  # duck-typed: a TensorDict is welcome, a tensor or list is not
        raise BrickGraphError([f"A stage takes a dict {{input name: value}}, not a {type(named_inputs).__name__}; "
                               f"stage {plan.stage.value} needs the inputs {list(plan.required_inputs)}."])
    missing = [name for name in plan.required_inputs if name not in named_inputs]
    if not missing:
        return
    produced = [v for step in plan.steps for v in step.outputs]
    problems = []
    for name in missing:
        users = [step.name for step in plan.steps if name in step.input_values or name in step.binding.all_values]
        problems.append(GraphProblem(
            "missing_input", f"Input {name!r} needed by brick {', '.join(map(repr, users))} in stage "
            f"{plan.stage.value} is missing from named_inputs (given: {sorted(named_inputs)})."
            + closest_names(name, [*named_inputs, *produced]), users[0] if users else None, name, (plan.stage,)))
    raise BrickGraphError(problems, hint=f"this stage needs the inputs {list(plan.required_inputs)}; "
                                         "collection.plan(stage).required_inputs lists them.")


def batch_size_of(named_inputs: Mapping[str, Any], input_names: Sequence[str] | None = None) -> int | None:
    """Dimension 0 of the first input (in ``input_names`` order, default: ``named_inputs``') that is a tensor
    with a dimension (a scalar such as a temperature has no batch), the batch axis that export,
    benchmarking and training assume; ``None`` when no input has one."""
    order = [n for n in (input_names if input_names is not None else named_inputs) if n in named_inputs]
    batched = (named_inputs[n] for n in order)
    first = next((v for v in batched if isinstance(v, torch.Tensor) and v.dim() > 0), None)
    return int(first.shape[0]) if first is not None else None


def check_batch_size(batch_size: object) -> None:
    """``BrickBackendError`` unless ``batch_size`` is a positive integer."""
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise BrickBackendError(f"Batch sizes must be positive integers, not {batch_size!r}.")


def resize_batch(named_inputs: Mapping[str, Any], batch_size: int,
                 input_names: Sequence[str] | None = None) -> dict[str, Any]:
    """The inputs at another batch size: dimension 0 repeated or sliced to ``batch_size`` for every tensor
    whose dimension 0 is the current batch size (see :func:`batch_size_of`).  Other
    tensors (a fixed table of another length), 0-d tensors and other values are unchanged; so is a table
    that happens to have the batch size as its length, which export would make dynamic too."""
    check_batch_size(batch_size)
    current = batch_size_of(named_inputs, input_names)
    if current == batch_size or (current is None and batch_size == 1):
        return dict(named_inputs)
    if not current:
        shapes = {n: list(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
                  for n, v in named_inputs.items()}
        why = "their batch is empty" if current == 0 else "no input has a batch"
        raise BrickBackendError(f"Cannot resize the inputs to batch size {batch_size}: {why}, so there is no "
                                f"example to repeat (given: {shapes}).")
    resized: dict[str, Any] = {}
    for name, value in named_inputs.items():
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == current:
            try:
                index = torch.arange(batch_size, device=value.device) % current
                resized[name] = value.index_select(0, index)
            except (RuntimeError, MemoryError) as error:  # out of memory: say which batch size did it
                size = value[:1].element_size() * value[:1].numel() * batch_size
                raise BrickBackendError(f"Batch size {batch_size} does not fit in memory: input {name!r} alone "
                                        f"needs {size / 2**30:.1f} GiB ({error_summary(error, 200)}); use smaller "
                                        f"batch sizes.") from None
        else:
            resized[name] = value
    return resized


def forked_rng(args: Sequence[Any]) -> contextlib.AbstractContextManager[Any]:
    """The random number generators of the CPU and of the CUDA device ``args`` are on, restored after the
    block: an extra run of a stage (a check, a warm-up) must not shift what the real calls draw."""
    devices = [a.device for a in args if isinstance(a, torch.Tensor) and a.device.type == "cuda"][:1]
    return torch.random.fork_rng(devices=devices)


@contextlib.contextmanager
def preserved_state(module: nn.Module) -> Iterator[None]:
    """Restores ``module``'s buffers (BatchNorm statistics move in TRAIN) and torchmetrics states (metric
    bricks update in TRAIN/VALIDATION/TEST) after the block: benchmarking or verifying a stage must not
    change the model or the metrics it has accumulated."""
    # A lazy module's uninitialized buffers have no values to keep: the block's first run initializes them
    # (as any first call would), and its running statistics are reset to their initial values afterwards.
    buffers = {(m, name): b.detach().clone() for m in module.modules() for name, b in m._buffers.items()
               if b is not None and not is_lazy(b)}
    lazy_norms: list[Any] = [m for m in module.modules() if hasattr(m, "reset_running_stats")
                             and any(b is not None and is_lazy(b) for b in m._buffers.values())]
    metrics: dict[Any, tuple[Any, Any, Any]] = {
        m: (copy.deepcopy(m.metric_state), getattr(m, "_update_count", None), getattr(m, "_computed", None))
        for m in module.modules() if hasattr(m, "metric_state") and hasattr(m, "_defaults")}
    try:
        yield
    finally:
        with torch.no_grad():
            for (owner, name), saved in buffers.items():
                current = owner._buffers.get(name)
                # Unchanged buffers are left alone: a copy would bump their version, which frozen compiled
                # stages read as "the weights changed".  (Versions cannot tell what changed: BatchNorm
                # updates its running statistics without bumping theirs.)
                if current is not None and not torch.equal(current, saved):
                    current.copy_(saved)
            for norm in lazy_norms:
                if not any(b is not None and is_lazy(b) for b in norm._buffers.values()):
                    norm.reset_running_stats()
        for metric, (state, update_count, computed) in metrics.items():
            for name, value in state.items():
                setattr(metric, name, value)
            if update_count is not None:
                metric._update_count = update_count
            metric._computed = computed
