"""Kind ``cloud``: a Debian "cloud image" built here, shaped like the ones distributions publish.

A GPT disk (the layout of :mod:`harness.images.bootdisk`: BIOS boot partition with GRUB's core.img,
an EFI system partition with ``BOOTX64.EFI``, the ext4 root) holding a Debian root with systemd,
cloud-init, openssh-server and ifupdown, and nothing of nestbed's: no authorized key, no host key
(cloud-init makes them on first boot, as on a distribution's image), no nestbed init, root locked.
So it can only be reached the way a user's own cloud image is: through a cloud-init NoCloud seed
(:mod:`harness.images.seed`), booted by its own bootloader (:mod:`harness.images.disk`).  It is the
test data of the disk kind: nothing is downloaded.

Built without root privileges or loop devices, like the other Debian images: mmdebstrap, the tree
customized as a directory, ``mke2fs -d``, ``sfdisk`` on the image file, the ESP made by
``mkfs.vfat`` and ``mtools``, GRUB's BIOS stages placed in Python (:func:`bootdisk.embed_bios_core`).
GRUB's configuration sits in a memdisk inside each GRUB image and boots the kernel with
``console=tty0 console=ttyS0,115200`` (the serial console last: it is ``/dev/console``, where
cloud-init prints the host keys), as Debian's cloud images do.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from harness.errors import ImageBuildError
from harness.images import bootdisk
from harness.images.recipes import Recipe
from harness.images.steps import Progress, add_devices, as_tree_owner, mmdebstrap, remove_tree, resolved_versions, run_step, sbin
from harness.vm.spec import Arch

CLOUD_PACKAGES = ["systemd-sysv", "udev", "dbus", "cloud-init", "openssh-server", "ifupdown", "isc-dhcp-client",
                  "iproute2", "netbase", "procps", "kmod"]
CMDLINE = "ro console=tty0 console=ttyS0,115200"
STEP_TIMEOUT = 600.0


def grub_cfg(*, kernel_release: str, rootfs_uuid: str) -> str:
    """The cloud image's own GRUB config: no nestbed token, no SMBIOS; what a distribution's would do."""
    return f"""# cloud image built by nestbed's cloud kind
serial --unit=0 --speed=115200
terminal_input serial console
terminal_output serial console
search --no-floppy --fs-uuid --set=root {rootfs_uuid}
linux /boot/vmlinuz-{kernel_release} root=UUID={rootfs_uuid} {CMDLINE}
initrd /boot/initrd.img-{kernel_release}
boot
"""


def _write(root: Path, rel: str, content: str, mode: int = 0o644) -> None:
    path = root / rel.lstrip("/")
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_symlink():
        path.unlink()
    path.write_text(content)
    os.chmod(path, mode)


def customize(root: Path, recipe: Recipe, fs_uuid: str) -> None:
    """What any image builder does to a tree (fstab, no host keys, root locked), and nothing nestbed-specific."""
    for old in glob.glob(str(root / "etc/ssh/ssh_host_*")):
        os.unlink(old)  # cloud-init generates this instance's keys
    shadow = root / "etc/shadow"
    lines = [("root:*:" + ln.split(":", 2)[2]) if ln.startswith("root:") else ln
             for ln in shadow.read_text().splitlines()]
    _write(root, "/etc/shadow", "\n".join(lines) + "\n", 0o640)
    _write(root, "/etc/fstab", f"UUID={fs_uuid} / ext4 defaults 0 1\n")
    _write(root, "/etc/hostname", "localhost\n")
    _write(root, "/etc/machine-id", "")  # systemd makes one at first boot
    _write(root, "/etc/network/interfaces", "auto lo\niface lo inet loopback\n\nsource /etc/network/interfaces.d/*\n")
    for dest, content in recipe.files.items():
        _write(root, dest, content, 0o755 if dest.endswith(".sh") else 0o644)


def _grub_image(loader: bootdisk.Loader, memdisk: Path, out: Path) -> None:
    if not (loader.directory / "moddep.lst").is_file():
        raise ImageBuildError(f"cloud image: {loader.directory} is missing (apt-get install {loader.package})")
    run_step(["grub-mkimage", "-O", loader.platform, "-d", str(loader.directory), "-p", "(memdisk)/boot/grub",
              "-m", str(memdisk), "-o", str(out), *loader.modules], timeout=120, what=f"grub-mkimage {loader.platform}")


def _write_at(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def assemble(rootfs: Path, disk: Path, *, kernel_release: str, fs_uuid: str, work: Path, say: Progress) -> dict[str, Any]:
    """The GPT disk *disk* (raw) around the ext4 image *rootfs*, bootable by SeaBIOS and 64-bit OVMF."""
    cfg = grub_cfg(kernel_release=kernel_release, rootfs_uuid=fs_uuid)
    memdisk = work / "memdisk.tar"
    memdisk.write_bytes(bootdisk.memdisk_tar(cfg))
    loaders = (bootdisk.BIOS_LOADER, bootdisk.EFI64_LOADER)
    say("grub-mkimage: i386-pc, x86_64-efi")
    for ld in loaders:
        _grub_image(ld, memdisk, work / ld.platform)
    layout = bootdisk.Layout(rootfs.stat().st_size)
    with open(disk, "wb") as f:
        f.truncate(layout.total_size)
    disk_id = str(uuid.uuid5(uuid.UUID(fs_uuid), "nestbed-cloud-gpt"))
    script = work / "layout.sfdisk"
    script.write_text(layout.sfdisk_script(disk_id))
    run_step(["sh", "-c", f"exec sfdisk --no-reread --no-tell-kernel --quiet '{disk}' < '{script}'"],
             timeout=60, what="sfdisk")
    esp = work / "esp.img"
    run_step(["mkfs.vfat", "-C", "-n", "EFI", "-i", fs_uuid.replace("-", "")[:8], str(esp),
              str(bootdisk.ESP_SIZE // 1024)], timeout=60, what="mkfs.vfat")
    env = {**os.environ, "MTOOLS_SKIP_CHECK": "1"}
    run_step(["mmd", "-i", str(esp), "::/EFI", "::/EFI/BOOT"], timeout=60, what="mmd", env=env)
    run_step(["mcopy", "-i", str(esp), str(work / bootdisk.EFI64_LOADER.platform), f"::{bootdisk.EFI64_LOADER.path}"],
             timeout=60, what="mcopy", env=env)
    _write_at(disk, bootdisk.ESP_START, esp.read_bytes())
    with open(disk, "rb") as f:
        mbr = f.read(bootdisk.SECTOR)
    new_mbr, core = bootdisk.embed_bios_core(mbr, (bootdisk.BIOS_LOADER.directory / "boot.img").read_bytes(),
                                             (work / bootdisk.BIOS_LOADER.platform).read_bytes(),
                                             bootdisk.BIOS_BOOT_START // bootdisk.SECTOR)
    if len(core) > bootdisk.BIOS_BOOT_SIZE:
        raise ImageBuildError(f"cloud image: GRUB's core.img ({len(core)} bytes) does not fit the BIOS boot partition")
    _write_at(disk, 0, new_mbr)
    _write_at(disk, bootdisk.BIOS_BOOT_START, core)
    target = {"driver": "raw", "offset": bootdisk.ROOT_START, "size": layout.root_size,
              "file": {"driver": "file", "filename": str(disk)}}
    run_step(["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(rootfs), "json:" + json.dumps(target)],
             timeout=STEP_TIMEOUT, what="qemu-img convert (root filesystem)")
    return {"grub_cfg": cfg, "size": layout.total_size, "gpt_label_id": disk_id}


def build_cloud(recipe: Recipe, work: Path, say: Progress) -> dict[str, Any]:
    if recipe.arch is not Arch.X86_64:
        raise ImageBuildError(f"{recipe.name}: cloud images are built for x86_64 only, not {recipe.arch.value}")
    root = work / "root"
    include = [recipe.kernel, *CLOUD_PACKAGES, *recipe.packages]
    say(f"mmdebstrap {recipe.suite} ({recipe.arch.debian}): {len(include)} packages and their dependencies")
    devices = mmdebstrap(recipe, root, variant="minbase", include=include, work=work,
                         extra=["--dpkgopt=path-exclude=/usr/share/{doc,man,locale,info}/*",
                                "--dpkgopt=path-include=/usr/share/locale/locale.alias"])
    rootfs = work / "root.ext4"
    try:
        versions = resolved_versions(root)
        remove_tree(root / "var/cache/apt/archives")
        (root / "var/cache/apt/archives/partial").mkdir(parents=True, exist_ok=True)
        kernels = sorted(glob.glob(str(root / "boot/vmlinuz-*")))
        if not kernels or not glob.glob(str(root / "boot/initrd.img-*")):
            raise ImageBuildError(f"{recipe.name}: the tree has no /boot/vmlinuz-* or /boot/initrd.img-*")
        release = Path(kernels[-1]).name.removeprefix("vmlinuz-")
        shutil.copy(kernels[-1], work / "vmlinuz")
        fs_uuid = str(uuid.uuid4())
        say("customizing: fstab, no host keys, root locked")
        customize(root, recipe, fs_uuid)
        say(f"making the ext4 filesystem ({recipe.disk_size})")
        run_step(as_tree_owner([sbin("mke2fs"), "-q", "-F", "-t", "ext4", "-d", str(root), "-L", "cloudimg-rootfs",
                                "-U", fs_uuid, str(rootfs), recipe.disk_size]), timeout=600, what="mke2fs")
    finally:
        remove_tree(root)
    add_devices(rootfs, devices)
    say("GPT disk: BIOS boot, EFI system and root partitions; GRUB for SeaBIOS and UEFI")
    raw = work / "disk.raw"
    facts = assemble(rootfs, raw, kernel_release=release, fs_uuid=fs_uuid, work=work, say=say)
    rootfs.unlink()
    run_step(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(work / "disk.qcow2")],
             timeout=STEP_TIMEOUT, what="qemu-img convert")
    raw.unlink()
    for leftover in ("memdisk.tar", "layout.sfdisk", "esp.img", "i386-pc", "x86_64-efi"):
        (work / leftover).unlink(missing_ok=True)
    return {"files": {"disk": "disk.qcow2", "kernel": "vmlinuz"}, "format": "qcow2", "kernel_release": release,
            "rootfs_uuid": fs_uuid, "packages": versions, **facts}
