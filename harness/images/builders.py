"""The image builders, one per recipe kind, in one explicit table.

Each builder is ``build(recipe, work, say) -> manifest fields`` and writes the image's files into
*work*; its version is part of every image digest of its kind, so bumping it (whenever its output
changes for the same recipe) rebuilds those images.  A new kind adds a row here.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from harness.images import debian, tiny
from harness.images.recipes import Kind, Recipe
from harness.images.steps import Progress

Builder = Callable[[Recipe, Path, Progress], dict[str, Any]]

# kind -> (builder, version)
BUILDERS: dict[Kind, tuple[Builder, int]] = {
    Kind.TINY: (tiny.build_tiny, 1),
    Kind.DEBIAN: (debian.build_debian, 2),
}


def builder(kind: Kind) -> Builder:
    return BUILDERS[kind][0]


def version(kind: Kind) -> int:
    return BUILDERS[kind][1]
