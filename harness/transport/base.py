"""One protocol for talking to a guest, and its serial-console implementation.

Every transport offers ``run(cmd, *args, timeout) -> CommandResult``, ``put``, ``get``
and ``close``.  Arguments are quoted in exactly one place, :func:`quote_command`.
"""

from __future__ import annotations

import base64
import contextlib
import enum
import hashlib
import re
import secrets
import shlex
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from harness.errors import CommandFailed, CommandTimedOut, ConsoleTimeout, HarnessError, TransportError

if TYPE_CHECKING:
    from harness.vm.machine import Machine

DEFAULT_TIMEOUT = 60.0
RECOVER_TIMEOUT = 15.0
_B64_LINE = re.compile(r"^[A-Za-z0-9+/=]+$")


class Via(enum.StrEnum):
    """How commands reach a guest."""

    SERIAL = "serial"
    SSH = "ssh"


@dataclass(frozen=True)
class CommandResult:
    command: str
    exit_status: int
    stdout: str
    stderr: str
    duration: float

    @property
    def succeeded(self) -> bool:
        return self.exit_status == 0

    # testinfra's CommandResult names, so the testinfra backend can pass these through
    @property
    def rc(self) -> int:
        return self.exit_status


def quote_command(cmd: str, *args: str) -> str:
    """``cmd`` is shell text; each of ``args`` is quoted and appended.

    ``run("ls -l")`` runs shell text as written; ``run("ls", "-l", path)`` quotes
    ``path`` whatever it contains.
    """
    return " ".join([cmd, *(shlex.quote(str(a)) for a in args)])


class TransportBase:
    """The one transport protocol: ``run``, ``put``, ``get``, ``close`` (serial, SSH), and the helpers
    every transport gets from ``run``."""

    name = "base"

    def run(self, cmd: str, *args: str, timeout: float = DEFAULT_TIMEOUT) -> CommandResult:
        raise NotImplementedError

    def put(self, local: Path, remote: str, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        raise NotImplementedError

    def get(self, remote: str, local: Path, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Nothing to release by default."""

    def check_output(self, cmd: str, *args: str, timeout: float = DEFAULT_TIMEOUT) -> str:
        """stdout without its trailing newline; CommandFailed on a non-zero exit."""
        result = self.run(cmd, *args, timeout=timeout)
        if result.exit_status != 0:
            raise CommandFailed(result)
        return result.stdout.rstrip("\n")



# Serial lines go through the tty's canonical mode: keep each one well under its
# 4095-byte line limit.
SERIAL_CHUNK = 2048


class SerialTransport(TransportBase):
    """Commands over the guest's serial console (a root shell nestbed's init started).

    The console carries kernel messages too, so output is framed, not scraped:

    * each command is bracketed by random markers, and the typed line never contains
      a marker verbatim (``printf '%s-s' TOKEN``), so neither an echoing tty nor stale
      output can fake one;
    * stdout and stderr go to files in the guest and come back base64-encoded with an
      MD5 each.  Base64 lines hold no spaces or brackets, so a kernel line that lands
      between them is dropped; one that splits a line breaks the MD5 and the block is
      sent again.
    """

    name = "serial"
    RESEND_ATTEMPTS = 3

    def __init__(self, machine: Machine) -> None:
        self.machine = machine
        self.broken: str | None = None
        self.resends = 0  # output blocks asked for again after a corrupted one (since this transport was made)

    def run(self, cmd: str, *args: str, timeout: float = DEFAULT_TIMEOUT) -> CommandResult:
        if self.broken:
            raise TransportError(f"serial transport is unusable: {self.broken}")
        command = quote_command(cmd, *args)
        tok = secrets.token_hex(8)
        files = f"/tmp/.nestbed-{tok}"
        body = command
        if "\n" in command or len(command) > 3000:
            # Multi-line or long commands travel base64-encoded on one line.
            enc = base64.b64encode(command.encode()).decode()
            if len(enc) > 3500:
                raise TransportError("command is too long for the serial console (put() a script and run it)")
            body = f'eval "$(echo {enc} | base64 -d)"'
        # The newline before ")" keeps a trailing comment in the command from eating it.
        line = (f"( {body}\n) </dev/null >{files}.O 2>{files}.E; printf '\\n%s-s %d\\n' {tok} $?; "
                + self._dump(tok, files) + "\n")
        start = time.monotonic()
        deadline = start + timeout
        self.machine.send(line)
        try:
            m = self.machine.expect(rf"\n{tok}-s (\d+)\n", timeout=timeout, what=f"end of {command!r}")
            status = int(m.group(1))
            for _attempt in range(self.RESEND_ATTEMPTS):
                out = self._block(tok, "O", deadline)
                err = self._block(tok, "E", deadline)
                if out is not None and err is not None:
                    break
                self.resends += 1
                # On a fresh line: the shell's prompt comes out before a resend's first base64 line, and a
                # line that is not pure base64 is dropped (the MD5 of the resend would never match).
                self.machine.send("printf '\\n'; " + self._dump(tok, files) + "\n")
            else:
                raise TransportError(f"output of {command!r} arrived corrupted {self.RESEND_ATTEMPTS} times")
        except ConsoleTimeout as exc:
            if not self._interrupt():
                self.broken = f"command {command!r} timed out and the console did not recover"
            raise CommandTimedOut(command, timeout, serial_tail=exc.serial_tail, stderr_tail=exc.stderr_tail,
                                  level=exc.level) from None
        self.machine.send(f"rm -f {files}.O {files}.E\n")
        return CommandResult(command, status, out, err, time.monotonic() - start)

    def _interrupt(self, timeout: float = RECOVER_TIMEOUT) -> bool:
        """Ctrl-C the console's foreground job and resynchronise; True if the shell answers again.

        SIGINT ends the job and the (non-interactive) shell with it; nestbed's init starts
        a fresh shell on the same tty, whose settings persist.
        """
        tok = secrets.token_hex(8)
        deadline = time.monotonic() + timeout
        try:
            self.machine.send("\x03")
            while time.monotonic() < deadline:
                self.machine.send(f"printf '\\n%s-y\\n' {tok}\n")
                with contextlib.suppress(ConsoleTimeout):
                    self.machine.expect(rf"\n{tok}-y\n", timeout=1.0, what="console resync")
                    return True
        except HarnessError:
            return False
        return False

    @staticmethod
    def _dump(tok: str, files: str) -> str:
        return "; ".join(
            f"base64 {files}.{s}; printf '\\n%s-{s} %s\\n' {tok} \"$(md5sum <{files}.{s})\""
            for s in "OE")

    def _block(self, tok: str, stream: str, deadline: float) -> str | None:
        """One base64 block, verified; None if a kernel message corrupted it."""
        m = self.machine.expect(rf"\n{tok}-{stream} ([0-9a-f]{{32}})", timeout=max(0.1, deadline - time.monotonic()),
                                what=f"output block {stream}")
        before = self.machine.before_match()
        b64 = "".join(ln.strip() for ln in before.splitlines() if _B64_LINE.match(ln.strip()))
        try:
            data = base64.b64decode(b64, validate=True)
        except ValueError:
            return None
        if hashlib.md5(data).hexdigest() != m.group(1):
            return None
        return data.decode("utf-8", "replace")

    def put(self, local: Path, remote: str, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        """Copy a file in, base64 over the console (slow: meant for small files)."""
        data = base64.b64encode(Path(local).read_bytes()).decode()
        tmp = f"{remote}.nestbed-part"
        self.check_output(": >", tmp, timeout=timeout)
        for i in range(0, len(data), SERIAL_CHUNK):
            self.check_output(f"printf %s {data[i:i + SERIAL_CHUNK]} >>", tmp, timeout=timeout)
        self.check_output(f"base64 -d {shlex.quote(tmp)} > {shlex.quote(remote)} && rm -f", tmp, timeout=timeout)

    def get(self, remote: str, local: Path, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        out = self.check_output("base64", remote, timeout=timeout)
        Path(local).write_bytes(base64.b64decode(re.sub(r"\s+", "", out)))

    def close(self) -> None:
        pass
