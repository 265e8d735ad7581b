"""Building and finding images in the cache.

An image lives in ``<cache>/images/<name>-<digest>/`` where the digest hashes the
recipe.  ``manifest.json`` is written last, after everything else is in place, and
the directory is published by :func:`harness.publish.publish` (a lock, a private build
directory, one rename): an interrupted or failed build never leaves anything that looks
built, and concurrent builders (pytest-xdist workers, other processes) build it once.
"""

from __future__ import annotations

import errno
import glob
import json
import re
import shutil
import subprocess
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness import aptsources, paths, tools
from harness.errors import ImageBuildError, ImageNotBuilt
from harness.progress import StepProgress
from harness.publish import publish
from harness.recipes import Kind, Recipe, all_recipes, find_recipe

BUILDER_VERSION = 1  # bump when a builder's output changes for the same recipe
MMDEBSTRAP_TIMEOUT = 1800.0
LOCK_TIMEOUT = 3600.0

Progress = Callable[[str], None]


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
            "kernel": str(self.kernel) if built else None,
            "initrd": str(self.initrd) if built and self.initrd else None,
            "disk": str(self.disk) if built and self.disk else None,
            "description": self.recipe.description,
        }


def image_for(recipe: Recipe) -> Image:
    digest = f"{recipe.digest()}{BUILDER_VERSION}{BUILDER_VERSIONS.get(recipe.kind, 0)}"
    return Image(recipe, paths.image_root() / f"{recipe.name}-{digest}")


def get_image(name: str) -> Image:
    return image_for(find_recipe(name))


def list_images() -> list[Image]:
    return [image_for(r) for r in all_recipes().values()]


def run_step(argv: list[str], *, timeout: float, what: str, cwd: Path | None = None,
             env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run one build step with a timeout; a failure is an ImageBuildError with stderr's tail."""
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=cwd,
                              env=env, stdin=subprocess.DEVNULL)
    except FileNotFoundError:
        raise ImageBuildError(f"{what}: {tools.missing(argv[0])}") from None
    except subprocess.TimeoutExpired:
        raise ImageBuildError(f"{what}: {argv[0]} did not finish within {timeout:g} s") from None
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        cause = failure_cause(proc.stdout + proc.stderr)
        raise ImageBuildError(f"{what}: {argv[0]} exited {proc.returncode}{': ' + cause if cause else ''}\n{tail}")
    return proc


# Causes a user can act on, found anywhere in a failed step's output (the last lines of
# apt's and mmdebstrap's output only say "apt-get ... failed"): they go in the headline.
FAILURE_CAUSES: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"No space left on device"), "no space left on device (is the cache's filesystem full?)"),
    (re.compile(r"Unable to locate package (\S+)"), "package {0} does not exist in the configured apt sources"),
    (re.compile(r"Package '?([^' ]+)'? has no installation candidate"), "package {0} has no installation candidate"),
]


def failure_cause(output: str) -> str:
    """A one-line cause for a failed build step's *output*, or ''."""
    found: list[str] = []
    for pattern, text in FAILURE_CAUSES:
        for m in pattern.finditer(output):
            line = text.format(*m.groups())
            if line not in found:
                found.append(line)
    return "; ".join(found)


def mmdebstrap(recipe: Recipe, target: Path, *, variant: str, include: list[str], work: Path,
               extra: list[str] | None = None) -> None:
    sources = aptsources.write_sources(work / "sources.sources", recipe.suites)
    argv = ["mmdebstrap", f"--variant={variant}", f"--architectures={recipe.arch.debian}",
            f"--include={','.join(include)}", "--skip=cleanup/apt/cache",  # no --quiet: it hides apt's causes
            *(extra or []), recipe.suite, str(target), str(sources)]
    run_step(argv, timeout=MMDEBSTRAP_TIMEOUT, what=f"mmdebstrap ({recipe.name})")


def resolved_versions(root: Path) -> dict[str, str]:
    """Package → version of every .deb apt fetched for *root*."""
    out = {}
    for deb in glob.glob(str(root / "var/cache/apt/archives/*.deb")):
        name, version, _arch = Path(deb).stem.split("_")
        out[name] = urllib.parse.unquote(version)
    return dict(sorted(out.items()))


# -- builders: a registry by recipe kind ---------------------------------------------------

Builder = Callable[[Recipe, Path, Progress], dict[str, Any]]
BUILDERS: dict[Kind, Builder] = {}


BUILDER_VERSIONS: dict[Kind, int] = {}


def builder(kind: Kind, version: int = 1) -> Callable[[Builder], Builder]:
    """Register the builder of a recipe kind; bump *version* whenever its output changes."""
    def register(fn: Builder) -> Builder:
        BUILDERS[kind] = fn
        BUILDER_VERSIONS[kind] = version
        return fn
    return register


def build(name_or_image: str | Image, *, progress: Progress | None = None, force: bool = False) -> Image:
    """Build an image unless the cache already has it; returns the built :class:`Image`."""
    image = get_image(name_or_image) if isinstance(name_or_image, str) else name_or_image
    if image.built and not force:
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
            files = BUILDERS[image.recipe.kind](image.recipe, work, say)
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


def _remove_stale(image: Image) -> None:
    """Drop earlier builds of the same image name (other recipe digests)."""
    for other in image.dir.parent.glob(f"{image.name}-*"):
        if other != image.dir and other.is_dir() and other.name[len(image.name) + 1:].isalnum():
            shutil.rmtree(other, ignore_errors=True)


# The tiny builder lives in its own module; importing it registers it.
from harness import debian as _debian  # noqa: E402,F401
from harness import tiny as _tiny  # noqa: E402,F401
