"""Node metadata of a stage's graph, and the output arity check of its first call.

A single-output brick is one node, so a wrong tuple return is not caught by the graph itself: the first call
of a stage runs the graph through :class:`ArityCheck`, which checks every brick's return value against its
output names.  A single-output brick that returned a tuple of one (unpacked, as torchbricks does) gets a
``getitem`` node, so later calls run the graph directly.

Node metadata (``node.meta``):

* ``"torchbricks_fx.brick"``: the user's brick name of a brick node;
* ``"torchbricks_fx.outputs"``: that brick's output value names;
* ``"torchbricks_fx.value"``: the user's value name of a placeholder or ``getitem`` node.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx

from torchbricks_fx.binding import name_outputs
from torchbricks_fx.errors import BrickError
from torchbricks_fx.runtime import add_brick_note, forked_rng, preserved_state

__all__ = ["META_BRICK", "META_OUTPUTS", "META_VALUE", "ArityCheck", "check_arity", "unpack_tuples_of_one"]

META_BRICK = "torchbricks_fx.brick"
META_OUTPUTS = "torchbricks_fx.outputs"
META_VALUE = "torchbricks_fx.value"


class ArityCheck(torch.fx.Interpreter):
    """Runs the graph once, checking every brick's return value against its output names (a single-output
    brick is one node, so a wrong tuple would otherwise flow on silently).  A single-output brick that returned
    a tuple of one passes its item on, and is listed in ``tuples_of_one``."""

    def __init__(self, graph_module: torch.fx.GraphModule) -> None:
        super().__init__(graph_module)
        # torch's default rewrites the brick's error: torch.fx text appended, a KeyError made a RuntimeError.
        self.extra_traceback = False
        self.tuples_of_one: list[torch.fx.Node] = []

    def fetch_args_kwargs_from_env(self, n: torch.fx.Node) -> tuple[tuple[Any, ...], dict[str, Any]]:
        args, kwargs = super().fetch_args_kwargs_from_env(n)
        # FX hands a dict argument over read-only; the generated code builds a fresh, mutable one each call.
        return tuple(dict(a) if isinstance(a, dict) else a for a in args), kwargs

    def run_node(self, n: torch.fx.Node) -> Any:
        try:
            result = super().run_node(n)
        except Exception as error:
            if META_BRICK in n.meta and not isinstance(error, BrickError):
                add_brick_note(error, n.meta[META_BRICK])
            raise
        if META_BRICK in n.meta:
            values = name_outputs(n.meta[META_BRICK], result, n.meta[META_OUTPUTS])
            unpacked = any(user.target is operator.getitem for user in n.users)  # a seed brick's tuple
            if len(values) == 1 and isinstance(result, tuple) and n.users and not unpacked:
                self.tuples_of_one.append(n)
                return values[0]
        return result


def unpack_tuples_of_one(graph_module: torch.fx.GraphModule, nodes: Sequence[torch.fx.Node]) -> None:
    """Gives single-output bricks that return a tuple of one a ``getitem`` node, as tuple outputs have."""
    graph = graph_module.graph
    for node in nodes:
        with graph.inserting_after(node):
            item = graph.call_function(operator.getitem, (node, 0))
        item.meta[META_VALUE] = node.meta[META_OUTPUTS][0]
        node.replace_all_uses_with(item, delete_user_cb=functools.partial(operator.is_not, item))
    graph.lint()
    graph_module.recompile()


def check_arity(graph_module: torch.fx.GraphModule, args: Sequence[Any]) -> None:
    """Runs ``graph_module`` once on ``args`` (without gradients; buffers and random number generators
    restored) to check every brick's output arity, and unpacks tuples of one (before an export traces it)."""
    check = ArityCheck(graph_module)
    with preserved_state(graph_module), forked_rng(args), torch.no_grad():
        check.run(*args)
    if check.tuples_of_one:
        unpack_tuples_of_one(graph_module, check.tuples_of_one)
