"""Bindings: how a brick's input names become call arguments, and its return value named outputs.

Every runtime (the eager collection, the ``torch.fx`` graph builder, export's one-brick wrappers, the
per-brick profiler and the seed-compatible one-brick call) calls :meth:`Binding.arguments`, so the rules
live here once.  Imports nothing heavy.
"""

from __future__ import annotations

from collections.abc import Iterable, KeysView, Mapping, Set
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from torchbricks_fx.errors import BrickGraphError, BrickOutputError

__all__ = ["STAGE_INPUT", "InputNames"]

STAGE_INPUT = "stage"
"""Reserved input name: a brick asking for it receives the current :class:`Stage`."""

InputNames = list[str] | tuple[str, ...] | dict[str, str] | Literal["all"]

T = TypeVar("T")

_NO_KWARGS: dict[str, Any] = {}  # shared and never mutated: callers only unpack it

_INPUT_FORMS = 'input_names must be a list of names, a dict {argument: value name} or "all"'


@dataclass(frozen=True)
class Binding:
    """A brick's inputs with every name resolved to a value name: ``args`` positional, ``kwargs``
    ``(argument, value name)`` pairs, or (``takes_all``) one dict of the values ``all_values``.  The value
    named ``"stage"`` is the stage itself; callers put it in ``values``."""

    args: tuple[str, ...] = ()
    kwargs: tuple[tuple[str, str], ...] = ()
    takes_all: bool = False
    all_values: tuple[str, ...] = ()

    def arguments(self, values: Mapping[str, T]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """The positional and keyword arguments read from ``values`` (tensors, or ``torch.fx`` nodes)."""
        if self.takes_all:
            return ({name: values[name] for name in self.all_values},), _NO_KWARGS
        if not self.kwargs:  # the common case, on every call of every brick: no dict built
            return tuple([values[name] for name in self.args]), _NO_KWARGS
        return tuple(values[name] for name in self.args), {argument: values[name] for argument, name in self.kwargs}

    @property
    def input_values(self) -> tuple[str, ...]:
        """Value names read (the stage constant excluded; ``"all"`` bindings read what the plan gives them)."""
        return tuple(v for v in (*self.args, *(v for _, v in self.kwargs)) if v != STAGE_INPUT)


def _refuse_unordered(names: object, what: str) -> None:
    # A set's order depends on PYTHONHASHSEED: the argument order (a - b vs b - a) would change between runs.
    if isinstance(names, Set) and not isinstance(names, KeysView):
        shown = sorted(map(str, names))
        raise BrickGraphError([f"{what} must be ordered (a list or tuple), not a {type(names).__name__} "
                               f"{shown}: the order of a set changes from run to run, and with it the argument "
                               f"order and the naming of outputs. Write a list, e.g. {shown}."])


def normalize_input_names(input_names: object) -> list[str] | dict[str, str] | str:
    """``input_names`` as given by a user, checked for its form: a list, a dict or ``"all"``."""
    if isinstance(input_names, str):
        if input_names != "all":
            raise BrickGraphError([f"{_INPUT_FORMS}, not the string {input_names!r} (did you mean "
                                   f"[{input_names!r}]?)."])
        return "all"
    if isinstance(input_names, Mapping):
        return dict(input_names)
    _refuse_unordered(input_names, "input_names")
    if isinstance(input_names, Iterable):
        return list(input_names)
    raise BrickGraphError([f"{_INPUT_FORMS}, not {input_names!r}."])


def normalize_output_names(output_names: object) -> list[str]:
    """``output_names`` as given by a user, checked to be an ordered collection of names."""
    if isinstance(output_names, str) or not isinstance(output_names, Iterable):
        raise BrickGraphError([f"output_names must be a list of names, not {output_names!r}."])
    _refuse_unordered(output_names, "output_names")
    return list(output_names)


def returns_declared_arity(result: Any, output_names: tuple[str, ...]) -> bool:
    """Whether ``result`` has one value per output name: :func:`name_outputs`'s check without the error, decided
    on Python structure alone (under Dynamo, while tracing)."""
    n_names = len(output_names)
    if n_names == 1:
        return not isinstance(result, tuple) or len(result) == 1
    return (n_names == 0 and result is None) or (isinstance(result, (tuple, list)) and len(result) == n_names)


def name_outputs(brick_name: str, result: Any, output_names: tuple[str, ...]) -> tuple[Any, ...]:
    """Checks a brick's return value against its output names and returns one value per name: a tuple is
    unpacked (a tuple of one too), anything else is one value; a brick without output names returns ``None``."""
    n_names = len(output_names)
    if n_names == 1:
        if not isinstance(result, tuple):
            return (result,)
        if len(result) == 1:
            return result
        raise BrickOutputError(f"Brick {brick_name!r} returned a tuple of {len(result)} values but declares one "
                               f"output name {list(output_names)}; give one name per returned value.")
    if n_names == 0 and result is None:
        return ()
    if not isinstance(result, (tuple, list)) or len(result) != n_names:
        got = f"a {type(result).__name__} of {len(result)} values" if isinstance(result, (tuple, list)) \
            else f"one {type(result).__name__}"
        if n_names == 0:
            raise BrickOutputError(f"Brick {brick_name!r} returned {got} but declares no output names; name what "
                                   f"it returns in output_names, or return None.")
        raise BrickOutputError(f"Brick {brick_name!r} returned {got} but declares {n_names} output names "
                               f"{list(output_names)}; return a tuple with one value per name.")
    return tuple(result)


# ------------------------------------------------------------------------------------ names edited in place
class _Watched:
    """A brick's names as its getter hands them out: an edit in place (``brick.output_names.append("x")``)
    assigns the edited names back, so that the plans holding the brick drop, as on ``brick.output_names =
    [...]``.  A fresh object per read: copies of a brick never share one."""

    _owner: Any
    _attribute: str
    _plain: type

    def _assign_back(self, edit: Any, *args: Any, **kwargs: Any) -> Any:
        result = edit(self, *args, **kwargs)
        setattr(self._owner, self._attribute, self.copy())  # type: ignore[attr-defined]
        return result

    def __reduce_ex__(self, protocol: Any) -> Any:  # pickled or copied: plain names, tied to no brick
        return self._plain, (self.copy(),)  # type: ignore[attr-defined]


class WatchedList(_Watched, list):
    _plain = list

    def __init__(self, names: Iterable[str], owner: Any, attribute: str) -> None:
        list.__init__(self, names)
        self._owner, self._attribute = owner, attribute


class WatchedDict(_Watched, dict):
    _plain = dict

    def __init__(self, names: Mapping[str, str], owner: Any, attribute: str) -> None:
        dict.__init__(self, names)
        self._owner, self._attribute = owner, attribute


def _watch(cls: type, base: type, methods: tuple[str, ...]) -> None:
    for name in methods:
        setattr(cls, name, _edit(getattr(base, name)))


def _edit(method: Any) -> Any:
    def edit(self: _Watched, *args: Any, **kwargs: Any) -> Any:
        return self._assign_back(method, *args, **kwargs)
    edit.__name__ = method.__name__
    return edit


_watch(WatchedList, list, ("append", "extend", "insert", "remove", "pop", "clear", "sort", "reverse",
                           "__setitem__", "__delitem__", "__iadd__", "__imul__"))
_watch(WatchedDict, dict, ("__setitem__", "__delitem__", "pop", "popitem", "clear", "update", "setdefault",
                           "__ior__"))
