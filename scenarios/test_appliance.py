"""A virtual appliance in every disk format: ``appliance-web`` (systemd + busybox httpd on port
80) is converted from its cached qcow2 into each format (every hop verified by
:func:`harness.diskfmt.run_chain`), booted from that copy as its root disk, and must serve its
page to L0 through a loopback forward of guest port 80; testinfra checks the unit and the socket.

Argnames: ``fmt`` is a format/subformat id (a chain hop, see ``harness.diskfmt.FORMAT_MATRIX``).
Tiers: ``smoke`` boots the VMDK (the usual appliance format); ``nightly`` the rest.

The appliance as it ships: exported with ``nestbed images export --format ova`` (an OVF, a manifest, a
streamOptimized VMDK of its boot disk: GPT, GRUB, the same root filesystem) and imported back the way a
user receives one, a ``kind = "disk"`` recipe naming the .ova, with no cloud-init (the appliance has none)
and a login.  It boots by its own GRUB on the hardware the OVF names (IDE, vmxnet3) and must serve the same
page.  Tier: nightly (the export writes a 2 GiB disk through zlib, and the import inflates it once).
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
from harness.images import export
from harness.images import store as images
from harness.images.recipes import parse_recipe
from harness.transport import keys
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


@pytest.fixture(scope="module")
def appliance_ova(appliance_disk: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    # The OVF's defaults (IDE) but vmxnet3: the appliance runs Debian's cloud kernel, which has no E1000 driver.
    out = tmp_path_factory.mktemp("ova") / f"{IMAGE}.ova"
    return export.export(images.get_image(IMAGE), "ova", out, nic="vmxnet3")


@pytest.mark.nightly
def test_appliance_serves_its_page_from_its_own_ova(appliance_ova: Path, tmp_path: Path,
                                                    boot_guest: Callable[..., Guest],
                                                    nestbed_facts: dict[str, Any]) -> None:
    key, _ = keys.client_keypair()  # the appliance's root trusts this cache's client key (it was built here)
    recipe = tmp_path / "appliance-web-ova.toml"
    recipe.write_text(f'kind = "disk"\narch = "x86_64"\npath = "{appliance_ova}"\ncloud_init = false\n'
                      f'login = {{ user = "root", key = "{key}" }}\nready_timeout = 600\n')
    img = images.build(images.image_for(parse_recipe(recipe)))
    hw = img.manifest["hardware"]
    assert (hw["ovf_name"], hw["disk_interface"], hw["nic_model"], hw["firmware"]) == \
        (IMAGE, "ide", "vmxnet3", "bios"), hw
    g = boot_guest(img, via="ssh", forwards=(80,))
    status, body, seconds = fetch(g.machine.host_ports[80])
    nestbed_facts.update(fmt="ova", http_status=status, http_seconds_after_ready=round(seconds, 2),
                         ready_seconds=g.ready_seconds, ova_bytes=appliance_ova.stat().st_size,
                         substitutions=hw["substitutions"])
    assert status == 200 and body == PAGE
    assert g.host.service("appliance-web").is_running
    assert g.host.socket("tcp://0.0.0.0:80").is_listening
    # It runs on what the OVF named: its disk behind PIIX IDE, its network on vmxnet3, booted by its own GRUB.
    drivers = g.check_output("ls /sys/bus/pci/drivers").split()
    assert "ata_piix" in drivers and "vmxnet3" in drivers, drivers
    assert "BOOT_IMAGE=" in g.check_output("cat /proc/cmdline")
