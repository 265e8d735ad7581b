"""Real boots of the tiny guests: the CLI, commands over serial, typed failures, no leaks."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, nestbed, pid_gone, qemu_pids_under

from harness.core import paths
from harness.errors import GuestPanic, MachineStateError, QemuCrashed, TransportError
from harness.guest import BootOptions, boot
from harness.vm.machine import sweep_stale_runs
from harness.vm.spec import Accel

pytestmark = [pytest.mark.boot, pytest.mark.usefixtures("tiny_images")]


@pytest.mark.parametrize(("image", "machine"), [("tiny-x86_64", "x86_64"), ("tiny-i386", "i686")])
def test_cli_run_prints_guest_arch(image: str, machine: str) -> None:
    proc = nestbed("run", image, "--", "uname", "-m")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"{machine}\n"


def test_cli_run_passes_exit_status_through() -> None:
    proc = nestbed("run", "tiny-x86_64", "--", "sh", "-c", "echo to-err >&2; exit 3")
    assert proc.returncode == 3
    assert proc.stderr == "to-err\n"


def test_cli_probe_chooses_an_accelerator_with_a_reason() -> None:
    import json

    proc = nestbed("probe", "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    for arch in ("x86_64", "i386"):
        verdict = result["accel"][arch]
        assert verdict["chosen"] in ("kvm", "tcg")
        assert verdict["reason"]
    if "kvm_pvm" in result["kvm"]["modules"]:
        # This machine kind: /dev/kvm opens but cannot boot a standard guest.
        assert {result["accel"][a]["chosen"] for a in ("x86_64", "i386")} == {"tcg"}
        assert "kvm_pvm" in result["accel"]["x86_64"]["reason"]


def test_commands_over_serial_are_framed(tmp_path: Path) -> None:
    with boot("tiny-x86_64") as g:
        r = g.run("sh", "-c", "echo out; echo err >&2; exit 7")
        assert (r.exit_status, r.stdout, r.stderr) == (7, "out\n", "err\n")
        # Kernel messages printed while a command runs must not leak into its output.
        r = g.run('for i in 1 2 3; do echo "<0>nestbed-noise $i" > /dev/kmsg; echo line$i; done')
        assert r.stdout == "line1\nline2\nline3\n"
        assert "nestbed-noise" in g.machine.serial_tail()
        # Arguments are quoted; shell text is not.
        assert g.run("printf", "%s|", "a b", "it's", "$HOME").stdout == "a b|it's|$HOME|"
        assert g.run("echo one\necho two  # a comment").stdout == "one\ntwo\n"
        assert g.run("printf x").stdout == "x"
        # Files both ways.
        src = tmp_path / "in.bin"
        src.write_bytes(bytes(range(256)) * 40)
        g.put(src, "/tmp/copied")
        assert g.check_output("md5sum /tmp/copied").split()[0] == __import__("hashlib").md5(
            src.read_bytes()).hexdigest()
        g.get("/tmp/copied", tmp_path / "back.bin")
        assert (tmp_path / "back.bin").read_bytes() == src.read_bytes()
        log = g.machine.serial_log_path
    assert log is not None
    data = log.read_bytes()
    # A booted guest's log has its ready marker; a restored one (warm start) says so on its first line.
    assert b"nestbed-ready-" in data or data.startswith(b"[nestbed] restored from a saved state"), data[:200]


def test_guest_facts_match_the_spec() -> None:
    with boot("tiny-x86_64", options=BootOptions(vcpus=2, memory_mb=384)) as g:
        assert g.check_output("nproc") == "2"
        mem_kb = int(g.check_output("sed -n 's/^MemTotal: *\\([0-9]*\\) kB/\\1/p' /proc/meminfo"))
        assert 300 * 1024 < mem_kb <= 384 * 1024


def test_missing_init_is_a_typed_panic_within_seconds() -> None:
    started = time.monotonic()
    with pytest.raises(GuestPanic) as info, \
            boot("tiny-x86_64", options=BootOptions(append="rdinit=/does-not-exist", ready_timeout=120)):
        pass
    assert time.monotonic() - started < 15
    assert "Kernel panic" in str(info.value)
    assert "Kernel panic" in info.value.serial_tail


def test_qemu_killed_from_outside_is_a_typed_error() -> None:
    with boot("tiny-x86_64") as g:
        assert g.machine.proc is not None
        os.kill(g.machine.proc.pid, signal.SIGABRT)
        with pytest.raises(QemuCrashed) as info:
            g.run("sleep 30", timeout=60)
        assert info.value.returncode == -signal.SIGABRT
        assert "signal 6" in str(info.value)


def test_state_guard_after_shutdown() -> None:
    with boot("tiny-x86_64") as g:
        pass
    with pytest.raises((MachineStateError, TransportError)):
        g.run("true")


def test_command_timeout_is_typed_and_the_console_recovers() -> None:
    from harness.errors import CommandTimedOut

    with boot("tiny-x86_64") as g:
        started = time.monotonic()
        with pytest.raises(CommandTimedOut) as info:
            g.run("sleep 600", timeout=1)
        assert "sleep 600" in str(info.value)
        assert time.monotonic() - started < 20
        assert g.run("echo", "still here").stdout == "still here\n"
        assert g.run("pgrep -x sleep || echo none").stdout == "none\n"


def _wait_for_qemu_child(parent: int, timeout: float = 60) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for pid in qemu_pids_under(paths.run_root()):
            stat = Path(f"/proc/{pid}/stat").read_text()
            if int(stat.rsplit(")", 1)[1].split()[1]) == parent:
                return pid
        time.sleep(0.05)
    raise AssertionError("the harness never started QEMU")


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT])
def test_harness_killed_mid_boot_leaves_no_qemu(sig: signal.Signals) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "harness", "run", "tiny-x86_64", "--", "sleep", "60"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        qemu = _wait_for_qemu_child(proc.pid)
        proc.send_signal(sig)
        rc = proc.wait(timeout=30)
        assert pid_gone(qemu), f"QEMU {qemu} survived {sig.name} of its harness"
        if sig is signal.SIGTERM:
            assert rc == 143
        elif sig is signal.SIGINT:
            assert rc == 130
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


def test_sweep_kills_qemu_of_a_dead_owner(tmp_path: Path) -> None:
    # A stand-in for a QEMU whose harness died without PR_SET_PDEATHSIG firing: a real
    # QEMU process naming a run directory whose owner PID is gone.  In a run root of its own:
    # the other worker's launches sweep the shared one, and would take this QEMU first.
    root = tmp_path / "run"
    run = root / "sweeptest-1"
    run.mkdir(parents=True, mode=0o700)
    dead = subprocess.Popen(["true"])
    dead.wait()
    (run / "owner").write_text(str(dead.pid))
    qemu = subprocess.Popen(["qemu-system-x86_64", "-accel", "tcg", "-display", "none", "-nodefaults",
                             "-S", "-pidfile", str(run / "qemu.pid")], stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while not (run / "qemu.pid").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        killed = sweep_stale_runs(root)
        assert qemu.pid in killed
        assert qemu.wait(timeout=10) == -signal.SIGKILL
        assert not run.exists()
    finally:
        if qemu.poll() is None:
            qemu.kill()
            qemu.wait()


def test_sweep_skips_a_run_directory_that_vanishes_under_it(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    # Seen with two harness processes starting at once (2026-12-02): one listed a half-created run
    # directory, its owner removed it, and the stat for its age raised FileNotFoundError out of launch().
    root = tmp_path / "run"
    root.mkdir()
    (root / "young").mkdir()  # no owner file yet: too young to reap
    listed = [root / "young", root / "gone-1234"]  # as iterdir saw them; "gone-1234" removed since
    monkeypatch.setattr(Path, "iterdir", lambda self: iter(listed) if self == root else iter(()))
    assert sweep_stale_runs(root) == []
    assert (root / "young").is_dir()


def test_accel_is_chosen_automatically_and_recorded() -> None:
    from harness.guest import accel_verdict
    from harness.vm.spec import Arch

    with boot("tiny-i386") as g:
        assert g.accel is Accel(accel_verdict(Arch.I386)["chosen"])
        assert g.accel_reason
        assert g.check_output("uname -m") == "i686"
