"""One runner per backend name: ``eager | fx | compile | onnxruntime | cudagraphs``.

A runner prepares a stage once (build the stage module, compile, export) and is then *bound* to one set
of inputs: :class:`BoundCall` holds the exact statement a user would write to call the backend, the
objects it names, and a way to read the outputs back as CPU tensors for comparison with eager.
``benchmarking.py`` times the statement with ``torch.utils.benchmark``; nothing here measures time
except the one-time preparation (``setup_seconds``).

What each statement includes (the "hot path" of a user calling the backend):

* ``eager``: ``collection(named_inputs, stage=stage)``; every live brick of the stage runs.
* ``fx``: ``stage_module(named_inputs)`` on ``compile_stage(collection, stage, outputs=outputs)``.
* ``compile``: ``compiled(named_inputs)`` with ``compiled = torch.compile(stage_module)``.
* ``cudagraphs`` (CUDA only): the same with ``torch.compile(stage_module, mode="reduce-overhead")``.
* ``onnxruntime``: ``session.run(output_names, feeds)`` with numpy feeds prepared beforehand (CPU), or
  ``session.run_with_iobinding(binding)`` with inputs bound to the CUDA tensors and outputs left on the
  GPU (CUDA).  Converting tensors to numpy arrays (CPU) or binding them (CUDA) is not included.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from torchbricks_fx.errors import BrickBackendError
from torchbricks_fx.stage import Stage

__all__ = [
    "BACKENDS",
    "CUDA_ONLY_BACKENDS",
    "DEFAULT_BACKENDS",
    "BoundCall",
    "Runner",
    "batch_size_of",
    "check_batch_size",
    "make_runner",
    "parse_backends",
    "parse_device",
    "resize_batch",
]

BACKENDS: tuple[str, ...] = ("eager", "fx", "compile", "onnxruntime", "cudagraphs")
DEFAULT_BACKENDS: tuple[str, ...] = ("eager", "fx", "compile", "onnxruntime")
CUDA_ONLY_BACKENDS: tuple[str, ...] = ("cudagraphs",)


def parse_device(device: str | torch.device) -> torch.device:
    """``"cpu"``, ``"cuda"`` or ``"cuda:N"`` to a ``torch.device``; ``BrickBackendError`` otherwise, or when
    CUDA is asked for and not available."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise BrickBackendError(f"Unknown device {device!r}; valid devices: 'cpu', 'cuda', 'cuda:N'.") from None
    if parsed.type not in ("cpu", "cuda"):
        raise BrickBackendError(f"Unsupported device {str(device)!r}; valid devices: 'cpu', 'cuda', 'cuda:N'.")
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise BrickBackendError(f"Device {str(device)!r} was requested but CUDA is not available here "
                                    f"(torch {torch.__version__}); use device='cpu'.")
        index = parsed.index if parsed.index is not None else torch.cuda.current_device()
        if index >= torch.cuda.device_count():
            raise BrickBackendError(f"Device {str(device)!r} does not exist; this machine has "
                                    f"{torch.cuda.device_count()} CUDA device(s).")
        parsed = torch.device("cuda", index)
    return parsed


def parse_backends(backends: str | Sequence[str], device: torch.device) -> tuple[str, ...]:
    """Validates backend names (a sequence or a comma-separated string) for ``device``, before any work."""
    names = [b.strip() for b in backends.split(",")] if isinstance(backends, str) else [str(b) for b in backends]
    names = [name for name in names if name]
    unknown = [name for name in names if name not in BACKENDS]
    if unknown or not names:
        shown = ", ".join(map(repr, unknown)) if unknown else "none"
        raise BrickBackendError(f"Unknown backend(s) {shown}; valid backends: {', '.join(BACKENDS)} "
                                f"({', '.join(CUDA_ONLY_BACKENDS)} only with device='cuda').")
    cuda_only = [name for name in names if name in CUDA_ONLY_BACKENDS and device.type != "cuda"]
    if cuda_only:
        raise BrickBackendError(f"Backend(s) {', '.join(map(repr, cuda_only))} need device='cuda' (CUDA graphs); "
                                f"the requested device is {str(device)!r}.")
    return tuple(dict.fromkeys(names))


# ----------------------------------------------------------------------------------------------- inputs
def batch_size_of(named_inputs: Mapping[str, Any], input_names: Sequence[str] | None = None) -> int | None:
    """Dimension 0 of the first input (in ``input_names`` order, default: ``named_inputs``'), as export's
    dynamic batch axis assumes; ``None`` when that input is not a tensor with at least one dimension."""
    order = [n for n in (input_names if input_names is not None else named_inputs) if n in named_inputs]
    first = named_inputs[order[0]] if order else None
    return int(first.shape[0]) if isinstance(first, torch.Tensor) and first.dim() > 0 else None


def check_batch_size(batch_size: Any) -> None:
    """``BrickBackendError`` unless ``batch_size`` is a positive integer."""
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise BrickBackendError(f"Batch sizes must be positive integers, not {batch_size!r}.")


def resize_batch(named_inputs: Mapping[str, Any], batch_size: int,
                 input_names: Sequence[str] | None = None) -> dict[str, Any]:
    """The inputs at another batch size: dimension 0 repeated or sliced to ``batch_size`` for every tensor
    whose dimension 0 is the current batch size (the first input's, see :func:`batch_size_of`).  Other tensors
    (a fixed table of another length), 0-d tensors and other values are unchanged; so is a table that happens
    to have the batch size as its length, which export would make dynamic too."""
    check_batch_size(batch_size)
    current = batch_size_of(named_inputs, input_names)
    if current == batch_size or (current is None and batch_size == 1):
        return dict(named_inputs)
    if not current:
        raise BrickBackendError(f"Cannot resize the inputs to batch size {batch_size}: the first input has no "
                                f"batch to repeat (given: {_shapes(named_inputs)}).")
    resized: dict[str, Any] = {}
    for name, value in named_inputs.items():
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == current:
            index = torch.arange(batch_size, device=value.device) % current
            resized[name] = value.index_select(0, index)
        else:
            resized[name] = value
    return resized


def _shapes(named_inputs: Mapping[str, Any]) -> dict[str, Any]:
    return {n: list(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__ for n, v in named_inputs.items()}


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
    # turned into an error (see benchmarking._warm_up).
    compiles: bool = False

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
def _eager_runner(collection: Any, stage: Stage, outputs: Sequence[str]) -> Runner:
    def bind(named_inputs: Mapping[str, Any]) -> BoundCall:
        inputs = dict(named_inputs)
        return BoundCall(stmt="collection(named_inputs, stage=stage)",
                         globals={"collection": collection, "named_inputs": inputs, "stage": stage},
                         fetch=lambda: _tensors_to_cpu(collection(inputs, stage=stage), outputs))

    return Runner("eager", None, bind)


def _module_runner(name: str, module: Any, setup_seconds: float, outputs: Sequence[str],
                   compiles: bool = False) -> Runner:
    def bind(named_inputs: Mapping[str, Any]) -> BoundCall:
        inputs = dict(named_inputs)
        return BoundCall(stmt="stage_module(named_inputs)", globals={"stage_module": module, "named_inputs": inputs},
                         fetch=lambda: _tensors_to_cpu(module(inputs), outputs))

    return Runner(name, setup_seconds, bind, compiles=compiles)


def _fx_runner(collection: Any, stage: Stage, outputs: Sequence[str]) -> Runner:
    from torchbricks_fx.fx import compile_stage

    stage_module, seconds = _timed(lambda: compile_stage(collection, stage, outputs=outputs))
    return _module_runner("fx", stage_module, seconds, outputs)


def _compile_runner(collection: Any, stage: Stage, outputs: Sequence[str], mode: str | None = None,
                    name: str = "compile") -> Runner:
    from torchbricks_fx.fx import compile_stage

    # torch.compile is lazy: the real compilation happens on the first calls (benchmarking's warm-up).
    compiled, seconds = _timed(lambda: torch.compile(compile_stage(collection, stage, outputs=outputs), mode=mode))
    return _module_runner(name, compiled, seconds, outputs, compiles=True)


# ----------------------------------------------------------------------------------------------- onnxruntime
def _numpy_dtype(dtype: torch.dtype) -> Any:
    return torch.empty(0, dtype=dtype).numpy().dtype


def _ort_providers(device: torch.device) -> list[Any]:
    """export's provider choice for ``device``; fails before any export when CUDA is asked for and this
    onnxruntime has no CUDA execution provider (export would fall back to CPU)."""
    import onnxruntime as ort

    from torchbricks_fx.export import ort_providers

    providers = ort_providers(device)
    first = providers[0][0] if isinstance(providers[0], tuple) else providers[0]
    if device.type == "cuda" and first != "CUDAExecutionProvider":
        available = ort.get_available_providers()
        raise BrickBackendError(f"onnxruntime {ort.__version__} has no CUDAExecutionProvider (available: "
                                f"{', '.join(available)}); install onnxruntime-gpu to run ONNX models on CUDA.")
    return providers


def _ort_session(path: Path, device: torch.device, providers: list[Any], threads: int) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=providers)
    if device.type == "cuda" and session.get_providers()[0] != "CUDAExecutionProvider":
        # ORT falls back to CPU silently when the CUDA libraries cannot be loaded.
        raise BrickBackendError(f"onnxruntime could not start its CUDAExecutionProvider (session providers: "
                                f"{session.get_providers()}); check the CUDA/cuDNN libraries onnxruntime-gpu needs.")
    return session


def _io_names(session_names: Sequence[str], expected: Sequence[str], what: str) -> dict[str, str]:
    """Session name -> user name.  export_onnx names the ONNX inputs and outputs after the stage's (and checks
    it); anything else is a different file, not something to pair up by position."""
    unknown = [name for name in session_names if name not in expected]
    if unknown:
        raise BrickBackendError(f"The exported ONNX file has {what} {unknown}, which are not the stage's "
                                f"{what} {list(expected)}.")
    return {name: name for name in session_names}


def _onnxruntime_runner(collection: Any, stage: Stage, outputs: Sequence[str], named_inputs: Mapping[str, Any],
                        device: torch.device, threads: int, input_names: Sequence[str]) -> Runner:
    from torchbricks_fx.export import export_onnx

    providers = _ort_providers(device)
    folder = Path(tempfile.mkdtemp(prefix="torchbricks_fx_bench_"))
    try:
        path = folder / "stage.onnx"
        start = time.perf_counter()
        # A batch of 1 needs no special care: export_onnx traces a dynamic batch of 1 doubled.
        export_onnx(collection, path, named_inputs, stage=stage, outputs=list(outputs), dynamic_batch=True,
                    verify=True, overwrite=True)
        session = _ort_session(path, device, providers, threads)
        seconds = time.perf_counter() - start
        in_names = _io_names([i.name for i in session.get_inputs()], input_names, "inputs")
        out_names = _io_names([o.name for o in session.get_outputs()], outputs, "outputs")
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise

    def bind(inputs: Mapping[str, Any]) -> BoundCall:
        if device.type == "cuda":
            return _bind_cuda(session, device, {s: inputs[u] for s, u in in_names.items()}, out_names)
        return _bind_cpu(session, {s: inputs[u] for s, u in in_names.items()}, out_names)

    return Runner("onnxruntime", seconds, bind, cleanup=[lambda: shutil.rmtree(folder, ignore_errors=True)])


def _bind_cpu(session: Any, inputs: Mapping[str, Any], out_names: Mapping[str, str]) -> BoundCall:
    feeds = {name: value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else value
             for name, value in inputs.items()}
    output_names = list(out_names)

    def fetch() -> dict[str, torch.Tensor]:
        arrays = session.run(output_names, feeds)
        pairs = zip(output_names, arrays, strict=True)
        return {out_names[name]: torch.from_numpy(array.copy()) for name, array in pairs}

    return BoundCall(stmt="session.run(output_names, feeds)",
                     globals={"session": session, "output_names": output_names, "feeds": feeds}, fetch=fetch)


def _bind_cuda(session: Any, device: torch.device, inputs: Mapping[str, Any],
               out_names: Mapping[str, str]) -> BoundCall:
    binding = session.io_binding()
    # The bound buffers are raw pointers: keep the tensors alive as long as the binding.
    tensors = {name: value.detach().contiguous() for name, value in inputs.items()}
    for name, tensor in tensors.items():
        binding.bind_input(name=name, device_type="cuda", device_id=device.index or 0,
                           element_type=_numpy_dtype(tensor.dtype), shape=tuple(tensor.shape),
                           buffer_ptr=tensor.data_ptr())
    for name in out_names:
        binding.bind_output(name, "cuda", device.index or 0)
    torch.cuda.synchronize(device)  # the inputs were written on torch's stream, ORT reads on its own

    def fetch() -> dict[str, torch.Tensor]:
        session.run_with_iobinding(binding)
        arrays = binding.copy_outputs_to_cpu()
        return {user: torch.from_numpy(array.copy()) for user, array in zip(out_names.values(), arrays, strict=True)}

    return BoundCall(stmt="session.run_with_iobinding(binding)",
                     globals={"session": session, "binding": binding, "tensors": tensors}, fetch=fetch)


# ----------------------------------------------------------------------------------------------- factory
def make_runner(name: str, collection: Any, stage: Stage, outputs: Sequence[str], *,
                named_inputs: Mapping[str, Any], device: torch.device, threads: int,
                input_names: Sequence[str]) -> Runner:
    """Prepares backend ``name`` for ``stage`` (the collection already on ``device``).  Raises whatever the
    preparation raises; the caller reports it as a failed backend."""
    if name == "eager":
        return _eager_runner(collection, stage, outputs)
    if name == "fx":
        return _fx_runner(collection, stage, outputs)
    if name == "compile":
        return _compile_runner(collection, stage, outputs)
    if name == "cudagraphs":
        return _compile_runner(collection, stage, outputs, mode="reduce-overhead", name="cudagraphs")
    if name == "onnxruntime":
        return _onnxruntime_runner(collection, stage, outputs, named_inputs, device, threads, input_names)
    raise BrickBackendError(f"Unknown backend {name!r}; valid backends: {', '.join(BACKENDS)}.")
