"""StagePlan -> ``torch.fx.GraphModule`` (one ``call_module`` node per brick) and :class:`StageModule`.

The graph is written directly from the plan instead of being traced: bricks stay leaves, so ordinary
Python inside them (control flow, asserts) is fine, and ``torch.compile`` / ``torch.export`` trace inside
them later.  Metric bricks stay out of the graph (they are stateful); :class:`StageModule` updates them
eagerly on the graph's outputs.

Node metadata (``node.meta``):

* ``"torchbricks_fx.brick"``: the user's brick name of a brick node;
* ``"torchbricks_fx.outputs"``: that brick's output value names (arity is checked on the first call);
* ``"torchbricks_fx.value"``: the user's value name of a placeholder or ``getitem`` node.
"""

from __future__ import annotations

import keyword
import operator
import re
import types
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx
from torch import nn

from torchbricks_fx.bricks import STAGE_INPUT, Brick, call_without_grad, name_outputs
from torchbricks_fx.errors import BrickGraphError
from torchbricks_fx.plan import PLAN_HINT, StagePlan
from torchbricks_fx.runtime import (
    all_reads,
    bind_steps,
    check_inputs,
    enter_modes,
    exit_modes,
    run_steps,
    stage_modules,
)
from torchbricks_fx.stage import Stage, parse_stage

__all__ = ["META_BRICK", "META_OUTPUTS", "META_VALUE", "StageModule", "build_graph_module", "compile_stage"]

META_BRICK = "torchbricks_fx.brick"
META_OUTPUTS = "torchbricks_fx.outputs"
META_VALUE = "torchbricks_fx.value"


def identifier(name: str, taken: set[str]) -> str:
    """A Python identifier for a user name, unique in ``taken`` and not shadowing GraphModule attributes."""
    ident = re.sub(r"\W", "_", name) or "_"
    if ident[0].isdigit() or keyword.iskeyword(ident) or hasattr(torch.fx.GraphModule, ident):
        ident = f"b_{ident}"
    candidate, suffix = ident, 1
    while candidate in taken:
        candidate, suffix = f"{ident}_{suffix}", suffix + 1
    taken.add(candidate)
    return candidate


def _graph_outputs(plan: StagePlan, produced: set[str]) -> tuple[str, ...]:
    """Requested outputs the graph produces, then the values metric bricks read from it."""
    metric_inputs = [v for step in plan.steps if not step.in_graph for v in step.input_values]
    return tuple(dict.fromkeys(v for v in (*plan.outputs, *metric_inputs) if v in produced))


def _check_metric_consumers(plan: StagePlan) -> None:
    metric_values = {v: step.name for step in plan.steps if not step.in_graph for v in step.outputs}
    problems = [f"Brick {step.name!r} reads {value!r}, returned by metric brick {metric_values[value]!r}: metrics "
                f"run outside the compiled graph, so graph bricks cannot read their values."
                for step in plan.steps if step.in_graph for value in step.input_values if value in metric_values]
    if problems:
        raise BrickGraphError(problems, hint=PLAN_HINT)


def build_graph_module(plan: StagePlan, bricks: dict[str, Brick]) -> tuple[torch.fx.GraphModule, tuple[str, ...]]:
    """Writes the stage's graph: a placeholder per required input, a ``call_module`` node per graph brick
    (calling the brick's own module, shared, not copied), ``getitem`` nodes for tuple outputs.  Returns the
    GraphModule and the value names of its (tuple) outputs."""
    _check_metric_consumers(plan)
    graph = torch.fx.Graph()
    taken: set[str] = set()
    env: dict[str, torch.fx.Node] = {}
    for name in plan.required_inputs:
        env[name] = graph.placeholder(identifier(name, taken))
        env[name].meta[META_VALUE] = name
    root: dict[str, Any] = {}

    def value(name: str) -> Any:
        return plan.stage if name == STAGE_INPUT else env[name]

    for step in plan.steps:
        if not step.in_graph:
            continue
        target = identifier(step.name, taken)
        root[target] = bricks[step.name].graph_module()
        if step.takes_all:
            args: tuple[Any, ...] = ({n: env[n] for n in all_reads(plan, step) if n in env},)
        else:
            args = tuple(value(v) for v in step.args)
        kwargs = {argument: value(v) for argument, v in step.kwargs}
        if step.blocks_gradients and plan.stage is Stage.TRAIN:
            node = graph.call_function(call_without_grad, (graph.get_attr(target), *args), kwargs)
        else:
            node = graph.call_module(target, args, kwargs)
        node.meta[META_BRICK] = step.name
        node.meta[META_OUTPUTS] = step.outputs
        if len(step.outputs) == 1:
            env[step.outputs[0]] = node
        for index, output in enumerate(step.outputs if len(step.outputs) > 1 else ()):
            env[output] = graph.create_node("call_function", operator.getitem, (node, index),
                                            name=identifier(output, taken))
            env[output].meta[META_VALUE] = output
    outputs = _graph_outputs(plan, set(env) - set(plan.required_inputs))
    graph.output(tuple(env[name] for name in outputs))
    _drop_unused_getitems(graph)
    graph.lint()
    graph_module = torch.fx.GraphModule(root, graph, class_name=f"{plan.stage.name.title()}Graph")
    graph_module.training = plan.stage is Stage.TRAIN
    for target, module in root.items():
        # Found in the instance dict, generated code skips nn.Module.__getattr__ (~1 us per brick per call).
        graph_module.__dict__[target] = module
    return graph_module, outputs


def _drop_unused_getitems(graph: torch.fx.Graph) -> None:
    """Removes unpacking of outputs nobody reads (pure nodes; brick nodes are never removed here)."""
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target is operator.getitem and not node.users:
            graph.erase_node(node)


class _ArityCheck(torch.fx.Interpreter):
    """Runs the graph once, checking every brick's return value against its output names (a single-output
    brick is one node, so a wrong tuple would otherwise flow on silently)."""

    def run_node(self, n: torch.fx.Node) -> Any:
        result = super().run_node(n)
        if META_BRICK in n.meta:
            name_outputs(n.meta[META_BRICK], result, n.meta[META_OUTPUTS])
        return result


class StageModule(nn.Module):
    """One stage of a collection as a module: ``forward(named_inputs) -> {output name: value}``.

    It runs ``graph_module`` (positional inputs in ``input_names`` order, a tuple of outputs) in the
    stage's mode, whatever mode the modules were left in (TRAIN: train mode with gradients; other stages:
    eval mode without gradients), restores the caller's modes, then updates the stage's metric bricks.
    """

    _graph_forward: Callable[..., Any]

    def __init__(self, plan: StagePlan, bricks: dict[str, Brick]) -> None:
        super().__init__()
        self.plan = plan
        self.stage = plan.stage
        self.input_names = plan.required_inputs
        self.output_names = plan.outputs
        self.pruned = plan.pruned
        self.graph_module, self.graph_output_names = build_graph_module(plan, bricks)
        metric_specs = [step for step in plan.steps if not step.in_graph]
        taken: set[str] = set()
        self.metric_bricks = nn.ModuleDict({identifier(s.name, taken): bricks[s.name] for s in metric_specs})
        self._metric_steps = bind_steps(plan, metric_specs, bricks)
        # Only the modules the graph calls can change behaviour with the mode (not the brick wrappers).
        self._mode_modules = stage_modules([bricks[s.name].graph_module() for s in plan.steps if s.in_graph])
        self._outputs_are_graph_outputs = self.graph_output_names == self.output_names and not self._metric_steps
        self._training = plan.stage is Stage.TRAIN
        self._arity_checked = False
        self._bind_own_forward()

    def _bind_own_forward(self) -> None:
        # Dynamo caches compiled code per code object, at most `recompile_limit` (8) entries each.  With the
        # class's one `forward`, the 9th StageModule compiled in a process would silently run eagerly; a
        # copy of the code object per instance gives each its own cache.
        function = StageModule.forward
        own = types.FunctionType(function.__code__.replace(), function.__globals__, function.__name__,
                                 function.__defaults__, function.__closure__)
        self.__dict__["forward"] = types.MethodType(own, self)
        # Bound once: the hot path skips nn.Module.__getattr__ and GraphModule.__call__'s error wrapper.
        self.__dict__["_graph_forward"] = self.graph_module.forward

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("forward", None)  # a per-instance function cannot be pickled; rebuilt on load
        state.pop("_graph_forward", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._bind_own_forward()

    def forward(self, named_inputs: dict[str, Any]) -> dict[str, Any]:
        try:
            args = [named_inputs[name] for name in self.input_names]
        except KeyError:
            check_inputs(self.plan, named_inputs)
            raise
        training = self._training
        flipped = enter_modes(self._mode_modules, training)
        try:
            with torch.set_grad_enabled(training):
                results = self._run_graph(args)
                if self._outputs_are_graph_outputs:
                    return dict(zip(self.output_names, results, strict=True))
                values = dict(zip(self.graph_output_names, results, strict=True))
                if self._metric_steps:
                    values = self._update_metrics(named_inputs, values)
        finally:
            exit_modes(flipped, training)
        return {name: values[name] for name in self.output_names}

    @torch.compiler.disable
    def _update_metrics(self, named_inputs: dict[str, Any], graph_values: dict[str, Any]) -> dict[str, Any]:
        # Metrics are stateful and full of data-dependent shapes: under torch.compile they stay eager, behind
        # this one deliberate graph break, instead of Dynamo tracing (and breaking inside) torchmetrics.
        values = {**named_inputs, **graph_values, STAGE_INPUT: self.stage}
        run_steps(self._metric_steps, values, named_inputs)
        return values

    def _run_graph(self, args: list[Any]) -> Any:
        if torch.compiler.is_compiling() or self._arity_checked:
            return self._graph_forward(*args)
        results = _ArityCheck(self.graph_module).run(*args)
        self._arity_checked = True
        return results

    def extra_repr(self) -> str:
        return f"stage={self.stage.value}, inputs={list(self.input_names)}, outputs={list(self.output_names)}"


def compile_stage(collection: Any, stage: Stage | str, *, outputs: Sequence[str] | None = None) -> StageModule:
    """Plans ``stage`` of ``collection`` and writes it as a :class:`StageModule` over a pruned GraphModule.

    ``outputs`` selects the values to return (default: every value the stage's bricks produce); only the
    bricks they need (and the stage's metric bricks) are kept.  Raises ``BrickGraphError``.
    """
    stage = parse_stage(stage)
    plan = collection.plan(stage, outputs)
    return StageModule(plan, collection.bricks())
