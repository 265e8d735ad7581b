"""Nested scenarios: an L2 guest under L1's KVM takes KVM's paravirtualized paths."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from harness.nested import L1Host, boot_l1
from harness.spec import Accel


@pytest.fixture(scope="module")
def l1() -> Iterator[L1Host]:
    with boot_l1(["debian-x86_64", "tiny-i386"]) as host:
        yield host


@pytest.mark.smoke
@pytest.mark.parametrize("via", ["ssh", "serial"])
def test_l2_uses_kvm_clock_and_pv_features(l1: L1Host, via: str) -> None:
    if l1.accel["x86_64"]["chosen"] != "kvm":
        pytest.skip(f"kvm-clock needs KVM in L1: {l1.accel['x86_64']['reason']}")
    with l1.inner("debian-x86_64", via=via) as g:
        assert g.accel is Accel.KVM
        assert g.check_output("cat /sys/devices/system/clocksource/clocksource0/current_clocksource") == "kvm-clock"
        dmesg = g.check_output("dmesg")
        assert "Hypervisor detected: KVM" in dmesg
        assert "Booting paravirtualized kernel on KVM" in dmesg


@pytest.mark.smoke
def test_l2_32_bit_guest_boots(l1: L1Host) -> None:
    with l1.inner("tiny-i386") as g:
        assert g.check_output("uname -m") == "i686"
