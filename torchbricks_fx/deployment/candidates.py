"""Deployment candidates: one builder per name, each turning the stage into an artifact and a runner.

A builder takes the :class:`BuildContext` (the collection, the stage, the example inputs, the device,
the validation inputs for calibration, a private work folder) and returns :class:`Built`: ``bind(named
inputs) -> BoundCall`` (the exact call a user would make, as the benchmark times it, and ``fetch()`` for
its outputs as CPU tensors) and the artifact's files.  It raises :class:`Skip` when a package or device it
needs is missing, and anything else when it fails; the deployment records either and goes on.

Every artifact comes from well-kept tools, none written here: ``export_onnx`` / ``export_program``
(verified against eager), onnxruntime's ``quant_pre_process``, ``quantize_dynamic`` and ``quantize_static``
(QDQ, calibrated with a ``CalibrationDataReader`` over the validation batches), onnxruntime's
``transformers.float16`` converter, and ``compile_stage(..., compile=True)`` (the frozen compiled stage, which
is timed and judged like the others but is not a file, so it is never written to a bundle).
"""

from __future__ import annotations

import importlib.util
import shutil
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from torchbricks_fx.errors import BrickBackendError, BrickDeployError
from torchbricks_fx.ort import ort_session, require_cuda_provider
from torchbricks_fx.runners import BoundCall, bind_session
from torchbricks_fx.stage import Stage

if TYPE_CHECKING:
    from torchbricks_fx.collection import BrickCollection

__all__ = ["CANDIDATES"]

ONNX_NAME = "model.onnx"
PROGRAM_NAME = "model.pt2"

Progress = Callable[[str], None]


class Skip(Exception):  # a signal, not an error: the candidate is not tried
    """Raised by a builder whose package or device is missing; the message is the reason."""


@dataclass
class Built:
    """A candidate ready to run: ``bind(named_inputs)`` gives the call to time; ``files`` are the artifact's
    files (the main file first), empty when it is not a file; ``providers`` the onnxruntime execution
    providers of its session."""

    bind: Callable[[Mapping[str, torch.Tensor]], BoundCall]
    files: tuple[Path, ...] = ()
    providers: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()

    def run(self, named_inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.bind(named_inputs).fetch()


class BuildContext:
    """What builders share.  The float32 ONNX export (and its quantization-ready form) is made once, by
    the first candidate that needs it; its failure is every ONNX candidate's failure."""

    def __init__(self, collection: BrickCollection, stage: Stage, outputs: Sequence[str],
                 named_inputs: Mapping[str, torch.Tensor], *, device: torch.device, threads: int, work: Path,
                 calibration: Sequence[Mapping[str, torch.Tensor]] | None) -> None:
        self.collection = collection
        self.stage = stage
        self.outputs = tuple(outputs)
        self.named_inputs = dict(named_inputs)
        self.device = device
        self.threads = threads
        self.work = work
        self.calibration = calibration
        self._made: dict[str, Path | BaseException] = {}

    def folder(self, name: str) -> Path:
        """A fresh folder for one candidate's files (the file names are the bundle's)."""
        path = self.work / name
        path.mkdir(parents=True, exist_ok=False)
        return path

    def _once(self, key: str, make: Callable[[], Path]) -> Path:
        made = self._made.get(key)
        if made is None:
            try:
                made = make()
            except Exception as error:
                made = error
            self._made[key] = made
        if isinstance(made, BaseException):
            raise made
        return made

    def float32_onnx(self) -> Path:
        """The stage exported with ``export_onnx`` (dynamic batch, verified against eager)."""
        def make() -> Path:
            from torchbricks_fx.export import export_onnx

            path = self.folder("float32-onnx") / ONNX_NAME
            export_onnx(self.collection, path, self.named_inputs, stage=self.stage, outputs=list(self.outputs))
            return path

        return self._once("float32", make)

    def quantizable_onnx(self) -> Path:
        """The float32 model prepared with onnxruntime's ``quant_pre_process`` (shape inference, graph
        optimization), as onnxruntime recommends before quantizing."""
        def make() -> Path:
            from onnxruntime.quantization.shape_inference import quant_pre_process

            path = self.folder("quantizable") / ONNX_NAME
            quant_pre_process(str(self.float32_onnx()), str(path))
            return path

        return self._once("quantizable", make)


def ort_built(path: Path, context: BuildContext, device: torch.device | None = None,
              notes: Sequence[str] = ()) -> Built:
    """An ONNX file run with an onnxruntime session (every graph optimization on, ``context.threads``
    intra-op threads)."""
    device = device or context.device
    _require_provider(device)
    session = ort_session(path, device, threads=context.threads)
    outputs = context.outputs
    files = (path, *(p for p in (path.with_name(path.name + ".data"),) if p.exists()))
    return Built(bind=lambda inputs: bind_session(session, device, inputs, outputs), files=files,
                 providers=tuple(session.get_providers()), notes=tuple(notes))


def _require_provider(device: torch.device) -> None:
    """A candidate deployed on CUDA must run there: without onnxruntime's CUDA provider it is skipped."""
    try:
        require_cuda_provider(device)
    except BrickBackendError as error:
        raise Skip(str(error)) from None


def _require(module: str, extra: str) -> None:
    if importlib.util.find_spec(module.split(".")[0]) is None:
        raise Skip(f"{module} is not installed ({extra})")


# --------------------------------------------------------------------------------------------- builders
def _onnxruntime(context: BuildContext) -> Built:
    _require("onnxruntime", "pip install onnxruntime")
    _require_provider(context.device)  # before exporting
    return ort_built(context.float32_onnx(), context)


def _quantization() -> Any:
    _require("onnxruntime", "pip install onnxruntime")
    try:
        import onnxruntime.quantization as quantization
    except ImportError as error:
        raise Skip(f"onnxruntime.quantization cannot be imported: {error}") from None
    return quantization


def _int8_dynamic(context: BuildContext) -> Built:
    quantization = _quantization()
    _require_provider(context.device)
    path = context.folder("int8-dynamic") / ONNX_NAME
    # Weights int8 ahead of time, activations quantized per call from their observed range: no calibration.
    quantization.quantize_dynamic(context.quantizable_onnx(), path, weight_type=quantization.QuantType.QInt8)
    return ort_built(path, context)


class _CalibrationBatches:
    """onnxruntime's ``CalibrationDataReader`` protocol over the validation batches' model inputs."""

    def __init__(self, batches: Sequence[Mapping[str, torch.Tensor]], input_names: Sequence[str]) -> None:
        self._batches: Iterator[Mapping[str, torch.Tensor]] = iter(batches)
        self._names = tuple(input_names)

    def get_next(self) -> dict[str, Any] | None:
        batch = next(self._batches, None)
        if batch is None:
            return None
        return {name: batch[name].detach().cpu().numpy() for name in self._names}


def _onnx_input_names(path: Path) -> list[str]:
    import onnx

    return [value.name for value in onnx.load(str(path), load_external_data=False).graph.input]


def _int8_static(context: BuildContext) -> Built:
    quantization = _quantization()
    _require_provider(context.device)
    if not context.calibration:
        raise Skip("static quantization calibrates on the validation batches; none were given")
    source = context.quantizable_onnx()
    reader = _CalibrationBatches(context.calibration, _onnx_input_names(source))
    path = context.folder("int8-static") / ONNX_NAME
    # QDQ with int8 weights per output channel and int8 activations whose ranges come from the calibration
    # (MinMax): onnxruntime's recommended format for CPUs.
    quantization.quantize_static(source, path, reader, quant_format=quantization.QuantFormat.QDQ, per_channel=True,
                                 activation_type=quantization.QuantType.QInt8,
                                 weight_type=quantization.QuantType.QInt8)
    return ort_built(path, context,
                     notes=[f"calibrated on {len(context.calibration)} validation batch(es) (MinMax)"])


def _float16(context: BuildContext) -> Built:
    _require("onnxruntime", "pip install onnxruntime-gpu")
    import onnxruntime as ort

    if context.device.type != "cuda":
        raise Skip("float16 runs on CUDA only (deploy with device='cuda')")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise Skip(f"onnxruntime {ort.__version__} has no CUDAExecutionProvider (pip install onnxruntime-gpu)")
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    path = context.folder("float16") / ONNX_NAME
    # keep_io_types: the bundle keeps the float32 inputs and outputs of the other candidates.
    model = convert_float_to_float16(onnx.load(str(context.float32_onnx())), keep_io_types=True)
    onnx.save(model, str(path))
    return ort_built(path, context)


def _compiled(context: BuildContext) -> Built:
    from torchbricks_fx.fx import compile_stage

    # Eval stages compile as inference graphs with frozen weights (refrozen if the weights change); the batch
    # axis is dynamic from the first call.  Compilation happens on the first calls (the tolerance gate's).
    stage_module = compile_stage(context.collection, context.stage, outputs=list(context.outputs), compile=True)
    outputs = context.outputs

    def bind(named_inputs: Mapping[str, torch.Tensor]) -> BoundCall:
        inputs = dict(named_inputs)

        def fetch() -> dict[str, torch.Tensor]:
            values = stage_module(inputs)
            return {name: values[name].detach().to("cpu", copy=True) for name in outputs}

        return BoundCall(stmt="stage_module(named_inputs)",
                         globals={"stage_module": stage_module, "named_inputs": inputs}, fetch=fetch)

    return Built(bind=bind, notes=("not a file: serve it with compile_stage(collection, stage, outputs=..., "
                                   "compile=True) in a process that holds the collection",))


def _program(context: BuildContext) -> Built:
    from torchbricks_fx.export import export_program

    path = context.folder("pt2") / PROGRAM_NAME
    export_program(context.collection, path, context.named_inputs, stage=context.stage,
                   outputs=list(context.outputs))
    program = torch.export.load(path).module()
    outputs = context.outputs

    def bind(named_inputs: Mapping[str, torch.Tensor]) -> BoundCall:
        inputs = dict(named_inputs)

        def fetch() -> dict[str, torch.Tensor]:
            with torch.no_grad():
                values = program(inputs)
            return {name: values[name].detach().to("cpu", copy=True) for name in outputs}

        return BoundCall(stmt="program(named_inputs)", globals={"program": program, "named_inputs": inputs},
                         fetch=fetch)

    return Built(bind=bind, files=(path,), notes=("needs torch to load (torch.export.load)",))


@dataclass(frozen=True)
class CandidateKind:
    """A candidate: its name, numeric precision, artifact format (``"torch"``: not a file) and builder."""

    name: str
    precision: str
    format: str
    description: str
    build: Callable[[BuildContext], Built] = field(repr=False)


_KINDS = (
    CandidateKind("onnxruntime", "float32", "onnx", "export_onnx, ONNX Runtime with every graph optimization",
                  _onnxruntime),
    CandidateKind("onnxruntime-int8-dynamic", "int8", "onnx", "onnxruntime quantize_dynamic (int8 weights, "
                  "activations quantized per call)", _int8_dynamic),
    CandidateKind("onnxruntime-int8-static", "int8", "onnx", "onnxruntime quantize_static, QDQ, per-channel int8 "
                  "weights, int8 activations calibrated on the validation batches", _int8_static),
    CandidateKind("onnxruntime-fp16", "float16", "onnx", "onnxruntime float16 conversion (float32 inputs and "
                  "outputs), CUDA only", _float16),
    CandidateKind("compiled", "float32", "torch", "compile_stage(..., compile=True): torch.compile (Inductor) with "
                  "frozen weights; not a file", _compiled),
    CandidateKind("pt2", "float32", "pt2", "export_program, torch.export.load(...).module()", _program),
)
CANDIDATES: dict[str, CandidateKind] = {kind.name: kind for kind in _KINDS}
"""Every candidate by name, in the order they are tried (``backends.DEPLOY_CANDIDATES``; a test may register
more)."""


def parse_candidates(candidates: Sequence[str] | str | None) -> tuple[str, ...]:
    """Candidate names, checked (``None``: every candidate)."""
    from torchbricks_fx.errors import BrickDeployInputError

    if candidates is None:
        return tuple(CANDIDATES)
    names = [n.strip() for n in candidates.split(",")] if isinstance(candidates, str) else list(candidates)
    unknown = [name for name in names if name not in CANDIDATES]
    if unknown or not names:
        raise BrickDeployInputError(f"Unknown candidate(s) {unknown or names!r}; valid candidates: "
                                    f"{', '.join(CANDIDATES)}.")
    return tuple(dict.fromkeys(names))


def copy_files(files: Sequence[Path], folder: Path) -> list[str]:
    """Copies an artifact's files into the bundle folder; returns their names (the main file first)."""
    if not files:
        raise BrickDeployError("This candidate is not a file and cannot be written to a bundle.")
    for path in files:
        shutil.copy2(path, folder / path.name)
    return [path.name for path in files]
