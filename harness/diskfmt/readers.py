"""Independent readers: a registry by format (:data:`READERS`) of code that is not QEMU's and
hashes an image's virtual disk: plain Python for raw, libyal's Python bindings (libvmdk,
libvhdi for VHD and VHDX, libqcow), dissect.hypervisor where installed (the only reader of
VDI, and a second opinion elsewhere)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.diskfmt.hops import DiskFormatError, last_line
from harness.vm.spec import DiskFormat

HASH_CHUNK = 1 << 20

Reader = Callable[[Path, int], str]  # (path, bytes to hash) -> sha256 hex


@dataclass(frozen=True)
class ReaderEntry:
    name: str
    read: Reader


READERS: dict[DiskFormat, list[ReaderEntry]] = {}


def register_reader(fmt: DiskFormat, name: str, read: Reader) -> None:
    READERS.setdefault(fmt, []).append(ReaderEntry(name, read))


def _hash_stream(read: Callable[[int, int], bytes], length: int, chunk: int = HASH_CHUNK) -> str:
    h = hashlib.sha256()
    offset = 0
    while offset < length:
        n = min(chunk, length - offset)
        data = read(offset, n)
        if len(data) != n:
            raise DiskFormatError(f"short read at offset {offset}: {len(data)} of {n} bytes")
        h.update(data)
        offset += n
    return h.hexdigest()


def raw_reader(path: Path, length: int) -> str:
    """sha256 of the first *length* bytes of a raw image (plain Python)."""
    with open(path, "rb") as f:
        def read(off: int, n: int) -> bytes:
            f.seek(off)
            return f.read(n)
        return _hash_stream(read, length)


register_reader(DiskFormat.RAW, "python", raw_reader)


def _libyal(module: str, cls: str) -> Reader | None:
    try:
        mod = __import__(module)
    except ImportError:
        return None

    def reader(path: Path, length: int) -> str:
        obj = getattr(mod, cls)()
        obj.open(str(path))
        try:
            if hasattr(obj, "open_extent_data_files"):
                obj.open_extent_data_files()
            return _hash_stream(lambda off, n: obj.read_buffer_at_offset(n, off), length)
        finally:
            obj.close()
    return reader


for _fmt, _mod, _cls in ((DiskFormat.VMDK, "pyvmdk", "handle"), (DiskFormat.VPC, "pyvhdi", "file"),
                         (DiskFormat.VHDX, "pyvhdi", "file"), (DiskFormat.QCOW2, "pyqcow", "file")):
    _reader = _libyal(_mod, _cls)
    if _reader is not None:
        register_reader(_fmt, f"libyal {_mod}", _reader)


def _dissect_readers() -> dict[DiskFormat, Reader]:
    """dissect.hypervisor (AGPL: an optional extra) where installed."""
    try:
        from dissect.hypervisor.disk import qcow2, vdi, vhd, vhdx, vmdk
    except ImportError:
        return {}

    def stream_reader(open_stream: Callable[[Any], Any], *, block_bound: bool = False) -> Reader:
        def reader(path: Path, length: int) -> str:
            with open(path, "rb") as fh:
                stream = open_stream(fh)
                # dissect.hypervisor 3.21's VDI stream reads a multi-block request as one
                # contiguous run of the file (wrong data past the first block, measured): ask
                # for at most one block at a time.
                chunk = min(HASH_CHUNK, int(getattr(stream, "block_size", HASH_CHUNK))) if block_bound \
                    else HASH_CHUNK

                def read(off: int, n: int) -> bytes:
                    stream.seek(off)
                    data: bytes = stream.read(n)
                    return data
                return _hash_stream(read, length, chunk)
        return reader

    def vmdk_reader(path: Path, length: int) -> str:
        # A descriptor-only VMDK (flat, split) names its extents relative to itself: give the path.
        stream = vmdk.VMDK(path)
        return _hash_stream(lambda off, n: (stream.seek(off), stream.read(n))[1], length)

    return {
        DiskFormat.VDI: stream_reader(lambda fh: vdi.VDI(fh).open(), block_bound=True),
        DiskFormat.VMDK: vmdk_reader,
        DiskFormat.VPC: stream_reader(vhd.VHD),
        DiskFormat.VHDX: stream_reader(vhdx.VHDX),
        DiskFormat.QCOW2: stream_reader(lambda fh: qcow2.QCow2(fh).open()),
    }


for _fmt, _reader in _dissect_readers().items():
    register_reader(_fmt, "dissect.hypervisor", _reader)


def independent_hashes(path: Path, fmt: DiskFormat, length: int, *, second_opinion: bool = True,
                       say: Callable[[str], None] | None = None) -> list[tuple[str, str]]:
    """[(reader name, sha256 of the first *length* virtual bytes)] from every reader of *fmt*
    (only the first unless *second_opinion*); [] if none knows it."""
    out = []
    for entry in READERS.get(fmt, [])[: None if second_opinion else 1]:
        if say:
            say(f"reading {path.name} with {entry.name}")
        try:
            out.append((entry.name, entry.read(path, length)))
        except DiskFormatError as exc:
            raise DiskFormatError(f"{entry.name} cannot read {path.name}: {exc}") from None
        except Exception as exc:  # the bindings raise IOError/OSError/ValueError with their own messages
            raise DiskFormatError(f"{entry.name} cannot read {path.name}: {last_line(str(exc))}") from None
    return out


# Why a format has no independent reader (said in the hop's ``reader_note``).
NO_READER_WHY: dict[DiskFormat, str] = {
    DiskFormat.QED: "no independent implementation of qed exists in Python",
    DiskFormat.VDI: "dissect.hypervisor (the optional 'dissect' extra) is its only reader and is not installed",
}


def no_reader_note(fmt: DiskFormat) -> str | None:
    """None if some independent reader knows *fmt*; else one line saying that none read it, and why."""
    if READERS.get(fmt):
        return None
    why = NO_READER_WHY.get(fmt, "no reader is registered (libyal's Python bindings missing? run: make setup)")
    return (f"no independent reader of {fmt.value}: {why}; only qemu-img check and compare (and a guest) "
            "verified this hop")


def independent_hash(path: Path, fmt: DiskFormat, length: int) -> tuple[str, str] | None:
    """(reader name, sha256) from the first reader of *fmt*, or None if no reader knows it."""
    hashes = independent_hashes(path, fmt, length, second_opinion=False)
    return hashes[0] if hashes else None
