"""BoundStage -> ``torch.fx.GraphModule`` (one ``call_module`` node per brick) and :class:`StageModule`.

The graph is written directly from the plan instead of being traced: bricks stay leaves, so ordinary
Python inside them (control flow, asserts) is fine, and ``torch.compile`` / ``torch.export`` trace inside
them later.  Node arguments come from the same :meth:`Binding.arguments` the eager runtime uses.  Metric
bricks stay out of the graph (they are stateful); :class:`StageModule` updates them eagerly on the graph's
outputs.  Node metadata and the first call's output arity check are in :mod:`torchbricks_fx.arity`.
"""

from __future__ import annotations

import contextlib
import keyword
import operator
import re
import types
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.fx
from torch import nn

from torchbricks_fx.arity import META_BRICK, META_OUTPUTS, META_VALUE, ArityCheck, unpack_tuples_of_one
from torchbricks_fx.binding import STAGE_INPUT, name_outputs, returns_declared_arity
from torchbricks_fx.brick import call_without_grad
from torchbricks_fx.errors import BrickError
from torchbricks_fx.plain_graph import PlainGraph
from torchbricks_fx.runtime import (
    BoundStage,
    add_brick_note,
    check_inputs,
    enter_modes,
    exit_modes,
    forked_rng,
    preserved_state,
    resize_batch,
)
from torchbricks_fx.stage import Stage, parse_stage

if TYPE_CHECKING:
    from torchbricks_fx.collection import BrickCollection
    from torchbricks_fx.compiling import CompiledGraph, CompileOptions
    from torchbricks_fx.plan import StagePlan

__all__ = ["META_BRICK", "META_OUTPUTS", "META_VALUE", "StageModule", "build_graph_module", "compile_stage"]

# On every call: one lookup less each.
_is_grad_enabled = torch.is_grad_enabled



def identifier(name: str, taken: set[str]) -> str:
    """A Python identifier for a user name, unique in ``taken`` and not shadowing GraphModule attributes nor
    ``self``, the first argument of the generated ``forward``."""
    ident = re.sub(r"\W", "_", name) or "_"
    if ident[0].isdigit() or keyword.iskeyword(ident) or ident == "self" or hasattr(torch.fx.GraphModule, ident):
        ident = f"b_{ident}"
    candidate, suffix = ident, 1
    while candidate in taken:
        candidate, suffix = f"{ident}_{suffix}", suffix + 1
    taken.add(candidate)
    return candidate


def _graph_outputs(plan: StagePlan, produced: set[str]) -> tuple[str, ...]:
    """Requested outputs the graph produces, then the values metric bricks read from it."""
    metric_inputs = [v for step in plan.steps if not step.in_graph
                     for v in (*step.input_values, *step.binding.all_values)]
    return tuple(dict.fromkeys(v for v in (*plan.outputs, *metric_inputs) if v in produced))


def build_graph_module(bound: BoundStage) -> tuple[torch.fx.GraphModule, tuple[str, ...]]:
    """Writes the stage's graph: a placeholder per required input, a ``call_module`` node per model brick
    (calling the brick's own module, shared, not copied), ``getitem`` nodes for tuple outputs.  Returns the
    GraphModule and the value names of its (tuple) outputs."""
    plan = bound.plan
    graph = torch.fx.Graph()
    taken: set[str] = set()
    env: dict[str, Any] = {STAGE_INPUT: plan.stage}
    for name in plan.required_inputs:
        env[name] = graph.placeholder(identifier(name, taken))
        env[name].meta[META_VALUE] = name
    root: dict[str, Any] = {}
    for step in plan.steps:
        if not step.in_graph:
            continue
        target = identifier(step.name, taken)
        root[target] = bound.bricks[step.name].graph_module(plan.stage)
        args, kwargs = step.binding.arguments(env)
        if step.blocks_gradients and plan.stage is Stage.TRAIN:
            node = graph.call_function(call_without_grad, (graph.get_attr(target), *args), kwargs)
        else:
            node = graph.call_module(target, args, kwargs)
        node.meta[META_BRICK] = step.name
        node.meta[META_OUTPUTS] = step.outputs
        unpacked = len(step.outputs) > 1 or bound.bricks[step.name].returns_tuple
        if len(step.outputs) == 1 and not unpacked:
            env[step.outputs[0]] = node
        for index, output in enumerate(step.outputs if unpacked else ()):
            env[output] = graph.create_node("call_function", operator.getitem, (node, index),
                                            name=identifier(output, taken))
            env[output].meta[META_VALUE] = output
    outputs = _graph_outputs(plan, set(env) - {STAGE_INPUT, *plan.required_inputs})
    graph.output(tuple(env[name] for name in outputs))
    _drop_unused_getitems(graph)
    graph.lint()
    graph_module = torch.fx.GraphModule(root, graph, class_name=f"{plan.stage.name.title()}Graph")
    graph_module.training = bound.training
    for target, module in root.items():
        # Found in the instance dict, generated code skips nn.Module.__getattr__ (~1 us per brick per call).
        graph_module.__dict__[target] = module
    return graph_module, outputs


def _drop_unused_getitems(graph: torch.fx.Graph) -> None:
    """Removes unpacking of outputs nobody reads (pure nodes; brick nodes are never removed here)."""
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target is operator.getitem and not node.users:
            graph.erase_node(node)


def raising_brick(graph_module: torch.fx.GraphModule, error: BaseException,
                  runs: Sequence[torch.fx.GraphModule] = ()) -> str | None:
    """The brick whose node raised ``error`` in a call of ``graph_module``'s generated code (or of ``runs``,
    copies of it), from the traceback's line in that code (the line-to-node map torch.fx records)."""
    codes = {gm.forward.__code__ for gm in (graph_module, *runs)}
    lineno_map = getattr(graph_module, "_lineno_map", None)
    if not lineno_map:
        return None
    traceback = error.__traceback__
    while traceback is not None and traceback.tb_frame.f_code not in codes:
        traceback = traceback.tb_next
    if traceback is not None:
        line = traceback.tb_lineno - traceback.tb_frame.f_code.co_firstlineno
    else:  # Dynamo refusing to trace (torch._dynamo.exc.Unsupported): the user-code frames it traced, the
        # outermost being the stage's generated code or a compiled copy of it (same lines, another file name)
        stack = getattr(error, "real_stack", None) or ()
        frame = stack[0] if stack else None
        if frame is None or frame.lineno is None or not frame.filename.startswith("<eval_with_key>"):
            return None
        line = frame.lineno - graph_module.forward.__code__.co_firstlineno
    index = lineno_map.get(line)
    nodes = list(graph_module.graph.nodes)
    return nodes[index].meta.get(META_BRICK) if index is not None and index < len(nodes) else None


class StageModule(nn.Module):
    """One stage of a collection as a module: ``forward(named_inputs) -> {output name: value}``.

    It runs ``graph_module`` (positional inputs in ``input_names`` order, a tuple of outputs) in the
    stage's modes (:meth:`BoundStage.modes`), whatever mode the modules were left in, then updates the
    stage's metric bricks.
    """

    _graph_forward: Callable[..., Any]
    _plain: PlainGraph
    _pick_inputs: Callable[[Mapping[str, Any]], tuple[Any, ...]]
    _bound: BoundStage

    def __init__(self, bound: BoundStage, compile_options: CompileOptions | None = None) -> None:
        super().__init__()
        self.compile_options = compile_options
        plan = bound.plan
        self.plan = plan
        self.stage = plan.stage
        self.input_names = plan.required_inputs
        self.output_names = plan.outputs
        self.pruned = plan.pruned
        self.graph_module, self.graph_output_names = build_graph_module(bound)
        taken: set[str] = set()
        self.metric_bricks = nn.ModuleDict({identifier(step.name, taken): bound.bricks[step.name]
                                            for step in plan.steps if not step.in_graph})
        self.__dict__["_bound"] = bound  # not a submodule: the graph and metric_bricks hold the modules
        self._stage_trains = bound.training
        self._outputs_are_graph_outputs = self.graph_output_names == self.output_names and not bound.metric_steps
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
        # Bound once: the hot path skips nn.Module.__getattr__ and GraphModule.__call__'s error wrapper (and,
        # for one input, a comprehension's frame).
        names = self.input_names
        self.__dict__["_pick_inputs"] = (lambda inputs: (inputs[names[0]],)) if len(names) == 1 else \
            operator.itemgetter(*names) if names else (lambda inputs: ())
        self.__dict__["_plain"] = plain = PlainGraph(self.graph_module)
        self.__dict__["_graph_forward"] = plain.run
        if self.compile_options is not None:
            from torchbricks_fx.compiling import CompiledGraph

            compiled = CompiledGraph(self.graph_module, self.stage, self.compile_options, plain=plain.run,
                                     on_plain=self._run_plain)
            self.__dict__["_compiled"] = self.__dict__["_graph_forward"] = compiled
        if self._bound.metric_steps:
            # Metrics are stateful and full of data-dependent shapes: under torch.compile they stay eager,
            # behind this one deliberate graph break, instead of Dynamo tracing (and breaking inside)
            # torchmetrics.  Applied only here: importing Dynamo costs seconds.
            self.__dict__["_update_metrics"] = torch.compiler.disable(self._bound.update_metrics)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        for name in ("forward", "_pick_inputs", "_plain", "_graph_forward", "_compiled", "_update_metrics"):
            state.pop(name, None)  # per-instance functions cannot be pickled; rebuilt on load
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._bind_own_forward()

    def forward(self, named_inputs: dict[str, Any]) -> dict[str, Any]:
        try:
            args = self._pick_inputs(named_inputs)
        except (KeyError, TypeError, IndexError):  # a missing name, or no dict at all (a tensor, a list)
            check_inputs(self.plan, named_inputs)
            raise
        # The stage's modes as in BoundStage.modes(), spelled out with plain calls: cheaper on every call, and
        # Dynamo resumes after the metric update's deliberate graph break here, which it cannot inside a
        # user-defined context manager.  The grad mode is switched only when it differs.
        bound = self._bound
        training = self._stage_trains
        flipped = enter_modes(bound.modules, training)
        grad_before = _is_grad_enabled()
        try:
            if grad_before is not training:
                torch._C._set_grad_enabled(training)
            try:
                results = self._graph_forward(*args) if self._arity_checked else self._first_run(args)
            except Exception as error:
                brick = raising_brick(self.graph_module, error, (self._plain.direct,))
                if brick is not None and not isinstance(error, BrickError):
                    add_brick_note(error, brick)
                raise
            if self._outputs_are_graph_outputs:
                return dict(zip(self.output_names, results, strict=True))
            values = dict(zip(self.graph_output_names, results, strict=True))
            if bound.metric_steps:
                values = self._update_metrics(named_inputs, values)
        finally:
            if grad_before is not training:
                torch._C._set_grad_enabled(grad_before)
            exit_modes(flipped, training)
        return {name: values[name] for name in self.output_names}

    def _update_metrics(self, named_inputs: Mapping[str, Any], values: Mapping[str, Any]) -> dict[str, Any]:
        return self._bound.update_metrics(named_inputs, values)  # replaced per instance (see _bind_own_forward)

    def _first_run(self, args: Sequence[Any]) -> Any:
        """The first call checks every brick's output arity (then calls run the graph directly)."""
        if torch.compiler.is_compiling():  # the user's torch.compile traces the stage
            return self._traced_first_run(args)
        check = ArityCheck(self.graph_module)
        if self.compile_options is None:
            results = check.run(*args)
        else:  # A compiled stage checks eagerly (restoring what the check moved), then its first call compiles,
            # as a warm-up expects.
            with preserved_state(self.graph_module), forked_rng(args), torch.no_grad():
                check.run(*args)  # draws no random numbers the real call would
        if check.tuples_of_one:  # the graph unpacks them from now on (later calls run it directly)
            unpack_tuples_of_one(self.graph_module, check.tuples_of_one)
            self.__dict__["_plain"] = plain = PlainGraph(self.graph_module)
            if self.compiled is not None:  # the same object: warm_up and runners hold it
                self.compiled.rebuild(plain.run)
            else:
                self.__dict__["_graph_forward"] = plain.run
        self._arity_checked = True
        return results if self.compile_options is None else self._graph_forward(*args)

    def _traced_first_run(self, args: Sequence[Any]) -> tuple[Any, ...]:
        """The model steps as Dynamo traces them before any eager call: each brick's return value is checked
        against its output names on its Python structure, known while tracing, so the compiled code pays
        nothing for the check.  Only a wrong arity breaks the graph, to raise eagerly."""
        values = dict(zip(self.input_names, args, strict=True))
        values[STAGE_INPUT] = self.stage
        for step in self._bound.model_steps:
            step_args, kwargs = step.binding.arguments(values)
            result = step.fn(*step_args, **kwargs)
            if not returns_declared_arity(result, step.outputs):
                torch.compiler.disable(name_outputs)(step.name, result, step.outputs)  # raises
            if len(step.outputs) == 1:  # a tuple here is a tuple of one (checked above)
                values[step.outputs[0]] = result[0] if isinstance(result, tuple) else result
            elif step.outputs:
                values.update(zip(step.outputs, result, strict=True))
        return tuple(values[name] for name in self.graph_output_names)

    # ------------------------------------------------------------------ compiled stages
    @property
    def compiled(self) -> CompiledGraph | None:
        """The compiled graph when built with ``compile=``; ``None`` otherwise."""
        compiled: CompiledGraph | None = self.__dict__.get("_compiled")
        return compiled

    def _run_plain(self) -> None:
        """Called by the compiled graph when it measured the plain graph fastest: calls go to it directly."""
        self.__dict__["_graph_forward"] = self._plain.run

    def warm_up(self, named_inputs: Mapping[str, Any], batch_sizes: Sequence[int] | None = None) -> None:
        """Runs the stage on ``named_inputs`` resized to each of ``batch_sizes`` (default: as given), so that a
        compiled stage compiles now: a graph specialized to each of these batch sizes and, with
        ``dynamic_batch``, the dynamic-batch graph that serves every other size.  The model's buffers, metric
        states and random number generators are restored afterwards.  On CPU, Dynamo specializes convolution
        stages to batch 1, 2-15 and 16+: one size from each range (``batch_sizes=[1, 2, 16]``) compiles for
        them all."""
        inputs = [dict(named_inputs)] if batch_sizes is None else \
            [resize_batch(named_inputs, size, self.input_names) for size in batch_sizes]
        compiled = self.compiled
        tensors = [value for each in inputs for value in each.values()]
        with preserved_state(self), forked_rng(tensors), \
                (compiled.warming_up() if compiled else contextlib.nullcontext()):
            for each in inputs:
                self(each)

    def refresh(self) -> None:
        """A frozen compiled stage forgets its weights and freezes them again on the next call (needed only
        after changes no version counter shows, such as writes through ``param.data``)."""
        if self.compiled is not None:
            self.compiled.refresh()

    def extra_repr(self) -> str:
        compiled = ", compiled" if self.compile_options is not None else ""
        return f"stage={self.stage.value}, inputs={list(self.input_names)}, outputs={list(self.output_names)}{compiled}"


def compile_stage(collection: BrickCollection, stage: Stage | str, *, outputs: Sequence[str] | None = None,
                  compile: bool | CompileOptions = False) -> StageModule:
    """Plans ``stage`` of ``collection`` and writes it as a :class:`StageModule` over a pruned GraphModule.

    ``outputs`` selects the values to return (default: every value the stage's bricks produce); only the
    bricks they need (and the stage's metric bricks) are kept.  ``compile=True`` (or a
    :class:`~torchbricks_fx.compiling.CompileOptions`) compiles the graph for what the stage is: eval
    stages as inference graphs with frozen weights (refrozen when the weights change), TRAIN forward and
    backward; the first call's batch size (and ``warm_up``'s) get graphs of their own, every other batch
    size one graph with a dynamic batch axis.  Raises ``BrickGraphError``.
    """
    from torchbricks_fx.compile_options import compile_options_of

    options = compile_options_of(compile)
    return StageModule(collection.bound_stage(parse_stage(stage), outputs), options)
