"""Guest-output parsers, on output captured from real guests on this project's machine kind.

The files in ``tests/data/guestfacts/`` are the stdout of :data:`harness.guestfacts.PARAVIRT_PROBE`
(and of ``cat /proc/meminfo`` / ``cat /proc/cpuinfo``) as real guests printed it:

* ``paravirt-l1-debian-*.txt``: Debian guests at level 1, under TCG on L0;
* ``paravirt-l2-*.txt``: debian-x86_64 at level 2 under L1's KVM (``-cpu host``, 2 vCPUs), with
  the ``-cpu`` flags in the name switched off, or the Hyper-V enlightenments with ``kvm=off``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from harness import guestfacts
from harness.guestfacts import PV_FEATURES, GuestOutputError, features_switched_off

DATA = Path(__file__).parent / "data" / "guestfacts"
ALL_PV = {f.name for f in PV_FEATURES}


def probe(name: str) -> guestfacts.ParavirtFacts:
    return guestfacts.parse_paravirt((DATA / f"paravirt-{name}.txt").read_text())


def test_level_2_under_kvm_uses_every_pv_feature() -> None:
    f = probe("l2-kvm-default")
    assert f.hypervisor == "KVM"
    assert f.paravirt_kernel_on == "KVM"
    assert f.cpuid_signature == "KVMKVMKVM"
    assert f.clocksource == "kvm-clock"
    assert "kvm-clock" in f.available_clocksources
    assert f.vcpus == 2 and f.kernel.endswith("-cloud-amd64")
    assert set(f.pv_used) == ALL_PV
    assert all(f.offered.values())
    assert {"clocksource2", "async-pf-int", "clocksource-stable"} <= set(f.cpuid_features)
    assert f.evidence["pv-eoi"] == "MSR 4b564d04 enable bit cpu0=1, cpu1=1"
    assert f.evidence["pv-ipi"] == "dmesg: kvm-guest: setup PV IPIs"
    facts = f.as_facts()
    assert facts["pv_features"] == [p.name for p in PV_FEATURES]  # report order
    assert "PV spinlocks enabled" in facts["kvm_guest_messages"]


def test_switching_off_eoi_steal_time_and_unhalt() -> None:
    flags = ("-kvm-pv-eoi", "-kvm-steal-time", "-kvm-pv-unhalt")
    f = probe("l2-kvm-off-pv-eoi+steal-time+pv-spinlocks")
    off = features_switched_off(flags)
    assert off == {"pv-eoi", "steal-time", "pv-spinlocks", "pv-tlb-flush", "pv-sched-yield"}
    assert set(f.pv_used) == ALL_PV - off == {"async-pf", "pv-ipi"}
    assert not f.offered["pv-eoi"] and not f.offered["steal-time"] and not f.offered["pv-spinlocks"]
    # TLB flush and sched yield are still offered: the guest declines them for lack of steal time.
    assert f.offered["pv-tlb-flush"] and f.offered["pv-sched-yield"]
    assert f.evidence["pv-spinlocks"] == "dmesg: PV spinlocks disabled, no host support"
    assert f.evidence["steal-time"] == "MSR 4b564d03 enable bit cpu0=0, cpu1=0"
    assert f.clocksource == "kvm-clock"


def test_async_pf_bit_4_alone_does_not_switch_it_off() -> None:
    f = probe("l2-kvm-off-async-pf-bit4-only")
    assert features_switched_off(("-kvm-asyncpf",)) == set()
    assert "async-pf" not in f.cpuid_features and "async-pf-int" in f.cpuid_features
    assert f.used["async-pf"] and f.offered["async-pf"]


def test_async_pf_off_with_both_flags() -> None:
    f = probe("l2-kvm-off-async-pf")
    assert features_switched_off(("-kvm-asyncpf", "-kvm-asyncpf-int")) == {"async-pf"}
    assert not f.used["async-pf"] and not f.offered["async-pf"]
    assert set(f.pv_used) == ALL_PV - {"async-pf"}


def test_hyperv_enlightenments_with_kvm_off() -> None:
    f = probe("l2-hyperv")
    assert f.hypervisor == "Microsoft Hyper-V"
    assert f.paravirt_kernel_on == "Hyper-V"
    assert f.cpuid_signature == "Microsoft Hv"
    assert f.clocksource == "hyperv_clocksource_tsc_page"
    # Leaf 0x40000001 is Hyper-V's interface id here, not KVM features.
    assert f.cpuid_features == () and f.pv_used == []
    # KVM implements Hyper-V's EOI assist with the PV EOI MSR: set, but not the guest's KVM PV EOI.
    assert f.msrs["0"]["4b564d04"] is not None and f.msrs["0"]["4b564d04"] & 1
    assert "not a KVM guest: CPUID signature 'Microsoft Hv'" in f.evidence["pv-eoi"]


@pytest.mark.parametrize(("name", "kernel"), [("l1-debian-x86_64", "-cloud-amd64"), ("l1-debian-i386", "-686")])
def test_level_1_under_tcg_has_no_hypervisor(name: str, kernel: str) -> None:
    f = probe(name)
    assert f.hypervisor is None
    assert f.paravirt_kernel_on == "bare hardware"
    assert f.cpuid_signature == "TCGTCGTCGTCG"
    # tsc, or hpet once the clocksource watchdog found TCG's TSC unstable (the x86_64 capture).
    assert f.clocksource in ("tsc", "hpet") and "kvm-clock" not in f.available_clocksources
    assert f.pv_used == [] and not any(f.offered.values())
    assert f.kernel.endswith(kernel)


def test_features_switched_off_follows_dependencies() -> None:
    assert features_switched_off(("-kvm-steal-time",)) == {"steal-time", "pv-tlb-flush", "pv-sched-yield"}
    assert features_switched_off(("-kvm-pv-tlb-flush",)) == {"pv-tlb-flush"}
    assert features_switched_off(("+svm", "kvm=off")) == set()
    for f in PV_FEATURES:
        assert f.name in features_switched_off(f.off_flags)


def test_truncated_probe_output_is_refused() -> None:
    text = (DATA / "paravirt-l1-debian-i386.txt").read_text()
    cut = text[: text.index("@@nb dmesg")]
    with pytest.raises(GuestOutputError, match="no '@@nb end' line"):
        guestfacts.parse_paravirt(cut)


def test_unreadable_msrs_count_as_not_used() -> None:
    text = (DATA / "paravirt-l2-kvm-default.txt").read_text()
    broken = text.replace(" 000000001e633041", "unreadable", 1)
    f = guestfacts.parse_paravirt(broken)
    assert not f.used["pv-eoi"]
    assert f.evidence["pv-eoi"].startswith("MSR 4b564d04 unreadable on CPU(s) 0")


@pytest.mark.parametrize(("dump", "value"), [
    (" 000000001e633041\n", 0x1E633041), ("unreadable", None), ("", None), ("0001 0002", None)])
def test_parse_msr(dump: str, value: int | None) -> None:
    assert guestfacts.parse_msr(dump) == value


def test_cpuid_signature() -> None:
    regs = guestfacts.parse_cpuid(" 40000001 4b4d564b 564b4d56 0000004d")
    assert regs is not None and guestfacts.cpuid_signature(regs) == "KVMKVMKVM"
    assert guestfacts.parse_cpuid("unavailable: no /dev/cpu/0/cpuid") is None


def test_dmesg_helpers() -> None:
    dmesg = ("[    0.000000] Hypervisor detected: KVM\n"
             "[    0.122399] kvm-guest: KVM setup pv remote TLB flush\n"
             "[    2.519500] clocksource: Switched to clocksource tsc\n"
             "[   12.000000] clocksource: Switched to clocksource kvm-clock\n")
    assert guestfacts.hypervisor(dmesg) == "KVM"
    assert guestfacts.kernel_says(dmesg, "kvm-guest") == ["KVM setup pv remote TLB flush"]
    assert guestfacts.switched_clocksource(dmesg) == "kvm-clock"
    assert guestfacts.paravirt_kernel_on(dmesg) is None


@pytest.mark.parametrize(("name", "memory_mb"), [("l1-debian-i386", 512), ("l1-debian-x86_64", 512)])
def test_meminfo(name: str, memory_mb: int) -> None:
    mem = guestfacts.parse_meminfo((DATA / f"meminfo-{name}.txt").read_text())
    assert 0.75 * memory_mb * 1024 < mem["MemTotal"] <= memory_mb * 1024
    assert mem["MemAvailable"] <= mem["MemTotal"]
    assert "HugePages_Total" in mem


def test_meminfo_refuses_garbage() -> None:
    with pytest.raises(GuestOutputError, match="/proc/meminfo"):
        guestfacts.parse_meminfo("MemTotal: lots\n")
    with pytest.raises(GuestOutputError, match="no MemTotal"):
        guestfacts.parse_meminfo("")


@pytest.mark.parametrize(("name", "flag"), [("l1-debian-i386", "pae"), ("l1-debian-x86_64", "lm")])
def test_cpuinfo(name: str, flag: str) -> None:
    text = (DATA / f"cpuinfo-{name}.txt").read_text()
    cpus = guestfacts.parse_cpuinfo(text)
    assert [c["processor"] for c in cpus] == ["0", "1"]
    assert flag in guestfacts.cpu_flags(text)
    with pytest.raises(GuestOutputError, match="processor"):
        guestfacts.parse_cpuinfo("flags\t: fpu\n")


def test_xen_hvm_guest_without_cpuid_device() -> None:
    # A busybox guest under QEMU 10's Xen HVM emulation in an L1: no cpuid/msr modules at all.
    f = probe("l2-xen-hvm-tiny")
    assert f.hypervisor == "Xen HVM"
    assert f.paravirt_kernel_on == "Xen HVM"
    assert f.clocksource == "xen"
    assert f.cpuid_signature is None and f.msrs == {}
    assert f.pv_used == []
    assert f.evidence["pv-eoi"] == "MSR 4b564d04 unreadable on CPU(s) (none listed)"
