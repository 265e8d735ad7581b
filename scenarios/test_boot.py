"""Boot scenarios: 32- and 64-bit guests come up at level 1 and level 2, over serial and SSH,
with the architecture, userland bitness, vCPUs and memory their spec asks for.

Tiers are markers: ``smoke`` runs in ``make report``; ``nightly`` for the rest.  A Debian
i386 guest at level 2 runs under TCG inside the emulated L1 (a 32-bit guest under L1's
KVM crashes L0's QEMU 7.2: ``harness.nested.KNOWN_FAILURES``): minutes, so nightly and
``slow``, and the fallback is recorded as a fact.
"""

from __future__ import annotations

import contextlib
import datetime
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from nestbed_fixtures.plugin import GUESTS_KEY

from harness import guestfacts
from harness.errors import TransportError
from harness.guest import BootOptions, Guest, accel_verdict
from harness.nested import L1Host, boot_l1, known_failure
from harness.vm.spec import Accel, Arch

pytestmark = pytest.mark.boot

MACHINE = {"x86_64": ("x86_64", "64"), "i386": ("i686", "32")}
DEBIAN = {"x86_64": "debian-x86_64", "i386": "debian-i386"}
# A 32-bit Debian under TCG inside an L1 that is itself under TCG: boot and commands are slow.
SLOW_READY = 1200.0
SLOW_COMMAND = 300.0
# Known issue, declared (RELIABILITY.md): SSH to a 32-bit Debian L2 under TCG inside an L1 on L0's TCG gets no
# banner through the L1 (2026-12-02: 4 tries out of 4, 2x150 s each), while in that guest sshd listens, the
# network is up and `ssh 127.0.0.1` gets its banner at once and completes its key exchange in ~85 s.  Only
# that signature, only on a TCG level 0, is an xfail with the evidence; it lapses on I386_L2_SSH_UNTIL.
I386_L2_SSH = "Error reading SSH protocol banner"
I386_L2_SSH_UNTIL = "2027-03-01"
SMOKE = {("x86_64", 1, "serial"), ("i386", 1, "ssh"), ("x86_64", 2, "ssh")}


@pytest.mark.smoke
@pytest.mark.parametrize("image", [pytest.param(i, id=f"{i}-serial") for i in ("tiny-x86_64", "tiny-i386")])
def test_tiny_guest_boots_and_answers_over_serial(boot_guest, image: str) -> None:
    # Booting is what this verifies: no warm start (harness/warmstart.py) for it.
    guest = boot_guest(image, warm_start=False)
    assert not guest.warm
    machine, bits = MACHINE[guest.image.recipe.arch.value]
    assert guest.check_output("uname -m") == machine
    # ELF class of the userland: 02 = 64-bit, 01 = 32-bit.
    assert guest.check_output("od -An -tx1 -j4 -N1 /bin/busybox").strip() == ("02" if bits == "64" else "01")


@pytest.mark.smoke
@pytest.mark.parametrize("vcpus", [1, 2])
def test_vcpus_and_memory_match_the_spec(boot_guest, vcpus: int) -> None:
    g = boot_guest("tiny-x86_64", vcpus=vcpus, memory_mb=320)
    assert g.check_output("nproc") == str(vcpus)
    mem_kb = guestfacts.parse_meminfo(g.check_output("cat /proc/meminfo"))["MemTotal"]
    assert 250 * 1024 < mem_kb <= 320 * 1024


@pytest.fixture(scope="module")
def l1_with_debian_i386() -> Iterator[L1Host]:
    """An L1 carrying debian-i386 (the session-wide L1 carries only the default images)."""
    with boot_l1(["debian-i386"]) as host:
        yield host


@pytest.fixture
def level2_guest(request: pytest.FixtureRequest) -> Iterator[Callable[..., Guest]]:
    """Factory: an L2 guest of *image* in an L1 that carries it; shut down after the test."""
    record = request.node.stash.setdefault(GUESTS_KEY, [])
    with contextlib.ExitStack() as stack:
        def factory(image: str, via: str, **options: Any) -> Guest:
            if image == DEBIAN["i386"]:
                host: L1Host = request.getfixturevalue("l1_with_debian_i386")
                # boot(via="ssh") gives the SSH handshake 60 s, which a 32-bit guest under TCG inside
                # the emulated L1 did not make (measured: "failed within 60 s"); boot on serial, then
                # connect SSH with the slow timeout: the same SSH transport in the end.
                g = stack.enter_context(host.inner(image, via="serial", options=BootOptions(**options)))
                if via == "ssh":
                    g.transport = g.connect_ssh(timeout=SLOW_COMMAND)
                record.append(g)
                return g
            return request.getfixturevalue("inner_guest")(image, via=via, **options)

        yield factory


def _boot_params() -> Iterator[Any]:
    # Smoke: each arch and each transport once at level 1, and a 64-bit level 2; the rest nightly.
    # The i386 level-2 cases come last, so their own L1 lives only at the end of the module.
    combos = [(a, lv, v) for a in ("x86_64", "i386") for lv in (1, 2) for v in ("serial", "ssh")]
    combos.sort(key=lambda c: c[0] == "i386" and c[1] == 2)
    for arch, level, via in combos:
        smoke = (arch, level, via) in SMOKE
        marks = [pytest.mark.smoke if smoke else pytest.mark.nightly]
        if arch == "i386" and level == 2:
            marks += [pytest.mark.slow, pytest.mark.timeout(SLOW_READY + 10 * SLOW_COMMAND)]
        yield pytest.param(arch, level, via, marks=marks, id=f"{arch}-L{level}-{via}")


def _l0_accel() -> Accel:
    return Accel(accel_verdict(Arch.X86_64)["chosen"])


@pytest.mark.parametrize(("arch", "level", "via"), list(_boot_params()))
def test_debian_boots_with_its_arch_bitness_and_spec(
        boot_guest, level2_guest, nestbed_facts: dict[str, Any], arch: str, level: int, via: str) -> None:
    image = DEBIAN[arch]
    slow = arch == "i386" and level == 2
    if level == 1:
        g = boot_guest(image, via=via, warm_start=False)  # a real boot: that is what this verifies
    else:
        try:
            g = level2_guest(image, via=via, **({"ready_timeout": SLOW_READY} if slow else {}))
        except TransportError as exc:
            lapsed = datetime.date.today() > datetime.date.fromisoformat(I386_L2_SSH_UNTIL)
            if slow and via == "ssh" and I386_L2_SSH in str(exc) and _l0_accel() is Accel.TCG and not lapsed:
                pytest.xfail(f"known issue (until {I386_L2_SSH_UNTIL}, RELIABILITY.md): no SSH banner from a "
                             f"32-bit L2 under TCG through the L1: {exc}")
            raise
    timeout = SLOW_COMMAND if slow else 60.0
    machine, bits = MACHINE[arch]
    uname_m = g.check_output("uname -m", timeout=timeout)
    long_bit = g.check_output("getconf LONG_BIT", timeout=timeout)
    nproc = int(g.check_output("nproc", timeout=timeout))
    mem_kb = guestfacts.parse_meminfo(g.check_output("cat /proc/meminfo", timeout=timeout))["MemTotal"]
    cpu = guestfacts.parse_cpuinfo(g.check_output("cat /proc/cpuinfo", timeout=timeout))
    uptime = float(g.check_output("cut -d' ' -f1 /proc/uptime", timeout=timeout))
    nestbed_facts.update({
        "level": g.machine.level, "via": via, "kernel": g.check_output("uname -r", timeout=timeout),
        "uname_m": uname_m, "long_bit": int(long_bit), "vcpus": nproc, "memtotal_kb": mem_kb,
        "cpu_model": cpu[0].get("model name", ""), "accel": g.accel.value, "accel_reason": g.accel_reason,
        "ready_seconds": round(g.ready_seconds or 0.0, 1), "guest_uptime_at_check": uptime,
    })
    if "known failure" in g.accel_reason:
        # Not a silent pass: this level runs under TCG because KVM here would crash L0.
        nestbed_facts["known_failure"] = g.accel_reason
    assert g.machine.level == level
    assert uname_m == machine
    assert long_bit == bits
    assert nproc == g.machine.spec.vcpus == len(cpu)
    spec_kb = g.machine.spec.memory_mb * 1024
    assert 0.75 * spec_kb < mem_kb <= spec_kb
    assert g.host.file("/etc/os-release").contains("bookworm")
    assert g.host.socket("tcp://0.0.0.0:22").is_listening


# Nightly: a 32-bit tiny guest under TCG inside the emulated L1 took 212 s on a loaded machine.
@pytest.mark.nightly
def test_32_bit_l2_falls_back_to_tcg_where_kvm_is_a_known_failure(
        l1_host, inner_guest, nestbed_facts: dict[str, Any]) -> None:
    kf = known_failure(l1_host.l0_accel.value, l1_host.l0_qemu, "i386", "kvm")
    g = inner_guest("tiny-i386")
    nestbed_facts.update({"accel": g.accel.value, "accel_reason": g.accel_reason,
                          "ready_seconds": round(g.ready_seconds or 0.0, 1)})
    if kf is not None:
        # Evidence, not a silent pass: the known failure is why this level-2 guest runs under TCG.
        nestbed_facts["known_failure"] = kf["reason"]
        assert g.accel is Accel.TCG and "known failure" in g.accel_reason
    assert g.check_output("uname -m") == "i686"
    assert g.machine.level == 2
