"""What a disk image is, read without booting or writing it: ``nestbed images inspect FILE``.

An OVF or OVA (:func:`inspect_file`) is read by :func:`harness.images.ovf.describe` (hardware, manifest
digests) and each of its disks is inspected as below, in place inside the OVA (a ``json:`` file name with
the member's offset and size) and with the format the OVF declares.

``qemu-img info`` gives the format (any QEMU reads: raw, qcow2, vmdk of every subformat, vpc, vhdx,
vdi, ...) and the virtual size; the first MiB, read through QEMU (``qemu-img dd``, so every format
works, to a private temporary file), gives the partition table: MBR, or GPT behind its protective MBR.
From the table comes the firmware guess, with its reason: an EFI system partition → UEFI; a BIOS boot
partition or an active MBR partition → BIOS; both → either.  The file is untrusted input: the table
parser checks every offset and count against the bytes it has, and a bad file is one line naming it.
"""

from __future__ import annotations

import json
import struct
import tempfile
import uuid
from pathlib import Path
from typing import Any

from harness.core.run import run
from harness.errors import UsageError
from harness.images import ovf

SECTOR = 512
HEAD_BYTES = 1 << 20  # MBR, GPT header and the usual 128 entries all fit in the first MiB
INFO_TIMEOUT = 60.0
GPT_ESP = "c12a7328-f81f-11d2-ba4b-00a0c93ec93b"
GPT_BIOS_BOOT = "21686148-6449-6e6f-744e-656564454649"
GPT_TYPES = {
    GPT_ESP: "EFI system",
    GPT_BIOS_BOOT: "BIOS boot",
    "0fc63daf-8483-4772-8e79-3d69d8477de4": "Linux filesystem",
    "0657fd6d-a4ab-43c4-84e5-0933c84b4f4f": "Linux swap",
    "e6d6d379-f507-44c2-a23c-238f2a3df928": "Linux LVM",
    "4f68bce3-e8cd-4db1-96e7-fbcaf984b709": "Linux root (x86-64)",
    "44479540-f297-41b2-9af7-d131d5f0458a": "Linux root (x86)",
    "ebd0a0a2-b9e5-4433-87c0-68b6b72699c7": "Microsoft basic data",
    "e3c9e316-0b5c-4db8-817d-f92df00215ae": "Microsoft reserved",
}
MBR_TYPES = {0x07: "NTFS/exFAT", 0x0B: "FAT32", 0x0C: "FAT32 (LBA)", 0x82: "Linux swap", 0x83: "Linux",
             0x8E: "Linux LVM", 0xEE: "GPT protective", 0xEF: "EFI system", 0x05: "extended", 0x0F: "extended (LBA)"}
MAX_GPT_ENTRIES = 1024


class InspectError(UsageError):
    """A file that is not a disk image QEMU reads, or whose partition table is damaged."""


def _guid(raw: bytes) -> str:
    return str(uuid.UUID(bytes_le=raw))


def parse_partitions(head: bytes) -> dict[str, Any]:
    """The partition table in the first bytes of a disk (pure): {"table": "gpt"|"mbr"|"none", "partitions": [...]}."""
    if len(head) < SECTOR or head[510:512] != b"\x55\xaa":
        return {"table": "none", "partitions": []}
    mbr = []
    for i in range(4):
        entry = head[446 + 16 * i: 446 + 16 * (i + 1)]
        status, ptype = entry[0], entry[4]
        start, count = struct.unpack_from("<II", entry, 8)
        if ptype == 0:
            continue
        mbr.append({"index": i + 1, "type": f"0x{ptype:02x}", "type_name": MBR_TYPES.get(ptype, "unknown"),
                    "start": start * SECTOR, "size": count * SECTOR, "active": status == 0x80})
    if not any(p["type"] == "0xee" for p in mbr):
        return {"table": "mbr", "partitions": mbr}
    hdr = head[SECTOR:2 * SECTOR]
    if len(hdr) < 92 or hdr[:8] != b"EFI PART":
        raise InspectError("a protective MBR but no GPT header at LBA 1")
    entries_lba, count, size = struct.unpack_from("<QII", hdr, 72)
    if not 0 < count <= MAX_GPT_ENTRIES or size < 128 or size > 4096:
        raise InspectError(f"GPT header: {count} entries of {size} bytes is not a partition table")
    first = entries_lba * SECTOR
    if first < 2 * SECTOR or first + count * size > len(head):
        raise InspectError(f"GPT entries at LBA {entries_lba} ({count} x {size} bytes) lie outside the first "
                           f"{len(head) // 1024} KiB")
    parts = []
    for i in range(count):
        e = head[first + i * size: first + (i + 1) * size]
        if e[:16] == bytes(16):
            continue
        type_guid = _guid(e[:16])
        lba0, lba1 = struct.unpack_from("<QQ", e, 32)
        name = e[56:128].decode("utf-16-le", errors="replace").split("\x00", 1)[0]
        parts.append({"index": i + 1, "type": type_guid, "type_name": GPT_TYPES.get(type_guid, "unknown"),
                      "name": name, "start": lba0 * SECTOR, "size": max(0, lba1 - lba0 + 1) * SECTOR})
    return {"table": "gpt", "disk_guid": _guid(hdr[56:72]), "partitions": parts}


def firmware_guess(table: dict[str, Any]) -> tuple[str, str]:
    """("uefi"|"bios"|"either"|"unknown", why) from a parsed partition table (pure)."""
    parts = table["partitions"]
    esp = [p for p in parts if p["type"] in (GPT_ESP, "0xef")]
    bios = [p for p in parts if p["type"] == GPT_BIOS_BOOT] if table["table"] == "gpt" else \
        [p for p in parts if p.get("active")]
    if esp and bios:
        return "either", (f"an EFI system partition (#{esp[0]['index']}) and "
                          + (f"a BIOS boot partition (#{bios[0]['index']})" if table["table"] == "gpt"
                             else f"an active MBR partition (#{bios[0]['index']})"))
    if esp:
        return "uefi", f"an EFI system partition (#{esp[0]['index']}) and no BIOS boot partition"
    if bios:
        what = "a BIOS boot partition" if table["table"] == "gpt" else "an active MBR partition"
        return "bios", f"{what} (#{bios[0]['index']}) and no EFI system partition"
    if table["table"] == "mbr":
        return "bios", "an MBR without an EFI system partition (SeaBIOS runs the MBR's boot code)"
    if table["table"] == "gpt":
        return "uefi", "a GPT without a BIOS boot partition (GRUB on BIOS would have nowhere to live)"
    return "unknown", "no partition table: a bare filesystem or an empty disk boots under neither"


def inspect_disk(path: Path) -> dict[str, Any]:
    """Format, sizes, partition table and firmware guess of the disk image at *path* (never written)."""
    if not path.is_file():
        raise InspectError(f"{path}: no such file")
    proc = run(["qemu-img", "info", "--output=json", str(path)], timeout=INFO_TIMEOUT,
               what=f"inspect {path}", error=InspectError)
    try:
        info = json.loads(proc.stdout)
        fmt, virtual = str(info["format"]), int(info["virtual-size"])
    except (ValueError, KeyError, TypeError):
        raise InspectError(f"{path}: qemu-img info gave no format and size") from None
    note = None
    if fmt == "raw" and _fixed_vhd_footer(path):
        # QEMU's probe looks for the VHD cookie at the start; a fixed VHD has it only in its last sector.
        fmt, note = "vpc", "a fixed VHD (its footer is the last sector): qemu-img's probe calls it raw, so open it " \
                           "with format=vpc (or as raw, which includes the 512-byte footer in the disk)"
        proc = run(["qemu-img", "info", "-f", "vpc", "--output=json", str(path)], timeout=INFO_TIMEOUT,
                   what=f"inspect {path}", error=InspectError)
        info = json.loads(proc.stdout)
        virtual = int(info["virtual-size"])
    table, firmware, why = _table(str(path), fmt, virtual, str(path))
    out: dict[str, Any] = {"path": str(path), "format": fmt, "virtual_size": virtual,
                           "file_size": path.stat().st_size, **table, "firmware": firmware, "firmware_why": why}
    subformat = (info.get("format-specific") or {}).get("data", {}).get("create-type") or \
        (info.get("format-specific") or {}).get("data", {}).get("subformat")
    if subformat:
        out["subformat"] = subformat
    if note:
        out["subformat"], out["note"] = "fixed", note
    return out


def _table(source: str, fmt: str | None, virtual: int, label: str) -> tuple[dict[str, Any], str, str]:
    """The partition table in the first MiB of *source* (a file name or a ``json:`` spec), and the firmware
    guess from it."""
    with tempfile.TemporaryDirectory(prefix="nestbed-inspect-") as tmp:
        head_path = Path(tmp) / "head.raw"
        count = max(1, min(HEAD_BYTES, virtual) // SECTOR)
        run(["qemu-img", "dd", *(["-f", fmt] if fmt else []), "-O", "raw", f"bs={SECTOR}", f"count={count}",
             f"if={source}", f"of={head_path}"], timeout=INFO_TIMEOUT, what=f"inspect {label}", error=InspectError)
        head = head_path.read_bytes()
    try:
        table = parse_partitions(head)
    except InspectError as exc:
        raise InspectError(f"{label}: {exc}") from None
    firmware, why = firmware_guess(table)
    return table, firmware, why


def member_source(container: Path, offset: int, size: int, fmt: str) -> str:
    """A ``json:`` file name that opens the *fmt* disk stored at *offset* (*size* bytes) inside *container*
    (an OVA's tar member, in place: tar stores a member's data contiguously)."""
    return "json:" + json.dumps({"driver": fmt, "file": {"driver": "raw", "offset": offset, "size": size,
                                                         "file": {"driver": "file", "filename": str(container)}}})


def inspect_appliance_disk(disk: dict[str, Any], label: str) -> dict[str, Any]:
    """Virtual size, partition table and firmware guess of one disk that :func:`harness.images.ovf.describe`
    found, read in place with the format the OVF declares (never extracted, never written)."""
    source = member_source(Path(disk["path"]), int(disk["offset"]), int(disk["file_size"]), str(disk["format"]))
    proc = run(["qemu-img", "info", "--output=json", source], timeout=INFO_TIMEOUT, what=f"inspect {label}",
               error=InspectError)
    try:
        info = json.loads(proc.stdout)
        virtual = int(info["virtual-size"])
    except (ValueError, KeyError, TypeError):
        raise InspectError(f"{label}: qemu-img info gave no size") from None
    table, firmware, why = _table(source, None, virtual, label)
    out: dict[str, Any] = {"virtual_size": virtual, **table, "firmware_guess": firmware, "firmware_guess_why": why}
    data = (info.get("format-specific") or {}).get("data", {})
    if data.get("create-type") or data.get("subformat"):
        out["subformat"] = data.get("create-type") or data.get("subformat")
    return out


def inspect_file(path: Path) -> dict[str, Any]:
    """What *path* is: a disk image (:func:`inspect_disk`), or an OVF/OVA: its hardware as nestbed reads it
    (:func:`harness.images.ovf.describe`: every check of a load, digests included, nothing written) and each of
    its disks inspected in place."""
    if not path.is_file():
        raise InspectError(f"{path}: no such file")
    if not ovf.is_appliance(path):
        return inspect_disk(path)
    result = ovf.describe(path)
    for disk in result["disks"]:
        disk.update(inspect_appliance_disk(disk, f"{path} ({disk['file']})"))
    return result


def _fixed_vhd_footer(path: Path) -> bool:
    size = path.stat().st_size
    if size < SECTOR or size % SECTOR:
        return False
    with open(path, "rb") as f:
        f.seek(size - SECTOR)
        footer = f.read(SECTOR)
    # The cookie, and the disk type field (offset 60, big-endian): 2 = fixed.
    return footer[:8] == b"conectix" and struct.unpack_from(">I", footer, 60)[0] == 2


def render(result: dict[str, Any]) -> str:
    """The human-readable lines of ``nestbed images inspect``."""
    if result.get("kind") in ("ova", "ovf"):
        return render_appliance(result)
    lines = [f"{result['path']}: {result['format']}" + (f" ({result['subformat']})" if result.get("subformat") else ""),
             f"  virtual size {result['virtual_size']} bytes, file {result['file_size']} bytes",
             f"  partition table: {result['table']}"]
    for p in result["partitions"]:
        name = f" {p['name']!r}" if p.get("name") else ""
        lines.append(f"    #{p['index']} {p['type_name']}{name}: start {p['start']}, size {p['size']}"
                     + (" (active)" if p.get("active") else ""))
    lines.append(f"  firmware: {result['firmware']} ({result['firmware_why']})")
    if result.get("note"):
        lines.append(f"  note: {result['note']}")
    return "\n".join(lines)


def _size(n: int | None) -> str:
    if n is None:
        return "?"
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):.1f} {unit}"
    return f"{n} bytes"


def render_appliance(result: dict[str, Any]) -> str:
    """The human-readable lines of ``nestbed images inspect`` for an OVF or OVA."""
    lines = [f"{result['path']}: {result['kind'].upper()} ({result['descriptor']}), virtual machine {result['name']!r}",
             f"  {result['vcpus']} vCPU(s), {result['memory_mb']} MiB memory",
             f"  firmware: {result['firmware']} ({result['firmware_why']})"]
    for c in result["controllers"]:
        lines.append(f"  controller {c['name']!r} -> {c['device']}")
    for i, d in enumerate(result["disks"], 1):
        lines.append(f"  disk {i}: {d['file']}: {d['format']}" + (f" ({d['subformat']})" if d.get("subformat") else "")
                     + f" on {d['controller']}, virtual size {_size(d.get('virtual_size'))}"
                     + f" (the OVF declares {_size(d['capacity_bytes'])}), file {_size(d['file_size'])}")
        if "table" in d:
            lines.append(f"    partition table: {d['table']}")
            for p in d["partitions"]:
                name = f" {p['name']!r}" if p.get("name") else ""
                lines.append(f"      #{p['index']} {p['type_name']}{name}: start {p['start']}, size {p['size']}"
                             + (" (active)" if p.get("active") else ""))
            lines.append(f"    firmware guess from the disk: {d['firmware_guess']} ({d['firmware_guess_why']})")
    lines.append("  NICs: " + (", ".join(result["nics"]) or "none"))
    for s in result["substitutions"]:
        lines.append(f"  substitution: {s}")
    for s in result["ignored"]:
        lines.append(f"  ignored: {s}")
    lines.append(f"  manifest: {result['manifest']}")
    if result.get("certificate"):
        lines.append(f"  certificate: {result['certificate']}")
    return "\n".join(lines)
