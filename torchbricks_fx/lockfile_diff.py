"""Comparing two stage locks: every difference as a :class:`LockChange` naming its stage and brick or value,
and the per-stage text ``torchbricks-fx check`` prints.  Works on the locks' data alone: nothing runs here."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torchbricks_fx.lockfile_format import BrickLock, Lock, OnnxLock, StageLock, TensorLock, ValueLock, show_shape
from torchbricks_fx.stage import Stage

__all__ = ["LockChange", "diff_locks", "render_lock_diff"]

EXPORT = Stage.EXPORT.value


@dataclass(frozen=True)
class LockChange:
    """One difference between an old and a new lock.

    ``stage``: the stage it concerns; ``subject``: what changed, ``"stage"``, ``"input"`` (a required input),
    ``"brick"``, ``"output"``, ``"value"`` or ``"onnx"``; ``name``: its name; ``brick``: the brick concerned
    (a value's producer, an input's first reader; ``None`` where none); ``what``: the aspect that changed
    (``"added"``, ``"removed"``, ``"parameter 'fc.weight'"``, ``"calculate_gradients"``, ...); ``before`` and
    ``after``: the old and new state as text (``None`` when absent); ``message``: one readable line."""

    stage: str
    subject: str
    name: str
    brick: str | None
    what: str
    before: str | None
    after: str | None
    message: str

    def __str__(self) -> str:
        return self.message


def diff_locks(old: Lock, new: Lock) -> list[LockChange]:
    """Every difference from ``old`` to ``new``, ordered by stage (in ``Stage`` order), then: problems and
    stage-level changes, required inputs, bricks (execution order), outputs, values, ONNX operators.
    Empty when the locks describe the same stages; the ONNX exporter versions are not compared."""
    changes: list[LockChange] = []
    for stage in _stage_names(old, new):
        changes += _diff_stage(stage, old, new)
    changes += _diff_onnx(old.onnx, new.onnx)
    if not changes and _compared(old) != _compared(new):  # a safety net: equal diffs must mean equal locks
        changes.append(LockChange("(lock)", "stage", "(lock)", None, "other", None, None,
                                  "the locks differ in a way not itemized here; compare the files"))
    order = _stage_names(old, new)
    return sorted(changes, key=lambda c: order.index(c.stage) if c.stage in order else len(order))


def render_lock_diff(changes: Sequence[LockChange]) -> str:
    """The changes as text, one block per stage; stages with the same changes share a block::

        stages inference and export:
          - brick 'head' no longer runs (dead in stage inference)
    """
    if not changes:
        return "no changes"
    blocks: dict[tuple[str, ...], list[str]] = {}
    for stage, group in itertools.groupby(changes, key=lambda c: c.stage):
        blocks.setdefault(tuple(change.message for change in group), []).append(stage)
    lines: list[str] = []
    for messages, stages in blocks.items():
        lines.append(f"{_name_stages(stages)}:")
        lines += [f"  - {message}" for message in messages]
    n_stages = sum(len(stages) for stages in blocks.values())
    lines.append(f"{len(changes)} change(s) in {n_stages} stage(s).")
    return "\n".join(lines)


def _name_stages(stages: Sequence[str]) -> str:
    if len(stages) == 1:
        return f"stage {stages[0]}"
    return f"stages {', '.join(stages[:-1])} and {stages[-1]}"


# --------------------------------------------------------------------------------------------- stages
def _stage_names(old: Lock, new: Lock) -> list[str]:
    known = [stage.value for stage in Stage]
    present = {*old.stages, *new.stages}
    return [name for name in known if name in present] + sorted(present - set(known))


def _diff_stage(stage: str, old: Lock, new: Lock) -> list[LockChange]:
    before, after = old.stages.get(stage), new.stages.get(stage)
    if before is None or after is None:
        what = "added" if before is None else "removed"
        return [LockChange(stage, "stage", stage, None, what, None, None, f"stage {stage} {what}")]
    if before.problems or after.problems:
        return _diff_problems(stage, before, after)
    changes = _diff_recorded(stage, before, after)
    changes += _diff_inputs(stage, before, after, new.bricks)
    changes += _diff_bricks(stage, before, after, old.bricks, new.bricks)
    changes += _diff_sequence(stage, "output", before.outputs, after.outputs, _producers(after, new.bricks),
                              _producers(before, old.bricks))
    if before.values_not_recorded is None and after.values_not_recorded is None:
        changes += _diff_values(stage, before.values, after.values, _producers(after, new.bricks),
                                _producers(before, old.bricks))
    if not changes and before.graph_sha256 != after.graph_sha256:
        changes.append(LockChange(stage, "stage", stage, None, "graph", before.graph_sha256, after.graph_sha256,
                                  "the graph structure changed (graph_sha256 differs)"))
    return changes


def _diff_problems(stage: str, before: StageLock, after: StageLock) -> list[LockChange]:
    changes = [LockChange(stage, "stage", stage, None, "problem fixed", problem, None, f"problem fixed: {problem}")
               for problem in before.problems if problem not in after.problems]
    changes += [LockChange(stage, "stage", stage, None, "problem", None, problem, f"problem: {problem}")
                for problem in after.problems if problem not in before.problems]
    if not before.problems:
        changes.insert(0, LockChange(stage, "stage", stage, None, "invalid", "valid", "invalid",
                                     f"the stage is now invalid (it ran {_arrow(before.bricks)})"))
    if not after.problems:
        changes.append(LockChange(stage, "stage", stage, None, "valid", "invalid", "valid",
                                  f"the stage is valid again: {_arrow(after.bricks)}"))
    return changes


def _diff_recorded(stage: str, before: StageLock, after: StageLock) -> list[LockChange]:
    return _diff_reason(LockChange(stage, "stage", stage, None, "values_not_recorded", before.values_not_recorded,
                                   after.values_not_recorded, ""),
                        "the stage runs on the example inputs again", "the stage no longer runs on the example inputs")


def _diff_reason(change: LockChange, works_again: str, fails: str) -> list[LockChange]:
    """A change of a reason something is not recorded (``None``: it is), worded either way."""
    if change.before == change.after:
        return []
    message = f"{works_again} (before: {change.before})" if change.after is None else f"{fails}: {change.after}"
    return [dataclasses.replace(change, message=message)]


def _diff_inputs(stage: str, before: StageLock, after: StageLock, bricks: Mapping[str, BrickLock]) -> list[LockChange]:
    readers = {name: [b for b in after.bricks if name in _read_values(bricks[b])] for name in after.required_inputs}
    changes = []
    for change in _diff_sequence(stage, "input", before.required_inputs, after.required_inputs, {}, {}):
        names = readers.get(change.name, [])
        if change.what == "added" and names:
            change = dataclasses.replace(change, brick=names[0],
                                         message=f"{change.message} (read by {', '.join(map(repr, names))})")
        changes.append(change)
    return changes


def _read_values(brick: BrickLock) -> tuple[str, ...]:
    inputs = brick.inputs
    if isinstance(inputs, str):
        return ()  # an "all" brick reads whatever the stage has
    return tuple(inputs.values()) if isinstance(inputs, Mapping) else inputs


def _producers(stage: StageLock, bricks: Mapping[str, BrickLock]) -> dict[str, str]:
    return {value: name for name in stage.bricks for value in bricks[name].outputs}


def _diff_sequence(stage: str, subject: str, before: Sequence[str], after: Sequence[str],
                   added_by: Mapping[str, str], removed_by: Mapping[str, str]) -> list[LockChange]:
    """Names removed, then added, then a change of order among the names in both."""
    label = "required input" if subject == "input" else subject
    changes = [LockChange(stage, subject, n, removed_by.get(n), "removed", n, None,
                          f"{label} {n!r} removed" + _from(removed_by.get(n)))
               for n in before if n not in after]
    changes += [LockChange(stage, subject, n, added_by.get(n), "added", None, n,
                           f"{label} {n!r} added" + _from(added_by.get(n)))
                for n in after if n not in before]
    kept_before, kept_after = [n for n in before if n in after], [n for n in after if n in before]
    if kept_before != kept_after:
        changes.append(LockChange(stage, subject, f"({label}s)", None, "order", _arrow(before), _arrow(after),
                                  f"{label} order changed: {_arrow(before)} => {_arrow(after)}"))
    return changes


def _from(brick: str | None) -> str:
    return f" (from brick {brick!r})" if brick else ""


# --------------------------------------------------------------------------------------------- bricks
def _diff_bricks(stage: str, before: StageLock, after: StageLock, old: Mapping[str, BrickLock],
                 new: Mapping[str, BrickLock]) -> list[LockChange]:
    changes = [_brick_stopped(stage, name, after) for name in before.bricks if name not in after.bricks]
    changes += [_brick_started(stage, name, before) for name in after.bricks if name not in before.bricks]
    kept_before = [n for n in before.bricks if n in after.bricks]
    kept_after = [n for n in after.bricks if n in before.bricks]
    if kept_before != kept_after:
        changes.append(LockChange(stage, "stage", stage, None, "order", _arrow(before.bricks), _arrow(after.bricks),
                                  f"execution order changed: {_arrow(before.bricks)} => {_arrow(after.bricks)}"))
    for name in kept_after:
        changes += _diff_brick(stage, name, old[name], new[name])
    changes += _diff_pruned(stage, before, after)
    return changes


def _brick_stopped(stage: str, name: str, after: StageLock) -> LockChange:
    now = after.pruned.get(name)
    message = f"brick {name!r} no longer runs ({now or 'removed from the collection'})"
    return LockChange(stage, "brick", name, name, "removed", "runs", now, message)


def _brick_started(stage: str, name: str, before: StageLock) -> LockChange:
    was = before.pruned.get(name)
    message = f"brick {name!r} now runs ({'before: ' + was if was else 'new brick'})"
    return LockChange(stage, "brick", name, name, "added", was, "runs", message)


def _diff_pruned(stage: str, before: StageLock, after: StageLock) -> list[LockChange]:
    """Bricks that run in neither lock of this stage: a changed reason, or added to or removed from the
    collection while pruned here."""
    changes = []
    for name in dict.fromkeys([*before.pruned, *after.pruned]):
        was, now = before.pruned.get(name), after.pruned.get(name)
        if was == now or name in before.bricks or name in after.bricks:
            continue
        if was is None:
            message = f"brick {name!r} added to the collection, pruned here ({now})"
        elif now is None:
            message = f"brick {name!r} removed from the collection (was pruned here: {was})"
        else:
            message = f"brick {name!r} pruned: {was} => {now}"
        changes.append(LockChange(stage, "brick", name, name, "pruned", was, now, message))
    return changes


_BRICK_FIELDS = (("brick_class", "brick class"), ("module_class", "module class"), ("inputs", "inputs"),
                 ("outputs", "outputs"), ("calculate_gradients", "calculate_gradients"),
                 ("loss_output_names", "loss outputs"))


def _diff_brick(stage: str, name: str, before: BrickLock, after: BrickLock) -> list[LockChange]:
    changes = []
    for attribute, label in _BRICK_FIELDS:
        was, now = _show(getattr(before, attribute)), _show(getattr(after, attribute))
        if was != now:
            changes.append(LockChange(stage, "brick", name, name, attribute, was, now,
                                      f"brick {name!r}: {label} {was} -> {now}"))
    changes += _diff_entries(stage, name, "submodule", before.submodules, after.submodules)
    changes += _diff_entries(stage, name, "parameter", before.parameters, after.parameters)
    changes += _diff_entries(stage, name, "buffer", before.buffers, after.buffers)
    if before.parameter_count != after.parameter_count:
        changes.append(LockChange(stage, "brick", name, name, "parameter_count", str(before.parameter_count),
                                  str(after.parameter_count), f"brick {name!r}: parameter count "
                                  f"{before.parameter_count:,} -> {after.parameter_count:,}"))
    return changes


def _diff_entries(stage: str, brick: str, kind: str, before: Mapping[str, Any],
                  after: Mapping[str, Any]) -> list[LockChange]:
    """Submodules (class names), parameters or buffers (``TensorLock``) added, removed or changed."""
    changes = []
    for key in dict.fromkeys([*before, *after]):
        was, now = before.get(key), after.get(key)
        if was == now:
            continue
        was_text, now_text = _describe(was), _describe(now)
        if was is None:
            message = f"brick {brick!r}: {kind} {key!r} added ({now_text})"
        elif now is None:
            message = f"brick {brick!r}: {kind} {key!r} removed (was {was_text})"
        else:
            message = f"brick {brick!r}: {kind} {key!r} {_what_changed(was, now)}"
        changes.append(LockChange(stage, "brick", brick, brick, f"{kind} {key!r}", was_text, now_text, message))
    return changes


def _describe(entry: TensorLock | ValueLock | str | None) -> str | None:
    return entry if entry is None or isinstance(entry, str) else entry.describe()


def _what_changed(was: TensorLock | ValueLock | str, now: TensorLock | ValueLock | str) -> str:
    """"shape [3, 8] -> [5, 8]", "dtype float32 -> float16", ... (only the aspects that changed)."""
    if isinstance(was, str) or isinstance(now, str) or type(was) is not type(now) or (
            isinstance(was, ValueLock) and isinstance(now, ValueLock) and was.type != now.type):
        return f"{_describe(was)} -> {_describe(now)}"
    parts = []
    if was.shape != now.shape:
        parts.append(f"shape {show_shape(was.shape)} -> {show_shape(now.shape)}")
    if was.dtype != now.dtype:
        parts.append(f"dtype {was.dtype} -> {now.dtype}")
    if isinstance(was, TensorLock) and isinstance(now, TensorLock) and was.requires_grad != now.requires_grad:
        parts.append("now frozen (requires_grad=False)" if now.requires_grad is False else "now trained")
    return "; ".join(parts)


# --------------------------------------------------------------------------------------------- values
def _diff_values(stage: str, before: Mapping[str, ValueLock], after: Mapping[str, ValueLock],
                 producers: Mapping[str, str], old_producers: Mapping[str, str]) -> list[LockChange]:
    """Values and the items inside them (``out['scores'][0]``), each compared without its items, so that a
    changed item is reported where it is, once; the items of an added or removed value are not listed."""
    before_leaves, after_leaves = _leaves(before), _leaves(after)
    changes = []
    for (value, path) in dict.fromkeys([*before_leaves, *after_leaves]):
        was, now = before_leaves.get((value, path)), after_leaves.get((value, path))
        if was == now or ((was is None or now is None) and _inside_added_or_removed(value, path, before_leaves,
                                                                                    after_leaves)):
            continue
        brick = producers.get(value) or old_producers.get(value)
        name = value + path
        label = f"value {value!r}{path}" + _from(brick)
        if was is None or now is None:
            what, shown = ("added", now) if was is None else ("removed", was)
            message = f"{label} {what} ({shown.describe() if shown else ''})"
        else:
            what = _value_aspect(was, now)
            message = f"{label}: {_what_changed(was, now)}"
        changes.append(LockChange(stage, "value", name, brick, what, was.describe() if was else None,
                                  now.describe() if now else None, message))
    return changes


def _leaves(values: Mapping[str, ValueLock]) -> dict[tuple[str, str], ValueLock]:
    return {(name, path): leaf for name, value in values.items() for path, leaf in value.leaves()}


def _inside_added_or_removed(value: str, path: str, before: Mapping[tuple[str, str], ValueLock],
                             after: Mapping[tuple[str, str], ValueLock]) -> bool:
    """Whether an item's container (``out`` of ``out['a']``) is itself added or removed."""
    return any(name == value and path.startswith(f"{outer}[") and ((name, outer) in before) != ((name, outer) in after)
               for name, outer in {*before, *after})


def _value_aspect(was: ValueLock, now: ValueLock) -> str:
    if was.type != now.type:
        return "type"
    if was.shape == now.shape:
        return "dtype"
    return "shape" if was.dtype == now.dtype else "shape and dtype"


# --------------------------------------------------------------------------------------------- ONNX
def _diff_onnx(before: OnnxLock | None, after: OnnxLock | None) -> list[LockChange]:
    if before is None and after is None:
        return []
    if before is None or after is None:
        what = "added" if before is None else "removed"
        return [LockChange(EXPORT, "onnx", "operators", None, what, None, None,
                           f"ONNX operator histogram {what} (lock with/without --onnx-ops)")]
    if before.not_exported or after.not_exported:  # no histogram on one side: its operators are not news
        return _diff_not_exported(before, after)
    changes = []
    if before.opset != after.opset:
        changes.append(LockChange(EXPORT, "onnx", "opset", None, "opset", str(before.opset), str(after.opset),
                                  f"ONNX opset {before.opset} -> {after.opset}"))
    for op in sorted({*before.operators, *after.operators}):
        was, now = before.operators.get(op, 0), after.operators.get(op, 0)
        if was != now:
            changes.append(LockChange(EXPORT, "onnx", op, None, "count", str(was), str(now),
                                      f"ONNX operator {op!r}: {was} -> {now} node(s)"))
    if changes and before.exporter != after.exporter:
        changes.append(LockChange(EXPORT, "onnx", "exporter", None, "versions", _show(before.exporter),
                                  _show(after.exporter), f"(exporter versions {_show(before.exporter)} -> "
                                                         f"{_show(after.exporter)})"))
    return changes


def _diff_not_exported(before: OnnxLock, after: OnnxLock) -> list[LockChange]:
    return _diff_reason(LockChange(EXPORT, "onnx", "export", None, "not_exported", before.not_exported,
                                   after.not_exported, ""),
                        "the ONNX export works again", "no ONNX operator histogram")


# --------------------------------------------------------------------------------------------- helpers
def _compared(lock: Lock) -> dict[str, Any]:
    data = lock.to_data()
    data.get("onnx_export", {}).pop("exporter", None)
    return data


def _show(value: Any) -> str:
    if isinstance(value, Mapping):  # unordered: {"b": "x", "a": "y"} binds the same keywords as its reverse
        return str(dict(sorted(value.items())))
    if isinstance(value, tuple):
        return str(list(value))
    return str(value)


def _arrow(names: Iterable[str]) -> str:
    return " -> ".join(names) or "(nothing)"
