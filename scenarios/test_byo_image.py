"""Bring your own image: a cloud image from every disk format, booted as a user's ``kind = "disk"`` recipe.

The image is ``cloud-debian-x86_64`` (built here from Debian packages: systemd, cloud-init, openssh-server,
GRUB for SeaBIOS and UEFI on a GPT disk; no nestbed key or init in it), converted with ``qemu-img`` into
each format and subformat a user may bring (VMware, Hyper-V, VirtualBox, Xen, QEMU).  Each cell boots the
file as it is (through a qcow2 overlay; a streamOptimized VMDK is converted once, cached by content),
under the firmware the recipe says or the one nestbed decided from the partition table, and reaches the
guest over SSH with the key cloud-init installed from nestbed's NoCloud seed, and over the serial shell
the seed started.  Argnames: ``fmt`` (the report's chain axis) and ``firmware``.  Tier: nightly (each boot
is minutes under TCG: cloud-init is Python); the lean boot in ``make test`` is tests/test_byo_boot.py.

The same image inside an L1 (``level`` 2): the L1 gets the user's file (a VMDK here) and the seed as
read-only drives, its QEMU boots them under SeaBIOS with KVM where the L1 has it, and the guest is reached
over SSH and serial through the L1.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

from harness.guest import boot
from harness.images import store
from harness.images.recipes import parse_recipe
from harness.nested import boot_l1

CLOUD = "cloud-debian-x86_64"
# id -> (qemu-img -O format, -o options, file suffix)
FORMATS = {
    "qcow2": ("qcow2", "", "qcow2"),
    "raw": ("raw", "", "raw"),
    "vmdk-monolithicSparse": ("vmdk", "subformat=monolithicSparse", "vmdk"),
    "vmdk-streamOptimized": ("vmdk", "subformat=streamOptimized", "vmdk"),
    "vmdk-twoGbMaxExtentSparse": ("vmdk", "subformat=twoGbMaxExtentSparse", "vmdk"),
    "vpc-dynamic": ("vpc", "subformat=dynamic,force_size=on", "vhd"),
    "vpc-fixed": ("vpc", "subformat=fixed,force_size=on", "vhd"),
    "vhdx": ("vhdx", "", "vhdx"),
    "vdi": ("vdi", "", "vdi"),
}
CASES = [pytest.param(fmt, "auto", id=f"{fmt}-auto") for fmt in FORMATS] + [
    pytest.param("vmdk-monolithicSparse", "uefi", id="vmdk-monolithicSparse-uefi"),
    pytest.param("vhdx", "uefi", id="vhdx-uefi"),
]


@pytest.fixture(scope="module")
def cloud_disk() -> Path:
    img = store.build(CLOUD)
    assert img.disk is not None
    return img.disk


@pytest.mark.nightly
@pytest.mark.parametrize(("fmt", "firmware"), CASES)
def test_cloud_image_boots_from_every_format(fmt: str, firmware: str, tmp_path: Path, cloud_disk: Path,
                                             nestbed_facts: dict[str, Any]) -> None:
    kind, opts, suffix = FORMATS[fmt]
    src = tmp_path / f"cloud.{suffix}"
    subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", kind, *(["-o", opts] if opts else []),
                    str(cloud_disk), str(src)], check=True, capture_output=True, timeout=900)
    # A name of its own per cell, so each cell's report and logs say which file it booted.
    recipe = tmp_path / f"byo-{fmt}-{firmware}.toml"
    recipe.write_text(f'kind = "disk"\narch = "x86_64"\npath = "{src}"\nfirmware = "{firmware}"\nready_timeout = 900\n')
    img = store.image_for(parse_recipe(recipe))
    with boot(img, via="ssh") as g:
        m = g.image.manifest
        nestbed_facts.update(format=m["source_format"], subformat=m["source_subformat"], booted_as=m["format"],
                             firmware=g.machine.spec.firmware.value, firmware_why=m["firmware_why"],
                             ready_seconds=round(g.ready_seconds or 0, 1))
        assert g.check_output("id -un") == "root"
        efi = g.run("test -d /sys/firmware/efi").exit_status == 0
        assert efi is (g.machine.spec.firmware.value == "uefi")
        assert g.serial.check_output("echo serial-ok") == "serial-ok"


@pytest.mark.nightly
@pytest.mark.parametrize("level", [pytest.param("2", id="L2")])
def test_cloud_image_boots_inside_an_l1(level: str, tmp_path: Path, cloud_disk: Path,
                                        nestbed_facts: dict[str, Any]) -> None:
    src = tmp_path / "cloud.vmdk"
    subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "vmdk", str(cloud_disk), str(src)], check=True,
                   capture_output=True, timeout=900)
    recipe = tmp_path / "byo-vmdk-l2.toml"
    recipe.write_text(f'kind = "disk"\narch = "x86_64"\npath = "{src}"\nready_timeout = 1200\n')
    img = store.image_for(parse_recipe(recipe))
    before = src.stat().st_mtime_ns
    with boot_l1([img]) as host, host.inner(img, via="ssh") as g:
        nestbed_facts.update(format="vmdk", accel=g.accel.value, accel_reason=g.accel_reason,
                             ready_seconds=round(g.ready_seconds or 0, 1), l1_accel=host.l0_accel.value)
        assert g.machine.level == 2 and g.machine.spec.firmware.value == "bios"
        assert g.accel.value == host.accel["x86_64"]["chosen"], g.accel_reason  # KVM where the L1 has it
        assert g.check_output("id -un") == "root" and g.check_output("hostname") == "byo-vmdk-l2"
        assert g.serial.check_output("echo serial-ok") == "serial-ok"
        # This boot's token reached the L2 through SMBIOS (the seed's ready script keys its marker on it).
        assert g.check_output("cat /sys/class/dmi/id/product_serial") == f"nestbed.token={g.machine.token}"
    assert src.stat().st_mtime_ns == before  # the user's file is never written, at any level
