"""Boot scenarios: 32- and 64-bit guests come up and answer over serial and SSH.

Tiers are markers: ``smoke`` runs in ``make report``; the rest in nightly runs.
"""

from __future__ import annotations

import pytest

from fixtures.plugin import guest_params
from harness.guest import Guest

MACHINE = {"x86_64": ("x86_64", "64"), "i386": ("i686", "32")}


@pytest.mark.smoke
@pytest.mark.parametrize("guest", guest_params(["tiny-x86_64", "tiny-i386"]), indirect=True)
def test_tiny_guest_boots_and_answers_over_serial(guest: Guest) -> None:
    machine, bits = MACHINE[guest.image.recipe.arch.value]
    assert guest.check_output("uname -m") == machine
    # ELF class of the userland: 02 = 64-bit, 01 = 32-bit.
    assert guest.check_output("od -An -tx1 -j4 -N1 /bin/busybox").strip() == ("02" if bits == "64" else "01")


@pytest.mark.smoke
@pytest.mark.parametrize("guest", guest_params(["debian-x86_64", "debian-i386"], ["serial", "ssh"]), indirect=True)
def test_debian_guest_arch_bitness_and_spec(guest: Guest, guest_host) -> None:  # type: ignore[no-untyped-def]
    machine, bits = MACHINE[guest.image.recipe.arch.value]
    assert guest.check_output("uname -m") == machine
    assert guest.check_output("getconf LONG_BIT") == bits
    assert guest.check_output("nproc") == str(guest.machine.spec.vcpus)
    mem_kb = int(guest.check_output("awk '/MemTotal/ {print $2}' /proc/meminfo"))
    assert 0.75 * guest.machine.spec.memory_mb * 1024 < mem_kb <= guest.machine.spec.memory_mb * 1024
    assert guest_host.file("/etc/os-release").contains("bookworm")
    assert guest_host.socket("tcp://0.0.0.0:22").is_listening


@pytest.mark.smoke
@pytest.mark.parametrize("vcpus", [1, 2])
def test_vcpus_and_memory_match_the_spec(boot_guest, vcpus: int) -> None:  # type: ignore[no-untyped-def]
    g = boot_guest("tiny-x86_64", vcpus=vcpus, memory_mb=320)
    assert g.check_output("nproc") == str(vcpus)
    mem_kb = int(g.check_output("awk '/MemTotal/ {print $2}' /proc/meminfo"))
    assert 250 * 1024 < mem_kb <= 320 * 1024
