"""Image recipes: one TOML file per image, validated strictly.

Unknown keys, wrong types and bad values raise :class:`RecipeError` naming the file,
the key and the reason.  A recipe is frozen data; building is :mod:`harness.images.store`.

Where recipes come from, first match wins: the directories in ``$NESTBED_IMAGES``
(colon-separated), then those a pytest project names in its ini option ``nestbed_images``
(:func:`add_recipe_dirs`), then the built-in ones (``images/`` of the checkout, or bundled
in the installed package).  Relative directories resolve against the project root (pytest's
rootdir, else the working directory).  A user's recipe with a built-in name wins, with a
warning.  ``base = "NAME"`` starts a recipe from another one's settings: its own keys
override, and ``packages``, ``services`` and ``files`` add to the base's.
"""

from __future__ import annotations

import enum
import hashlib
import json
import os
import re
import tomllib
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from harness.core import paths
from harness.errors import RecipeError, UsageError
from harness.vm.spec import Arch

MAX_BASE_DEPTH = 8


class Kind(enum.StrEnum):
    TINY = "tiny"  # Debian kernel + busybox initramfs, root shell on the serial console
    DEBIAN = "debian"  # mmdebstrap root filesystem on an ext4 qcow2 disk
    CLOUD = "cloud"  # a Debian "cloud image": systemd, cloud-init, sshd, GRUB on a GPT disk; no nestbed key or init
    DISK = "disk"  # a disk image the user brings (any format QEMU reads), booted by its own bootloader

    @property
    def built_here(self) -> bool:
        """Whether nestbed builds it from Debian packages (and so controls its key, init and kernel)."""
        return self is not Kind.DISK


BUILT_KINDS = tuple(k for k in Kind if k.built_here)
# The firmware a disk recipe asks for; "auto" decides from the partition table (harness/images/disk.py).
DISK_FIRMWARES = ("auto", "bios", "uefi", "uefi32")
# Disk formats QEMU reads that a disk recipe may name (default: what `qemu-img info` detects).
DISK_FORMATS = ("raw", "qcow2", "vmdk", "vpc", "vhdx", "vdi", "qed")
# NIC models QEMU 7.2 emulates that an image's drivers may need (OVF names map onto these: harness/images/ovf.py).
NIC_MODELS = ("virtio-net-pci", "e1000", "e1000e", "rtl8139", "vmxnet3", "pcnet", "ne2k_pci", "i82559er")
DRIVE_INTERFACES = ("virtio", "ide", "sata", "scsi", "lsi", "pvscsi", "megasas")


class InitMode(enum.StrEnum):
    FAST = "fast"  # nestbed's own minimal init
    SYSTEMD = "systemd"  # the distribution's init


_SIZE_RE = re.compile(r"^(\d+)([MG])$")
_PKG_RE = re.compile(r"^[a-z0-9][a-z0-9+.\-]+(:[a-z0-9]+)?(/[a-z0-9\-]+)?$")
_SUITE_RE = re.compile(r"^[a-z]+(-[a-z]+)?$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_USER_RE = re.compile(r"^[a-z_][a-z0-9_.\-]{0,31}$")
MAX_READY_TIMEOUT = 3600.0


@dataclass(frozen=True)
class Login:
    """How to log in to an image nestbed did not build: a user and a private key, or a password (never shown)."""

    user: str
    key: Path | None = None
    password: str = field(default="", repr=False)

    def describe(self) -> str:
        """For logs: never the password."""
        return f"{self.user} with " + (f"key {self.key}" if self.key else "a password")


# Fields only some kinds have: hashed into Recipe.digest() only when set, so images of the other kinds
# keep the digests (and cache entries) they had before these fields existed.
_IF_SET = {"digest_if_set": True}


@dataclass(frozen=True)
class Recipe:
    name: str
    file: Path
    kind: Kind
    arch: Arch
    kernel: str = ""
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
    # kind = "disk" (harness/images/disk.py, docs/own-image.md)
    path: Path | None = field(default=None, metadata=_IF_SET)  # the disk image, resolved against the recipe's directory
    sha256: str = field(default="", metadata=_IF_SET)  # checked before the first boot of each version of the file
    firmware: str = field(default="auto", metadata=_IF_SET)  # auto | bios | uefi | uefi32
    format: str = field(default="", metadata=_IF_SET)  # "": what qemu-img detects
    login: Login | None = field(default=None, metadata=_IF_SET)
    cloud_init: bool = field(default=True, metadata=_IF_SET)  # give it a NoCloud seed (harness/images/seed.py)
    user_data: str | dict[str, Any] = field(default="", metadata=_IF_SET)  # added to the seed's user-data
    disk_interface: str = field(default="virtio", metadata=_IF_SET)
    nic_model: str = field(default="virtio-net-pci", metadata=_IF_SET)

    @property
    def suites(self) -> list[str]:
        return [self.suite] + [f"{self.suite}-{s}" for s in self.extra_suites]

    def digest(self) -> str:
        """Content hash of everything that shapes the built image."""
        data = asdict(self)
        data.pop("file")
        data.pop("description")
        data.pop("ready_timeout")
        for f in fields(self):
            if f.metadata.get("digest_if_set") and getattr(self, f.name) == f.default:
                data.pop(f.name)
        blob = json.dumps(data, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


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


def _matching(pattern: re.Pattern[str], what: str) -> Check:
    def check(file: str, key: str, value: str) -> str:
        if not pattern.match(value):
            raise RecipeError(file, key, f"{value!r} is not {what}")
        return value
    return check


def _within(lo: int, hi: int) -> Check:
    def check(file: str, key: str, value: int) -> int:
        if not lo <= value <= hi:
            raise RecipeError(file, key, f"{value} is outside {lo}..{hi}")
        return value
    return check


def _seconds(file: str, key: str, value: float) -> float:
    # "not 0 < x <= max" also refuses nan; inf would make a hung boot wait forever.
    if not 0 < value <= MAX_READY_TIMEOUT:
        raise RecipeError(file, key, f"must be a number of seconds in (0, {MAX_READY_TIMEOUT:g}], not {value}")
    return float(value)


def _files(file: str, key: str, value: dict[str, Any]) -> dict[str, str]:
    for dest, content in value.items():
        if not dest.startswith("/") or dest.endswith("/") or ".." in dest.split("/"):
            raise RecipeError(file, f"{key}.{dest}", "path must be absolute without '..' and name a file")
        if not isinstance(content, str):
            raise RecipeError(file, f"{key}.{dest}", f"content must be a string, got {type(content).__name__}")
    return dict(value)


def _disk_path(file: str, key: str, value: str) -> Path:
    if not value.strip() or "\0" in value:
        raise RecipeError(file, key, f"{value!r} is not a file path")
    p = Path(value).expanduser()
    return p if p.is_absolute() else Path(file).resolve().parent / p


def _login(file: str, key: str, value: dict[str, Any]) -> Login:
    unknown = sorted(set(value) - {"user", "key", "password"})
    if unknown:
        raise RecipeError(file, f"{key}.{unknown[0]}", "unknown key (known: key, password, user)")
    for k in ("user", "key", "password"):
        if k in value and not isinstance(value[k], str):
            raise RecipeError(file, f"{key}.{k}", f"must be str, got {type(value[k]).__name__}")
    user = value.get("user")
    if user is None:
        raise RecipeError(file, f"{key}.user", "required key is missing")
    if not _USER_RE.match(user):
        raise RecipeError(file, f"{key}.user", f"{user!r} is not a user name")
    if ("key" in value) == ("password" in value):
        raise RecipeError(file, key, "give exactly one of key (a private key file) or password")
    if "password" in value:
        if not value["password"] or "\n" in value["password"]:
            raise RecipeError(file, f"{key}.password", "must be one non-empty line")  # the value is never shown
        return Login(user, password=value["password"])
    return Login(user, key=_disk_path(file, f"{key}.key", value["key"]))


def _non_string_key(data: object) -> object | None:
    """The first mapping key anywhere in *data* that is not a string (YAML allows ``0:`` or ``[a]:``), or None."""
    stack = [data]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            for k, v in item.items():
                if not isinstance(k, str):
                    return k
                stack.append(v)
        elif isinstance(item, list):
            stack.extend(item)
    return None


def _user_data(file: str, key: str, value: str | dict[str, Any]) -> str | dict[str, Any]:
    """A table (cloud-config as TOML), or text: ``#cloud-config`` YAML (a mapping) or a ``#!`` script."""
    if isinstance(value, dict):
        return value
    first = value.lstrip().split("\n", 1)[0].strip()
    if first.startswith("#!"):
        return value
    if first != "#cloud-config":
        raise RecipeError(file, key, f"text must start with '#cloud-config' (YAML) or '#!' (a script), not {first[:40]!r}; "
                                     "or write the cloud-config as a TOML table [user_data]")
    try:
        import yaml
    except ImportError:
        raise RecipeError(file, key, "#cloud-config text needs PyYAML to be checked (pip install pyyaml, or Debian's "
                                     "python3-yaml); or write it as a TOML table [user_data]") from None
    try:
        data = yaml.safe_load(value)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise RecipeError(file, key, f"not valid YAML{where}: {problem}") from None
    except (ValueError, RecursionError) as exc:  # PyYAML's own: a date like 0000-00-00, nesting too deep
        raise RecipeError(file, key, f"not valid YAML: {type(exc).__name__}: {exc}") from None
    if data is not None and not isinstance(data, dict):
        raise RecipeError(file, key, f"#cloud-config must be a mapping, got {type(data).__name__}")
    bad = _non_string_key(data)
    if bad is not None:
        raise RecipeError(file, key, f"#cloud-config keys must be strings, not {bad!r} (quote it)")
    return value


def _choice(choices: tuple[str, ...]) -> Check:
    def check(file: str, key: str, value: str) -> str:
        if value not in choices:
            raise RecipeError(file, key, f"{value!r} is not one of {', '.join(choices)}")
        return value
    return check


def _names(pattern: re.Pattern[str]) -> Check:
    return lambda file, key, value: _str_list(file, key, value, pattern)


def _one_of(cls: type[enum.StrEnum]) -> Check:
    return lambda file, key, value: _enum(file, key, value, cls)


Check = Callable[[str, str, Any], Any]  # (file, key, value) -> the parsed value; RecipeError when it is bad


@dataclass(frozen=True)
class Setting:
    """One recipe key: its TOML type, whether it must be there, how it is checked, what it means."""

    type: type | tuple[type, ...]
    check: Check
    help: str
    required: bool = False  # for the kinds that have it
    kinds: tuple[Kind, ...] = tuple(Kind)  # the recipe kinds that have this key


# Every key a recipe may have, once: the parser, the validator and `Recipe`'s fields follow this table
# (`base` is resolved before the rest: see _with_base).
SETTINGS: dict[str, Setting] = {
    "base": Setting(str, lambda f, k, v: v, "a recipe whose settings this one starts from"),
    "kind": Setting(str, _one_of(Kind), "what builds it: tiny, debian, cloud, or disk (a disk image you bring)",
                    required=True),
    "arch": Setting(str, _one_of(Arch), "x86_64 or i386", required=True),
    "kernel": Setting(str, _matching(_PKG_RE, "a valid package name"), "the kernel's Debian package", required=True,
                      kinds=BUILT_KINDS),
    "description": Setting(str, lambda f, k, v: v, "one line for `nestbed images list`"),
    "suite": Setting(str, _matching(_SUITE_RE, "a Debian suite name"), "the Debian suite (default bookworm)",
                     kinds=BUILT_KINDS),
    "extra_suites": Setting(list, _names(re.compile(r"^[a-z]+$")), "suffixes of further suites (default updates)",
                            kinds=BUILT_KINDS),
    "packages": Setting(list, _names(_PKG_RE), "more Debian packages", kinds=BUILT_KINDS),
    "init": Setting(str, _one_of(InitMode), "fast (nestbed's init) or systemd", kinds=(Kind.TINY, Kind.DEBIAN)),
    "disk_size": Setting(str, _matching(_SIZE_RE, "a size like 2G or 512M"), "the root disk's size", kinds=BUILT_KINDS),
    "memory_mb": Setting(int, _within(64, 65536), "guest memory in MiB"),
    "vcpus": Setting(int, _within(1, 64), "guest vCPUs"),
    "files": Setting(dict, _files, "absolute path -> text content, written into the image", kinds=BUILT_KINDS),
    "services": Setting(list, _names(re.compile(r"^[a-zA-Z0-9@._\-]+$")), "systemd units to enable",
                        kinds=BUILT_KINDS),
    "ready_timeout": Setting((int, float), _seconds, "seconds until the guest must be ready"),
    # kind = "disk" (docs/own-image.md)
    "path": Setting(str, _disk_path, "the disk image (relative to this recipe's directory, or absolute)",
                    required=True, kinds=(Kind.DISK,)),
    "sha256": Setting(str, _matching(_SHA256_RE, "64 lowercase hex digits"), "the disk file's SHA-256, checked",
                      kinds=(Kind.DISK,)),
    "firmware": Setting(str, _choice(DISK_FIRMWARES), "auto (from the partition table), bios, uefi or uefi32",
                        kinds=(Kind.DISK,)),
    "format": Setting(str, _choice(DISK_FORMATS), "the disk's format (default: what qemu-img detects)",
                      kinds=(Kind.DISK,)),
    "login": Setting(dict, _login, "{ user = ..., key = PATH } or { user = ..., password = ... }: SSH without cloud-init",
                     kinds=(Kind.DISK,)),
    "cloud_init": Setting(bool, lambda f, k, v: v, "attach a cloud-init NoCloud seed (default true)", kinds=(Kind.DISK,)),
    "user_data": Setting((str, dict), _user_data, "cloud-config (TOML table, or #cloud-config YAML) or a #! script "
                         "added to the seed", kinds=(Kind.DISK,)),
    "disk_interface": Setting(str, _choice(DRIVE_INTERFACES), "the disk's controller (default virtio)",
                              kinds=(Kind.DISK,)),
    "nic_model": Setting(str, _choice(NIC_MODELS), "the NIC QEMU emulates (default virtio-net-pci)", kinds=(Kind.DISK,)),
}


ADDITIVE = ("packages", "services")  # a recipe with a base adds to these (and to files)


def _load_toml(path: Path) -> dict[str, Any]:
    f = str(path)
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise RecipeError(f, "-", f"not valid TOML: {exc}") from None
    except OSError as exc:
        raise RecipeError(f, "-", f"cannot read: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise RecipeError(f, "-", f"not UTF-8 text (byte {exc.start}): {exc.reason}") from None


def _with_base(path: Path, raw: dict[str, Any], chain: tuple[Path, ...]) -> dict[str, Any]:
    """*raw* laid over its base recipe's settings (recursively)."""
    f, base = str(path), raw["base"]
    if not isinstance(base, str) or not _NAME_RE.match(base):
        raise RecipeError(f, "base", f"must be a recipe name, got {base!r}")
    if len(chain) >= MAX_BASE_DEPTH:
        raise RecipeError(f, "base", f"more than {MAX_BASE_DEPTH} bases deep")
    base_path = _find_path(base, exclude=(path, *chain))
    if base_path is None:
        raise RecipeError(f, "base", f"no recipe named {base!r} (other than this one) in {_dirs_text()}")
    parse_recipe(base_path, _chain=(*chain, path))  # the base must be valid on its own: errors name its file
    merged = _resolved(base_path, _load_toml(base_path), (*chain, path))
    for key, value in raw.items():
        if key in ADDITIVE and isinstance(value, list) and isinstance(merged.get(key), list):
            merged[key] = [*merged[key], *(v for v in value if v not in merged[key])]
        elif key == "files" and isinstance(value, dict) and isinstance(merged.get("files"), dict):
            merged["files"] = {**merged["files"], **value}
        elif key != "base":
            merged[key] = value
    if "description" not in raw:
        merged["description"] = f"based on {base}: {merged.get('description', '')}".rstrip(": ")
    return merged


def _resolved(path: Path, raw: dict[str, Any], chain: tuple[Path, ...]) -> dict[str, Any]:
    return _with_base(path, raw, chain) if "base" in raw else dict(raw)


def parse_recipe(path: Path, *, _chain: tuple[Path, ...] = ()) -> Recipe:
    f = str(path)
    raw = _load_toml(path)
    if "base" in raw:
        raw = _with_base(path, raw, _chain)
    for key in raw:
        if key not in SETTINGS:
            raise RecipeError(f, key, f"unknown key (known: {', '.join(sorted(SETTINGS))})")
    kind = Kind.TINY
    if isinstance(raw.get("kind"), str):
        kind = _enum(f, "kind", raw["kind"], Kind)
    kw: dict[str, Any] = {"name": path.stem, "file": path}
    for key, setting in SETTINGS.items():
        if key not in raw:
            if setting.required and kind in setting.kinds:
                raise RecipeError(f, key, "required key is missing" + ("" if setting.kinds == tuple(Kind)
                                                                       else f" (kind {kind.value})"))
            continue
        if kind not in setting.kinds:
            raise RecipeError(f, key, f"not a key of kind {kind.value} recipes (it is for kind "
                                      f"{', '.join(k.value for k in setting.kinds)})")
        value = raw[key]
        if isinstance(value, bool) is not (setting.type is bool) or not isinstance(value, setting.type):
            want = setting.type.__name__ if isinstance(setting.type, type) else \
                ("number" if setting.type == (int, float) else " or ".join(t.__name__ for t in setting.type))
            raise RecipeError(f, key, f"must be {want}, got {type(value).__name__} {value!r}")
        if key != "base":
            kw[key] = setting.check(f, key, value)
    if kind is Kind.DISK and not kw.get("cloud_init", True) and "login" not in kw:
        raise RecipeError(f, "login", "a disk recipe with cloud_init = false needs a login (user and key or password): "
                                      "nothing else would let nestbed in")
    return Recipe(**kw)


_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-]*$")
_added: list[tuple[Path, str]] = []
_project_root: Path | None = None
_warned: set[tuple[str, str]] = set()


def set_project_root(path: Path | None) -> None:
    """Where relative recipe directories resolve (the plugin passes pytest's rootdir)."""
    global _project_root
    _project_root = Path(path).resolve() if path else None


def add_recipe_dirs(dirs: list[str] | list[Path], origin: str, *, root: Path | None = None) -> None:
    """Add a project's recipe directories (relative ones against *root*, else the project root)."""
    for d in dirs:
        p = Path(d).expanduser()
        if not p.is_absolute():
            p = (root or _project_root or Path.cwd()) / p
        if (p, origin) not in _added:
            _added.append((p, origin))


def save_recipe_dirs() -> tuple[list[tuple[Path, str]], Path | None]:
    """The added directories and project root, for :func:`restore_recipe_dirs` (nested pytest sessions)."""
    return list(_added), _project_root


def restore_recipe_dirs(state: tuple[list[tuple[Path, str]], Path | None]) -> None:
    global _project_root
    _added[:], _project_root = state


@dataclass(frozen=True)
class RecipeDir:
    path: Path
    origin: str  # "$NESTBED_IMAGES", "ini nestbed_images (pytest.ini)", "built-in"

    @property
    def builtin(self) -> bool:
        return self.origin == "built-in"


def recipe_sources() -> list[RecipeDir]:
    """Every recipe directory in lookup order; a user's directory that is missing or unreadable is an error."""
    out: list[RecipeDir] = []
    root = _project_root or Path.cwd()
    for entry in os.environ.get("NESTBED_IMAGES", "").split(":"):
        if entry:
            p = Path(entry).expanduser()
            out.append(RecipeDir(p if p.is_absolute() else root / p, "$NESTBED_IMAGES"))
    out += [RecipeDir(p, origin) for p, origin in _added]
    for d in out:
        if not d.path.is_dir():
            raise UsageError(f"recipe directory {d.path} (from {d.origin}): "
                             f"{'is not a directory' if d.path.exists() else 'does not exist'}")
        if not os.access(d.path, os.R_OK | os.X_OK):
            raise UsageError(f"recipe directory {d.path} (from {d.origin}): cannot be read by this user")
    out.append(RecipeDir(paths.builtin_dir("images"), "built-in"))
    return out


def recipe_dirs() -> list[Path]:
    """The recipe directories in lookup order (see the module docstring)."""
    return [d.path for d in recipe_sources()]


def _dirs_text() -> str:
    return ", ".join(str(d) for d in recipe_dirs())


def _find_path(name: str, exclude: tuple[Path, ...] = ()) -> Path | None:
    """The recipe file *name* resolves to (first match wins), warning once if it shadows a built-in one."""
    hits = [(d, d.path / f"{name}.toml") for d in recipe_sources()]
    hits = [(d, p) for d, p in hits if p.is_file() and p.resolve() not in {e.resolve() for e in exclude}]
    if not hits:
        return None
    first_dir, first = hits[0]
    builtin = next((p for d, p in hits[1:] if d.builtin), None)
    if builtin is not None and not first_dir.builtin and (name, str(first)) not in _warned:
        _warned.add((name, str(first)))
        warnings.warn(f"nestbed: recipe {name!r} from {first} (from {first_dir.origin}) shadows the built-in "
                      f"{builtin}; {first} wins", UserWarning, stacklevel=3)
    return first


def all_recipes() -> dict[str, Recipe]:
    found: dict[str, Recipe] = {}
    for d in recipe_sources():
        for path in sorted(d.path.glob("*.toml")):
            if path.stem not in found:
                chosen = _find_path(path.stem)
                found[path.stem] = parse_recipe(chosen or path)
    return found


def find_recipe(name: str) -> Recipe:
    path = _find_path(name)
    if path is not None:
        return parse_recipe(path)
    known = sorted({p.stem for d in recipe_dirs() if d.is_dir() for p in d.glob("*.toml")})
    raise UsageError(f"unknown image {name!r} (known: {', '.join(known) or 'none'})")
