"""Bricks: modules with input names, output names and the stages they are alive in.

A brick only *declares* how it is connected; running it is the job of a bound stage (``runtime.py``) or a
compiled stage (``fx.py``).  Every name is checked with the brick's own name at plan time (``plan.py``);
here only the forms of the arguments are checked.

A brick tells the collections that hold it when something that changes their plans changes (its
connections, its alive stages, ``calculate_gradients``, the module it calls), so that each collection
tree re-plans exactly when it must and never because of an unrelated brick.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from torchbricks_fx.binding import (
    STAGE_INPUT,
    Binding,
    InputNames,
    WatchedDict,
    WatchedList,
    name_outputs,
    normalize_input_names,
    normalize_output_names,
)
from torchbricks_fx.errors import BrickGraphError
from torchbricks_fx.plan_member import PlanMember
from torchbricks_fx.stage import LOSS_STAGES, Stage, parse_alive_stages

__all__ = [
    "STAGE_INPUT",
    "Brick",
    "BrickInterface",
    "BrickLoss",
    "BrickMetricSingle",
    "BrickMetrics",
    "BrickModule",
    "BrickNotTrainable",
    "BrickTrainable",
    "CallableModule",
    "InputNames",
    "PlanMember",
    "Stage",
]


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


class Brick(PlanMember):
    """Base class: a module with input names, output names and alive stages.

    Subclasses say what runs (``graph_module``, ``stage_callable``) and whether they must run even when
    nothing reads their outputs (``has_side_effects``).  ``returns_tuple`` says that the graph module always
    returns a tuple of one value per output name, also for one name: a compiled stage unpacks it then.
    """

    has_side_effects: ClassVar[bool] = False
    runs_in_graph: ClassVar[bool] = True
    returns_tuple: ClassVar[bool] = False

    def __init__(self, input_names: InputNames, output_names: list[str],
                 alive_stages: str | Iterable[Stage | str] | None = "all",
                 default_stages: tuple[Stage, ...] = tuple(Stage)) -> None:
        super().__init__()
        self.input_names = input_names
        self.output_names = output_names
        self.alive_stages = parse_alive_stages(alive_stages, default=default_stages)

    # Connections are properties so that changing one invalidates the owners' plans.
    @property
    def input_names(self) -> list[str] | dict[str, str] | str:
        names = self._input_names
        if isinstance(names, dict):
            return WatchedDict(names, self, "input_names")
        return names if isinstance(names, str) else WatchedList(names, self, "input_names")

    @input_names.setter
    def input_names(self, value: InputNames) -> None:
        self._input_names = normalize_input_names(value)
        self.plan_changed()

    @property
    def output_names(self) -> list[str]:
        return WatchedList(self._output_names, self, "output_names")

    @output_names.setter
    def output_names(self, value: list[str]) -> None:
        self._output_names = normalize_output_names(value)
        self.plan_changed()

    @property
    def alive_stages(self) -> frozenset[Stage]:
        return self._alive_stages

    @alive_stages.setter
    def alive_stages(self, value: str | Iterable[Stage | str]) -> None:
        self._alive_stages = parse_alive_stages(value)
        self._alive_stages_changed()
        self.plan_changed()

    def _alive_stages_changed(self) -> None:
        """Hook for what a brick keeps per alive stage (a metric brick's clones)."""

    def run_now(self, stage: Stage) -> bool:
        return stage in self.alive_stages

    def graph_module(self, stage: Stage) -> nn.Module:
        """The module a stage calls with the brick's inputs (one ``call_module`` node in a compiled stage)."""
        raise NotImplementedError

    def stage_callable(self, stage: Stage) -> Callable[..., Any]:
        """What the eager runtime calls with the brick's inputs in ``stage`` (default: ``graph_module``)."""
        return self.graph_module(stage)

    @property
    def blocks_gradients(self) -> bool:
        return False

    def forward(self, named_inputs: dict[str, Any], stage: Stage) -> dict[str, Any]:
        """Seed-compatible single-brick call: picks the inputs by name, returns the named outputs (an
        ``"all"`` brick receives every given input)."""
        names = self.input_names
        if names == "all":
            binding = Binding(takes_all=True, all_values=tuple(named_inputs))
        elif isinstance(names, dict):
            binding = Binding(kwargs=tuple(names.items()))
        else:
            binding = Binding(args=tuple(names))
        args, kwargs = binding.arguments({**named_inputs, STAGE_INPUT: stage})
        result = self.stage_callable(stage)(*args, **kwargs)
        if isinstance(result, dict) and self.has_side_effects:
            return result
        return dict(zip(self.output_names, name_outputs(type(self).__name__, result, tuple(self.output_names)),
                        strict=True))

    def extract_losses(self, named_outputs: Mapping[str, Any]) -> dict[str, Any]:
        return {}

    def summarize(self, stage: Stage, reset: bool = False) -> dict[str, Any]:
        return {}

    @property
    def metric_names(self) -> tuple[str, ...]:
        """The names ``summarize`` reports (known before any metric is computed)."""
        return ()

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
    def calculate_gradients(self) -> bool:
        return self._calculate_gradients

    @calculate_gradients.setter
    def calculate_gradients(self, value: bool) -> None:
        self._calculate_gradients = bool(value)
        self.plan_changed()  # TRAIN's bound step (and graph) wrap the model in no_grad, or stop doing so

    @property
    def blocks_gradients(self) -> bool:
        return not self.calculate_gradients

    def graph_module(self, stage: Stage) -> nn.Module:
        return self.model

    def stage_callable(self, stage: Stage) -> Callable[..., Any]:
        if self.calculate_gradients or stage is not Stage.TRAIN:
            return self.model
        return functools.partial(call_without_grad, self.model)

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

    Metrics are stateful, so they stay out of compiled graphs; every runtime updates them after the
    model bricks of a call have run.
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
        # Relative ("./Accuracy"): in a reused group each copy names its own, as summarize keys them.
        output_names = [f"./{name}" for name in metric_collection] if return_metrics else []
        super().__init__(input_names, output_names, alive_stages, default_stages=LOSS_STAGES)
        self.return_metrics = return_metrics
        self.__dict__["_template"] = metric_collection.clone()  # not a submodule: not in state_dict
        self.metrics = nn.ModuleDict()
        self._alive_stages_changed()

    def _alive_stages_changed(self) -> None:
        """Gives every alive stage without one a fresh clone (at construction and when ``alive_stages`` is
        edited), copied from an existing clone (so on its device) and reset.  A stage no longer alive keeps
        its clone and what it accumulated."""
        metrics: Any = self._modules.get("metrics")
        if metrics is None:  # Brick.__init__ sets alive_stages before the clones exist
            return
        for stage in Stage:
            if stage in self.alive_stages and stage.name not in metrics:
                source: Any = next(iter(metrics.values()), None)
                clone = (self.__dict__["_template"] if source is None else source).clone()
                clone.reset()
                metrics[stage.name] = clone

    def _apply(self, fn: Any, recurse: bool = True) -> Any:
        # The template moves with the brick (.to, .cuda): a stage made alive later gets a clone on its device.
        self.__dict__["_template"]._apply(fn)
        return super()._apply(fn, recurse)

    def graph_module(self, stage: Stage) -> nn.Module:
        return self.metrics[stage.name]

    def stage_callable(self, stage: Stage) -> Callable[..., Any]:
        metric_collection: Any = self.metrics[stage.name]
        return metric_collection if self.return_metrics else metric_collection.update

    @property
    def metric_names(self) -> tuple[str, ...]:
        from torchmetrics.wrappers.abstract import WrapperMetric

        metric_collection: Any = next(iter(self.metrics.values()), None)  # each stage's clone has the same names
        # A wrapper (ClasswiseWrapper) computes a dict whose keys replace its name: known only once computed.
        return () if metric_collection is None else tuple(  # copy_state=False: no copy of compute groups' states
            name for name, metric in metric_collection.items(keep_base=False, copy_state=False)
            if not isinstance(metric, WrapperMetric))

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


class _SeedBrickCall(nn.Module):
    """Calls a seed-style brick's ``forward(named_inputs, stage) -> {output name: value}`` with the values
    its binding passes, and returns its outputs as a tuple in ``output_names`` order (also one output: its value
    may be a tuple itself)."""

    def __init__(self, brick: BrickInterface, stage: Stage) -> None:
        super().__init__()
        self.brick = brick
        self.stage = stage

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        # The stored names, not the properties' watched copies: Dynamo cannot build those in a traced graph.
        names = self.brick._input_names
        if names == "all":
            named_inputs = dict(args[0])
        elif isinstance(names, dict):
            named_inputs = {value: kwargs[argument] for argument, value in names.items()}
        else:
            named_inputs = dict(zip(names, args, strict=True))
        outputs = self.brick.forward(named_inputs, self.stage)
        return tuple(outputs[name] for name in self.brick._output_names)


class BrickInterface(Brick):
    """The base class of seed-era torchbricks (0.0.9): subclasses implement ``forward(named_inputs, stage)``
    returning ``{output name: value}``; ``named_inputs`` holds the values named in ``input_names``.  Such a
    brick runs in collections and compiled stages like any other (one graph node)."""

    returns_tuple = True

    def graph_module(self, stage: Stage) -> nn.Module:
        return _SeedBrickCall(self, stage)
