"""Hand-made OVF descriptors and OVAs for the tests (test_ovf, test_fuzz_ovf, test_export)."""

from __future__ import annotations

import hashlib
import io
import tarfile
from pathlib import Path

OVF_NS = "http://schemas.dmtf.org/ovf/envelope/1"
RASD = "http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData"
VMDK_URI = "http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized"
DISK_BYTES = b"not really a vmdk, but load() does not open disks\n" * 20


def item(rtype: str, iid: str, *, sub: str | None = None, name: str | None = None, parent: str | None = None,
         host: str | None = None, qty: str | None = None, units: str | None = None, attrs: str = "") -> str:
    fields = [("ElementName", name or f"item {iid}"), ("InstanceID", iid), ("ResourceType", rtype)]
    for key, value in (("ResourceSubType", sub), ("Parent", parent), ("HostResource", host),
                       ("VirtualQuantity", qty), ("AllocationUnits", units)):
        if value is not None:
            fields.append((key, value))
    body = "".join(f"<rasd:{k}>{v}</rasd:{k}>" for k, v in fields)
    return f"<Item{attrs}>{body}</Item>"


CPU = item("3", "1", qty="2", name="2 virtual CPUs")
MEMORY = item("4", "2", qty="1024", units="byte * 2^20", name="1024MB of memory")
SCSI = item("6", "3", sub="lsilogic", name="SCSI controller 0")
DISK = item("17", "4", parent="3", host="ovf:/disk/vmdisk1", name="Hard disk 1")
NIC = item("10", "5", sub="E1000", name="Network adapter 1")
DEFAULT_ITEMS = (CPU, MEMORY, SCSI, DISK, NIC)


def envelope(items: tuple[str, ...] | list[str] = DEFAULT_ITEMS, *, href: str = "disk1.vmdk",
             size: int | None = len(DISK_BYTES), capacity: str = "67108864", disk_attrs: str = "",
             hw_extra: str = "", vs_extra: str = "", name: str = "appliance", prolog: str = "",
             extra_top: str = "") -> bytes:
    size_attr = f' ovf:size="{size}"' if size is not None else ""
    return f"""<?xml version="1.0" encoding="UTF-8"?>{prolog}
<Envelope xmlns="{OVF_NS}" xmlns:ovf="{OVF_NS}" xmlns:rasd="{RASD}"
          xmlns:vmw="http://www.vmware.com/schema/ovf" xmlns:vbox="http://www.virtualbox.org/ovf/machine">
  <References><File ovf:href="{href}" ovf:id="file1"{size_attr}/></References>
  <DiskSection><Info>disks</Info>
    <Disk ovf:capacity="{capacity}" ovf:diskId="vmdisk1" ovf:fileRef="file1" ovf:format="{VMDK_URI}"{disk_attrs}/>
  </DiskSection>
  {extra_top}
  <VirtualSystem ovf:id="{name}">
    <Info>A virtual machine</Info>
    <Name>{name}</Name>
    <VirtualHardwareSection><Info>hw</Info>
      {"".join(items)}
      {hw_extra}
    </VirtualHardwareSection>
    {vs_extra}
  </VirtualSystem>
</Envelope>
""".encode()


def manifest(files: dict[str, bytes], alg: str = "SHA256") -> bytes:
    return "".join(f"{alg}({n})= {hashlib.new(alg.lower(), d).hexdigest()}\n" for n, d in files.items()).encode()


def tar_bytes(members: list[tarfile.TarInfo | tuple[str, bytes]]) -> bytes:
    """A tar of (name, data) regular files and ready-made TarInfos (links, devices: no data)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for m in members:
            if isinstance(m, tarfile.TarInfo):
                tar.addfile(m)
            else:
                info = tarfile.TarInfo(m[0])
                info.size = len(m[1])
                tar.addfile(info, io.BytesIO(m[1]))
    return buf.getvalue()


def ova(path: Path, *, ovf: bytes | None = None, disk: bytes = DISK_BYTES, alg: str | None = "SHA256",
        extra: list[tarfile.TarInfo | tuple[str, bytes]] | None = None, mf: bytes | None = None) -> Path:
    """An OVA at *path*: appliance.ovf, appliance.mf (unless alg is None), disk1.vmdk, then *extra*."""
    ovf = envelope() if ovf is None else ovf
    members: list[tarfile.TarInfo | tuple[str, bytes]] = [("appliance.ovf", ovf)]
    if mf is not None:
        members.append(("appliance.mf", mf))
    elif alg is not None:
        members.append(("appliance.mf", manifest({"appliance.ovf": ovf, "disk1.vmdk": disk}, alg)))
    members.append(("disk1.vmdk", disk))
    members += extra or []
    path.write_bytes(tar_bytes(members))
    return path


def special(name: str, kind: bytes, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, linkname
    return info
