"""Faults at level 2, for real: hung L2 boots and their retry, an L2 that level 1 cannot start, an L2
option L1's QEMU rejects, an L2 kernel panic, console timeouts, a failed reset, a failed command, and
SIGTERM/SIGKILL to a harness process while its L2 boots.

Budget (a 2-CPU machine): the two signal cases boot an L1 each (they come first, before the module's
shared L1 exists, so that one L1 runs at a time); everything else shares the plugin's L1 (``l1_host``)
and one tiny L2 per case, or one for the module's last three.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO, pid_gone, qemu_name, qemu_pids_under

from harness.core import paths
from harness.errors import CommandFailed, ConsoleTimeout, GuestPanic, LaunchError, QemuExited, ResetError
from harness.guest import NESTED_BOOT_ATTEMPTS, BootOptions, Guest
from harness.nested import L1Host
from harness.vm.machine import sweep_stale_runs

pytestmark = [pytest.mark.boot, pytest.mark.nestbed_inner("tiny-x86_64"), pytest.mark.usefixtures("tiny_images")]

# Init that prints what the kernel prints when a task hangs, then hangs: the harness's hung-boot
# detector (guest.HUNG_TASK_RE) ends the wait at once, so the retry costs seconds, not a timeout.
HANG_REPORTED = ('rdinit=/bin/busybox -- sh -c '
                 '"echo INFO: task swapper/0:1 blocked for more than 120 seconds.; exec /bin/busybox sleep 100000"')
# Init that says so and sleeps: only the ready timeout ends the wait.  (/bin/busybox sleep: the
# kernel gives init no PATH, and a plain "exec sleep" fails, init exits, the kernel panics.)
HANG_UNREPORTED = 'rdinit=/bin/busybox -- sh -c "echo nestbed-init-sleeps; exec /bin/busybox sleep 100000"'


def _l2_qemus(l1: L1Host) -> list[str]:
    """Command lines of the QEMUs running inside *l1* (no procps needed)."""
    out = l1.run("for p in /proc/[0-9]*; do tr '\\0' ' ' <$p/cmdline 2>/dev/null; echo; done").stdout
    return [ln for ln in out.splitlines() if ln.startswith("qemu-system")]


# -- SIGTERM and SIGKILL to a harness process while its L2 boots ---------------------------------------

# What `nestbed run tiny-x86_64 --level 2 -- true` does (with the CLI's SIGTERM handler), with
# markers and the L2's serial log where the test can see them.
HARNESS = textwrap.dedent("""
    import signal, sys
    from pathlib import Path
    from harness import cli
    from harness.guest import BootOptions
    from harness.nested import boot_hosts

    signal.signal(signal.SIGTERM, cli._on_sigterm)
    with boot_hosts(1, ["tiny-x86_64"]) as host:
        print("NESTBED-L1-UP", flush=True)
        with host.inner("tiny-x86_64", options=BootOptions(append="loglevel=7"), log_dir=Path(sys.argv[1])) as g:
            print("NESTBED-L2-UP", flush=True)
            g.run("true")
""")


def _wait_for(what: str, check: Any, proc: subprocess.Popen[bytes], timeout: float, out: Path) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        if proc.poll() is not None:
            raise AssertionError(f"the harness exited ({proc.returncode}) before {what}: {out.read_text()[-3000:]}")
        time.sleep(0.1)
    raise AssertionError(f"no {what} within {timeout:g} s: {out.read_text()[-3000:]}")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=lambda s: s.name)
def test_harness_signalled_while_its_l2_boots_leaves_no_qemu(tmp_path: Path, sig: signal.Signals) -> None:
    l2_logs = tmp_path / "l2"
    out = tmp_path / "harness.out"
    with open(out, "wb") as f:
        proc = subprocess.Popen([sys.executable, "-c", HARNESS, str(l2_logs)], cwd=REPO, stdin=subprocess.DEVNULL,
                                stdout=f, stderr=subprocess.STDOUT)
    root = paths.run_root()
    try:
        l1 = _wait_for("an L1 QEMU", lambda: qemu_pids_under(root, owners={proc.pid}, orphans=False),
                       proc, 120, out)
        assert len(l1) == 1 and qemu_name(l1[0]) == "l1-host", [qemu_name(p) for p in l1]
        _wait_for("L1 up", lambda: b"NESTBED-L1-UP" in out.read_bytes(), proc, 600, out)
        serial = l2_logs / "tiny-x86_64-serial.log"
        # The L2's kernel has started (its QEMU runs in L1, its console reaches L0): it is booting.
        _wait_for("the L2 kernel's banner", lambda: serial.exists() and b"Linux version" in serial.read_bytes(),
                  proc, 120, out)
        time.sleep(1.0)
        proc.send_signal(sig)
        rc = proc.wait(timeout=120)
        text = out.read_text(errors="replace")
        assert "NESTBED-L2-UP" not in text, "the signal came too late: the L2 was already up"
        assert b"nestbed-ready-" not in serial.read_bytes()
        assert rc == (143 if sig is signal.SIGTERM else -signal.SIGKILL), text[-3000:]
        assert pid_gone(l1[0], timeout=15), f"L1's QEMU {l1[0]} survived {sig.name} of its harness"
        assert qemu_pids_under(root, owners={proc.pid}, orphans=False) == []
        left = list(root.glob(f"*-{proc.pid}-*"))
        if sig is signal.SIGTERM:
            assert not left, "a harness unwinding on SIGTERM removes its run directories"
            assert "Traceback" not in text, text[-3000:]
        else:
            sweep_stale_runs()  # what the next launch does with a SIGKILLed harness's directories
            # What may stay: the L2's own L0-side directory.  It holds nothing (its QEMU ran in L1) and
            # no owner file either (only level-1 launches write one), so the sweep takes it for
            # half-created and leaves it for 60 s.
            rest = list(root.glob(f"*-{proc.pid}-*"))
            assert all(d.name.startswith("tiny-x86_64-") and not any(d.iterdir()) for d in rest), \
                {str(d): sorted(f.name for f in d.iterdir()) for d in rest}
            for d in rest:
                d.rmdir()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        for pid in qemu_pids_under(root, owners={proc.pid}, orphans=False):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)


# -- boots that hang, and the retry ----------------------------------------------------------------------

def test_a_hung_l2_boot_is_retried_and_the_retry_comes_up(l1_host: L1Host, monkeypatch: pytest.MonkeyPatch,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    real_machine = l1_host.machine
    specs: list[str] = []

    def first_attempt_hangs(spec: Any, image: Any, **kw: Any) -> Any:
        if not specs:
            spec = spec.replace(append=f"{spec.append} {HANG_REPORTED}")
        specs.append(spec.append)
        return real_machine(spec, image, **kw)

    monkeypatch.setattr(l1_host, "machine", first_attempt_hangs)
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="harness.guest"), \
            l1_host.inner("tiny-x86_64", options=BootOptions(ready_timeout=120)) as g:
        assert time.monotonic() - started < 100, "the hung-task report did not end the first wait at once"
        assert len(specs) == 2 and "sleep 100000" not in specs[1]
        assert g.machine.level == 2
        assert g.check_output("uname -m") == "x86_64"
        assert len(g.failed_attempts) == 1
        hung_log = Path(g.failed_attempts[0]).read_text(errors="replace")
        assert "INFO: task swapper/0:1 blocked for more than 120 seconds." in hung_log
        assert g.failed_attempts[0] != str(g.machine.serial_log_path)
    retries = [r.getMessage() for r in caplog.records if "trying once more" in r.getMessage()]
    assert len(retries) == 1 and retries[0].startswith("level 2 boot of tiny-x86_64 did not come up"), retries
    assert "the boot hung: INFO: task swapper/0:1 blocked" in retries[0]
    assert _l2_qemus(l1_host) == []


def test_an_l2_boot_that_hangs_every_time_is_a_console_timeout_at_level_2(
        l1_host: L1Host, caplog: pytest.LogCaptureFixture) -> None:
    ready_timeout = 20
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="harness.guest"), pytest.raises(ConsoleTimeout) as info, \
            l1_host.inner("tiny-x86_64", options=BootOptions(append=HANG_UNREPORTED, ready_timeout=ready_timeout)):
        pass
    elapsed = time.monotonic() - started
    assert NESTED_BOOT_ATTEMPTS * ready_timeout <= elapsed < NESTED_BOOT_ATTEMPTS * ready_timeout + 90, elapsed
    err = info.value
    assert err.level == 2 and str(err).startswith("level 2: no ready marker from the guest's init"), str(err)
    assert "nestbed-init-sleeps" in err.serial_tail, err.serial_tail[-2000:]
    retries = [r.getMessage() for r in caplog.records if "trying once more" in r.getMessage()]
    assert len(retries) == NESTED_BOOT_ATTEMPTS - 1, retries
    assert _l2_qemus(l1_host) == [], "the hung L2s' QEMUs were left running in L1"


# -- L2s that never start --------------------------------------------------------------------------------

def test_an_l2_option_l1s_qemu_rejects_is_an_exit_at_level_2_with_qemus_message(l1_host: L1Host) -> None:
    # Not a LaunchError: the harness only learns of it when the serial chardev never accepts, and
    # then reports the exit (as at level 1, where it is the QMP handshake that fails).
    started = time.monotonic()
    with pytest.raises(QemuExited) as info, \
            l1_host.inner("tiny-x86_64", options=BootOptions(extra_args=("-nestbed-no-such-option",))):
        pass
    assert time.monotonic() - started < 60
    err = info.value
    assert err.level == 2 and err.returncode == 1, str(err)
    assert "QEMU in level 1 exited before its serial chardev accepted a connection" in err.headline
    assert "-nestbed-no-such-option: invalid option" in err.stderr_tail
    assert _l2_qemus(l1_host) == []


def test_an_l2_that_level_1_cannot_start_is_a_launch_error_at_level_2(l1_host: L1Host) -> None:
    # L1's run directory for inner QEMUs on a read-only filesystem: the launch script's mkdir fails.
    l1_host.ssh.check_output("mkdir -p /run/nestbed && mount -t tmpfs -o ro,size=64k nestbed-ro /run/nestbed")
    try:
        with pytest.raises(LaunchError) as info, l1_host.inner("tiny-x86_64"):
            pass
    finally:
        l1_host.ssh.check_output("umount /run/nestbed")
    err = info.value
    assert err.level == 2, str(err)
    assert err.headline.startswith("level 2: cannot start QEMU in level 1: mkdir"), err.headline
    assert "Read-only file system" in err.headline
    assert _l2_qemus(l1_host) == []
    with l1_host.inner("tiny-x86_64") as g:  # and level 1 starts L2s again
        assert g.check_output("echo", "up") == "up"


def test_an_l2_kernel_panic_is_a_guest_panic_at_level_2(l1_host: L1Host) -> None:
    with l1_host.inner("tiny-x86_64") as g, pytest.raises(GuestPanic) as info:
        g.run("echo c > /proc/sysrq-trigger; sleep 30", timeout=60)
    err = info.value
    assert err.level == 2, str(err)
    # The headline may stop at "not syncing": at level 2 the panic line can arrive in pieces, and
    # the match is taken on the first one.  The tail (read after the panic's end) has the reason.
    assert err.headline.startswith("level 2: guest kernel panicked: Kernel panic - not syncing"), err.headline
    assert "Kernel panic - not syncing: sysrq triggered crash" in err.serial_tail, err.serial_tail[-2000:]
    assert l1_host.run("echo alive").stdout == "alive\n"  # the L1 lives on
    assert _l2_qemus(l1_host) == []


# -- errors on a running L2 (one L2 for the three) ---------------------------------------------------------

@pytest.fixture(scope="module")
def running_l2(_nestbed_module_l1: Any) -> Iterator[Guest]:
    with _nestbed_module_l1.get().inner("tiny-x86_64") as g:
        yield g


def test_a_console_wait_in_vain_is_a_console_timeout_at_level_2(running_l2: Guest) -> None:
    started = time.monotonic()
    with pytest.raises(ConsoleTimeout) as info:
        running_l2.machine.expect("nestbed-never-printed", timeout=3)
    assert 3 <= time.monotonic() - started < 30
    assert info.value.level == 2
    assert info.value.headline == "level 2: no 'nestbed-never-printed' on the serial console within 3 s"
    assert running_l2.check_output("echo", "still here") == "still here"


def test_check_output_on_a_failing_l2_command_is_command_failed_with_the_result(running_l2: Guest) -> None:
    with pytest.raises(CommandFailed) as info:
        running_l2.check_output("echo out; echo err >&2; exit 3")
    result = info.value.result
    assert result is not None
    assert (result.exit_status, result.stdout, result.stderr) == (3, "out\n", "err\n")
    assert info.value.command == "echo out; echo err >&2; exit 3"
    assert str(info.value) == "command 'echo out; echo err >&2; exit 3' exited 3: err"


def test_a_reset_whose_loadvm_fails_is_a_reset_error_at_level_2(running_l2: Guest) -> None:
    # A tiny L2 has no disk to keep snapshots in: loadvm of any tag fails, in QEMU's own words.
    running_l2.reset_tag = "nestbed-no-such-snapshot"
    try:
        with pytest.raises(ResetError) as info:
            running_l2.reset(timeout=30)
    finally:
        running_l2.reset_tag = None
    text = str(info.value)
    assert text.startswith("level 2 tiny-x86_64: 'loadvm nestbed-no-such-snapshot': Error: "), text
    assert running_l2.resets == 0
    # QEMU stops the VM for a loadvm and leaves it stopped when the load fails; it runs on after "cont".
    status = running_l2.machine.qmp.cmd("query-status")
    assert status["running"] is False, status
    running_l2.machine.qmp.cmd("cont")
    assert running_l2.check_output("echo", "resumed", timeout=30) == "resumed"
