"""SSH transports with paramiko: direct (a loopback forward) and through another guest.

Host keys are pinned to the key recorded when the image was built: an unknown or
different key is refused (``RejectPolicy``; never ``AutoAddPolicy``).  The user-mode
network accepts TCP before sshd listens and then resets the connection, so callers
first wait for the guest's ready marker; the remaining retries keep paramiko's logger
quiet so the logs carry no banner-error tracebacks.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import select
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paramiko

from harness.core.watchdog import Watchdog
from harness.errors import CommandTimedOut, HarnessError, TransportError
from harness.transport.base import DEFAULT_TIMEOUT, CommandResult, TransportBase, quote_command

CONNECT_TIMEOUT = 60.0
RETRY_PAUSE = 0.2
IO_CHUNK = 32768


@contextlib.contextmanager
def quiet_paramiko() -> Iterator[None]:
    logger = logging.getLogger("paramiko")
    old = logger.level
    logger.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        logger.setLevel(old)


def pinned_client(host_key_line: str, known_as: str) -> paramiko.SSHClient:
    """An SSHClient that accepts exactly one host key for *known_as* (``[host]:port``)."""
    keytype, b64 = host_key_line.split()[:2]
    key = paramiko.PKey.from_type_string(keytype, base64.b64decode(b64))
    client = paramiko.SSHClient()
    client.get_host_keys().add(known_as, keytype, key)
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    return client


class SSHTransport(TransportBase):
    """Commands, ``put`` and ``get`` over one SSH connection.

    ``sock`` (a paramiko Channel from :meth:`open_tunnel`) makes this a jump
    connection through another guest.
    """

    name = "ssh"

    def __init__(self, *, host: str, port: int, user: str, key_path: Path | None, host_key: str,
                 sock: Any = None, timeout: float = CONNECT_TIMEOUT, name: str = "ssh",
                 sock_factory: Any = None, password: str | None = None) -> None:
        self.name = name
        self.host, self.port, self.user = host, port, user
        # Called with the error when the connection stalls (a channel that does not open in time,
        # a connection lost or closed, a command past its timeout); it may raise a truer error,
        # e.g. "level 1 froze" (harness.nested.L1Host.check_frozen).
        self.on_stall: Callable[[HarnessError], None] | None = None
        self.client = pinned_client(host_key, f"[{host}]:{port}" if port != 22 else host)
        # Any key type for a user's own image's login (nestbed's own keys are ed25519); or a password.
        pkey = paramiko.PKey.from_path(key_path) if key_path is not None else None
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        with quiet_paramiko():
            while True:
                try:
                    channel = sock_factory() if sock_factory else sock
                    # A connection that got through waits for the banner as long as the guest needs: sshd
                    # forks and re-executes itself per connection, which takes tens of seconds in a 32-bit
                    # guest under TCG inside an emulated L1.  Giving up after 10 s and connecting again only
                    # piled more half-started sshd children on that guest (seen: "Error reading SSH protocol
                    # banner" for 300 s).  A refused connection (nothing listening yet) still retries at once.
                    left = max(1.0, deadline - time.monotonic())
                    slow = max(10.0, min(left, timeout / 2))
                    self.client.connect(host, port=port, username=user, pkey=pkey, password=password, sock=channel,
                                        timeout=min(10.0, timeout), banner_timeout=slow,
                                        auth_timeout=slow, allow_agent=False,
                                        look_for_keys=False)
                    break
                except paramiko.BadHostKeyException as exc:
                    raise TransportError(f"{name}: host key of {host}:{port} does not match the pinned key "
                                         f"({exc.key.get_name()})") from None
                except paramiko.AuthenticationException as exc:
                    raise TransportError(f"{name}: authentication to {user}@{host}:{port} refused: {exc}") from None
                except (paramiko.SSHException, OSError, EOFError) as exc:
                    last = exc
                    if "not found in known_hosts" in str(exc):
                        raise TransportError(f"{name}: {exc}") from None
                    if time.monotonic() + RETRY_PAUSE >= deadline or (sock is not None and not sock_factory):
                        raise TransportError(
                            f"{name}: SSH to {user}@{host}:{port} failed within {timeout:g} s: {last}") from None
                    time.sleep(RETRY_PAUSE)
                except BaseException:
                    # Interrupted mid-handshake (Ctrl-C, SIGTERM): stop paramiko's thread while it is still
                    # quiet, or it logs the dead connection's traceback after the interruption's one line.
                    with contextlib.suppress(Exception):
                        self.client.close()
                    raise
        transport = self.client.get_transport()
        assert transport is not None
        transport.set_keepalive(15)

    @property
    def transport(self) -> paramiko.Transport:
        t = self.client.get_transport()
        if t is None or not t.is_active():
            raise self._stalled(TransportError(f"{self.name}: connection is closed"))
        return t

    def _stalled(self, err: HarnessError) -> HarnessError:
        if self.on_stall is not None:
            self.on_stall(err)
        return err

    def open_tunnel(self, host: str, port: int, *, timeout: float = 10.0) -> paramiko.Channel:
        """A ``direct-tcpip`` channel to host:port as seen from this guest."""
        try:
            return self.transport.open_channel("direct-tcpip", (host, port), ("127.0.0.1", 0), timeout=timeout)
        except (paramiko.SSHException, OSError) as exc:
            err = TransportError(f"{self.name}: cannot open a tunnel to {host}:{port}: {exc}")
            # "Connect failed" is the guest answering that nothing listens there: no stall
            raise (err if isinstance(exc, paramiko.ChannelException) else self._stalled(err)) from None

    def run(self, cmd: str, *args: str, timeout: float = DEFAULT_TIMEOUT, stdin: bytes | None = None
            ) -> CommandResult:
        command = quote_command(cmd, *args)
        start = time.monotonic()
        deadline = start + timeout
        try:
            # The command's whole timeout, not less: a loaded nested guest's sshd can take over 30 s
            # to answer (seen once in a soak, an L2 under 5 QEMUs on 2 cores).
            chan = self.transport.open_session(timeout=timeout)
            # paramiko waits for the answer to "exec" with no timeout: a guest that freezes just
            # then would hang us.  Closing the channel at the deadline ends that wait.
            with Watchdog(max(0.1, deadline - time.monotonic()), chan.close):
                chan.exec_command(command)
        except (paramiko.SSHException, OSError, EOFError) as exc:
            if time.monotonic() >= deadline:  # out of time before the command even started
                raise self._stalled(CommandTimedOut(command, timeout)) from None
            raise self._stalled(TransportError(f"{self.name}: cannot start {command!r}: {exc}")) from None
        out, err = bytearray(), bytearray()
        try:
            if stdin is not None:
                # A guest that stops reading (frozen, hung) must not block us past the deadline.
                chan.settimeout(max(0.1, deadline - time.monotonic()))
                try:
                    chan.sendall(stdin)
                except TimeoutError:
                    raise CommandTimedOut(command, timeout) from None
                chan.settimeout(None)
            chan.shutdown_write()
            while True:
                if chan.recv_ready():
                    out += chan.recv(IO_CHUNK)
                    continue
                if chan.recv_stderr_ready():
                    err += chan.recv_stderr(IO_CHUNK)
                    continue
                if chan.exit_status_ready() and chan.eof_received:
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    raise self._stalled(CommandTimedOut(command, timeout))
                # sshd killed in the guest: paramiko's transport goes inactive, but the channel
                # is neither closed nor readable; without this check we waited out the timeout.
                transport = chan.get_transport()
                alive = transport is not None and transport.is_active()
                if not chan.exit_status_ready() and (chan.closed or not alive):
                    raise self._stalled(TransportError(f"{self.name}: connection lost while running {command!r}"))
                if not alive:
                    break  # the exit status came, then the connection went before the channel's EOF
                select.select([chan], [], [], min(left, 1.0))
            status = chan.recv_exit_status()
        except (OSError, EOFError, paramiko.SSHException) as exc:
            raise self._stalled(
                TransportError(f"{self.name}: connection lost while running {command!r}: {exc}")) from None
        finally:
            chan.close()
        if status == -1:
            raise TransportError(f"{self.name}: {command!r} ended without an exit status (connection lost?)")
        return CommandResult(command, status, out.decode("utf-8", "replace"), err.decode("utf-8", "replace"),
                             time.monotonic() - start)

    def put(self, local: Path, remote: str, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        result = self.run("cat >", remote, timeout=timeout, stdin=Path(local).read_bytes())
        if result.exit_status:
            raise TransportError(f"{self.name}: put {remote}: {result.stderr.strip()}")

    def get(self, remote: str, local: Path, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        # base64 keeps binary data intact through the str-typed CommandResult.
        result = self.run("base64 -w0", remote, timeout=timeout)
        if result.exit_status:
            raise TransportError(f"{self.name}: get {remote}: {result.stderr.strip()}")
        Path(local).write_bytes(base64.b64decode(result.stdout))

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.client.close()
