"""Host probe: what this machine is, and which accelerator can really boot a guest.

"/dev/kvm opens" is not "KVM can boot a guest" (kvm_pvm opens, then hangs a standard
guest at the switch to long mode), so the verdict comes from booting a tiny guest
under KVM with a short deadline.  Verdicts are cached per host boot (``boot_id``) and
QEMU version.  Probes return data and never exit.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import platform
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from harness import paths
from harness.errors import HarnessError
from harness.spec import Accel, Arch

KVM_BOOT_DEADLINE = 15.0  # a tiny guest is ready in ~1 s under a working KVM
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
        "qemu": {arch.value: qemu_version(arch.qemu_binary) for arch in Arch},
    }


def _kvm_boots(arch: Arch) -> tuple[bool, str]:
    """Boot tiny-<arch> under KVM; (worked, what happened)."""
    from harness.guest import BootOptions, boot

    started = time.monotonic()
    try:
        # No QMP: its asyncio loop is per thread, and the probe boots both arches at once.
        with boot(f"tiny-{arch.value}", options=BootOptions(accel=Accel.KVM, ready_timeout=KVM_BOOT_DEADLINE),
                  qmp=False) as g:
            out = g.check_output("uname -m", timeout=KVM_BOOT_DEADLINE)
        return True, f"a tiny {arch.value} guest booted under KVM in {time.monotonic() - started:.1f} s ({out})"
    except HarnessError as exc:
        detail = str(exc).splitlines()[0].removeprefix("level 1: ")
        if not getattr(exc, "serial_tail", "x").strip():
            detail += "; the guest printed nothing"
        stderr = getattr(exc, "stderr_tail", "")
        fatal = [ln for ln in stderr.splitlines() if "warning" not in ln]
        if fatal:
            detail += f" (QEMU: {fatal[0].strip()})"
        return False, detail


def decide(facts: dict[str, Any], boot_results: dict[str, tuple[bool, str]]) -> dict[str, dict[str, str]]:
    """The per-arch verdict from host facts and KVM boot attempts.  Pure."""
    kvm = facts["kvm"]
    mods = ", ".join(kvm["modules"]) or "none loaded"
    out = {}
    for arch in Arch:
        if not kvm["openable"]:
            out[arch.value] = {"chosen": "tcg", "reason": f"KVM unusable: {kvm['error']}"}
            continue
        ok, detail = boot_results.get(arch.value, (False, "not tried"))
        if ok:
            out[arch.value] = {"chosen": "kvm", "reason": detail}
        else:
            out[arch.value] = {"chosen": "tcg",
                               "reason": f"/dev/kvm opens (modules: {mods}) but a standard "
                                         f"{arch.value} guest does not boot under it: {detail}"}
    return out


def _cache_path() -> Path:
    """Keyed by host boot and by the installed QEMU binaries (an upgrade re-probes)."""
    key = [_read("/proc/sys/kernel/random/boot_id") or "noboot"]
    for arch in Arch:
        exe = shutil.which(arch.qemu_binary)
        st = os.stat(exe) if exe else None
        key.append(f"{st.st_size}.{int(st.st_mtime)}" if st else "none")
    return paths.cache_root() / f"probe-{'-'.join(key)}.json"


def probe(*, refresh: bool = False) -> dict[str, Any]:
    """Host facts plus ``accel``: arch → {"chosen", "reason"}.  Cached per host boot."""
    cache = _cache_path()
    if not refresh and cache.is_file():
        try:
            cached: dict[str, Any] = json.loads(cache.read_text())
            return cached
        except ValueError:
            pass
    facts = host_facts()
    boots: dict[str, tuple[bool, str]] = {}
    if facts["kvm"]["openable"]:
        from harness import images

        for arch in Arch:
            images.build(f"tiny-{arch.value}")
        with concurrent.futures.ThreadPoolExecutor(len(Arch)) as pool:
            futures = {arch.value: pool.submit(_kvm_boots, arch) for arch in Arch}
            boots = {a: f.result() for a, f in futures.items()}
    result = {**facts, "accel": decide(facts, boots),
              "probed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    tmp = cache.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2))
    tmp.rename(cache)
    return result


def accel_verdict(arch: Arch) -> dict[str, str]:
    verdict: dict[str, str] = probe()["accel"][arch.value]
    return verdict
