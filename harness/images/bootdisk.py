"""Whole-disk boot images: a Debian image's own root filesystem behind GRUB, for SeaBIOS and UEFI.

Guests normally boot by direct kernel boot (``-kernel``/``-initrd``).  For a firmware boot the
firmware must find a bootloader on a disk, so this module assembles, from a built Debian image,
one whole-disk image (GPT, 512-byte sectors) that every firmware of its architecture can boot::

    LBA 0     protective MBR whose boot code is GRUB's boot.img (SeaBIOS runs it)
    1 MiB     BIOS boot partition (1 MiB): GRUB's i386-pc core.img, which boot.img loads
    2 MiB     EFI system partition (32 MiB, FAT): /EFI/BOOT/BOOTX64.EFI (x86_64) and BOOTIA32.EFI
    34 MiB    the image's ext4 root filesystem, byte for byte (same UUID: root=UUID= still finds it)

No loop devices and no mounts: the partition table is written by ``sfdisk`` on the image file,
the ESP is a FAT image made by ``mkfs.vfat`` and filled by ``mtools``, the root filesystem is
copied to its partition offset by ``qemu-img convert`` (sparse: holes stay holes), and GRUB's
boot.img/core.img are patched and placed here in Python, exactly as ``grub-bios-setup`` would
(it refuses to work on a file: it probes the host's own devices).

Every GRUB image (``grub-mkimage``; Debian's ``grub-pc-bin``, ``grub-efi-amd64-bin``,
``grub-efi-ia32-bin``) carries the same ``grub.cfg`` in a memdisk, so nothing depends on a
prefix directory on disk.  The config finds the root partition by filesystem UUID and loads the
kernel and initrd that the Debian kernel package put in the root filesystem's ``/boot``.

**The per-boot command line.**  nestbed's init prints ``nestbed-ready-<token>`` with a token it
reads from the kernel command line, and the token is new for every boot, but the disk is shared
and booted with ``snapshot=on``.  So the harness hands the whole kernel command line of this boot
to GRUB through SMBIOS: ``-smbios type=1,serial=nestbed:<cmdline>`` (the way cloud-init's NoCloud
passes per-VM data).  SeaBIOS and OVMF both publish QEMU's SMBIOS tables; GRUB's ``smbios`` command
reads the type 1 serial number and ``regexp`` strips the ``nestbed:`` tag.  The kernel thus gets
exactly the command line a direct boot gets (after GRUB's own ``BOOT_IMAGE=...``).  Booted
without it (plain QEMU, another serial number), GRUB uses the image's own command line with
``console=ttyS0``.

The disk is cached in the image's directory, keyed by the image's manifest (so a rebuilt image
gets a new disk), built under a file lock in a private name and renamed into place, with its
JSON description written last: nothing half-built ever looks built.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import os
import shutil
import struct
import tarfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness.core.publish import publish, scratch_name, write_atomic
from harness.errors import CapabilityMissing, ImageBuildError, ImageNotBuilt, SetupMissing, UsageError
from harness.images.recipes import Kind
from harness.images.steps import run_step
from harness.images.store import Image
from harness.vm.spec import Arch, DiskFormat, Drive, Firmware, MachineSpec, ovmf_for

if TYPE_CHECKING:
    from harness.guest import BootOptions

# bump whenever the disk's layout or GRUB config changes (v2: the ESP's type GUID, a typo in v1, fixed)
BOOTDISK_VERSION = 2
LOCK_TIMEOUT = 1800.0
STEP_TIMEOUT = 600.0
# Firmware boots take longer than direct kernel boots: OVMF alone needs ~10 s under TCG, and
# GRUB reads kernel and initrd through the firmware's disk driver.
READY_EXTRA_SECONDS = 90.0

SECTOR = 512
MiB = 1 << 20
BIOS_BOOT_START, BIOS_BOOT_SIZE = 1 * MiB, 1 * MiB
ESP_START, ESP_SIZE = 2 * MiB, 32 * MiB
ROOT_START = ESP_START + ESP_SIZE
GPT_BACKUP = 1 * MiB  # room for the backup GPT at the end (33 sectors; rounded up)

GPT_BIOS_BOOT = "21686148-6449-6E6F-744E-656564454649"
GPT_ESP = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"  # the UEFI specification's EFI system partition
GPT_LINUX_FS = "0FC63DAF-8483-4772-8E79-3D69D8477DE4"

SMBIOS_TAG = "nestbed:"

# GRUB's boot.img / diskboot.img fields (grub-core/boot/i386/pc/boot.S, include/grub/i386/pc/boot.h).
BOOT_KERNEL_SECTOR = 0x5C  # u64: LBA of core.img's first sector
BOOT_DRIVE_CHECK = 0x66  # a 2-byte jmp; grub-bios-setup NOPs it for hard disks (buggy-BIOS workaround)
MBR_KEEP_FROM = 0x1B8  # disk signature + partition table + 0x55AA stay the disk's own
DISKBOOT_BLOCKLIST = SECTOR - 12  # struct {u64 start; u16 len; u16 segment} at the end of sector 0

COMMON_MODULES = ("normal", "configfile", "memdisk", "tar", "part_gpt", "part_msdos", "ext2", "search",
                  "search_fs_uuid", "linux", "smbios", "regexp", "serial", "terminal", "echo", "test")


@dataclass(frozen=True)
class Loader:
    """One GRUB image on the disk: its GRUB platform, the firmware that runs it, where it goes."""

    platform: str  # grub-mkimage -O
    package: str  # the Debian package with /usr/lib/grub/<platform>
    firmware: Firmware
    path: str  # on the ESP, or "" for the BIOS boot partition

    @property
    def directory(self) -> Path:
        return Path("/usr/lib/grub") / self.platform

    @property
    def modules(self) -> tuple[str, ...]:
        return (("biosdisk",) if self.platform == "i386-pc" else ()) + COMMON_MODULES


BIOS_LOADER = Loader("i386-pc", "grub-pc-bin", Firmware.BIOS, "")
EFI64_LOADER = Loader("x86_64-efi", "grub-efi-amd64-bin", Firmware.UEFI, "/EFI/BOOT/BOOTX64.EFI")
EFI32_LOADER = Loader("i386-efi", "grub-efi-ia32-bin", Firmware.UEFI32, "/EFI/BOOT/BOOTIA32.EFI")

# What each architecture's disk carries.  The i386 disk has no BOOTX64.EFI: 64-bit UEFI cannot run
# under qemu-system-i386.  The x86_64 disk carries BOOTIA32.EFI too: 32-bit UEFI on a 64-bit CPU
# booting a 64-bit kernel is EFI mixed mode (Debian's amd64 kernels have CONFIG_EFI_MIXED).
LOADERS: dict[Arch, tuple[Loader, ...]] = {
    Arch.X86_64: (BIOS_LOADER, EFI64_LOADER, EFI32_LOADER),
    Arch.I386: (BIOS_LOADER, EFI32_LOADER),
}


def loader_for(arch: Arch, firmware: Firmware) -> Loader:
    """The GRUB image *firmware* runs on *arch*'s disk."""
    ovmf = ovmf_for(arch, firmware)
    if ovmf is None:
        return BIOS_LOADER
    return EFI64_LOADER if ovmf.bits == 64 else EFI32_LOADER


# -- pure parts -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Layout:
    """Where everything sits on the disk (byte offsets and sizes, MiB-aligned)."""

    root_size: int

    @property
    def total_size(self) -> int:
        return ROOT_START + self.root_size + GPT_BACKUP

    def sfdisk_script(self, disk_id: str) -> str:
        """sfdisk's input for the GPT (``disk_id``: the table's label-id, a UUID)."""
        if self.root_size <= 0 or self.root_size % SECTOR:
            raise UsageError(f"boot disk: root filesystem size {self.root_size} is not a positive multiple of "
                             f"{SECTOR}")
        rows = [("bios-boot", BIOS_BOOT_START, BIOS_BOOT_SIZE, GPT_BIOS_BOOT),
                ("esp", ESP_START, ESP_SIZE, GPT_ESP),
                ("root", ROOT_START, self.root_size, GPT_LINUX_FS)]
        lines = ["label: gpt", f"label-id: {disk_id}", "unit: sectors", f"first-lba: {BIOS_BOOT_START // SECTOR}"]
        lines += [f"start={start // SECTOR}, size={size // SECTOR}, type={kind}, name=\"{name}\""
                  for name, start, size, kind in rows]
        return "\n".join(lines) + "\n"


def grub_cfg(*, kernel_release: str, rootfs_uuid: str, default_cmdline: str) -> str:
    """The one grub.cfg every loader on the disk runs (see the module docstring)."""
    for what, value in (("kernel_release", kernel_release), ("rootfs_uuid", rootfs_uuid)):
        if not value or any(c in value for c in " \t\n'\"$;\\"):
            raise UsageError(f"boot disk: {what} {value!r} is empty or has characters GRUB would interpret")
    if "'" in default_cmdline:
        raise UsageError(f"boot disk: default kernel command line {default_cmdline!r} has a single quote")
    return f"""# nestbed boot disk (bootdisk v{BOOTDISK_VERSION}): generated, do not edit
serial --unit=0 --speed=115200
terminal_input serial
terminal_output serial
set nestbed_cmdline='{default_cmdline}'
# This boot's command line, from the harness: SMBIOS type 1 serial "{SMBIOS_TAG}<cmdline>".
if smbios --type 1 --get-string 7 --set nestbed_smbios; then
  regexp --set=1:nestbed_cmdline '^{SMBIOS_TAG}(.*)$' "$nestbed_smbios"
fi
search --no-floppy --fs-uuid --set=root {rootfs_uuid}
echo "nestbed-grub: platform=$grub_cpu-$grub_platform root=$root"
linux /boot/vmlinuz-{kernel_release} $nestbed_cmdline
initrd /boot/initrd.img-{kernel_release}
boot
"""


def memdisk_tar(cfg: str) -> bytes:
    """A tar holding ``boot/grub/grub.cfg``: GRUB's memdisk (prefix ``(memdisk)/boot/grub``)."""
    buf = io.BytesIO()
    data = cfg.encode()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for d in ("boot", "boot/grub"):
            info = tarfile.TarInfo(d)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(info)
        info = tarfile.TarInfo("boot/grub/grub.cfg")
        info.size, info.mode = len(data), 0o644
        tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def embed_bios_core(mbr: bytes, boot_img: bytes, core_img: bytes, core_lba: int) -> tuple[bytes, bytes]:
    """GRUB's BIOS stages for a core.img stored contiguously from *core_lba*: (new MBR, core sectors).

    What ``grub-bios-setup`` does for an embedded core: boot.img's code with the disk's own
    partition table and signature, the core's LBA in boot.img, the hard-disk drive check
    enabled, and diskboot.img's blocklist pointing at the rest of the core.
    """
    if len(mbr) != SECTOR or len(boot_img) != SECTOR:
        raise UsageError(f"boot disk: MBR ({len(mbr)} bytes) and boot.img ({len(boot_img)} bytes) must be "
                         f"{SECTOR} bytes")
    if mbr[510:512] != b"\x55\xaa":
        raise UsageError("boot disk: the MBR has no 0x55AA signature (write the partition table first)")
    if boot_img[BOOT_DRIVE_CHECK] != 0xEB:
        raise UsageError("boot disk: boot.img has no jmp at the drive-check offset (unknown GRUB version?)")
    nsec = -(-len(core_img) // SECTOR)
    core = bytearray(core_img.ljust(nsec * SECTOR, b"\0"))
    _start, length, segment = struct.unpack_from("<QHH", core, DISKBOOT_BLOCKLIST)
    if length != nsec - 1 or segment != 0x820:
        raise UsageError(f"boot disk: core.img's blocklist ({length} sectors at segment {segment:#x}) does not "
                         f"match its size ({nsec} sectors): not an i386-pc core image?")
    struct.pack_into("<QHH", core, DISKBOOT_BLOCKLIST, core_lba + 1, nsec - 1, segment)
    boot = bytearray(boot_img)
    struct.pack_into("<Q", boot, BOOT_KERNEL_SECTOR, core_lba)
    boot[BOOT_DRIVE_CHECK:BOOT_DRIVE_CHECK + 2] = b"\x90\x90"
    return bytes(boot[:MBR_KEEP_FROM]) + mbr[MBR_KEEP_FROM:], bytes(core)


def smbios_args(cmdline: str) -> tuple[str, ...]:
    """QEMU arguments that hand *cmdline* to the disk's GRUB (commas doubled for QEMU's parser)."""
    if "\n" in cmdline or "\0" in cmdline:
        raise UsageError(f"kernel command line {cmdline!r} has a newline or NUL")
    return ("-smbios", "type=1,serial=" + (SMBIOS_TAG + cmdline).replace(",", ",,"))


def cache_key(manifest_text: str) -> str:
    blob = f"bootdisk-v{BOOTDISK_VERSION}\n{manifest_text}".encode()
    return hashlib.sha256(blob).hexdigest()[:16]


# -- the disk ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class BootDisk:
    """A built (or to-be-built) boot disk of an image."""

    image: Image
    key: str

    @property
    def path(self) -> Path:
        return self.image.dir / f"bootdisk-{self.key}.raw"

    @property
    def info_path(self) -> Path:
        return self.image.dir / f"bootdisk-{self.key}.json"

    @property
    def built(self) -> bool:
        return self.info_path.is_file() and self.path.is_file()

    @property
    def info(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.info_path.read_text())
        return data

    def drive(self) -> Drive:
        # snapshot=on: each boot writes to a throw-away overlay; bootindex=0: the firmware tries this
        # disk first (OVMF would otherwise also try PXE on the NIC).
        return Drive(self.path, DiskFormat.RAW, snapshot=True, serial="nestbed-root", bootindex=0)


def _check_image(image: Image) -> None:
    if image.recipe.kind is not Kind.DEBIAN:
        raise UsageError(f"image {image.name}: only Debian images (a root filesystem) have a boot disk, "
                         f"not {image.recipe.kind.value} images")


def boot_disk(image: Image) -> BootDisk:
    """The boot disk of a built Debian *image* (whether or not it is built yet)."""
    _check_image(image)
    if not image.built:
        raise ImageNotBuilt(image.name)
    return BootDisk(image, cache_key(image.manifest_path.read_text()))


def check_firmware(arch: Arch, firmware: Firmware) -> None:
    """Raise :class:`CapabilityMissing` unless this host can boot *arch* under *firmware*."""
    ovmf = ovmf_for(arch, firmware)
    if ovmf is not None:
        pkg = "ovmf" if ovmf.bits == 64 else "ovmf-ia32"
        for f in (ovmf.code, ovmf.vars):
            if not f.is_file():
                raise SetupMissing(f"{firmware.value} firmware: {f} is missing: install Debian's {pkg} "
                                   f"(sudo apt-get install {pkg})")
    loader = loader_for(arch, firmware)
    if loader not in LOADERS[arch]:
        raise CapabilityMissing(f"{firmware.value} on {arch.value}",
                                f"the {arch.value} boot disk has no {loader.platform} GRUB")


def firmware_spec(spec: MachineSpec, image: Image, firmware: Firmware,
                  extra_drives: tuple[Drive, ...] = ()) -> MachineSpec:
    """*spec* (a direct kernel boot of *image*) turned into a boot of the image's boot disk.

    The kernel command line *spec* would pass with ``-append`` goes to GRUB through SMBIOS.
    Pure: the disk's path is computed, not built (:func:`build` does that).
    """
    check_firmware(spec.arch, firmware)
    disk = boot_disk(image)
    return spec.replace(firmware=firmware, kernel=None, initrd=None, append="",
                        drives=(disk.drive(), *extra_drives),
                        extra_args=(*smbios_args(spec.append), *spec.extra_args))


def prepare(image: Image, opts: BootOptions, host: object | None = None) -> BootOptions:
    """For :func:`harness.guest.boot`: check a firmware boot of *image* can work here, build the
    boot disk (cached) and allow for the firmware's time in the ready timeout."""
    try:
        firmware = Firmware(str(opts.firmware))
    except ValueError:
        raise UsageError(f"firmware {opts.firmware!r}: not one of {', '.join(f.value for f in Firmware)}") from None
    if host is not None:
        raise CapabilityMissing(f"{firmware.value} boot of a guest inside an L1",
                                "the L1 would need OVMF and the boot disk (docs/firmware.md)")
    _check_image(image)
    check_firmware(image.recipe.arch, firmware)
    build(image)
    timeout = opts.ready_timeout or image.recipe.ready_timeout + READY_EXTRA_SECONDS
    return dataclasses.replace(opts, firmware=firmware, ready_timeout=timeout)


Progress = Callable[[str], None]


def build(image: Image, *, progress: Progress | None = None) -> BootDisk:
    """Build *image*'s boot disk unless it is cached; returns it."""
    disk = boot_disk(image)
    if disk.built:
        return disk
    say = progress or (lambda _msg: None)
    started = time.monotonic()

    def make_disk(tmp: Path) -> None:
        # Disks of older keys go first (we hold this disk's lock; older keys are never booted again).
        for stale in (*image.dir.glob(".bootdisk-*"), *image.dir.glob("bootdisk-*")):
            if not stale.name.startswith(f"bootdisk-{disk.key}."):
                shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
        work = scratch_name(tmp, "work")  # private to this builder; swept if it dies
        work.mkdir(mode=0o700)
        try:
            info = _assemble(image, disk, work, say)
            info["build_seconds"] = round(time.monotonic() - started, 1)
            (work / "disk.raw").rename(tmp)
            write_atomic(work / "info.json", json.dumps(info, indent=2))
            # The description is published last, under the same lock: only a complete disk has one.
            os.replace(work / "info.json", disk.info_path)
        finally:
            shutil.rmtree(work, ignore_errors=True)

    # The disk and its description are one artifact: the lock is the disk's, the marker the description.
    if publish(disk.path, make_disk, what=f"boot disk ({image.name})", exists=lambda _p: disk.built,
               timeout=LOCK_TIMEOUT, error=ImageBuildError):
        say(f"built the boot disk of {image.name} in {time.monotonic() - started:.1f} s: {disk.path}")
    return disk

def _virtual_size(path: Path) -> int:
    out = run_step(["qemu-img", "info", "--output=json", str(path)], timeout=60, what="qemu-img info")
    size = json.loads(out.stdout)["virtual-size"]
    assert isinstance(size, int)
    return size


def _grub_image(loader: Loader, memdisk: Path, out: Path) -> None:
    if not (loader.directory / "moddep.lst").is_file():
        raise ImageBuildError(f"boot disk: {loader.directory} is missing (apt-get install {loader.package})")
    run_step(["grub-mkimage", "-O", loader.platform, "-d", str(loader.directory), "-p", "(memdisk)/boot/grub",
              "-m", str(memdisk), "-o", str(out), *loader.modules],
             timeout=120, what=f"grub-mkimage {loader.platform}")


def _write_at(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def _assemble(image: Image, disk: BootDisk, work: Path, say: Progress) -> dict[str, Any]:
    m = image.manifest
    arch = image.recipe.arch
    release, fs_uuid = m.get("kernel_release", ""), m.get("rootfs_uuid", "")
    root_qcow2 = image.disk
    if root_qcow2 is None or not release or not fs_uuid:
        raise ImageBuildError(f"boot disk: image {image.name}'s manifest lacks disk, kernel_release or rootfs_uuid")
    cfg = grub_cfg(kernel_release=release, rootfs_uuid=fs_uuid,
                   default_cmdline=" ".join([*m.get("append", []), "console=ttyS0"]))
    memdisk = work / "memdisk.tar"
    memdisk.write_bytes(memdisk_tar(cfg))
    loaders = LOADERS[arch]
    say(f"grub-mkimage: {', '.join(ld.platform for ld in loaders)}")
    for ld in loaders:
        _grub_image(ld, memdisk, work / ld.platform)

    layout = Layout(_virtual_size(root_qcow2))
    raw = work / "disk.raw"
    with open(raw, "wb") as f:
        f.truncate(layout.total_size)  # sparse
    # Stable identifiers derived from the root filesystem's UUID: the same image gives the same disk.
    disk_id = str(uuid.uuid5(uuid.UUID(fs_uuid), "nestbed-bootdisk-gpt"))
    say("sfdisk: GPT with BIOS boot, EFI system and root partitions")
    script = work / "layout.sfdisk"
    script.write_text(layout.sfdisk_script(disk_id))
    run_step(["sh", "-c", f"exec sfdisk --no-reread --no-tell-kernel --quiet '{raw}' < '{script}'"],
             timeout=60, what="sfdisk")

    efi = [ld for ld in loaders if ld.path]
    if efi:
        say("ESP: mkfs.vfat and mcopy")
        esp = work / "esp.img"
        volume_id = fs_uuid.replace("-", "")[:8]
        run_step(["mkfs.vfat", "-C", "-n", "NESTBED-ESP", "-i", volume_id, str(esp), str(ESP_SIZE // 1024)],
                 timeout=60, what="mkfs.vfat")
        env = {**os.environ, "MTOOLS_SKIP_CHECK": "1"}
        run_step(["mmd", "-i", str(esp), "::/EFI", "::/EFI/BOOT"], timeout=60, what="mmd", env=env)
        for ld in efi:
            run_step(["mcopy", "-i", str(esp), str(work / ld.platform), f"::{ld.path}"], timeout=60,
                     what="mcopy", env=env)
        _write_at(raw, ESP_START, esp.read_bytes())

    core = (work / BIOS_LOADER.platform).read_bytes()
    if len(core) > BIOS_BOOT_SIZE:
        raise ImageBuildError(f"boot disk: GRUB's core.img ({len(core)} bytes) does not fit the "
                              f"{BIOS_BOOT_SIZE}-byte BIOS boot partition")
    with open(raw, "rb") as f:
        mbr = f.read(SECTOR)
    new_mbr, core_sectors = embed_bios_core(mbr, (BIOS_LOADER.directory / "boot.img").read_bytes(), core,
                                            BIOS_BOOT_START // SECTOR)
    _write_at(raw, 0, new_mbr)
    _write_at(raw, BIOS_BOOT_START, core_sectors)

    say(f"root filesystem ({layout.root_size >> 20} MiB) to its partition")
    target = {"driver": "raw", "offset": ROOT_START, "size": layout.root_size,
              "file": {"driver": "file", "filename": str(raw)}}
    run_step(["qemu-img", "convert", "-n", "-f", "qcow2", "-O", "raw", str(root_qcow2), "json:" + json.dumps(target)],
             timeout=STEP_TIMEOUT, what="qemu-img convert (root filesystem)")
    with contextlib.suppress(OSError):
        os.chmod(raw, 0o644)
    return {
        "image": image.name, "arch": arch.value, "bootdisk_version": BOOTDISK_VERSION,
        "source_manifest_key": disk.key, "kernel_release": release, "rootfs_uuid": fs_uuid,
        "gpt_label_id": disk_id, "size": layout.total_size,
        "partitions": {"bios-boot": [BIOS_BOOT_START, BIOS_BOOT_SIZE], "esp": [ESP_START, ESP_SIZE],
                       "root": [ROOT_START, layout.root_size]},
        "loaders": {ld.firmware.value: {"platform": ld.platform, "path": ld.path or "bios-boot partition",
                                        "bytes": (work / ld.platform).stat().st_size} for ld in loaders},
        "grub_cfg": cfg,
    }
