"""ONNX Runtime sessions, one way for export verification, the ``onnxruntime`` backend and deployment.

Sessions run with every graph optimization on (``ORT_ENABLE_ALL``) and as many intra-op threads as torch
uses, so that a latency comparison with torch is like for like.  ``onnxruntime`` is imported on first use.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from torchbricks_fx.errors import BrickBackendError, BrickExportError

__all__ = ["ort_providers", "ort_session"]


def ort_providers(device: torch.device | str) -> list[Any]:
    """The execution providers for inputs on ``device``: CUDA (TF32 off, ``use_tf32="0"``, so results match
    the float32 numerics export verified) when ``device`` is CUDA and this onnxruntime has it, then CPU as
    fallback; CPU only otherwise."""
    import onnxruntime as ort

    device = torch.device(device)
    if device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
        options = {"device_id": str(device.index or 0), "use_tf32": "0"}
        return [("CUDAExecutionProvider", options), "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def require_cuda_provider(device: torch.device) -> None:
    """``BrickBackendError`` when CUDA is asked for and this onnxruntime has no CUDA execution provider
    (a session would silently fall back to the CPU)."""
    import onnxruntime as ort

    if device.type == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
        raise BrickBackendError(f"onnxruntime {ort.__version__} has no CUDAExecutionProvider (available: "
                                f"{', '.join(ort.get_available_providers())}); install onnxruntime-gpu to run ONNX "
                                f"models on CUDA.")


def ort_session(path: str | os.PathLike[str], device: torch.device | str = "cpu", *, threads: int | None = None,
                optimized_path: str | os.PathLike[str] | None = None) -> Any:
    """An ``InferenceSession`` for ``path`` on ``device`` (see :func:`ort_providers`: a CPU session when this
    onnxruntime has no CUDA provider) with every graph optimization on and ``threads``
    intra-op threads (default: torch's).  ``optimized_path`` also saves the optimized model there, optimized
    up to ``ORT_ENABLE_EXTENDED`` (onnxruntime's advice for saved models: the layout optimizations of
    ``ORT_ENABLE_ALL`` are specific to the machine that made them; a session on the saved file applies them
    again), with its weights in ``<optimized_path>.data`` when large."""
    import onnxruntime as ort

    device = torch.device(device)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    if optimized_path is not None:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        options.optimized_model_filepath = os.fspath(optimized_path)
        # Otherwise the saved model points at the original's external data by a relative path.
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                         f"{os.path.basename(optimized_path)}.data")
        options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes",
                                         str(1 << 20))
    providers = ort_providers(device)
    session = ort.InferenceSession(os.fspath(path), options, providers=providers)
    if len(providers) > 1 and session.get_providers()[0] != "CUDAExecutionProvider":
        # ORT falls back to CPU silently when the CUDA libraries cannot be loaded.  (Without the provider at
        # all, the session is a CPU one by design: see ort_providers and require_cuda_provider.)
        raise BrickBackendError(f"onnxruntime could not start its CUDAExecutionProvider (session providers: "
                                f"{session.get_providers()}); check the CUDA/cuDNN libraries onnxruntime-gpu needs.")
    return session


def numpy_feeds(session: Any, named_inputs: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """The session's inputs as numpy arrays, fed by the session's own input list (the legacy exporter drops
    inputs whose values it froze)."""
    unknown = [i.name for i in session.get_inputs() if i.name not in named_inputs]
    if unknown:
        raise BrickExportError(f"The ONNX file has inputs {unknown} that the stage does not have "
                               f"({list(named_inputs)}).")
    if any(named_inputs[i.name].dtype == torch.bfloat16 for i in session.get_inputs()):
        raise BrickExportError("bfloat16 inputs cannot be fed to onnxruntime from numpy.")
    return {i.name: named_inputs[i.name].detach().cpu().numpy() for i in session.get_inputs()}


def run_session(session: Any, named_inputs: Mapping[str, torch.Tensor],
                output_names: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
    """Runs ``session`` on tensors; returns ``{output name: CPU tensor}`` (copies, safe to keep)."""
    names = list(output_names) if output_names is not None else [o.name for o in session.get_outputs()]
    arrays = session.run(names, numpy_feeds(session, named_inputs))
    return {name: torch.from_numpy(array.copy()) for name, array in zip(names, arrays, strict=True)}
