"""The host programs nestbed runs, and the Debian package that carries each.

One table, so that "not found" always names what to install, whether nestbed runs from a
checkout (``make setup`` installs them all) or from a wheel in someone else's project.
"""

from __future__ import annotations

import shutil

PACKAGES: dict[str, str] = {
    "qemu-system-x86_64": "qemu-system-x86",
    "qemu-system-i386": "qemu-system-x86",
    "qemu-img": "qemu-utils",
    "mmdebstrap": "mmdebstrap",
    "mke2fs": "e2fsprogs",
    "debugfs": "e2fsprogs",
    "e2fsck": "e2fsprogs",
    "mcopy": "mtools",
    "mmd": "mtools",
    "mkfs.vfat": "dosfstools",
    "mkfs.fat": "dosfstools",
    "sfdisk": "fdisk",
    "grub-mkimage": "grub-common",
    "chromium": "chromium",
    "busybox": "busybox-static",
    "depmod": "kmod",
    "newuidmap": "uidmap",
}


def find(program: str) -> str:
    """*program* as found on PATH, else in the sbin directories a non-root user's PATH lacks (mke2fs, sfdisk,
    debugfs, mkfs.vfat live there); unchanged if it is a path or found nowhere (then the run says what to install)."""
    if "/" in program:
        return program
    return shutil.which(program) or shutil.which(program, path="/usr/sbin:/sbin") or program


def missing(program: str) -> str:
    """A one-line 'not found' that says which Debian package to install."""
    pkg = PACKAGES.get(program.rsplit("/", 1)[-1])
    if pkg is None:
        return f"{program} not found on PATH"
    return f"{program} not found on PATH: install Debian's {pkg} (sudo apt-get install {pkg})"
