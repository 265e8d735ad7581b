"""The steps image builders share: running a build program, mmdebstrap from the machine's apt sources,
naming a failed step's cause, reading what apt fetched."""

from __future__ import annotations

import glob
import re
import subprocess
import urllib.parse
from collections.abc import Callable
from pathlib import Path

from harness.core.run import run
from harness.errors import ImageBuildError
from harness.images import aptsources
from harness.images.recipes import Recipe

MMDEBSTRAP_TIMEOUT = 1800.0
Progress = Callable[[str], None]


def run_step(argv: list[str], *, timeout: float, what: str, cwd: Path | None = None,
             env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run one build step (:func:`harness.core.run.run`); a failure is an ImageBuildError naming its cause."""
    return run(argv, timeout=timeout, what=what, error=ImageBuildError, cwd=cwd, env=env, cause=failure_cause)


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
