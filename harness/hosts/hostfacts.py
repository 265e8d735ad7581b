"""Host facts, from /proc, /sys, /dev/kvm and ``qemu --version``: standard library only.

Kept free of other nestbed imports so the very same file runs inside an L1 guest
(``python3 hostfacts.py`` prints the JSON), making L1's probe the same code as L0's.

The readers take a *root* directory (default ``/``) so that a test can point them at a
recorded tree (``proc/cpuinfo``, ``sys/module/kvm_*/parameters/nested``, ``dev/kvm``,
``etc/group``), and an *opener* and *user_gids* to stand for the user opening ``/dev/kvm``.
"""

from __future__ import annotations

import errno
import json
import os
import platform
import re
import stat
import subprocess
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

VERSION_TIMEOUT = 10.0
VENDOR_MODULES = ("kvm_intel", "kvm_amd")
NESTED_ON = ("Y", "y", "1")  # /sys/module/kvm_intel/parameters/nested says Y/N, kvm_amd's 1/0

Opener = Callable[[str, int], int]


def read_file(path: str | Path) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


def _under(root: str | Path, path: str) -> Path:
    return Path(root) / path.lstrip("/")


def cpu_facts(cpuinfo: str) -> dict[str, Any]:
    """Vendor, model and virtualization flags from /proc/cpuinfo text."""
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            if fields:
                break  # first processor only
            continue
        fields.setdefault(key.strip(), value.strip())
    flags = set(fields.get("flags", "").split())
    return {
        "vendor": fields.get("vendor_id", "unknown"),
        "model": fields.get("model name", "unknown"),
        "vmx": "vmx" in flags,
        "svm": "svm" in flags,
        "hypervisor": "hypervisor" in flags,
        "cpus": cpuinfo.count("processor\t:") or os.cpu_count(),
    }


def kvm_modules(sys_module: Path | None = None, *, root: str | Path = "/") -> list[str]:
    """Loaded KVM modules (``/sys/module`` also lists built-in ones; /proc/modules may be absent)."""
    base = sys_module if sys_module is not None else _under(root, "/sys/module")
    try:
        return sorted(p.name for p in base.iterdir() if p.name.startswith("kvm"))
    except OSError:
        return []


def kvm_nested(modules: Collection[str], *, root: str | Path = "/") -> dict[str, str | None]:
    """The ``nested`` parameter of each loaded vendor module (None: unreadable)."""
    return {m: read_file(_under(root, f"/sys/module/{m}/parameters/nested")) for m in VENDOR_MODULES if m in modules}


def nested_capable(nested: dict[str, str | None]) -> bool:
    """Whether the KVM module lets its guests run KVM of their own (nested=Y on Intel, 1 on AMD)."""
    return any(v in NESTED_ON for v in nested.values())


def _group_name(gid: int, root: str | Path) -> str:
    if Path(root).resolve() == Path("/"):
        try:
            import grp

            return grp.getgrgid(gid).gr_name
        except (ImportError, KeyError):
            return str(gid)
    for line in (read_file(_under(root, "/etc/group")) or "").splitlines():
        fields = line.split(":")
        if len(fields) >= 3 and fields[2] == str(gid):
            return fields[0]
    return str(gid)


def kvm_device(root: str | Path = "/", *, opener: Opener = os.open,
               user_gids: Collection[int] | None = None) -> dict[str, Any]:
    """Whether ``/dev/kvm`` exists and opens read-write for this user; its mode and group, and
    whether this user is in that group (``in_group``), for saying what to fix."""
    dev = "/dev/kvm"
    path = _under(root, dev)
    facts: dict[str, Any] = {"present": False, "openable": False, "error": f"{dev} does not exist",
                             "errno": None, "mode": None, "group": None, "in_group": None}
    try:
        st = os.stat(path)
    except OSError:
        return facts
    gids = set(user_gids) if user_gids is not None else {*os.getgroups(), os.getegid()}
    facts.update(present=True, mode=f"{stat.S_IMODE(st.st_mode):04o}", group=_group_name(st.st_gid, root),
                 in_group=st.st_gid in gids)
    try:
        fd = opener(str(path), os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        facts.update(error=f"{dev}: {exc.strerror}", errno=errno.errorcode.get(exc.errno or 0))
        return facts
    os.close(fd)
    facts.update(openable=True, error=None)
    return facts


def qemu_version(binary: str = "qemu-system-x86_64") -> str | None:
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True,
                             timeout=VERSION_TIMEOUT, stdin=subprocess.DEVNULL).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = re.search(r"version (\S+)", out)
    return m.group(1) if m else None


def host_facts(root: str | Path = "/", *, opener: Opener = os.open, user_gids: Collection[int] | None = None,
               qemu: bool = True) -> dict[str, Any]:
    """Everything the probe decides from.  *root* and the rest: see the module docstring; with
    ``qemu=False`` the QEMU versions are not asked (None)."""
    modules = kvm_modules(root=root)
    nested = kvm_nested(modules, root=root)
    return {
        "hostname": platform.node(),
        "kernel": platform.release(),
        "machine": platform.machine(),
        "boot_id": read_file(_under(root, "/proc/sys/kernel/random/boot_id")),
        "cpu": cpu_facts(read_file(_under(root, "/proc/cpuinfo")) or ""),
        "kvm": {**kvm_device(root, opener=opener, user_gids=user_gids), "modules": modules, "nested": nested,
                "nested_capable": nested_capable(nested)},
        "qemu": {arch: qemu_version(f"qemu-system-{arch}") if qemu else None for arch in ("x86_64", "i386")},
    }


if __name__ == "__main__":
    print(json.dumps(host_facts()))
