"""torchbricks 0.4.2, the peer the benchmarks compare with: an equivalent collection built from the same
modules and connections, when the package is installed (it is not a dependency: ``pip install
torchbricks==0.4.2`` to include it)."""

from __future__ import annotations

import importlib.metadata
from typing import Any

from torchbricks_fx import BrickCollection, BrickMetrics, BrickModule


def peer_status() -> tuple[bool, str]:
    """Whether torchbricks imports here, and a note saying so."""
    try:
        import torchbricks  # noqa: F401

        return True, f"installed ({importlib.metadata.version('torchbricks')})"
    except Exception as error:  # not installed, or installed but broken: skip it either way
        return False, f"not installed, skipped ({type(error).__name__})"


def peer_collection(collection: BrickCollection, stage_tags: str = "MODEL") -> Any:
    """torchbricks 0.4.2 collection with the same modules and connections: bricks alive in inference are
    tagged MODEL, the others LOSS or METRIC (not run at inference).  Raises ImportError when it is not installed and
    ValueError for bricks it cannot express."""
    from torchbricks.brick_collection import BrickCollection as PeerCollection
    from torchbricks.bricks import BrickMetrics as PeerMetrics
    from torchbricks.bricks import BrickModule as PeerModule

    from torchbricks_fx import Stage

    def convert(members: BrickCollection) -> dict[str, Any]:
        converted: dict[str, Any] = {}
        for key, member in members.items():
            if isinstance(member, BrickCollection):
                converted[key] = convert(member)
                continue
            if member.input_names == "all" or not isinstance(member, (BrickModule, BrickMetrics)):
                raise ValueError(f"brick {key!r} ({type(member).__name__}) has no torchbricks 0.4.2 equivalent")
            if isinstance(member, BrickMetrics):
                if Stage.INFERENCE in member.alive_stages or not len(member.metrics):
                    raise ValueError(f"metric brick {key!r} is alive at inference or in no stage")
                metrics = next(iter(member.metrics.values()))
                converted[key] = PeerMetrics(metrics, input_names=member.input_names, tags="METRIC",
                                             return_metrics=member.return_metrics)
                continue
            trainable = any(p.requires_grad for p in member.model.parameters()) or not list(member.parameters())
            tags = stage_tags if Stage.INFERENCE in member.alive_stages else "LOSS"
            # BrickModule(trainable=...) calls requires_grad_ on the shared model: keep each model as it is.
            converted[key] = PeerModule(member.model, input_names=member.input_names,
                                        output_names=list(member.output_names), tags=tags, trainable=trainable)
        return converted

    return PeerCollection(convert(collection))
