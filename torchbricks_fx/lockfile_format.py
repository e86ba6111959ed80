"""The stage lockfile's format: frozen dataclasses (:class:`Lock` and its parts), byte-stable JSON text, and
reading and writing files.  ``lockfile.py`` builds a lock from a collection; ``lockfile_diff.py`` compares two.

The text is the same bytes for equal locks in every process and on every machine: keys sorted, two-space
indent, short lists of scalars and small records on one line (so a diff in code review shows the changed
shape, not a reflowed block), and a trailing newline.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

from torchbricks_fx import files
from torchbricks_fx.errors import BrickLockError, error_summary
from torchbricks_fx.plan import FrozenMap
from torchbricks_fx.stage import Stage

__all__ = ["SCHEMA", "BrickLock", "Lock", "OnnxLock", "StageLock", "TensorLock", "ValueLock", "read_lock",
           "write_lock"]

SCHEMA_PREFIX = "torchbricks_fx.lock/"
SCHEMA = f"{SCHEMA_PREFIX}2"  # 2: nested values' items, bricks' loss_output_names, ONNX not_exported
BATCH = "batch"

Shape = tuple[int | str, ...]
Inputs = tuple[str, ...] | Mapping[str, str] | str  # positional value names, {argument: value name} or "all"
T = TypeVar("T")


# --------------------------------------------------------------------------------------------- the lock
@dataclass(frozen=True)
class TensorLock:
    """A parameter's or buffer's shape and dtype; for a parameter also whether it is trained."""

    shape: tuple[int, ...]
    dtype: str
    requires_grad: bool | None = None  # None for buffers

    def describe(self) -> str:
        return f"{show_shape(self.shape)} {self.dtype}" + (" frozen" if self.requires_grad is False else "")

    def to_data(self) -> dict[str, Any]:
        data: dict[str, Any] = {"shape": list(self.shape), "dtype": self.dtype}
        if self.requires_grad is not None:
            data["requires_grad"] = self.requires_grad
        return data

    @classmethod
    def from_data(cls, data: Any) -> TensorLock:
        requires_grad = data.get("requires_grad")
        return cls(tuple(_int(d) for d in _list(data, "shape")), _str(data["dtype"]),
                   None if requires_grad is None else _bool(requires_grad))


@dataclass(frozen=True)
class ValueLock:
    """A value of a stage on the example inputs: a tensor's shape and dtype, or another value's type name
    with, for a dict, list or tuple, its items (by key, or in order), recorded the same way."""

    type: str  # "Tensor" for tensors
    shape: Shape = ()
    dtype: str | None = None
    items: Mapping[str, ValueLock] | tuple[ValueLock, ...] | None = None

    def describe(self) -> str:
        return f"{show_shape(self.shape)} {self.dtype}" if self.type == "Tensor" else self.type

    def leaves(self, path: str = "") -> Iterator[tuple[str, ValueLock]]:
        """``(path, value without its items)`` for this value and every item in it: ``""``, ``"['a']"``,
        ``"['a'][0]"``, ... (what the diff compares, so a changed item is reported once, where it is)."""
        yield path, replace(self, items=None)
        entries = enumerate(self.items) if isinstance(self.items, tuple) else (self.items or {}).items()
        for key, item in entries:
            yield from item.leaves(f"{path}[{key!r}]")

    def to_data(self) -> dict[str, Any]:
        if self.type == "Tensor":
            return {"shape": list(self.shape), "dtype": self.dtype}
        data: dict[str, Any] = {"type": self.type}
        if isinstance(self.items, tuple):
            data["items"] = [item.to_data() for item in self.items]
        elif self.items is not None:
            data["items"] = {key: item.to_data() for key, item in self.items.items()}
        return data

    @classmethod
    def from_data(cls, data: Any) -> ValueLock:
        if "type" not in data:
            return cls("Tensor", tuple(d if d == BATCH else _int(d) for d in _list(data, "shape")),
                       _str(data["dtype"]))
        items = data.get("items")
        if isinstance(items, list):  # a list's or tuple's items, in order
            return cls(_str(data["type"]),
                       items=tuple(_within(f"items.{i}", cls.from_data, item) for i, item in enumerate(items)))
        return cls(_str(data["type"]), items=None if items is None else _records(data, "items", cls.from_data))


@dataclass(frozen=True)
class BrickLock:
    """One brick's structure: classes, connections (value names resolved), the outputs that count as losses
    (what TRAIN optimizes), parameters and buffers."""

    brick_class: str
    module_class: str
    inputs: Inputs
    outputs: tuple[str, ...]
    calculate_gradients: bool
    parameter_count: int
    parameters: Mapping[str, TensorLock]
    buffers: Mapping[str, TensorLock]
    submodules: Mapping[str, str]  # dotted name -> class name
    loss_output_names: tuple[str, ...] = ()

    def to_data(self) -> dict[str, Any]:
        inputs = self.inputs if isinstance(self.inputs, str) else (
            dict(self.inputs) if isinstance(self.inputs, Mapping) else list(self.inputs))
        return {"brick_class": self.brick_class, "module_class": self.module_class, "inputs": inputs,
                "outputs": list(self.outputs), "calculate_gradients": self.calculate_gradients,
                "parameter_count": self.parameter_count,
                "parameters": {name: t.to_data() for name, t in self.parameters.items()},
                "buffers": {name: t.to_data() for name, t in self.buffers.items()},
                "submodules": dict(self.submodules), "loss_output_names": list(self.loss_output_names)}

    @classmethod
    def from_data(cls, data: Any) -> BrickLock:
        inputs = data["inputs"]
        parsed: Inputs = _str(inputs) if isinstance(inputs, str) else (
            _records(data, "inputs", _str) if isinstance(inputs, dict) else _strs(data, "inputs"))
        return cls(_str(data["brick_class"]), _str(data["module_class"]), parsed, _strs(data, "outputs"),
                   _bool(data["calculate_gradients"]), _int(data["parameter_count"]),
                   _records(data, "parameters", TensorLock.from_data), _records(data, "buffers", TensorLock.from_data),
                   _records(data, "submodules", _str), _strs(data, "loss_output_names"))


@dataclass(frozen=True)
class StageLock:
    """One stage: what runs, in which order, on which inputs, producing which values; or its problems."""

    bricks: tuple[str, ...] = ()
    required_inputs: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ()
    pruned: Mapping[str, str] = field(default_factory=FrozenMap)
    values: Mapping[str, ValueLock] = field(default_factory=FrozenMap)
    values_not_recorded: str | None = None  # why the stage could not run on the example inputs
    graph_sha256: str | None = None
    problems: tuple[str, ...] = ()  # an invalid stage records only its problems

    def to_data(self) -> dict[str, Any]:
        if self.problems:
            return {"problems": list(self.problems)}
        data: dict[str, Any] = {"bricks": list(self.bricks), "required_inputs": list(self.required_inputs),
                                "outputs": list(self.outputs), "pruned": dict(self.pruned),
                                "values": {name: v.to_data() for name, v in self.values.items()},
                                "graph_sha256": self.graph_sha256}
        if self.values_not_recorded is not None:
            data["values_not_recorded"] = self.values_not_recorded
        return data

    @classmethod
    def from_data(cls, data: Any) -> StageLock:
        if "problems" in data:
            return cls(problems=_strs(data, "problems"))
        not_recorded = data.get("values_not_recorded")
        return cls(_strs(data, "bricks"), _strs(data, "required_inputs"), _strs(data, "outputs"),
                   _records(data, "pruned", _str), _records(data, "values", ValueLock.from_data),
                   None if not_recorded is None else _str(not_recorded), _str(data["graph_sha256"]))


@dataclass(frozen=True)
class OnnxLock:
    """The ONNX operator histogram of the EXPORT stage ("Domain::Op" outside the default domain); or, when
    the stage is invalid, cannot run on the examples or fails to export, why there is none."""

    opset: int | None
    operators: Mapping[str, int]
    exporter: Mapping[str, str]  # library versions: context only, ignored by diff_locks
    not_exported: str | None = None

    def to_data(self) -> dict[str, Any]:
        data: dict[str, Any] = {"opset": self.opset, "operators": dict(self.operators),
                                "exporter": dict(self.exporter)}
        if self.not_exported is not None:
            data["not_exported"] = self.not_exported
        return data

    @classmethod
    def from_data(cls, data: Any) -> OnnxLock:
        opset, not_exported = data["opset"], data.get("not_exported")
        return cls(None if opset is None else _int(opset), _records(data, "operators", _int),
                   _records(data, "exporter", _str), None if not_exported is None else _str(not_exported))


@dataclass(frozen=True)
class Lock:
    """Every stage of a collection (keyed by stage name) and every brick that runs in some stage."""

    stages: Mapping[str, StageLock]
    bricks: Mapping[str, BrickLock]
    onnx: OnnxLock | None = None
    schema: str = SCHEMA

    def to_data(self) -> dict[str, Any]:
        data = {"schema": self.schema, "stages": {name: s.to_data() for name, s in self.stages.items()},
                "bricks": {name: b.to_data() for name, b in self.bricks.items()}}
        if self.onnx is not None:
            data["onnx_export"] = self.onnx.to_data()
        return data

    def to_json(self) -> str:
        """The file's text: sorted keys, two-space indent, short lists and small records on one line."""
        return _dumps(self.to_data()) + "\n"

    @classmethod
    def from_json(cls, text: str, source: str = "the lock") -> Lock:
        """Parses :meth:`to_json` text; raises ``BrickLockError`` naming ``source`` when it is not a lock."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise BrickLockError(f"{source} is not a lock file: it is not valid JSON ({error}).") from None
        schema = data.get("schema") if isinstance(data, dict) else None
        if not isinstance(schema, str) or not schema.startswith(SCHEMA_PREFIX):
            raise BrickLockError(f"{source} is not a torchbricks_fx lock file: its \"schema\" is {schema!r}, "
                                 f"expected {SCHEMA!r}.")
        if schema != SCHEMA:
            raise BrickLockError(f"{source} has lock schema {schema!r}; this torchbricks_fx reads {SCHEMA!r}. "
                                 f"Regenerate it (torchbricks-fx lock FILE -o LOCKFILE).")
        try:
            return _lock_from_data(data)
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            what = f"missing key {error}" if isinstance(error, KeyError) else str(error)
            raise BrickLockError(f"{source} is not a well-formed lock file ({what}); regenerate it "
                                 f"(torchbricks-fx lock FILE -o LOCKFILE).") from None


def _lock_from_data(data: dict[str, Any]) -> Lock:
    stages = _records(data, "stages", StageLock.from_data)
    bricks = _records(data, "bricks", BrickLock.from_data)
    unknown = sorted({b for s in stages.values() for b in s.bricks} - set(bricks))
    if unknown:
        raise ValueError(f"stages run bricks {unknown} that the \"bricks\" section does not describe")
    onnx = data.get("onnx_export")
    return Lock(FrozenMap(_in_stage_order(stages)), bricks,
                None if onnx is None else _within("onnx_export", OnnxLock.from_data, onnx))


def _in_stage_order(stages: Mapping[str, StageLock]) -> dict[str, StageLock]:
    order = [stage.value for stage in Stage]
    return dict(sorted(stages.items(), key=lambda item: (order.index(item[0]) if item[0] in order else len(order),
                                                         item[0])))


class _Malformed(ValueError):
    """Ill-formed lock data, located by its path of keys (``stages.inference.outputs``)."""

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path, self.problem = path, problem


def _within(path: str, parse: Callable[[Any], T], data: Any) -> T:
    """``parse(data)``, with any error located under ``path``."""
    try:
        return parse(data)
    except _Malformed as error:
        raise _Malformed(f"{path}.{error.path}", error.problem) from None
    except KeyError as error:
        raise _Malformed(path, f"missing key {error}") from None
    except (TypeError, ValueError, AttributeError) as error:
        raise _Malformed(path, str(error)) from None


def _list(data: Any, key: str) -> list[Any]:
    # Not any iterable: a string where a list belongs would otherwise read as a list of characters.
    value = data[key]
    if not isinstance(value, list):
        raise _Malformed(key, f"expected a list, found {value!r}")
    return value


def _strs(data: Any, key: str) -> tuple[str, ...]:
    return _within(key, lambda values: tuple(_str(v) for v in values), _list(data, key))


def _records(data: Any, key: str, parse: Callable[[Any], T]) -> FrozenMap[str, T]:
    """``data[key]``, an object ``{name: record}``, with each record parsed."""
    value = data[key]
    if not isinstance(value, dict):
        raise _Malformed(key, f"expected an object, found {value!r}")
    return FrozenMap({_within(key, _str, k): _within(f"{key}.{k}", parse, v) for k, v in value.items()})


def _str(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected a string, found {value!r}")
    return value


def _int(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"expected an integer, found {value!r}")
    return value


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"expected true or false, found {value!r}")
    return value


def show_shape(shape: Shape) -> str:
    """``[batch, 3, 16, 16]``: a shape as people write it."""
    return "[" + ", ".join(map(str, shape)) + "]"


# --------------------------------------------------------------------------------------------- files
def write_lock(lock: Lock, path: str | os.PathLike[str]) -> Path:
    """Writes ``lock`` to ``path`` atomically (replacing it: a lock file is meant to be regenerated)."""
    if not isinstance(lock, Lock):
        raise BrickLockError(f"write_lock takes a Lock (from lock(collection, named_inputs)), not "
                             f"{type(lock).__name__}.")
    return files.write_text(files.as_path(path, "write_lock's path", BrickLockError), lock.to_json(), overwrite=True,
                            error=BrickLockError)


def read_lock(path: str | os.PathLike[str]) -> Lock:
    """Reads a lock file written by :func:`write_lock`; ``BrickLockError`` naming the file when it is missing,
    not JSON, of another schema version or ill-formed."""
    try:
        text = files.as_path(path, "read_lock's path", BrickLockError).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise BrickLockError(f"No lock file {os.fspath(path)!r}; write one with torchbricks-fx lock FILE -o "
                             f"{os.fspath(path)} (or write_lock(lock(collection, named_inputs), path)).") from None
    except (OSError, UnicodeDecodeError) as error:
        raise BrickLockError(f"Cannot read the lock file {os.fspath(path)!r}: {error_summary(error)}") from None
    return Lock.from_json(text, source=repr(os.fspath(path)))


def _dumps(value: Any, indent: str = "") -> str:
    """Deterministic JSON: sorted keys, one entry per line, short scalar lists and small records inline."""
    if _inline(value):
        return json.dumps(value, ensure_ascii=False, sort_keys=True, separators=(", ", ": "))
    inner = indent + "  "
    if isinstance(value, dict):
        entries = [f"{inner}{json.dumps(key, ensure_ascii=False)}: {_dumps(value[key], inner)}"
                   for key in sorted(value)]
        return "{\n" + ",\n".join(entries) + f"\n{indent}}}"
    return "[\n" + ",\n".join(f"{inner}{_dumps(item, inner)}" for item in value) + f"\n{indent}]"


def _inline(value: Any) -> bool:
    if not isinstance(value, (dict, list)) or not value:
        return True
    items = list(value.values()) if isinstance(value, dict) else value
    flat = all(not isinstance(v, (dict, list)) or (isinstance(v, list) and not any(isinstance(x, (dict, list))
                                                                                   for x in v)) for v in items)
    small = not isinstance(value, dict) or len(value) <= 3
    return flat and small and len(json.dumps(value, ensure_ascii=False)) <= 100


def canonical_sha256(data: Any) -> str:
    """sha256 of compact, key-sorted JSON: the same for equal data in every process (unlike ``hash()``)."""
    text = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
