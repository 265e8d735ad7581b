"""Virtual appliances as shipped: an OVF descriptor, or an OVA (a tar of the descriptor, a manifest and disks).

:func:`load` reads one into an :class:`Appliance`: its name, CPUs, memory, firmware, disks (with the QEMU
controller each sits on) and NICs, mapped to the devices QEMU emulates, with a human line for every
substitution made where QEMU has no such device.  :func:`describe` reads the same without writing anything,
for ``nestbed images inspect``.

An OVA is untrusted input, so:

- the XML is parsed by ``defusedxml`` with DTDs, entities and external references refused ("billion laughs"
  and XXE never expand), from a descriptor of at most :data:`MAX_DESCRIPTOR` bytes;
- the tar is read as a plain (uncompressed) tar, and every member is checked before one byte is written: a
  regular file (no symlink, hard link, device, directory), a plain file name (no ``/``, no ``..``, no NUL),
  named only once, and one of: the .ovf, the .mf manifest, the .cert, or a file the OVF's References name;
  its data must lie inside the file (a truncated tar is refused up front), match the size the OVF declares,
  stay under :data:`MAX_FILE` and fit the free space of the extraction directory;
- members are written only into *workdir*, under a private name opened ``O_EXCL|O_NOFOLLOW``, and renamed
  into place once their digest is checked;
- a manifest (``SHA1(file)= hex``, ``SHA256(file)= hex``, ``SHA512(file)= hex``) must cover the .ovf and
  every referenced file, and every digest must match.

Every refusal is an :class:`~harness.errors.OvfError`: one line naming the file and what is wrong.

Hardware is read from the (first) VirtualSystem's VirtualHardwareSection by element *local* names, so OVF
1.x and 2.0 descriptors and any namespace prefixes read the same.  The mapping tables are :data:`SCSI`,
:data:`SATA`, :data:`NICS`; docs/appliances.md shows them.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from xml.etree.ElementTree import Element

from harness.errors import OvfError

MAX_DESCRIPTOR = 16 << 20  # an .ovf is a few KiB; a 16 MiB one is an attack or a mistake
MAX_MANIFEST = 1 << 20
MAX_CERT = 1 << 20
MAX_FILE = 1 << 40  # 1 TiB: a sane cap for one disk file
MAX_MEMBERS = 256
MAX_CAPACITY = 1 << 50  # 1 PiB of virtual disk
MAX_VCPUS = 1024
MAX_MEMORY_MB = 16 << 20  # 16 TiB
FREE_SPACE_MARGIN = 64 << 20  # left free after an extraction
CHUNK = 1 << 20

# Controllers: the QEMU device a disk's controller becomes.  "ide" is the machine's own PIIX IDE, "virtio"
# is virtio-blk-pci (a disk with no controller of its own); the rest are QEMU device names.
CONTROLLERS = ("ide", "ahci", "lsi53c895a", "mptsas1068", "megasas", "pvscsi", "virtio-scsi", "nvme", "virtio")

# ResourceType 6 (parallel SCSI HBA): ResourceSubType (lower case) -> (QEMU device, why when it is a substitution).
SCSI: dict[str, tuple[str, str]] = {
    "lsilogic": ("lsi53c895a", ""),
    "lsilogicsas": ("mptsas1068", ""),
    "virtualscsi": ("pvscsi", ""),
    "pvscsi": ("pvscsi", ""),
    "vmware.pvscsi": ("pvscsi", ""),
    "buslogic": ("lsi53c895a", "QEMU has no BusLogic emulation"),
    "virtioscsi": ("virtio-scsi", ""),
    "virtio-scsi": ("virtio-scsi", ""),
    "megasas": ("megasas", ""),
    "": ("lsi53c895a", "no ResourceSubType: LSI Logic is VMware's default"),
}
# ResourceType 20 (SATA/AHCI) and the subtypes VMware and VirtualBox write (also under ResourceType 1).
SATA: dict[str, tuple[str, str]] = {
    "ahci": ("ahci", ""),
    "vmware.sata.ahci": ("ahci", ""),
    "": ("ahci", ""),
    "nvme": ("nvme", ""),
    "vmware.nvme.controller": ("nvme", ""),
}
# ResourceType 10 (Ethernet adapter): ResourceSubType (lower case) -> (QEMU NIC model, why when substituted).
NICS: dict[str, tuple[str, str]] = {
    "e1000": ("e1000", ""),
    "e1000e": ("e1000e", ""),
    "vmxnet3": ("vmxnet3", ""),
    "pcnet32": ("pcnet", ""),
    "pcnet": ("pcnet", ""),
    "pcnetfast": ("pcnet", ""),
    "virtio": ("virtio-net-pci", ""),
    "virtio-net": ("virtio-net-pci", ""),
    "virtionet": ("virtio-net-pci", ""),
    "rtl8139": ("rtl8139", ""),
    "ne2k": ("ne2k_pci", ""),
    "vmxnet": ("vmxnet3", "QEMU has no VMXNET (1): the guest needs a vmxnet3 driver"),
    "vmxnet2": ("vmxnet3", "QEMU has no VMXNET2: the guest needs a vmxnet3 driver"),
    "i82540em": ("e1000", ""),
    "i82543gc": ("e1000", "QEMU has no 82543GC: an 82540EM (e1000) is its closest"),
    "i82545em": ("e1000", ""),
}
DEFAULT_NIC = "e1000"

# ovf:format URIs (and file extensions) -> qemu-img format.
FORMAT_URIS = (
    ("vmdk.html", "vmdk"), ("vmdk", "vmdk"), ("vhdx", "vhdx"), ("vhd", "vpc"), ("virtualserver", "vpc"),
    ("vdi", "vdi"), ("qcow2", "qcow2"), ("qcow", "qcow2"), ("raw", "raw"),
)
EXTENSIONS = {".vmdk": "vmdk", ".vhd": "vpc", ".vhdx": "vhdx", ".vdi": "vdi", ".qcow2": "qcow2", ".img": "raw",
              ".raw": "raw"}
DIGESTS = {"SHA1": "sha1", "SHA256": "sha256", "SHA512": "sha512"}
_MF_LINE = re.compile(r"^\s*(?P<alg>[A-Za-z0-9]+)\s*\((?P<name>[^)]*)\)\s*=\s*(?P<hex>[0-9A-Fa-f]+)\s*$")
_UNITS = re.compile(r"^byte(?:\s*\*\s*(\d+)\s*\^\s*(\d+))?$")
_UNIT_NAMES = {"b": 0, "bytes": 0, "kb": 10, "kilobytes": 10, "kib": 10, "mb": 20, "megabytes": 20, "mib": 20,
               "gb": 30, "gigabytes": 30, "gib": 30, "tb": 40, "terabytes": 40}
RESOURCE_CPU, RESOURCE_MEMORY, RESOURCE_IDE, RESOURCE_SCSI, RESOURCE_NIC = "3", "4", "5", "6", "10"
RESOURCE_FLOPPY, RESOURCE_CD, RESOURCE_DVD, RESOURCE_DISK, RESOURCE_OTHER, RESOURCE_SATA = \
    "14", "15", "16", "17", "1", "20"


@dataclass(frozen=True)
class OvfDisk:
    """One disk of an appliance, where it is and how QEMU attaches it."""

    path: Path
    format: str  # qemu-img format name: vmdk, vpc, vhdx, vdi, qcow2, raw
    controller: str  # one of CONTROLLERS
    capacity_bytes: int | None  # what the OVF declares (None: it does not say)


@dataclass(frozen=True)
class Appliance:
    """What an OVF says about its virtual machine, mapped to QEMU's devices."""

    name: str
    vcpus: int
    memory_mb: int
    firmware: str  # "bios" | "uefi"
    disks: tuple[OvfDisk, ...]
    nics: tuple[str, ...]  # QEMU NIC models
    substitutions: tuple[str, ...]  # "NIC 'Foo' → e1000: QEMU has no Foo"
    source: Path
    manifest: str | None  # "sha256 verified (2 files)", or None: the appliance has no manifest


# -- the descriptor (pure) --------------------------------------------------------------------

def _local(tag: object) -> str:
    return tag.rsplit("}", 1)[-1] if isinstance(tag, str) else ""


def _attr(el: Element, name: str) -> str | None:
    """Attribute *name* in any namespace (ovf:id, vmw:key, ...)."""
    for key, value in el.attrib.items():
        if _local(key) == name:
            return value
    return None


def _children(el: Element, name: str) -> list[Element]:
    return [c for c in el if _local(c.tag) == name]


def _child_text(el: Element, name: str) -> str:
    for c in el:
        if _local(c.tag) == name:
            return (c.text or "").strip()
    return ""


def _safe_name(name: str, what: str, file: object) -> str:
    """*name* if it is a plain file name (no directory part, no '..', no NUL); else an OvfError."""
    if name.startswith("./"):
        name = name[2:]
    bad = (not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name
           or any(ord(c) < 32 for c in name) or len(name) > 255)
    if bad:
        where = "an absolute path" if name.startswith("/") else \
            "a path outside the extraction directory" if ".." in name.split("/") else "not a plain file name"
        raise OvfError(file, f"{what} {name!r} is {where}: refused")
    return name


def _bytes(value: str, units: str | None, file: object, what: str) -> int:
    """*value* in *units* ("byte * 2^20", "MegaBytes", ...) as bytes."""
    try:
        n = int(value.strip())
    except ValueError:
        raise OvfError(file, f"{what}: {value!r} is not a whole number") from None
    if n < 0:
        raise OvfError(file, f"{what}: {n} is negative")
    u = " ".join((units or "byte").split()).lower()
    m = _UNITS.match(u)
    if m:
        if not m.group(1):
            return n
        base, exp = int(m.group(1)), int(m.group(2))
        if base not in (2, 10) or exp > 60:
            raise OvfError(file, f"{what}: allocation units {units!r} are not supported")
        return n * base ** exp
    if u in _UNIT_NAMES:
        return n << _UNIT_NAMES[u]
    raise OvfError(file, f"{what}: allocation units {units!r} are not supported")


@dataclass(frozen=True)
class FileRef:
    href: str
    size: int | None
    compression: str | None
    chunked: bool


@dataclass(frozen=True)
class DiskRef:
    href: str
    format: str
    controller: str
    capacity_bytes: int | None


@dataclass(frozen=True)
class Envelope:
    """What the descriptor says, before any file is looked at."""

    name: str
    vcpus: int
    memory_mb: int
    firmware: str
    firmware_why: str
    disks: tuple[DiskRef, ...]
    nics: tuple[str, ...]
    substitutions: tuple[str, ...]
    files: dict[str, FileRef] = field(default_factory=dict)  # href -> declared file
    controllers: tuple[tuple[str, str], ...] = ()  # (OVF's name for it, QEMU device)
    ignored: tuple[str, ...] = ()  # hardware nestbed does not attach (CD-ROMs, floppies, ...)


def parse_xml(data: bytes, file: object) -> Element:
    """The descriptor's root element; DTDs, entities and external references are refused."""
    import defusedxml
    import defusedxml.ElementTree as DET

    if len(data) > MAX_DESCRIPTOR:
        raise OvfError(file, f"descriptor is {len(data)} bytes, over the {MAX_DESCRIPTOR}-byte cap")
    try:
        root = DET.fromstring(data, forbid_dtd=True, forbid_entities=True, forbid_external=True)
    except defusedxml.DTDForbidden:
        raise OvfError(file, "the XML has a DTD (<!DOCTYPE>): refused (entity expansion)") from None
    except defusedxml.EntitiesForbidden:
        raise OvfError(file, "the XML declares an entity: refused (entity expansion)") from None
    except defusedxml.ExternalReferenceForbidden:
        raise OvfError(file, "the XML names an external reference: refused") from None
    except DET.ParseError as exc:
        raise OvfError(file, f"not well-formed XML: {exc}") from None
    except (ValueError, LookupError, RecursionError) as exc:  # LookupError: an unknown encoding= name
        raise OvfError(file, f"not readable XML: {exc}") from None
    if _local(root.tag) != "Envelope":
        raise OvfError(file, f"the root element is <{_local(root.tag) or '?'}>, not an OVF <Envelope>")
    return root


def _disk_format(uri: str | None, href: str) -> str | None:
    u = (uri or "").lower()
    for needle, fmt in FORMAT_URIS:
        if needle in u:
            return fmt
    return EXTENSIONS.get(os.path.splitext(href)[1].lower())


def _default_configuration(root: Element) -> str | None:
    for section in _children(root, "DeploymentOptionSection"):
        configs = _children(section, "Configuration")
        for c in configs:
            if (_attr(c, "default") or "").lower() == "true":
                return _attr(c, "id")
        if configs:
            return _attr(configs[0], "id")
    return None


def _int(text: str, file: object, what: str, lo: int, hi: int) -> int:
    try:
        n = int(text)
    except ValueError:
        raise OvfError(file, f"{what}: {text!r} is not a whole number") from None
    if not lo <= n <= hi:
        raise OvfError(file, f"{what}: {n} is outside {lo}..{hi}")
    return n


def _firmware(vs: Element, hw: Element | None) -> tuple[str, str]:
    for el in (hw if hw is not None else vs).iter():
        if _local(el.tag) in ("Config", "ExtraConfig") and (_attr(el, "key") or "").lower() == "firmware":
            value = (_attr(el, "value") or "").lower()
            if value == "efi":
                return "uefi", "the OVF says firmware=efi (vmw:Config)"
            if value == "bios":
                return "bios", "the OVF says firmware=bios (vmw:Config)"
    # VirtualBox: <vbox:Machine> ... <Hardware><Firmware type="EFI"/> (BIOS, EFI, EFI32, EFI64), the inner
    # elements in whatever namespace is the default there.
    machines = [el for el in vs.iter() if _local(el.tag) == "Machine" and "virtualbox" in str(el.tag).lower()]
    for el in (sub for m in machines for sub in m.iter()):
        if _local(el.tag) == "Firmware":
            kind = (_attr(el, "type") or "").upper()
            if kind.startswith("EFI"):
                return "uefi", f"VirtualBox's machine section says firmware {kind}"
            if kind == "BIOS":
                return "bios", "VirtualBox's machine section says firmware BIOS"
    return "bios", "the OVF names no firmware: BIOS, the OVF default"


def _host_resource(item: Element) -> str:
    return _child_text(item, "HostResource")


def read_envelope(root: Element, file: object) -> Envelope:
    """The hardware of *root*'s virtual system, mapped to QEMU (pure: no file is opened)."""
    files: dict[str, FileRef] = {}
    file_ids: dict[str, str] = {}
    for refs in _children(root, "References"):
        for f in _children(refs, "File"):
            fid, href = _attr(f, "id"), _attr(f, "href")
            if not fid or href is None:
                raise OvfError(file, "a References File lacks ovf:id or ovf:href")
            if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", href):
                raise OvfError(file, f"file {href!r} is a URL: nestbed reads only files inside the appliance")
            href = _safe_name(href, "file", file)
            if href in files:
                raise OvfError(file, f"file {href!r} is named twice in References")
            size = _attr(f, "size")
            files[href] = FileRef(href, _bytes(size, "byte", file, f"file {href!r} size") if size is not None else None,
                                  _attr(f, "compression"), _attr(f, "chunkSize") is not None)
            file_ids[fid] = href
    disks_by_id: dict[str, tuple[str, str | None, int | None]] = {}
    for section in _children(root, "DiskSection"):
        for d in _children(section, "Disk"):
            did = _attr(d, "diskId")
            if not did:
                raise OvfError(file, "a DiskSection Disk lacks ovf:diskId")
            ref = _attr(d, "fileRef")
            if not ref:
                raise OvfError(file, f"disk {did!r} has no ovf:fileRef (an empty disk to create): not supported")
            if ref not in file_ids:
                raise OvfError(file, f"disk {did!r} names file {ref!r}, which References does not list")
            cap = _attr(d, "capacity")
            capacity = _bytes(cap, _attr(d, "capacityAllocationUnits"), file, f"disk {did!r} capacity") \
                if cap is not None else None
            if capacity is not None and capacity > MAX_CAPACITY:
                raise OvfError(file, f"disk {did!r} capacity {capacity} bytes is over the {MAX_CAPACITY}-byte cap")
            disks_by_id[did] = (file_ids[ref], _attr(d, "format"), capacity)

    systems = [el for el in root.iter() if _local(el.tag) == "VirtualSystem"]
    if not systems:
        raise OvfError(file, "no VirtualSystem in the envelope")
    if len(systems) > 1:
        raise OvfError(file, f"{len(systems)} virtual systems (a VirtualSystemCollection): only one is supported")
    vs = systems[0]
    name = _child_text(vs, "Name") or (_attr(vs, "id") or "") or Path(str(file)).stem
    name = "".join(c for c in name if c.isprintable())[:200] or "appliance"
    hws = _children(vs, "VirtualHardwareSection")
    if not hws:
        raise OvfError(file, "the VirtualSystem has no VirtualHardwareSection")
    hw = hws[0]
    config = _default_configuration(root)

    items = []
    for item in hw:
        if _local(item.tag) not in ("Item", "StorageItem", "EthernetPortItem"):
            continue
        only = _attr(item, "configuration")
        if only is not None and config is not None and config not in only.split():
            continue  # an item of another deployment configuration
        items.append(item)

    subs: list[str] = []
    ignored: list[str] = []
    vcpus, memory_mb = 1, 0
    controllers: dict[str, tuple[str, str]] = {}  # InstanceID -> (ovf name, qemu device)
    disk_items: list[Element] = []
    nics: list[str] = []
    for item in items:
        rtype = _child_text(item, "ResourceType")
        sub = _child_text(item, "ResourceSubType")
        label = _child_text(item, "ElementName") or _child_text(item, "Caption") or f"item {_child_text(item, 'InstanceID')}"
        iid = _child_text(item, "InstanceID")
        required = (_attr(item, "required") or "true").lower() != "false"
        if rtype == RESOURCE_CPU:
            vcpus = _int(_child_text(item, "VirtualQuantity") or "1", file, "CPU count", 1, MAX_VCPUS)
        elif rtype == RESOURCE_MEMORY:
            qty = _child_text(item, "VirtualQuantity")
            if not qty:
                raise OvfError(file, "the memory item has no VirtualQuantity")
            units = _child_text(item, "AllocationUnits") or "byte * 2^20"
            mem_bytes = _bytes(qty, units, file, "memory")
            memory_mb = -(-mem_bytes // (1 << 20))
            if not 1 <= memory_mb <= MAX_MEMORY_MB:
                raise OvfError(file, f"memory: {mem_bytes} bytes is outside 1 MiB..{MAX_MEMORY_MB} MiB")
        elif rtype in (RESOURCE_IDE, RESOURCE_SCSI, RESOURCE_SATA) or (rtype == RESOURCE_OTHER and sub and sub.lower() in SATA):
            table = {RESOURCE_IDE: None, RESOURCE_SCSI: SCSI}.get(rtype, SATA)
            if table is None:
                device, why = "ide", ""
            elif sub.lower() in table:
                device, why = table[sub.lower()]
            else:
                kind = "SCSI" if table is SCSI else "SATA"
                raise OvfError(file, f"unsupported hardware: {kind} controller {label!r} of type {sub!r} "
                                     f"(QEMU emulates {', '.join(sorted({d for d, _ in table.values()}))})")
            if why:
                subs.append(f"controller {label!r} ({sub or 'no subtype'}) → {device}: {why}")
            if iid:
                controllers[iid] = (label, device)
        elif rtype == RESOURCE_DISK:
            disk_items.append(item)
        elif rtype == RESOURCE_NIC:
            model, why = NICS.get(sub.lower(), (DEFAULT_NIC, f"QEMU has no {sub}" if sub else "no ResourceSubType"))
            if why:
                subs.append(f"NIC {label!r} → {model}: {why}")
            nics.append(model)
        elif rtype in (RESOURCE_CD, RESOURCE_DVD, RESOURCE_FLOPPY):
            what = "floppy" if rtype == RESOURCE_FLOPPY else "CD/DVD drive"
            res = _host_resource(item)
            ignored.append(f"{what} {label!r}" + (f" ({res})" if res else "") + ": not attached")
        elif rtype in ("7", "8", "9", "19") and required:  # FC, iSCSI, InfiniBand HBAs, storage extents
            raise OvfError(file, f"unsupported hardware: {label!r} (ResourceType {rtype})")
    if memory_mb == 0:
        raise OvfError(file, "the virtual hardware names no memory (ResourceType 4)")

    disks: list[DiskRef] = []
    for item in disk_items:
        label = _child_text(item, "ElementName") or "disk"
        res = _host_resource(item)
        m = re.match(r"^(?:ovf:)?/+(disk|file)/(.+)$", res)
        if not m:
            raise OvfError(file, f"disk {label!r}: HostResource {res!r} names no ovf:/disk/ID")
        if m.group(1) == "disk":
            if m.group(2) not in disks_by_id:
                raise OvfError(file, f"disk {label!r}: {res!r} is not in the DiskSection")
            href, uri, capacity = disks_by_id[m.group(2)]
        else:
            if m.group(2) not in file_ids:
                raise OvfError(file, f"disk {label!r}: {res!r} is not in References")
            href, uri, capacity = file_ids[m.group(2)], None, None
        fmt = _disk_format(uri, href)
        if fmt is None:
            raise OvfError(file, f"disk {label!r} ({href}): unsupported disk format {uri!r}")
        declared = files[href]
        if declared.compression:
            raise OvfError(file, f"file {href!r} is {declared.compression}-compressed: not supported")
        if declared.chunked:
            raise OvfError(file, f"file {href!r} is chunked (ovf:chunkSize): not supported")
        parent = _child_text(item, "Parent")
        if not parent:
            controller = "ide"
            subs.append(f"disk {label!r} has no controller (Parent) → ide")
        elif parent not in controllers:
            raise OvfError(file, f"unsupported hardware: disk {label!r} sits on controller {parent!r}, which is "
                                 f"no IDE, SCSI or SATA controller of this machine")
        else:
            controller = controllers[parent][1]
        disks.append(DiskRef(href, fmt, controller, capacity))
    firmware, why = _firmware(vs, hw)
    return Envelope(name=name, vcpus=vcpus, memory_mb=memory_mb, firmware=firmware, firmware_why=why,
                    disks=tuple(disks), nics=tuple(nics), substitutions=tuple(subs), files=files,
                    controllers=tuple(controllers.values()), ignored=tuple(ignored))


def parse_manifest(text: str, file: object) -> dict[str, tuple[str, str]]:
    """{file name: (hashlib algorithm, lower-case hex digest)} from a manifest's lines."""
    out: dict[str, tuple[str, str]] = {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        m = _MF_LINE.match(line)
        if not m:
            raise OvfError(file, f"manifest line {n} is not 'ALG(file)= hex'")
        alg = DIGESTS.get(m.group("alg").upper())
        if alg is None:
            raise OvfError(file, f"manifest line {n}: digest {m.group('alg')!r} is not SHA1, SHA256 or SHA512")
        name = m.group("name").strip()
        hexd = m.group("hex").lower()
        if len(hexd) != hashlib.new(alg).digest_size * 2:
            raise OvfError(file, f"manifest line {n}: {m.group('alg')} of {name!r} has {len(hexd)} hex digits")
        if name in out:
            raise OvfError(file, f"manifest names {name!r} twice")
        out[name] = (alg, hexd)
    if not out:
        raise OvfError(file, "the manifest is empty")
    return out


def _manifest_status(manifest: dict[str, tuple[str, str]]) -> str:
    algs = sorted({alg for alg, _ in manifest.values()})
    return f"{'+'.join(algs)} verified ({len(manifest)} files)"


# -- packages: an OVA's tar members or an OVF's neighbours -------------------------------------

@dataclass(frozen=True)
class _Member:
    name: str
    size: int
    offset: int  # of the data in the OVA (0 for a file beside an .ovf)
    path: Path  # the OVA, or the file beside the .ovf


@dataclass
class _Package:
    """Files of an appliance by name: an OVA's members or the files beside an .ovf."""

    source: Path
    descriptor: str = ""
    members: dict[str, _Member] = field(default_factory=dict)

    def stream(self, member: _Member) -> Iterator[bytes]:
        with open(member.path, "rb") as f:
            f.seek(member.offset)
            left = member.size
            while left:
                chunk = f.read(min(CHUNK, left))
                if not chunk:
                    raise OvfError(self.source, f"{member.name}: truncated ({left} bytes missing)")
                left -= len(chunk)
                yield chunk

    def read(self, name: str, cap: int) -> bytes:
        member = self.members[name]
        if member.size > cap:
            raise OvfError(self.source, f"{name} is {member.size} bytes, over the {cap}-byte cap")
        return b"".join(self.stream(member))


def _open_ova(path: Path) -> _Package:
    pkg = _Package(path)
    total = path.stat().st_size
    try:
        tar = tarfile.open(path, mode="r:")
    except tarfile.ReadError as exc:
        raise OvfError(path, f"not an uncompressed tar (an OVA is one): {exc}") from None
    except (tarfile.TarError, EOFError, OSError, ValueError) as exc:
        raise OvfError(path, f"not a readable tar: {exc}") from None
    ovfs: list[str] = []
    with tar:
        try:
            for count, info in enumerate(tar, 1):
                if count > MAX_MEMBERS:
                    raise OvfError(path, f"more than {MAX_MEMBERS} tar members: not an OVA")
                _check_member(path, info)
                name = _safe_name(info.name, "tar member", path)
                if name in pkg.members:
                    raise OvfError(path, f"tar member {name!r} appears twice: refused")
                if info.offset_data + info.size > total:
                    raise OvfError(path, f"truncated tar: member {name!r} needs {info.size} bytes at offset "
                                         f"{info.offset_data}, the file has {total}")
                pkg.members[name] = _Member(name, info.size, info.offset_data, path)
                if name.lower().endswith(".ovf"):
                    ovfs.append(name)
            end = tar.offset  # where tarfile stopped: the end-of-archive marker, or a header it could not read
        except (tarfile.TarError, EOFError) as exc:
            raise OvfError(path, f"truncated or damaged tar: {exc}") from None
        except (ValueError, UnicodeError, OverflowError) as exc:
            raise OvfError(path, f"damaged tar header: {exc}") from None
    # tarfile takes a damaged header after the first for the end of the archive: look at what is there.
    with open(path, "rb") as f:
        f.seek(end)
        block = f.read(tarfile.BLOCKSIZE)
    if len(block) < tarfile.BLOCKSIZE:
        raise OvfError(path, f"truncated tar: it ends at byte {total} without an end-of-archive marker")
    if block.strip(b"\0"):
        raise OvfError(path, f"truncated or damaged tar: no valid header at byte {end}")
    if not ovfs:
        raise OvfError(path, "no .ovf descriptor in the tar")
    if len(ovfs) > 1:
        raise OvfError(path, f"{len(ovfs)} .ovf descriptors in the tar ({', '.join(ovfs)}): an OVA has one")
    pkg.descriptor = ovfs[0]
    return pkg


def _check_member(path: Path, info: tarfile.TarInfo) -> None:
    name = info.name
    if name.startswith("/") or re.match(r"^[A-Za-z]:[\\/]", name):
        raise OvfError(path, f"tar member {name!r} is an absolute path: refused")
    if ".." in re.split(r"[\\/]", name):
        raise OvfError(path, f"tar member {name!r} would escape the extraction directory: refused")
    if info.issym() or info.islnk():
        raise OvfError(path, f"tar member {name!r} is a {'symbolic' if info.issym() else 'hard'} link "
                             f"(to {info.linkname!r}): refused")
    if not info.isreg():
        kind = "a directory" if info.isdir() else "a device or FIFO" if (info.isdev()) else f"type {info.type!r}"
        raise OvfError(path, f"tar member {name!r} is {kind}, not a regular file: refused")
    if info.size < 0:
        raise OvfError(path, f"tar member {name!r} has a negative size")
    if info.size > MAX_FILE:
        raise OvfError(path, f"tar member {name!r} is {info.size} bytes, over the {MAX_FILE}-byte cap")


def _open_dir(descriptor: Path) -> _Package:
    pkg = _Package(descriptor, descriptor.name)
    for p in (descriptor, descriptor.with_suffix(".mf"), descriptor.with_suffix(".cert")):
        if p.is_file():
            pkg.members[p.name] = _Member(p.name, p.stat().st_size, 0, p)
    return pkg


def _add_neighbours(pkg: _Package, env: Envelope) -> None:
    """An .ovf's referenced files, beside it (a missing one is left out: the checks name it)."""
    base = pkg.source.parent
    for href in env.files:
        p = base / href
        if p.is_file():
            pkg.members.setdefault(href, _Member(href, p.stat().st_size, 0, p))


# -- reading, checking, extracting --------------------------------------------------------------

@dataclass(frozen=True)
class _Read:
    pkg: _Package
    env: Envelope
    manifest_name: str | None
    manifest: dict[str, tuple[str, str]] | None
    cert: str | None


def _read(path: Path) -> _Read:
    if not path.is_file():
        raise OvfError(path, "no such file")
    is_ova = _is_tar(path)
    pkg = _open_ova(path) if is_ova else _open_dir(path)
    root = parse_xml(pkg.read(pkg.descriptor, MAX_DESCRIPTOR), path)
    env = read_envelope(root, path)
    if not is_ova:
        _add_neighbours(pkg, env)
    mfs = [n for n in pkg.members if n.lower().endswith(".mf")]
    certs = [n for n in pkg.members if n.lower().endswith(".cert")]
    for extra in (mfs, certs):
        if len(extra) > 1:
            raise OvfError(path, f"{len(extra)} {os.path.splitext(extra[0])[1]} files: an appliance has one")
    allowed = {pkg.descriptor, *mfs, *certs, *env.files}
    for name in pkg.members:
        if name not in allowed:
            raise OvfError(path, f"tar member {name!r} is not the descriptor, manifest, certificate or a file the "
                                 f"OVF's References name: refused")
    for href, ref in env.files.items():
        if href not in pkg.members:
            where = "in the OVA" if is_ova else f"beside {path.name}"
            raise OvfError(path, f"missing file {href!r}: the OVF references it, it is not {where}")
        size = pkg.members[href].size
        if ref.size is not None and size != ref.size:
            raise OvfError(path, f"file {href!r} is {size} bytes, the OVF declares {ref.size}")
        if size > MAX_FILE:
            raise OvfError(path, f"file {href!r} is {size} bytes, over the {MAX_FILE}-byte cap")
    manifest = None
    if mfs:
        manifest = parse_manifest(pkg.read(mfs[0], MAX_MANIFEST).decode("utf-8", "replace"), f"{path} ({mfs[0]})")
        for name in (pkg.descriptor, *env.files):
            if name not in manifest:
                raise OvfError(path, f"the manifest has no digest for {name!r}")
        for name in manifest:
            if name not in pkg.members or name in mfs:
                raise OvfError(path, f"the manifest names {name!r}, which the appliance does not hold")
    cert = None
    if certs:
        pkg.read(certs[0], MAX_CERT)
        cert = certs[0]
    return _Read(pkg, env, mfs[0] if mfs else None, manifest, cert)


def _is_tar(path: Path) -> bool:
    if path.suffix.lower() == ".ova":
        return True
    if path.suffix.lower() == ".ovf":
        return False
    with open(path, "rb") as f:
        head = f.read(512)
    return head[257:262] == b"ustar"


def is_appliance(path: Path) -> bool:
    """Whether *path* looks like an OVA or an OVF (by its name, else by its first bytes)."""
    if path.suffix.lower() in (".ova", ".ovf"):
        return True
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError:
        return False
    return head[257:262] == b"ustar" and b".ovf" in head[:100] or b"schemas.dmtf.org/ovf/envelope" in head


def _check_digest(r: _Read, name: str, hasher: Any) -> None:
    if r.manifest is None or name not in r.manifest:
        return
    alg, want = r.manifest[name]
    got = hasher.hexdigest()
    if got != want:
        raise OvfError(r.pkg.source, f"digest mismatch: {alg.upper()} of {name!r} is {got}, the manifest says {want}")


def _hash(r: _Read, name: str) -> None:
    if r.manifest is None or name not in r.manifest:
        return
    h = hashlib.new(r.manifest[name][0])
    for chunk in r.pkg.stream(r.pkg.members[name]):
        h.update(chunk)
    _check_digest(r, name, h)


def _check_space(r: _Read, workdir: Path, names: list[str]) -> None:
    need = sum(r.pkg.members[n].size for n in names)
    free = shutil.disk_usage(workdir).free
    if need + FREE_SPACE_MARGIN > free:
        raise OvfError(r.pkg.source, f"too large: extracting needs {need} bytes, {workdir} has {free} free")


def _extract(r: _Read, name: str, workdir: Path) -> Path:
    """Member *name* written to workdir/name, its digest checked before it gets that name."""
    member = r.pkg.members[name]
    target = workdir / name
    tmp = workdir / f".{name}.{os.getpid()}.part"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    tmp.unlink(missing_ok=True)  # a dead extraction's (the same PID, long ago)
    fd = os.open(tmp, flags, 0o644)
    h = hashlib.new(r.manifest[name][0]) if r.manifest is not None and name in r.manifest else None
    try:
        with os.fdopen(fd, "wb") as out:
            written = 0
            for chunk in r.pkg.stream(member):
                written += len(chunk)
                if written > member.size:  # cannot happen with stream(); a guard for the cap all the same
                    raise OvfError(r.pkg.source, f"{name}: more data than its size")
                if h is not None:
                    h.update(chunk)
                out.write(chunk)
        if h is not None:
            _check_digest(r, name, h)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return target


def load(path: Path, *, workdir: Path) -> Appliance:
    """Read the OVA or OVF at *path*: an OVA's files are checked and extracted into *workdir* (which must
    exist); an OVF's disks stay beside it.  Every refusal is one :class:`OvfError` line naming *path*."""
    path = Path(path)
    r = _read(path)
    env = r.env
    if _is_tar(path):
        workdir = Path(workdir)
        if not workdir.is_dir():
            raise OvfError(path, f"extraction directory {workdir} does not exist")
        names = [r.pkg.descriptor, *([r.manifest_name] if r.manifest_name else []), *([r.cert] if r.cert else []),
                 *env.files]
        _check_space(r, workdir, names)
        located: dict[str, Path] = {}
        try:
            for n in names:
                located[n] = _extract(r, n, workdir)
        except BaseException:
            for done in located.values():  # a refused appliance leaves nothing behind
                done.unlink(missing_ok=True)
            raise
    else:
        for name in r.manifest or ():
            _hash(r, name)
        located = {n: r.pkg.members[n].path for n in env.files}
    disks = tuple(OvfDisk(path=located[d.href], format=d.format, controller=d.controller,
                          capacity_bytes=d.capacity_bytes) for d in env.disks)
    return Appliance(name=env.name, vcpus=env.vcpus, memory_mb=env.memory_mb, firmware=env.firmware, disks=disks,
                     nics=env.nics, substitutions=env.substitutions, source=path,
                     manifest=_manifest_status(r.manifest) if r.manifest is not None else None)


def describe(path: Path) -> dict[str, Any]:
    """What :func:`load` would read from *path*, checked the same way (digests included), without writing:
    for an OVA each disk's place inside the tar (``offset``, ``size``), so a reader can open it in place."""
    path = Path(path)
    r = _read(path)
    env = r.env
    for name in r.manifest or ():
        _hash(r, name)
    is_ova = _is_tar(path)
    disks = []
    for d in env.disks:
        m = r.pkg.members[d.href]
        disks.append({"file": d.href, "format": d.format, "controller": d.controller,
                      "capacity_bytes": d.capacity_bytes, "file_size": m.size, "path": str(m.path),
                      "offset": m.offset if is_ova else 0})
    if r.manifest is not None:
        manifest = _manifest_status(r.manifest)
    else:
        manifest = "none (nothing to verify the files against)"
    return {
        "path": str(path), "kind": "ova" if is_ova else "ovf", "descriptor": r.pkg.descriptor, "name": env.name,
        "vcpus": env.vcpus, "memory_mb": env.memory_mb, "firmware": env.firmware, "firmware_why": env.firmware_why,
        "controllers": [{"name": n, "device": dev} for n, dev in env.controllers],
        "disks": disks, "nics": list(env.nics), "substitutions": list(env.substitutions),
        "ignored": list(env.ignored), "manifest": manifest,
        "certificate": f"{r.cert} (present, not checked)" if r.cert else None,
    }
