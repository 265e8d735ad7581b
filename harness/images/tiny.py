"""Tiny guests: a Debian kernel and a busybox initramfs with a root shell on ttyS0.

Built from Debian packages with ``mmdebstrap --variant=extract`` (no dpkg
architecture is added to the host: mmdebstrap fetches foreign-arch packages itself; as a
non-root user in its unshare mode, :mod:`harness.images.steps`).
The initramfs is written by :func:`write_cpio` in the kernel's ``newc`` format, so no
staging directory, root rights or cpio tool are needed.
"""

from __future__ import annotations

import glob
import gzip
import io
import shutil
import stat
from pathlib import Path
from typing import Any

from harness.errors import ImageBuildError
from harness.images.recipes import Recipe
from harness.images.steps import Progress, mmdebstrap, remove_tree, resolved_versions

# The init of every tiny guest.  Kernel messages are cut to emergencies (panics still
# show) so command output on the console stays clean; echo and CR/LF translation are
# off so the harness reads exactly what commands print.  nestbed.token makes the ready
# marker unique per launch; nestbed.poweroff powers off at once (the bare-QEMU
# benchmark baseline).
TINY_INIT = r"""#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /tmp /run /root /sbin /usr/bin /usr/sbin
/bin/busybox mount -t proc proc /proc
/bin/busybox --install -s
export PATH=/bin:/sbin:/usr/bin:/usr/sbin HOME=/root
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
echo 1 > /proc/sys/kernel/printk
hostname nestbed
token=
for w in $(cat /proc/cmdline); do
  case "$w" in
    nestbed.token=*) token="${w#nestbed.token=}" ;;
    nestbed.poweroff) poweroff -f ;;
  esac
done
stty -F /dev/ttyS0 -echo -onlcr 2>/dev/null
printf 'nestbed-ready-%s\n' "$token" > /dev/ttyS0
while true; do
  setsid sh -c 'exec sh </dev/ttyS0 >/dev/ttyS0 2>&1'
done
"""

CPIO_TRAILER = "TRAILER!!!"


def _cpio_entry(out: io.BytesIO, name: str, mode: int, data: bytes, ino: int) -> None:
    namez = name.encode() + b"\0"
    fields = [ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(namez), 0]
    out.write(b"070701" + b"".join(b"%08X" % f for f in fields))
    out.write(namez)
    out.write(b"\0" * (-(110 + len(namez)) % 4))
    out.write(data)
    out.write(b"\0" * (-len(data) % 4))


def write_cpio(path: Path, entries: list[tuple[str, int, bytes]]) -> None:
    """Write a gzip'd newc cpio archive of (name, mode, data) entries.

    Directories have ``stat.S_IFDIR`` in mode, symlinks ``S_IFLNK`` with the target as data.
    """
    buf = io.BytesIO()
    for ino, (name, mode, data) in enumerate(entries, start=1):
        _cpio_entry(buf, name, mode, data, ino)
    _cpio_entry(buf, CPIO_TRAILER, 0, b"", 0)
    path.write_bytes(gzip.compress(buf.getvalue(), compresslevel=6, mtime=0))


def tiny_initramfs(busybox: bytes, init: str = TINY_INIT,
                   files: dict[str, str] | None = None) -> list[tuple[str, int, bytes]]:
    """The initramfs entries: busybox, its init, and the recipe's ``files`` (absolute path → text)."""
    d = stat.S_IFDIR | 0o755
    entries = [
        ("bin", d, b""), ("dev", d, b""), ("proc", d, b""), ("sys", d, b""), ("tmp", stat.S_IFDIR | 0o1777, b""),
        ("bin/busybox", stat.S_IFREG | 0o755, busybox),
        ("bin/sh", stat.S_IFLNK | 0o777, b"busybox"),
        ("init", stat.S_IFREG | 0o755, init.encode()),
    ]
    have = {name for name, _, _ in entries}
    for dest, content in sorted((files or {}).items()):
        parts = dest.strip("/").split("/")
        for i in range(1, len(parts)):  # parent directories first, as cpio wants them
            parent = "/".join(parts[:i])
            if parent not in have:
                have.add(parent)
                entries.append((parent, d, b""))
        entries.append(("/".join(parts), stat.S_IFREG | 0o644, content.encode()))
    return entries


def find_one(root: Path, pattern: str, what: str) -> Path:
    found = sorted(glob.glob(str(root / pattern)))
    if not found:
        raise ImageBuildError(f"{what}: nothing matches {pattern} in the extracted packages")
    return Path(found[-1])


def build_tiny(recipe: Recipe, work: Path, say: Progress) -> dict[str, Any]:
    root = work / "root"
    say(f"fetching {recipe.kernel} and busybox-static ({recipe.arch.debian}) with mmdebstrap")
    mmdebstrap(recipe, root, variant="extract", include=[recipe.kernel, "busybox-static", *recipe.packages],
               work=work)
    try:
        kernel = find_one(root, "boot/vmlinuz-*", recipe.name)
        busybox = find_one(root, "bin/busybox", recipe.name)
        shutil.copy(kernel, work / "vmlinuz")
        say("writing the busybox initramfs")
        write_cpio(work / "initrd.img", tiny_initramfs(busybox.read_bytes(), files=recipe.files))
        versions = resolved_versions(root)
    finally:
        remove_tree(root)  # not left for the cache's cleanup: as a non-root user it holds subordinate ids' files
    return {
        "files": {"kernel": "vmlinuz", "initrd": "initrd.img"},
        "kernel_release": kernel.name.removeprefix("vmlinuz-"),
        "packages": versions,
    }
