"""testinfra on every nestbed transport.

``testinfra_host(transport)`` returns a ``testinfra.host.Host`` whose commands run
over a nestbed transport (serial, SSH, SSH through another guest), so scenarios write
``host.file("/etc/os-release").contains("bookworm")`` whatever the transport.
"""

from __future__ import annotations

from typing import Any

import testinfra.host
from testinfra.backend.base import BaseBackend, CommandResult

from harness.transport.base import DEFAULT_TIMEOUT, TransportBase


class NestbedBackend(BaseBackend):
    """A testinfra backend that delegates to a nestbed :class:`~harness.transport.base.Transport`."""

    NAME = "nestbed"

    def __init__(self, transport: TransportBase, hostname: str = "guest", **kwargs: Any) -> None:
        self.transport = transport
        super().__init__(hostname, **kwargs)

    def get_connection_type(self) -> str:
        return f"nestbed-{self.transport.name}"

    def run(self, command: str, *args: str, **kwargs: Any) -> CommandResult:
        # testinfra's convention: ``command`` has %s placeholders for the quoted args.
        cmd = self.get_command(command, *args)
        result = self.transport.run(cmd, timeout=kwargs.get("timeout", DEFAULT_TIMEOUT))
        return self.result(result.exit_status, self.encode(cmd), result.stdout, result.stderr)


def testinfra_host(transport: TransportBase, hostname: str = "guest") -> testinfra.host.Host:
    return testinfra.host.Host(NestbedBackend(transport, hostname))
