"""Bricks: modules with input names, output names and the stages they are alive in.

A brick only *declares* how it is connected; running it is the job of a collection (eager) or a compiled
stage (``torch.fx``).  Every name is checked with the brick's own name at plan time (see ``plan.py``);
here only the shapes of the arguments are checked.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from torchbricks_fx.errors import BrickGraphError, BrickOutputError
from torchbricks_fx.stage import LOSS_STAGES, Stage, parse_alive_stages

__all__ = [
    "STAGE_INPUT",
    "Brick",
    "BrickCollection",  # noqa: F822 (resolved lazily by __getattr__)
    "BrickLoss",
    "BrickMetricSingle",
    "BrickMetrics",
    "BrickModule",
    "BrickNotTrainable",
    "BrickTrainable",
    "CallableModule",
    "InputNames",
    "Stage",
    "call_without_grad",
    "name_outputs",
]

STAGE_INPUT = "stage"
"""Reserved input name: a brick asking for it receives the current :class:`Stage`."""

InputNames = list[str] | tuple[str, ...] | dict[str, str] | Literal["all"]

_structure_version = 0


def structure_version() -> int:
    """A counter bumped by every change to a brick's connections or a collection's members (plan caches
    compare it instead of re-walking the collection on every call)."""
    return _structure_version


def bump_structure_version() -> None:
    global _structure_version
    _structure_version += 1


def _normalize_input_names(input_names: object) -> list[str] | dict[str, str] | str:
    if isinstance(input_names, str):
        if input_names != "all":
            raise BrickGraphError([f'input_names must be a list of names, a dict {{argument: name}} or "all", '
                                   f"not the string {input_names!r} (did you mean [{input_names!r}]?)."])
        return "all"
    if isinstance(input_names, Mapping):
        return dict(input_names)
    if isinstance(input_names, Iterable):
        return list(input_names)
    raise BrickGraphError([f'input_names must be a list of names, a dict {{argument: name}} or "all", '
                           f"not {input_names!r}."])


def _normalize_output_names(output_names: object) -> list[str]:
    if isinstance(output_names, str) or not isinstance(output_names, Iterable):
        raise BrickGraphError([f"output_names must be a list of names, not {output_names!r}."])
    return list(output_names)


class CallableModule(nn.Module):
    """Wraps a plain callable (a function, a torchvision transform) so that it can be a graph leaf."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)

    def extra_repr(self) -> str:
        return getattr(self.fn, "__qualname__", type(self.fn).__name__)


def call_without_grad(module: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """Runs ``module`` without recording gradients; the graph uses it for ``calculate_gradients=False``."""
    with torch.no_grad():
        return module(*args, **kwargs)


def name_outputs(brick_name: str, result: Any, output_names: tuple[str, ...]) -> tuple[Any, ...]:
    """Checks a brick's return value against its output names and returns one value per name."""
    n_names = len(output_names)
    if n_names == 1:
        if isinstance(result, tuple):
            raise BrickOutputError(f"Brick {brick_name!r} returned a tuple of {len(result)} values but declares one "
                                   f"output name {list(output_names)}; give one name per returned value.")
        return (result,)
    if n_names == 0:
        return ()
    if not isinstance(result, (tuple, list)) or len(result) != n_names:
        got = f"a {type(result).__name__} of {len(result)} values" if isinstance(result, (tuple, list)) \
            else f"one {type(result).__name__}"
        raise BrickOutputError(f"Brick {brick_name!r} returned {got} but declares {n_names} output names "
                               f"{list(output_names)}; return a tuple with one value per name.")
    return tuple(result)


class Brick(nn.Module):
    """Base class: a module with input names, output names and alive stages.

    Subclasses say how they run (``stage_callable``) and whether they must run even when nothing reads
    their outputs (``has_side_effects``).
    """

    has_side_effects: ClassVar[bool] = False
    runs_in_graph: ClassVar[bool] = True

    def __init__(self, input_names: InputNames, output_names: list[str],
                 alive_stages: str | Iterable[Stage | str] | None = "all",
                 default_stages: tuple[Stage, ...] = tuple(Stage)) -> None:
        super().__init__()
        self.input_names = input_names
        self.output_names = output_names
        self.alive_stages = parse_alive_stages(alive_stages, default=default_stages)

    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(name, value)
        if isinstance(value, nn.Module):
            bump_structure_version()  # e.g. ``brick.model = other``: bound plans must call the new module

    # Connections are properties so that changing one invalidates cached plans.
    @property
    def input_names(self) -> list[str] | dict[str, str] | str:
        return self._input_names

    @input_names.setter
    def input_names(self, value: InputNames) -> None:
        self._input_names = _normalize_input_names(value)
        bump_structure_version()

    @property
    def output_names(self) -> list[str]:
        return self._output_names

    @output_names.setter
    def output_names(self, value: list[str]) -> None:
        self._output_names = _normalize_output_names(value)
        bump_structure_version()

    @property
    def alive_stages(self) -> frozenset[Stage]:
        return self._alive_stages

    @alive_stages.setter
    def alive_stages(self, value: str | Iterable[Stage | str]) -> None:
        self._alive_stages = parse_alive_stages(value)
        bump_structure_version()

    def run_now(self, stage: Stage) -> bool:
        return stage in self.alive_stages

    def stage_callable(self, stage: Stage) -> Callable[..., Any]:
        """What the runtime calls, with the bound inputs, when this brick runs in ``stage``."""
        raise NotImplementedError

    def graph_module(self) -> nn.Module:
        """The module a compiled stage calls (one ``call_module`` node)."""
        raise NotImplementedError

    @property
    def blocks_gradients(self) -> bool:
        return False

    def forward(self, named_inputs: dict[str, Any], stage: Stage) -> dict[str, Any]:
        """Seed-compatible single-brick call: picks the inputs by name, returns the named outputs."""
        values = {**named_inputs, STAGE_INPUT: stage}
        fn = self.stage_callable(stage)
        names = self.input_names
        if names == "all":
            result = fn(dict(named_inputs))
        elif isinstance(names, dict):
            result = fn(**{argument: values[name] for argument, name in names.items()})
        else:
            result = fn(*[values[name] for name in names])
        if isinstance(result, dict) and self.has_side_effects:
            return result
        return dict(zip(self.output_names, name_outputs(type(self).__name__, result, tuple(self.output_names)),
                        strict=True))

    def extract_losses(self, named_outputs: Mapping[str, Any]) -> dict[str, Any]:
        return {}

    def summarize(self, stage: Stage, reset: bool = False) -> dict[str, Any]:
        return {}

    def extra_repr(self) -> str:
        stages = "all" if len(self.alive_stages) == len(Stage) else sorted(s.value for s in self.alive_stages)
        return f"input_names={self.input_names!r}, output_names={self.output_names!r}, alive_stages={stages!r}"


class BrickModule(Brick):
    """A model brick: calls ``model`` with the named inputs and names what it returns.

    ``loss_output_names`` marks outputs as losses (``"all"``, ``"none"`` or a list); ``trainable=False``
    freezes the weights; ``calculate_gradients=False`` runs the model without recording gradients, so no
    gradient flows through it to earlier bricks.
    """

    def __init__(self, model: nn.Module | Callable[..., Any], input_names: InputNames, output_names: list[str],
                 alive_stages: str | Iterable[Stage | str] | None = "all",
                 loss_output_names: str | list[str] = "none",
                 calculate_gradients: bool = True, trainable: bool = True,
                 default_stages: tuple[Stage, ...] = tuple(Stage)) -> None:
        super().__init__(input_names, output_names, alive_stages, default_stages)
        self.model = model if isinstance(model, nn.Module) else CallableModule(model)
        self.loss_output_names = self._parse_loss_output_names(loss_output_names)
        self.calculate_gradients = calculate_gradients
        if not trainable:
            self.model.requires_grad_(False)

    def _parse_loss_output_names(self, loss_output_names: str | list[str]) -> list[str]:
        if loss_output_names in ("all", "none"):
            return list(self.output_names) if loss_output_names == "all" else []
        if isinstance(loss_output_names, str):
            loss_output_names = [loss_output_names]
        unknown = [name for name in loss_output_names if name not in self.output_names]
        if unknown:
            raise BrickGraphError([f"loss_output_names {unknown} are not among the brick's output_names "
                                   f"{self.output_names}."])
        return list(loss_output_names)

    @property
    def blocks_gradients(self) -> bool:
        return not self.calculate_gradients

    def stage_callable(self, stage: Stage) -> Callable[..., Any]:
        if self.calculate_gradients or stage is not Stage.TRAIN:
            return self.model
        model = self.model
        return lambda *args, **kwargs: call_without_grad(model, *args, **kwargs)

    def graph_module(self) -> nn.Module:
        return self.model

    def extract_losses(self, named_outputs: Mapping[str, Any]) -> dict[str, Any]:
        return {name: named_outputs[name] for name in self.loss_output_names if name in named_outputs}


class BrickTrainable(BrickModule):
    """A model brick whose weights are trained."""

    def __init__(self, model: nn.Module | Callable[..., Any], input_names: InputNames, output_names: list[str],
                 loss_output_names: str | list[str] = "none",
                 alive_stages: str | Iterable[Stage | str] | None = "all") -> None:
        super().__init__(model, input_names, output_names, alive_stages=alive_stages,
                         loss_output_names=loss_output_names, calculate_gradients=True, trainable=True)


class BrickNotTrainable(BrickModule):
    """A model brick with frozen weights.  ``calculate_gradients=False`` also stops gradients flowing
    through it (and saves the memory of recording them)."""

    def __init__(self, model: nn.Module | Callable[..., Any], input_names: InputNames, output_names: list[str],
                 alive_stages: str | Iterable[Stage | str] | None = "all",
                 calculate_gradients: bool = True) -> None:
        super().__init__(model, input_names, output_names, alive_stages=alive_stages, loss_output_names="none",
                         calculate_gradients=calculate_gradients, trainable=False)


class BrickLoss(BrickModule):
    """A loss brick: alive in TRAIN, VALIDATION and TEST by default; every output is a loss by default."""

    def __init__(self, model: nn.Module | Callable[..., Any], input_names: InputNames, output_names: list[str],
                 loss_output_names: str | list[str] = "all",
                 alive_stages: str | Iterable[Stage | str] | None = None) -> None:
        super().__init__(model, input_names, output_names, alive_stages=alive_stages,
                         loss_output_names=loss_output_names, calculate_gradients=True, trainable=True,
                         default_stages=LOSS_STAGES)


class BrickMetrics(Brick):
    """Metric brick over a torchmetrics ``MetricCollection`` (or a dict of metrics), with one clone per
    alive stage.  Metrics are updated on every call and read with ``summarize``; with
    ``return_metrics=True`` the batch values are also returned (one output per metric name).

    Metrics are stateful, so compiled stages keep them out of the graph and update them eagerly on the
    graph's outputs.
    """

    has_side_effects = True
    runs_in_graph = False

    def __init__(self, metric_collection: Any, input_names: InputNames,
                 alive_stages: str | Iterable[Stage | str] | None = None,
                 return_metrics: bool = False) -> None:
        from torchmetrics import MetricCollection  # heavy import, only when metrics are used

        if isinstance(metric_collection, Mapping):
            metric_collection = MetricCollection(dict(metric_collection))
        if not isinstance(metric_collection, MetricCollection):
            raise BrickGraphError([f"BrickMetrics needs a torchmetrics MetricCollection or a dict of metrics, "
                                   f"not {type(metric_collection).__name__}; use BrickMetricSingle for one metric."])
        output_names = [str(name) for name in metric_collection] if return_metrics else []
        super().__init__(input_names, output_names, alive_stages, default_stages=LOSS_STAGES)
        self.return_metrics = return_metrics
        self.metrics = nn.ModuleDict({stage.name: metric_collection.clone() for stage in Stage
                                      if stage in self.alive_stages})

    def stage_callable(self, stage: Stage) -> Callable[..., Any]:
        metric_collection: Any = self.metrics[stage.name]
        return metric_collection if self.return_metrics else metric_collection.update

    def graph_module(self) -> nn.Module:
        raise NotImplementedError("metric bricks run outside the graph")

    def summarize(self, stage: Stage, reset: bool = False) -> dict[str, Any]:
        if stage.name not in self.metrics:
            return {}
        metric_collection: Any = self.metrics[stage.name]
        values = dict(metric_collection.compute())
        if reset:
            metric_collection.reset()
        return values


class BrickMetricSingle(BrickMetrics):
    """Metric brick over one torchmetrics ``Metric`` (named ``metric_name`` or after its class)."""

    def __init__(self, metric: Any, input_names: InputNames, metric_name: str | None = None,
                 alive_stages: str | Iterable[Stage | str] | None = None, return_metrics: bool = False) -> None:
        metric_name = metric_name or type(metric).__name__
        super().__init__({metric_name: metric}, input_names, alive_stages=alive_stages,
                         return_metrics=return_metrics)


def __getattr__(name: str) -> Any:
    # Seed compatibility: ``from torchbricks.bricks import BrickCollection, Stage`` (collection imports this
    # module, so it is resolved lazily).
    if name == "BrickCollection":
        from torchbricks_fx.collection import BrickCollection

        return BrickCollection
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
