"""Disk-format conversion chains, each hop verified independently.

A chain is ``FMT[:OPT=VAL[:OPT=VAL...]],FMT...``, e.g.
``vmdk:subformat=streamOptimized,vpc:subformat=fixed:force_size=on,vhdx,qcow2:compat=0.10,raw``.
Every hop is converted with ``qemu-img convert`` and checked:

1. ``qemu-img check`` (where the format supports checks);
2. ``qemu-img compare`` against the chain's source;
3. an independent reader (libyal's Python bindings where installed, plain Python for
   raw) hashing the virtual disk, compared with the source's hash;
4. (optionally, by callers) a guest booting from it.

Pitfalls are reported as facts, not hidden: a virtual size that grew (VHD's CHS
geometry without ``force_size``), a format that probes as something else (a fixed VHD
probes as raw unless the format is given).
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from harness.errors import HarnessError, UsageError
from harness.spec import DiskFormat

QEMU_IMG_TIMEOUT = 600.0
HASH_CHUNK = 1 << 20

# Options qemu-img accepts per format that chains may set (anything else is refused early).
FORMAT_OPTIONS: dict[DiskFormat, dict[str, tuple[str, ...]]] = {
    DiskFormat.RAW: {},
    DiskFormat.QCOW2: {"compat": ("0.10", "1.1"), "cluster_size": ()},
    DiskFormat.VMDK: {"subformat": ("monolithicSparse", "monolithicFlat", "streamOptimized",
                                    "twoGbMaxExtentSparse", "twoGbMaxExtentFlat"), "adapter_type": ()},
    DiskFormat.VPC: {"subformat": ("dynamic", "fixed"), "force_size": ("on", "off")},
    DiskFormat.VHDX: {"subformat": ("dynamic", "fixed"), "block_size": ()},
    DiskFormat.VDI: {"static": ("on", "off")},
    DiskFormat.QED: {"cluster_size": ()},
}
EXTENSION = {DiskFormat.RAW: "raw", DiskFormat.QCOW2: "qcow2", DiskFormat.VMDK: "vmdk", DiskFormat.VPC: "vhd",
             DiskFormat.VHDX: "vhdx", DiskFormat.VDI: "vdi", DiskFormat.QED: "qed"}


class DiskFormatError(HarnessError):
    """A conversion or a verification step failed."""


@dataclass(frozen=True)
class Hop:
    format: DiskFormat
    options: tuple[tuple[str, str], ...] = ()

    @property
    def label(self) -> str:
        return ":".join([self.format.value, *(f"{k}={v}" for k, v in self.options)])

    @property
    def guest_writable(self) -> bool:
        return dict(self.options).get("subformat") != "streamOptimized"


def parse_chain(text: str) -> list[Hop]:
    """Parse ``FMT[:OPT=VAL...],...``; UsageError naming the bad hop otherwise."""
    hops = []
    for i, raw in enumerate(filter(None, (h.strip() for h in text.split(","))), start=1):
        name, *opts = raw.split(":")
        try:
            fmt = DiskFormat(name)
        except ValueError:
            raise UsageError(f"--chain hop {i} {raw!r}: unknown format {name!r} "
                             f"(known: {', '.join(f.value for f in DiskFormat)})") from None
        pairs = []
        for opt in opts:
            key, sep, value = opt.partition("=")
            allowed = FORMAT_OPTIONS[fmt]
            if not sep or key not in allowed:
                raise UsageError(f"--chain hop {i} {raw!r}: {fmt.value} takes options "
                                 f"{', '.join(sorted(allowed)) or '(none)'} as KEY=VALUE, not {opt!r}")
            if allowed[key] and value not in allowed[key]:
                raise UsageError(f"--chain hop {i} {raw!r}: {key} must be one of {', '.join(allowed[key])}")
            pairs.append((key, value))
        hops.append(Hop(fmt, tuple(pairs)))
    if not hops:
        raise UsageError("--chain is empty")
    return hops


def _qemu_img(*args: str, timeout: float = QEMU_IMG_TIMEOUT) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(["qemu-img", *args], capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise DiskFormatError(f"qemu-img {args[0]} did not finish within {timeout:g} s") from None
    except FileNotFoundError:
        raise DiskFormatError("qemu-img not found (run: make setup)") from None


def info(path: Path, fmt: DiskFormat | None = None) -> dict[str, Any]:
    args = ["info", "--output=json", *(["-f", fmt.value] if fmt else []), str(path)]
    proc = _qemu_img(*args, timeout=60)
    if proc.returncode != 0:
        raise DiskFormatError(f"{path}: not a readable disk image: {proc.stderr.strip().splitlines()[-1:]}")
    data: dict[str, Any] = json.loads(proc.stdout)
    return data


def convert(src: Path, src_fmt: DiskFormat, dst: Path, hop: Hop) -> float:
    opts = ",".join(f"{k}={v}" for k, v in hop.options)
    args = ["convert", "-f", src_fmt.value, "-O", hop.format.value, *(["-o", opts] if opts else []), str(src), str(dst)]
    started = time.monotonic()
    proc = _qemu_img(*args)
    if proc.returncode != 0:
        raise DiskFormatError(f"qemu-img convert to {hop.label} failed: {proc.stderr.strip()}")
    return time.monotonic() - started


def check(path: Path, fmt: DiskFormat) -> str:
    """'ok', 'unsupported' (the format has no checks), or raises with qemu-img's findings."""
    proc = _qemu_img("check", "-f", fmt.value, str(path))
    if proc.returncode == 0:
        return "ok"
    if proc.returncode == 63 or "does not support checks" in proc.stderr:
        return "unsupported"
    raise DiskFormatError(f"qemu-img check {path.name} ({fmt.value}): exit {proc.returncode}: "
                          f"{(proc.stdout + proc.stderr).strip()[-400:]}")


def compare(a: Path, a_fmt: DiskFormat, b: Path, b_fmt: DiskFormat) -> str:
    proc = _qemu_img("compare", "-f", a_fmt.value, "-F", b_fmt.value, str(a), str(b))
    if proc.returncode == 0:
        return "identical"
    raise DiskFormatError(f"qemu-img compare {a.name} {b.name}: {(proc.stdout + proc.stderr).strip()}")


# -- independent readers: a registry by format ---------------------------------------------

Reader = Callable[[Path, int], str]  # (path, bytes to hash) -> sha256 hex
READERS: dict[DiskFormat, tuple[str, Reader]] = {}


def _hash_stream(read: Callable[[int, int], bytes], length: int) -> str:
    h = hashlib.sha256()
    offset = 0
    while offset < length:
        n = min(HASH_CHUNK, length - offset)
        data = read(offset, n)
        if len(data) != n:
            raise DiskFormatError(f"short read at offset {offset}: {len(data)} of {n} bytes")
        h.update(data)
        offset += n
    return h.hexdigest()


def _raw_reader(path: Path, length: int) -> str:
    with open(path, "rb") as f:
        def read(off: int, n: int) -> bytes:
            f.seek(off)
            return f.read(n)
        return _hash_stream(read, length)


READERS[DiskFormat.RAW] = ("python", _raw_reader)


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
        READERS[_fmt] = (f"libyal {_mod}", _reader)


def independent_hash(path: Path, fmt: DiskFormat, length: int) -> tuple[str, str] | None:
    """(reader name, sha256 of the first *length* virtual bytes), or None if no reader knows *fmt*."""
    entry = READERS.get(fmt)
    if entry is None:
        return None
    name, reader = entry
    try:
        return name, reader(path, length)
    except DiskFormatError:
        raise
    except Exception as exc:  # the libyal bindings raise IOError/OSError with their own messages
        raise DiskFormatError(f"{name} cannot read {path.name}: {exc}") from None


@dataclass
class HopResult:
    hop: str
    path: str
    seconds: float
    virtual_size: int
    file_size: int
    probed_as: str
    check: str
    compare: str
    reader: str | None
    reader_hash_matches: bool | None
    pitfalls: list[str] = field(default_factory=list)


def run_chain(source: Path, chain: list[Hop], workdir: Path, *, source_format: DiskFormat | None = None,
              progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Convert *source* through *chain* in *workdir*, verifying every hop."""
    say = progress or (lambda _m: None)
    src_info = info(source, source_format)
    src_fmt = DiskFormat(source_format or src_info["format"])
    size = int(src_info["virtual-size"])
    say(f"hashing the source ({size} bytes)")
    src_hash = _qemu_hash(source, src_fmt, size, workdir)
    results: list[HopResult] = []
    prev, prev_fmt = source, src_fmt
    for i, hop in enumerate(chain, start=1):
        dst = workdir / f"hop{i}.{EXTENSION[hop.format]}"
        say(f"hop {i}/{len(chain)}: {prev_fmt.value} -> {hop.label}")
        seconds = convert(prev, prev_fmt, dst, hop)
        dinfo = info(dst, hop.format)
        probed = info(dst)["format"]
        pitfalls = []
        vsize = int(dinfo["virtual-size"])
        prev_size = results[-1].virtual_size if results else size
        if vsize != prev_size:
            pitfalls.append(f"virtual size changed: {prev_size} -> {vsize} bytes"
                            + (" (VHD CHS geometry; use force_size=on)" if hop.format is DiskFormat.VPC else ""))
        if probed != hop.format.value:
            pitfalls.append(f"probes as {probed!r}, not {hop.format.value!r}: always pass the format explicitly")
        if not hop.guest_writable:
            pitfalls.append("streamOptimized is read-only for guests")
        hashed = independent_hash(dst, hop.format, size)
        results.append(HopResult(
            hop=hop.label, path=str(dst), seconds=round(seconds, 3), virtual_size=vsize,
            file_size=dst.stat().st_size, probed_as=probed, check=check(dst, hop.format),
            compare=compare(source, src_fmt, dst, hop.format),
            reader=hashed[0] if hashed else None,
            reader_hash_matches=(hashed[1] == src_hash) if hashed else None, pitfalls=pitfalls))
        if hashed and hashed[1] != src_hash:
            raise DiskFormatError(f"hop {i} ({hop.label}): {hashed[0]} reads different data than the source")
        prev, prev_fmt = dst, hop.format
    return {"source": str(source), "source_format": src_fmt.value, "virtual_size": size, "sha256": src_hash,
            "hops": [asdict(r) for r in results]}


def _qemu_hash(path: Path, fmt: DiskFormat, size: int, workdir: Path) -> str:
    """sha256 of the virtual disk as QEMU reads it (via a raw conversion when it is not raw)."""
    if fmt is DiskFormat.RAW:
        return _raw_reader(path, size)
    tmp = workdir / "source.raw"
    convert(path, fmt, tmp, Hop(DiskFormat.RAW))
    try:
        return _raw_reader(tmp, size)
    finally:
        tmp.unlink(missing_ok=True)
