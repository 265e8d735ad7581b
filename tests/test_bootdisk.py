"""Boot disks and firmware argv: pure parts without QEMU, and a real (small) boot-disk build.

The build test assembles a boot disk from a synthetic "Debian image" (an ext4 with a fake
/boot, a few MiB) with the real tools (grub-mkimage, sfdisk, mkfs.vfat, mtools, qemu-img) and
checks the result byte by byte; it boots nothing (scenarios/test_firmware.py does).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import struct
import subprocess
import tarfile
import time
from pathlib import Path

import pytest
from conftest import FAKE_RELEASE, FAKE_ROOT_UUID, fake_debian_root, setup_installs

from harness.errors import CapabilityMissing, ImageBuildError, ImageNotBuilt, SetupMissing, UsageError
from harness.guest import BootOptions, spec_for
from harness.images import bootdisk
from harness.images.recipes import parse_recipe
from harness.images.store import Image
from harness.vm.spec import (
    OVMF,
    Accel,
    Arch,
    Chardev,
    DiskFormat,
    Drive,
    Endpoints,
    Firmware,
    MachineSpec,
    build_argv,
    ovmf_for,
    resolve_ports,
)

EP = Endpoints(serial=Chardev(fd=5), qmp=Chardev(fd=7))
UUID, RELEASE = FAKE_ROOT_UUID, FAKE_RELEASE


def _opt(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


# -- firmware in the argv -------------------------------------------------------------------

def test_bios_has_no_pflash_and_plain_machine() -> None:
    argv = build_argv(MachineSpec(accel=Accel.TCG, firmware=Firmware.BIOS), EP)
    assert _opt(argv, "-machine") == ["q35"]
    assert not [d for d in _opt(argv, "-drive") if "pflash" in d]
    assert "-global" not in argv


@pytest.mark.parametrize(("arch", "firmware", "bits"), [
    (Arch.X86_64, Firmware.UEFI, 64),
    (Arch.I386, Firmware.UEFI, 32),  # qemu-system-i386 runs 32-bit OVMF only
    (Arch.I386, Firmware.UEFI32, 32),
    (Arch.X86_64, Firmware.UEFI32, 32),  # EFI mixed mode
])
def test_uefi_pflash_code_readonly_vars_private(arch: Arch, firmware: Firmware, bits: int) -> None:
    ovmf = OVMF[bits]
    assert ovmf_for(arch, firmware) == ovmf
    argv = build_argv(MachineSpec(arch=arch, accel=Accel.TCG, firmware=firmware), EP)
    pflash = [d for d in _opt(argv, "-drive") if d.startswith("if=pflash")]
    assert pflash == [f"if=pflash,format=raw,unit=0,readonly=on,file={ovmf.code}",
                      f"if=pflash,format=raw,unit=1,snapshot=on,file={ovmf.vars}"]
    # Debian's OVMF32 is a secure-boot build: it needs SMM and a secure flash.
    if bits == 32:
        assert _opt(argv, "-machine") == ["q35,smm=on"]
        assert _opt(argv, "-global") == ["driver=cfi.pflash01,property=secure,value=on"]
    else:
        assert _opt(argv, "-machine") == ["q35"] and "-global" not in argv


def test_ovmf_paths_are_debians() -> None:
    assert OVMF[64].code.name == "OVMF_CODE.fd" and OVMF[64].vars.name == "OVMF_VARS.fd"
    assert OVMF[32].code.name == "OVMF32_CODE_4M.secboot.fd" and OVMF[32].vars.name == "OVMF32_VARS_4M.fd"


def test_drive_bootindex() -> None:
    spec = MachineSpec(accel=Accel.TCG, drives=(Drive(Path("/d.raw"), DiskFormat.RAW, bootindex=0),
                                                  Drive(Path("/e.raw"), DiskFormat.RAW)))
    devices = _opt(build_argv(spec, EP), "-device")
    assert "virtio-blk-pci,drive=drive0,bootindex=0" in devices
    assert "virtio-blk-pci,drive=drive1" in devices


# -- pure parts of the disk ------------------------------------------------------------------

def test_layout_and_sfdisk_script() -> None:
    layout = bootdisk.Layout(2 << 30)
    assert layout.total_size == 34 * bootdisk.MiB + (2 << 30) + bootdisk.MiB
    script = layout.sfdisk_script("b7ebfb73-7240-9746-bfd0-311fe5af2d47").splitlines()
    assert script[:4] == ["label: gpt", "label-id: b7ebfb73-7240-9746-bfd0-311fe5af2d47", "unit: sectors",
                          "first-lba: 2048"]
    assert script[4] == f'start=2048, size=2048, type={bootdisk.GPT_BIOS_BOOT}, name="bios-boot"'
    assert script[5] == f'start=4096, size=65536, type={bootdisk.GPT_ESP}, name="esp"'
    assert script[6] == f'start=69632, size=4194304, type={bootdisk.GPT_LINUX_FS}, name="root"'
    with pytest.raises(UsageError, match="root filesystem size"):
        bootdisk.Layout(1000).sfdisk_script("x")


def test_grub_cfg() -> None:
    cfg = bootdisk.grub_cfg(kernel_release=RELEASE, rootfs_uuid=UUID,
                            default_cmdline=f"root=UUID={UUID} rw console=ttyS0")
    assert f"search --no-floppy --fs-uuid --set=root {UUID}" in cfg
    assert f"linux /boot/vmlinuz-{RELEASE} $nestbed_cmdline" in cfg
    assert f"initrd /boot/initrd.img-{RELEASE}" in cfg
    assert f"set nestbed_cmdline='root=UUID={UUID} rw console=ttyS0'" in cfg
    assert "smbios --type 1 --get-string 7 --set nestbed_smbios" in cfg
    assert "regexp --set=1:nestbed_cmdline '^nestbed:(.*)$'" in cfg
    assert cfg.rstrip().endswith("boot")
    with pytest.raises(UsageError, match="kernel_release"):
        bootdisk.grub_cfg(kernel_release="6.1; reboot", rootfs_uuid=UUID, default_cmdline="")
    with pytest.raises(UsageError, match="single quote"):
        bootdisk.grub_cfg(kernel_release=RELEASE, rootfs_uuid=UUID, default_cmdline="a='b'")


def test_memdisk_tar_holds_grub_cfg() -> None:
    with tarfile.open(fileobj=io.BytesIO(bootdisk.memdisk_tar("echo hi\n"))) as tar:
        assert tar.getnames() == ["boot", "boot/grub", "boot/grub/grub.cfg"]
        f = tar.extractfile("boot/grub/grub.cfg")
        assert f is not None and f.read() == b"echo hi\n"


def test_smbios_args_double_commas() -> None:
    assert bootdisk.smbios_args("console=ttyS0 a=1,2") == ("-smbios", "type=1,serial=nestbed:console=ttyS0 a=1,,2")
    with pytest.raises(UsageError, match="newline"):
        bootdisk.smbios_args("a\nb")


def _fake_boot_img() -> bytes:
    boot = bytearray(512)
    boot[0x66:0x68] = b"\xeb\x05"  # boot.S's "jmp 3f" at the drive check
    boot[0x1BC:0x1C0] = b"CODE"  # floppy-only code that the partition table overwrites
    return bytes(boot)


def _fake_core(sectors: int) -> bytes:
    core = bytearray(sectors * 512 - 100)  # not a whole number of sectors: padded
    struct.pack_into("<QHH", core, 0x1F4, 2, sectors - 1, 0x820)  # grub-mkimage's defaults
    return bytes(core)


def _mbr() -> bytes:
    mbr = bytearray(512)
    mbr[0x1B8:0x1BC] = b"SIGN"
    mbr[0x1BE:0x1CE] = b"\x00\x00\x02\x00\xee" + b"\xff" * 11  # protective MBR entry
    mbr[510:512] = b"\x55\xaa"
    return bytes(mbr)


def test_embed_bios_core() -> None:
    new_mbr, core = bootdisk.embed_bios_core(_mbr(), _fake_boot_img(), _fake_core(300), 2048)
    assert len(new_mbr) == 512 and len(core) == 300 * 512
    assert new_mbr[0x1B8:] == _mbr()[0x1B8:]  # signature and partition table kept
    assert struct.unpack_from("<Q", new_mbr, 0x5C)[0] == 2048
    assert new_mbr[0x66:0x68] == b"\x90\x90"
    assert struct.unpack_from("<QHH", core, 0x1F4) == (2049, 299, 0x820)


def test_embed_bios_core_refuses_nonsense() -> None:
    with pytest.raises(UsageError, match="0x55AA"):
        bootdisk.embed_bios_core(bytes(512), _fake_boot_img(), _fake_core(3), 2048)
    with pytest.raises(UsageError, match="blocklist"):
        bootdisk.embed_bios_core(_mbr(), _fake_boot_img(), bytes(3 * 512), 2048)
    with pytest.raises(UsageError, match="drive-check"):
        bootdisk.embed_bios_core(_mbr(), bytes(512), _fake_core(3), 2048)


@setup_installs(Path("/usr/lib/grub/i386-pc/boot.img").is_file(), "grub-pc-bin")
def test_real_boot_img_matches_the_offsets() -> None:
    boot = Path("/usr/lib/grub/i386-pc/boot.img").read_bytes()
    assert boot[0x66] == 0xEB and boot[0x64] == 0xFF  # jmp at the drive check; boot drive "from BIOS"
    new_mbr, _ = bootdisk.embed_bios_core(_mbr(), boot, _fake_core(2), 2048)
    assert new_mbr[:0x5C] == boot[:0x5C]


@pytest.mark.parametrize(("arch", "firmware", "platform"), [
    (Arch.X86_64, Firmware.BIOS, "i386-pc"), (Arch.I386, Firmware.BIOS, "i386-pc"),
    (Arch.X86_64, Firmware.UEFI, "x86_64-efi"), (Arch.I386, Firmware.UEFI, "i386-efi"),
    (Arch.I386, Firmware.UEFI32, "i386-efi"), (Arch.X86_64, Firmware.UEFI32, "i386-efi"),
])
def test_loader_for(arch: Arch, firmware: Firmware, platform: str) -> None:
    loader = bootdisk.loader_for(arch, firmware)
    assert loader.platform == platform and loader in bootdisk.LOADERS[arch]


# -- spec_for / firmware_spec ---------------------------------------------------------------

def _fake_image(tmp_path: Path, name: str = "debian-x86_64") -> Image:
    recipe = parse_recipe(Path(__file__).resolve().parent.parent / "images" / f"{name}.toml")
    d = tmp_path / name
    d.mkdir()
    for f in ("vmlinuz", "initrd.img", "disk.qcow2"):
        (d / f).write_bytes(b"")
    (d / "manifest.json").write_text(json.dumps({
        "name": name, "files": {"kernel": "vmlinuz", "initrd": "initrd.img", "disk": "disk.qcow2"},
        "kernel_release": RELEASE, "rootfs_uuid": UUID,
        "append": [f"root=UUID={UUID}", "rw", "init=/sbin/nestbed-init"],
        "host_keys": {"ssh-ed25519": "ssh-ed25519 AAAA"}}))
    return Image(recipe, d)


needs_ovmf = setup_installs(OVMF[64].code.is_file() and OVMF[32].code.is_file(), "ovmf / ovmf-ia32")


@needs_ovmf
@pytest.mark.parametrize("firmware", ["bios", "uefi", "uefi32"])
def test_spec_for_a_firmware_boot(tmp_path: Path, firmware: str) -> None:
    image = _fake_image(tmp_path)
    direct = spec_for(image, BootOptions(accel=Accel.TCG, append="extra=1"), "tok123")
    spec = spec_for(image, BootOptions(accel=Accel.TCG, firmware=firmware, append="extra=1"), "tok123")
    assert spec.firmware is Firmware(firmware)
    assert spec.kernel is None and spec.initrd is None and spec.append == ""
    disk = bootdisk.boot_disk(image)
    assert spec.drives == (Drive(disk.path, DiskFormat.RAW, snapshot=True, serial="nestbed-root", bootindex=0),)
    # GRUB gets exactly the command line a direct boot passes with -append.
    assert spec.extra_args[:2] == bootdisk.smbios_args(direct.append)
    assert "nestbed.token=tok123" in direct.append and "extra=1" in direct.append
    argv = build_argv(resolve_ports(spec, [2222]), EP)
    assert "-kernel" not in argv and "-append" not in argv
    assert _opt(argv, "-smbios") == [bootdisk.smbios_args(direct.append)[1]]
    assert spec.nics == direct.nics  # SSH forward as usual


@needs_ovmf
def test_spec_for_firmware_refuses_kernel_and_root_disk(tmp_path: Path) -> None:
    image = _fake_image(tmp_path)
    kernel = tmp_path / "k"
    kernel.write_bytes(b"")
    with pytest.raises(UsageError, match="no kernel or root_disk"):
        spec_for(image, BootOptions(accel=Accel.TCG, firmware="uefi", kernel=kernel), "t")
    with pytest.raises(UsageError, match="no kernel or root_disk"):
        spec_for(image, BootOptions(accel=Accel.TCG, firmware="bios", root_disk=Drive(kernel)), "t")


def test_spec_for_firmware_refuses_a_tiny_image(tmp_path: Path) -> None:
    image = _fake_image(tmp_path, "tiny-x86_64")
    with pytest.raises(UsageError, match="only Debian images"):
        spec_for(image, BootOptions(accel=Accel.TCG, firmware="bios"), "t")


def test_boot_disk_of_an_unbuilt_image(tmp_path: Path) -> None:
    image = _fake_image(tmp_path)
    image.manifest_path.unlink()
    with pytest.raises(ImageNotBuilt):
        bootdisk.boot_disk(image)


def test_prepare_refuses_bad_names_and_l2(tmp_path: Path) -> None:
    image = _fake_image(tmp_path)
    with pytest.raises(UsageError, match="firmware 'efi': not one of bios, uefi, uefi32"):
        bootdisk.prepare(image, BootOptions(firmware="efi"))
    with pytest.raises(CapabilityMissing, match="inside an L1"):
        bootdisk.prepare(image, BootOptions(firmware="uefi"), host=object())


def test_check_firmware_names_the_missing_package(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from harness.vm import spec as spec_mod

    monkeypatch.setitem(spec_mod.OVMF, 32, spec_mod.Ovmf(tmp_path / "nope.fd", tmp_path / "v.fd", smm=True, bits=32))
    with pytest.raises(SetupMissing, match=r"install Debian's ovmf-ia32 \(sudo apt-get install ovmf-ia32\)"):
        bootdisk.check_firmware(Arch.I386, Firmware.UEFI)
    bootdisk.check_firmware(Arch.I386, Firmware.BIOS)  # SeaBIOS needs nothing


# -- a real build, from a synthetic image ----------------------------------------------------

TOOLS = ("grub-mkimage", "sfdisk", "mkfs.vfat", "mcopy", "mdir", "qemu-img", "mke2fs")
needs_tools = setup_installs(
    all(shutil.which(t) for t in TOOLS) and all(
        (Path("/usr/lib/grub") / p / "moddep.lst").is_file() for p in ("i386-pc", "x86_64-efi", "i386-efi")),
    "a boot-disk tool (grub-pc-bin grub-efi-amd64-bin grub-efi-ia32-bin mtools dosfstools fdisk)")


def _synthetic_image(tmp_path: Path) -> Image:
    """A Debian-shaped image whose root filesystem is an 8 MiB ext4 with a fake /boot."""
    image = _fake_image(tmp_path)
    fake_debian_root(tmp_path, image.dir / "disk.qcow2")
    return image


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("NESTBED_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@needs_tools
def test_build_a_boot_disk(tmp_path: Path, cache: Path) -> None:
    image = _synthetic_image(tmp_path)
    disk = bootdisk.build(image)
    assert disk.built and disk.path.parent == image.dir
    info = disk.info
    assert set(info["loaders"]) == {"bios", "uefi", "uefi32"}
    assert info["loaders"]["uefi"]["path"] == "/EFI/BOOT/BOOTX64.EFI"

    # The partition table, as sfdisk reads it back.
    table = json.loads(subprocess.run(["sfdisk", "-J", str(disk.path)], capture_output=True, text=True, check=True,
                                      timeout=30).stdout)["partitiontable"]
    assert table["label"] == "gpt"
    assert [(p["start"], p["size"], p["type"], p["name"]) for p in table["partitions"]] == [
        (2048, 2048, bootdisk.GPT_BIOS_BOOT, "bios-boot"), (4096, 65536, bootdisk.GPT_ESP, "esp"),
        (69632, 16384, bootdisk.GPT_LINUX_FS, "root")]

    data = disk.path.read_bytes()
    # boot.img in the MBR points at core.img in the BIOS boot partition, whose blocklist points on.
    assert data[510:512] == b"\x55\xaa" and struct.unpack_from("<Q", data, 0x5C)[0] == 2048
    core = (Path("/usr/lib/grub/i386-pc/boot.img")).read_bytes()
    assert data[:0x5C] == core[:0x5C]
    start, length, _ = struct.unpack_from("<QHH", data, bootdisk.BIOS_BOOT_START + 0x1F4)
    assert start == 2049 and length == -(-info["loaders"]["bios"]["bytes"] // 512) - 1

    # The root partition is the image's filesystem, byte for byte.
    root = subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(image.dir / "disk.qcow2"),
                           str(tmp_path / "back.raw")], check=True, timeout=60)
    assert root.returncode == 0
    assert data[bootdisk.ROOT_START:bootdisk.ROOT_START + 8 * bootdisk.MiB] == (tmp_path / "back.raw").read_bytes()

    # The ESP holds both EFI loaders (mtools reads it at its offset: no mount).
    env = {**os.environ, "MTOOLS_SKIP_CHECK": "1"}
    listing = subprocess.run(["mdir", "-b", "-i", f"{disk.path}@@{bootdisk.ESP_START}", "::/EFI/BOOT"],
                             capture_output=True, text=True, check=True, timeout=30, env=env).stdout
    assert "BOOTX64.EFI" in listing and "BOOTIA32.EFI" in listing

    # Cached: a second build is a stat, not a rebuild.
    mtime = disk.path.stat().st_mtime_ns
    started = time.monotonic()
    again = bootdisk.build(image)
    assert time.monotonic() - started < 1.0
    assert again.path == disk.path and disk.path.stat().st_mtime_ns == mtime

    # A rebuilt image (new manifest) gets a new disk; the old one is removed.
    manifest = json.loads(image.manifest_path.read_text())
    image.manifest_path.write_text(json.dumps({**manifest, "built_at": "later"}))
    newer = bootdisk.build(image)
    assert newer.path != disk.path and newer.built and not disk.path.exists() and not disk.info_path.exists()


@needs_tools
def test_a_failed_build_leaves_nothing_that_looks_built(tmp_path: Path, cache: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    image = _synthetic_image(tmp_path)
    real = bootdisk.run_step

    def failing(argv: list[str], **kw: object) -> object:
        if argv[0] == "mcopy":
            raise ImageBuildError("mcopy: injected failure")
        return real(argv, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(bootdisk, "run_step", failing)
    with pytest.raises(ImageBuildError, match="injected"):
        bootdisk.build(image)
    assert not bootdisk.boot_disk(image).built
    assert not list(image.dir.glob("bootdisk-*"))
    assert [p.name for p in image.dir.glob(".bootdisk-*") if not p.name.endswith(".lock")] == []
