"""Building and finding images in the cache.

An image lives in ``<cache>/images/<name>-<digest>/`` where the digest hashes the
recipe (a build of another digest of the name is removed once unused for :data:`STALE_AFTER`:
a boot or a ``build`` of an image marks it used).  ``manifest.json`` is written last, after everything else is in place, and
the directory is published by :func:`harness.core.publish.publish` (a lock, a private build
directory, one rename): an interrupted or failed build never leaves anything that looks
built, and concurrent builders (pytest-xdist workers, other processes) build it once.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.core import paths
from harness.core.progress import StepProgress
from harness.core.publish import publish
from harness.errors import ImageBuildError, ImageNotBuilt
from harness.images import builders
from harness.images.recipes import Recipe, all_recipes, find_recipe
from harness.images.steps import FAILURE_CAUSES, Progress

BUILDER_VERSION = 1  # bump when a builder's output changes for the same recipe
LOCK_TIMEOUT = 3600.0
# A build of an image name is removed, when another build of that name (another recipe digest) is made, only
# once it has not been used for this long: two versions of one recipe in use at once (parallel workers, two
# projects) each keep theirs.
STALE_AFTER = 3600.0


@dataclass(frozen=True)
class Image:
    recipe: Recipe
    dir: Path

    @property
    def name(self) -> str:
        return self.recipe.name

    @property
    def manifest_path(self) -> Path:
        return self.dir / "manifest.json"

    @property
    def built(self) -> bool:
        return self.manifest_path.is_file()

    @property
    def manifest(self) -> dict[str, Any]:
        if not self.built:
            raise ImageNotBuilt(self.name)
        data: dict[str, Any] = json.loads(self.manifest_path.read_text())
        return data

    def path(self, key: str) -> Path | None:
        """An artifact path from the manifest ("kernel", "initrd", "disk", ...)."""
        rel = self.manifest.get("files", {}).get(key)
        return self.dir / rel if rel else None

    @property
    def kernel(self) -> Path:
        p = self.path("kernel")
        assert p is not None
        return p

    @property
    def initrd(self) -> Path | None:
        return self.path("initrd")

    @property
    def disk(self) -> Path | None:
        return self.path("disk")

    def describe(self) -> dict[str, Any]:
        built = self.built
        return {
            "name": self.name, "kind": self.recipe.kind.value, "arch": self.recipe.arch.value,
            "built": built, "dir": str(self.dir),
            "kernel": str(self.path("kernel")) if built and self.path("kernel") else None,  # none: kind disk
            "initrd": str(self.initrd) if built and self.initrd else None,
            "disk": str(self.disk) if built and self.disk else None,
            "description": self.recipe.description,
        }


def image_for(recipe: Recipe) -> Image:
    digest = f"{recipe.digest()}{BUILDER_VERSION}{builders.version(recipe.kind)}"
    return Image(recipe, paths.image_root() / f"{recipe.name}-{digest}")


def get_image(name: str) -> Image:
    return image_for(find_recipe(name))


def list_images() -> list[Image]:
    return [image_for(r) for r in all_recipes().values()]


def build(name_or_image: str | Image, *, progress: Progress | None = None, force: bool = False) -> Image:
    """Build an image unless the cache already has it; returns the built :class:`Image`."""
    image = get_image(name_or_image) if isinstance(name_or_image, str) else name_or_image
    if image.built and not force:
        mark_used(image)
        return image
    if progress is None:
        with StepProgress(f"image {image.name}") as bar:
            return _build_locked(image, bar, force)
    return _build_locked(image, progress, force)


def _build_locked(image: Image, say: Progress, force: bool) -> Image:
    started = time.monotonic()

    def make(work: Path) -> None:
        work.mkdir(mode=0o700)
        try:
            say(f"building {image.name} ({image.recipe.kind.value}, {image.recipe.arch.value})")
            files = builders.builder(image.recipe.kind)(image.recipe, work, say)
            manifest = {
                "name": image.name, "recipe": str(image.recipe.file), "digest": image.recipe.digest(),
                "builder_version": BUILDER_VERSION, "arch": image.recipe.arch.value,
                "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "build_seconds": round(time.monotonic() - started, 1), **files,
            }
            # The marker goes in last, and the whole directory is renamed into place in one step.
            (work / "manifest.json").write_text(json.dumps(manifest, indent=2))
        except OSError as exc:
            # The build's own I/O failed (a full or read-only cache), not a step: one clear line too.
            why = FAILURE_CAUSES[0][1] if exc.errno == errno.ENOSPC else exc.strerror
            raise ImageBuildError(f"{image.name}: {why}: {exc.filename or work}") from None

    try:
        built = publish(image.dir, make, what=f"image {image.name}", force=force,
                        exists=lambda d: (d / "manifest.json").is_file(), timeout=LOCK_TIMEOUT,
                        error=ImageBuildError)
    except OSError as exc:  # the rename itself, or the cache directory
        why = FAILURE_CAUSES[0][1] if exc.errno == errno.ENOSPC else exc.strerror
        raise ImageBuildError(f"{image.name}: {why}: {exc.filename or image.dir}") from None
    if built:
        _remove_stale(image)
        say(f"built {image.name} in {time.monotonic() - started:.1f} s: {image.dir}")
    return image


def mark_used(image: Image) -> None:
    """Record that *image* is in use now (its manifest's mtime), so another build of its name keeps it."""
    try:
        os.utime(image.manifest_path)
    except OSError:  # a read-only cache, or a build removed meanwhile: nothing to keep
        pass


def _remove_stale(image: Image) -> None:
    """Drop the other builds of *image*'s name (other recipe digests) unused for :data:`STALE_AFTER`."""
    now = time.time()
    for other in image.dir.parent.glob(f"{image.name}-*"):
        if other == image.dir or not other.is_dir() or not other.name[len(image.name) + 1:].isalnum():
            continue
        try:
            used = (other / "manifest.json").stat().st_mtime
        except FileNotFoundError:
            used = other.stat().st_mtime  # not a finished build: judged by the directory
        if now - used > STALE_AFTER:
            shutil.rmtree(other, ignore_errors=True)
