"""Where nestbed keeps things: the cache (images, probe verdicts), run and log directories.

The cache root is ``--cache-dir`` / ``$NESTBED_CACHE`` / ``$XDG_CACHE_HOME/nestbed`` /
``~/.cache/nestbed``, in that order.  Run directories are 0700: they hold sockets,
pidfiles and keys.
"""

from __future__ import annotations

import os
import secrets
import time
from pathlib import Path

_override: Path | None = None
PACKAGE_DIR = Path(__file__).resolve().parent.parent  # harness/


def builtin_dir(name: str) -> Path:
    """The built-in ``images`` or ``scenarios`` directory.

    Installed from a wheel they live inside the package (``harness/builtin/<name>``, mapped from the
    repository's folders by pyproject.toml); in a checkout (or an editable install) they are the
    checkout's own ``<name>/``.
    """
    packaged = PACKAGE_DIR / "builtin" / name
    return packaged if packaged.is_dir() else PACKAGE_DIR.parent / name


def set_cache_dir(path: Path | str | None) -> None:
    """Override the cache root for this process (the CLI's and plugin's ``--cache-dir``)."""
    global _override
    _override = Path(path).expanduser().resolve() if path else None


def cache_root() -> Path:
    if _override is not None:
        root = _override
    elif os.environ.get("NESTBED_CACHE"):
        root = Path(os.environ["NESTBED_CACHE"]).expanduser()
    else:
        base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        root = Path(base) / "nestbed"
    return private_dir(root)


def safe_name(text: str) -> str:
    """*text* as one file name: letters, digits, ``-_.`` kept, everything else ``_`` (test ids, host names)."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)


def private_dir(path: Path) -> Path:
    """Create *path* (and parents) and make it 0700."""
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    return path


def run_root() -> Path:
    return private_dir(cache_root() / "run")


def new_run_dir(name: str) -> Path:
    path = run_root() / f"{name}-{os.getpid()}-{secrets.token_hex(4)}"
    path.mkdir(mode=0o700)
    return path


def log_root() -> Path:
    return private_dir(cache_root() / "logs")


def new_log_dir(name: str) -> Path:
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    path = log_root() / f"{stamp}-{name}-{secrets.token_hex(3)}"
    path.mkdir(parents=True)
    return path


def image_root() -> Path:
    return private_dir(cache_root() / "images")
