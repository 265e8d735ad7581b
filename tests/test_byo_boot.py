"""Bring your own disk, booted for real (lean: one good boot, one failed one; the format sweep is
scenarios/test_byo_image.py, nightly).

The good boot: ``cloud-debian-x86_64`` (kind cloud: a Debian root with cloud-init and GRUB on a GPT disk,
no nestbed key in it) handed to a ``kind = "disk"`` recipe as the qcow2 file it is, booted under SeaBIOS
by its own GRUB, reached over SSH with the key cloud-init installed from nestbed's seed (the host key
pinned from what the seed's script printed on serial for this boot's token) and over the serial shell
the seed started.  The failed boot: a disk with no bootloader (SeaBIOS: "No bootable device"), which
prints nothing on serial: the error names the screenshot saved beside the serial log.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.guest import BootOptions, boot
from harness.images import store
from harness.images.disk import GuestNotReached
from harness.images.recipes import parse_recipe

CLOUD = "cloud-debian-x86_64"
pytestmark = pytest.mark.boot


@pytest.fixture(scope="module")
def cloud_disk() -> Iterator[Path]:
    img = store.build(CLOUD)
    assert img.disk is not None
    yield img.disk


def _disk_image(tmp_path: Path, body: str, name: str) -> store.Image:
    p = tmp_path / f"{name}.toml"
    p.write_text(f'kind = "disk"\narch = "x86_64"\n{body}')
    return store.image_for(parse_recipe(p))


def test_cloud_image_as_a_disk_recipe_over_ssh_and_serial(tmp_path: Path, cloud_disk: Path) -> None:
    img = _disk_image(tmp_path, f'path = "{cloud_disk}"\nready_timeout = 900\n', "byo-cloud")
    before = cloud_disk.stat().st_mtime_ns
    with boot(img, via="ssh") as g:
        assert g.image.manifest["format"] == "qcow2" and g.machine.spec.firmware.value == "bios"
        assert g.transport.name.startswith("ssh:") and g.check_output("id -un") == "root"
        assert "nestbed-client" in g.check_output("cat /root/.ssh/authorized_keys")  # put there by cloud-init
        assert g.check_output("hostname") == "byo-cloud"
        # The key pinned for this boot is the one the guest generated (printed on serial with the boot's token).
        assert g.foreign_host_key is not None
        assert g.check_output("cut -d' ' -f1,2 /etc/ssh/ssh_host_ed25519_key.pub") == g.foreign_host_key
        assert g.serial.check_output("echo serial-$((6 * 7))") == "serial-42"
        assert "nestbed.token=" + g.machine.token in g.serial.check_output("cat /sys/class/dmi/id/product_serial")
    assert cloud_disk.stat().st_mtime_ns == before  # booted through an overlay: the file is never written


def test_no_bootloader_fails_with_a_screenshot(tmp_path: Path) -> None:
    blank = tmp_path / "blank.raw"
    blank.write_bytes(bytes(4 << 20))
    img = _disk_image(tmp_path, f'path = "{blank}"\n', "blank")
    with pytest.raises(GuestNotReached) as err, boot(img, options=BootOptions(ready_timeout=20), log_dir=tmp_path):
        pass
    shot = err.value.screenshot
    assert shot is not None and shot.is_file() and shot.parent == tmp_path
    assert shot.read_bytes()[:8] in (b"\x89PNG\r\n\x1a\n",) or shot.read_bytes()[:2] == b"P6"
    headline = str(err.value).splitlines()[0]
    assert str(shot) in headline and "no ready marker from cloud-init on the serial console within 20 s" in headline


def test_inside_an_l1_a_disk_that_never_boots_shows_its_screen(tmp_path: Path) -> None:
    """A brought image at level 2: the L1 gets the file as a drive; the QEMU in L1 saves the screen there, and
    the harness fetches it beside the L0-side serial log."""
    from harness.nested import boot_l1

    blank = tmp_path / "blank.raw"
    blank.write_bytes(bytes(4 << 20))
    img = _disk_image(tmp_path, f'path = "{blank}"\n', "blank-l2")
    with boot_l1([img], probe_inner=False) as host, pytest.raises(GuestNotReached) as err, \
            host.inner(img, options=BootOptions(ready_timeout=20), log_dir=tmp_path):
        pass
    assert err.value.level == 2, str(err.value)
    shot = err.value.screenshot
    assert shot is not None and shot.is_file() and shot.parent == tmp_path, str(err.value)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" or shot.read_bytes()[:2] == b"P6"
    assert str(shot) in str(err.value).splitlines()[0]


def test_an_appliance_exported_as_an_ova_boots_as_a_user_receives_it(tmp_path: Path, cloud_disk: Path) -> None:
    """The cloud image shipped as a VMware-shaped OVA (OVF + manifest + streamOptimized VMDK; VMware's
    paravirtual SCSI and vmxnet3, the drivers Debian's cloud kernel has), then run from that file: the
    VM is built from the OVF's hardware."""
    import json

    from conftest import nestbed

    ova = tmp_path / "appliance.ova"
    proc = nestbed("images", "export", CLOUD, "--format", "ova", "--controller", "pvscsi", "--nic", "vmxnet3",
                   "-o", str(ova), timeout=600)
    assert proc.returncode == 0, proc.stderr
    proc = nestbed("images", "inspect", str(ova), "--json")
    assert proc.returncode == 0, proc.stderr
    seen = json.loads(proc.stdout)
    assert "sha256" in json.dumps(seen).lower(), seen  # the manifest was read and checked
    proc = nestbed("run", "-v", str(ova), "--via", "ssh", "--", "sh", "-c",
                   "cat /etc/debian_version; ls /sys/bus/pci/drivers", timeout=1500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    version, drivers = proc.stdout.split("\n", 1)
    assert version.startswith("12"), proc.stdout
    # The guest runs on the hardware the OVF named: its disk behind pvscsi, its network on vmxnet3.
    assert "vmw_pvscsi" in drivers and "vmxnet3" in drivers, drivers
