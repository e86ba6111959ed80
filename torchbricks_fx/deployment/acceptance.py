"""The two gates a candidate passes: the collection's own metric bricks on the validation batches, and (for
float32 candidates) export's tolerance on the verification inputs.

The metric gate feeds fresh copies of the metric bricks of the metric stage (VALIDATION, or TEST when
VALIDATION has none) with the candidate's outputs and the batch's own values (the targets), bound by each
brick's binding exactly as the stage would call it, over the whole validation set; eager's outputs give
the reference values.  A metric brick may read only what the deployed stage outputs or what a batch
provides: anything else is an error before any work.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from torchbricks_fx.binding import STAGE_INPUT
from torchbricks_fx.brick import Brick
from torchbricks_fx.errors import BrickDeployInputError
from torchbricks_fx.numerics import OutputError, output_errors
from torchbricks_fx.runtime import BoundStep, run_steps
from torchbricks_fx.stage import Stage

if TYPE_CHECKING:
    from torchbricks_fx.collection import BrickCollection

__all__: list[str] = []  # internals of deploy(); the public API is torchbricks_fx.deployment

Run = Callable[[Mapping[str, torch.Tensor]], Mapping[str, torch.Tensor]]

METRIC_EPSILON = 1e-6
"""Drops within this fraction of a metric's magnitude (at least 1) count as none: metrics are float32
sums, and a float32 candidate that reproduces eager within tolerance moves them by rounding only."""

_TOLERANCE_ONLY = "deploy on tolerance alone with max_metric_drop=None (only float32 candidates can pass then)"


def _metric_steps(collection: BrickCollection, stage: Stage) -> tuple[BoundStep, ...]:
    return collection.bound_stage(stage).metric_steps


def metric_stage_of(collection: BrickCollection, requested: Stage | None) -> Stage:
    """The stage whose metric bricks judge the candidates: ``requested``, else VALIDATION, else TEST."""
    stages = [requested] if requested is not None else [Stage.VALIDATION, Stage.TEST]
    for stage in stages:
        if _metric_steps(collection, stage):
            return stage
    named = " nor ".join(stage.value for stage in stages)
    raise BrickDeployInputError(
        f"The collection has no metric bricks alive in stage {named}, so candidates cannot be judged by its own "
        f"metrics. Add one (e.g. BrickMetricSingle(MulticlassAccuracy(...), input_names=['logits', 'targets'])), "
        f"or {_TOLERANCE_ONLY}.")


def _fresh(brick: Brick) -> Brick:
    """A copy of a metric brick on the CPU with every torchmetrics state reset: the user's accumulated
    metrics stay untouched, and each candidate starts from zero.  On the CPU because metrics are computed
    there for every candidate (their outputs are brought there), wherever the collection was moved."""
    from torchmetrics import Metric

    fresh = copy.deepcopy(brick).cpu()
    for module in fresh.modules():
        if isinstance(module, Metric):
            module.reset()
    return fresh


def _directions(brick: Brick, stage: Stage) -> dict[str, bool | None]:
    """``higher_is_better`` of each metric a brick summarizes (``None`` where the metric does not say)."""
    metrics = getattr(brick, "metrics", None)
    collection = metrics[stage.name] if metrics is not None and stage.name in metrics else None
    if collection is None or not hasattr(collection, "items"):
        return {}
    return {str(name): getattr(metric, "higher_is_better", None) for name, metric in collection.items()}


def _scalars(name: str, value: Any, skipped: list[str]) -> dict[str, float]:
    """A metric result as floats: a 0-D result as itself, a 1-D one (per class) as ``name/0``, ``name/1``...;
    others (matrices) are left out and named in ``skipped``."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return {name: float(value)}
    if isinstance(value, torch.Tensor) and value.dim() <= 1:
        if value.dim() == 0:
            return {name: float(value)}
        return {f"{name}/{index}": float(item) for index, item in enumerate(value)}
    skipped.append(name)
    return {}


@dataclass(frozen=True)
class _MetricBrick:
    name: str
    prefix: str  # the nested collection's path, as ``summarize`` names its metrics
    step: BoundStep


def check_batch_inputs(batches: Sequence[Any], inputs: Sequence[str]) -> None:
    """Every validation batch is a dict holding the deployed stage's inputs (static int8 calibrates on them,
    the metric gate runs them); the error names the batch and the input."""
    for index, batch in enumerate(batches):
        if not isinstance(batch, Mapping):
            raise BrickDeployInputError(f"Validation batch {index} is a {type(batch).__name__}; batches are "
                                        f"dicts {{input name: tensor}} including the targets.")
        missing = [name for name in inputs if name not in batch]
        if missing:
            raise BrickDeployInputError(f"Validation batch {index} has no {missing[0]!r}, an input of the deployed "
                                        f"stage (which needs {list(inputs)}; the batch has {sorted(batch)}).")


class MetricGate:
    """The metric bricks of ``stage`` fed by a deployed stage with ``inputs`` and ``outputs``, and by the
    validation batches (targets, and values made by bricks outside the deployed stage).  Raises
    ``BrickDeployInputError`` when a metric brick reads a value the deployed stage could output but does
    not (it names the ``outputs=`` to ask for)."""

    def __init__(self, collection: BrickCollection, stage: Stage, deployed_stage: Stage, inputs: Sequence[str],
                 outputs: Sequence[str]) -> None:
        self.stage = stage
        self.inputs = tuple(inputs)
        prefixes = {name: "".join(f"{part}/" for part in scope) for name, scope, _ in collection.named_bricks()}
        bound = collection.bound_stage(stage)
        self.bricks = {step.name: bound.bricks[step.name] for step in bound.metric_steps}
        self._metric_bricks = tuple(_MetricBrick(step.name, prefixes.get(step.name, ""), step)
                                    for step in bound.metric_steps)
        external = set(bound.plan.required_inputs)
        deployable = set(collection.plan(deployed_stage).outputs)  # what outputs=[...] could add
        self.batch_values: dict[str, list[str]] = {}  # value a batch must hold -> metric bricks reading it
        self._derived: dict[str, str] = {}  # ... of which made by a brick dead in the deployed stage -> it
        for step in bound.metric_steps:
            for value in (*step.binding.input_values, *step.binding.all_values):
                if value in outputs:
                    continue
                if value not in external and value in deployable:
                    raise BrickDeployInputError(
                        f"Metric brick {step.name!r} reads {value!r}, produced by brick "
                        f"{bound.plan.producer(value)!r} in stage {stage.value}, but the deployed stage "
                        f"{deployed_stage.value} does not output it (its outputs: {list(outputs)}). Request it: "
                        f"outputs=[..., {value!r}].")
                if value not in external:  # made by a brick not alive in the deployed stage: batches give it
                    self._derived[value] = bound.plan.producer(value) or "?"
                self.batch_values.setdefault(value, []).append(step.name)

    def check_batches(self, batches: Sequence[Any]) -> None:
        """Every batch is a dict holding the deployed stage's inputs and every value a metric brick reads
        from it (the targets); the error names the batch, the input and the metric brick."""
        if not batches:
            raise BrickDeployInputError(f"The validation set is empty; the metric bricks {list(self.bricks)} need "
                                        f"batches with {sorted(set(self.inputs) | set(self.batch_values))}.")
        check_batch_inputs(batches, self.inputs)
        for index, batch in enumerate(batches):
            for value, readers in self.batch_values.items():
                if value not in batch:
                    made = self._derived.get(value)
                    how = "" if made is None else (f" (brick {made!r} makes it in stage {self.stage.value} but is "
                                                   f"not part of the deployed stage: compute it into the batches)")
                    raise BrickDeployInputError(
                        f"Validation batch {index} has no {value!r}, which metric brick {readers[0]!r} reads "
                        f"(the batch has {sorted(batch)}). Include it in every validation batch{how}.")

    def directions(self) -> dict[str, bool | None]:
        return {f"{brick.prefix}{name}": better for brick in self._metric_bricks
                for name, better in _directions(self.bricks[brick.name], self.stage).items()}

    def evaluate(self, run: Run, batches: Sequence[Mapping[str, Any]]) -> tuple[dict[str, float], list[str]]:
        """The metrics over every batch with ``run``'s outputs (fresh metric states), as floats, and the
        names of metrics left out (results that are not 0-D or 1-D)."""
        fresh = {brick.name: _fresh(self.bricks[brick.name]) for brick in self._metric_bricks}
        steps = [dataclasses.replace(b.step, fn=fresh[b.name].stage_callable(self.stage)) for b in self._metric_bricks]
        for batch in batches:
            outputs = run({name: batch[name] for name in self.inputs})
            values = {**{n: _on_cpu(v) for n, v in batch.items()}, **{n: v.cpu() for n, v in outputs.items()},
                      STAGE_INPUT: self.stage}
            run_steps(steps, values)  # names the metric brick that raises
        skipped: list[str] = []
        summary: dict[str, float] = {}
        for brick in self._metric_bricks:
            for name, value in fresh[brick.name].summarize(self.stage).items():
                summary.update(_scalars(f"{brick.prefix}{name}", value, skipped))
        return summary, skipped


def _on_cpu(value: Any) -> Any:
    return value.cpu() if isinstance(value, torch.Tensor) else value


def _base(name: str) -> str:
    head, _, tail = name.rpartition("/")
    return head if head and tail.isdigit() else name


def resolve_budgets(max_metric_drop: float | Mapping[str, float], metrics: Sequence[str]) -> dict[str, float]:
    """The largest accepted drop per metric: one number for all, or a dict by metric name (a per-class
    metric's name covers each class); metrics a dict does not name get no budget (0)."""
    def checked(what: str, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
            raise BrickDeployInputError(f"max_metric_drop{what} must be a non-negative number, not {value!r}.")
        return float(value)

    if not isinstance(max_metric_drop, Mapping):
        budget = checked("", max_metric_drop)
        return dict.fromkeys(metrics, budget)
    known = {*metrics, *map(_base, metrics)}
    unknown = sorted(set(max_metric_drop) - known)
    if unknown:
        raise BrickDeployInputError(f"max_metric_drop names {unknown}, which are not metrics of the collection; "
                                    f"its metrics are {sorted(known)}.")
    budgets = {name: checked(f"[{name!r}]", value) for name, value in max_metric_drop.items()}
    return {name: budgets.get(name, budgets.get(_base(name), 0.0)) for name in metrics}


def metric_drops(reference: Mapping[str, float], got: Mapping[str, float],
                 directions: Mapping[str, bool | None]) -> dict[str, float]:
    """How much worse each metric is than the reference: ``reference - got`` where higher is better,
    ``got - reference`` where lower is, ``|got - reference|`` where the metric does not say.  Drops within
    rounding (``METRIC_EPSILON`` of the metric's magnitude: a small metric, an MSE of 1e-4, keeps its
    resolution) are 0; NaN stays NaN (and is rejected)."""
    drops = {}
    for name, ref in reference.items():
        value = got.get(name, math.nan)
        better = directions.get(name, directions.get(_base(name)))
        drop = ref - value if better is True else value - ref if better is False else abs(value - ref)
        drops[name] = 0.0 if abs(drop) <= METRIC_EPSILON * abs(ref) else drop
    return drops


def metric_reasons(drops: Mapping[str, float], budgets: Mapping[str, float]) -> list[str]:
    """One reason per metric whose drop exceeds its budget."""
    return [f"{name} drops by {drop:.4g} (> {budgets[name]:g})" if not math.isnan(drop) else f"{name} is NaN"
            for name, drop in drops.items() if math.isnan(drop) or drop > budgets[name]]


def tolerance_errors(run: Run, runs: Sequence[tuple[Mapping[str, torch.Tensor], Mapping[str, torch.Tensor]]],
                     names: Sequence[str], device: torch.device) -> tuple[OutputError, ...]:
    """The candidate's outputs against eager's on the verification inputs, with export's tolerances."""
    return output_errors([(run(inputs), eager) for inputs, eager in runs], names, device)


def tolerance_reasons(errors: Sequence[OutputError]) -> list[str]:
    return [f"output {e.name!r} differs from eager by {e.max_abs_error:.3g} (tolerance rtol {e.rtol:g}, atol "
            f"{e.atol:g})" + (f": {e.note}" if e.note else "") for e in errors if not e.ok]
