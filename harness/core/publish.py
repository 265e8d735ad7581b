"""Publishing cache artifacts: built once, under a lock, in a private name, renamed into place.

Every artifact in nestbed's cache (image directories, boot disks, payload disks, probe verdicts,
keys, empty state drives, extracted kernels) goes through :func:`publish`::

    publish(target, make, what="payload disk")

- if *target* exists, nothing happens (no lock is taken: a published artifact never changes);
- otherwise a file lock beside it (``.<name>.lock``) is taken, and *target* is checked again
  (another process may have built it while we waited);
- ``make(tmp)`` writes the artifact, a file or a directory, at ``tmp``: a name private to this
  process (``.<name>.<pid>-<random>.part``) in the same directory, so the rename is atomic;
- ``tmp`` is renamed onto *target*; if ``make`` raised, ``tmp`` is removed and nothing is published.

So parallel workers and processes never see each other's halves, and an interrupted build never
looks built.  Debris of builders that died (their ``.part`` names) is swept by the next builder,
which holds the lock.  Each publish appends one line to ``<cache>/publish.jsonl`` (what, path,
pid, seconds): a journal of what was built, and the evidence the cold-start race test reads.

:func:`write_atomic` is the lock-free sibling for files whose last writer may win (reports).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from harness.core import paths
from harness.errors import CacheError, HarnessError

LOCK_TIMEOUT = 3600.0  # an image build may take many minutes; a waiter waits for it
JOURNAL = "publish.jsonl"
DISCARD = object()  # returned by ``make``: this result is not to be kept (e.g. a flaky failed probe)


def part_name(target: Path) -> Path:
    """A private temporary name beside *target*."""
    return target.with_name(f".{target.name}.{os.getpid()}-{secrets.token_hex(4)}.part")


if TYPE_CHECKING:
    from filelock import FileLock


def scratch_name(tmp: Path, what: str) -> Path:
    """A second private name beside *tmp* (a builder's staging directory) that the stale sweep also finds."""
    return tmp.with_name(f"{tmp.name.removesuffix('.part')}.{what}.part")


def lock_for(target: Path) -> FileLock:
    from filelock import FileLock  # here: `python3 -S -m harness matrix` runs on the standard library alone

    return FileLock(str(target.with_name(f".{target.name}.lock")))


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def publish(target: Path, make: Callable[[Path], object], *, what: str, force: bool = False,
            exists: Callable[[Path], bool] | None = None, timeout: float = LOCK_TIMEOUT,
            error: type[HarnessError] = CacheError) -> bool:
    """Build *target* once with ``make(tmp)`` and publish it atomically; True if this call built it.

    *exists* says whether *target* is complete (default: it exists).  With *force*, an existing
    *target* is rebuilt and replaced.  A lock not acquired within *timeout* raises *error*.
    If ``make`` returns :data:`DISCARD`, whatever it wrote is removed, nothing is published and
    the call returns False.
    """
    done = exists or (lambda p: p.exists())
    if not force and done(target):
        return False
    from filelock import Timeout

    target.parent.mkdir(parents=True, exist_ok=True)
    lock = lock_for(target)
    try:
        lock.acquire(timeout=timeout)
    except Timeout:
        raise error(f"{what}: another process held the lock on {target} for {timeout:g} s") from None
    try:
        if not force and done(target):  # built by another process while we waited
            return False
        # We hold the lock, so no builder of this target runs: any .part left is a dead one's.
        for stale in target.parent.glob(f".{target.name}.*.part"):
            _remove(stale)
        tmp = part_name(target)
        started = time.monotonic()
        try:
            if make(tmp) is DISCARD:
                _remove(tmp)
                return False
            if not (tmp.exists() or tmp.is_symlink()):
                raise error(f"{what}: the builder wrote nothing at {tmp}")
            if tmp.is_dir() and target.exists():
                # A directory cannot be renamed onto an existing one: move the old one aside first.
                old = part_name(target)
                target.rename(old)
                tmp.rename(target)
                _remove(old)
            else:
                os.replace(tmp, target)
        except BaseException:
            _remove(tmp)
            raise
        _journal(what, target, time.monotonic() - started)
        return True
    finally:
        lock.release()


def write_atomic(path: Path, data: str | bytes, *, mode: int = 0o644) -> None:
    """Write *path* in one step: readers see the old file or the new one, never a half."""
    tmp = part_name(path)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def _journal(what: str, target: Path, seconds: float) -> None:
    line = json.dumps({"what": what, "path": str(target), "pid": os.getpid(), "seconds": round(seconds, 2),
                       "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}) + "\n"
    # One short O_APPEND write: lines from parallel processes never interleave.
    with contextlib.suppress(OSError):
        fd = os.open(paths.cache_root() / JOURNAL, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)


def journal() -> list[dict[str, object]]:
    """Every publish recorded in this cache, oldest first."""
    try:
        text = (paths.cache_root() / JOURNAL).read_text()
    except FileNotFoundError:
        return []
    out = []
    for row in text.splitlines():
        with contextlib.suppress(ValueError):
            out.append(json.loads(row))
    return out
