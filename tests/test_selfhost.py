"""nestbed on a KVM host, for real: nestbed installed (from wheels, no network) inside an L1 and run there as
its own level 0.  Under TCG's emulated SVM, the only working KVM this machine kind has.  Slow (nightly)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest

from harness.tools import selfhost

slow_boot = [pytest.mark.boot, pytest.mark.slow]


@pytest.fixture(scope="module")
def kvm_host() -> Iterator[selfhost.SelfHosted]:
    with selfhost.nestbed_in_l1(("tiny-x86_64", "debian-x86_64")) as host:
        yield host


@slow_boot[0]
@slow_boot[1]
def test_the_probe_inside_says_kvm_because_a_guest_booted_and_sees_nested(kvm_host: selfhost.SelfHosted) -> None:
    r = kvm_host.nestbed("probe", "--json", "--refresh", timeout=600)
    assert r.exit_status == 0, r.stderr
    facts: dict[str, Any] = json.loads(r.stdout)
    x86 = facts["accel"]["x86_64"]
    assert x86["chosen"] == "kvm", x86
    assert "booted under KVM" in x86["reason"]  # the functional probe's own reason, not a guess
    assert "kvm_amd" in facts["kvm"]["modules"] and facts["kvm"]["nested"]["kvm_amd"] in ("1", "Y")
    # Its 32-bit verdict comes from the recorded hazard, without trying (trying would kill this L1).
    assert facts["accel"]["i386"]["chosen"] == "tcg" and "not tried" in facts["accel"]["i386"]["reason"]


@slow_boot[0]
@slow_boot[1]
def test_a_tiny_guest_runs_under_the_hosts_kvm(kvm_host: selfhost.SelfHosted) -> None:
    started = time.monotonic()
    r = kvm_host.nestbed("run", "tiny-x86_64", "--", "cat", "/sys/devices/system/clocksource/clocksource0/"
                         "current_clocksource", timeout=600)
    assert r.exit_status == 0, r.stderr
    assert r.stdout.strip() == "kvm-clock", (r.stdout, r.stderr)  # only a guest under KVM gets kvm-clock
    assert time.monotonic() - started < 300
    r = kvm_host.nestbed("run", "--accel", "kvm", "tiny-x86_64", "--", "uname", "-m", timeout=600)
    assert (r.exit_status, r.stdout.strip()) == (0, "x86_64"), r.stderr


@slow_boot[0]
@slow_boot[1]
def test_debian_over_ssh_runs_under_the_hosts_kvm(kvm_host: selfhost.SelfHosted) -> None:
    r = kvm_host.nestbed("run", "debian-x86_64", "--via", "ssh", "--", "cat",
                         "/sys/devices/system/clocksource/clocksource0/current_clocksource", timeout=900)
    assert (r.exit_status, r.stdout.strip()) == (0, "kvm-clock"), r.stderr


def test_an_installed_nestbed_refuses_to_build_a_wheel_without_a_checkout(monkeypatch: pytest.MonkeyPatch,
                                                                         tmp_path: Any) -> None:
    from harness.core import paths
    from harness.errors import UsageError

    monkeypatch.setattr(paths, "PACKAGE_DIR", tmp_path / "site-packages" / "harness")
    with pytest.raises(UsageError, match="installed from a wheel"):
        selfhost.source_tree()


@slow_boot[0]
@slow_boot[1]
def test_a_level_2_run_from_inside_takes_the_kvm_branch_of_l1_options() -> None:
    """Inside the L1, `nestbed run --level 2` boots an l1-host under that host's KVM with `-cpu host` (the KVM
    branch of l1_options), probes it, and runs a tiny guest under *its* KVM: an L3 of this machine."""
    with selfhost.nestbed_in_l1(("tiny-x86_64", "l1-host")) as host:
        r = host.nestbed("run", "tiny-x86_64", "--level", "2", "--", "cat",
                         "/sys/devices/system/clocksource/clocksource0/current_clocksource", timeout=2400)
    assert (r.exit_status, r.stdout.strip()) == (0, "kvm-clock"), r.stderr[-2000:]
