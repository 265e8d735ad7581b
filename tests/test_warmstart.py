"""Warm start (harness/warmstart.py): guests restored from the state saved at their ready marker.

The pure parts (the key, who is eligible, the switches) without QEMU; then real restores: the
guest is the one that was saved, its clock is now, two guests from one state draw different
random numbers, SSH's pinned host key still matches, a state that does not load is dropped
and the guest boots, and the opt-out boots.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import pytest
from conftest import nestbed

from harness import warmstart
from harness.errors import HarnessError
from harness.guest import BootOptions, boot
from harness.vm.spec import Accel, Arch, DiskFormat, Drive, Forward, MachineSpec, Nic


def _spec(tmp_path: Path, **kw: object) -> MachineSpec:
    kernel = tmp_path / "vmlinuz"
    if not kernel.exists():
        kernel.write_bytes(b"k")
    base: dict[str, object] = dict(arch=Arch.X86_64, accel=Accel.TCG, kernel=kernel, append="console=ttyS0 nestbed.token=abc123",
                                   drives=(Drive(tmp_path / "disk.qcow2", DiskFormat.QCOW2, snapshot=True,
                                                 serial=warmstart.ROOT_SERIAL),),
                                   nics=(Nic(forwards=(Forward(22),)),), name="g")
    base.update(kw)
    return MachineSpec(**base)  # type: ignore[arg-type]


def _key(spec: MachineSpec, token: str = "abc123") -> str:
    return warmstart.state_key(warmstart.canonical(spec, token))


def test_the_key_ignores_what_changes_per_launch(tmp_path: Path) -> None:
    a = _spec(tmp_path)
    # Another ready token, another forwarded host port, the root disk's snapshot flag: same state.
    b = _spec(tmp_path, append="console=ttyS0 nestbed.token=ffff00", nics=(Nic(forwards=(Forward(22, 40022),)),))
    assert _key(a) == warmstart.state_key(warmstart.canonical(b, "ffff00"))
    c = _spec(tmp_path, drives=(Drive(tmp_path / "disk.qcow2", DiskFormat.QCOW2, serial=warmstart.ROOT_SERIAL),))
    assert _key(a) == _key(c)


@pytest.mark.parametrize("change", [
    {"memory_mb": 1024}, {"vcpus": 2}, {"cpu": "host"}, {"cpu_flags": ("+svm",)}, {"accel": Accel.KVM},
    {"machine": "pc"}, {"append": "console=ttyS0 nestbed.token=abc123 loglevel=7"},
    {"extra_args": ("-device", "virtio-rng-pci")}, {"qemu_binary": "/bin/true"},
])
def test_the_key_changes_with_the_machine_shape(tmp_path: Path, change: dict[str, object]) -> None:
    assert _key(_spec(tmp_path)) != _key(_spec(tmp_path, **change)), change


def test_the_key_changes_when_a_file_it_names_changes(tmp_path: Path) -> None:
    spec = _spec(tmp_path)
    before = _key(spec)
    assert _key(spec) == before
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"another kernel")  # a rebuilt image: same path, new bytes
    os.utime(kernel, ns=(time.time_ns() + 10**9, time.time_ns() + 10**9))
    assert _key(spec) != before


def test_who_is_warm_started(tmp_path: Path) -> None:
    spec = _spec(tmp_path)
    ok = dict(qmp=True, nested=False, firmware=False, root_disk=False)
    assert warmstart.eligible(spec, **ok) is None
    assert "inside an L1" in str(warmstart.eligible(spec, **{**ok, "nested": True}))
    assert "QMP" in str(warmstart.eligible(spec, **{**ok, "qmp": False}))
    assert "firmware" in str(warmstart.eligible(spec, **{**ok, "firmware": True}))
    assert "root disk" in str(warmstart.eligible(spec, **{**ok, "root_disk": True}))
    ro = spec.replace(drives=(*spec.drives, Drive(tmp_path / "p.img", DiskFormat.RAW, read_only=True)))
    assert warmstart.eligible(ro, **ok) is None
    rw = spec.replace(drives=(*spec.drives, Drive(tmp_path / "w.img", DiskFormat.RAW)))
    assert "writable disk" in str(warmstart.eligible(rw, **ok))
    # An L1 carrying a user's VMDK (read-only) for its L2: QEMU refuses to migrate it (measured: "The vmdk format
    # used by node ... does not support live migration"), so it is not even tried.
    vmdk = spec.replace(drives=(*spec.drives, Drive(tmp_path / "u.vmdk", DiskFormat.VMDK, read_only=True)))
    assert "a vmdk drive" in str(warmstart.eligible(vmdk, **ok))


def test_which_states_are_evicted() -> None:
    day, gib = 86400.0, 1 << 30
    now = 100 * day
    states = [("old", now - 20 * day, gib), ("a", now - 3 * day, 3 * gib), ("b", now - 2 * day, 3 * gib),
              ("new", now - 60, 3 * gib)]
    gone = dict(warmstart.to_evict(states, budget=8 * gib, now=now, keep="new"))
    assert list(gone) == ["old", "a"] and "unused for 20 days" in gone["old"] and "8 GiB budget" in gone["a"]
    # The state just saved is never evicted, even over budget or old (its clock may be off).
    assert warmstart.to_evict([("new", 0.0, 100 * gib)], budget=0, now=now, keep="new") == []
    assert warmstart.to_evict(states[1:], budget=100 * gib, now=now, keep="new") == []


def test_eviction_removes_states_under_their_lock_and_the_budget_is_checked(tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from harness.errors import UsageError

    monkeypatch.setenv("NESTBED_CACHE", str(tmp_path / "cache"))
    root = warmstart.warm_root()
    for i, key in enumerate(["k-old", "k-mid", "k-new"]):
        d = root / key
        d.mkdir()
        (d / "state").write_bytes(b"x" * (1 << 20))
        (d / "meta.json").write_text("{}")
        os.utime(d / "meta.json", (time.time() - (3 - i) * 3600,) * 2)
    (root / "k-old.facts-L1.json").write_text("{}")
    (root / "overlay-1-abcd").mkdir()  # a running boot's overlay: not a state
    monkeypatch.setenv(warmstart.MAX_GB_ENV, str(2.5 / 1024))  # 2.5 MiB: room for two states
    assert warmstart.evict(keep="k-new") == ["k-old"]
    assert sorted(p.name for p in root.iterdir() if not p.name.startswith(".")) == ["k-mid", "k-new", "overlay-1-abcd"]
    monkeypatch.setenv(warmstart.MAX_GB_ENV, "lots")
    with pytest.raises(UsageError, match=r"NESTBED_WARM_MAX_GB='lots': expected a number of GiB"):
        warmstart.max_bytes()
    monkeypatch.setenv(warmstart.MAX_GB_ENV, "nan")
    with pytest.raises(UsageError):
        warmstart.max_bytes()


def test_writable_storage_in_extra_args_is_not_warm_started(tmp_path: Path) -> None:
    ok = dict(qmp=True, nested=False, firmware=False, root_disk=False)
    rw = _spec(tmp_path, extra_args=("-drive", f"if=virtio,file={tmp_path / 'w.img'},format=raw"))
    assert "writable storage" in str(warmstart.eligible(rw, **ok))
    state_drive = _spec(tmp_path, extra_args=("-drive", f"if=none,id=s,file={tmp_path / 's.qcow2'},snapshot=on"))
    assert warmstart.eligible(state_drive, **ok) is None


def test_under_kvm_the_key_covers_the_host_cpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = _spec(tmp_path, accel=Accel.KVM, cpu="host")
    facts = {"cpu": {"flags": "svm npt"}, "kernel": "6.1", "nested": {"kvm_amd": "1"}}
    monkeypatch.setattr(warmstart, "host_cpu_facts", lambda: facts)
    with_nested = _key(spec)
    monkeypatch.setattr(warmstart, "host_cpu_facts", lambda: {**facts, "nested": {"kvm_amd": "0"}})
    assert _key(spec) != with_nested  # nested turned off: the saved L1 would believe it still has SVM
    tcg = _spec(tmp_path)
    before = _key(tcg)
    monkeypatch.setattr(warmstart, "host_cpu_facts", lambda: {"cpu": {"flags": "other"}})
    assert _key(tcg) == before  # TCG's CPU is QEMU's model alone


def test_the_switches(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(warmstart.ENV, raising=False)
    assert warmstart.enabled(None) is True
    assert warmstart.enabled(False) is False
    monkeypatch.setenv(warmstart.ENV, "0")
    assert warmstart.enabled(None) is False
    assert warmstart.enabled(True) is True
    monkeypatch.setenv(warmstart.ENV, "1")
    warmstart.set_default(False)
    try:
        assert warmstart.enabled(None) is False
    finally:
        warmstart.set_default(None)
    assert warmstart.enabled(None) is True


# -- real restores --------------------------------------------------------------------------------

def _boot_twice(image: str, opts: BootOptions, via: str = "serial") -> tuple[dict, dict]:
    with boot(image, options=opts, via=via) as g:
        first = dict(g.warm)
    with boot(image, options=opts, via=via) as g:
        second = dict(g.warm)
    return first, second


@pytest.mark.boot
@pytest.mark.usefixtures("tiny_images")
def test_a_restored_guest_runs_on_from_its_ready_state() -> None:
    # A memory size no other test uses: this test's own state.
    opts = BootOptions(accel=Accel.TCG, memory_mb=232)
    with boot("tiny-x86_64", options=opts) as g:
        assert g.warm["key"]
        g.check_output("true")
    started = time.monotonic()
    with boot("tiny-x86_64", options=opts) as g:
        ready = time.monotonic() - started
        assert g.warm["restored"] is True, g.warm
        assert g.check_output("uname -m") == "x86_64"
        # The clock is the host's, not the one saved with the state.
        assert abs(int(g.check_output("date -u +%s")) - time.time()) < 10
        assert g.machine.serial_log_path is not None
        first_line = g.machine.serial_log_path.read_text(errors="replace").splitlines()[0]
        assert first_line.startswith("[nestbed] restored from a saved state"), first_line
        assert g.warm["key"] in first_line
        mem_kb = int(g.check_output("awk '/MemTotal/ {print $2}' /proc/meminfo"))
        assert 180 * 1024 < mem_kb <= 232 * 1024
    assert ready < 30  # loose: the figure is BENCHMARKS.md's; this only says it did not boot for minutes


@pytest.mark.boot
def test_two_guests_from_one_state_draw_different_random_numbers_and_keep_the_host_key() -> None:
    opts = BootOptions(accel=Accel.TCG, memory_mb=480)
    with boot("debian-x86_64", options=opts, via="ssh") as g:
        g.check_output("true")
    draws = []
    for _ in range(2):
        with boot("debian-x86_64", options=opts, via="ssh") as g:  # SSH checks the pinned host key
            assert g.warm["restored"] is True, g.warm
            draws.append(g.check_output("od -An -N16 -tx1 /dev/urandom"))
            assert g.check_output("cat /etc/ssh/ssh_host_ed25519_key.pub").split()[1] in \
                g.image.manifest["host_keys"]["ssh-ed25519"]
    assert draws[0] != draws[1], draws


@pytest.mark.boot
@pytest.mark.usefixtures("tiny_images")
def test_a_state_that_does_not_load_is_dropped_and_the_guest_boots(caplog: pytest.LogCaptureFixture) -> None:
    opts = BootOptions(accel=Accel.TCG, memory_mb=216)
    with boot("tiny-x86_64", options=opts) as g:
        key = g.warm["key"]
    state = warmstart.warm_root() / key / "state"
    assert state.is_file()
    state.chmod(0o600)
    with open(state, "r+b") as f:  # a truncated stream: QEMU cannot load it
        f.truncate(state.stat().st_size // 3)
    with caplog.at_level(logging.WARNING, logger="harness.warmstart"), boot("tiny-x86_64", options=opts) as g:
        assert g.warm.get("restored") is False, g.warm  # booted, and saved again
        assert g.check_output("uname -m") == "x86_64"
    assert any("dropping saved state" in r.getMessage() and key in r.getMessage() for r in caplog.records)
    with boot("tiny-x86_64", options=opts) as g:
        assert g.warm["restored"] is True  # the new state loads


@pytest.mark.boot
def test_an_incomplete_state_is_dropped_not_trusted(caplog: pytest.LogCaptureFixture) -> None:
    opts = BootOptions(accel=Accel.TCG, memory_mb=456)
    with boot("debian-x86_64", options=opts) as g:
        key = g.warm["key"]
    (warmstart.warm_root() / key / "disk.qcow2").unlink()  # e.g. removed by hand, or a half-copied cache
    with caplog.at_level(logging.WARNING, logger="harness.warmstart"), boot("debian-x86_64", options=opts) as g:
        assert g.warm.get("restored") is False and g.warm.get("captured") is True, g.warm
        assert g.check_output("cat /etc/debian_version").startswith("12")
    assert any("incomplete" in r.getMessage() for r in caplog.records)
    with boot("debian-x86_64", options=opts) as g:
        assert g.warm["restored"] is True


@pytest.mark.boot
@pytest.mark.usefixtures("tiny_images")
def test_a_restored_guest_can_take_a_reset_point() -> None:
    opts = BootOptions(accel=Accel.TCG, memory_mb=248, reset=True)
    for _ in range(2):
        with boot("tiny-x86_64", options=opts) as g:
            g.check_output("touch /tmp/after-ready")
            g.reset()
            assert g.run("test -e /tmp/after-ready").exit_status == 1
    assert g.warm["restored"] is True


@pytest.mark.boot
@pytest.mark.usefixtures("tiny_images")
def test_restore_errors_name_what_qemu_said(tmp_path: Path) -> None:
    from harness.vm import migrate
    from harness.vm.machine import Machine

    bogus = tmp_path / "state"
    bogus.write_bytes(b"not a migration stream")
    spec = MachineSpec(accel=Accel.TCG, memory_mb=64, name="bogus")
    m = Machine(spec, incoming=bogus)
    try:
        # QEMU gives up at once (often before QMP answers): either way the error carries its words.
        with pytest.raises(HarnessError) as info:
            m.launch()
            migrate.wait_incoming(m, timeout=20)
    finally:
        m.kill()
    assert "Not a migration stream" in str(info.value)


@pytest.mark.boot
@pytest.mark.usefixtures("tiny_images")
def test_warm_start_can_be_turned_off() -> None:
    with boot("tiny-x86_64", options=BootOptions(accel=Accel.TCG, warm_start=False)) as g:
        assert g.warm == {}
    proc = nestbed("run", "tiny-x86_64", "--", "head", "-n1", "/proc/uptime",
                   env={**os.environ, warmstart.ENV: "0"})
    assert proc.returncode == 0, proc.stderr
    assert "restored" not in proc.stderr


@pytest.mark.boot
def test_an_l1_host_starts_from_its_ready_state() -> None:
    from harness.nested import boot_l1

    for _ in range(2):
        with boot_l1(["tiny-x86_64"]) as host:
            warm = dict(host.guest.warm)
            with host.inner("tiny-x86_64") as g:
                assert g.check_output("uname -m") == "x86_64"
            assert host.accel["x86_64"]["chosen"] in ("kvm", "tcg")
    assert warm.get("restored") is True, warm
