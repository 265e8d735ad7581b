"""Image recipes: one TOML file per image in ``images/``, validated strictly.

Unknown keys, wrong types and bad values raise :class:`RecipeError` naming the file,
the key and the reason.  A recipe is frozen data; building is :mod:`harness.images`.
"""

from __future__ import annotations

import enum
import hashlib
import json
import os
import re
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from harness.errors import RecipeError, UsageError
from harness.spec import Arch

REPO_ROOT = Path(__file__).resolve().parent.parent


class Kind(enum.StrEnum):
    TINY = "tiny"  # Debian kernel + busybox initramfs, root shell on the serial console
    DEBIAN = "debian"  # mmdebstrap root filesystem on an ext4 qcow2 disk


class InitMode(enum.StrEnum):
    FAST = "fast"  # nestbed's own minimal init
    SYSTEMD = "systemd"  # the distribution's init


_SIZE_RE = re.compile(r"^(\d+)([MG])$")
_PKG_RE = re.compile(r"^[a-z0-9][a-z0-9+.\-]+(:[a-z0-9]+)?(/[a-z0-9\-]+)?$")
_SUITE_RE = re.compile(r"^[a-z]+(-[a-z]+)?$")
MAX_READY_TIMEOUT = 3600.0


@dataclass(frozen=True)
class Recipe:
    name: str
    file: Path
    kind: Kind
    arch: Arch
    kernel: str
    description: str = ""
    suite: str = "bookworm"
    extra_suites: tuple[str, ...] = ("updates",)
    packages: tuple[str, ...] = ()
    init: InitMode = InitMode.FAST
    disk_size: str = "2G"
    memory_mb: int = 512
    vcpus: int = 1
    files: dict[str, str] = field(default_factory=dict)
    services: tuple[str, ...] = ()
    ready_timeout: float = 120.0

    @property
    def suites(self) -> list[str]:
        return [self.suite] + [f"{self.suite}-{s}" for s in self.extra_suites]

    def digest(self) -> str:
        """Content hash of everything that shapes the built image."""
        data = asdict(self)
        data.pop("file")
        data.pop("description")
        data.pop("ready_timeout")
        blob = json.dumps(data, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


# key -> (type, required)
_SCHEMA: dict[str, tuple[type | tuple[type, ...], bool]] = {
    "kind": (str, True),
    "arch": (str, True),
    "kernel": (str, True),
    "description": (str, False),
    "suite": (str, False),
    "extra_suites": (list, False),
    "packages": (list, False),
    "init": (str, False),
    "disk_size": (str, False),
    "memory_mb": (int, False),
    "vcpus": (int, False),
    "files": (dict, False),
    "services": (list, False),
    "ready_timeout": ((int, float), False),
}


def _enum(file: str, key: str, value: str, cls: type[enum.StrEnum]) -> Any:
    try:
        return cls(value)
    except ValueError:
        choices = ", ".join(m.value for m in cls)
        raise RecipeError(file, key, f"{value!r} is not one of {choices}") from None


def _str_list(file: str, key: str, value: list[Any], pattern: re.Pattern[str] | None = None) -> tuple[str, ...]:
    for item in value:
        if not isinstance(item, str):
            raise RecipeError(file, key, f"items must be strings, got {type(item).__name__} {item!r}")
        if pattern is not None and not pattern.match(item):
            raise RecipeError(file, key, f"{item!r} is not a valid name")
    return tuple(value)


def parse_recipe(path: Path) -> Recipe:
    f = str(path)
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise RecipeError(f, "-", f"not valid TOML: {exc}") from None
    except OSError as exc:
        raise RecipeError(f, "-", f"cannot read: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise RecipeError(f, "-", f"not UTF-8 text (byte {exc.start}): {exc.reason}") from None
    for key in raw:
        if key not in _SCHEMA:
            raise RecipeError(f, key, f"unknown key (known: {', '.join(sorted(_SCHEMA))})")
    for key, (typ, required) in _SCHEMA.items():
        if key not in raw:
            if required:
                raise RecipeError(f, key, "required key is missing")
            continue
        value = raw[key]
        if isinstance(value, bool) or not isinstance(value, typ):
            want = typ.__name__ if isinstance(typ, type) else "number"
            raise RecipeError(f, key, f"must be {want}, got {type(value).__name__} {value!r}")
    kw: dict[str, Any] = {"name": path.stem, "file": path}
    kw["kind"] = _enum(f, "kind", raw["kind"], Kind)
    kw["arch"] = _enum(f, "arch", raw["arch"], Arch)
    if not _PKG_RE.match(raw["kernel"]):
        raise RecipeError(f, "kernel", f"{raw['kernel']!r} is not a valid package name")
    kw["kernel"] = raw["kernel"]
    for key in ("description",):
        if key in raw:
            kw[key] = raw[key]
    if "suite" in raw:
        if not _SUITE_RE.match(raw["suite"]):
            raise RecipeError(f, "suite", f"{raw['suite']!r} is not a Debian suite name")
        kw["suite"] = raw["suite"]
    if "extra_suites" in raw:
        kw["extra_suites"] = _str_list(f, "extra_suites", raw["extra_suites"], re.compile(r"^[a-z]+$"))
    if "packages" in raw:
        kw["packages"] = _str_list(f, "packages", raw["packages"], _PKG_RE)
    if "services" in raw:
        kw["services"] = _str_list(f, "services", raw["services"], re.compile(r"^[a-zA-Z0-9@._\-]+$"))
    if "init" in raw:
        kw["init"] = _enum(f, "init", raw["init"], InitMode)
    if "disk_size" in raw:
        if not _SIZE_RE.match(raw["disk_size"]):
            raise RecipeError(f, "disk_size", f"{raw['disk_size']!r} is not a size like 2G or 512M")
        kw["disk_size"] = raw["disk_size"]
    for key, lo, hi in (("memory_mb", 64, 65536), ("vcpus", 1, 64)):
        if key in raw:
            if not lo <= raw[key] <= hi:
                raise RecipeError(f, key, f"{raw[key]} is outside {lo}..{hi}")
            kw[key] = raw[key]
    if "ready_timeout" in raw:
        # "not 0 < x <= max" also refuses nan; inf would make a hung boot wait forever.
        if not 0 < raw["ready_timeout"] <= MAX_READY_TIMEOUT:
            raise RecipeError(f, "ready_timeout", f"must be a number of seconds in (0, {MAX_READY_TIMEOUT:g}], "
                                                  f"not {raw['ready_timeout']}")
        kw["ready_timeout"] = float(raw["ready_timeout"])
    if "files" in raw:
        for dest, content in raw["files"].items():
            if not dest.startswith("/") or dest.endswith("/") or ".." in dest.split("/"):
                raise RecipeError(f, f"files.{dest}", "path must be absolute without '..' and name a file")
            if not isinstance(content, str):
                raise RecipeError(f, f"files.{dest}", f"content must be a string, got {type(content).__name__}")
        kw["files"] = dict(raw["files"])
    return Recipe(**kw)


def recipe_dirs() -> list[Path]:
    """``$NESTBED_IMAGES`` (colon-separated) first, then the repository's ``images/``."""
    extra = [Path(p) for p in os.environ.get("NESTBED_IMAGES", "").split(":") if p]
    return [*extra, REPO_ROOT / "images"]


def all_recipes() -> dict[str, Recipe]:
    found: dict[str, Recipe] = {}
    for d in recipe_dirs():
        if d.is_dir():
            for path in sorted(d.glob("*.toml")):
                found.setdefault(path.stem, parse_recipe(path))
    return found


def find_recipe(name: str) -> Recipe:
    for d in recipe_dirs():
        path = d / f"{name}.toml"
        if path.is_file():
            return parse_recipe(path)
    known = sorted({p.stem for d in recipe_dirs() if d.is_dir() for p in d.glob("*.toml")})
    raise UsageError(f"unknown image {name!r} (known: {', '.join(known) or 'none'})")
