"""How a compiled stage runs one way of compiling its graph: :class:`Variant` (a ``torch.compile`` of its
own copy of the GraphModule, or the plain graph), :class:`Slot` (the candidates for one kind of batch size
and the one chosen), and the batch-axis and recompile helpers they share.  Internal to ``compiling.py``."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.fx

from torchbricks_fx.errors import BrickBackendError
from torchbricks_fx.runtime import resize_batch
from torchbricks_fx.stage import Stage

__all__ = ["Slot", "Variant", "batch_dynamic", "batch_size", "failing_recompiles", "resized"]


class Variant:
    """One way to run the graph: compiled (``frozen`` or not; for one batch size at a time, or with a
    ``dynamic`` batch axis) on its own copy of the GraphModule (its own code object, so its own Dynamo cache;
    the modules are shared), or the plain graph."""

    def __init__(self, name: str, graph_module: torch.fx.GraphModule, *, compiled: bool, frozen: bool,
                 dynamic: bool, mode: str | None, plain: Callable[..., Any]) -> None:
        self.name = name
        self.frozen = frozen
        self.compiled = compiled
        self.dynamic = dynamic
        self.needs_marks = compiled and dynamic  # batch marks on the inputs of its first compile
        self.graph_module = torch.fx.GraphModule(graph_module, graph_module.graph) if compiled else graph_module
        self.graph_module.training = graph_module.training
        self.run: Callable[..., Any] = torch.compile(
            self.graph_module, fullgraph=True, mode=mode, dynamic=None if dynamic else False) if compiled \
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
