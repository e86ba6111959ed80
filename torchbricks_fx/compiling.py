"""Fast stages: each stage's graph compiled for what the stage is.

An eval stage (VALIDATION, TEST, INFERENCE, EXPORT) never needs gradients and never changes its weights
while it runs, so Inductor may fold them into the compiled code as constants ("freezing": prepacked
convolution and matrix weights, about 3x faster than eager at small batches on CPU).  Frozen weights must
never go stale: before each call the weights' version counters and storages (and the process's count of
training calls, for changes no counter sees, e.g. fused optimizers) are compared with those the graph was
frozen with; on a change the graph is frozen again on the next call.

Freezing does not always pay, nor does compiling: prepacked kernels cost more per call for tiny layers,
and compiled code costs some 15-30 us per call on a CPU, more than a stage of a few small layers takes
eagerly.  So by default an eval stage measures, on its first call, the frozen graph, the unfrozen one and
the plain graph, and keeps the fastest (``CompiledGraph.choice``).  A TRAIN stage compiles forward and
backward (AOTAutograd), without Inductor's layout optimization (it changes convolution layouts and with
them the gradients' rounding).

The batch axis is dynamic from the first call; ``fail_on_recompile`` turns any recompile after warm-up
into an error naming the guard that failed.  ``torch._dynamo`` and ``torch._inductor`` are imported here
only, when a compiled stage runs.
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
_SELECTION_SECONDS = 0.1  # timing per candidate when an eval stage picks how to run


@dataclass(frozen=True)
class CompileOptions:
    """How ``compile_stage(..., compile=CompileOptions(...))`` compiles a stage (``compile=True``: defaults).

    ``freeze`` (eval stages): ``True`` folds the weights into the compiled code as constants (refrozen when
    they change), ``False`` keeps them inputs, ``None`` (default) measures on the first call the frozen,
    unfrozen and plain graph and keeps the fastest.  ``dynamic_batch``: axis 0 of the inputs is dynamic
    from the first call.  ``fail_on_recompile``: after warm-up (the first call, or
    ``StageModule.warm_up``), a call that would recompile raises instead, naming the guard that failed.
    ``channels_last``: convolution weights (in place, values unchanged) and 4-D inputs in channels-last
    layout.  ``autocast`` (eval stages): ``torch.bfloat16`` or ``torch.float16`` autocast, accepted only
    when the first call's outputs match float32 eager within that dtype's tolerance; outputs keep their
    float32 dtype.  ``mode``: ``torch.compile``'s mode.
    """

    freeze: bool | None = None
    dynamic_batch: bool = True
    fail_on_recompile: bool = False
    channels_last: bool = False
    autocast: torch.dtype | None = None
    mode: str | None = None

    def __post_init__(self) -> None:
        if self.autocast is not None and self.autocast not in _AUTOCAST_DTYPES:
            raise BrickBackendError(f"CompileOptions(autocast={self.autocast!r}): autocast takes torch.bfloat16 or "
                                    f"torch.float16 (or None for float32).")


class _Variant:
    """One way to run the graph: compiled (``frozen`` or not) on its own copy of the GraphModule (its own
    code object, so its own Dynamo cache; the modules are shared), or the plain graph."""

    def __init__(self, name: str, graph_module: torch.fx.GraphModule, compiled: bool, frozen: bool,
                 mode: str | None) -> None:
        self.name = name
        self.frozen = frozen
        self.graph_module = torch.fx.GraphModule(graph_module, graph_module.graph) if compiled else graph_module
        self.graph_module.training = graph_module.training
        self.run: Callable[..., Any] = torch.compile(self.graph_module, fullgraph=True, mode=mode) if compiled \
            else graph_module.forward
        self.compiled = compiled

    def forget(self) -> None:
        """Drops the compiled code (the frozen weights with it); the next call compiles again."""
        if self.compiled:
            import torch._dynamo

            torch._dynamo.reset_code(type(self.graph_module).forward.__code__)

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


class CompiledGraph:
    """A stage's GraphModule, compiled for the stage (see the module docstring).  Called like the
    GraphModule: positional tensors in, a tuple of outputs out."""

    def __init__(self, graph_module: torch.fx.GraphModule, stage: Stage, options: CompileOptions) -> None:
        import torch._dynamo.utils
        import torch._inductor.config

        self._inductor: Any = torch._inductor.config  # a config module: attributes typed at run time
        # Dynamo's count of compiled graphs (kept by torch._dynamo.reset): a stage counts its compilations.
        self._dynamo_stats = torch._dynamo.utils.counters["stats"]
        self.graph_module = graph_module
        self.stage = stage
        self.options = options
        self.training = stage is Stage.TRAIN
        if options.autocast is not None and self.training:
            raise BrickBackendError("CompileOptions(autocast=...) is for eval stages; TRAIN keeps float32 (use "
                                    "torch.autocast around your training step for mixed-precision training).")
        if options.channels_last:
            graph_module.to(memory_format=torch.channels_last)  # the shared modules' 4-D weights, in place
        self._candidates = self._make_candidates()
        self._variant: _Variant | None = self._candidates[0] if len(self._candidates) == 1 else None
        if self._variant is not None:
            self._variant.before_compiling()
        self._slots = [(d, name) for m in graph_module.modules() for d in (m._parameters, m._buffers) for name in d]
        self._weights_state: tuple[Any, ...] | None = None
        self._warm = False
        self._warming = False
        self._warm_batch_sizes: tuple[int, ...] = ()
        self._verified = options.autocast is None
        self.compiles = 0
        self.compile_seconds = 0.0
        self.timings: dict[str, float] = {}  # candidate -> seconds per call, when the stage measured them

    def _make_candidates(self) -> list[_Variant]:
        freeze, mode, gm = self.options.freeze, self.options.mode, self.graph_module
        if self.training:
            return [_Variant("compiled", gm, compiled=True, frozen=False, mode=mode)]
        candidates = []
        if freeze is not False:
            candidates.append(_Variant("compiled-frozen", gm, compiled=True, frozen=True, mode=mode))
        if freeze is not True:
            candidates.append(_Variant("compiled", gm, compiled=True, frozen=False, mode=mode))
        if freeze is None:
            candidates.append(_Variant("eager", gm, compiled=False, frozen=False, mode=mode))
        return candidates

    @property
    def choice(self) -> str | None:
        """How the stage runs: ``"compiled-frozen"``, ``"compiled"`` or ``"eager"`` (``None`` before the
        first call of a stage that measures)."""
        return None if self._variant is None else self._variant.name

    # ------------------------------------------------------------------ calls
    def __call__(self, *args: Any) -> Any:
        variant = self._variant or self._choose(args)
        if not variant.compiled and self._verified:
            return variant.run(*args)  # the plain graph was faster: nothing in its way
        if variant.frozen:
            self._ensure_fresh(args)
        results = self._run(variant, args)
        if not self._verified:
            results = self._verify_autocast(args, results)
        self._warm = self._warm or not self._warming
        return _as_float32(results) if self.options.autocast is not None else results

    def _run(self, variant: _Variant, args: Sequence[Any]) -> Any:
        """One call of ``variant`` with the compiler settings it was (or will be) compiled with.  On every
        call of a compiled stage: kept to plain assignments (a generator context manager costs ~10 us)."""
        if self.options.dynamic_batch and not self._warm and variant.compiled:
            args = _batch_dynamic(args)
        if self.options.channels_last:
            args = tuple(a.contiguous(memory_format=torch.channels_last) if _is_4d(a) else a for a in args)
        inductor, stats = self._inductor, self._dynamo_stats
        # These flags decide at (re)compile time, and a stage may recompile on any call (a new batch-size
        # range, refreshed weights).  Layout optimization converts convolutions to channels-last: it pays
        # for frozen weights only (it changes gradients' rounding in TRAIN and costs per call otherwise).
        saved = inductor.freezing, inductor.layout_optimization
        inductor.freezing, inductor.layout_optimization = variant.frozen, saved[1] and variant.frozen
        before, start = stats["unique_graphs"], time.perf_counter()
        try:
            if self.options.autocast is None and not self._strict():
                results = variant.run(*args)
            else:
                with self._stance(), self._autocast(args):
                    results = variant.run(*args)
        finally:
            inductor.freezing, inductor.layout_optimization = saved
        compiled = stats["unique_graphs"] - before
        if compiled:
            self.compiles += compiled
            self.compile_seconds += time.perf_counter() - start
        return results

    def _choose(self, args: Sequence[Any]) -> _Variant:
        """Runs every candidate on ``args`` (compiling them), times each, keeps the fastest."""
        from torch.utils.benchmark import Timer

        for candidate in self._candidates:
            candidate.before_compiling()
            self._run(candidate, args)  # compiles (and freezes)
            # Timed as each will be called: the plain graph directly, compiled code with its settings around.
            stmt = "run(variant, args)" if candidate.compiled else "variant.run(*args)"
            timer = Timer(stmt, globals={"run": self._run, "variant": candidate, "args": args},
                          num_threads=torch.get_num_threads())
            self.timings[candidate.name] = float(timer.blocked_autorange(min_run_time=_SELECTION_SECONDS).median)
        chosen = min(self._candidates, key=lambda c: self.timings[c.name])
        for candidate in self._candidates:
            if candidate is not chosen:
                candidate.forget()
        if chosen.frozen:
            self._weights_state = self._state()
        self._variant = chosen
        return chosen

    # ------------------------------------------------------------------ freshness of frozen weights
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
        """Forgets frozen weights: the next call compiles (and freezes) again.  Called automatically when the
        weights change; call it after changes nothing can see (writes through ``param.data``)."""
        if self._variant is not None and self._variant.frozen:
            self._variant.forget()
            self._variant.before_compiling()
            self._weights_state = None
            self._warm = False

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

    # ------------------------------------------------------------------ contexts around a call
    def _strict(self) -> bool:
        return self.options.fail_on_recompile and self._warm and not self._warming

    def _stance(self) -> contextlib.AbstractContextManager[Any]:
        return _failing_recompiles(self.stage) if self._strict() else contextlib.nullcontext()

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


def _batch_dynamic(args: Sequence[Any]) -> tuple[Any, ...]:
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
