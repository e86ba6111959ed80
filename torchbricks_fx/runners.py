"""One runner per backend name (see ``backends.py``): ``eager | fx | compile | onnxruntime | cudagraphs``.

A runner prepares a stage once (build the stage module, compile, export) and is then *bound* to one set
of inputs: :class:`BoundCall` holds the exact statement a user would write to call the backend, the
objects it names, and a way to read the outputs back as CPU tensors for comparison with eager.
``benchmarking.py`` times the statement with ``torch.utils.benchmark``; nothing here measures time
except the one-time preparation (``setup_seconds``).

What each statement includes (the "hot path" of a user calling the backend):

* ``eager``: ``collection(named_inputs, stage=stage)``; every live brick of the stage runs.
* ``fx``: ``stage_module(named_inputs)`` on ``compile_stage(collection, stage, outputs=outputs)``.
* ``compile``: ``stage_module(named_inputs)`` with ``compile_stage(collection, stage, outputs=outputs,
  compile=True)``: the stage compiled for what it is (eval stages: frozen inference graphs; TRAIN:
  forward and backward), dynamic batch.
* ``cudagraphs`` (CUDA only): the same with ``CompileOptions(mode="reduce-overhead")`` (CUDA graphs).
* ``onnxruntime``: ``session.run_with_iobinding(binding)`` on the verified export (every graph optimization
  on), with inputs bound beforehand (numpy arrays on the CPU; the CUDA tensors themselves on CUDA) and
  outputs bound to the device.  Converting or binding the inputs is not included.
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from torchbricks_fx.backends import BACKENDS
from torchbricks_fx.compiling import CompileOptions
from torchbricks_fx.errors import BrickBackendError
from torchbricks_fx.ort import numpy_feeds, ort_session, require_cuda_provider
from torchbricks_fx.stage import Stage

if TYPE_CHECKING:
    from torchbricks_fx.collection import BrickCollection
    from torchbricks_fx.fx import StageModule

__all__ = ["BoundCall", "Runner", "make_runner"]


@dataclass(frozen=True)
class BoundCall:
    """A backend bound to one set of inputs.

    ``stmt`` is what ``torch.utils.benchmark.Timer`` runs, with ``globals``; ``fetch()`` runs the backend once
    more and returns its outputs by name as CPU tensors (copied, so later runs cannot overwrite them).
    """

    stmt: str
    globals: Mapping[str, Any]
    fetch: Callable[[], dict[str, torch.Tensor]]


@dataclass
class Runner:
    """A prepared backend: ``bind(named_inputs)`` gives the call to time; ``close()`` frees what it holds."""

    name: str
    setup_seconds: float | None
    bind: Callable[[Mapping[str, Any]], BoundCall]
    cleanup: list[Callable[[], None]] = field(default_factory=list)
    # The compiled backends compile on their first calls, which must happen with Dynamo's recompile limit
    # turned into an error (see benchmarking._warm_up); ``compile_count()`` tells how many graphs so far.
    compiles: bool = False
    compile_count: Callable[[], int] | None = None
    # A compiled stage's first call at each batch size is a warm-up (``StageModule.warm_up``), as a user
    # serving those sizes warms it: a graph specialized to each, and no recompile error after it.
    warm_up: Callable[[Mapping[str, Any]], None] | None = None

    def close(self) -> None:
        while self.cleanup:
            self.cleanup.pop()()


def _tensors_to_cpu(values: Mapping[str, Any], names: Sequence[str]) -> dict[str, torch.Tensor]:
    out = {}
    for name in names:
        value = values[name]
        if isinstance(value, torch.Tensor):
            out[name] = value.detach().to("cpu", copy=True)
    return out


def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


# ----------------------------------------------------------------------------------------------- torch
def _eager_runner(collection: BrickCollection, stage: Stage, outputs: Sequence[str]) -> Runner:
    def bind(named_inputs: Mapping[str, Any]) -> BoundCall:
        inputs = dict(named_inputs)
        return BoundCall(stmt="collection(named_inputs, stage=stage)",
                         globals={"collection": collection, "named_inputs": inputs, "stage": stage},
                         fetch=lambda: _tensors_to_cpu(collection(inputs, stage=stage), outputs))

    return Runner("eager", None, bind)


def _module_runner(name: str, module: StageModule, setup_seconds: float, outputs: Sequence[str]) -> Runner:
    def bind(named_inputs: Mapping[str, Any]) -> BoundCall:
        inputs = dict(named_inputs)
        return BoundCall(stmt="stage_module(named_inputs)", globals={"stage_module": module, "named_inputs": inputs},
                         fetch=lambda: _tensors_to_cpu(module(inputs), outputs))

    compiled = module.compiled
    if compiled is None:
        return Runner(name, setup_seconds, bind)
    return Runner(name, setup_seconds, bind, compiles=True, compile_count=lambda: compiled.compiles,
                  warm_up=module.warm_up)


def _fx_runner(collection: BrickCollection, stage: Stage, outputs: Sequence[str]) -> Runner:
    from torchbricks_fx.fx import compile_stage

    stage_module, seconds = _timed(lambda: compile_stage(collection, stage, outputs=outputs))
    return _module_runner("fx", stage_module, seconds, outputs)


def _compile_runner(collection: BrickCollection, stage: Stage, outputs: Sequence[str],
                    options: CompileOptions | None, name: str = "compile") -> Runner:
    from torchbricks_fx.fx import compile_stage

    # Compilation is lazy: it happens on the first calls (benchmarking's warm-up), one graph per batch range.
    chosen = options or CompileOptions()
    stage_module, seconds = _timed(lambda: compile_stage(collection, stage, outputs=outputs, compile=chosen))
    return _module_runner(name, stage_module, seconds, outputs)


# ----------------------------------------------------------------------------------------------- onnxruntime
def _numpy_dtype(dtype: torch.dtype) -> Any:
    return torch.empty(0, dtype=dtype).numpy().dtype


def _onnxruntime_runner(collection: BrickCollection, stage: Stage, outputs: Sequence[str],
                        named_inputs: Mapping[str, Any], device: torch.device, threads: int) -> Runner:
    from torchbricks_fx.export import export_onnx

    require_cuda_provider(device)  # before any export work
    folder = Path(tempfile.mkdtemp(prefix="torchbricks_fx_bench_"))
    try:
        path = folder / "stage.onnx"
        start = time.perf_counter()
        # A batch of 1 needs no special care: export_onnx traces a dynamic batch of 1 doubled.
        export_onnx(collection, path, named_inputs, stage=stage, outputs=list(outputs), dynamic_batch=True,
                    verify=True, overwrite=True)
        session = ort_session(path, device, threads=threads)
        seconds = time.perf_counter() - start
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise

    def bind(inputs: Mapping[str, Any]) -> BoundCall:
        return bind_session(session, device, inputs, outputs)

    return Runner("onnxruntime", seconds, bind, cleanup=[lambda: shutil.rmtree(folder, ignore_errors=True)])


def bind_session(session: Any, device: torch.device, inputs: Mapping[str, Any], outputs: Sequence[str]) -> BoundCall:
    """An onnxruntime session bound to ``inputs`` as the call a user would make: ``session.run`` on numpy
    feeds prepared beforehand (CPU) or ``run_with_iobinding`` on the CUDA tensors (CUDA); used by the
    ``onnxruntime`` backend and by deployment's ONNX candidates."""
    if device.type == "cuda":
        return _bind_cuda(session, device, inputs, outputs)
    return _bind_cpu(session, inputs, outputs)


def _bind_cpu(session: Any, inputs: Mapping[str, Any], outputs: Sequence[str]) -> BoundCall:
    """Inputs bound once as numpy arrays and outputs bound to the CPU (IO binding): the timed call is the
    run alone, as on CUDA, without per-call feed conversion (about 10% of a small model's call)."""
    feeds = numpy_feeds(session, inputs)
    binding = session.io_binding()
    for name, array in feeds.items():
        binding.bind_cpu_input(name, array)
    for name in outputs:
        binding.bind_output(name, "cpu")

    return BoundCall(stmt="session.run_with_iobinding(binding)",
                     globals={"session": session, "binding": binding, "feeds": feeds},
                     fetch=lambda: _fetch_bound(session, binding, outputs))


def _bind_cuda(session: Any, device: torch.device, inputs: Mapping[str, Any], outputs: Sequence[str]) -> BoundCall:
    binding = session.io_binding()
    # The bound buffers are raw pointers: keep the tensors alive as long as the binding.
    tensors = {i.name: inputs[i.name].detach().contiguous() for i in session.get_inputs()}
    for name, tensor in tensors.items():
        binding.bind_input(name=name, device_type="cuda", device_id=device.index or 0,
                           element_type=_numpy_dtype(tensor.dtype), shape=tuple(tensor.shape),
                           buffer_ptr=tensor.data_ptr())
    for name in outputs:
        binding.bind_output(name, "cuda", device.index or 0)
    torch.cuda.synchronize(device)  # the inputs were written on torch's stream, ORT reads on its own

    return BoundCall(stmt="session.run_with_iobinding(binding)",
                     globals={"session": session, "binding": binding, "tensors": tensors},
                     fetch=lambda: _fetch_bound(session, binding, outputs))


def _fetch_bound(session: Any, binding: Any, outputs: Sequence[str]) -> dict[str, torch.Tensor]:
    """Runs a bound session once more; its outputs as CPU tensors (copies, safe to keep)."""
    session.run_with_iobinding(binding)
    arrays = binding.copy_outputs_to_cpu()
    return {name: torch.from_numpy(array.copy()) for name, array in zip(outputs, arrays, strict=True)}


# ----------------------------------------------------------------------------------------------- factory
def make_runner(name: str, collection: BrickCollection, stage: Stage, outputs: Sequence[str], *,
                named_inputs: Mapping[str, Any], device: torch.device, threads: int,
                compile_options: CompileOptions | None = None) -> Runner:
    """Prepares backend ``name`` for ``stage`` (the collection already on ``device``).  Raises whatever the
    preparation raises; the caller reports it as a failed backend."""
    if name == "eager":
        return _eager_runner(collection, stage, outputs)
    if name == "fx":
        return _fx_runner(collection, stage, outputs)
    if name == "compile":
        return _compile_runner(collection, stage, outputs, compile_options)
    if name == "cudagraphs":
        options = dataclasses.replace(compile_options or CompileOptions(), mode="reduce-overhead")
        return _compile_runner(collection, stage, outputs, options, name="cudagraphs")
    if name == "onnxruntime":
        return _onnxruntime_runner(collection, stage, outputs, named_inputs, device, threads)
    raise BrickBackendError(f"Unknown backend {name!r}; valid backends: {', '.join(BACKENDS)}.")
