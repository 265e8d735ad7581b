"""Disk-format conversion chains, each hop verified independently.

A chain is ``FMT[:OPT=VAL[:OPT=VAL...]],FMT...``, e.g.
``vmdk:subformat=streamOptimized,vpc:subformat=fixed:force_size=on,vhdx,qcow2:compat=0.10,raw``.
Every hop is converted with ``qemu-img convert`` and checked four ways:

1. ``qemu-img check`` (where the format supports checks);
2. ``qemu-img compare`` against the hop's reference (the chain's source, or the image the
   previous hop's guest left behind);
3. independent readers hashing the virtual disk: libyal's Python bindings (libvmdk, libvhdi
   for VHD and VHDX, libqcow), dissect.hypervisor where installed (the only reader of VDI,
   and a second opinion elsewhere), plain Python for raw; each must read the reference's data.
   A format no reader knows (QED; VDI without dissect) is recorded as unread
   (``reader_hash_matches: null`` and a ``reader_note`` saying why), never as a match;
4. with ``boot=IMAGE``, a guest of that image booting from the hop as its root disk: it checks
   a manifest of sha256 sums written into the filesystem before the chain starts, writes a
   new file and adds it to the manifest, remounts its root read-only and powers off; the next
   hop converts the image the guest left behind.  At the end the last image's files are read
   on the host (``debugfs``, no mount) and every guest's writes must be there.

Pitfalls are reported as facts with stable ids, not hidden: a virtual size that grew (VHD's
CHS geometry without ``force_size``), a format that probes as something else (a fixed VHD
probes as raw unless the format is given), a streamOptimized VMDK refusing overwrites
(measured with ``qemu-io`` on the hop, not assumed).

Corrupt or truncated inputs are :class:`DiskFormatError` with one line naming the file and
qemu-img's own words; every subprocess has a timeout.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import resource
import secrets
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness.errors import HarnessError, UsageError
from harness.vm.spec import DiskFormat

if TYPE_CHECKING:
    from harness.guest import Guest

QEMU_IMG_TIMEOUT = 600.0
QUICK_TIMEOUT = 60.0  # info, map, dd, qemu-io probes, debugfs: small work
GUEST_CMD_TIMEOUT = 120.0
HASH_CHUNK = 1 << 20
SEED_BYTES = 1 << 20  # the seed file written into the filesystem before the chain
GUEST_WRITE_BYTES = 1 << 20  # what each writable guest hop adds
BENCH_TARGET = 1.05

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

# Every format and subformat the round-trip scenarios cover, as chain hops (the ``fmt`` ids).
FORMAT_MATRIX: tuple[str, ...] = (
    "raw",
    "qcow2:compat=0.10", "qcow2:compat=1.1",
    "vmdk:subformat=monolithicSparse", "vmdk:subformat=monolithicFlat",
    "vmdk:subformat=streamOptimized", "vmdk:subformat=twoGbMaxExtentSparse",
    "vpc:subformat=dynamic", "vpc:subformat=dynamic:force_size=on",
    "vpc:subformat=fixed", "vpc:subformat=fixed:force_size=on",
    "vhdx", "vdi", "qed",
)

# ext4's superblock sits 1024 bytes in; its magic and UUID at fixed offsets in it.
EXT4_SB, EXT4_MAGIC_AT, EXT4_UUID_AT = 1024, 0x38, 0x68


class DiskFormatError(HarnessError):
    """A conversion or a verification step failed (one line: what, where, and why)."""


@dataclass(frozen=True)
class Hop:
    """One conversion target: a format and its ``qemu-img create`` options."""

    format: DiskFormat
    options: tuple[tuple[str, str], ...] = ()

    @property
    def label(self) -> str:
        return ":".join([self.format.value, *(f"{k}={v}" for k, v in self.options)])

    @property
    def guest_writable(self) -> bool:
        """False for formats QEMU is known not to let a guest overwrite (streamOptimized VMDK).
        :func:`run_chain` measures it on every hop (:func:`probe_overwrite`); this is the expectation."""
        return dict(self.options).get("subformat") != "streamOptimized"

    @property
    def qemu_options(self) -> str:
        return ",".join(f"{k}={v}" for k, v in self.options)


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


# -- qemu-img ------------------------------------------------------------------------------

def _run(argv: list[str], timeout: float, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
                              cwd=cwd)
    except subprocess.TimeoutExpired:
        raise DiskFormatError(f"{argv[0]} {argv[1]} did not finish within {timeout:g} s") from None
    except FileNotFoundError:
        raise DiskFormatError(f"{argv[0]} not found (run: make setup)") from None


def _qemu_img(*args: str, timeout: float = QEMU_IMG_TIMEOUT) -> subprocess.CompletedProcess[str]:
    return _run(["qemu-img", *args], timeout)


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else "(no message)"


def info(path: Path, fmt: DiskFormat | None = None) -> dict[str, Any]:
    """``qemu-img info`` as a dict; a clear error for anything qemu-img cannot open."""
    args = ["info", "--output=json", *(["-f", fmt.value] if fmt else []), str(path)]
    proc = _qemu_img(*args, timeout=QUICK_TIMEOUT)
    if proc.returncode != 0:
        as_what = f" as {fmt.value}" if fmt else ""
        raise DiskFormatError(f"{path}: not a readable disk image{as_what}: {_last_line(proc.stderr)}")
    data: dict[str, Any] = json.loads(proc.stdout)
    return data


def convert_argv(src: Path, src_fmt: DiskFormat, dst: Path, hop: Hop) -> list[str]:
    """The exact ``qemu-img convert`` command line of a hop (also what the benchmark runs bare)."""
    opts = hop.qemu_options
    return ["qemu-img", "convert", "-f", src_fmt.value, "-O", hop.format.value,
            *(["-o", opts] if opts else []), str(src), str(dst)]


def convert(src: Path, src_fmt: DiskFormat, dst: Path, hop: Hop) -> float:
    """Convert *src* to *dst* as *hop* says; seconds taken."""
    started = time.monotonic()
    proc = _run(convert_argv(src, src_fmt, dst, hop), QEMU_IMG_TIMEOUT)
    if proc.returncode != 0:
        raise DiskFormatError(f"qemu-img convert {src.name} ({src_fmt.value}) to {hop.label} failed: "
                              f"{_last_line(proc.stderr)}")
    return time.monotonic() - started


def check(path: Path, fmt: DiskFormat) -> str:
    """'ok', 'leaks' (leaked clusters only: harmless), 'unsupported' (the format has no
    checks), or DiskFormatError with qemu-img's findings (corruption, or a check that could
    not complete)."""
    proc = _qemu_img("check", "-f", fmt.value, str(path))
    out = (proc.stdout + proc.stderr).strip()
    if proc.returncode == 0:
        return "ok"
    if proc.returncode == 63 or "does not support checks" in out:
        return "unsupported"
    if proc.returncode == 3:
        return "leaks"
    what = "corrupt" if proc.returncode == 2 else "check did not complete"
    first = next((ln.strip() for ln in out.splitlines() if "error" in ln.lower()), _last_line(out))
    raise DiskFormatError(f"qemu-img check {path} ({fmt.value}): {what} (exit {proc.returncode}): {first}")


def check_extents(path: Path, fmt: DiskFormat) -> None:
    """DiskFormatError if the image maps virtual data to file offsets past the end of its file:
    a truncated image that ``qemu-img check`` passes (a VDI cut in half checks clean; QEMU then
    reads the lost data as zeros).  Single-file images only (a split or flat VMDK's offsets are
    in its extent files); compressed clusters have no offset and are not judged."""
    if fmt is DiskFormat.RAW or len(image_files(path)) > 1:
        return
    proc = _qemu_img("map", "--output=json", "-f", fmt.value, str(path), timeout=QUICK_TIMEOUT)
    if proc.returncode != 0:
        raise DiskFormatError(f"qemu-img map {path}: {_last_line(proc.stderr)}")
    size = path.stat().st_size
    for ext in json.loads(proc.stdout):
        if ext.get("data") and "offset" in ext and ext["offset"] + ext["length"] > size:
            raise DiskFormatError(f"{path} ({fmt.value}) is truncated: virtual bytes {ext['start']}.."
                                  f"{ext['start'] + ext['length'] - 1} are mapped to file offset {ext['offset']}, "
                                  f"past the end of the {size}-byte file")


def compare(a: Path, a_fmt: DiskFormat, b: Path, b_fmt: DiskFormat) -> str:
    """'identical' (a larger image's extra tail must read as zeros), else DiskFormatError naming
    both files and what qemu-img found (the first differing offset, or why it could not compare)."""
    proc = _qemu_img("compare", "-f", a_fmt.value, "-F", b_fmt.value, str(a), str(b))
    if proc.returncode == 0:
        return "identical"
    what = "differ" if proc.returncode == 1 else f"could not compare (exit {proc.returncode})"
    raise DiskFormatError(f"qemu-img compare {a.name} ({a_fmt.value}) {b.name} ({b_fmt.value}): {what}: "
                          f"{_last_line(proc.stdout + proc.stderr)}")


def image_files(path: Path) -> list[Path]:
    """The files an image consists of: *path* and, for split or flat VMDKs, its extents."""
    extents = sorted(p for p in path.parent.glob(f"{path.stem}-*{path.suffix}") if p != path)
    return [path, *extents]


# -- independent readers: a registry by format ---------------------------------------------

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


def _raw_reader(path: Path, length: int) -> str:
    with open(path, "rb") as f:
        def read(off: int, n: int) -> bytes:
            f.seek(off)
            return f.read(n)
        return _hash_stream(read, length)


register_reader(DiskFormat.RAW, "python", _raw_reader)


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
            raise DiskFormatError(f"{entry.name} cannot read {path.name}: {_last_line(str(exc))}") from None
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


def qemu_hash(path: Path, fmt: DiskFormat, size: int, workdir: Path) -> str:
    """sha256 of the first *size* bytes of the virtual disk as QEMU reads it."""
    if fmt is DiskFormat.RAW:
        return _raw_reader(path, size)
    tmp = workdir / f".hash-{secrets.token_hex(4)}.raw"
    convert(path, fmt, tmp, Hop(DiskFormat.RAW))
    try:
        return _raw_reader(tmp, size)
    finally:
        tmp.unlink(missing_ok=True)


def _file_digest(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            while block := f.read(HASH_CHUNK * 4):
                h.update(block)
    return h.hexdigest()


# -- pitfalls --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Pitfall:
    """A known trap, seen on this hop.  ``id`` is stable (reports key on it)."""

    id: str
    message: str


VHD_MAX_GEOMETRY = 65535 * 16 * 255  # sectors: the largest CHS a VHD footer can state


def _vhd_geometry(sectors: int) -> tuple[int, int, int]:
    """(cylinders, heads, sectors per track) for *sectors*, by the VHD specification's
    algorithm (as QEMU's vpc driver implements it)."""
    sectors = min(sectors, VHD_MAX_GEOMETRY)
    if sectors >= 65535 * 16 * 63:
        spt, heads = 255, 16
        cth = sectors // spt
    else:
        spt = 17
        cth = sectors // spt
        heads = max(4, -(-cth // 1024))
        if cth >= heads * 1024 or heads > 16:
            spt, heads = 31, 16
            cth = sectors // spt
        if cth >= heads * 1024:
            spt, heads = 63, 16
            cth = sectors // spt
    return cth // heads, heads, spt


def vhd_chs_size(size: int) -> int:
    """The virtual size ``qemu-img`` gives a VHD of *size* bytes without ``force_size``: the
    smallest CHS geometry holding at least *size* (sizes past the CHS range stay as they are)."""
    wanted = min(VHD_MAX_GEOMETRY, size // 512)
    c = h = s = 0
    i = 0
    while wanted > c * h * s:
        c, h, s = _vhd_geometry(wanted + i)
        i += 1
    if c * h * s == VHD_MAX_GEOMETRY:
        return size // 512 * 512
    return c * h * s * 512


def size_pitfall(hop: Hop, before: int, after: int) -> Pitfall | None:
    if before == after:
        return None
    if hop.format is DiskFormat.VPC and dict(hop.options).get("force_size") != "on":
        rule = vhd_chs_size(before)
        return Pitfall("vhd-chs-geometry", f"virtual size grew {before} -> {after} bytes (+{after - before}): "
                                           f"VHD rounds up to a CHS geometry (the rule predicts {rule}"
                                           f"{'' if rule == after else ', NOT what qemu-img did'}); "
                                           "force_size=on keeps it exact")
    return Pitfall("virtual-size-changed", f"virtual size changed {before} -> {after} bytes")


def probe_pitfall(hop: Hop, path: Path, probed: dict[str, Any], virtual_size: int) -> Pitfall | None:
    if probed["format"] == hop.format.value:
        return None
    extra = ""
    if probed["format"] == "raw":
        seen = int(probed["virtual-size"])
        extra = f" (read that way it is {seen} bytes, {seen - virtual_size:+d}: the container's own bytes become data)"
    return Pitfall("probes-as-other", f"{path.name} probes as {probed['format']!r}, not {hop.format.value!r}"
                                      f"{extra}: always pass the format explicitly")


def _first_allocated(path: Path, fmt: DiskFormat) -> int | None:
    proc = _qemu_img("map", "--output=json", "-f", fmt.value, str(path), timeout=QUICK_TIMEOUT)
    if proc.returncode != 0:
        raise DiskFormatError(f"qemu-img map {path.name}: {_last_line(proc.stderr)}")
    for ext in json.loads(proc.stdout):
        if ext.get("data") and ext.get("length", 0) >= 65536:
            return int(ext["start"])
    return None


def probe_overwrite(path: Path, fmt: DiskFormat, workdir: Path) -> Pitfall | None:
    """Try to overwrite one allocated 64 KiB of *path* with the bytes already there (so the
    data cannot change either way) through QEMU's own block layer (``qemu-io``).

    A pitfall when QEMU refuses (a streamOptimized VMDK: "Could not write to allocated
    cluster for streamOptimized"); None when the write went through.
    """
    offset = _first_allocated(path, fmt)
    if offset is None:
        return None
    same = workdir / f".probe-{secrets.token_hex(4)}.bin"
    try:
        proc = _qemu_img("dd", "-f", fmt.value, "-O", "raw", "bs=65536", f"skip={offset // 65536}", "count=1",
                         f"if={path}", f"of={same}", timeout=QUICK_TIMEOUT)
        if proc.returncode != 0:
            raise DiskFormatError(f"qemu-img dd {path.name}: {_last_line(proc.stderr)}")
        # qemu-io splits its command at spaces (no quoting): name the pattern file relative to its cwd.
        proc = _run(["qemu-io", "-f", fmt.value, "-c", f"write -s {same.name} {offset} 64k", str(path.resolve())],
                    QUICK_TIMEOUT, cwd=workdir)
    finally:
        same.unlink(missing_ok=True)
    said = (proc.stdout + proc.stderr).strip()
    if proc.returncode == 0 and "failed" not in said.lower():
        return None
    if "write failed" not in said.lower():  # not a refusal: the probe itself went wrong
        raise DiskFormatError(f"qemu-io write probe of {path.name} ({fmt.value}) failed: {_last_line(said)}")
    reason = next((ln.split(":", 1)[1].strip() for ln in said.splitlines() if ln.startswith("qemu-io:")),
                  _last_line(said))
    return Pitfall("guest-write-refused", f"QEMU refuses to overwrite allocated data at offset {offset}: "
                                          f"{reason!r}; guests get I/O errors, so the guest hop is read-only")


# -- the guest part: a manifest of checksums inside the image's ext4 -------------------------

def ext4_uuid(path: Path) -> str | None:
    """The UUID of an ext4 filesystem starting at byte 0 of *path* (a raw image), else None."""
    with open(path, "rb") as f:
        f.seek(EXT4_SB)
        sb = f.read(0x78)
    if len(sb) < 0x78 or sb[EXT4_MAGIC_AT:EXT4_MAGIC_AT + 2] != b"\x53\xef":
        return None
    u = sb[EXT4_UUID_AT:EXT4_UUID_AT + 16].hex()
    return f"{u[:8]}-{u[8:12]}-{u[12:16]}-{u[16:20]}-{u[20:]}"


def _debugfs(image: Path, commands: list[str], *, write: bool = False) -> str:
    with tempfile.NamedTemporaryFile("w", suffix=".debugfs", dir=image.parent) as script:
        script.write("\n".join(commands) + "\n")
        script.flush()
        proc = _run(["debugfs", *(["-w"] if write else []), "-f", script.name, str(image)], QUICK_TIMEOUT)
    # debugfs exits 0 even when a command fails; its complaints go to stderr.
    errors = [ln for ln in proc.stderr.splitlines()
              if ln.strip() and not ln.startswith("debugfs ") and "EXT2_ET" not in ln]
    if proc.returncode != 0 or errors:
        raise DiskFormatError(f"debugfs on {image.name}: {errors[0] if errors else _last_line(proc.stderr)}")
    return proc.stdout


def seed_manifest(raw: Path, directory: str, workdir: Path) -> dict[str, str]:
    """Write a random seed file and a sha256 manifest into the ext4 in *raw* (no mount);
    returns {file name: sha256}."""
    seed = workdir / "seed.bin"
    seed.write_bytes(os.urandom(SEED_BYTES))
    files = {"seed.bin": hashlib.sha256(seed.read_bytes()).hexdigest()}
    manifest = workdir / "MANIFEST.sha256"
    manifest.write_text("".join(f"{h}  {n}\n" for n, h in files.items()))
    _debugfs(raw, [f"mkdir {directory}", f'write "{seed}" {directory}/seed.bin',
                   f'write "{manifest}" {directory}/MANIFEST.sha256'], write=True)
    return files


def read_files(raw: Path, directory: str, workdir: Path) -> dict[str, bytes]:
    """{file name: content} of every file in *directory* of the ext4 in *raw*, read on the host."""
    out = workdir / f".dump-{secrets.token_hex(4)}"
    out.mkdir()
    try:
        _debugfs(raw, [f'rdump {directory} "{out}"'])
        got = out / Path(directory).name
        return {p.name: p.read_bytes() for p in sorted(got.iterdir()) if p.is_file()}
    finally:
        shutil.rmtree(out, ignore_errors=True)


def parse_manifest(text: str) -> dict[str, str]:
    """``sha256sum`` output → {name: sha256}; DiskFormatError on a malformed line."""
    files = {}
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        m = re.fullmatch(r"([0-9a-f]{64}) [ *](\S+)", line.strip())
        if not m:
            raise DiskFormatError(f"manifest line {n} is not 'SHA256  NAME': {line[:80]!r}")
        files[m.group(2)] = m.group(1)
    return files


@dataclass
class GuestCheck:
    """What a guest booted from a hop saw and did."""

    image: str
    writable: bool
    ready_seconds: float | None = None
    manifest_verified: int = 0  # files whose sha256 the guest checked
    wrote: dict[str, str] | None = None  # {"name", "sha256"} of the file it added
    refused: str | None = None  # read-only hops: the guest's own error when it tried to write
    remount_ro: str = ""  # "ok" or why not (then the next mount replays the journal)
    changed: bool | None = None  # whether the image's virtual data changed
    seconds: float = 0.0
    serial_log: str | None = None


def _guest_hop(image: str, disk: Path, fmt: DiskFormat, *, index: int, directory: str, expected: dict[str, str],
               writable: bool, log_dir: Path | None, on_guest: Callable[[Guest], None] | None) -> GuestCheck:
    from harness.guest import BootOptions, boot
    from harness.vm.spec import Drive

    started = time.monotonic()
    # A read-only drive needs a read-only root mount, or the initramfs' rw mount fails.
    opts = BootOptions(root_disk=Drive(disk, fmt, read_only=not writable, serial="nestbed-root"),
                       append="" if writable else "ro")
    result = GuestCheck(image=image, writable=writable)
    with boot(image, options=opts, log_dir=log_dir) as g:
        if on_guest is not None:
            on_guest(g)
        result.ready_seconds = g.ready_seconds
        result.serial_log = str(g.machine.serial_log_path)
        listed = parse_manifest(g.check_output(f"cat {directory}/MANIFEST.sha256", timeout=GUEST_CMD_TIMEOUT))
        if listed != expected:
            missing = sorted(set(expected) - set(listed))
            raise DiskFormatError(f"hop {index} ({disk.name}): the guest's manifest differs from the record "
                                  f"(missing {missing or 'none'}, extra {sorted(set(listed) - set(expected)) or 'none'})")
        r = g.run(f"cd {directory} && sha256sum -c MANIFEST.sha256", timeout=GUEST_CMD_TIMEOUT)
        bad = [ln for ln in r.stdout.splitlines() if not ln.endswith(": OK")]
        if r.exit_status != 0 or bad:
            raise DiskFormatError(f"hop {index} ({disk.name}): the guest's sha256sum -c failed: "
                                  f"{(bad or [_last_line(r.stderr)])[0]}")
        result.manifest_verified = len(r.stdout.splitlines())
        name = f"hop{index:02d}-{fmt.value}.bin"
        if writable:
            out = g.check_output(
                f"cd {directory} && head -c {GUEST_WRITE_BYTES} /dev/urandom > {name} && sha256sum {name} "
                f"| tee -a MANIFEST.sha256 && sync", timeout=GUEST_CMD_TIMEOUT)
            result.wrote = {"name": name, "sha256": parse_manifest(out)[name]}
        else:
            r = g.run(f"touch {directory}/{name}", timeout=GUEST_CMD_TIMEOUT)
            if r.exit_status == 0:
                raise DiskFormatError(f"hop {index} ({disk.name}): a read-only root disk accepted a write")
            result.refused = _last_line(r.stderr or r.stdout)
        # A clean filesystem for the next hop: nothing to replay, and a read-only hop can mount it.
        r = g.run("sync && mount -o remount,ro /", timeout=GUEST_CMD_TIMEOUT)
        result.remount_ro = "ok" if r.exit_status == 0 else _last_line(r.stderr or r.stdout)
    result.seconds = round(time.monotonic() - started, 2)
    return result


# -- the chain --------------------------------------------------------------------------------

@dataclass
class HopResult:
    index: int
    hop: str
    format: str
    source: str  # the image this hop was converted from
    path: str
    seconds: float
    virtual_size: int
    file_size: int
    files: list[str]
    probed_as: str
    check: str
    compare: str
    reader: str | None
    reader_hash_matches: bool | None  # None: no independent reader read this hop (not a match)
    reader_note: str | None  # why no reader read it (None when one did)
    readers: list[dict[str, Any]]
    sha256: str  # the virtual data this hop carries (its reference's, as QEMU read it)
    pitfalls: list[dict[str, str]] = field(default_factory=list)
    guest: dict[str, Any] | None = None
    sha256_after_guest: str | None = None
    verify_seconds: float = 0.0


@contextlib.contextmanager
def _at_hop(index: int, hop: Hop) -> Iterator[None]:
    """A DiskFormatError inside says which hop it is about."""
    try:
        yield
    except DiskFormatError as exc:
        raise DiskFormatError(f"hop {index} ({hop.label}): {exc}") from None


def _boot_image(name: str) -> Any:
    from harness.images import store as images

    img = images.build(name)
    if img.disk is None:
        raise UsageError(f"--boot {name}: that image boots from an initramfs and has no root disk")
    return img


def run_chain(source: Path, chain: list[Hop], workdir: Path, *, source_format: DiskFormat | None = None,
              progress: Callable[[str], None] | None = None, boot: str | None = None,
              second_opinion: bool = True, log_dir: Path | None = None,
              on_guest: Callable[[Guest], None] | None = None) -> dict[str, Any]:
    """Convert *source* through *chain* in *workdir*, verifying every hop (see the module doc).

    With *boot* (an image name whose kernel boots *source*'s root filesystem), the source is
    first copied to ``workdir/seeded.raw`` and a manifest written into it; *source* itself is
    never modified.  Returns the JSON-able result documented in docs/disk-formats.md.
    """
    say = progress or (lambda _m: None)
    started = time.monotonic()
    workdir.mkdir(parents=True, exist_ok=True)
    if not source.is_file():
        raise DiskFormatError(f"{source}: no such file")
    src_info = info(source, source_format)
    src_fmt = DiskFormat(source_format or src_info["format"])
    size = int(src_info["virtual-size"])
    if size == 0:
        raise DiskFormatError(f"{source}: virtual size is 0 bytes: nothing to convert")
    say(f"checking the source ({src_fmt.value}, {size} bytes)")
    src_check = check(source, src_fmt)
    check_extents(source, src_fmt)
    directory = f"/nestbed-roundtrip-{secrets.token_hex(4)}"
    expected: dict[str, str] = {}
    seeded = workdir / "seeded.raw"
    if boot is not None:
        img = _boot_image(boot)
        say(f"copying the source to {seeded.name}")
        convert(source, src_fmt, seeded, Hop(DiskFormat.RAW))
        say("hashing the source as QEMU reads it")
        src_hash = _raw_reader(seeded, size)  # the copy is what QEMU read
    else:
        say("hashing the source as QEMU reads it")
        src_hash = qemu_hash(source, src_fmt, size, workdir)
    result: dict[str, Any] = {"source": str(source), "source_format": src_fmt.value, "virtual_size": size,
                              "sha256": src_hash, "source_check": src_check, "boot": boot, "seeded": None,
                              "hops": [], "final": None}
    ref, ref_fmt, ref_hash = source, src_fmt, src_hash
    if boot is not None:
        fs_uuid = ext4_uuid(seeded)
        want = img.manifest.get("rootfs_uuid")
        if fs_uuid is None:
            raise DiskFormatError(f"--boot {boot}: {source} has no ext4 filesystem at its start "
                                  "(nestbed boots whole-disk ext4 roots)")
        if want and fs_uuid != want:
            raise DiskFormatError(f"--boot {boot}: {source}'s filesystem UUID {fs_uuid} is not {boot}'s root "
                                  f"({want}): that kernel command line cannot find it")
        say(f"writing a seed file and its sha256 manifest into {seeded.name}'s ext4 ({directory}, debugfs)")
        expected = seed_manifest(seeded, directory, workdir)
        ref, ref_fmt = seeded, DiskFormat.RAW
        ref_hash = _raw_reader(seeded, size)
        result["seeded"] = {"path": str(seeded), "directory": directory, "sha256": ref_hash, "files": dict(expected)}
    image_name = boot
    for i, hop in enumerate(chain, start=1):
        dst = workdir / f"hop{i}.{EXTENSION[hop.format]}"
        for stale in image_files(dst):
            stale.unlink(missing_ok=True)
        say(f"hop {i}/{len(chain)}: {ref_fmt.value} -> {hop.label}: converting")
        seconds = convert(ref, ref_fmt, dst, hop)
        t0 = time.monotonic()
        dinfo = info(dst, hop.format)
        probed = info(dst)
        vsize = int(dinfo["virtual-size"])
        prev_size = result["hops"][-1]["virtual_size"] if result["hops"] else size
        pitfalls = [p for p in (size_pitfall(hop, prev_size, vsize), probe_pitfall(hop, dst, probed, vsize)) if p]
        say(f"hop {i}/{len(chain)}: {hop.label}: qemu-img check and compare")
        with _at_hop(i, hop):
            checked = check(dst, hop.format)
            check_extents(dst, hop.format)
            compared = compare(ref, ref_fmt, dst, hop.format)

        def hop_say(m: str, i: int = i) -> None:
            say(f"hop {i}/{len(chain)}: {m}")

        with _at_hop(i, hop):
            hashes = independent_hashes(dst, hop.format, size, second_opinion=second_opinion, say=hop_say)
        readers: list[dict[str, Any]] = [{"name": n, "sha256": h, "matches": h == ref_hash} for n, h in hashes]
        for r in readers:
            if not r["matches"]:
                raise DiskFormatError(f"hop {i} ({hop.label}): independent reader {r['name']} reads {dst.name} as "
                                      f"different data than QEMU reads {ref.name} (sha256 {r['sha256'][:16]} vs "
                                      f"{ref_hash[:16]})")
        # Whether QEMU lets a guest overwrite this hop is measured, not assumed from the format name.
        refused = probe_overwrite(dst, hop.format, workdir)
        if refused is not None:
            pitfalls.append(refused)
        files = image_files(dst)
        hr = HopResult(
            index=i, hop=hop.label, format=hop.format.value, source=str(ref), path=str(dst),
            seconds=round(seconds, 3), virtual_size=vsize, file_size=sum(p.stat().st_size for p in files),
            files=[p.name for p in files], probed_as=probed["format"], check=checked, compare=compared,
            reader=readers[0]["name"] if readers else None,
            reader_hash_matches=all(r["matches"] for r in readers) if readers else None,
            reader_note=None if readers else no_reader_note(hop.format) or "no independent reader read this hop",
            readers=readers,
            sha256=ref_hash, pitfalls=[asdict(p) for p in pitfalls], verify_seconds=round(time.monotonic() - t0, 3))
        next_hash = ref_hash
        if image_name is not None:
            writable = refused is None
            say(f"hop {i}/{len(chain)}: booting {image_name} from {dst.name} "
                f"({hop.format.value}, {'read-write' if writable else 'read-only'})")
            before = None if writable else _file_digest(files)
            gc = _guest_hop(image_name, dst, hop.format, index=i, directory=directory, expected=expected,
                            writable=writable, log_dir=log_dir, on_guest=on_guest)
            if gc.wrote:
                expected[gc.wrote["name"]] = gc.wrote["sha256"]
                say(f"hop {i}/{len(chain)}: hashing what the guest left")
                next_hash = qemu_hash(dst, hop.format, size, workdir)
                gc.changed = next_hash != ref_hash
                if not gc.changed:
                    raise DiskFormatError(f"hop {i} ({hop.label}): the guest wrote {gc.wrote['name']} but "
                                          f"{dst.name}'s data did not change (sha256 still {ref_hash[:16]}): "
                                          "the write was lost")
            else:
                gc.changed = _file_digest(files) != before
                if gc.changed:
                    raise DiskFormatError(f"hop {i} ({hop.label}): {', '.join(p.name for p in files)} changed "
                                          "under a read-only guest (the files differ from before it booted)")
            hr.guest = asdict(gc)
            hr.sha256_after_guest = next_hash
        result["hops"].append(asdict(hr))
        ref, ref_fmt, ref_hash = dst, hop.format, next_hash
    if image_name is not None:
        result["final"] = verify_final(ref, ref_fmt, directory, expected, workdir, say)
    result["seconds"] = round(time.monotonic() - started, 2)
    return result


def verify_final(path: Path, fmt: DiskFormat, directory: str, expected: dict[str, str], workdir: Path,
                 say: Callable[[str], None]) -> dict[str, Any]:
    """Read the manifest directory of the chain's last image on the host and fsck it."""
    say(f"reading {directory} from {path.name} on the host (debugfs) and running e2fsck -fn")
    raw = path if fmt is DiskFormat.RAW else workdir / ".final.raw"
    if raw != path:
        convert(path, fmt, raw, Hop(DiskFormat.RAW))
    try:
        contents = read_files(raw, directory, workdir)
        fsck = _run(["e2fsck", "-fn", str(raw)], QUICK_TIMEOUT * 2)
    finally:
        if raw != path:
            raw.unlink(missing_ok=True)
    listed = parse_manifest(contents.pop("MANIFEST.sha256", b"").decode(errors="replace"))
    got = {name: hashlib.sha256(data).hexdigest() for name, data in contents.items()}
    missing = sorted(set(expected) - set(got))
    mismatched = sorted(n for n in expected if n in got and got[n] != expected[n])
    out = {"directory": directory, "files": expected, "manifest_matches": listed == expected,
           "intact": not missing and not mismatched and listed == expected, "missing": missing,
           "mismatched": mismatched,
           "fsck": "clean" if fsck.returncode == 0 else f"exit {fsck.returncode}: {_last_line(fsck.stdout)}"}
    if not out["intact"]:
        raise DiskFormatError(f"{path.name}: the guests' writes are not intact at the end: missing "
                              f"{missing or 'none'}, different {mismatched or 'none'}, manifest "
                              f"{'as recorded' if listed == expected else 'differs from the record'}")
    return out


def render_text(result: dict[str, Any]) -> str:
    """The human-readable form of a :func:`run_chain` result."""
    lines = [f"source {result['source']} ({result['source_format']}, {result['virtual_size']} bytes, "
             f"check {result['source_check']}) sha256 {result['sha256'][:16]}"]
    if result.get("seeded"):
        s = result["seeded"]
        lines.append(f"seeded {s['path']}: {', '.join(s['files'])} in {s['directory']} (sha256 {s['sha256'][:16]})")
    for hop in result["hops"]:
        readers = ", ".join(f"{r['name']} {'same data' if r['matches'] else 'DIFFERENT'}" for r in hop["readers"]) \
            or "no independent reader"
        lines.append(f"  {hop['index']:2} {hop['hop']:38} {hop['seconds']:6.2f}s {hop['virtual_size']:>12} B  "
                     f"check={hop['check']} compare={hop['compare']}  {readers}")
        if hop.get("reader_note"):
            lines.append(f"       unread: {hop['reader_note']}")
        for pitfall in hop["pitfalls"]:
            lines.append(f"       pitfall {pitfall['id']}: {pitfall['message']}")
        g = hop.get("guest")
        if g:
            did = f"wrote {g['wrote']['name']}" if g["wrote"] else f"read-only: {g['refused']}"
            lines.append(f"       guest {g['image']}: ready {g['ready_seconds'] or 0:.1f}s, verified "
                         f"{g['manifest_verified']} files, {did}, remount ro {g['remount_ro']} ({g['seconds']:.1f}s)")
    final = result.get("final")
    if final:
        lines.append(f"final: {len(final['files'])} files {'intact' if final['intact'] else 'NOT intact'} "
                     f"({', '.join(final['files'])}); e2fsck -fn: {final['fsck']}")
    return "\n".join(lines)


# -- benchmark ----------------------------------------------------------------------------------

def _stats(samples: list[float]) -> dict[str, Any]:
    return {"samples": [round(s, 3) for s in samples], "median": round(statistics.median(samples), 3),
            "min": round(min(samples), 3), "max": round(max(samples), 3)}


def _child_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def bench_hops(source: Path, chain: str | list[Hop], *, runs: int = 5, workdir: Path | None = None,
               source_format: DiskFormat | None = None, target: float = BENCH_TARGET) -> dict[str, Any]:
    """Each hop's conversion as nestbed runs it (:func:`convert`) vs a bare ``qemu-img convert``
    of the same input with the same arguments, interleaved (bare, nestbed, bare, ...) after one
    warm-up of each; medians of *runs* (at least 5).  Also the median cost of the hop's
    verification (check, compare, every reader), which the bare command does not do.

    Returns ``{"source", "virtual_size", "runs", "target", "hops": [{"hop", "from", "bare",
    "nestbed", "ratio", "ratio_of", "meets_target", "bare_cpu", "nestbed_cpu", "cpu_ratio", "verify"}],
    "meets_target"}``: wall-clock stats, and qemu-img's CPU time (user+sys), which the noise of
    a shared machine inflates far less.  Put *workdir* on tmpfs to keep disk contention out.
    """
    if runs < 5:
        raise UsageError(f"bench_hops: runs={runs}: medians need at least 5 runs")
    hops = parse_chain(chain) if isinstance(chain, str) else chain
    src_info = info(source, source_format)
    src_fmt = DiskFormat(source_format or src_info["format"])
    size = int(src_info["virtual-size"])
    with contextlib.ExitStack() as stack:
        work = workdir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="nestbed-bench-hops-")))
        work.mkdir(parents=True, exist_ok=True)
        out: list[dict[str, Any]] = []
        prev, prev_fmt = source, src_fmt
        for i, hop in enumerate(hops, start=1):
            dst = work / f"bench{i}.{EXTENSION[hop.format]}"  # also the next hop's input

            def clear(d: Path = dst) -> None:
                for p in image_files(d):
                    p.unlink(missing_ok=True)

            def bare(p: Path = prev, f: DiskFormat = prev_fmt, h: Hop = hop, d: Path = dst) -> tuple[float, float]:
                clear(d)
                cpu, t = _child_cpu(), time.monotonic()
                proc = subprocess.run(convert_argv(p, f, d, h), capture_output=True, timeout=QEMU_IMG_TIMEOUT,
                                      stdin=subprocess.DEVNULL)
                elapsed = time.monotonic() - t
                if proc.returncode != 0:
                    raise DiskFormatError(f"bare qemu-img convert to {h.label} failed: "
                                          f"{_last_line(proc.stderr.decode(errors='replace'))}")
                return elapsed, _child_cpu() - cpu

            def ours(p: Path = prev, f: DiskFormat = prev_fmt, h: Hop = hop, d: Path = dst) -> tuple[float, float]:
                clear(d)
                cpu, t = _child_cpu(), time.monotonic()
                convert(p, f, d, h)
                return time.monotonic() - t, _child_cpu() - cpu

            bare(), ours()  # warm-up: page cache, first-run costs
            xs: list[tuple[float, float]] = []
            ys: list[tuple[float, float]] = []
            for _ in range(runs):
                xs.append(bare())
                ys.append(ours())
            verify: list[float] = []
            for _ in range(runs):
                t = time.monotonic()
                check(dst, hop.format)
                compare(prev, prev_fmt, dst, hop.format)
                independent_hashes(dst, hop.format, size)
                verify.append(time.monotonic() - t)
            b, n = _stats([x[0] for x in xs]), _stats([y[0] for y in ys])
            bc, nc = _stats([x[1] for x in xs]), _stats([y[1] for y in ys])
            ratio = round(n["median"] / b["median"], 3) if b["median"] else None
            out.append({"hop": hop.label, "from": prev_fmt.value, "bare": b, "nestbed": n, "ratio": ratio,
                        "ratio_of": "nestbed/bare", "meets_target": ratio is not None and ratio <= target,
                        # qemu-img's own CPU time (user+sys): what contention on a shared machine cannot inflate
                        "bare_cpu": bc, "nestbed_cpu": nc,
                        "cpu_ratio": round(nc["median"] / bc["median"], 3) if bc["median"] else None,
                        "verify": _stats(verify)})
            prev, prev_fmt = dst, hop.format
    return {"source": str(source), "source_format": src_fmt.value, "virtual_size": size, "runs": runs,
            "target": target, "hops": out, "meets_target": all(h["meets_target"] for h in out)}
