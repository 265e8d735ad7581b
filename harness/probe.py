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
import shutil
import time
from pathlib import Path
from typing import Any

from harness import paths
from harness.errors import HarnessError
from harness.hostfacts import _read, cpu_facts, host_facts, kvm_device, kvm_modules, qemu_version
from harness.publish import publish, write_atomic
from harness.spec import Accel, Arch

__all__ = ["accel_verdict", "cache_key", "cpu_facts", "decide", "host_facts", "kvm_device", "kvm_modules", "probe",
           "qemu_version"]

PROBE_VERSION = 2  # bump when the verdict's shape or wording changes
KVM_BOOT_DEADLINE = 15.0  # a tiny guest is ready in ~1 s under a working KVM


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


def cache_key() -> str:
    """This host boot and its installed QEMU binaries (an upgrade or a reboot re-probes)."""
    key = [f"v{PROBE_VERSION}", _read("/proc/sys/kernel/random/boot_id") or "noboot"]
    for arch in Arch:
        exe = shutil.which(arch.qemu_binary)
        st = os.stat(exe) if exe else None
        key.append(f"{st.st_size}.{int(st.st_mtime)}" if st else "none")
    return "-".join(key)


def _cache_path() -> Path:
    return paths.cache_root() / f"probe-{cache_key()}.json"


def probe(*, refresh: bool = False) -> dict[str, Any]:
    """Host facts plus ``accel``: arch → {"chosen", "reason"}.  Cached per host boot."""
    cache = _cache_path()
    if not refresh and cache.is_file():
        try:
            cached: dict[str, Any] = json.loads(cache.read_text())
            return cached
        except ValueError:
            refresh = True  # unreadable (e.g. written by hand): probe again and replace it
    computed: dict[str, Any] = {}

    def make(tmp: Path) -> None:
        facts = host_facts()
        boots: dict[str, tuple[bool, str]] = {}
        if facts["kvm"]["openable"]:
            from harness import images

            for arch in Arch:
                images.build(f"tiny-{arch.value}")
            with concurrent.futures.ThreadPoolExecutor(len(Arch)) as pool:
                futures = {arch.value: pool.submit(_kvm_boots, arch) for arch in Arch}
                boots = {a: f.result() for a, f in futures.items()}
        computed.update({**facts, "accel": decide(facts, boots),
                         "probed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        write_atomic(tmp, json.dumps(computed, indent=2))

    # Parallel workers on an empty cache probe once: the others wait for the verdict and read it.
    publish(cache, make, what="probe verdict", force=refresh)
    if computed:
        return computed
    result: dict[str, Any] = json.loads(cache.read_text())
    return result

def accel_verdict(arch: Arch) -> dict[str, str]:
    verdict: dict[str, str] = probe()["accel"][arch.value]
    return verdict
