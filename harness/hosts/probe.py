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
from collections.abc import Callable
from pathlib import Path
from typing import Any

from harness.core import paths
from harness.core.publish import publish, write_atomic
from harness.errors import HarnessError, headline
from harness.hosts.hostfacts import (
    VENDOR_MODULES,
    cpu_facts,
    host_facts,
    kvm_device,
    kvm_modules,
    nested_capable,
    qemu_version,
    read_file,
)
from harness.images import store as images
from harness.vm.spec import Accel, Arch

__all__ = ["cache_key", "cpu_facts", "decide", "emulated_svm", "host_facts", "kvm_device", "kvm_hint", "kvm_modules",
           "l1_nested", "nested_capable", "probe", "qemu_version"]

PROBE_VERSION = 3  # bump when the verdict's shape or wording changes
KVM_BOOT_DEADLINE = 15.0  # a tiny guest is ready in ~1 s under a working KVM


KvmBoot = Callable[[Arch], tuple[bool, str]]
"""Boots a standard guest of an arch under KVM; (worked, what happened).  The guest layer has one
(:func:`harness.guest.kvm_boot`): the probe decides, the caller supplies the boot."""


def emulated_svm(facts: dict[str, Any]) -> str | None:
    """Why a 32-bit KVM guest must not be tried here, or None (pure).

    A host that is itself a QEMU guest with TCG's emulated SVM (CPU model "QEMU Virtual CPU", svm and
    the hypervisor flag: an L1 on a TCG L0, nestbed run inside an L1) has a KVM that works for 64-bit
    guests, but a 32-bit guest under it makes the QEMU below abort ("invalid tss type") and takes this
    whole host down: the probe must not find that out by trying.
    """
    cpu = facts.get("cpu") or {}
    if cpu.get("svm") and cpu.get("hypervisor") and str(cpu.get("model", "")).startswith("QEMU Virtual CPU"):
        return (f"this host is a QEMU guest whose SVM is emulated by TCG (CPU {cpu['model']!r}): a 32-bit guest "
                "under its KVM makes the QEMU below abort ('invalid tss type') and this host dies with it")
    return None


def kvm_boot_detail(exc: HarnessError) -> str:
    """What a failed KVM boot showed, in one line (for the verdict's reason)."""
    detail = headline(exc).removeprefix("level 1: ")
    if not getattr(exc, "serial_tail", "x").strip():
        detail += "; the guest printed nothing"
    stderr = getattr(exc, "stderr_tail", "")
    fatal = [ln for ln in stderr.splitlines() if "warning" not in ln]
    if fatal:
        detail += f" (QEMU: {fatal[0].strip()})"
    return detail


def _vendor_module(facts: dict[str, Any]) -> str | None:
    """kvm_intel or kvm_amd: the one loaded, else the one the CPU's flags (or vendor) call for."""
    kvm, cpu = facts["kvm"], facts.get("cpu") or {}
    loaded = [m for m in VENDOR_MODULES if m in kvm.get("modules", [])]
    if loaded:
        return loaded[0]
    if cpu.get("vmx") or cpu.get("vendor") == "GenuineIntel":
        return "kvm_intel"
    if cpu.get("svm") or cpu.get("vendor") == "AuthenticAMD":
        return "kvm_amd"
    return None


def kvm_hint(facts: dict[str, Any]) -> str:
    """What to do so that this user can open /dev/kvm ("" when the facts do not say)."""
    kvm, cpu = facts["kvm"], facts.get("cpu") or {}
    group, mode = kvm.get("group") or "kvm", kvm.get("mode")
    if kvm.get("present", "does not exist" not in str(kvm.get("error"))):
        if kvm.get("errno") not in ("EACCES", "EPERM") and "Permission denied" not in str(kvm.get("error")):
            return ""
        group_rw = mode is None or int(mode, 8) & 0o060 == 0o060
        if group_rw and group not in ("root", "0"):
            if not kvm.get("in_group"):
                return f"not in group {group}: `sudo usermod -aG {group} $USER` and log in again"
            return (f"this user is in group {group} and /dev/kvm is mode {mode}, yet may not open it (a container's "
                    f"device rules, or SELinux/AppArmor?)")
        return (f"/dev/kvm is mode {mode}, group {group}: give it to group kvm (`sudo chgrp kvm /dev/kvm && "
                f"sudo chmod 0660 /dev/kvm`, or the distribution's udev rule), then `sudo usermod -aG kvm $USER` "
                f"and log in again")
    if cpu and not (cpu.get("vmx") or cpu.get("svm")):
        return "the CPU shows neither vmx nor svm (virtualization off in the firmware, or a VM without nested)"
    mods = kvm.get("modules", [])
    if not any(m in mods for m in VENDOR_MODULES):
        module = _vendor_module(facts)
        fix = f"`modprobe {module}`" if module else "`modprobe kvm_intel` (Intel) or `modprobe kvm_amd` (AMD)"
        return f"no KVM module loaded: {fix}"
    return (f"{', '.join(mods)} loaded but there is no /dev/kvm (in a container, pass the device in, "
            f"e.g. `--device /dev/kvm`)")


def l1_nested(facts: dict[str, Any], l0_accel: Accel) -> dict[str, str]:
    """How the L2s of an x86_64 L1 booted on this host will run, and why.

    On L0's KVM the L1 gets ``-cpu host``: vmx (Intel) or svm (AMD) passes through only where
    the vendor module's ``nested`` is on; else L1 has no KVM and its L2s run under TCG in L1.
    On L0's TCG the L1 gets ``qemu64,+svm,+npt``: TCG emulates SVM, so L1 has KVM of its own.
    """
    if l0_accel is not Accel.KVM:
        return {"l2_accel": "kvm", "reason": "L1 gets qemu64,+svm,+npt under TCG, which emulates SVM: "
                                             "L1 has KVM of its own (slow)"}
    kvm = facts["kvm"]
    nested: dict[str, str | None] = kvm.get("nested") or {}
    module = _vendor_module(facts)
    if module is None or module not in nested:
        mods = ", ".join(kvm.get("modules", [])) or "none"
        return {"l2_accel": "tcg", "reason": f"no kvm_intel or kvm_amd (modules: {mods}): an L1 gets no nested "
                                             f"KVM, so its L2s run under TCG inside L1"}
    flag = "vmx" if module == "kvm_intel" else "svm"
    if nested_capable({module: nested[module]}):
        return {"l2_accel": "kvm", "reason": f"{module} nested={nested[module]}: `-cpu host` passes {flag} "
                                             f"through, so L1 has KVM of its own"}
    if nested[module] is None:
        what = f"{module} shows no nested parameter"
    else:
        what = f"nested is off: `modprobe -r {module} && modprobe {module} nested=1`"
    return {"l2_accel": "tcg", "reason": f"{what} (until then an L1 gets no {flag} from `-cpu host`, so its "
                                         f"L2s run under TCG inside L1)"}


def decide(facts: dict[str, Any], boot_results: dict[str, tuple[bool, str]]) -> dict[str, dict[str, str]]:
    """The per-arch verdict from host facts and KVM boot attempts.  Pure.

    Where KVM is unusable the reason says what to fix (:func:`kvm_hint`); where x86_64 runs
    under KVM but an L1 would get no nested KVM, its reason says so and how to turn it on.
    """
    kvm = facts["kvm"]
    mods = ", ".join(kvm["modules"]) or "none loaded"
    out = {}
    for arch in Arch:
        if not kvm["openable"]:
            hint = kvm_hint(facts)
            out[arch.value] = {"chosen": "tcg", "reason": f"KVM unusable: {kvm['error']}" + (f"; {hint}" if hint else "")}
            continue
        ok, detail = boot_results.get(arch.value, (False, "not tried"))
        if ok:
            # An L1 is x86_64: its verdict says when the L1's L2s would not get KVM.
            l1 = l1_nested(facts, Accel.KVM) if arch is Arch.X86_64 else None
            note = f"; {l1['reason']}" if l1 and l1["l2_accel"] != "kvm" else ""
            out[arch.value] = {"chosen": "kvm", "reason": detail + note}
        else:
            out[arch.value] = {"chosen": "tcg",
                               "reason": f"/dev/kvm opens (modules: {mods}) but a standard "
                                         f"{arch.value} guest does not boot under it: {detail}"}
    return out


def cache_key() -> str:
    """This host boot and its installed QEMU binaries (an upgrade or a reboot re-probes)."""
    key = [f"v{PROBE_VERSION}", read_file("/proc/sys/kernel/random/boot_id") or "noboot"]
    for arch in Arch:
        exe = shutil.which(arch.qemu_binary)
        st = os.stat(exe) if exe else None
        key.append(f"{st.st_size}.{int(st.st_mtime)}" if st else "none")
    return "-".join(key)


def _cache_path() -> Path:
    return paths.cache_root() / f"probe-{cache_key()}.json"


def probe(*, kvm_boot: KvmBoot, refresh: bool = False) -> dict[str, Any]:
    """Host facts plus ``accel``: arch → {"chosen", "reason"}.  Cached per host boot.

    Where /dev/kvm opens, *kvm_boot* boots a tiny guest of each arch under KVM: only a boot tells.
    """
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
        hazard = emulated_svm(facts)
        arches = [a for a in Arch if not (a is Arch.I386 and hazard)]
        if facts["kvm"]["openable"]:
            for arch in arches:
                images.build(f"tiny-{arch.value}")
            with concurrent.futures.ThreadPoolExecutor(len(arches)) as pool:
                futures = {arch.value: pool.submit(kvm_boot, arch) for arch in arches}
                boots = {a: f.result() for a, f in futures.items()}
        accel = decide(facts, boots)
        if hazard and facts["kvm"]["openable"]:
            accel[Arch.I386.value] = {"chosen": "tcg", "reason": f"known failure, not tried: {hazard}"}
        computed.update({**facts, "accel": accel, "probed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        write_atomic(tmp, json.dumps(computed, indent=2))

    # Parallel workers on an empty cache probe once: the others wait for the verdict and read it.
    publish(cache, make, what="probe verdict", force=refresh)
    if computed:
        return computed
    result: dict[str, Any] = json.loads(cache.read_text())
    return result
