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
    "make_runner",
    "parse_backends",
    "parse_device",
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


def _check_provider(device: torch.device) -> None:
    """Fails before exporting when onnxruntime cannot run on ``device``."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if device.type == "cuda" and "CUDAExecutionProvider" not in available:
        raise BrickBackendError(f"onnxruntime {ort.__version__} has no CUDAExecutionProvider (available: "
                                f"{', '.join(available)}); install onnxruntime-gpu to run ONNX models on CUDA.")


def _ort_session(path: Path, device: torch.device, threads: int) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    if device.type != "cuda":
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    session = ort.InferenceSession(str(path), options, providers=[
        ("CUDAExecutionProvider", {"device_id": device.index or 0}), "CPUExecutionProvider"])
    if session.get_providers()[0] != "CUDAExecutionProvider":
        # ORT falls back to CPU silently when the CUDA libraries cannot be loaded.
        raise BrickBackendError(f"onnxruntime could not start its CUDAExecutionProvider (session providers: "
                                f"{session.get_providers()}); check the CUDA/cuDNN libraries onnxruntime-gpu needs.")
    return session


def _io_names(session_names: Sequence[str], expected: Sequence[str]) -> dict[str, str]:
    """Session name -> user name.  The exporter keeps user names; positions are the fallback."""
    if set(session_names) <= set(expected):
        return {name: name for name in session_names}
    return dict(zip(session_names, expected, strict=False))


def _export_inputs(named_inputs: Mapping[str, Any]) -> dict[str, Any]:
    # Exporting with a batch of one lets torch.export specialize the batch dimension to 1.
    from torchbricks_fx.benchmarking import resize_batch

    sizes = [v.shape[0] for v in named_inputs.values() if isinstance(v, torch.Tensor) and v.dim() > 0]
    return resize_batch(named_inputs, 2) if sizes and min(sizes) < 2 else dict(named_inputs)


def _onnxruntime_runner(collection: Any, stage: Stage, outputs: Sequence[str], named_inputs: Mapping[str, Any],
                        device: torch.device, threads: int, input_names: Sequence[str]) -> Runner:
    from torchbricks_fx.export import export_onnx

    _check_provider(device)
    folder = Path(tempfile.mkdtemp(prefix="torchbricks_fx_bench_"))
    try:
        path = folder / "stage.onnx"
        start = time.perf_counter()
        export_onnx(collection, path, _export_inputs(named_inputs), stage=stage, outputs=list(outputs),
                    dynamic_batch=True, verify=True, overwrite=True)
        session = _ort_session(path, device, threads)
        seconds = time.perf_counter() - start
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    in_names = _io_names([i.name for i in session.get_inputs()], input_names)
    out_names = _io_names([o.name for o in session.get_outputs()], outputs)

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
