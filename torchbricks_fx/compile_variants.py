"""How a compiled stage runs one way of compiling its graph: :class:`Variant` (a ``torch.compile`` of its
own copy of the GraphModule, or the plain graph) and :class:`Slot` (the candidates for one kind of batch
size and the one chosen); and the helpers around them: batch-axis marks and resizing, the recompile stance
and the static-size limit, the timing that picks a candidate, the autocast check, and :class:`WeightSlots`
(what a frozen graph's freshness is checked against).  Internal to
``compiling.py``."""

from __future__ import annotations

import contextlib
import warnings
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.fx
from torch import nn

from torchbricks_fx.compile_options import AUTOCAST_DTYPES
from torchbricks_fx.errors import BrickBackendError, error_summary
from torchbricks_fx.numerics import difference, tolerance
from torchbricks_fx.plain_graph import code_copy
from torchbricks_fx.runtime import resize_batch, watch_module_tree
from torchbricks_fx.stage import Stage

__all__ = ["Slot", "Variant", "WeightSlots", "as_float32", "batch_dynamic", "batch_size",
           "check_autocast", "check_static_room", "failing_recompiles", "is_4d", "resized", "seconds_per_call"]

_SELECTION_SECONDS = 0.12  # timing per candidate when an eval stage picks how to run ...
_SELECTION_ROUNDS = 3  # ... in interleaved rounds


class Variant:
    """One way to run the graph: compiled (``frozen`` or not; for one batch size at a time, or with a
    ``dynamic`` batch axis) on its own copy of the GraphModule (its own code object, so its own Dynamo cache;
    the modules are shared), or the plain graph."""

    def __init__(self, name: str, graph_module: torch.fx.GraphModule, *, compiled: bool, frozen: bool,
                 dynamic: bool, mode: str | None, plain: Callable[..., Any], fullgraph: bool = True) -> None:
        self.name = name
        self.frozen = frozen
        self.compiled = compiled
        self.dynamic = dynamic
        self.needs_marks = compiled and dynamic  # batch marks on the inputs of its first compile
        self.graph_module = code_copy(graph_module) if compiled else graph_module
        self.run: Callable[..., Any] = torch.compile(
            self.graph_module, fullgraph=fullgraph, mode=mode, dynamic=None if dynamic else False) if compiled \
            else plain

    def forget(self) -> None:
        """Drops the compiled code (the frozen weights with it); the next call compiles again."""
        if self.compiled:
            import torch._dynamo

            torch._dynamo.reset_code(type(self.graph_module).forward.__code__)
            self.needs_marks = self.dynamic

    def before_compiling(self) -> None:
        """A frozen variant's weights marked as Dynamo marks them for a first frozen compile ("guarded" static
        addresses).  An unfrozen compile of the same modules (another candidate, or the user's own
        ``torch.compile``) leaves them "unguarded", and a frozen compile on top of that keeps them graph
        inputs: measured 1.6x slower than freezing on ResNet-18."""
        if self.frozen:
            import torch._dynamo

            for module in self.graph_module.modules():
                for tensor in (*module._parameters.values(), *module._buffers.values()):
                    if tensor is not None:
                        torch._dynamo.mark_static_address(tensor, guard=True)


class Slot:
    """The candidates for one kind of batch size (the specialized sizes, or all others), the one chosen and
    what the choice measured (seconds per call)."""

    def __init__(self, candidates: list[Variant]) -> None:
        self.candidates = candidates
        self.variant: Variant | None = candidates[0] if len(candidates) == 1 else None
        self.timings: dict[str, float] = {}

    def frozen(self) -> list[Variant]:
        return [v for v in ([self.variant] if self.variant else self.candidates) if v.frozen]

    def drop(self, candidate: Variant, error: Exception, stage: Stage) -> bool:
        """Drops a candidate Inductor cannot build (a frozen float64 convolution: oneDNN's prepacking takes no
        doubles), with a warning, while others remain; ``False`` when it is the last one."""
        if len(self.candidates) == 1:
            return False
        self.candidates.remove(candidate)
        candidate.forget()
        if self.variant is candidate:
            self.variant = self.candidates[0] if len(self.candidates) == 1 else None
        warnings.warn(f"Stage {stage.value}: Inductor could not compile the {candidate.name!r} graph "
                      f"({_compiler_reason(error)}); the stage runs one of "
                      f"{[c.name for c in self.candidates]}.", stacklevel=4)
        return True


def _compiler_reason(error: Exception) -> str:
    """The compiler's own error, without Dynamo's wrapping and advice."""
    inner = getattr(error, "inner_exception", None) or error
    return error_summary(inner, 200, first_line=True)


def batch_size(args: Sequence[Any]) -> int | None:
    first = args[0] if args else None
    return int(first.shape[0]) if isinstance(first, torch.Tensor) and first.dim() > 0 else None


def resized(args: Sequence[Any], batch_size: int) -> tuple[Any, ...]:
    named = {str(index): arg for index, arg in enumerate(args)}
    return tuple(resize_batch(named, batch_size, list(named)).values())


def batch_dynamic(args: Sequence[Any]) -> tuple[Any, ...]:
    """The arguments with axis 0 dynamic wherever it has the first input's batch size (Dynamo may still
    specialize where the code needs it, e.g. convolution backends choose by batch size).  The marks go on
    copies (only until the stage is warm): marking the caller's tensors would make every later compile that
    sees them dynamic too, and views would make Dynamo guard on their bases."""
    import torch._dynamo

    first = args[0] if args else None
    if not isinstance(first, torch.Tensor) or first.dim() == 0:
        return tuple(args)
    marked = []
    for arg in args:
        if isinstance(arg, torch.Tensor) and arg.dim() > 0 and arg.shape[0] == first.shape[0]:
            arg = arg.clone()
            torch._dynamo.maybe_mark_dynamic(arg, 0)
        marked.append(arg)
    return tuple(marked)


@contextlib.contextmanager
def failing_recompiles(stage: Stage) -> Iterator[None]:
    try:
        with torch.compiler.set_stance("fail_on_recompile"):
            yield
    except RuntimeError as error:
        if "fail_on_recompile" not in str(error):
            raise
        guards = " ".join(line.strip() for line in str(error).splitlines() if line.strip().startswith("-"))
        raise BrickBackendError(f"Stage {stage.value} would recompile after warm-up ({guards or error}); warm it up "
                                f"on these inputs too (stage_module.warm_up(named_inputs, batch_sizes=[...])) or "
                                f"compile without fail_on_recompile.") from error


def check_static_room(stage: Stage, sizes: set[int | None], size: int | None) -> None:
    """Past Dynamo's ``recompile_limit`` graphs per code object, calls would silently run eagerly."""
    import torch._dynamo.config

    limit = torch._dynamo.config.recompile_limit
    if len(sizes) >= limit:
        raise BrickBackendError(
            f"Stage {stage.value} was compiled with CompileOptions(dynamic_batch=False) for {limit} batch sizes "
            f"({sorted(s for s in sizes if s is not None)}), torch._dynamo.config.recompile_limit; batch size "
            f"{size} would run uncompiled.  Use dynamic_batch=True (graphs for the warm-up sizes, one graph for "
            f"all others) or raise the limit.")


def check_autocast(graph_module: torch.fx.GraphModule, stage: Stage, dtype: torch.dtype | None,
                   args: Sequence[Any], results: Any) -> None:
    """Outputs under autocast against float32 eager at the autocast dtype's tolerance."""
    if dtype is None:
        return
    with torch.no_grad():
        reference = graph_module(*args)
    rtol, atol = tolerance(dtype)
    for index, (got, want) in enumerate(zip(as_float32(results), reference, strict=True)):
        if isinstance(want, torch.Tensor) and want.is_floating_point():
            diff = difference(got.to(want.dtype), want, rtol, atol)
            if not diff.ok:
                raise BrickBackendError(
                    f"{str(dtype).replace('torch.', '')} autocast changes output {index} of stage {stage.value} "
                    f"beyond that dtype's tolerance (max abs error {diff.max_abs:.3g}, rtol {rtol:g}, atol "
                    f"{atol:g}); compile without autocast for this stage.")


def seconds_per_call(calls: Mapping[str, Callable[[], Any]]) -> dict[str, float]:
    """Median seconds per call of each, best of interleaved rounds (drift on a shared machine hits all)."""
    from torch.utils.benchmark import Timer

    best: dict[str, float] = {}
    for _ in range(_SELECTION_ROUNDS):
        for name, call in calls.items():
            timer = Timer("call()", globals={"call": call}, num_threads=torch.get_num_threads())
            seconds = float(timer.blocked_autorange(min_run_time=_SELECTION_SECONDS / _SELECTION_ROUNDS).median)
            best[name] = min(best.get(name, seconds), seconds)
    return best


def is_4d(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.dim() == 4


def as_float32(results: Any) -> Any:
    return tuple(r.float() if isinstance(r, torch.Tensor) and r.dtype in AUTOCAST_DTYPES else r for r in results)


# Optimizer steps that changed a watched parameter: a fused optimizer (AdamW(fused=True)) or one writing
# through ``.data`` changes weights without bumping their version counters, so a frozen compiled stage also
# compares its watcher's ``steps``.  Each watcher keeps ``param_ids``, its current parameters.  A step
# changes the parameters with a gradient (torch's optimizers skip the others), before it (the optimizer's
# own post-step hooks, which run first, may clear them) or after it (a closure computes them).
_STEP_WATCHERS: weakref.WeakSet[Any] = weakref.WeakSet()
_STEP_HOOKS: list[Any] = []
_HAD_GRADIENT: dict[int, set[int]] = {}  # id(optimizer) -> ids of its parameters with a gradient before a step


def watch_optimizer_steps(watcher: Any) -> None:
    """Adds 1 to ``watcher.steps`` after every optimizer step that changes one of ``watcher.param_ids``
    (torch's global step hooks, registered on first use)."""
    if not _STEP_HOOKS:
        from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

        _STEP_HOOKS.extend([register_optimizer_step_pre_hook(_before_step),
                            register_optimizer_step_post_hook(_count_step)])
    _STEP_WATCHERS.add(watcher)


def _with_gradient(optimizer: torch.optim.Optimizer) -> set[int]:
    return {id(p) for group in optimizer.param_groups for p in group["params"] if p.grad is not None}


def _before_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    if _STEP_WATCHERS:
        _HAD_GRADIENT[id(optimizer)] = _with_gradient(optimizer)


def _count_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    if not _STEP_WATCHERS:
        return
    stepped = _HAD_GRADIENT.pop(id(optimizer), set()) | _with_gradient(optimizer)
    for watcher in tuple(_STEP_WATCHERS):
        if not watcher.param_ids.isdisjoint(stepped):
            watcher.steps += 1


class WeightSlots:
    """Where every parameter and buffer of a graph's modules lives, and :meth:`state`, their versions and
    storages (and, with ``watch_steps``, the optimizer steps that changed its parameters): a frozen graph's
    constants are fresh while the state is the one it froze.  Follows the module tree: a layer swapped in
    after the first call is watched too."""

    def __init__(self, graph_module: torch.fx.GraphModule, watch_steps: bool = False) -> None:
        self.graph_module = graph_module
        self.steps = 0
        self.collect()
        watch_module_tree(self)
        if watch_steps:
            watch_optimizer_steps(self)

    def collect(self, joining: nn.Module | None = None) -> None:
        """Finds the slots again; ``joining`` (a submodule being registered, not attached yet) marks them for
        finding again on the next :meth:`state`, and its modules as watched."""
        modules = dict(self.graph_module.named_modules())
        named = [(f"{path}.{name}".lstrip("."), d, name) for path, m in modules.items()
                 for d in (m._parameters, m._buffers) for name in d]
        self._slots = [(d, name) for _, d, name in named]
        self._names = [path for path, _, _ in named]
        self._stale = joining is not None
        self.module_ids = frozenset(map(id, [*modules.values(), *(joining.modules() if joining else ())]))
        self.param_ids = frozenset(id(p) for m in modules.values() for p in m._parameters.values() if p is not None)

    def parameters_changed(self) -> None:
        """A parameter object was replaced under a watched module (torch's hook runs before it is set):
        the slots are found again on the next :meth:`state`."""
        self._stale = True

    walk_modules = collect  # what watch_module_tree calls

    def state(self) -> tuple[Any, ...]:
        if self._stale:
            self.collect()
        return self.steps, tuple([None if t is None else (t._version, t.data_ptr())
                                  for t in [d[name] for d, name in self._slots]])

    def changed_names(self, before: tuple[Any, ...]) -> list[str]:
        now = self.state()[1]
        if len(now) != len(before[1]):
            return ["(modules were added or replaced)"]
        return [name for name, old, new in zip(self._names, before[1], now, strict=True) if old != new]
