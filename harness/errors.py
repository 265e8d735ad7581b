"""Every error the harness raises.

The tree::

    HarnessError
    ├── UsageError                 bad argument or unknown name (CLI exit 125)
    │   └── ReportError            a report.json/fleet.json that is not one (harness.reports.model)
    ├── RecipeError(file, key, reason)
    │   └── MatrixError            a bad matrix file (harness.reports.matrix)
    ├── ImageBuildError            a build step failed; nothing was marked built
    ├── ImageNotBuilt(name)
    ├── CacheError                 a cache artifact could not be published (lock held too long, ...)
    ├── MachineStateError          machine used in the wrong state (not running, ...)
    ├── ResetError                 a snapshot could not be taken or restored (QEMU's message included)
    ├── LaunchError                QEMU could not be started, or exited before it was usable
    ├── GuestError                 the guest or its QEMU failed while we watched it
    │   ├── GuestPanic             "Kernel panic" on the serial console
    │   ├── QemuExited             QEMU exited unexpectedly (status, QMP SHUTDOWN reason, stderr tail)
    │   │   └── QemuCrashed        QEMU aborted ("qemu: fatal: ...", signal); carries the dump
    │   ├── GuestFrozen            no answer on SSH nor on the serial console: nestbed killed QEMU
    │   └── ConsoleTimeout(pattern) waited on the console in vain
    ├── CommandError(command, result)  a guest command went wrong
    │   ├── CommandTimedOut(command)   it outlived its timeout (also a GuestError: it carries the tails)
    │   └── CommandFailed(result)      ``check_output`` on a non-zero exit status
    ├── TransportError             an SSH/serial transport broke
    ├── GuestOutputError           a guest printed what its parser cannot read (harness.guestfacts)
    ├── DiskFormatError            a disk-format hop or its verification failed (harness.diskfmt)
    ├── CapabilityMissing(feature, hint)  this host cannot do it (the plugin skips)
    └── SetupMissing               a program or file nestbed's setup installs is not there (a failure, never a skip)

The last group's classes live beside the code that raises them; the rest are here.

Errors that come from a guest carry ``serial_tail`` and ``stderr_tail`` so that a
failure message shows what the guest and QEMU last said.  The library never calls
``sys.exit``; only :mod:`harness.cli` turns these into exit codes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from harness.transport.base import CommandResult

TAIL_LINES = 25


def tail(text: str, lines: int = TAIL_LINES) -> str:
    """The last *lines* lines of *text*, stripped of NULs and trailing blanks."""
    rows = text.replace("\x00", "").rstrip().splitlines()
    return "\n".join(rows[-lines:])


def headline(what: BaseException | str) -> str:
    """The first line of a message or an error's message (an error with none: its type name)."""
    lines = (what if isinstance(what, str) else str(what)).strip().splitlines()
    if lines:
        return lines[0]
    return "" if isinstance(what, str) else type(what).__name__


class HarnessError(Exception):
    """Base of all nestbed errors."""


class UsageError(HarnessError):
    """A bad argument, an unknown image name, a malformed option."""


class RecipeError(HarnessError):
    def __init__(self, file: str, key: str, reason: str) -> None:
        self.file, self.key, self.reason = file, key, reason
        super().__init__(f"{file}: {key}: {reason}")


class ResetError(HarnessError):
    """A snapshot could not be taken or restored (QEMU's own message included)."""


class RestoreError(HarnessError):
    """A saved machine state could not be written or loaded (warm start falls back to a boot)."""


class CacheError(HarnessError):
    """A cache artifact could not be published: its lock was held too long, or its builder wrote nothing."""


class ImageBuildError(HarnessError):
    """An image build step failed; the image is not marked built."""


class ImageNotBuilt(HarnessError):
    def __init__(self, name: str) -> None:
        self.name = name
        super().__init__(f"image {name!r} is not built (run: nestbed images build {name})")


class MachineStateError(HarnessError):
    """The machine is not in a state that allows this operation."""


class _WithTails(HarnessError):
    """An error that shows the last serial and stderr lines."""

    def __init__(self, message: str, *, serial_tail: str = "", stderr_tail: str = "",
                 level: int | None = None) -> None:
        self.message = message
        self.serial_tail = serial_tail
        self.stderr_tail = stderr_tail
        self.level = level
        super().__init__(message)

    def __str__(self) -> str:
        parts = [self.message if self.level is None else f"level {self.level}: {self.message}"]
        if self.stderr_tail:
            parts.append("--- QEMU stderr (tail) ---\n" + tail(self.stderr_tail))
        if self.serial_tail:
            parts.append("--- serial console (tail) ---\n" + tail(self.serial_tail))
        return "\n".join(parts)

    @property
    def headline(self) -> str:
        """The first line of the message: what the CLI prints."""
        return headline(self)


class LaunchError(_WithTails):
    """QEMU could not be started."""


class GuestError(_WithTails):
    """The guest or its QEMU failed while the harness waited on it."""


class GuestPanic(GuestError):
    """The guest kernel panicked."""


class QemuExited(GuestError):
    """QEMU exited; ``reason`` is its QMP SHUTDOWN reason when it said one (``guest-reset``, ...)."""

    def __init__(self, message: str, *, returncode: int | None, reason: str | None = None, **kw: object) -> None:
        self.returncode = returncode
        self.reason = reason
        super().__init__(message, **kw)  # type: ignore[arg-type]


class QemuCrashed(QemuExited):
    """QEMU itself aborted (``qemu: fatal: ...``, a signal); ``dump`` holds its stderr."""

    @property
    def dump(self) -> str:
        return self.stderr_tail


class GuestFrozen(GuestError):
    """The guest stopped answering on SSH and on its serial console; nestbed killed its QEMU."""


class ConsoleTimeout(GuestError):
    def __init__(self, pattern: str, timeout: float, **kw: object) -> None:
        self.pattern, self.timeout = pattern, timeout
        super().__init__(f"no {pattern} on the serial console within {timeout:g} s", **kw)  # type: ignore[arg-type]


class CommandError(HarnessError):
    """A guest command went wrong: it failed or outlived its timeout.  ``command`` is what ran;
    ``result`` the :class:`~harness.transport.base.CommandResult` when it finished (None when it did not)."""

    command: str
    result: CommandResult | None


class CommandTimedOut(GuestError, CommandError):
    def __init__(self, command: str, timeout: float, **kw: object) -> None:
        self.command, self.timeout, self.result = command, timeout, None
        super().__init__(f"command {command!r} did not finish within {timeout:g} s", **kw)  # type: ignore[arg-type]


class CommandFailed(CommandError):
    def __init__(self, result: CommandResult) -> None:
        self.command, self.result = result.command, result
        super().__init__(
            f"command {result.command!r} exited {result.exit_status}: {tail(result.stderr or result.stdout, 5)}"
        )


class TransportError(HarnessError):
    """A transport (serial, SSH) is broken or refused."""


class CapabilityMissing(HarnessError):
    def __init__(self, feature: str, hint: str = "") -> None:
        self.feature, self.hint = feature, hint
        super().__init__(f"{feature} is not available" + (f": {hint}" if hint else ""))


class SetupMissing(HarnessError):
    """A program or file that nestbed's setup installs is missing: a broken setup, not an unsupported host,
    so it fails a test instead of skipping it.  The message names the Debian package to install."""


class OvfError(UsageError):
    """An OVF descriptor or OVA that nestbed refuses (harness.images.ovf): one line naming the file and what is
    wrong with it (bad XML or an entity, a tar member that would escape, a digest mismatch, unsupported hardware)."""

    def __init__(self, file: object, reason: str) -> None:
        self.file = str(file)
        self.reason = " ".join(str(reason).split())  # one line, whatever the input put in it
        super().__init__(f"{self.file}: {self.reason}")
