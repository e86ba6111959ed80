"""The stage graph run as plain Python: :class:`PlainGraph` calls each brick's ``forward`` directly while that
is all calling the brick would do, and :func:`code_copy` gives a GraphModule code of its own."""

from __future__ import annotations

import itertools
import operator
from typing import Any

import torch
import torch.fx
from torch import nn
from torch.nn.modules.module import (
    _global_backward_hooks,
    _global_backward_pre_hooks,
    _global_forward_hooks,
    _global_forward_pre_hooks,
)

__all__ = ["PlainGraph", "code_copy"]

# On every call: one lookup less each.
_is_compiling = torch.compiler.is_compiling
_jit_tracing = torch._C._get_tracing_state
_compiled_call = operator.attrgetter("_compiled_call_impl")  # what Module.compile() sets
_FORWARD = itertools.repeat("forward")


def code_copy(graph_module: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A GraphModule sharing ``graph_module``'s graph and modules with code of its own (so its own Dynamo
    cache, or its own attributes); the graph keeps ``graph_module`` as its owner (``graph.lint()``)."""
    copy = torch.fx.GraphModule(graph_module, graph_module.graph)
    graph_module.graph.owning_module = graph_module
    copy.training = graph_module.training
    return copy


class PlainGraph:
    """The graph run as plain Python, calling each brick's ``forward`` directly while that is all calling the
    brick would do: ``nn.Module.__call__`` costs ~1.8 us per call on this CPU, a third of a small brick.  The
    check runs on every call, so hooks registered at any time (the brick's or global), ``Module.compile``,
    a ``forward`` replaced on the instance, ``torch.jit`` tracing and ``torch.compile`` of the stage all get
    the ordinary calls."""

    def __init__(self, graph_module: torch.fx.GraphModule) -> None:
        self.graph_module = graph_module
        self.direct = code_copy(graph_module)
        bricks = []
        for node in graph_module.graph.nodes:
            module = graph_module.get_submodule(node.target) if node.op == "call_module" else None
            if module is not None and type(module).__call__ is nn.Module.__call__ and "forward" not in vars(module):
                self.direct.__dict__[node.target] = module.forward  # found before the submodule
                bricks.append(module)
        self.bricks = tuple(bricks)
        self._brick_dicts = tuple(vars(m) for m in bricks)  # where an instance-level forward would appear
        # The hook registries themselves (registering a hook fills one; none is ever replaced), so that the
        # check on every call is a few C-level any() calls.
        self._hook_registries = (_global_forward_hooks, _global_forward_pre_hooks, _global_backward_hooks,
                                 _global_backward_pre_hooks,
                                 *(hooks for m in bricks for hooks in (m._forward_hooks, m._forward_pre_hooks,
                                                                       m._backward_hooks, m._backward_pre_hooks)))

    def run(self, *args: Any) -> Any:
        """The graph's outputs for ``args`` (positional, in input order).  A bound method, not ``__call__``:
        cheaper to call."""
        if (_is_compiling() or any(self._hook_registries) or any(map(_compiled_call, self.bricks)) or
                any(map(operator.contains, self._brick_dicts, _FORWARD)) or _jit_tracing()):
            return self.graph_module.forward(*args)
        return self.direct.forward(*args)
