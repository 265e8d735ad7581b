"""A running machine's whole state to a file, and a new QEMU started from it (warm start's mechanism).

QEMU's migration, with a regular file at both ends, is a save and a restore:

* :func:`save_to_file` stops the guest, hands QEMU an open file over QMP (``getfd``, the
  descriptor passed with SCM_RIGHTS on the QMP unix socket), and ``migrate``\\ s to it
  (``fd:NAME``), the bandwidth limit lifted (QEMU's default is 32 MiB/s).  When the status is
  ``completed`` QEMU has written every byte (the file is its own descriptor, no helper process
  in between) and has flushed and released the disks, so the disk overlay can be copied as the
  state's read-only base.  The guest stays paused until :func:`resume`.
* A restore is a launch with ``-incoming fd:N`` (:class:`~harness.vm.machine.Machine`'s
  *incoming*): the same machine shape reads the stream at start-up and runs on from the moment
  it was saved; :func:`wait_incoming` waits for that and says why when it fails.

The policy (what a state is keyed by, where it is cached, when it is dropped) lives in
:mod:`harness.warmstart`; this module only moves the bytes.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import Any

from harness.errors import HarnessError, RestoreError
from harness.vm.machine import Machine

SAVE_TIMEOUT = 120.0
RESTORE_TIMEOUT = 60.0
POLL = 0.02
FD_NAME = "nbwarm"
MAX_BANDWIDTH = 1 << 40  # bytes/s: unlimited, the file is local


def _cmd(machine: Machine, command: str, **args: Any) -> Any:
    if machine.qmp is None:
        raise RestoreError(f"{machine.spec.name}: {command} needs QMP")
    try:
        return machine.qmp.cmd(command, **args)
    except Exception as exc:  # qemu.qmp's ExecuteError, timeouts, EOF
        if machine.poll() is not None:
            machine.raise_exited(f"during QMP {command}", cause=exc)
        raise RestoreError(f"{machine.spec.name}: QMP {command} failed: {type(exc).__name__}: {exc}") from exc


def save_to_file(machine: Machine, path: Path, *, timeout: float = SAVE_TIMEOUT) -> float:
    """Stop the guest and write its whole device and RAM state to *path*; seconds taken.

    The guest is left paused (:func:`resume` runs it on).  Raises :class:`RestoreError` when
    QEMU reports the migration failed or it does not finish within *timeout*.
    """
    started = time.monotonic()
    _cmd(machine, "stop")
    _cmd(machine, "migrate-set-parameters", **{"max-bandwidth": MAX_BANDWIDTH})
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        assert machine.qmp is not None
        machine.qmp.send_fd_scm(fd)
        _cmd(machine, "getfd", fdname=FD_NAME)
    finally:
        os.close(fd)  # QEMU holds its own copy now
    _cmd(machine, "migrate", uri=f"fd:{FD_NAME}")
    status = _wait_migration(machine, timeout, "saving the state")
    if status != "completed":
        raise RestoreError(f"{machine.spec.name}: saving its state to {path} ended {status!r}")
    return time.monotonic() - started


def resume(machine: Machine) -> None:
    """Run a paused (or saved) guest on; QEMU takes its disks back after a migration."""
    _cmd(machine, "cont")


def wait_incoming(machine: Machine, *, timeout: float = RESTORE_TIMEOUT) -> float:
    """Wait until a machine launched with *incoming* runs the restored guest; seconds waited.

    Raises :class:`RestoreError` naming what QEMU said when the stream does not load
    (a different machine shape, a truncated file, a QEMU that cannot read it).
    """
    started = time.monotonic()
    deadline = started + timeout
    try:
        while True:
            if machine.poll() is not None:
                raise RestoreError(f"{machine.spec.name}: QEMU exited while loading its saved state: "
                                   f"{_stderr_line(machine)}")
            status = _cmd(machine, "query-status")
            if status.get("status") == "running":
                return time.monotonic() - started
            mig = _cmd(machine, "query-migrate").get("status")
            if mig == "completed" and status.get("status") == "paused":
                # Saved paused (save_to_file stops the guest first): QEMU does not start it on its own.
                resume(machine)
                continue
            if mig == "failed" or status.get("status") in ("internal-error", "shutdown"):
                raise RestoreError(f"{machine.spec.name}: loading its saved state failed: {_stderr_line(machine)}")
            if time.monotonic() > deadline:
                raise RestoreError(f"{machine.spec.name}: the saved state did not load within {timeout:g} s "
                                   f"(status {status.get('status')!r})")
            time.sleep(POLL)
    except HarnessError as exc:
        if isinstance(exc, RestoreError):
            raise
        # QEMU died under the restore (e.g. "load of migration failed" and exit 1): a failed restore.
        raise RestoreError(f"{machine.spec.name}: loading its saved state failed: {_stderr_line(machine)}") from exc


def _wait_migration(machine: Machine, timeout: float, what: str) -> str:
    deadline = time.monotonic() + timeout
    while True:
        status = str(_cmd(machine, "query-migrate").get("status"))
        if status in ("completed", "failed", "cancelled"):
            return status
        if time.monotonic() > deadline:
            with contextlib.suppress(HarnessError):
                _cmd(machine, "migrate_cancel")
            raise RestoreError(f"{machine.spec.name}: {what} did not finish within {timeout:g} s (status {status!r})")
        time.sleep(POLL)


def _stderr_line(machine: Machine) -> str:
    lines = [ln.strip() for ln in machine.stderr_text().splitlines() if ln.strip()]
    return lines[-1] if lines else "QEMU said nothing on stderr"

