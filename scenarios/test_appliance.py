"""A virtual appliance in every disk format: ``appliance-web`` (systemd + busybox httpd on port
80) is converted from its cached qcow2 into each format (every hop verified by
:func:`harness.diskfmt.run_chain`), booted from that copy as its root disk, and must serve its
page to L0 through a loopback forward of guest port 80; testinfra checks the unit and the socket.

Argnames: ``fmt`` is a format/subformat id (a chain hop, see ``harness.diskfmt.FORMAT_MATRIX``).
Tiers: ``smoke`` boots the VMDK (the usual appliance format); ``nightly`` the rest.
"""

from __future__ import annotations

import shutil
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from harness import diskfmt
from harness.guest import Guest
from harness.images import store as images
from harness.vm.spec import Drive

IMAGE = "appliance-web"
PAGE = "<html><body><h1>nestbed appliance ok</h1></body></html>\n"  # images/appliance-web.toml
HTTP_TIMEOUT = 60.0  # the unit is started before the ready marker; httpd binds a moment later
SMOKE = "vmdk"
NIGHTLY = [f for f in diskfmt.FORMAT_MATRIX if f not in (SMOKE, "vmdk:subformat=monolithicSparse")]


def _via(fmt: str) -> str:
    # Over SSH, as an appliance is reached, except on a read-only root (streamOptimized): there
    # systemd-logind fails to start and sshd's PAM session waits on it until paramiko's
    # authentication times out (measured), so that one goes over the serial console.
    return "ssh" if diskfmt.parse_chain(fmt)[0].guest_writable else "serial"


def _params() -> list[Any]:
    return [pytest.param(SMOKE, _via(SMOKE), marks=pytest.mark.smoke, id=f"{SMOKE}-{_via(SMOKE)}")] + \
           [pytest.param(f, _via(f), marks=pytest.mark.nightly, id=f"{f}-{_via(f)}") for f in NIGHTLY]


@pytest.fixture(scope="module")
def appliance_disk() -> Path:
    img = images.build(IMAGE)
    assert img.disk is not None
    return img.disk


@pytest.fixture
def workdir(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path / "disk"
    shutil.rmtree(tmp_path / "disk", ignore_errors=True)


def fetch(port: int, *, timeout: float = HTTP_TIMEOUT) -> tuple[int, str, float]:
    """GET http://127.0.0.1:PORT/ from L0, retrying until *timeout*: (status, body, seconds)."""
    started = time.monotonic()
    last: Exception | None = None
    while time.monotonic() - started < timeout:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as resp:
                return resp.status, resp.read().decode(), time.monotonic() - started
        except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
            # slirp accepts the TCP connection before httpd listens, then resets it: retry.
            last = exc
            time.sleep(0.5)
    raise AssertionError(f"no page from 127.0.0.1:{port} within {timeout:g} s: {last}")


@pytest.mark.parametrize(("fmt", "via"), _params())
def test_appliance_serves_its_page_from_each_disk_format(fmt: str, via: str, appliance_disk: Path, workdir: Path,
                                                         boot_guest: Callable[..., Guest],
                                                         nestbed_facts: dict[str, Any]) -> None:
    hop = diskfmt.parse_chain(fmt)[0]
    result = diskfmt.run_chain(appliance_disk, [hop], workdir, second_opinion=False)
    h = result["hops"][0]
    assert h["compare"] == "identical", h
    # Read by independent readers that all agree, or (a format none reads) said to be unread: never both silent.
    assert (h["readers"] and all(r["matches"] for r in h["readers"])) or \
        (h["reader_hash_matches"] is None and h["reader_note"]), h
    nestbed_facts.update(fmt=fmt, virtual_size=h["virtual_size"], file_size=h["file_size"],
                         convert_seconds=h["seconds"], verify_seconds=h["verify_seconds"],
                         pitfalls=[p["id"] for p in h["pitfalls"]])
    # streamOptimized refuses guest overwrites: the appliance boots from it read-only.
    writable = hop.guest_writable
    g = boot_guest(IMAGE, via=via, root_disk=Drive(Path(h["path"]), hop.format, read_only=not writable),
                   append="" if writable else "ro", forwards=(80,))
    if not writable:
        # The serial transport keeps command output in /tmp files, and this root is read-only
        # (measured: every command failed with "Read-only file system"): give it a tmpfs, typed
        # on the console itself.
        g.machine.send("mount -t tmpfs -o mode=1777 tmpfs /tmp\n")
        time.sleep(2)
    port = g.machine.host_ports[80]
    status, body, seconds = fetch(port)
    nestbed_facts.update(http_status=status, http_seconds_after_ready=round(seconds, 2),
                         ready_seconds=g.ready_seconds, read_only=not writable)
    assert status == 200 and body == PAGE
    service = g.host.service("appliance-web")
    assert service.is_running and service.is_enabled
    assert g.host.socket("tcp://0.0.0.0:80").is_listening
    root_opts = g.check_output("findmnt -no OPTIONS /").split(",")
    assert root_opts[0] == ("rw" if writable else "ro"), root_opts
