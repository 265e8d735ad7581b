"""``nestbed images export``: a built image's boot disk as OVA, VMDK, VHD, VHDX, VDI or qcow2, each the same
disk as the source (``qemu-img compare``), an OVA that ovf.load reads back (OVF 1.0, SHA256 manifest,
streamOptimized VMDK, the .ovf first), and one-line refusals of what cannot be exported."""

from __future__ import annotations

import json
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest
from conftest import FAKE_RELEASE, FAKE_ROOT_UUID, fake_debian_root, nestbed, setup_installs

from harness.errors import UsageError
from harness.images import bootdisk, export, inspect, ovf
from harness.images.recipes import parse_recipe
from harness.images.store import Image, get_image
from harness.vm.spec import Arch

RECIPES = Path(__file__).resolve().parent.parent / "images"
UUID, RELEASE = FAKE_ROOT_UUID, FAKE_RELEASE
TOOLS = ("grub-mkimage", "sfdisk", "mkfs.vfat", "mcopy", "qemu-img", "mke2fs")
needs_tools = setup_installs(
    all(shutil.which(t) for t in TOOLS) and all(
        (Path("/usr/lib/grub") / p / "moddep.lst").is_file() for p in ("i386-pc", "x86_64-efi", "i386-efi")),
    "a boot-disk tool (qemu-utils grub-pc-bin grub-efi-amd64-bin grub-efi-ia32-bin mtools dosfstools fdisk)")


def _qemu_img(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["qemu-img", *args], capture_output=True, text=True, timeout=timeout)


# -- pure: the descriptor and the manifest --------------------------------------------------------

@pytest.mark.parametrize(("firmware", "controller", "device"), [
    ("bios", "ide", "ide"), ("uefi", "ide", "ide"), ("bios", "pvscsi", "pvscsi"), ("uefi", "lsilogic", "lsi53c895a")])
def test_descriptor_reads_back(firmware: str, controller: str, device: str) -> None:
    xml = export.ovf_descriptor(name="web & <co>", arch=Arch.X86_64, debian=True, vcpus=3, memory_mb=768,
                                disk_href="web-disk1.vmdk", disk_file_size=12345, capacity_bytes=2 << 30,
                                firmware=firmware, controller=controller)
    env = ovf.read_envelope(ovf.parse_xml(xml.encode(), "x.ovf"), "x.ovf")
    assert (env.name, env.vcpus, env.memory_mb, env.firmware) == ("web & <co>", 3, 768, firmware)
    assert [(d.href, d.format, d.controller, d.capacity_bytes) for d in env.disks] == [
        ("web-disk1.vmdk", "vmdk", device, 2 << 30)]
    assert env.nics == ("e1000",) and env.substitutions == ()
    assert env.files["web-disk1.vmdk"].size == 12345
    for section in ("<References>", "<DiskSection>", "<NetworkSection>", "<VirtualSystem ", "<VirtualHardwareSection>"):
        assert section in xml


def test_bad_choices_are_one_line() -> None:
    with pytest.raises(UsageError, match="firmware 'uefi32' is not bios or uefi"):
        export.check_choices("uefi32", "ide")
    with pytest.raises(UsageError, match="controller 'floppy'"):
        export.check_choices("bios", "floppy")


def test_manifest_lines() -> None:
    assert export.manifest({"a.ovf": "ab", "b.vmdk": "cd"}) == "SHA256(a.ovf)= ab\nSHA256(b.vmdk)= cd\n"


# -- refusals -----------------------------------------------------------------------------------

def _fake(tmp_path: Path, name: str, files: dict[str, str], **manifest: object) -> Image:
    recipe = parse_recipe(RECIPES / f"{name}.toml")
    d = tmp_path / name
    d.mkdir()
    for f in files.values():
        (d / f).write_bytes(b"")
    (d / "manifest.json").write_text(json.dumps({"name": name, "files": files, **manifest}))
    return Image(recipe, d)


def test_a_tiny_image_is_refused(tmp_path: Path) -> None:
    image = _fake(tmp_path, "tiny-x86_64", {"kernel": "vmlinuz", "initrd": "initrd.img"})
    with pytest.raises(UsageError, match="is a kernel and an initramfs with no disk") as info:
        export.export(image, "ova", tmp_path / "t.ova")
    assert "\n" not in str(info.value) and not (tmp_path / "t.ova").exists()


def test_unknown_format_and_bad_output(tmp_path: Path) -> None:
    image = _fake(tmp_path, "tiny-x86_64", {"kernel": "vmlinuz"})
    with pytest.raises(UsageError, match="format 'iso' is not one of ova, vmdk"):
        export.export(image, "iso", tmp_path / "x.iso")
    with pytest.raises(UsageError, match="is a directory"):
        export.export(image, "ova", tmp_path)
    with pytest.raises(UsageError, match="does not exist"):
        export.export(image, "ova", tmp_path / "nope" / "x.ova")


def test_cli_refuses_a_tiny_image_in_one_line(tmp_path: Path) -> None:
    proc = nestbed("images", "export", "tiny-x86_64", "--format", "ova", "-o", str(tmp_path / "t.ova"), timeout=60)
    assert proc.returncode == 125
    assert proc.stderr.strip().splitlines()[-1].startswith("nestbed: error: ")
    assert len([line for line in proc.stderr.splitlines() if "error" in line]) == 1
    assert not (tmp_path / "t.ova").exists()


# -- a synthetic Debian-shaped image: every format, fast --------------------------------------------

@pytest.fixture
def synthetic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Image:
    """A Debian-shaped image whose root filesystem is an 8 MiB ext4 with a fake /boot (its boot disk is ~43 MiB)."""
    monkeypatch.setenv("NESTBED_CACHE", str(tmp_path / "cache"))
    image = _fake(tmp_path, "debian-x86_64", {"kernel": "vmlinuz", "initrd": "initrd.img", "disk": "disk.qcow2"},
                  kernel_release=RELEASE, rootfs_uuid=UUID, append=[f"root=UUID={UUID}", "rw"])
    fake_debian_root(tmp_path, image.dir / "disk.qcow2")
    return image


@needs_tools
@pytest.mark.parametrize(("fmt", "qemu_fmt", "subformat"), [
    ("vmdk", "vmdk", "monolithicSparse"), ("vhd", "vpc", None), ("vhdx", "vhdx", None), ("vdi", "vdi", None),
    ("qcow2", "qcow2", None)])
def test_every_disk_format_is_the_boot_disk(tmp_path: Path, synthetic: Image, fmt: str, qemu_fmt: str,
                                            subformat: str | None) -> None:
    out = tmp_path / f"out.{fmt}"
    said: list[str] = []
    assert export.export(synthetic, fmt, out, progress=said.append) == out
    assert any("qemu-img convert" in s for s in said)
    info = json.loads(_qemu_img("info", "-f", qemu_fmt, "--output=json", str(out)).stdout)
    boot = bootdisk.boot_disk(synthetic).path
    assert info["format"] == qemu_fmt and info["virtual-size"] == boot.stat().st_size  # vhd: force_size kept it
    if subformat:
        assert info["format-specific"]["data"]["create-type"] == subformat
    cmp = _qemu_img("compare", "-f", "raw", "-F", qemu_fmt, str(boot), str(out))
    assert cmp.returncode == 0, cmp.stdout + cmp.stderr
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".part")]


@needs_tools
@pytest.mark.parametrize("firmware", ["bios", "uefi"])
def test_ova_round_trip(tmp_path: Path, synthetic: Image, firmware: str) -> None:
    out = tmp_path / "appliance.ova"
    export.export(synthetic, "ova", out, firmware=firmware)
    with tarfile.open(out) as tar:
        members = tar.getmembers()
    assert [m.name for m in members] == ["debian-x86_64.ovf", "debian-x86_64.mf", "debian-x86_64-disk1.vmdk"]
    assert all(m.isreg() and m.mode == 0o644 for m in members)

    work = tmp_path / "work"
    work.mkdir()
    app = ovf.load(out, workdir=work)
    recipe = synthetic.recipe
    assert (app.name, app.vcpus, app.memory_mb, app.firmware) == ("debian-x86_64", recipe.vcpus, recipe.memory_mb,
                                                                  firmware)
    assert app.nics == ("e1000",) and app.substitutions == () and app.manifest == "sha256 verified (2 files)"
    (disk,) = app.disks
    boot = bootdisk.boot_disk(synthetic).path
    assert (disk.format, disk.controller, disk.capacity_bytes) == ("vmdk", "ide", boot.stat().st_size)
    info = json.loads(_qemu_img("info", "--output=json", str(disk.path)).stdout)
    assert info["format-specific"]["data"]["create-type"] == "streamOptimized"
    cmp = _qemu_img("compare", "-f", "raw", "-F", "vmdk", str(boot), str(disk.path))
    assert cmp.returncode == 0, cmp.stdout + cmp.stderr

    # what `images inspect` reads from it, in place (the disk's partition table through the tar)
    seen = inspect.inspect_file(out)
    direct = inspect.inspect_disk(boot)
    assert seen["kind"] == "ova" and seen["firmware"] == firmware
    got = seen["disks"][0]
    assert got["table"] == "gpt" and got["partitions"] == direct["partitions"]
    assert got["virtual_size"] == direct["virtual_size"] and got["subformat"] == "streamOptimized"
    assert got["firmware_guess"] == direct["firmware"]
    assert f"firmware guess from the disk: {direct['firmware']}" in inspect.render(seen)


@needs_tools
def test_cli_export_and_inspect(tmp_path: Path, synthetic: Image) -> None:
    # The CLI finds images by name in the cache: run it against the synthetic image's recipe through Python.
    out = tmp_path / "a.ova"
    export.export(synthetic, "ova", out)
    proc = nestbed("images", "inspect", "--json", str(out), timeout=120)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["manifest"] == "sha256 verified (2 files)" and doc["disks"][0]["format"] == "vmdk"
    text = nestbed("images", "inspect", str(out), timeout=120)
    assert "OVA (debian-x86_64.ovf)" in text.stdout and "manifest: sha256 verified" in text.stdout
    bad = tmp_path / "bad.ova"
    data = bytearray(out.read_bytes())
    data[-20000] ^= 0xFF  # inside the VMDK: the manifest no longer matches
    bad.write_bytes(bytes(data))
    proc = nestbed("images", "inspect", str(bad), timeout=120)
    assert proc.returncode == 125 and "digest mismatch: SHA256 of 'debian-x86_64-disk1.vmdk'" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


# -- a real built image ---------------------------------------------------------------------------

@pytest.mark.boot  # not a boot, but it needs debian-x86_64 built (a cache hit after the first run) and its boot disk
def test_export_a_built_image_as_ova(tmp_path: Path) -> None:
    image = get_image("debian-x86_64")
    if not image.built:
        pytest.skip("debian-x86_64 is not built (nestbed images build debian-x86_64)")
    out = tmp_path / "debian.ova"
    proc = nestbed("images", "export", "debian-x86_64", "--format", "ova", "-o", str(out), timeout=1800)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(out)
    work = tmp_path / "work"
    work.mkdir()
    app = ovf.load(out, workdir=work)
    boot = bootdisk.build(image).path
    assert app.disks[0].capacity_bytes == boot.stat().st_size and app.firmware == "bios"
    cmp = _qemu_img("compare", "-f", "raw", "-F", "vmdk", str(boot), str(app.disks[0].path), timeout=900)
    assert cmp.returncode == 0, cmp.stdout + cmp.stderr
