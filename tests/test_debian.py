"""Full Debian guests: serial and SSH give the same answers; files, big output, timeouts, pinning, testinfra."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.errors import CommandTimedOut, TransportError
from harness.guest import Guest, boot
from harness.images import store as images
from harness.transport.base import TransportBase

pytestmark = pytest.mark.boot

BITS = {"debian-x86_64": ("x86_64", "64"), "debian-i386": ("i686", "32")}


@pytest.fixture(scope="module", params=list(BITS))
def debian(request: pytest.FixtureRequest) -> Iterator[Guest]:
    """One booted Debian guest per arch, shared by this module's tests (they leave no trace)."""
    with boot(request.param, via="ssh") as g:
        yield g


@pytest.fixture(params=["serial", "ssh"])
def transport(request: pytest.FixtureRequest, debian: Guest) -> TransportBase:
    return debian.serial if request.param == "serial" else debian.connect_ssh()


def test_same_answers_over_serial_and_ssh(debian: Guest) -> None:
    machine, bits = BITS[debian.image.name]
    cmds = ["uname -m", "getconf LONG_BIT", "grep -c bookworm /etc/os-release", "id -un", "hostname",
            "sh -c 'echo to-err >&2; exit 5'"]
    for cmd in cmds:
        over_serial = debian.serial.run(cmd)
        over_ssh = debian.connect_ssh().run(cmd)
        assert (over_serial.exit_status, over_serial.stdout, over_serial.stderr) == \
            (over_ssh.exit_status, over_ssh.stdout, over_ssh.stderr), cmd
    assert debian.connect_ssh().check_output("uname -m") == machine
    assert debian.connect_ssh().check_output("getconf LONG_BIT") == bits


def test_big_file_round_trip_over_ssh(debian: Guest, tmp_path: Path) -> None:
    src = tmp_path / "20M.bin"
    src.write_bytes(os.urandom(20 * 1024 * 1024))
    ssh = debian.connect_ssh()
    ssh.put(src, "/tmp/20M.bin", timeout=300)
    assert ssh.check_output("sha256sum /tmp/20M.bin").split()[0] == hashlib.sha256(src.read_bytes()).hexdigest()
    ssh.get("/tmp/20M.bin", tmp_path / "back.bin", timeout=300)
    assert (tmp_path / "back.bin").read_bytes() == src.read_bytes()
    ssh.run("rm -f /tmp/20M.bin")


def test_ten_megabytes_of_output(debian: Guest) -> None:
    out = debian.connect_ssh().run("head -c 10485760 /dev/zero | tr '\\0' x", timeout=300).stdout
    assert len(out) == 10 * 1024 * 1024 and set(out) == {"x"}


def test_timeout_is_typed_and_the_guest_stays_usable(transport: TransportBase) -> None:
    with pytest.raises(CommandTimedOut):
        transport.run("sleep 300", timeout=2)
    assert transport.run("echo", "alive").stdout == "alive\n"


def test_testinfra_on_each_transport(debian: Guest, transport: TransportBase) -> None:
    from harness.transport.testinfra import testinfra_host

    host = testinfra_host(transport)
    assert host.file("/etc/os-release").contains("bookworm")
    assert host.file("/root/.ssh/authorized_keys").mode == 0o600
    assert host.socket("tcp://0.0.0.0:22").is_listening
    assert host.run("exit 3").rc == 3


def test_a_different_host_key_is_refused(debian: Guest) -> None:
    from harness.transport import keys
    from harness.transport.ssh import SSHTransport

    _, impostor = keys.new_host_key()
    key_path, _ = keys.client_keypair()
    with pytest.raises(TransportError, match="host key"):
        SSHTransport(host="127.0.0.1", port=debian.machine.host_ports[22], user="root", key_path=key_path,
                     host_key=impostor, timeout=20)


def test_password_login_is_refused(debian: Guest) -> None:
    import paramiko

    client = paramiko.SSHClient()
    client.set_missing_host_key_policy(paramiko.AutoAddPolicy())  # a deliberate attacker's client
    with pytest.raises(paramiko.AuthenticationException):
        client.connect("127.0.0.1", port=debian.machine.host_ports[22], username="root", password="",
                       allow_agent=False, look_for_keys=False, timeout=20)
    client.close()


def test_nothing_listens_beyond_loopback(debian: Guest) -> None:
    """Every listener QEMU opened on this host is bound to 127.0.0.1."""
    qemu_pid = debian.machine.proc.pid if debian.machine.proc else 0
    inodes = {os.readlink(f"/proc/{qemu_pid}/fd/{fd}")[8:-1]
              for fd in os.listdir(f"/proc/{qemu_pid}/fd")
              if os.readlink(f"/proc/{qemu_pid}/fd/{fd}").startswith("socket:[")}
    listeners = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            parts = line.split()
            if parts[3] == "0A" and parts[9] in inodes:  # LISTEN
                listeners.append(parts[1])
    assert listeners, "QEMU should listen for the SSH forward"
    assert all(addr.startswith("0100007F:") for addr in listeners), listeners


def test_appliance_serves_its_page_over_each_transport() -> None:
    with boot("appliance-web", via="ssh") as g:
        for t in (g.serial, g.connect_ssh()):
            from harness.transport.testinfra import testinfra_host

            host = testinfra_host(t)
            assert host.socket("tcp://80").is_listening
            page = t.check_output("wget -qO- http://127.0.0.1/ || busybox wget -qO- http://127.0.0.1/")
            assert "nestbed appliance ok" in page


def test_second_build_is_a_cache_hit() -> None:
    import time

    started = time.monotonic()
    images.build("debian-x86_64")
    assert time.monotonic() - started < 1.0
