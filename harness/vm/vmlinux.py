"""Boot a user-named x86_64 kernel without its self-decompression: the bzImage's ELF via PVH.

A Debian bzImage carries the kernel XZ-compressed; its own decompressor runs in the
guest, and under TCG that emulated XZ decompression is a large share of a boot (measured
with Debian's generic 6.1 kernel: ~35-50 % of a busybox boot to poweroff).  The payload
is the kernel's ELF image (vmlinux); QEMU boots such an ELF directly when it carries the
PVH entry note (``CONFIG_PVH=y``, set in Debian's kernels), skipping the BIOS's
real-mode setup and the decompressor.  :func:`fast_kernel` decompresses the payload once
with Python's own lzma/gzip/bz2, keeps it in the cache keyed by the bzImage's sha256, and
returns its path; for anything it cannot handle (no PVH note, an LZ4 or zstd payload, not a
bzImage) it returns the kernel unchanged, so the result always boots.

Only kernels the user names (``nestbed run --kernel``, ``BootOptions(kernel=...)``) take this
path for now; the images' own cloud kernels (LZ4) gain 20-40 % too when the ``lz4`` tool is
present (see docs/speed.md), but switching every image's boot is the lead's call.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import lzma
import shutil
import struct
import subprocess
from pathlib import Path

from harness.core import paths
from harness.core.publish import publish, write_atomic

HDRS_MAGIC = b"HdrS"  # at 0x202 in every bzImage with a boot protocol header
PVH_NOTE_NAME = b"Xen"
PVH_NOTE_TYPE = 18  # XEN_ELFNOTE_PHYS32_ENTRY
MIN_PROTOCOL = 0x208  # payload_offset/payload_length exist from boot protocol 2.08

TOOL_TIMEOUT = 120.0
_TOOLS = {
    b"\x02\x21\x4c\x18": ["lz4", "-d", "-c", "-q"],  # LZ4 legacy frame: Debian's cloud kernels
    b"\x28\xb5\x2f\xfd": ["zstd", "-d", "-c", "-q"],
}
_DECOMPRESSORS = {
    b"\xfd7zXZ\x00": lambda b: lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(b),
    b"\x1f\x8b": gzip.decompress,
    b"BZh": bz2.decompress,
    b"\x5d\x00\x00": lambda b: lzma.LZMADecompressor(format=lzma.FORMAT_ALONE).decompress(b),
}


def payload(bzimage: bytes) -> bytes | None:
    """The compressed kernel inside a bzImage, or None if *bzimage* is not one (protocol >= 2.08)."""
    if len(bzimage) < 0x250 or bzimage[0x202:0x206] != HDRS_MAGIC:
        return None
    (version,) = struct.unpack_from("<H", bzimage, 0x206)
    if version < MIN_PROTOCOL:
        return None
    setup_sects = bzimage[0x1F1] or 4  # 0 means 4, as in the oldest kernels
    offset, length = struct.unpack_from("<II", bzimage, 0x248)
    start = (setup_sects + 1) * 512 + offset
    if start + length > len(bzimage):
        return None
    return bzimage[start:start + length]


def decompress(data: bytes) -> bytes | None:
    """Decompress a payload: XZ, gzip, bzip2, LZMA with Python's standard library; LZ4 and zstd with
    the ``lz4``/``zstd`` tools when the host has them.  None if it cannot."""
    for magic, fn in _DECOMPRESSORS.items():
        if data.startswith(magic):
            try:
                out: bytes = fn(data)
            except (lzma.LZMAError, OSError, EOFError, ValueError):
                return None
            return out
    for magic, tool in _TOOLS.items():
        if data.startswith(magic) and shutil.which(tool[0]):
            try:
                proc = subprocess.run(tool, input=data, capture_output=True, timeout=TOOL_TIMEOUT)
            except (OSError, subprocess.SubprocessError):
                return None
            # The payload may carry trailing bytes (the kernel's size word): the tools still decode it.
            return proc.stdout if proc.stdout[:4] == b"\x7fELF" else None
    return None


def has_pvh_note(elf: bytes) -> bool:
    """True if *elf* is a 64-bit little-endian ELF whose PT_NOTE segments hold the PVH entry note."""
    if elf[:4] != b"\x7fELF" or elf[4] != 2 or elf[5] != 1:
        return False
    phoff, = struct.unpack_from("<Q", elf, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
    for i in range(phnum):
        p_type, _flags, p_offset, _va, _pa, p_filesz = struct.unpack_from("<IIQQQQ", elf, phoff + i * phentsize)
        if p_type != 4:  # PT_NOTE
            continue
        pos, end = p_offset, p_offset + p_filesz
        while pos + 12 <= end:
            namesz, descsz, ntype = struct.unpack_from("<III", elf, pos)
            name = elf[pos + 12:pos + 12 + namesz].rstrip(b"\0")
            if name == PVH_NOTE_NAME and ntype == PVH_NOTE_TYPE:
                return True
            pos += 12 + (namesz + 3) // 4 * 4 + (descsz + 3) // 4 * 4
    return False


def fast_kernel(kernel: Path) -> Path:
    """The path to boot for *kernel*: its cached PVH-bootable ELF if it has one, else *kernel* itself."""
    data = kernel.read_bytes()
    digest = hashlib.sha256(data).hexdigest()[:24]
    root = paths.private_dir(paths.cache_root() / "kernels")
    target = root / f"{digest}.vmlinux"
    if target.is_file():
        return target
    if (root / f"{digest}.none").is_file():
        return kernel  # looked at before: nothing to gain
    inner = payload(data)
    elf = decompress(inner) if inner is not None else None
    if elf is None or not has_pvh_note(elf):
        write_atomic(root / f"{digest}.none", b"")
        return kernel
    found: bytes = elf
    publish(target, lambda tmp: write_atomic(tmp, found), what="PVH kernel", timeout=120)
    return target
