"""Fast stages: each stage's graph compiled for what the stage is.

An eval stage (VALIDATION, TEST, INFERENCE, EXPORT) never needs gradients and never changes its weights
while it runs, so Inductor may fold them into the compiled code as constants ("freezing": prepacked
convolution and matrix weights, about 3x faster than eager at small batches on CPU).  Frozen weights must
never go stale: before each call the weights' version counters and storages (and the process's count of
training calls, for changes no counter sees, e.g. fused optimizers) are compared with those the graph was
frozen with; on a change the graph is frozen again on the next call.  A TRAIN stage compiles forward and
backward (AOTAutograd), without Inductor's layout optimization (it changes convolution layouts and with
them the gradients' rounding).

The batch axis is dynamic from the first call; ``fail_on_recompile`` turns any recompile after warm-up
into an error naming the guard that failed.  ``torch._dynamo`` and ``torch._inductor`` are imported here
only, when a compiled stage is built.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx

from torchbricks_fx.errors import BrickBackendError
from torchbricks_fx.numerics import difference, tolerance
from torchbricks_fx.runtime import resize_batch, training_calls
from torchbricks_fx.stage import Stage

__all__ = ["CompileOptions"]

_AUTOCAST_DTYPES = (torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class CompileOptions:
    """How ``compile_stage(..., compile=CompileOptions(...))`` compiles a stage (``compile=True``: defaults).

    ``freeze`` (eval stages): weights folded into the compiled code as constants, refrozen when they change.
    ``dynamic_batch``: axis 0 of the inputs is dynamic from the first call.  ``fail_on_recompile``: after
    warm-up (the first call, or ``StageModule.warm_up``), a call that would recompile raises instead,
    naming the guard that failed.  ``channels_last``: convolution weights (in place, values unchanged) and
    4-D inputs in channels-last layout.  ``autocast`` (eval stages): ``torch.bfloat16`` or
    ``torch.float16`` autocast, accepted only when the first call's outputs match float32 eager within that
    dtype's tolerance; outputs keep their float32 dtype.  ``mode``: ``torch.compile``'s mode.
    """

    freeze: bool = True
    dynamic_batch: bool = True
    fail_on_recompile: bool = False
    channels_last: bool = False
    autocast: torch.dtype | None = None
    mode: str | None = None

    def __post_init__(self) -> None:
        if self.autocast is not None and self.autocast not in _AUTOCAST_DTYPES:
            raise BrickBackendError(f"CompileOptions(autocast={self.autocast!r}): autocast takes torch.bfloat16 or "
                                    f"torch.float16 (or None for float32).")


def _graphs_compiled() -> int:
    """How many graphs Dynamo has compiled in this process (its own counter; ``torch._dynamo.reset`` keeps it)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


class CompiledGraph:
    """A stage's GraphModule called through ``torch.compile``, specialized for the stage (see the module
    docstring).  Called like the GraphModule: positional tensors in, a tuple of outputs out."""

    def __init__(self, graph_module: torch.fx.GraphModule, stage: Stage, options: CompileOptions) -> None:
        import torch._dynamo

        self.graph_module = graph_module
        self.stage = stage
        self.options = options
        self.training = stage is Stage.TRAIN
        self.frozen = options.freeze and not self.training
        if options.autocast is not None and self.training:
            raise BrickBackendError("CompileOptions(autocast=...) is for eval stages; TRAIN keeps float32 (use "
                                    "torch.autocast around your training step for mixed-precision training).")
        if options.channels_last:
            graph_module.to(memory_format=torch.channels_last)  # the shared modules' 4-D weights, in place
        self._compiled = torch.compile(graph_module, fullgraph=True, mode=options.mode)
        self._slots = [(d, name) for m in graph_module.modules() for d in (m._parameters, m._buffers) for name in d]
        self._weights_state: tuple[Any, ...] | None = None
        self._warm = False
        self._warming = False
        self._warm_batch_sizes: tuple[int, ...] = ()
        self._verified = options.autocast is None
        self.compiles = 0
        self.compile_seconds = 0.0

    # ------------------------------------------------------------------ freshness
    def _state(self) -> tuple[Any, ...]:
        tensors = [d[name] for d, name in self._slots]
        return training_calls(), tuple([(t._version, t.data_ptr()) for t in tensors if t is not None])

    def _ensure_fresh(self, args: Sequence[Any]) -> None:
        state = self._state()
        if state != self._weights_state:
            if self._weights_state is not None:
                self.refresh()
                self._rewarm(args)
            self._weights_state = state

    def _rewarm(self, args: Sequence[Any]) -> None:
        """After refreezing, compiles again for the batch sizes of the last warm-up (so that
        ``fail_on_recompile`` keeps holding for them)."""
        with self.warming_up(self._warm_batch_sizes):
            for size in self._warm_batch_sizes:
                self(*_resized(args, size))

    def refresh(self) -> None:
        """Forgets the frozen weights: the next call compiles (and freezes) again.  Called automatically when
        the weights change; call it after changes nothing can see (writes through ``param.data``)."""
        import torch._dynamo

        torch._dynamo.reset_code(type(self.graph_module).forward.__code__)
        self._weights_state = None
        self._warm = False

    # ------------------------------------------------------------------ calls
    def __call__(self, *args: Any) -> Any:
        if self.frozen:
            self._ensure_fresh(args)
        if self.options.dynamic_batch and not self._warm:
            _mark_batch_dynamic(args)
        if self.options.channels_last:
            args = tuple(a.contiguous(memory_format=torch.channels_last) if _is_4d(a) else a for a in args)
        before, start = _graphs_compiled(), time.perf_counter()
        with self._settings(args):
            results = self._compiled(*args)
        compiled = _graphs_compiled() - before
        if compiled:
            self.compiles += compiled
            self.compile_seconds += time.perf_counter() - start
        if not self._verified:
            results = self._verify_autocast(args, results)
        self._warm = self._warm or not self._warming
        return _as_float32(results) if self.options.autocast is not None else results

    @contextlib.contextmanager
    def warming_up(self, batch_sizes: Sequence[int] = ()) -> Iterator[None]:
        """Calls inside may compile, also with ``fail_on_recompile``; the stage is warm afterwards (and warms
        up on ``batch_sizes`` again whenever it refreezes)."""
        if self._warming:  # nested (a refreeze inside a warm-up): the outer one decides
            yield
            return
        self._warming = True
        try:
            yield
        finally:
            self._warming = False
            self._warm = True
        self._warm_batch_sizes = tuple(batch_sizes)

    @contextlib.contextmanager
    def _settings(self, args: Sequence[Any]) -> Iterator[None]:
        import torch._inductor.config as inductor

        # Set and restored around every call: these flags decide at (re)compile time, and a stage recompiles
        # on any call (a new batch-size range, refreshed weights).  Plain assignments cost ~4 us.
        saved = inductor.freezing, inductor.layout_optimization
        inductor.freezing = self.frozen
        inductor.layout_optimization = inductor.layout_optimization and not self.training
        try:
            with self._stance(), self._autocast(args):
                yield
        finally:
            inductor.freezing, inductor.layout_optimization = saved

    def _stance(self) -> contextlib.AbstractContextManager[Any]:
        if not (self.options.fail_on_recompile and self._warm and not self._warming):
            return contextlib.nullcontext()
        return _failing_recompiles(self.stage)

    def _autocast(self, args: Sequence[Any]) -> contextlib.AbstractContextManager[Any]:
        if self.options.autocast is None:
            return contextlib.nullcontext()
        device = next((a.device.type for a in args if isinstance(a, torch.Tensor)), "cpu")
        return torch.autocast(device, dtype=self.options.autocast)

    def _verify_autocast(self, args: Sequence[Any], results: Any) -> Any:
        """Outputs under autocast against float32 eager at the autocast dtype's tolerance, once."""
        dtype = self.options.autocast
        if dtype is None:
            return results
        with torch.no_grad():
            reference = self.graph_module(*args)
        rtol, atol = tolerance(dtype)
        for index, (got, want) in enumerate(zip(_as_float32(results), reference, strict=True)):
            if isinstance(want, torch.Tensor) and want.is_floating_point():
                diff = difference(got.to(want.dtype), want, rtol, atol)
                if not diff.ok:
                    raise BrickBackendError(
                        f"{str(dtype).replace('torch.', '')} autocast changes output {index} of stage "
                        f"{self.stage.value} beyond that dtype's tolerance (max abs error {diff.max_abs:.3g}, rtol "
                        f"{rtol:g}, atol {atol:g}); compile without autocast for this stage.")
        self._verified = True
        return results


def _is_4d(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.dim() == 4


def _as_float32(results: Any) -> Any:
    return tuple(r.float() if isinstance(r, torch.Tensor) and r.dtype in _AUTOCAST_DTYPES else r for r in results)


def _resized(args: Sequence[Any], batch_size: int) -> tuple[Any, ...]:
    named = {str(index): arg for index, arg in enumerate(args)}
    return tuple(resize_batch(named, batch_size, list(named)).values())


def _mark_batch_dynamic(args: Sequence[Any]) -> None:
    """Axis 0 of every input with the first input's batch size is dynamic (Dynamo may still specialize
    where the code needs it, e.g. convolution backends choose by batch size)."""
    import torch._dynamo

    first = args[0] if args else None
    if not isinstance(first, torch.Tensor) or first.dim() == 0:
        return
    for arg in args:
        if isinstance(arg, torch.Tensor) and arg.dim() > 0 and arg.shape[0] == first.shape[0]:
            torch._dynamo.maybe_mark_dynamic(arg, 0)


@contextlib.contextmanager
def _failing_recompiles(stage: Stage) -> Iterator[None]:
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


def warm_up(call: Callable[[dict[str, Any]], Any], compiled: CompiledGraph, inputs_per_batch: Sequence[dict[str, Any]]
            ) -> None:
    """Calls the stage on each set of inputs with recompiles allowed; the stage is warm afterwards."""
    with compiled.warming_up():
        for named_inputs in inputs_per_batch:
            call(named_inputs)
