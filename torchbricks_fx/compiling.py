"""Fast stages: each stage's graph compiled for what the stage is.

An eval stage (VALIDATION, TEST, INFERENCE, EXPORT) never needs gradients and never changes its weights
while it runs, so Inductor may fold them into the compiled code as constants ("freezing": prepacked
convolution and matrix weights, about 3x faster than eager at small batches on CPU).  Frozen weights must
never go stale: before each call the weights' version counters and storages (and their counts of optimizer
steps, for changes no version counter sees: fused optimizers) are compared with those the graph was
frozen with; on a change the graph is frozen again on the next call.

Freezing does not always pay, nor does compiling: prepacked kernels cost more per call for tiny layers,
and compiled code costs some 15-30 us per call on a CPU, more than a stage of a few small layers takes
eagerly.  So by default an eval stage measures, on its first call, the frozen graph, the unfrozen one and
the plain graph, and keeps the fastest (``CompiledGraph.choice``).  A TRAIN stage compiles forward and
backward (AOTAutograd), without Inductor's layout optimization (it changes convolution layouts and with
them the gradients' rounding).

Batch sizes: the sizes a stage warms up on (its first call's, or ``StageModule.warm_up``'s) each get a
graph specialized to that size, the fastest there is (freezing prepacks convolutions for one input shape:
on ResNet-18 a dynamic-batch frozen graph is slower than an unfrozen one).  Every other batch size runs one
graph with a dynamic batch axis, measured and compiled once, when first needed (at warm-up with
``fail_on_recompile``, which then turns any recompile into an error naming the guard that failed).  A
stage whose plain graph beats the specialized ones runs the plain graph for every batch size.

``torch._dynamo`` and ``torch._inductor`` are imported here only, when a compiled stage runs.  How one
candidate compiles and runs is in ``compile_variants.py``.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.fx

from torchbricks_fx.compile_options import CompileOptions
from torchbricks_fx.compile_variants import (
    Slot,
    Variant,
    WeightSlots,
    as_float32,
    batch_dynamic,
    batch_size,
    check_autocast,
    check_static_room,
    failing_recompiles,
    is_4d,
    resized,
    seconds_per_call,
)
from torchbricks_fx.errors import BrickBackendError, add_note
from torchbricks_fx.runtime import forked_rng, preserved_state
from torchbricks_fx.stage import Stage

__all__ = ["CompileOptions"]

_MAX_SPECIALIZED_SIZES = 6  # batch sizes with graphs of their own (Dynamo keeps 8 graphs per code object)


class CompiledGraph:
    """A stage's GraphModule, compiled for the stage (see the module docstring).  Called like the
    GraphModule: positional tensors in, a tuple of outputs out."""

    def __init__(self, graph_module: torch.fx.GraphModule, stage: Stage, options: CompileOptions, *,
                 plain: Callable[..., Any] | None = None, on_plain: Callable[[], None] | None = None) -> None:
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
        if options.channels_last:  # the shared modules' 4-D weights, in place (as parameters that can train,
            with torch.inference_mode(False), torch.no_grad():  # also when built under inference_mode)
                graph_module.to(memory_format=torch.channels_last)
        self._on_plain = on_plain
        self.rebuild(plain or graph_module.forward)
        self._static_sizes: set[int | None] = set()
        self._weights = WeightSlots(graph_module, watch_steps=not self.training and options.freeze is not False)
        self._weights_state: tuple[Any, ...] | None = None
        self._warm = False
        self._warming = False  # inside warming_up: compiles allowed
        self._warming_dynamic = False  # ... and the dynamic-batch graph compiled too
        self._dynamic_warmed = False  # a warm-up compiled it: a refreeze compiles it again for every size
        self._stale = False  # refreshed: the next call compiles again for the warmed-up batch sizes
        self._rewarming = False
        self._compiled_last = False  # whether the last run compiled
        self._changes_own_weights: list[str] = []  # tensors a run of the stage changed: no frozen candidate
        self._verified = options.autocast is None
        self.compiles = 0
        self.compile_seconds = 0.0

    def rebuild(self, plain: Callable[..., Any]) -> None:
        """Makes the candidates from the graph as it is now (``plain`` runs it): the owner edited the graph
        before the first compile (a brick's tuple of one unpacked), and keeps this object."""
        self._plain = plain
        self._static = Slot(self._make_candidates(dynamic=False))
        self._dynamic = Slot(self._make_candidates(dynamic=True)) if self.options.dynamic_batch else None

    def _make_candidates(self, dynamic: bool) -> list[Variant]:
        freeze, mode, gm = self.options.freeze, self.options.mode, self.graph_module
        suffix = ", dynamic batch" if dynamic else ""

        def variant(name: str, compiled: bool, frozen: bool) -> Variant:
            # TRAIN runs what Dynamo cannot capture eagerly (a graph break, as torch.compile does): SWA's
            # cumulative BatchNorm (momentum=None) divides by a data-dependent count.  An eval graph is
            # captured whole, as freezing needs.
            return Variant(name + suffix, gm, compiled=compiled, frozen=frozen, dynamic=dynamic, mode=mode,
                           plain=self._plain, fullgraph=not self.training)

        if self.training:
            return [variant("compiled", compiled=True, frozen=False)]
        candidates = []
        if freeze is not False:
            candidates.append(variant("compiled-frozen", compiled=True, frozen=True))
        if freeze is not True:
            candidates.append(variant("compiled", compiled=True, frozen=False))
        if freeze is None and self.options.autocast is None:  # autocast asks for compiled code
            candidates.append(variant("eager", compiled=False, frozen=False))
        return candidates

    # ------------------------------------------------------------------ what it measured and chose
    @property
    def choice(self) -> str | None:
        """How the stage runs at the batch sizes it warmed up on: ``"compiled-frozen"``, ``"compiled"`` or
        ``"eager"`` (the plain graph, then for every batch size); ``None`` before the first call."""
        return None if self._static.variant is None else self._static.variant.name

    @property
    def timings(self) -> dict[str, float]:
        """Seconds per call of each candidate the stage measured at its first batch size."""
        return dict(self._static.timings)

    @property
    def dynamic_choice(self) -> str | None:
        """How the stage runs other batch sizes (``None`` until one came, or without ``dynamic_batch``)."""
        variant = self._dynamic.variant if self._dynamic is not None else None
        return None if variant is None else variant.name

    @property
    def dynamic_timings(self) -> dict[str, float]:
        return dict(self._dynamic.timings) if self._dynamic is not None else {}

    @property
    def batch_sizes(self) -> tuple[int, ...]:
        """The batch sizes with graphs of their own."""
        return tuple(sorted(size for size in self._static_sizes if size is not None))

    # ------------------------------------------------------------------ calls
    def __call__(self, *args: Any) -> Any:
        if self._stale and not self._rewarming:
            self._rewarm(args)
        size = batch_size(args)
        slot = self._slot_for(size)
        added = slot is self._static and size not in self._static_sizes
        if added:
            self._static_sizes.add(size)
        try:
            return self._call(slot, args)
        except BaseException:
            if added:  # a refused or failed call leaves no batch size behind
                self._static_sizes.discard(size)
            raise

    def _call(self, slot: Slot, args: Sequence[Any]) -> Any:
        variant = slot.variant or self._choose(slot, args)
        if not variant.compiled:
            return variant.run(*args)  # the plain graph was faster: nothing in its way
        if variant.frozen:
            self._ensure_fresh(args)  # a refreeze warms up again, which may drop a graph that cannot freeze
            if variant not in slot.candidates:
                return self._call(slot, args)
        try:
            results = self._run(variant, args)
        except torch._dynamo.exc.BackendCompilerFailed as error:  # refreezing after .to(torch.float64)
            if not slot.drop(variant, error, self.stage):
                raise
            return self._call(slot, args)
        if variant.frozen and self._compiled_last:
            self._check_constant_weights()
        if self._dynamic is not None and slot is self._static and self._compiles_both():
            self._warm_dynamic(args)
        if not self._verified:
            check_autocast(self.graph_module, self.stage, self.options.autocast, args, results)
            self._verified = True
        self._warm = self._warm or not self._warming
        return as_float32(results) if self.options.autocast is not None else results

    def _slot_for(self, size: int | None) -> Slot:
        """The static slot for the sizes warmed up on (or every size, without ``dynamic_batch``)."""
        if size in self._static_sizes:
            return self._static
        if self._dynamic is None:
            check_static_room(self.stage, self._static_sizes, size)
            return self._static
        if (self._warming or not self._warm) and len(self._static_sizes) < _MAX_SPECIALIZED_SIZES:
            return self._static
        return self._dynamic

    def _compiles_both(self) -> bool:
        """Warm-up compiles the dynamic-batch graph too when the user asks for it or recompiles must fail."""
        return (self._warming and self._warming_dynamic) or (not self._warm and self.options.fail_on_recompile)

    def _warm_dynamic(self, args: Sequence[Any]) -> None:
        dynamic = self._dynamic
        if dynamic is None or self.choice == "eager":
            return
        if batch_size(args) == 1:  # Dynamo specializes size 1 anyway: compile (and measure) for sizes 2+
            args = resized(args, 2)
        # A second run of the same inputs: nothing it changes may stay (TRAIN's BatchNorm statistics, dropout's
        # random numbers).
        with preserved_state(self.graph_module), forked_rng(args):
            variant = dynamic.variant or self._choose(dynamic, args)
            if variant.compiled:
                if variant.frozen:
                    self._ensure_fresh(args)
                self._run(variant, args)

    def _run(self, variant: Variant, args: Sequence[Any]) -> Any:
        """One call of ``variant`` with the compiler settings it was (or will be) compiled with.  On every
        call of a compiled stage: kept to plain assignments (a generator context manager costs ~10 us)."""
        marked = variant.needs_marks
        if self.options.channels_last:  # before the marks: a layout copy would lose them
            args = tuple(a.contiguous(memory_format=torch.channels_last) if is_4d(a) else a for a in args)
        if marked:
            args = batch_dynamic(args)
        inductor, stats = self._inductor, self._dynamo_stats
        # These flags decide at (re)compile time, and a stage may recompile on any call (a new batch-size
        # range, refreshed weights).  Layout optimization converts convolutions to channels-last: it pays
        # for frozen weights only (it changes gradients' rounding in TRAIN and costs per call otherwise).
        # TRAIN draws its random numbers (dropout) from torch's generator, as eager does: same seed, same
        # masks, same gradients (Inductor's own generator would draw others).
        saved = inductor.freezing, inductor.layout_optimization
        inductor.freezing, inductor.layout_optimization = variant.frozen, saved[1] and variant.frozen
        if self.training:  # config reads cost ~1 us each: eval stages leave this flag alone
            saved_random, inductor.fallback_random = inductor.fallback_random, True
        before, start = stats["unique_graphs"], time.perf_counter()
        try:
            if self.options.autocast is None and not self._strict():
                results = variant.run(*args)
            else:
                with self._stance(), self._autocast(args):
                    results = variant.run(*args)
        except torch._dynamo.exc.Unsupported as error:  # the stage's brick is named by the StageModule
            add_note(error, "(a compiled eval stage is captured as one graph: make the brick traceable, e.g. "
                            "torch.cond for a branch on tensor values, or build the stage without compile=)")
            raise
        except torch._dynamo.exc.BackendCompilerFailed as error:
            add_note(error, f"(Inductor could not compile the stage's {variant.name!r} graph; "
                            + ("CompileOptions(freeze=False) keeps the weights graph inputs)" if variant.frozen
                               else "build the stage without compile= to run it uncompiled)"))
            raise
        finally:
            inductor.freezing, inductor.layout_optimization = saved
            if self.training:
                inductor.fallback_random = saved_random
        compiled = stats["unique_graphs"] - before
        self._compiled_last = bool(compiled)
        if compiled:
            self.compiles += compiled
            self.compile_seconds += time.perf_counter() - start
        if marked:
            variant.needs_marks = False
        return results

    def _choose(self, slot: Slot, args: Sequence[Any]) -> Variant:
        """Runs every candidate of ``slot`` on ``args`` (compiling them), times each, keeps the fastest.  When
        the plain graph beats the graphs specialized to a batch size, it runs every batch size."""
        candidates = []
        for candidate in list(slot.candidates):
            if candidate.frozen and self._changes_own_weights:
                continue
            candidate.before_compiling()
            before = self._weights.state()
            if not self._compiles(slot, candidate, args):
                continue
            if candidate.frozen and self._weights.state() != before:  # constants that change: never frozen
                self._changes_own_weights = self._weights.changed_names(before)
                candidate.forget()
                continue
            candidates.append(candidate)
        # Timed as each will be called: the plain graph directly, compiled code with its settings around.
        calls = {c.name: functools.partial(self._run, c, args) if c.compiled else functools.partial(c.run, *args)
                 for c in candidates}
        slot.timings = seconds_per_call(calls)
        chosen = min(candidates, key=lambda c: slot.timings[c.name])
        for candidate in slot.candidates:
            if candidate is not chosen:
                candidate.forget()
        slot.variant = chosen
        if chosen.frozen and self._weights_state is None:  # else the next check compares with the older state
            self._weights_state = self._weights.state()
        if slot is self._static and not chosen.compiled:
            self._run_plain_everywhere()
        return chosen

    def _compiles(self, slot: Slot, candidate: Variant, args: Sequence[Any]) -> bool:
        """Runs ``candidate`` once (compiling it); ``False`` when Inductor could not build it (``Slot.drop``)."""
        import torch._dynamo.exc

        try:
            self._run(candidate, args)
        except torch._dynamo.exc.BackendCompilerFailed as error:
            if not slot.drop(candidate, error, self.stage):
                raise
            return False
        return True

    def _run_plain_everywhere(self) -> None:
        dynamic = self._dynamic
        if dynamic is not None:
            dynamic.variant = next(c for c in dynamic.candidates if not c.compiled)
        if self._on_plain is not None:
            self._on_plain()  # the owner may call the plain graph directly from now on

    # ------------------------------------------------------------------ freshness of frozen weights
    def _check_constant_weights(self) -> None:
        """A frozen graph's weights and buffers are constants: a stage that changes its own (a call counter,
        spectral norm left in train mode) would refreeze on every call, so it is refused."""
        if self._weights_state is not None and self._weights.state() != self._weights_state:
            names = self._weights.changed_names(self._weights_state)
            raise BrickBackendError(
                f"Stage {self.stage.value} changes {', '.join(names[:5])} while it runs, so its weights cannot be "
                f"frozen as constants; compile it with CompileOptions(freeze=False) (or freeze=None, which then "
                f"keeps them inputs).")

    def _ensure_fresh(self, args: Sequence[Any]) -> None:
        state = self._weights.state()
        if state != self._weights_state:
            if self._weights_state is not None and not self._rewarming:
                self.refresh()
                self._rewarm(args)
            self._weights_state = self._weights.state()

    def _rewarm(self, args: Sequence[Any]) -> None:
        """After refreezing, compiles again for the batch sizes the stage warmed up on and for ``args`` (so
        that ``fail_on_recompile`` keeps holding)."""
        self._stale, self._rewarming = False, True
        try:
            with self.warming_up(dynamic=self.options.fail_on_recompile or self._dynamic_warmed):
                for size in self.batch_sizes or (None,):
                    self(*(args if size is None else resized(args, size)))
                if self._dynamic is not None and batch_size(args) not in self._static_sizes:
                    self._warm_dynamic(args)
        finally:
            self._rewarming = False

    def refresh(self) -> None:
        """Forgets frozen weights: the next call compiles (and freezes) again, for every batch size it had
        warmed up on.  Called automatically when the weights change; call it after changes nothing can see
        (writes through ``param.data``)."""
        frozen = [v for slot in (self._static, self._dynamic) if slot is not None for v in slot.frozen()]
        for variant in frozen:
            variant.forget()
            variant.before_compiling()
        if frozen:
            self._weights_state = None
            self._stale = True

    @contextlib.contextmanager
    def warming_up(self, dynamic: bool = True) -> Iterator[None]:
        """Calls inside may compile, also with ``fail_on_recompile``: each batch size gets a graph of its own
        (and, with ``dynamic``, the dynamic-batch graph is compiled for it too).  The stage is warm
        afterwards."""
        if self._warming:  # nested (a refreeze inside a warm-up): the outer one decides
            yield
            return
        self._warming, self._warming_dynamic = True, dynamic
        self._dynamic_warmed = self._dynamic_warmed or dynamic
        try:
            yield
        finally:
            self._warming = False
            self._warm = True

    # ------------------------------------------------------------------ contexts around a call
    def _strict(self) -> bool:
        return self.options.fail_on_recompile and self._warm and not self._warming

    def _stance(self) -> contextlib.AbstractContextManager[Any]:
        return failing_recompiles(self.stage) if self._strict() else contextlib.nullcontext()

    def _autocast(self, args: Sequence[Any]) -> contextlib.AbstractContextManager[Any]:
        if self.options.autocast is None:
            return contextlib.nullcontext()
        device = next((a.device.type for a in args if isinstance(a, torch.Tensor)), "cpu")
        return torch.autocast(device, dtype=self.options.autocast)
