"""Faults, for real: signals mid-boot at level 1 and level 2, hung and frozen guests, sshd
dying under a command, a full disk during a build; and the soak's flake accounting.

What test_boot.py already covers is not repeated here (a harness SIGKILLed/SIGTERMed/
SIGINTed while a *tiny* guest boots, a kernel panic, QEMU killed from outside, a command
timeout over serial).  The nested cases are budgeted: the three signals hit
``nestbed run --level 2`` while its L1 boots (no L1 boot completes), and one L1 boot is
spent on a SIGINT that lands while the L2 boots.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import REPO, nestbed, pid_gone, qemu_pids_under

from harness.core import paths
from harness.errors import CommandTimedOut, ConsoleTimeout, HarnessError, LaunchError, QemuExited, TransportError
from harness.guest import BootOptions, boot
from harness.tools.soak import Outcome, parse_junit, render, tally
from harness.vm import machine
from harness.vm.machine import Machine, sweep_stale_runs

EXIT = {signal.SIGINT: 130, signal.SIGTERM: 143, signal.SIGKILL: -signal.SIGKILL}


# -- helpers ------------------------------------------------------------------------------------

def _ppid(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def _wait_for_qemu(parent: int, name: str, proc: subprocess.Popen[str], timeout: float) -> int:
    """The PID of the QEMU named *name* that *parent* started."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for pid in qemu_pids_under(paths.run_root()):
            try:
                if _ppid(pid) == parent and f"-name\0{name},".encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                    return pid
            except OSError:
                continue
        if proc.poll() is not None:
            raise AssertionError(f"the harness exited ({proc.returncode}) before starting QEMU: "
                                 f"{proc.communicate(timeout=10)}")
        time.sleep(0.05)
    raise AssertionError(f"the harness never started a {name} QEMU")


def _run_dirs_of(pid: int) -> list[Path]:
    return list(paths.run_root().glob(f"*-{pid}-*"))


def _signal_and_check(proc: subprocess.Popen[str], qemu: int, sig: signal.Signals) -> tuple[int, list[Path]]:
    """Send *sig* to the harness; its QEMU must die and its run directories go (at once or by the sweep).

    Returns the exit status and the run directories the harness itself left behind.
    """
    proc.send_signal(sig)
    try:
        rc = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    assert pid_gone(qemu, timeout=15), f"QEMU {qemu} survived {sig.name} of its harness"
    left = _run_dirs_of(proc.pid)
    if left:
        # A harness that could not unwind (SIGKILL, an unhandled SIGTERM) leaves them; the
        # next start sweeps them.
        sweep_stale_runs()
        assert not _run_dirs_of(proc.pid), f"the sweep left {left}"
    return rc, left


# -- signals to `nestbed run --level 2` while L1 boots ---------------------------------------------

@pytest.mark.boot
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL], ids=lambda s: s.name)
def test_nested_run_signalled_while_l1_boots_leaves_no_qemu(tiny_images: None, sig: signal.Signals) -> None:
    # A booting L1, not a restored one (warm start would have it up in a second or two).
    proc = subprocess.Popen([sys.executable, "-m", "harness", "run", "--level", "2", "tiny-x86_64", "--", "true"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "NESTBED_WARM_START": "0"})
    l1 = _wait_for_qemu(proc.pid, "l1-host", proc, timeout=300)
    time.sleep(3)  # well inside L1's boot (it takes 30-60 s under TCG)
    rc, left = _signal_and_check(proc, l1, sig)
    assert rc == EXIT[sig]
    if sig is not signal.SIGKILL:
        assert not left, "an unwinding harness removes its own run directories"
        stderr = proc.stderr.read() if proc.stderr else ""
        assert "Traceback" not in stderr, stderr


@pytest.mark.boot
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=lambda s: s.name)
def test_signal_during_the_qmp_handshake_is_one_line(tiny_images: None, sig: signal.Signals) -> None:
    """QEMU stopped as soon as it exists, so the harness is still waiting for QMP's greeting."""
    proc = subprocess.Popen([sys.executable, "-m", "harness", "run", "tiny-x86_64", "--", "true"], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    qemu = _wait_for_qemu(proc.pid, "tiny-x86_64", proc, timeout=120)
    os.kill(qemu, signal.SIGSTOP)
    try:
        time.sleep(1.0)
        rc, left = _signal_and_check(proc, qemu, sig)
    finally:
        with contextlib.suppress(OSError):
            os.kill(qemu, signal.SIGCONT)
    assert rc == EXIT[sig] and not left
    stderr = proc.stderr.read() if proc.stderr else ""
    # Before the fix: qemu.qmp's "This is a bug in the QMP library" tracebacks and asyncio's
    # "Task exception was never retrieved".
    assert "Traceback" not in stderr and "QMP library" not in stderr, stderr
    assert len(stderr.splitlines()) <= 1, stderr


@pytest.mark.boot
@pytest.mark.timeout(120)  # without the handshake's deadline this waited forever
def test_a_qemu_that_never_greets_on_qmp_is_a_launch_error_at_the_handshake_deadline(
        tiny_images: None, monkeypatch: pytest.MonkeyPatch) -> None:
    # qemu.qmp waits for the greeting with no timeout of its own: a frozen QEMU hung the harness for good.
    monkeypatch.setattr(machine, "QMP_HANDSHAKE_TIMEOUT", 3.0)
    frozen: list[int] = []
    real_connect = Machine._connect_qmp

    def freeze_then_connect(self: Machine, sock):  # type: ignore[no-untyped-def]
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)  # QEMU just started: its greeting is not out yet
        frozen.append(self.proc.pid)
        real_connect(self, sock)

    monkeypatch.setattr(Machine, "_connect_qmp", freeze_then_connect)
    started = time.monotonic()
    with pytest.raises(LaunchError) as info, boot("tiny-x86_64", options=BootOptions(warm_start=False)):
        pass
    assert time.monotonic() - started < 30
    assert info.value.level == 1
    assert info.value.headline == "level 1: no QMP greeting within 3 s (QEMU still running)", info.value.headline
    assert pid_gone(frozen[0], timeout=10), "the frozen QEMU was left behind"


# -- signals to a pytest process that uses the plugin -------------------------------------------------

PLUGIN_L1 = """
def test_boots(boot_guest):
    boot_guest("tiny-x86_64")
"""

PLUGIN_L2 = """
import pytest

@pytest.mark.nestbed_inner("tiny-x86_64")
def test_l2(l1_host, inner_guest):
    print("NESTBED-L1-UP", flush=True)
    inner_guest("tiny-x86_64")
    print("NESTBED-L2-UP", flush=True)
"""


def _pytest_proc(tmp_path: Path, source: str) -> subprocess.Popen[str]:
    (tmp_path / "test_victim.py").write_text(textwrap.dedent(source))
    return subprocess.Popen([sys.executable, "-m", "pytest", "-s", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
                             "test_victim.py"], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env={**os.environ, "NESTBED_WARM_START": "0"})  # signals during real boots


@pytest.mark.boot
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL], ids=lambda s: s.name)
def test_pytest_signalled_while_a_guest_boots_leaves_no_qemu(tiny_images: None, tmp_path: Path,
                                                             sig: signal.Signals) -> None:
    proc = _pytest_proc(tmp_path, PLUGIN_L1)
    qemu = _wait_for_qemu(proc.pid, "tiny-x86_64", proc, timeout=120)
    time.sleep(0.3)  # inside the tiny guest's ~2.5 s boot
    rc, _left = _signal_and_check(proc, qemu, sig)
    # pytest turns SIGINT into "interrupted" (2); it has no SIGTERM handler, so the
    # process dies of the signal and PR_SET_PDEATHSIG takes QEMU with it.
    assert rc == {signal.SIGINT: 2, signal.SIGTERM: -signal.SIGTERM, signal.SIGKILL: -signal.SIGKILL}[sig]


@pytest.mark.boot
def test_pytest_interrupted_while_l2_boots_leaves_no_qemu(tiny_images: None, tmp_path: Path) -> None:
    """One L1 boot: SIGINT lands after L1 is up, while the plugin's inner_guest boots an L2 in it."""
    proc = _pytest_proc(tmp_path, PLUGIN_L2)
    l1 = _wait_for_qemu(proc.pid, "l1-host", proc, timeout=300)
    assert proc.stdout is not None
    seen = []
    deadline = time.monotonic() + 600
    for line in proc.stdout:  # the L1 boot (30-60 s, more under load)
        seen.append(line)
        if "NESTBED-L1-UP" in line or time.monotonic() > deadline:
            break
    assert "NESTBED-L1-UP" in "".join(seen), "".join(seen)
    time.sleep(3.0)  # the L2 QEMU has been started in L1 by now; it needs several more seconds to boot
    started = time.monotonic()
    rc, left = _signal_and_check(proc, l1, signal.SIGINT)
    out = "".join(seen) + (proc.stdout.read() or "")
    assert "NESTBED-L2-UP" not in out, "the signal came too late: L2 was already up"
    assert rc == 2, out[-3000:]
    assert time.monotonic() - started < 120
    assert not left, "an interrupted pytest unwinds and removes its run directories"


# -- hung and frozen guests, sshd killed ------------------------------------------------------------

@pytest.mark.boot
def test_init_that_never_signals_ready_is_a_console_timeout_with_the_tail(tiny_images: None) -> None:
    # busybox as init, sleeping: the kernel boots, init runs, the ready marker never comes.
    # loglevel=7 so the kernel's own lines make a serial tail to show.
    opts = BootOptions(append="loglevel=7 rdinit=/bin/busybox -- sleep 100000", ready_timeout=20)
    started = time.monotonic()
    with pytest.raises(ConsoleTimeout) as info, boot("tiny-x86_64", options=opts):
        pass
    assert 20 <= time.monotonic() - started < 60
    assert "ready marker" in str(info.value)
    assert "as init process" in info.value.serial_tail, info.value.serial_tail[-2000:]
    assert "--- serial console (tail) ---" in str(info.value)


@pytest.mark.boot
def test_a_guest_that_resets_itself_is_named_a_reset(tiny_images: None) -> None:
    # With -no-reboot a guest reset (a reboot, or the triple fault of a broken CPU emulation)
    # ends QEMU with status 0, like a poweroff: the error tells them apart by QMP's SHUTDOWN reason.
    with boot("tiny-x86_64") as g, pytest.raises(QemuExited) as info:
        g.run("echo b > /proc/sysrq-trigger; sleep 30", timeout=60)
    assert info.value.returncode == 0 and info.value.reason == "guest-reset", str(info.value)
    assert "(exit status 0, the guest reset the machine: a reboot or a triple fault)" in info.value.headline


@pytest.mark.boot
def test_ssh_faults_are_typed_and_bounded(tiny_images: None) -> None:
    with boot("debian-x86_64", via="ssh") as g:
        ssh = g.connect_ssh()
        assert g.machine.proc is not None
        qemu = g.machine.proc.pid

        # A command that never reads its stdin: the upload must stop at the timeout.
        started = time.monotonic()
        with pytest.raises(CommandTimedOut):
            ssh.run("sleep 60", stdin=b"\0" * (16 << 20), timeout=3)
        assert time.monotonic() - started < 15

        # The whole guest frozen (QEMU stopped): a typed error within the timeout, and it recovers.
        os.kill(qemu, signal.SIGSTOP)
        try:
            started = time.monotonic()
            with pytest.raises((CommandTimedOut, TransportError)):
                ssh.run("echo", "frozen", timeout=3)
            assert time.monotonic() - started < 15
        finally:
            os.kill(qemu, signal.SIGCONT)
        assert ssh.run("echo", "thawed", timeout=60).stdout == "thawed\n"

        # Frozen at the worst moment: after the channel opened, before sshd answers "exec".
        import paramiko

        real_open = paramiko.Transport.open_session

        def open_then_freeze(self: paramiko.Transport, *args: object, **kw: object) -> paramiko.Channel:
            chan = real_open(self, *args, **kw)
            os.kill(qemu, signal.SIGSTOP)
            return chan

        thaw = threading.Timer(60, os.kill, (qemu, signal.SIGCONT))  # a regression must not hang the suite
        thaw.start()
        paramiko.Transport.open_session = open_then_freeze
        try:
            started = time.monotonic()
            with pytest.raises((CommandTimedOut, TransportError)):
                ssh.run("echo", "frozen", timeout=3)
            assert time.monotonic() - started < 15, "waited for the exec answer past the timeout"
        finally:
            paramiko.Transport.open_session = real_open
            thaw.cancel()
            os.kill(qemu, signal.SIGCONT)
        assert ssh.run("echo", "thawed again", timeout=60).stdout == "thawed again\n"

        # sshd killed inside the guest while a command runs over it.
        caught: list[BaseException] = []

        def long_command() -> None:
            try:
                ssh.run("sleep 60; echo never", timeout=120)
            except BaseException as exc:  # noqa: B036 - handed to the test thread
                caught.append(exc)

        worker = threading.Thread(target=long_command)
        worker.start()
        time.sleep(2)
        started = time.monotonic()
        g.serial.run("pkill -9 -x sshd")
        worker.join(timeout=60)
        assert not worker.is_alive(), "the SSH command kept waiting on a dead connection"
        assert time.monotonic() - started < 30
        assert len(caught) == 1 and isinstance(caught[0], TransportError), caught
        assert "connection" in str(caught[0])
        # The serial console is independent of sshd.
        assert g.serial.run("echo", "serial still works").stdout == "serial still works\n"
        with pytest.raises(HarnessError):
            ssh.run("true", timeout=10)


# -- the cache's disk fills up during a build ------------------------------------------------------

@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 16 MiB tmpfs for the cache: a tiny image's apt indexes alone are bigger."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m,mode=0700", "tmpfs", str(mnt)], check=True,
                       capture_output=True, timeout=30)
    except (subprocess.CalledProcessError, OSError) as exc:
        pytest.skip(f"cannot mount a small tmpfs here: {exc}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True, timeout=30)


def _build_in_session(env: dict[str, str], timeout: float) -> tuple[int, str]:
    """`nestbed images build tiny-x86_64` in its own process group, all of it killed on a timeout
    (killing only nestbed would leave mmdebstrap and apt running)."""
    proc = subprocess.Popen([sys.executable, "-m", "harness", "images", "build", "tiny-x86_64"], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=30)
        pytest.fail(f"the build on a full disk did not end within {timeout:g} s")
    return proc.returncode, stderr


@pytest.mark.boot  # no QEMU, but mmdebstrap and (for "during-apt") the machine's apt sources
@pytest.mark.parametrize("when", ["already-full", "fills-during-apt"])
def test_full_cache_disk_fails_the_build_clearly_and_marks_nothing_built(small_tmpfs: Path, when: str) -> None:
    env = {**os.environ, "NESTBED_CACHE": str(small_tmpfs)}
    if when == "already-full":
        # nestbed's own writes fail (the apt sources file, before any download).
        (small_tmpfs / "images").mkdir(mode=0o700)
        with open(small_tmpfs / "ballast", "wb") as f, contextlib.suppress(OSError):
            while True:
                f.write(b"\0" * 65536)
    rc, stderr = _build_in_session(env, timeout=300)
    assert rc == 125, stderr
    assert "Traceback" not in stderr, stderr
    line = next(ln for ln in stderr.splitlines() if ln.startswith("nestbed: error:"))
    assert "no space left on device" in line, stderr
    images = small_tmpfs / "images"
    assert not list(images.glob("*/manifest.json")), "a build that ran out of space was marked built"
    assert not list(images.glob(".*.part*")), "the failed build left its work directory behind"
    (small_tmpfs / "ballast").unlink(missing_ok=True)
    listed = nestbed("images", "list", "--json", env=env, timeout=60)
    assert '"name": "tiny-x86_64"' in listed.stdout and '"built": true' not in listed.stdout


# -- soak: flake accounting on synthetic JUnit files ----------------------------------------------------

def _junit(path: Path, cases: dict[str, str]) -> Path:
    """A pytest-style JUnit file: name -> passed/failed/error/skipped/teardown-error."""
    body = []
    for name, outcome in cases.items():
        inner = {"passed": "", "failed": '<failure message="assert 0">tb</failure>',
                 "error": '<error message="setup failed">tb</error>', "skipped": '<skipped message="no kvm"/>',
                 "teardown-error": '<error message="teardown failed">tb</error>'}[outcome]
        body.append(f'<testcase classname="scenarios.test_boot" name="{name}" time="1.0">{inner}</testcase>')
        if outcome == "teardown-error":  # pytest writes the call's pass and the teardown's error as two cases
            body.insert(len(body) - 1, f'<testcase classname="scenarios.test_boot" name="{name}" time="1.0"/>')
    path.write_text('<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" tests="1">'
                    + "".join(body) + "</testsuite></testsuites>")
    return path


def test_soak_counts_flakes_broken_tests_and_runs_without_results(tmp_path: Path) -> None:
    runs = [
        {"test_a": "passed", "test_b": "passed", "test_c": "failed", "test_d": "skipped", "test_e": "passed"},
        {"test_a": "passed", "test_b": "failed", "test_c": "failed", "test_d": "skipped", "test_e": "teardown-error"},
        {"test_a": "passed", "test_b": "passed", "test_c": "error", "test_d": "skipped", "test_e": "passed"},
    ]
    results = [parse_junit(_junit(tmp_path / f"run-{i}.xml", r)) for i, r in enumerate(runs, start=1)]
    assert results[1]["scenarios.test_boot::test_e"] is Outcome.ERROR
    report = tally([*results, None], {4: "timed out after 3600 s"})
    assert report.runs == 4
    assert list(report.flakes) == ["scenarios.test_boot::test_b", "scenarios.test_boot::test_e"]
    assert report.flakes["scenarios.test_boot::test_b"].failed_runs == [2]
    assert list(report.broken) == ["scenarios.test_boot::test_c"]
    assert report.tests["scenarios.test_boot::test_d"].skipped == 3
    assert not report.green
    text = render(report)
    assert "FLAKY   scenarios.test_boot::test_b: passed 2, failed 1 (runs 2)" in text
    assert "BROKEN  scenarios.test_boot::test_c" in text
    assert "run 4: no results: timed out after 3600 s" in text
    assert text.endswith("flakes: 2  broken: 1  run errors: 1")


def test_soak_all_passing_is_green_and_bad_junit_is_refused(tmp_path: Path) -> None:
    good = [parse_junit(_junit(tmp_path / f"ok-{i}.xml", {"test_a": "passed", "test_b": "skipped"})) for i in (1, 2)]
    report = tally(good)
    assert report.green and not report.flakes and render(report).endswith("flakes: 0  broken: 0  run errors: 0")
    truncated = tmp_path / "cut.xml"
    truncated.write_text('<?xml version="1.0"?><testsuites><testsuite><testcase name="x"')
    with pytest.raises(HarnessError, match="not a readable JUnit XML file"):
        parse_junit(truncated)
    other = tmp_path / "other.xml"
    other.write_text("<html/>")
    with pytest.raises(HarnessError, match="root element <html>"):
        parse_junit(other)


def test_soak_selects_a_matrix_tier_as_report_does_and_anything_else_by_marker(tmp_path: Path) -> None:
    from harness.core import paths
    from harness.tools.soak import selection

    builtin = paths.builtin_dir("scenarios")
    # nightly: the tier's rules too (its nested cells are included by level, whatever their markers).
    assert selection("nightly", builtin) == ["--nestbed-matrix", str(builtin / "matrix.toml"), "--nestbed-tier",
                                             "nightly"]
    assert selection("kvm-l1", builtin)[-1] == "kvm-l1"  # a host kind is a tier of its cells
    assert selection("smoke and not slow", builtin) == ["-m", "smoke and not slow"]
    own = tmp_path / "mine"
    own.mkdir()
    assert selection("smoke", own)[1] == str(builtin / "matrix.toml")  # no matrix of its own: nestbed's
    (own / "matrix.toml").write_text('version = 1\n[axes.arch]\nparams = ["arch"]\n[tiers.weekly]\nmarkers = ["weekly"]\n')
    assert selection("weekly", own) == ["--nestbed-matrix", str(own / "matrix.toml"), "--nestbed-tier", "weekly"]
    assert selection("smoke", own) == ["-m", "smoke"]  # not a tier there


def test_soak_cli_refuses_zero_runs(tmp_path: Path) -> None:
    proc = nestbed("soak", "--runs", "0", "--out", str(tmp_path), timeout=60)
    assert proc.returncode == 125 and "--runs must be at least 1" in proc.stderr


def test_soak_run_that_collects_nothing_is_not_green(tmp_path: Path) -> None:
    from harness.tools.soak import run_soak

    report = run_soak(1, tier="nestbed_no_such_marker", out_dir=tmp_path, timeout=300)
    assert not report.green and not report.tests
    assert report.run_errors == {1: "pytest exited 5 (no tests collected: is --tier a marker?)"}
