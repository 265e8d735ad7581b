"""Host facts, from /proc, /sys and ``qemu --version``: standard library only.

Kept free of other nestbed imports so the very same file runs inside an L1 guest
(``python3 hostfacts.py`` prints the JSON), making L1's probe the same code as L0's.
"""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
from pathlib import Path
from typing import Any

VERSION_TIMEOUT = 10.0


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


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


def kvm_modules(sys_module: Path = Path("/sys/module")) -> list[str]:
    """Loaded KVM modules (``/sys/module`` also lists built-in ones; /proc/modules may be absent)."""
    try:
        return sorted(p.name for p in sys_module.iterdir() if p.name.startswith("kvm"))
    except OSError:
        return []


def kvm_device() -> dict[str, Any]:
    dev = "/dev/kvm"
    if not os.path.exists(dev):
        return {"present": False, "openable": False, "error": f"{dev} does not exist"}
    try:
        fd = os.open(dev, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        return {"present": True, "openable": False, "error": f"{dev}: {exc.strerror}"}
    os.close(fd)
    return {"present": True, "openable": True, "error": None}


def qemu_version(binary: str = "qemu-system-x86_64") -> str | None:
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True,
                             timeout=VERSION_TIMEOUT, stdin=subprocess.DEVNULL).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = re.search(r"version (\S+)", out)
    return m.group(1) if m else None


def host_facts() -> dict[str, Any]:
    modules = kvm_modules()
    nested = {m: _read(f"/sys/module/{m}/parameters/nested") for m in ("kvm_intel", "kvm_amd") if m in modules}
    return {
        "hostname": platform.node(),
        "kernel": platform.release(),
        "machine": platform.machine(),
        "boot_id": _read("/proc/sys/kernel/random/boot_id"),
        "cpu": cpu_facts(_read("/proc/cpuinfo") or ""),
        "kvm": {**kvm_device(), "modules": modules, "nested": nested},
        "qemu": {arch: qemu_version(f"qemu-system-{arch}") for arch in ("x86_64", "i386")},
    }


if __name__ == "__main__":
    print(json.dumps(host_facts()))
