"""harness.vm.vmlinux: a bzImage's payload decompressed once and booted as a PVH ELF (no QEMU here)."""

from __future__ import annotations

import gzip
import lzma
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from harness.core import paths
from harness.vm.vmlinux import decompress, fast_kernel, has_pvh_note, payload


def _elf(*, pvh: bool) -> bytes:
    """A minimal ELF64 with one PT_NOTE segment holding a Xen note (PVH entry when *pvh*)."""
    note_type = 18 if pvh else 5
    note = struct.pack("<III", 4, 4, note_type) + b"Xen\0" + struct.pack("<I", 0x1000000)
    ehdr_size, phdr_size = 64, 56
    note_off = ehdr_size + phdr_size
    ehdr = b"\x7fELF" + bytes([2, 1, 1]) + bytes(9) + struct.pack(
        "<HHIQQQIHHHHHH", 2, 62, 1, 0x1000000, ehdr_size, 0, 0, ehdr_size, phdr_size, 1, 64, 0, 0)
    phdr = struct.pack("<IIQQQQQQ", 4, 4, note_off, 0, 0, len(note), len(note), 4)
    return ehdr + phdr + note + b"\0" * 256


def _bzimage(compressed: bytes, *, version: int = 0x20F, setup_sects: int = 1) -> bytes:
    """A bzImage-shaped file: setup header fields the boot protocol defines, then the payload."""
    setup = bytearray((setup_sects + 1) * 512)
    setup[0x1F1] = setup_sects
    setup[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", setup, 0x206, version)
    offset = 0x40  # the decompressor stub would sit before the payload
    struct.pack_into("<II", setup, 0x248, offset, len(compressed))
    return bytes(setup) + b"\x90" * offset + compressed + b"\0" * 16


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(paths, "_override", tmp_path / "cache")
    return tmp_path / "cache"


def test_payload_is_found_from_the_setup_header() -> None:
    blob = lzma.compress(b"kernel", format=lzma.FORMAT_XZ)
    assert payload(_bzimage(blob)) == blob
    assert payload(_bzimage(blob, version=0x206)) is None  # before boot protocol 2.08: no payload fields
    assert payload(b"\x7fELF" + bytes(0x300)) is None


@pytest.mark.parametrize("pack", [lambda b: lzma.compress(b, format=lzma.FORMAT_XZ), gzip.compress])
def test_decompress_reads_xz_and_gzip(pack: object) -> None:
    assert callable(pack)
    assert decompress(pack(b"vmlinux")) == b"vmlinux"


def test_decompress_declines_garbage() -> None:
    assert decompress(b"\x02\x21\x4c\x18" + bytes(32)) is None  # LZ4 legacy magic, then no valid data
    assert decompress(b"\xfd7zXZ\x00 truncated") is None
    assert decompress(b"plain") is None


def test_pvh_note_is_detected() -> None:
    assert has_pvh_note(_elf(pvh=True))
    assert not has_pvh_note(_elf(pvh=False))
    assert not has_pvh_note(b"MZ" + bytes(100))


def test_fast_kernel_caches_the_pvh_elf(cache: Path, tmp_path: Path) -> None:
    elf = _elf(pvh=True)
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(_bzimage(lzma.compress(elf, format=lzma.FORMAT_XZ)))
    booted = fast_kernel(kernel)
    assert booted != kernel and booted.parent == cache / "kernels"
    assert booted.read_bytes() == elf
    assert fast_kernel(kernel) == booted  # a cache hit
    assert not list((cache / "kernels").glob(".*.part"))  # no temporary left behind (a .lock may stay)


@pytest.mark.parametrize("body", [lambda: lzma.compress(_elf(pvh=False), format=lzma.FORMAT_XZ),
                                  lambda: b"\x02\x21\x4c\x18" + bytes(64)])
def test_fast_kernel_keeps_what_it_cannot_improve(cache: Path, tmp_path: Path, body: object) -> None:
    assert callable(body)
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(_bzimage(body()))
    assert fast_kernel(kernel) == kernel
    assert fast_kernel(kernel) == kernel  # remembered, still unchanged


@pytest.mark.skipif(shutil.which("lz4") is None, reason="no lz4 tool on this host")
def test_fast_kernel_reads_lz4_legacy_payloads_with_the_lz4_tool(cache: Path, tmp_path: Path) -> None:
    elf = _elf(pvh=True)
    packed = subprocess.run(["lz4", "-l", "-c", "-q"], input=elf, capture_output=True, check=True,
                            timeout=30).stdout  # -l: the legacy frame the kernel's build uses
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(_bzimage(packed))
    assert fast_kernel(kernel).read_bytes() == elf
