"""One QEMU process: launch, console, QMP, graceful-then-hard shutdown.

No QEMU outlives the harness:

* ``with Machine(...)`` always shuts down (powerdown → QMP quit → kill, each bounded);
* QEMU is started with ``PR_SET_PDEATHSIG=SIGKILL``, so it dies with the harness
  process even when that is SIGKILLed;
* each launch owns a run directory (0700) holding the owner's PID and QEMU's pidfile;
  :func:`sweep_stale_runs` (called at every launch) kills QEMUs whose owner is gone
  and removes their directories.
"""

from __future__ import annotations

import contextlib
import ctypes
import enum
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import IO, Any, NoReturn

import pexpect

from harness.core import paths
from harness.core import programs as tools
from harness.core.watchdog import Watchdog
from harness.errors import (
    ConsoleTimeout,
    GuestFrozen,
    GuestPanic,
    LaunchError,
    MachineStateError,
    QemuCrashed,
    QemuExited,
)
from harness.vm.console import SocketSpawn, open_log
from harness.vm.spec import Chardev, Endpoints, MachineSpec, build_argv, resolve_ports, unallocated_forwards

log = logging.getLogger(__name__)

PANIC_RE = r"Kernel panic - not syncing[^\n]*"
QMP_TIMEOUT = 10.0
QMP_HANDSHAKE_TIMEOUT = 60.0  # QEMU's greeting and the capabilities reply; qemu.qmp's connect() has no timeout
POWERDOWN_TIMEOUT = 20.0
QUIT_TIMEOUT = 5.0
KILL_TIMEOUT = 5.0
EVENT_WAIT = 2.0  # how long an exited QEMU's last QMP events are waited for
# QMP SHUTDOWN reasons that explain an unexpected exit (QEMU runs with -no-reboot).
SHUTDOWN_REASONS = {
    "guest-reset": "the guest reset the machine: a reboot or a triple fault",
    "guest-shutdown": "the guest powered off",
    "guest-panic": "the guest panicked (pvpanic)",
    "host-signal": "QEMU got a signal",
    "host-qmp-quit": "quit over QMP",
}


def exit_message(rc: int | None, reason: str | None, why: str) -> str:
    """The headline of :class:`QemuExited` (the Makefile's rerun patterns match it: tests/test_units.py)."""
    said = f", {SHUTDOWN_REASONS.get(reason, 'QMP SHUTDOWN reason ' + reason)}" if reason else ""
    return f"QEMU exited unexpectedly (exit status {rc}{said}): {why}"


def crash_message(rc: int | None, stderr: str) -> str:
    """The headline of :class:`QemuCrashed`: the signal (or exit status) and QEMU's own "qemu: fatal:" line.
    The Makefile's rerun patterns match it too (tests/test_units.py)."""
    first = next((ln for ln in stderr.splitlines() if "qemu: fatal:" in ln), "")
    sig = f"killed by signal {-rc}" if rc is not None and rc < 0 else f"exit status {rc}"
    return f"QEMU crashed ({sig}) {first}".strip()


PR_SET_PDEATHSIG = 1


class Runstate(enum.Enum):
    IDLE = "idle"
    RUNNING = "running"
    SHUTDOWN = "shutdown"


def _set_pdeathsig() -> None:  # runs in the child between fork and exec
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    # The parent may have died between fork and prctl.
    if os.getppid() == 1:
        os._exit(1)


def free_ports(count: int) -> list[int]:
    """*count* currently free loopback TCP ports."""
    socks, ports = [], []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale_runs(run_root: Path | None = None) -> list[int]:
    """Kill QEMUs left by dead harness processes and remove their run directories.

    Returns the PIDs killed.  A QEMU is only killed when its command line names the
    stale run directory, so a recycled PID is never hit.
    """
    root = run_root or paths.run_root()
    killed: list[int] = []
    if not root.is_dir():
        return killed
    for run in root.iterdir():
        try:
            owner = int((run / "owner").read_text())
        except (OSError, ValueError):
            # Half-created directory: only reap it once it is clearly old.  Gone meanwhile: its owner
            # finished, or another process's sweep took it.
            try:
                if time.time() - run.stat().st_mtime < 60:
                    continue
            except FileNotFoundError:
                continue
            owner = 0
        if owner and _pid_alive(owner):
            continue
        with contextlib.suppress(OSError, ValueError):
            qpid = int((run / "qemu.pid").read_text())
            cmdline = Path(f"/proc/{qpid}/cmdline").read_bytes()
            if str(run).encode() in cmdline:
                os.kill(qpid, signal.SIGKILL)
                killed.append(qpid)
        shutil.rmtree(run, ignore_errors=True)
    return killed


class Machine:
    """A QEMU process and its serial console and QMP connection.

    ::

        with Machine(spec, log_dir=...) as m:
            m.expect("login:", timeout=30)

    Direct user configuration is the frozen ``spec``; everything else is run state.
    """

    def __init__(self, spec: MachineSpec, *, log_dir: Path | None = None, level: int = 1,
                 qmp: bool = True, token: str | None = None, incoming: Path | None = None,
                 log_note: str | None = None) -> None:
        self.spec = spec
        # A saved state (harness/vm/migrate.py) this QEMU starts from instead of booting.
        self.incoming = incoming
        self.log_note = log_note  # the serial log's first line, e.g. "restored from a saved state"
        self.level = level
        self.use_qmp = qmp
        self.log_dir = log_dir
        self.token = token or secrets.token_hex(6)
        # run state
        self.runstate = Runstate.IDLE
        self.run_dir: Path | None = None
        self.argv: list[str] = []
        self.resolved: MachineSpec = spec
        self.proc: subprocess.Popen[bytes] | None = None
        self.console: SocketSpawn | None = None
        self.qmp: Any = None
        self.serial_log_path: Path | None = None
        self.stderr_path: Path | None = None
        self._serial_log: IO[bytes] | None = None
        self._launched_at = 0.0
        self.killed_because: str | None = None  # set when nestbed killed a QEMU whose guest froze

    # -- lifecycle ---------------------------------------------------------------------

    def __enter__(self) -> Machine:
        self.launch()
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def _require(self, *states: Runstate) -> None:
        if self.runstate not in states:
            raise MachineStateError(
                f"machine {self.spec.name!r} is {self.runstate.value}; needs {'/'.join(s.value for s in states)}")

    @property
    def host_ports(self) -> dict[int, int]:
        """guest port → host port of every forward."""
        return {f.guest_port: f.host_port for nic in self.resolved.nics for f in nic.forwards}

    def launch(self) -> None:
        self._require(Runstate.IDLE)
        try:
            self._prepare()
            self._launch()
        except BaseException:
            self._teardown()
            raise

    def _prepare(self) -> None:
        """Run and log directories (L0 side, for every level)."""
        sweep_stale_runs()
        self.run_dir = paths.new_run_dir(self.spec.name)
        if self.log_dir is None:
            self.log_dir = paths.new_log_dir(self.spec.name)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.serial_log_path = self.log_dir / f"{self.spec.name}-serial.log"
        self.stderr_path = self.log_dir / f"{self.spec.name}-qemu.stderr"
        self._serial_log = open_log(self.serial_log_path)
        if self.log_note:
            self._serial_log.write(f"[nestbed] {self.log_note}\n".encode())

    def _launch(self) -> None:
        """Start QEMU on this host with socketpairs for serial and QMP."""
        assert self.run_dir is not None and self.stderr_path is not None
        self.resolved = resolve_ports(self.spec, free_ports(unallocated_forwards(self.spec)))
        ser_ours, ser_qemu = socket.socketpair()
        qmp_ours = qmp_qemu = None
        if self.use_qmp:
            qmp_ours, qmp_qemu = socket.socketpair()
        state_fd = os.open(self.incoming, os.O_RDONLY) if self.incoming is not None else None
        try:
            endpoints = Endpoints(
                serial=Chardev(fd=ser_qemu.fileno()),
                qmp=Chardev(fd=qmp_qemu.fileno()) if qmp_qemu else None,
                pidfile=self.run_dir / "qemu.pid",
                extra=("-incoming", f"fd:{state_fd}") if state_fd is not None else (),
            )
            self.argv = build_argv(self.resolved, endpoints)
            if shutil.which(self.argv[0]) is None:
                raise LaunchError(tools.missing(self.argv[0]), level=self.level)
            stderr = open(self.stderr_path, "wb")  # noqa: SIM115
            log.info("launching %s", " ".join(self.argv))
            self._launched_at = time.monotonic()
            try:
                self.proc = subprocess.Popen(
                    self.argv, stdin=subprocess.DEVNULL, stdout=stderr, stderr=stderr,
                    pass_fds=[s.fileno() for s in (ser_qemu, qmp_qemu) if s is not None]
                    + ([state_fd] if state_fd is not None else []),
                    preexec_fn=_set_pdeathsig, close_fds=True,
                )
            finally:
                stderr.close()
            (self.run_dir / "owner").write_text(str(os.getpid()))
        finally:
            ser_qemu.close()
            if qmp_qemu is not None:
                qmp_qemu.close()
            if state_fd is not None:
                os.close(state_fd)
        self._attach(ser_ours, qmp_ours)

    def _attach(self, serial: Any, qmp: socket.socket | None) -> None:
        """Start reading the console and connect QMP (QEMU is running)."""
        assert self._serial_log is not None
        self.console = SocketSpawn(serial, self._serial_log,
                                   note=f"[nestbed] {self.log_note}\n".encode() if self.log_note else b"")
        self.runstate = Runstate.RUNNING
        if qmp is not None:
            self._connect_qmp(qmp)

    # -- process hooks (overridden for QEMUs that run inside another guest) --------------

    def blame_outer(self) -> None:
        """Raise the error of the level this machine runs in if that level has died (no-op at level 1)."""

    def poll(self) -> int | None:
        """QEMU's exit status if it has exited, else None."""
        return self.proc.poll() if self.proc is not None else None

    def wait(self, timeout: float) -> int | None:
        """Wait for QEMU to exit on its own; its status, or None on timeout."""
        if self.proc is None:
            return None
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def hard_kill(self) -> int | None:
        """SIGKILL QEMU now (no powerdown, no QMP) and reap it; its exit status, or None if it never started."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.kill()
        try:
            return self.proc.wait(timeout=KILL_TIMEOUT)
        except subprocess.TimeoutExpired:  # pragma: no cover - D state
            log.error("QEMU pid %d did not die after SIGKILL", self.proc.pid)
            return None

    def connector(self, port: int) -> Any:
        """None: forwarded guest ports are reached directly on 127.0.0.1 (see InnerMachine)."""
        return None

    def _blame(self) -> None:
        """Hook: raise the error of an outer level that died (nested machines)."""

    def _connect_qmp(self, sock: socket.socket) -> None:
        from qemu.qmp.legacy import QEMUMonitorProtocol

        self.qmp = QEMUMonitorProtocol(sock, nickname=self.spec.name)
        # qemu.qmp waits for the greeting with no timeout: a QEMU that never sends it (frozen, or an L1
        # that froze on the way) would hang us.  Shutting the socket down at the deadline ends that wait
        # (a shutdown, not a close: no file descriptor is freed under qemu.qmp's feet).
        guard = Watchdog(QMP_HANDSHAKE_TIMEOUT, lambda: sock.shutdown(socket.SHUT_RDWR))
        try:
            self.qmp.settimeout(QMP_TIMEOUT)
            with guard:
                self.qmp.connect()
            if guard.fired:  # it fired as the handshake finished: the socket is shut all the same
                raise TimeoutError("the socket was shut at the deadline")
        except (KeyboardInterrupt, SystemExit):
            # Interrupted mid-handshake (Ctrl-C, SIGTERM): qemu.qmp's event loop, resumed by the
            # teardown, logs tracebacks about the dead connection ("This is a bug in the QMP
            # library", "Task exception was never retrieved"); the interruption is the whole story.
            for name in ("qemu.qmp", "asyncio"):
                logging.getLogger(name).setLevel(logging.CRITICAL + 1)
            raise
        except Exception as exc:
            why = (f"no QMP greeting within {QMP_HANDSHAKE_TIMEOUT:g} s" if guard.fired
                   else f"QMP handshake failed: {exc}")
            # A QEMU that died (a bad option, a crash) closes the socket: its exit is the error.  One that
            # is still running is stuck, or sent something the handshake did not expect: that is no exit.
            self._blame()
            if self.wait(KILL_TIMEOUT) is None:
                raise LaunchError(f"{why} (QEMU still running)", level=self.level,
                                  serial_tail=self.serial_tail(), stderr_tail=self.stderr_text()) from exc
            self.raise_exited(why, cause=exc)

    @property
    def uptime(self) -> float:
        return time.monotonic() - self._launched_at

    # -- diagnostics ---------------------------------------------------------------------

    def serial_tail(self) -> str:
        return self.console.tail() if self.console else ""

    def stderr_text(self) -> str:
        if self.stderr_path and self.stderr_path.exists():
            return self.stderr_path.read_bytes().decode("utf-8", "replace")
        return ""

    def screendump(self, path: Path, *, timeout: float = QMP_TIMEOUT) -> Path:
        """Save what the guest's VGA screen shows now (QMP ``screendump``); the file written.

        PNG when this QEMU can (``format=png``, QEMU 7.1 and later with libpng): *path* with a ``.png``
        suffix; otherwise PPM, the format every QEMU writes, with ``.ppm``.  Needs a VGA device
        (``MachineSpec.vga``) and QMP; the file is written by QEMU itself, so it must be on QEMU's host.
        """
        self._require(Runstate.RUNNING)
        if self.qmp is None:
            raise MachineStateError(f"machine {self.spec.name!r} has no QMP connection: no screendump")
        self.qmp.settimeout(timeout)
        png = path.with_suffix(".png")
        try:
            self.qmp.cmd("screendump", filename=str(png), format="png")
            return png
        except Exception as exc:  # noqa: BLE001 - an older QEMU refuses the argument: fall back to PPM
            log.info("screendump as PNG failed (%s); writing PPM", exc)
        ppm = path.with_suffix(".ppm")
        self.qmp.cmd("screendump", filename=str(ppm))
        return ppm

    def raise_exited(self, why: str, cause: BaseException | None = None) -> NoReturn:
        """Raise the typed error for a QEMU that is gone (or going)."""
        self._blame()
        rc = self.wait(KILL_TIMEOUT)
        stderr = self.stderr_text()
        kw: dict[str, Any] = dict(serial_tail=self.serial_tail(), stderr_tail=stderr, level=self.level)
        if self.killed_because:
            raise GuestFrozen(f"{self.killed_because}: {why}", **kw) from cause
        if "qemu: fatal:" in stderr or (rc is not None and rc < 0):
            raise QemuCrashed(crash_message(rc, stderr), returncode=rc, **kw) from cause
        reason = self.shutdown_reason() if rc == 0 else None
        raise QemuExited(exit_message(rc, reason, why), returncode=rc, reason=reason, **kw) from cause

    def shutdown_reason(self) -> str | None:
        """The ``reason`` of the SHUTDOWN event QEMU sent on QMP before it exited, if any.

        ``guest-reset`` is a guest that reset the machine (a reboot or a triple fault:
        with ``-no-reboot`` QEMU exits 0), ``guest-shutdown`` a poweroff, ``guest-panic``
        pvpanic.  Only events nobody consumed are seen; bounded by ``EVENT_WAIT``.
        """
        if self.qmp is None:
            return None
        deadline = time.monotonic() + EVENT_WAIT
        try:
            while (left := deadline - time.monotonic()) > 0:
                ev = self.qmp.pull_event(wait=float(left))
                if ev and ev.get("event") == "SHUTDOWN":
                    reason = ev.get("data", {}).get("reason")
                    return str(reason) if reason else None
        except Exception:  # noqa: BLE001 - a closed or timed-out QMP just means "unknown"
            return None
        return None

    # -- console -------------------------------------------------------------------------

    def expect(self, pattern: str, *, timeout: float, what: str | None = None) -> re.Match[str]:
        """Wait for regex *pattern* on the serial console.

        Raises :class:`GuestPanic` as soon as the kernel panics, :class:`QemuExited` /
        :class:`QemuCrashed` as soon as QEMU is gone, :class:`ConsoleTimeout` otherwise.
        """
        self._require(Runstate.RUNNING)
        assert self.console is not None
        idx = self.console.expect([pattern, PANIC_RE, pexpect.EOF, pexpect.TIMEOUT], timeout=timeout)
        if idx == 0:
            match: re.Match[str] = self.console.match
            return match
        if idx == 1:
            headline = self.console.match.group(0).strip()
            # Give the panic's backtrace a moment to arrive so the error shows it.
            with contextlib.suppress(pexpect.TIMEOUT, pexpect.EOF):
                self.console.expect([r"end Kernel panic[^\n]*", pexpect.EOF], timeout=2)
            raise GuestPanic(f"guest kernel panicked: {headline}",
                             serial_tail=self.serial_tail(), stderr_tail=self.stderr_text(), level=self.level)
        if idx == 2 or self.poll() is not None:
            self.raise_exited(f"while waiting for {what or repr(pattern)}")
        raise ConsoleTimeout(what or repr(pattern), timeout, serial_tail=self.serial_tail(),
                             stderr_tail=self.stderr_text(), level=self.level)

    def before_match(self) -> str:
        """What the console printed between the previous match and the last :meth:`expect`'s match."""
        assert self.console is not None
        before: str = self.console.before
        return before

    def send(self, text: str) -> None:
        self._require(Runstate.RUNNING)
        assert self.console is not None
        try:
            self.console.send(text)
        except OSError as exc:
            self.raise_exited(f"serial console write failed: {exc}", cause=exc)

    # -- shutdown ------------------------------------------------------------------------

    def shutdown(self, *, powerdown_timeout: float = POWERDOWN_TIMEOUT) -> int | None:
        """Stop QEMU: ACPI powerdown, then QMP quit, then SIGKILL; each step bounded.

        Idempotent; always releases the console, QMP and run directory.
        """
        if self.runstate is not Runstate.RUNNING:
            return self._teardown()
        rc = None
        try:
            if self.poll() is None and self.qmp is not None:
                with contextlib.suppress(Exception):
                    self.qmp.cmd("system_powerdown")
                    rc = self.wait(powerdown_timeout)
                if rc is None and self.poll() is None:
                    with contextlib.suppress(Exception):
                        self.qmp.cmd("quit")
                    rc = self.wait(QUIT_TIMEOUT)
        finally:
            rc = self._teardown()
        return rc

    def kill(self) -> int | None:
        """Hard stop, no questions asked."""
        return self._teardown()

    def _teardown(self) -> int | None:
        if self.runstate is Runstate.SHUTDOWN:
            return self.poll()
        rc = self.hard_kill()
        if self.qmp is not None:
            with contextlib.suppress(Exception):
                self.qmp.close()
            self.qmp = None
        if self.console is not None:
            self.console.close()
        if self._serial_log is not None:
            self._serial_log.close()
            self._serial_log = None
        if self.run_dir is not None:
            shutil.rmtree(self.run_dir, ignore_errors=True)
        self.runstate = Runstate.SHUTDOWN
        return rc
