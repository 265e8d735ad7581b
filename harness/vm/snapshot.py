"""Reset without reboot: return a running guest to its just-booted state in well under a second.

The mechanism is QEMU's internal snapshots, driven by the HMP ``savevm``/``loadvm``
commands sent through QMP's ``human-monitor-command`` (the qemu.qmp connection every
:class:`~harness.vm.machine.Machine` already has; no protocol code here):

* :meth:`Guest.take_reset_point <harness.guest.Guest.take_reset_point>` runs right after the guest printed its ready marker and
  *before* any SSH connection exists.  ``savevm`` stores the CPU, device and RAM state
  (RAM compresses well: pages never touched are zero pages) in the writable qcow2
  overlay that ``snapshot=on`` puts over the image's disk, so the cached image stays
  pristine and the snapshot vanishes with QEMU.  Read-only drives (an L1's payload and
  image disks) are skipped by ``savevm``; an image with no disk at all (the tiny
  initramfs images) gets a small invisible qcow2 drive (``if=none``, no device, also
  ``snapshot=on``) only to hold the state: :func:`state_drive_args`.
* :meth:`Guest.reset <harness.guest.Guest.reset>` closes any SSH connection (the guest's TCP state is about to go
  back to a moment before it existed: the old connection can only be reset by the
  guest), ``loadvm``s, types a fresh marker on the serial console, reconnects SSH if that
  was the guest's transport (while the shell answers the marker), then waits for the
  marker (which also discards whatever the console still held from before) and clears a
  serial transport that a timed-out command had broken.  The ready token stays valid:
  the kernel command line is the same.

After a reset the guest's wall clock is the one of the snapshot (it jumps back by the
time the guest ran since boot); monotonic time inside the guest continues from the
snapshot too.  Everything the guest wrote to its disk since boot is gone, as is every
process it started.

Under TCG with debian-x86_64 (512 MiB): ``savevm`` about 0.5 s, ``loadvm`` 0.1-0.4 s.
"""

from __future__ import annotations

import contextlib
import secrets
import time
from pathlib import Path

from harness.core import paths
from harness.core.publish import publish
from harness.core.run import run
from harness.errors import CapabilityMissing, MachineStateError, ResetError
from harness.vm.machine import QMP_TIMEOUT, Machine, Runstate

RESET_TAG = "nestbed-ready"
SNAPSHOT_TIMEOUT = 120.0  # an L2's savevm writes its RAM through two emulated disks
RESYNC_TIMEOUT = 30.0
STATE_DRIVE_ID = "nbvmstate"
STATE_DRIVE_SIZE = "1M"  # the vmstate lives past the virtual size: the disk itself can be tiny


def hmp(machine: Machine, command: str, *, timeout: float) -> str:
    """Run one HMP *command* through QMP; its text output.  Raises :class:`ResetError` on ``Error:``."""
    if machine.runstate is not Runstate.RUNNING or machine.qmp is None:
        raise MachineStateError(f"machine {machine.spec.name!r}: HMP {command!r} needs a running machine with QMP")
    machine.qmp.settimeout(timeout)
    try:
        out = machine.qmp.cmd("human-monitor-command", **{"command-line": command})
    except Exception as exc:  # qemu.qmp raises its own types (ExecuteError, asyncio timeouts, EOF)
        if machine.poll() is not None:
            machine.raise_exited(f"during HMP {command!r}", cause=exc)
        raise ResetError(f"level {machine.level} {machine.spec.name}: HMP {command!r} failed: "
                         f"{type(exc).__name__}: {exc}") from exc
    finally:
        with contextlib.suppress(Exception):
            machine.qmp.settimeout(QMP_TIMEOUT)
            machine.qmp.clear_events()  # loadvm/savevm emit STOP/RESUME: nobody reads them
    text = str(out or "")
    error = hmp_error(text)
    if error:
        raise ResetError(f"level {machine.level} {machine.spec.name}: {command!r}: {error}")
    return text


def hmp_error(text: str) -> str | None:
    """The first error line of HMP output, or None.

    HMP reports failures as text ("Error: No block device can accept snapshots"), not as
    a QMP error, so the output has to be read.
    """
    return next((ln.strip() for ln in text.splitlines() if ln.strip().lower().startswith("error")), None)


def save(machine: Machine, tag: str = RESET_TAG, *, timeout: float = SNAPSHOT_TIMEOUT) -> float:
    """``savevm TAG``: snapshot the whole running machine; seconds taken."""
    started = time.monotonic()
    try:
        hmp(machine, f"savevm {tag}", timeout=timeout)
    except ResetError as exc:
        if "can accept snapshots" in str(exc) or "does not support" in str(exc):
            raise CapabilityMissing(
                "reset", f"{machine.spec.name}: QEMU cannot snapshot this machine ({exc}); reset needs a "
                         "writable qcow2 disk (snapshot=on) or the state drive") from None
        raise
    return time.monotonic() - started


def load(machine: Machine, tag: str = RESET_TAG, *, timeout: float = SNAPSHOT_TIMEOUT) -> float:
    """``loadvm TAG``: return the machine to the snapshot (it keeps running); seconds taken."""
    started = time.monotonic()
    hmp(machine, f"loadvm {tag}", timeout=timeout)
    return time.monotonic() - started


def resync(machine: Machine, *, timeout: float = RESYNC_TIMEOUT) -> None:
    """Prove the serial shell answers; everything the console held before the marker is dropped."""
    resync_wait(machine, resync_send(machine), timeout=timeout)


def resync_send(machine: Machine) -> str:
    """Type a marker line for the shell to answer; its token.

    The leading newline ends any half-typed line the snapshot may hold; the typed text
    never contains the marker verbatim (``%s``), so only the shell's output matches.
    """
    tok = secrets.token_hex(8)
    machine.send(f"\nprintf '\\n%s-r\\n' {tok}\n")
    return tok


def resync_wait(machine: Machine, tok: str, *, timeout: float = RESYNC_TIMEOUT) -> None:
    machine.expect(rf"\n{tok}-r\n", timeout=timeout, what="the serial shell after a reset")


def state_drive_args() -> tuple[str, ...]:
    """QEMU arguments for an invisible qcow2 drive that holds snapshots of a disk-less guest.

    The empty qcow2 is made once in the cache; ``snapshot=on`` keeps it empty.
    """
    target = paths.cache_root() / "vmstate-empty.qcow2"

    def make(tmp: Path) -> None:
        run(["qemu-img", "create", "-q", "-f", "qcow2", str(tmp), STATE_DRIVE_SIZE], timeout=30,
            what=f"the reset state drive {target}", error=ResetError)

    publish(target, make, what="reset state drive", timeout=120)
    return ("-drive", f"if=none,id={STATE_DRIVE_ID},file={target},format=qcow2,snapshot=on")
