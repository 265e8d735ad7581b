"""The image builders, one per recipe kind, in one explicit table.

Each builder is ``build(recipe, work, say) -> manifest fields`` and writes the image's files into
*work*; its version is part of every image digest of its kind, so bumping it (whenever its output
changes for the same recipe) rebuilds those images.  A new kind adds a row here.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from harness.images import debian, tiny
from harness.images.recipes import Kind, Recipe
from harness.images.steps import Progress

Builder = Callable[[Recipe, Path, Progress], dict[str, Any]]

# kind -> (builder, version)
BUILDERS: dict[Kind, tuple[Builder | str, int]] = {
    Kind.TINY: (tiny.build_tiny, 1),
    Kind.DEBIAN: (debian.build_debian, 2),
    # By dotted path, imported on first use: these builders use the store's neighbours (bootdisk, the store
    # itself), which import this table.
    Kind.CLOUD: ("harness.images.cloud:build_cloud", 1),
    Kind.DISK: ("harness.images.disk:build_disk", 1),  # checks, inspects and (if it must) converts the user's file
}


def builder(kind: Kind) -> Builder:
    found = BUILDERS[kind][0]
    if isinstance(found, str):
        module, name = found.split(":")
        built: Builder = getattr(importlib.import_module(module), name)
        return built
    return found


def version(kind: Kind) -> int:
    return BUILDERS[kind][1]
