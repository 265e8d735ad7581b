"""Bridge a paramiko channel to a local socket.

QMP (qemu.qmp, asyncio) and the serial console reader want a real socket; an inner
guest's chardevs are reached through ``direct-tcpip`` channels.  :func:`socket_for`
returns one end of a socketpair and pumps bytes between the other end and the
channel in a daemon thread until either side closes.
"""

from __future__ import annotations

import contextlib
import select
import socket
import threading
from typing import Any

CHUNK = 65536


def _pump(chan: Any, sock: socket.socket) -> None:
    try:
        while True:
            readable, _, _ = select.select([chan, sock], [], [], 5.0)
            if chan in readable:
                data = chan.recv(CHUNK)
                if not data:
                    break
                sock.sendall(data)
            if sock in readable:
                data = sock.recv(CHUNK)
                if not data:
                    break
                chan.sendall(data)
            if chan.closed:
                break
    except OSError:
        pass
    finally:
        with contextlib.suppress(Exception):
            chan.close()
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        sock.close()


def socket_for(chan: Any, name: str = "relay") -> socket.socket:
    """A connected socket whose peer is *chan*."""
    ours, theirs = socket.socketpair()
    threading.Thread(target=_pump, args=(chan, theirs), name=f"nestbed-{name}", daemon=True).start()
    return ours
