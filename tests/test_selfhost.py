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


# The two cells the slow merge test runs on both host kinds: a tiny guest (KVM inside, TCG at L0) and level-1
# paravirt, which needs KVM at level 0 (declared as a skip for the TCG host kind in scenarios/matrix.toml).
FLEET_CELLS = ("test_tiny_guest_boots_and_answers_over_serial and x86_64 or "
               "test_kvm_guest_takes_every_pv_path and x86_64-L1")
TINY_CELL = "scenarios/test_boot.py::test_tiny_guest_boots_and_answers_over_serial[tiny-x86_64-serial]"
PV_CELL = "scenarios/test_paravirt.py::test_kvm_guest_takes_every_pv_path[x86_64-L1]"


@slow_boot[0]
@slow_boot[1]
def test_a_report_made_inside_the_l1_comes_out_and_merges_as_a_second_host_kind(tmp_path: Any) -> None:
    """Two cells of the kvm-l1 host kind's tier run in the L1 (`report` through SelfHosted.nestbed: its directory comes
    out to L0, labelled "KVM host, emulated SVM"), the same two cells at L0 (TCG), and the fleet merge shows
    both host kinds with each cell's verdict: the paravirt cell passes under the L1's KVM, skips (declared) at L0."""
    from tests.conftest import nestbed

    started = time.monotonic()
    r = nestbed("report", "--tier", "nightly", "-n", "0", "--out", str(tmp_path / "l0"), "--", "-k", FLEET_CELLS,
                timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    l0_seconds = time.monotonic() - started
    with selfhost.nestbed_in_l1(("tiny-x86_64", "debian-x86_64")) as host:
        inner = host.nestbed("report", "--tier", "kvm-l1", "--out", str(tmp_path / "kvm"), "--", "-k", FLEET_CELLS,
                             timeout=2400)
    assert inner.exit_status == 0, (inner.stdout + inner.stderr)[-3000:]
    assert f"came out of the L1 to {tmp_path / 'kvm'}" in inner.stdout
    kvm = json.loads((tmp_path / "kvm" / "report.json").read_text())
    assert kvm["host"]["kind"]["label"] == "KVM host, emulated SVM" and kvm["host"]["kind"]["emulated"] is True
    assert kvm["host"]["accel"]["x86_64"]["chosen"] == "kvm"
    assert {c["nodeid"]: c["outcome"] for c in kvm["cells"]} == {TINY_CELL: "pass", PV_CELL: "pass"}
    assert all(g["accel"] == "kvm" for c in kvm["cells"] for g in c["guests"])
    assert (tmp_path / "kvm" / "index.html").read_text().count("KVM host, emulated SVM") >= 1
    r = nestbed("report", "merge", str(tmp_path / "l0"), str(tmp_path / "kvm"), "-o", str(tmp_path / "fleet"),
                timeout=120)
    assert r.returncode == 0 and "2 host kind(s)" in r.stdout, r.stdout + r.stderr
    fleet = json.loads((tmp_path / "fleet" / "fleet.json").read_text())
    by_kind = {h["kind"]["label"]: {n: c["outcome"] for n, c in h["cells"].items()} for h in fleet["hosts"]}
    assert by_kind == {"KVM host, emulated SVM": {TINY_CELL: "pass", PV_CELL: "pass"},
                       "TCG host (no usable KVM)": {TINY_CELL: "pass", PV_CELL: "skip"}}, by_kind
    md = (tmp_path / "fleet" / "summary.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| cell |"))
    assert "KVM host, emulated SVM" in header and "TCG host (no usable KVM)" in header, md
    print(f"\nL0 report {l0_seconds:.0f} s; in the L1 (boot, install, report, copy out) "
          f"{time.monotonic() - started - l0_seconds:.0f} s; install {host.install_seconds:.0f} s; "
          f"report inside {kvm['run']['duration_seconds']} s; cells: "
          + ", ".join(f"{c['nodeid'].split('::')[1]} {c['outcome']} {c['duration_seconds']:.0f} s" for c in kvm["cells"]))
