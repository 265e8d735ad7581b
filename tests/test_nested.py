"""Nested virtualization for real: L1 hosts running L2 guests, driven from L0."""

from __future__ import annotations

import dataclasses
import json
import time

import pytest
from conftest import nestbed

from harness.errors import CommandTimedOut, GuestFrozen, QemuCrashed, QemuExited
from harness.guest import BootOptions
from harness.nested import L1Host, boot_l1, known_failure
from harness.vm.spec import Accel

INNER = ["tiny-x86_64", "tiny-i386", "debian-x86_64", "debian-i386"]
# The module shares one L1 (the plugin's l1_host) carrying these images.
pytestmark = [pytest.mark.boot, pytest.mark.nestbed_inner(*INNER)]
CLOCKSOURCE = "cat /sys/devices/system/clocksource/clocksource0/current_clocksource"


# These two boot L1s of their own: they come first, before the module's shared L1 exists,
# so that no more than one L1 runs at a time on a 2-core machine.
def test_cli_level_2_prints_kvm_clock() -> None:
    proc = nestbed("run", "debian-x86_64", "--level", "2", "--via", "ssh", "--", "cat",
                   "/sys/devices/system/clocksource/clocksource0/current_clocksource", timeout=900)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "kvm-clock\n"


def test_l0_abort_under_a_32_bit_kvm_l2_blames_level_1() -> None:
    probe = json.loads(nestbed("probe", "--json").stdout)
    if not known_failure(probe["accel"]["x86_64"]["chosen"], probe["qemu"]["x86_64"], "i386", "kvm"):
        pytest.skip("the abort is known for L0 QEMU 7.2 and 10.0 under TCG only")
    with boot_l1(["tiny-i386"], probe_inner=False) as host:
        with pytest.raises(QemuCrashed) as info, host.inner("tiny-i386", options=_kvm()):
            pass
    assert info.value.level == 1
    assert "invalid tss type" in info.value.stderr_tail


@pytest.fixture
def l1(l1_host: L1Host) -> L1Host:
    """The plugin's module-scoped L1 (its images: the nestbed_inner mark above)."""
    return l1_host


def test_l1_probe_runs_the_same_code_and_finds_kvm(l1: L1Host) -> None:
    assert l1.facts["cpu"]["svm"] or l1.facts["cpu"]["vmx"]
    assert l1.facts["kvm"]["openable"]
    assert l1.accel["x86_64"]["chosen"] == "kvm", l1.accel
    assert any(v == "1" or v == "Y" for v in l1.facts["kvm"]["nested"].values()), l1.facts["kvm"]


@pytest.mark.parametrize("via", ["ssh", "serial"])
def test_l2_debian_runs_under_l1_kvm_with_kvm_clock(l1: L1Host, via: str) -> None:
    with l1.inner("debian-x86_64", via=via) as g:
        assert g.machine.level == 2
        assert g.accel is Accel.KVM
        # no more vCPUs than L1 has (1 on L0's TCG), since the recipe did not insist
        assert g.machine.spec.vcpus == min(2, l1.vcpus) and g.check_output("nproc") == str(g.machine.spec.vcpus)
        assert g.check_output(CLOCKSOURCE) == "kvm-clock"
        # grep in the guest: all of dmesg over an L2's serial console is some 100 kB of port I/O exits
        assert g.check_output("dmesg | grep 'Hypervisor detected'").endswith("Hypervisor detected: KVM")
        # The inner handle is a guest like any other: QMP, serial log on L0, testinfra.
        assert g.machine.qmp.cmd("query-status")["status"] == "running"
        assert g.host.file("/etc/os-release").contains("bookworm")
        log = g.machine.serial_log_path
    assert log is not None and "nestbed-ready-" in log.read_text(errors="replace")


@pytest.mark.parametrize("image", ["tiny-i386", pytest.param("debian-i386", marks=pytest.mark.slow)])
def test_l2_32_bit_guests_fall_back_to_tcg_in_l1_and_work(l1: L1Host, image: str) -> None:
    # TCG inside an L1 that is itself emulated: a full Debian takes minutes, hence "slow".
    with l1.inner(image, options=BootOptions(ready_timeout=1200)) as g:
        assert g.check_output("uname -m", timeout=300) == "i686"
        if known_failure(l1.l0_accel.value, l1.l0_qemu, "i386", "kvm"):
            assert g.accel is Accel.TCG
            assert "known failure" in g.accel_reason


def test_two_l2_guests_at_once_are_isolated(inner_guest) -> None:  # type: ignore[no-untyped-def]
    # Two L2s from the plugin's factory, running at the same time in one L1.
    a, b = inner_guest("tiny-x86_64"), inner_guest("debian-x86_64", via="ssh")
    a.run("echo from-a > /tmp/mark")
    b.run("echo from-b > /tmp/mark")
    assert a.check_output("cat /tmp/mark") == "from-a"
    assert b.check_output("cat /tmp/mark") == "from-b"
    assert a.machine.level == b.machine.level == 2
    assert a.machine.token != b.machine.token


def test_an_l2_that_resets_itself_is_named_a_reset_at_level_2(l1: L1Host) -> None:
    # The QMP SHUTDOWN reason reaches L0 through L1's tunnel too; the L1 lives on.
    with l1.inner("tiny-x86_64") as g, pytest.raises(QemuExited) as info:
        g.run("echo b > /proc/sysrq-trigger; sleep 30", timeout=60)
    assert info.value.level == 2 and info.value.reason == "guest-reset", str(info.value)
    assert info.value.headline.startswith("level 2: QEMU exited unexpectedly (exit status 0, the guest reset")
    assert l1.run("echo alive").stdout == "alive\n"


def test_an_l2_timeout_stays_the_l2s_own_when_its_l1_answers(l1: L1Host) -> None:
    # An L2 error makes nestbed ask L1's serial console whether L1 froze; a live L1 answers and the
    # L2's own error stands, and the L1 is left running.
    with l1.inner("tiny-x86_64") as g:
        with pytest.raises(CommandTimedOut):
            g.run("sleep 30", timeout=3)
        assert l1.guest.machine.poll() is None and l1.guest.machine.killed_because is None
        assert l1.run("echo alive").stdout == "alive\n"


def test_an_l1_kvm_probe_that_fails_is_retried_and_never_cached(l1: L1Host, monkeypatch: pytest.MonkeyPatch) -> None:
    # A flaky L2 boot must not become a cached "L1 has no KVM" for the rest of the host boot:
    # here the probe's tiny guest gets no time to boot, so every try fails.
    from harness import nested
    from harness.core import paths
    from harness.hosts import probe

    monkeypatch.setattr(nested, "L2_KVM_PROBE_DEADLINE", 0.5)
    monkeypatch.setattr(probe, "cache_key", lambda: "test-failed-probe")
    copy = dataclasses.replace(l1, accel={})
    launches: list[int] = []
    real_boot = nested.boot

    def counting_boot(*a, **kw):  # type: ignore[no-untyped-def]
        launches.append(1)
        return real_boot(*a, **kw)

    monkeypatch.setattr(nested, "boot", counting_boot)
    nested._probe_l1(copy)
    assert copy.accel["x86_64"]["chosen"] == "tcg", copy.accel
    assert len(launches) == nested.L2_KVM_PROBE_TRIES == 2
    assert not (paths.cache_root() / f"probe-L1-{l1.guest.image.dir.name}-test-failed-probe.json").exists()


def _kvm() -> BootOptions:
    return BootOptions(accel=Accel.KVM, ready_timeout=120)


@pytest.mark.slow
def test_cli_level_3_runs_under_level_2s_kvm() -> None:
    # L0 TCG -> L1 (KVM via emulated SVM) -> l1-host at L2 under L1's KVM, with nested SVM -> tiny L3
    # under L2's KVM.  About 5 minutes on a busy 2-core machine.
    proc = nestbed("run", "tiny-x86_64", "--level", "3", "-v", "--",
                   "cat", "/sys/devices/system/clocksource/clocksource0/current_clocksource", timeout=1500)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "kvm-clock\n"
    assert "accel kvm" in proc.stderr


def test_a_frozen_l1_is_named_killed_and_replaced(_nestbed_module_l1, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    # Runs last in the module: it freezes the module's L1 (QMP "stop": no vCPU runs, as when an
    # emulated L1 hangs under an L2; SSH's TCP still connects to L0's slirp).
    from harness import nested

    monkeypatch.setattr(nested, "FREEZE_CHECK", 5.0)
    old = _nestbed_module_l1.get()
    with old.inner("tiny-x86_64") as g:
        old.guest.machine.qmp.cmd("stop")
        started = time.monotonic()
        with pytest.raises(GuestFrozen) as info:
            old.run("true", timeout=10)  # L1's SSH stalls: the serial console is asked, then QEMU killed
        assert time.monotonic() - started < 60
        assert info.value.level == 1 and "level 1 died" in info.value.headline, info.value.headline
        assert "no answer on the serial console within 5 s either) and was killed" in info.value.headline
        assert old.guest.machine.poll() is not None
        with pytest.raises(GuestFrozen) as info:  # the L2 blames its L1, not itself
            g.run("true", timeout=10)
        assert info.value.level == 1
    new = _nestbed_module_l1.get()
    assert new is not old and new.guest.machine.poll() is None
    assert _nestbed_module_l1.deaths[-1] == str(old.guest.machine.serial_log_path)
    with new.inner("tiny-x86_64") as g:
        assert g.check_output("uname -m") == "x86_64"
