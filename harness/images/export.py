"""Export, the other direction: a built image as a file another product imports (``nestbed images export``).

What is exported is the image's *bootable* disk: for a Debian image, its boot disk
(:mod:`harness.images.bootdisk`: GPT, GRUB for SeaBIOS and UEFI, the root filesystem), so the artifact
boots by its own bootloader anywhere; an image with only a kernel and an initramfs (``tiny``) has no disk
and is refused.  ``qemu-img convert`` writes the format (:data:`FORMATS`); an OVA is a tar of

1. ``NAME.ovf``: an OVF 1.0 envelope (References, DiskSection, NetworkSection, one VirtualSystem whose
   VirtualHardwareSection has the recipe's CPUs and memory, an IDE controller (the image's initramfs carries
   ata_piix; ``controller="pvscsi"`` gives VMware's paravirtual SCSI), the disk, an E1000 NIC, and
   ``vmw:Config firmware=efi`` when it is to boot under UEFI);
2. ``NAME.mf``: a SHA256 line for the .ovf and for the disk;
3. ``NAME-disk1.vmdk``: the disk as a streamOptimized VMDK (what OVAs carry),

in that order (the .ovf first, as the OVF specification asks).  The output is published atomically
(:func:`harness.core.publish.publish`): readers see no file or the whole one, never a half.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tarfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

from harness.core.publish import publish, scratch_name
from harness.core.run import run
from harness.errors import ImageBuildError, ImageNotBuilt, UsageError
from harness.images import bootdisk
from harness.images.disk import sha256_file
from harness.images.recipes import Kind
from harness.images.store import Image
from harness.vm.spec import Arch

CONVERT_TIMEOUT = 1800.0  # a few GiB through zlib (streamOptimized) on a slow, shared machine
INFO_TIMEOUT = 60.0
Progress = Callable[[str], None]


@dataclass(frozen=True)
class Format:
    """One export format: qemu-img's name for it, its options, the usual file extension."""

    qemu: str
    options: tuple[str, ...]
    extension: str


# vhd: qemu calls it vpc; force_size keeps the exact virtual size (else it is rounded to a CHS geometry).
FORMATS: dict[str, Format] = {
    "ova": Format("vmdk", ("subformat=streamOptimized",), ".ova"),
    "vmdk": Format("vmdk", (), ".vmdk"),  # monolithicSparse: what VMware Workstation and VirtualBox run directly
    "vhd": Format("vpc", ("subformat=dynamic", "force_size=on"), ".vhd"),
    "vhdx": Format("vhdx", (), ".vhdx"),
    "vdi": Format("vdi", (), ".vdi"),
    "qcow2": Format("qcow2", (), ".qcow2"),
}
CONTROLLERS = {"ide": ("5", None, "IDE Controller 0"), "pvscsi": ("6", "VirtualSCSI", "SCSI Controller 0"),
               "lsilogic": ("6", "lsilogic", "SCSI Controller 0")}
NETWORK = "VM Network"

OVF_NS = "http://schemas.dmtf.org/ovf/envelope/1"
RASD_NS = "http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData"
VSSD_NS = "http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_VirtualSystemSettingData"
VMW_NS = "http://www.vmware.com/schema/ovf"
STREAM_OPTIMIZED = "http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized"
# CIM operating system ids (DSP1043) and VMware's guest ids for the OperatingSystemSection.
OS_IDS = {(True, Arch.X86_64): ("96", "debian11_64Guest", "Debian GNU/Linux (64-bit)"),
          (True, Arch.I386): ("95", "debian11Guest", "Debian GNU/Linux (32-bit)"),
          (False, Arch.X86_64): ("101", "otherLinux64Guest", "Linux (64-bit)"),
          (False, Arch.I386): ("36", "otherLinuxGuest", "Linux (32-bit)")}


def _rasd(fields: list[tuple[str, str]]) -> str:
    # rasd elements in the schema's (alphabetical) order.
    return "".join(f"        <rasd:{k}>{escape(v)}</rasd:{k}>\n" for k, v in sorted(fields))


# --nic: the OVF ResourceSubType each choice writes (VMware's names; harness/images/ovf.py reads them back).
NICS = {"e1000": "E1000", "vmxnet3": "VmxNet3", "virtio": "virtio-net"}


def check_choices(firmware: str, controller: str, nic: str = "e1000") -> None:
    if firmware not in ("bios", "uefi"):
        raise UsageError(f"export: firmware {firmware!r} is not bios or uefi")
    if controller not in CONTROLLERS:
        raise UsageError(f"export: controller {controller!r} is not one of {', '.join(CONTROLLERS)}")
    if nic not in NICS:
        raise UsageError(f"export: nic {nic!r} is not one of {', '.join(NICS)}")


def ovf_descriptor(*, name: str, arch: Arch, debian: bool, vcpus: int, memory_mb: int, disk_href: str,
                   disk_file_size: int, capacity_bytes: int, firmware: str = "bios",
                   controller: str = "ide", nic: str = "e1000") -> str:
    """An OVF 1.0 envelope for one VM with one streamOptimized VMDK disk (pure)."""
    check_choices(firmware, controller, nic)
    rtype, subtype, cname = CONTROLLERS[controller]
    os_id, os_type, os_desc = OS_IDS[(debian, arch)]
    ctrl = [("ElementName", cname), ("InstanceID", "3"), ("ResourceType", rtype), ("Address", "0"),
            ("Description", f"{cname.rsplit(' ', 1)[0]}")]
    if subtype:
        ctrl.append(("ResourceSubType", subtype))
    firmware_cfg = '      <vmw:Config ovf:required="false" vmw:key="firmware" vmw:value="efi"/>\n' \
        if firmware == "uefi" else ""
    n = quoteattr(name)
    return f"""<?xml version="1.0" encoding="UTF-8"?>
<!-- written by nestbed (nestbed images export) -->
<Envelope xmlns="{OVF_NS}" xmlns:ovf="{OVF_NS}" xmlns:rasd="{RASD_NS}" xmlns:vssd="{VSSD_NS}" xmlns:vmw="{VMW_NS}" \
xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">
  <References>
    <File ovf:href={quoteattr(disk_href)} ovf:id="file1" ovf:size="{disk_file_size}"/>
  </References>
  <DiskSection>
    <Info>Virtual disk information</Info>
    <Disk ovf:capacity="{capacity_bytes}" ovf:capacityAllocationUnits="byte" ovf:diskId="vmdisk1" ovf:fileRef="file1" \
ovf:format="{STREAM_OPTIMIZED}"/>
  </DiskSection>
  <NetworkSection>
    <Info>The list of logical networks</Info>
    <Network ovf:name={quoteattr(NETWORK)}>
      <Description>The {escape(NETWORK)} network</Description>
    </Network>
  </NetworkSection>
  <VirtualSystem ovf:id={n}>
    <Info>A virtual machine</Info>
    <Name>{escape(name)}</Name>
    <OperatingSystemSection ovf:id="{os_id}" vmw:osType="{os_type}">
      <Info>The kind of installed guest operating system</Info>
      <Description>{os_desc}</Description>
    </OperatingSystemSection>
    <VirtualHardwareSection>
      <Info>Virtual hardware requirements</Info>
      <System>
        <vssd:ElementName>Virtual Hardware Family</vssd:ElementName>
        <vssd:InstanceID>0</vssd:InstanceID>
        <vssd:VirtualSystemIdentifier>{escape(name)}</vssd:VirtualSystemIdentifier>
        <vssd:VirtualSystemType>vmx-10</vssd:VirtualSystemType>
      </System>
      <Item>
{_rasd([("AllocationUnits", "hertz * 10^6"), ("Description", "Number of Virtual CPUs"),
        ("ElementName", f"{vcpus} virtual CPU(s)"), ("InstanceID", "1"), ("ResourceType", "3"),
        ("VirtualQuantity", str(vcpus))])}      </Item>
      <Item>
{_rasd([("AllocationUnits", "byte * 2^20"), ("Description", "Memory Size"),
        ("ElementName", f"{memory_mb}MB of memory"), ("InstanceID", "2"), ("ResourceType", "4"),
        ("VirtualQuantity", str(memory_mb))])}      </Item>
      <Item>
{_rasd(ctrl)}      </Item>
      <Item>
{_rasd([("AddressOnParent", "0"), ("ElementName", "Hard disk 1"), ("HostResource", "ovf:/disk/vmdisk1"),
        ("InstanceID", "4"), ("Parent", "3"), ("ResourceType", "17")])}      </Item>
      <Item>
{_rasd([("AddressOnParent", "7"), ("AutomaticAllocation", "true"), ("Connection", NETWORK),
        ("Description", f'{NICS[nic]} ethernet adapter on "{NETWORK}"'), ("ElementName", "Network adapter 1"),
        ("InstanceID", "5"), ("ResourceSubType", NICS[nic]), ("ResourceType", "10")])}      </Item>
{firmware_cfg}    </VirtualHardwareSection>
  </VirtualSystem>
</Envelope>
"""


def manifest(digests: dict[str, str]) -> str:
    """A .mf: one ``SHA256(file)= hex`` line per file, in the given order (pure)."""
    return "".join(f"SHA256({name})= {hexd}\n" for name, hexd in digests.items())


def _info(path: Path, fmt: str | None = None) -> dict[str, object]:
    proc = run(["qemu-img", "info", *(["-f", fmt] if fmt else []), "--output=json", str(path)],
               timeout=INFO_TIMEOUT, what=f"qemu-img info {path.name}", error=ImageBuildError)
    data: dict[str, object] = json.loads(proc.stdout)
    return data


def source_disk(image: Image, *, progress: Progress | None = None) -> tuple[Path, str]:
    """The bootable disk of a built *image* and its qemu-img format (a Debian image's boot disk is built,
    cached, on first use)."""
    if not image.built:
        raise ImageNotBuilt(image.name)
    if image.recipe.kind is Kind.DEBIAN:
        return bootdisk.build(image, progress=progress).path, "raw"
    disk = image.disk
    if disk is None:
        raise UsageError(f"export: image {image.name} is a kernel and an initramfs with no disk: nothing that boots "
                         f"by its own bootloader (export a Debian image)")
    return disk, str(_info(disk)["format"])


def export(image: Image, fmt: str, out: Path, *, firmware: str = "bios", controller: str = "ide",
           nic: str = "e1000", progress: Progress | None = None) -> Path:
    """Write *image*'s bootable disk as *fmt* (ova, vmdk, vhd, vhdx, vdi, qcow2) at *out*, atomically."""
    if fmt not in FORMATS:
        raise UsageError(f"export: format {fmt!r} is not one of {', '.join(FORMATS)}")
    check_choices(firmware, controller, nic)
    out = Path(out)
    if out.is_dir():
        raise UsageError(f"export: {out} is a directory: name the file to write")
    if not out.parent.is_dir():
        raise UsageError(f"export: {out.parent} does not exist")
    say = progress or (lambda _msg: None)
    src, src_fmt = source_disk(image, progress=say)
    spec = FORMATS[fmt]
    started = time.monotonic()

    def convert(dst: Path) -> None:
        say(f"qemu-img convert {src.name} ({src_fmt}) -> {spec.qemu}"
            + (f" ({', '.join(spec.options)})" if spec.options else ""))
        run(["qemu-img", "convert", "-f", src_fmt, "-O", spec.qemu, *(["-o", ",".join(spec.options)] if spec.options
                                                                       else []), str(src), str(dst)],
            timeout=CONVERT_TIMEOUT, what=f"export {image.name} as {fmt}", error=ImageBuildError)

    def make(tmp: Path) -> None:
        if fmt != "ova":
            convert(tmp)
            return
        work = scratch_name(tmp, "work")
        work.mkdir(mode=0o700)
        try:
            disk_href = f"{image.name}-disk1.vmdk"
            vmdk = work / disk_href
            convert(vmdk)
            capacity = int(str(_info(src, src_fmt)["virtual-size"]))
            say("OVF descriptor, manifest (SHA256), tar")
            ovf = ovf_descriptor(name=image.name, arch=image.recipe.arch, debian=image.recipe.kind is Kind.DEBIAN,
                                 vcpus=image.recipe.vcpus, memory_mb=image.recipe.memory_mb, disk_href=disk_href,
                                 disk_file_size=vmdk.stat().st_size, capacity_bytes=capacity, firmware=firmware,
                                 controller=controller, nic=nic).encode()
            ovf_name, mf_name = f"{image.name}.ovf", f"{image.name}.mf"
            mf = manifest({ovf_name: hashlib.sha256(ovf).hexdigest(), disk_href: sha256_file(vmdk)}).encode()
            write_ova(tmp, [(ovf_name, ovf), (mf_name, mf), (disk_href, vmdk)])
        finally:
            shutil.rmtree(work, ignore_errors=True)

    publish(out, make, what=f"export of {image.name} as {fmt}", force=True, error=ImageBuildError)
    say(f"exported {image.name} as {fmt} in {time.monotonic() - started:.1f} s: {out}")
    return out


def write_ova(path: Path, members: list[tuple[str, bytes | Path]]) -> None:
    """A plain USTAR tar of *members* (name, bytes or a file), in order, owned by nobody in particular."""
    now = int(time.time())
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.mode, info.mtime, info.uname, info.gname = 0o644, now, "", ""
            if isinstance(data, bytes):
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            else:
                info.size = data.stat().st_size
                with open(data, "rb") as f:
                    tar.addfile(info, f)
