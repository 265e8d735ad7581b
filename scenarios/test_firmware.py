"""Firmware scenarios: SeaBIOS and UEFI boot a Debian disk through its own bootloader (GRUB).

No ``-kernel``: the firmware finds GRUB on the image's whole-disk image (harness/images/bootdisk.py),
GRUB loads the kernel and initrd from the root partition, and the kernel gets this boot's
command line from GRUB (the harness passes it through SMBIOS).  Each case checks, from inside
the guest, what booted it: ``/sys/firmware/efi`` and its ``fw_platform_size`` (64 or 32),
GRUB's ``BOOT_IMAGE=`` on the kernel command line, the root filesystem on partition 3, and
the GRUB platform GRUB itself printed on the serial console.  Then it answers over SSH and
over the serial console.  Details and timings: docs/firmware.md.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import pytest

from harness.guest import Guest
from harness.images import bootdisk
from harness.vm.spec import Arch, Firmware

MACHINE = {"x86_64": "x86_64", "i386": "i686"}

CASES = [
    # OVMF under TCG reaches GRUB in ~10 s and GRUB reads through OVMF's virtio driver quickly: the
    # quickest firmware boot, so the smoke case.
    pytest.param("uefi", "x86_64", marks=pytest.mark.smoke, id="uefi-x86_64"),
    pytest.param("bios", "x86_64", marks=pytest.mark.nightly, id="bios-x86_64"),
    pytest.param("bios", "i386", marks=pytest.mark.nightly, id="bios-i386"),
    # Debian's ovmf-ia32 (OVMF32, a secure-boot build with no keys enrolled) under qemu-system-i386.
    pytest.param("uefi32", "i386", marks=pytest.mark.nightly, id="uefi32-i386"),
    # EFI mixed mode: 32-bit UEFI and GRUB on a 64-bit CPU start a 64-bit kernel.
    pytest.param("uefi32", "x86_64", marks=pytest.mark.nightly, id="uefi32-x86_64-mixed"),
]


@pytest.mark.parametrize(("firmware", "arch"), CASES)
def test_firmware_boots_the_disk_through_its_bootloader(boot_guest: Callable[..., Guest],
                                                        nestbed_facts: dict[str, Any],
                                                        firmware: str, arch: str) -> None:
    fw = Firmware(firmware)
    loader = bootdisk.loader_for(Arch(arch), fw)
    g = boot_guest(f"debian-{arch}", via="ssh", firmware=firmware)
    nestbed_facts.update(firmware=firmware, arch=arch, boot_seconds=round(g.ready_seconds or 0, 1))

    # GRUB said who it is on the serial console before it loaded the kernel.
    assert g.machine.serial_log_path is not None
    said = re.search(r"nestbed-grub: platform=(\S+)", g.machine.serial_log_path.read_text(errors="replace"))
    assert said, "GRUB's line is not in the serial log"
    assert said.group(1) == loader.platform
    nestbed_facts["bootloader"] = f"GRUB {loader.platform} ({loader.path or 'BIOS boot partition'})"

    # The kernel came from GRUB (BOOT_IMAGE=) with this boot's command line (the token).
    cmdline = g.check_output("cat /proc/cmdline")
    release = g.image.manifest["kernel_release"]
    assert cmdline.startswith(f"BOOT_IMAGE=/boot/vmlinuz-{release} ")
    assert f"nestbed.token={g.machine.token}" in cmdline.split()
    assert g.machine.spec.kernel is None and "-kernel" not in g.machine.argv
    # The root filesystem is the third partition of the whole disk.
    assert g.check_output("findmnt -n -o SOURCE /") == "/dev/vda3"

    efi = g.run("test", "-d", "/sys/firmware/efi").exit_status == 0
    if fw is Firmware.BIOS:
        assert not efi, "a SeaBIOS boot must not show /sys/firmware/efi"
    else:
        assert efi, "a UEFI boot must show /sys/firmware/efi"
        size = g.check_output("cat /sys/firmware/efi/fw_platform_size")
        assert size == ("64" if fw is Firmware.UEFI and arch == "x86_64" else "32")
        nestbed_facts["fw_platform_size"] = int(size)
        # e.g. "efi: EFI v2.70 by EDK II": the kernel's own view of the firmware.
        nestbed_facts["efi"] = g.check_output("dmesg | grep -m1 -o 'EFI v.*' || true")

    # Answers over SSH (the guest's transport) and over the serial console.
    assert g.check_output("uname -m") == MACHINE[arch]
    assert g.serial.check_output("uname -m") == MACHINE[arch]
    assert g.serial.check_output("cat /sys/class/dmi/id/product_serial").startswith(bootdisk.SMBIOS_TAG)
