"""PlanMember: a module whose changes invalidate the plans of the collections holding it (its *owners*).

Bricks and collections are plan members: a brick tells its owners when its connections, alive stages,
``calculate_gradients`` or module change; a nested collection tells its parents when a member is added or
removed.  Owners are held weakly, so a dropped collection stops being told.
"""

from __future__ import annotations

import weakref
from typing import Any

from torch import nn

__all__ = ["PlanMember"]


class PlanMember(nn.Module):
    """A module whose changes invalidate the plans of the collections holding it (its *owners*)."""

    def __init__(self) -> None:
        super().__init__()
        self.__dict__["_owners"] = weakref.WeakSet()

    def add_owner(self, owner: PlanMember) -> None:
        self.__dict__["_owners"].add(owner)

    def remove_owner(self, owner: PlanMember) -> None:
        self.__dict__["_owners"].discard(owner)

    def plan_changed(self) -> None:
        """Called when something that plans or bound steps depend on changed; tells every owner."""
        for owner in list(self.__dict__.get("_owners", ())):
            owner.plan_changed()

    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(name, value)
        if isinstance(value, nn.Module):
            self.plan_changed()  # e.g. ``brick.model = other``: bound steps must call the new module

    def __getstate__(self) -> dict[str, Any]:
        state = dict(super().__getstate__())
        state.pop("_owners", None)  # weak references cannot be pickled; owners register again on load
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__["_owners"] = weakref.WeakSet()
