"""Boot scenarios: 32- and 64-bit guests come up and answer over their transport.

Tiers are markers: ``smoke`` runs in ``make report``; the rest in nightly runs.
"""

from __future__ import annotations

import pytest

from harness.guest import Guest

ARCH_OF = {"tiny-x86_64": "x86_64", "tiny-i386": "i686"}


@pytest.mark.smoke
@pytest.mark.parametrize("guest", list(ARCH_OF), indirect=True)
def test_tiny_guest_boots_and_answers_over_serial(guest: Guest) -> None:
    assert guest.check_output("uname -m") == ARCH_OF[guest.image.name]
    # The kernel runs the bitness the image was built for.
    bits = "64" if guest.image.recipe.arch.value == "x86_64" else "32"
    assert guest.check_output("test -d /sys/firmware && echo ok") == "ok"
    assert guest.check_output("cat /proc/self/exe >/dev/null; od -An -tx1 -j4 -N1 /bin/busybox").strip() == (
        "02" if bits == "64" else "01")  # ELF class of the userland


@pytest.mark.smoke
@pytest.mark.parametrize("vcpus", [1, 2])
def test_vcpus_and_memory_match_the_spec(boot_guest, vcpus: int) -> None:  # type: ignore[no-untyped-def]
    g = boot_guest("tiny-x86_64", vcpus=vcpus, memory_mb=320)
    assert g.check_output("nproc") == str(vcpus)
    mem_kb = int(g.check_output("awk '/MemTotal/ {print $2}' /proc/meminfo"))
    assert 250 * 1024 < mem_kb <= 320 * 1024
