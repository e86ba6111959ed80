"""Loading a deployment bundle: ``load_bundle(folder)`` returns a callable ``bundle(named_inputs) -> {output
name: numpy array}``.

A bundle is a folder written by :func:`torchbricks_fx.deploy`: the chosen artifact (``model.onnx`` or
``model.pt2``), ``manifest.json`` (inputs and outputs with dtypes and shapes, the sha256 of every file, how
every candidate did) and ``report.md``.  This module imports only the standard library and numpy: an ONNX
bundle runs with onnxruntime and numpy alone, on a machine without torch (onnxruntime is imported when the
bundle is loaded, torch only for a ``.pt2`` bundle).  The artifact's sha256 is checked before it is loaded.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from torchbricks_fx.errors import BrickDeployError, BrickDeployInputError

__all__ = ["Bundle", "TensorSpec", "load_bundle"]

BUNDLE_SCHEMA = "torchbricks_fx.bundle/1"
MANIFEST_NAME = "manifest.json"

Runner = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]


def file_sha256(path: str | os.PathLike[str]) -> str:
    """The hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class TensorSpec:
    """One input or output of a bundle: numpy dtype name and shape, with a name (``"batch"``) for each
    dynamic axis."""

    name: str
    dtype: str
    shape: tuple[int | str, ...]

    @property
    def dynamic_axes(self) -> dict[int, str]:
        return {axis: size for axis, size in enumerate(self.shape) if isinstance(size, str)}

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape),
                "dynamic_axes": {str(axis): size for axis, size in self.dynamic_axes.items()}}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> TensorSpec:
        return cls(str(data["name"]), str(data["dtype"]), tuple(data["shape"]))


# --------------------------------------------------------------------------------------------- manifest
def read_manifest(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """The bundle's ``manifest.json``, checked for its schema."""
    path = Path(folder) / MANIFEST_NAME
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BrickDeployError(f"{Path(folder)} is not a bundle: it has no {MANIFEST_NAME} (bundles are written by "
                               f"torchbricks_fx.deploy or `torchbricks-fx deploy`).") from None
    except (OSError, ValueError) as error:
        raise BrickDeployError(f"{path} cannot be read as JSON: {error}") from None
    if not isinstance(manifest, dict) or manifest.get("schema") != BUNDLE_SCHEMA:
        found = manifest.get("schema") if isinstance(manifest, dict) else None
        raise BrickDeployError(f"{path} is not a torchbricks_fx bundle manifest (schema {found!r}, expected "
                               f"{BUNDLE_SCHEMA!r}).")
    problem = _manifest_problem(manifest)
    if problem is not None:
        raise BrickDeployError(f"{path} is not a well-formed bundle manifest ({problem}); deploy again to get a "
                               f"valid bundle.")
    return manifest


def _manifest_problem(manifest: Mapping[str, Any]) -> str | None:
    """What is wrong with the parts of the manifest that loading reads (a hand edit, a damaged file)."""
    def is_list(value: Any, item: type | tuple[type, ...]) -> bool:
        return isinstance(value, list) and all(isinstance(v, item) for v in value)

    artifact, files = manifest.get("artifact"), manifest.get("files")
    checks = [
        ("artifact", isinstance(artifact, dict), "an object"),
        ("files", isinstance(files, dict) and all(isinstance(v, str) for v in files.values()),
         "an object of sha256 strings"),
        ("artifact.format", isinstance(artifact, dict) and isinstance(artifact.get("format"), str), "a string"),
        ("artifact.files", isinstance(artifact, dict) and is_list(artifact.get("files"), str) and artifact["files"],
         "a list of file names"),
        ("artifact.providers", isinstance(artifact, dict) and is_list(artifact.get("providers", []), str),
         "a list of provider names"),
    ]
    for field in ("inputs", "outputs"):
        specs: Any = manifest.get(field)
        checks.append((field, is_list(specs, dict) and all(
            isinstance(s.get("name"), str) and isinstance(s.get("dtype"), str) and is_list(s.get("shape"), (int, str))
            for s in specs), "a list of {name, dtype, shape}"))
    for field, ok, expected in checks:
        if not ok:
            return f"{field}: expected {expected}"
    return None


def _checked_file(folder: Path, name: str, hashes: Mapping[str, str]) -> Path:
    """``folder/name`` after checking that it is a plain file name listed in the manifest whose sha256 matches."""
    if not name or Path(name).name != name or name in (".", ".."):
        raise BrickDeployError(f"The manifest in {folder} names the file {name!r}, which is not a file of the "
                               f"bundle folder.")
    path = folder / name
    expected = hashes.get(name)
    if expected is None:
        raise BrickDeployError(f"The manifest in {folder} lists no sha256 for {name!r}; refusing to load it.")
    if not path.is_file():
        raise BrickDeployError(f"The bundle {folder} lacks its file {name!r}.")
    actual = file_sha256(path)
    if actual != expected:
        raise BrickDeployError(f"{path} was modified after the bundle was written: its sha256 is {actual}, the "
                               f"manifest says {expected}. Refusing to load it; deploy again to get a valid bundle.")
    return path


# --------------------------------------------------------------------------------------------- runners
def _onnx_runner(path: Path, output_names: Sequence[str], providers: Sequence[Any] | None,
                 threads: int | None) -> tuple[Runner, list[str]]:
    try:
        import onnxruntime as ort
    except ImportError:
        raise BrickDeployError(f"{path.name} is an ONNX model: loading it needs onnxruntime "
                               f"(pip install onnxruntime).") from None
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads is not None:
        options.intra_op_num_threads = threads
    available = set(ort.get_available_providers())
    # The CUDA provider named alone runs as deploy judged it: float32 with TF32 off (onnxruntime's default is on).
    wanted = [("CUDAExecutionProvider", {"use_tf32": "0"}) if p == "CUDAExecutionProvider" else p
              for p in (providers or ["CPUExecutionProvider"])]
    chosen = [p for p in wanted if (p[0] if isinstance(p, tuple) else p) in available]
    session = ort.InferenceSession(os.fspath(path), options, providers=chosen or ["CPUExecutionProvider"])
    names = list(output_names)

    def run(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        known = {i.name for i in session.get_inputs()}  # an input no output depends on is not in the file
        return dict(zip(names, session.run(names, {n: v for n, v in feeds.items() if n in known}), strict=True))

    return run, list(session.get_providers())


def _program_runner(path: Path) -> Runner:
    try:
        import torch
    except ImportError:
        raise BrickDeployError(f"{path.name} is a torch.export program: loading it needs torch (ONNX bundles "
                               f"need only onnxruntime and numpy).") from None
    module = torch.export.load(path).module()

    def run(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with torch.no_grad():
            outputs = module({name: torch.from_numpy(array) for name, array in feeds.items()})
        return {name: value.detach().cpu().numpy() for name, value in outputs.items()}

    return run


# --------------------------------------------------------------------------------------------- bundle
def _as_array(name: str, value: Any) -> np.ndarray:
    # A torch tensor can only come from a caller that imported torch; torch is never imported here.
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(value, torch.Tensor):
        return np.asarray(value.detach().cpu().numpy())
    if isinstance(value, np.ndarray):
        return value
    raise BrickDeployInputError(f"Input {name!r} is a {type(value).__name__}; give a numpy array or a torch tensor.")


class Bundle:
    """A loaded bundle: ``bundle(named_inputs) -> {output name: numpy array}``.  Inputs are numpy arrays or
    torch tensors, checked against the manifest (names, dtypes, ranks, static sizes); extra entries (e.g.
    targets) are ignored.  ``manifest`` is the parsed ``manifest.json``."""

    def __init__(self, folder: Path, manifest: dict[str, Any], run: Runner, providers: Sequence[str] = ()) -> None:
        self.folder = folder
        self.manifest = manifest
        self.inputs = tuple(TensorSpec.from_json(item) for item in manifest["inputs"])
        self.outputs = tuple(TensorSpec.from_json(item) for item in manifest["outputs"])
        self.providers = tuple(providers)
        self._run = run

    @property
    def candidate(self) -> str:
        return str(self.manifest["artifact"]["candidate"])

    @property
    def format(self) -> str:
        return str(self.manifest["artifact"]["format"])

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(spec.name for spec in self.inputs)

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(spec.name for spec in self.outputs)

    def _feeds(self, named_inputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
        if not isinstance(named_inputs, Mapping):
            raise BrickDeployInputError(f"A bundle takes a dict {{input name: array}}, not "
                                        f"{type(named_inputs).__name__}; its inputs are {list(self.input_names)}.")
        missing = [name for name in self.input_names if name not in named_inputs]
        if missing:
            raise BrickDeployInputError(f"Inputs {missing} are missing (given: {sorted(named_inputs)}); the bundle "
                                        f"takes {[f'{s.name} {s.dtype} {list(s.shape)}' for s in self.inputs]}.")
        feeds = {}
        for spec in self.inputs:
            array = _as_array(spec.name, named_inputs[spec.name])
            if array.dtype.name != spec.dtype:
                raise BrickDeployInputError(f"Input {spec.name!r} has dtype {array.dtype.name}; the bundle takes "
                                            f"{spec.dtype} (convert it, e.g. array.astype('{spec.dtype}')).")
            fixed = [(axis, size) for axis, size in enumerate(spec.shape) if not isinstance(size, str)]
            if array.ndim != len(spec.shape) or any(array.shape[axis] != size for axis, size in fixed):
                raise BrickDeployInputError(f"Input {spec.name!r} has shape {list(array.shape)}; the bundle takes "
                                            f"{list(spec.shape)} (named axes may have any size).")
            if not array.dtype.isnative:  # a byte-swapped array (">f4" here) would be read as garbage
                array = array.astype(array.dtype.newbyteorder("="))
            feeds[spec.name] = array
        return feeds

    def __call__(self, named_inputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
        return self._run(self._feeds(named_inputs))

    def __repr__(self) -> str:
        return (f"Bundle({str(self.folder)!r}, candidate={self.candidate!r}, inputs={list(self.input_names)}, "
                f"outputs={list(self.output_names)})")


def load_bundle(folder: str | os.PathLike[str], *, providers: Sequence[Any] | None = None,
                threads: int | None = None) -> Bundle:
    """Loads a bundle written by :func:`torchbricks_fx.deploy`; returns a callable ``bundle(named_inputs) ->
    {output name: numpy array}``.

    The artifact's files are checked against the sha256 in ``manifest.json`` first: a modified file is
    refused with ``BrickDeployError`` naming it.  ONNX bundles need onnxruntime and numpy only;
    ``providers`` (default: those the bundle was measured with, where available, else the CPU) and
    ``threads`` (intra-op threads; default: onnxruntime's) configure the session.  ``.pt2`` bundles need
    torch."""
    if not isinstance(folder, (str, os.PathLike)):
        raise BrickDeployInputError(f"load_bundle takes the bundle's folder as a path, not {type(folder).__name__}.")
    if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool) or threads < 1):
        raise BrickDeployInputError(f"threads must be a positive integer or None, not {threads!r}.")
    if providers is not None and (isinstance(providers, str) or not isinstance(providers, Sequence)):
        raise BrickDeployInputError(f"providers must be a list of onnxruntime provider names, not {providers!r} "
                                    f"(e.g. ['CUDAExecutionProvider', 'CPUExecutionProvider']).")
    folder = Path(folder)
    manifest = read_manifest(folder)
    artifact = manifest["artifact"]
    paths = [_checked_file(folder, name, manifest["files"]) for name in artifact["files"]]
    output_names = [item["name"] for item in manifest["outputs"]]
    if artifact["format"] == "onnx":
        run, used = _onnx_runner(paths[0], output_names, providers or artifact.get("providers"), threads)
        return Bundle(folder, manifest, run, used)
    if artifact["format"] == "pt2":
        return Bundle(folder, manifest, _program_runner(paths[0]))
    raise BrickDeployError(f"The bundle {folder} holds a {artifact['format']!r} artifact, which this version of "
                           f"torchbricks_fx cannot load.")
