"""Facts from what a guest prints: dmesg, sysfs, ``/proc/cpuinfo``, ``/proc/meminfo``, CPUID and MSRs.

Everything here is pure text → data, unit-tested on output captured from real guests
(``tests/data/guestfacts/``).  Scenarios run :data:`PARAVIRT_PROBE` in a guest (plain
POSIX sh + coreutils: a Debian minbase has them) and hand its stdout to
:func:`parse_paravirt`.

Where each paravirt fact comes from, and why:

* **Offered** (what the hypervisor advertises): KVM's CPUID leaf ``0x40000001`` EAX,
  read inside the guest through ``/dev/cpu/0/cpuid`` (the ``cpuid`` module).  A ``-cpu
  ...,-kvm-pv-eoi`` flag clears the bit here first.
* **Used** (what the guest kernel actually switched on): a feature can be offered and
  still unused (PV spinlocks with one vCPU; PV TLB flush without steal time), so "used"
  needs the kernel's own evidence:

  - PV EOI, steal time and async PF have no ``pr_info`` in Linux 6.1 (their messages
    are ``pr_debug``), but enabling them *is* a write of an enable bit to a KVM MSR
    (``MSR_KVM_PV_EOI_EN``, ``MSR_KVM_STEAL_TIME``, ``MSR_KVM_ASYNC_PF_EN``; bit 0).
    The guest reads them back per CPU through ``/dev/cpu/N/msr`` (the ``msr`` module):
    the hypervisor's register state, not a log line that could be missing.
  - PV spinlocks, PV TLB flush, PV sched yield and PV IPIs are pv-ops the kernel
    installs at boot and announces with ``kvm-guest:`` lines in dmesg; there is no
    register to read back, so those lines are the authority (and the kernel says why
    when it declines: "PV spinlocks disabled, no host support").
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from harness.errors import HarnessError


class GuestOutputError(HarnessError):
    """Guest output that does not have the shape a parser expects."""

    def __init__(self, what: str, reason: str) -> None:
        self.what, self.reason = what, reason
        super().__init__(f"guest output ({what}): {reason}")


# -- dmesg ---------------------------------------------------------------------------------

_STAMP_RE = re.compile(r"^\[\s*\d+\.\d+\]\s?")


def dmesg_lines(text: str) -> list[str]:
    """dmesg lines without their ``[    0.123456] `` timestamps."""
    return [_STAMP_RE.sub("", line.rstrip("\r")) for line in text.splitlines()]


def hypervisor(dmesg: str) -> str | None:
    """What the kernel detected: ``"KVM"``, ``"Microsoft Hyper-V"``, ``"Xen HVM"``; None on bare metal/TCG."""
    for line in dmesg_lines(dmesg):
        m = re.match(r"Hypervisor detected: (.+)$", line)
        if m:
            return m.group(1).strip()
    return None


def paravirt_kernel_on(dmesg: str) -> str | None:
    """``Booting paravirtualized kernel on X`` → X (``"bare hardware"`` when there is no hypervisor)."""
    for line in dmesg_lines(dmesg):
        m = re.match(r"Booting paravirtualized kernel on (.+)$", line)
        if m:
            return m.group(1).strip()
    return None


def switched_clocksource(dmesg: str) -> str | None:
    """The last ``clocksource: Switched to clocksource X`` (the watchdog may switch again later)."""
    found = None
    for line in dmesg_lines(dmesg):
        m = re.match(r"clocksource: Switched to clocksource (\S+)", line)
        if m:
            found = m.group(1)
    return found


def kernel_says(dmesg: str, prefix: str) -> list[str]:
    """The messages of one subsystem (``kvm-guest``), prefix removed."""
    head = f"{prefix}: "
    return [line[len(head):] for line in dmesg_lines(dmesg) if line.startswith(head)]


# -- KVM paravirt features ------------------------------------------------------------------

@dataclass(frozen=True)
class PVFeature:
    """One KVM paravirt feature: how QEMU switches it off, where the guest shows it, what it needs."""

    name: str  # our name, also the ``feature`` parameter of the scenarios
    cpu_flags: tuple[str, ...]  # QEMU -cpu properties; "-<flag>" for each switches the feature off
    cpuid_bit: int  # the bit in CPUID 0x40000001 EAX (KVM_FEATURE_*) the guest kernel keys on
    msr: int | None = None  # MSR whose bit 0 is set when the guest enabled it
    dmesg: str | None = None  # the "kvm-guest:" line printed when the guest installs it
    needs: tuple[str, ...] = ()  # other features the guest requires before it uses this one
    min_vcpus: int = 1  # the guest declines it on fewer CPUs

    @property
    def gate(self) -> str:
        """The -cpu property whose bit the guest kernel checks (the last of ``cpu_flags``)."""
        return self.cpu_flags[-1]

    @property
    def off_flags(self) -> tuple[str, ...]:
        return tuple(f"-{flag}" for flag in self.cpu_flags)


MSR_KVM_ASYNC_PF_EN = 0x4B564D02
MSR_KVM_STEAL_TIME = 0x4B564D03
MSR_KVM_PV_EOI_EN = 0x4B564D04

# The order is the report's; needs/min_vcpus follow arch/x86/kernel/kvm.c (Linux 6.1):
# pv_tlb_flush_supported() and pv_sched_yield_supported() require KVM_FEATURE_STEAL_TIME
# and more than one possible CPU; pv_ipi_supported() and PV spinlocks need > 1 CPU.
# Async PF: since Linux 5.10 the guest enables it only when KVM_FEATURE_ASYNC_PF_INT (bit 14,
# QEMU's kvm-asyncpf-int) is offered; QEMU's kvm-asyncpf clears bit 4 only, and a guest
# booted with just -kvm-asyncpf still enables async PF (seen on this machine kind:
# tests/data/guestfacts/l2-kvm-off-asyncpf-only.txt).  Switching it off takes both flags.
PV_FEATURES: tuple[PVFeature, ...] = (
    PVFeature("pv-eoi", ("kvm-pv-eoi",), 6, msr=MSR_KVM_PV_EOI_EN),
    PVFeature("pv-spinlocks", ("kvm-pv-unhalt",), 7, dmesg="PV spinlocks enabled", min_vcpus=2),
    PVFeature("steal-time", ("kvm-steal-time",), 5, msr=MSR_KVM_STEAL_TIME),
    PVFeature("async-pf", ("kvm-asyncpf", "kvm-asyncpf-int"), 14, msr=MSR_KVM_ASYNC_PF_EN),
    PVFeature("pv-tlb-flush", ("kvm-pv-tlb-flush",), 9, dmesg="KVM setup pv remote TLB flush",
              needs=("steal-time",), min_vcpus=2),
    PVFeature("pv-sched-yield", ("kvm-pv-sched-yield",), 13, dmesg="setup PV sched yield",
              needs=("steal-time",), min_vcpus=2),
    PVFeature("pv-ipi", ("kvm-pv-ipi",), 11, dmesg="setup PV IPIs", min_vcpus=2),
)
FEATURES_BY_NAME = {f.name: f for f in PV_FEATURES}

# CPUID 0x40000001 EAX bits that are not features of the list above, for the record.
KVM_CPUID_BITS = {0: "clocksource", 1: "nop-io-delay", 3: "clocksource2", 4: "async-pf", 5: "steal-time",
                  6: "pv-eoi", 7: "pv-unhalt", 9: "pv-tlb-flush", 10: "async-pf-vmexit", 11: "pv-send-ipi",
                  12: "poll-control", 13: "pv-sched-yield", 14: "async-pf-int", 15: "msi-ext-dest-id",
                  16: "hc-map-gpa-range", 17: "migration-control", 24: "clocksource-stable"}


def features_switched_off(flags: tuple[str, ...] | list[str]) -> set[str]:
    """The PV features a guest must stop using when booted with these ``-cpu`` flags.

    A feature goes when its gate goes (``-kvm-asyncpf`` alone leaves async PF on);
    ``-kvm-steal-time`` also takes PV TLB flush and PV sched yield with it (they need it).
    """
    off = {f.name for f in PV_FEATURES if f"-{f.gate}" in flags}
    changed = True
    while changed:
        changed = False
        for f in PV_FEATURES:
            if f.name not in off and any(n in off for n in f.needs):
                off.add(f.name)
                changed = True
    return off


# The guest side of the paravirt probe: one section per fact, between "@@nb <name>" lines
# (no kernel message starts with "@@nb").  The msr/cpuid modules may be built in or absent:
# their absence shows as a section saying so, never as silence.
PARAVIRT_PROBE = r"""
modprobe -q msr 2>/dev/null; modprobe -q cpuid 2>/dev/null
echo '@@nb uname'; uname -rm
echo '@@nb nproc'; nproc
echo '@@nb clocksource'; cat /sys/devices/system/clocksource/clocksource0/current_clocksource
echo '@@nb available_clocksource'; cat /sys/devices/system/clocksource/clocksource0/available_clocksource
for leaf in 40000000 40000001; do
  echo "@@nb cpuid $leaf"
  if [ -r /dev/cpu/0/cpuid ]; then
    dd if=/dev/cpu/0/cpuid bs=16 count=1 skip=$((0x$leaf)) iflag=skip_bytes status=none 2>&1 | od -An -tx4
  else echo 'unavailable: no /dev/cpu/0/cpuid'; fi
done
for cpu in /dev/cpu/[0-9]*; do
  [ -e "$cpu" ] || continue
  for reg in 4b564d02 4b564d03 4b564d04; do
    echo "@@nb msr ${cpu##*/} $reg"
    if [ -r "$cpu/msr" ]; then
      out=$(dd if="$cpu/msr" bs=8 count=1 skip=$((0x$reg)) iflag=skip_bytes status=none 2>&1 | od -An -tx8) \
        && [ -n "$out" ] && echo "$out" || echo 'unreadable'
    else echo 'unavailable: no msr device'; fi
  done
done
echo '@@nb dmesg'; dmesg
echo '@@nb end'
"""


def sections(text: str) -> dict[str, str]:
    """Split :data:`PARAVIRT_PROBE`'s output into ``{"dmesg": ..., "msr 0 4b564d02": ...}``."""
    out: dict[str, str] = {}
    name: str | None = None
    body: list[str] = []
    for line in text.splitlines():
        if line.startswith("@@nb "):
            if name is not None:
                out[name] = "\n".join(body).strip("\n")
            name, body = line[5:].strip(), []
        elif name is not None:
            body.append(line)
    if name is not None:
        out[name] = "\n".join(body).strip("\n")
    if "end" not in out:
        raise GuestOutputError("paravirt probe", "no '@@nb end' line: the probe did not finish "
                                                 f"(sections seen: {', '.join(out) or 'none'})")
    return out


def parse_cpuid(dump: str) -> tuple[int, int, int, int] | None:
    """``od -An -tx4`` of 16 bytes read from /dev/cpu/N/cpuid → (eax, ebx, ecx, edx); None if unreadable."""
    words = dump.split()
    if len(words) != 4 or not all(re.fullmatch(r"[0-9a-f]{8}", w) for w in words):
        return None
    eax, ebx, ecx, edx = (int(w, 16) for w in words)
    return eax, ebx, ecx, edx


def cpuid_signature(regs: tuple[int, int, int, int] | None) -> str | None:
    """The hypervisor signature of leaf 0x40000000 (``"KVMKVMKVM"``, ``"Microsoft Hv"``, ...)."""
    if regs is None:
        return None
    raw = b"".join(r.to_bytes(4, "little") for r in regs[1:])
    return raw.rstrip(b"\0").decode("ascii", "replace") or None


def parse_msr(dump: str) -> int | None:
    """``od -An -tx8`` of 8 bytes read from /dev/cpu/N/msr → the value; None if unreadable."""
    words = dump.split()
    if len(words) != 1 or not re.fullmatch(r"[0-9a-f]{16}", words[0]):
        return None
    return int(words[0], 16)


@dataclass(frozen=True)
class ParavirtFacts:
    """What a guest showed about its hypervisor and the paravirt paths it took."""

    hypervisor: str | None
    paravirt_kernel_on: str | None
    clocksource: str
    available_clocksources: tuple[str, ...]
    vcpus: int
    kernel: str
    cpuid_signature: str | None
    cpuid_features: tuple[str, ...]  # KVM_CPUID_BITS names set in 0x40000001 EAX
    offered: dict[str, bool]  # per PV_FEATURES name: its CPUID bit is set
    used: dict[str, bool]  # per PV_FEATURES name: the guest's own evidence says it is in use
    evidence: dict[str, str]  # per PV_FEATURES name: what the verdict rests on
    kvm_guest_messages: tuple[str, ...] = ()
    msrs: dict[str, dict[str, int | None]] = field(default_factory=dict)  # cpu -> msr hex -> value

    @property
    def pv_used(self) -> list[str]:
        return [n for n, on in self.used.items() if on]

    def as_facts(self) -> dict[str, Any]:
        """JSON data for ``nestbed_facts``."""
        return {"hypervisor": self.hypervisor, "paravirt_kernel_on": self.paravirt_kernel_on,
                "clocksource": self.clocksource, "available_clocksources": list(self.available_clocksources),
                "vcpus": self.vcpus, "kernel": self.kernel, "cpuid_signature": self.cpuid_signature,
                "cpuid_features": list(self.cpuid_features), "pv_features": self.pv_used,
                "pv_offered": [n for n, on in self.offered.items() if on], "pv_evidence": dict(self.evidence),
                "kvm_guest_messages": list(self.kvm_guest_messages)}


def parse_paravirt(text: str) -> ParavirtFacts:
    """Facts from :data:`PARAVIRT_PROBE`'s stdout."""
    s = sections(text)
    dmesg = s.get("dmesg", "")
    leaf0 = parse_cpuid(s.get("cpuid 40000000", ""))
    leaf1 = parse_cpuid(s.get("cpuid 40000001", ""))
    signature = cpuid_signature(leaf0)
    # Leaf 0x40000001 means KVM features only under KVM's signature (Hyper-V's leaf 1 is its interface id).
    eax = leaf1[0] if leaf1 is not None and signature == "KVMKVMKVM" else 0
    msrs: dict[str, dict[str, int | None]] = {}
    for key, body in s.items():
        parts = key.split()
        if parts[0] == "msr" and len(parts) == 3:
            msrs.setdefault(parts[1], {})[parts[2]] = parse_msr(body)
    try:
        vcpus = int(s.get("nproc", ""))
    except ValueError:
        raise GuestOutputError("paravirt probe", f"nproc printed {s.get('nproc')!r}") from None
    kvm_msgs = kernel_says(dmesg, "kvm-guest")
    offered, used, evidence = {}, {}, {}
    for f in PV_FEATURES:
        offered[f.name] = bool(eax >> f.cpuid_bit & 1)
        if f.msr is not None:
            reg = f"{f.msr:08x}"
            values = {cpu: regs.get(reg) for cpu, regs in msrs.items()}
            if not values or any(v is None for v in values.values()):
                used[f.name] = False
                evidence[f.name] = f"MSR {reg} unreadable on CPU(s) " \
                                   f"{','.join(c for c, v in values.items() if v is None) or '(none listed)'}"
            else:
                on = {cpu: bool(v is not None and v & 1) for cpu, v in values.items()}
                # Only a KVM guest's enable bit is its own use of the KVM feature: KVM backs
                # Hyper-V's EOI assist (hv-vapic) with the same PV EOI MSR.
                used[f.name] = all(on.values()) and signature == "KVMKVMKVM"
                evidence[f.name] = f"MSR {reg} enable bit " + \
                    ", ".join(f"cpu{c}={int(b)}" for c, b in sorted(on.items()))
                if any(on.values()) and signature != "KVMKVMKVM":
                    evidence[f.name] += f" (not a KVM guest: CPUID signature {signature!r}; the hypervisor uses the MSR)"
        else:
            assert f.dmesg is not None
            used[f.name] = f.dmesg in kvm_msgs
            if used[f.name]:
                evidence[f.name] = f"dmesg: kvm-guest: {f.dmesg}"
            else:
                why = [m for m in kvm_msgs if f.name == "pv-spinlocks" and m.startswith("PV spinlocks")]
                evidence[f.name] = f"dmesg: {why[0]}" if why else f"no 'kvm-guest: {f.dmesg}' in dmesg"
    uname = s.get("uname", "").split()
    return ParavirtFacts(
        hypervisor=hypervisor(dmesg), paravirt_kernel_on=paravirt_kernel_on(dmesg),
        clocksource=s.get("clocksource", "").strip(),
        available_clocksources=tuple(s.get("available_clocksource", "").split()),
        vcpus=vcpus, kernel=uname[0] if uname else "", cpuid_signature=signature,
        cpuid_features=tuple(name for bit, name in sorted(KVM_CPUID_BITS.items()) if eax >> bit & 1),
        offered=offered, used=used, evidence=evidence, kvm_guest_messages=tuple(kvm_msgs), msrs=msrs,
    )


# -- /proc files ----------------------------------------------------------------------------

def parse_meminfo(text: str) -> dict[str, int]:
    """``/proc/meminfo`` → field → kB (``HugePages_Total`` and friends are counts)."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        m = re.match(r"^([A-Za-z0-9_()]+):\s+(\d+)(?:\s+kB)?\s*$", line)
        if m:
            out[m.group(1)] = int(m.group(2))
        elif line.strip():
            raise GuestOutputError("/proc/meminfo", f"unexpected line {line!r}")
    if "MemTotal" not in out:
        raise GuestOutputError("/proc/meminfo", "no MemTotal line")
    return out


def parse_cpuinfo(text: str) -> list[dict[str, str]]:
    """``/proc/cpuinfo`` → one dict per processor (x86 format: ``key<TAB>: value``)."""
    cpus: list[dict[str, str]] = []
    current: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if current:
                cpus.append(current)
                current = {}
            continue
        key, sep, value = line.partition(":")
        if not sep:
            raise GuestOutputError("/proc/cpuinfo", f"line without ':' {line!r}")
        current[key.strip()] = value.strip()
    if current:
        cpus.append(current)
    if not cpus or "processor" not in cpus[0]:
        raise GuestOutputError("/proc/cpuinfo", "no 'processor' entry")
    return cpus


def cpu_flags(cpuinfo: str) -> set[str]:
    """The first processor's flags."""
    return set(parse_cpuinfo(cpuinfo)[0].get("flags", "").split())
