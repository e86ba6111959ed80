"""``torchbricks-fx inspect``: per stage, the bricks in order, inputs, outputs, pruned bricks and problems."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any

from torchbricks_fx.cli.common import STAGES, TARGET_HELP, load_build, names, stage
from torchbricks_fx.errors import BrickGraphError

if TYPE_CHECKING:
    from torchbricks_fx.collection import BrickCollection
    from torchbricks_fx.stage import Stage


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    parser = sub.add_parser("inspect", parents=[common],
                            help="per stage: bricks in order, inputs, outputs, pruned bricks, problems")
    parser.add_argument("file", metavar="FILE", help=TARGET_HELP)
    parser.add_argument("--stage", help=f"one stage only ({STAGES}); default: every stage")
    parser.add_argument("--outputs", help="comma-separated outputs to keep (prunes what they do not need)")
    parser.add_argument("--mermaid", action="store_true", help="also print each stage's mermaid diagram")
    parser.set_defaults(run=run)


def _inspect_stage(collection: BrickCollection, stage: Stage, outputs: list[str] | None, mermaid: bool) -> list[str]:
    """Prints one stage's plan (or its problems); returns the problems."""
    from torchbricks_fx.reporting import render_plan_listing

    print(f"stage {stage.value}")
    try:
        plan = collection.plan(stage, outputs)
    except BrickGraphError as error:
        print("  problems:")
        for problem in error.problems:
            print(f"    - {problem}")
        return [str(problem) for problem in error.problems]
    print(render_plan_listing(plan))
    if mermaid:
        print("```mermaid")
        print(collection.to_mermaid(stage, outputs), end="")
        print("```")
    return []


def _input_summary(named_inputs: dict[str, Any]) -> list[str]:
    parts = []
    for name, value in named_inputs.items():
        shape = getattr(value, "shape", None)
        parts.append(f"{name} {list(shape)} {str(getattr(value, 'dtype', '')).replace('torch.', '')}".strip()
                     if shape is not None else f"{name} ({type(value).__name__})")
    return parts


def run(args: argparse.Namespace) -> int:
    from torchbricks_fx.stage import Stage

    stages = [stage(args.stage)] if args.stage else list(Stage)
    outputs = names(args.outputs)
    collection, named_inputs = load_build(args.file)
    n_bricks = len(collection.bricks())
    print(f"{args.file}: {n_bricks} brick{'' if n_bricks == 1 else 's'}; example inputs: "
          f"{', '.join(_input_summary(named_inputs)) or '(none)'}")
    problems: list[str] = []
    for each in stages:
        print()
        problems += _inspect_stage(collection, each, outputs, args.mermaid)
    if problems:
        print(f"\n{len(dict.fromkeys(problems))} validation problem(s) found.", file=sys.stderr)
        return 1
    return 0
