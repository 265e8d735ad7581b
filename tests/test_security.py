"""Security: private files stay private, nothing listens beyond loopback (L1 and nested),
and hostile arguments reach the guest verbatim through every transport.

Already covered elsewhere and not repeated: pinned host keys and refused password logins
(test_debian.py), an L1's SSH forward bound to 127.0.0.1 (test_debian.py).
"""

from __future__ import annotations

import os
import signal
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import nestbed

from harness.core import paths
from harness.errors import GuestError, QemuCrashed
from harness.guest import BootOptions, Guest, boot
from harness.nested import L1Host, boot_l1
from harness.transport import keys
from harness.transport.base import TransportBase
from harness.vm.spec import Accel

# Each would do damage (or leave /tmp/pwned) if a shell interpreted it.
HOSTILE = [
    "$(touch /tmp/pwned)", "`touch /tmp/pwned`", "; touch /tmp/pwned", "&& touch /tmp/pwned #",
    "| touch /tmp/pwned", "> /tmp/pwned", "it's", 'say "hi"', "'\"'\"'", "a\nb; touch /tmp/pwned",
    "$HOME", "${PATH}", "*", "\\", "\\n", " lead and trail ", "", "-n", "--", "\t", "#not a comment",
    "ünïcödé ✓", "!", "~",
]


def _assert_verbatim(t: TransportBase) -> None:
    r = t.run("printf", "%s\\0", *HOSTILE)
    assert r.exit_status == 0, r
    assert r.stdout.split("\0")[:-1] == HOSTILE
    assert t.run("test", "!", "-e", "/tmp/pwned").exit_status == 0, "an argument was run as shell code"


def _assert_hostile_path_put(t: Any, tmp_path: Path) -> None:
    src = tmp_path / "payload"
    src.write_bytes(b"payload\n")
    remote = "/tmp/a b;$(touch pwned)'x\"`touch pwned`\n&& touch pwned"  # a file name: no "/" after /tmp/
    t.put(src, remote)
    assert t.run("cat", remote).stdout == "payload\n"
    assert t.run("cd && test ! -e pwned && test ! -e /pwned && test ! -e /tmp/pwned").exit_status == 0
    t.get(remote, tmp_path / "back")
    assert (tmp_path / "back").read_bytes() == b"payload\n"
    t.run("rm", "-f", remote)


# -- private files ------------------------------------------------------------------------------

def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_keys_and_run_directories_are_private(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o755)  # a user's loose directory gets tightened
    monkeypatch.setenv("NESTBED_CACHE", str(cache))
    priv, pub = keys.client_keypair()
    assert _mode(priv) == 0o600 and _mode(priv.parent) == 0o700
    assert pub.startswith("ssh-ed25519 ") and "PRIVATE" not in pub
    assert _mode(cache) == 0o700
    for d in (paths.run_root(), paths.new_run_dir("sec"), paths.log_root(), paths.image_root()):
        assert _mode(d) == 0o700, d
    # A private key left group/world-readable (an unpacked backup, a umask) is tightened on use.
    os.chmod(priv, 0o644)
    assert keys.client_keypair()[0] == priv and _mode(priv) == 0o600


def test_the_real_cache_is_private() -> None:
    """The cache this machine's tests use: keys, images (whose disks hold host keys), run directories."""
    root = paths.cache_root()
    for d in (root, root / "keys", root / "images", paths.run_root()):
        if d.exists():
            assert _mode(d) == 0o700, d
    key = root / "keys" / "id_ed25519"
    if key.exists():
        assert _mode(key) == 0o600


# -- hostile arguments: CLI, serial, SSH ------------------------------------------------------------

@pytest.mark.boot
def test_hostile_arguments_pass_through_the_cli_verbatim(tiny_images: None) -> None:
    proc = nestbed("run", "tiny-x86_64", "--", "sh", "-c", 'printf "%s\\0" "$@"; test ! -e /tmp/pwned', "sh", *HOSTILE)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("\0")[:-1] == HOSTILE


@pytest.fixture(scope="module")
def debian() -> Iterator[Guest]:
    with boot("debian-x86_64", via="ssh") as g:
        yield g


@pytest.mark.boot
@pytest.mark.parametrize("via", ["serial", "ssh", "testinfra-ssh"])
def test_hostile_arguments_reach_the_guest_verbatim(debian: Guest, via: str, tmp_path: Path) -> None:
    t: TransportBase = debian.serial if via == "serial" else debian.connect_ssh()
    if via == "testinfra-ssh":
        from harness.transport.testinfra import testinfra_host

        host = testinfra_host(t)
        out = host.check_output("printf '%%s\\0' " + " ".join(["%s"] * len(HOSTILE)), *HOSTILE)
        assert out.split("\0")[:-1] == HOSTILE
        assert not host.file("/tmp/pwned").exists
        return
    _assert_verbatim(t)
    _assert_hostile_path_put(t, tmp_path)


# -- nested: loopback only, verbatim arguments, and an L1 that dies under a running L2 ---------------

def _listeners(tables: str) -> list[tuple[str, int, str]]:
    """(address hex, port, inode) of every LISTEN socket in /proc/net/tcp{,6} text."""
    found = []
    for line in tables.splitlines():
        parts = line.split()
        if len(parts) > 9 and parts[3] == "0A" and ":" in parts[1]:
            addr, port = parts[1].rsplit(":", 1)
            found.append((addr, int(port, 16), parts[9]))
    return found


LOOPBACK = {"0100007F", "00000000000000000000000001000000"}  # 127.0.0.1 and ::1 as /proc/net shows them


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    return inodes


@pytest.fixture(scope="module")
def nested() -> Iterator[tuple[L1Host, Guest]]:
    """One L1 (no probe: the L2 asks for KVM itself) with a tiny L2 running in it."""
    with boot_l1(["tiny-x86_64"], probe_inner=False) as l1, \
            l1.inner("tiny-x86_64", options=BootOptions(accel=Accel.KVM, ready_timeout=180)) as l2:
        yield l1, l2


@pytest.mark.boot
def test_nothing_listens_beyond_loopback_during_a_nested_run(nested: tuple[L1Host, Guest]) -> None:
    l1, l2 = nested
    # L0: the L1's QEMU (the only QEMU of a nested run on this host) listens on loopback only.
    assert l1.guest.machine.proc is not None
    inodes = _socket_inodes(l1.guest.machine.proc.pid)
    ours = [entry for entry in _listeners(Path("/proc/net/tcp").read_text() + Path("/proc/net/tcp6").read_text())
            if entry[2] in inodes]
    assert ours, "L1's QEMU should listen for its SSH forward"
    assert all(addr in LOOPBACK for addr, _, _ in ours), ours
    # L1: the L2's serial and QMP chardevs are on L1's loopback; only sshd (behind L0's
    # user-mode network) listens on all addresses.
    inner = _listeners(l1.run("cat /proc/net/tcp /proc/net/tcp6").stdout)
    chardev_ports = {int(w.split("port=")[1].split(",")[0]) for w in l2.machine.argv if "port=" in w}
    assert chardev_ports and chardev_ports <= {port for _, port, _ in inner}, (chardev_ports, inner)
    wide = sorted({port for addr, port, _ in inner if addr not in LOOPBACK})
    assert wide in ([], [22]), f"non-loopback listeners in L1: {wide}"


@pytest.mark.boot
def test_hostile_arguments_reach_l1_and_l2_verbatim(nested: tuple[L1Host, Guest], tmp_path: Path) -> None:
    l1, l2 = nested
    _assert_verbatim(l1.ssh)  # SSH to the L1
    _assert_verbatim(l2.serial)  # serial of the L2: a chardev in L1 reached through an SSH channel
    _assert_hostile_path_put(l2.serial, tmp_path)


@pytest.mark.boot
def test_l1_killed_while_an_l2_command_runs_names_level_1(nested: tuple[L1Host, Guest]) -> None:
    """Last in this module: it kills the module's L1."""
    l1, l2 = nested
    assert l1.guest.machine.proc is not None
    l1_pid = l1.guest.machine.proc.pid
    killer = threading.Timer(3.0, os.kill, (l1_pid, signal.SIGKILL))
    killer.start()
    started = time.monotonic()
    try:
        with pytest.raises(GuestError) as info:
            l2.run("sleep 120", timeout=300)
    finally:
        killer.cancel()
    assert time.monotonic() - started < 60, "the L2 command kept waiting on a dead L1"
    assert isinstance(info.value, QemuCrashed), repr(info.value)
    assert info.value.level == 1
    assert str(info.value).startswith("level 1: ") and "signal 9" in str(info.value)
