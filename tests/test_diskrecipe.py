"""Kind ``disk`` without booting: recipe parsing and every refusal, the firmware decision, the cloud-init seed
read back with mtools, the conversion cache, and the QEMU argv of a disk boot (harness/images/disk.py, seed.py)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from harness.core import publish
from harness.errors import RecipeError, UsageError
from harness.guest import BootOptions, spec_for
from harness.images import disk, inspect, seed, store
from harness.images.recipes import Kind, find_recipe, parse_recipe
from harness.vm.spec import Accel, Chardev, Endpoints, Firmware, build_argv

EP = Endpoints(serial=Chardev(fd=5), qmp=Chardev(fd=7))
KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGw0cNfWmDIKnvZ5WhVGFYgMb3ss/rdSbnhFzZ9nVzHG test@nestbed"


@pytest.fixture(autouse=True)
def _private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NESTBED_CACHE", str(tmp_path / "cache"))


def _qemu_img(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, capture_output=True, timeout=60)


def _recipe(tmp_path: Path, body: str, name: str = "mine") -> Path:
    (tmp_path / "disk.qcow2").touch()
    p = tmp_path / f"{name}.toml"
    p.write_text('kind = "disk"\narch = "x86_64"\n' + body)
    return p


# -- parsing ----------------------------------------------------------------------------------

def test_a_disk_recipe_resolves_its_path_and_defaults(tmp_path: Path) -> None:
    r = parse_recipe(_recipe(tmp_path, 'path = "disk.qcow2"\n'))
    assert r.kind is Kind.DISK and r.path == (tmp_path / "disk.qcow2").resolve()
    assert (r.firmware, r.cloud_init, r.disk_interface, r.nic_model, r.login) == \
        ("auto", True, "virtio", "virtio-net-pci", None)


def test_an_absolute_path_stays_and_login_key_resolves(tmp_path: Path) -> None:
    r = parse_recipe(_recipe(tmp_path, f'path = "{tmp_path}/disk.qcow2"\ncloud_init = false\n'
                                       'login = { user = "admin", key = "keys/id" }\n'))
    assert r.path == tmp_path / "disk.qcow2"
    assert r.login is not None and r.login.key == tmp_path.resolve() / "keys/id" and r.login.user == "admin"


def test_a_password_is_never_shown(tmp_path: Path) -> None:
    r = parse_recipe(_recipe(tmp_path, 'path = "disk.qcow2"\nlogin = { user = "root", password = "hunter2-s3cret" }\n'))
    assert r.login is not None and r.login.password == "hunter2-s3cret"
    assert "hunter2" not in repr(r) and "hunter2" not in r.login.describe()
    assert "hunter2" not in r.digest()


REFUSALS = [
    ("", "path", "required key is missing (kind disk)"),
    ('path = ""\n', "path", "is not a file path"),
    ('path = "disk.qcow2"\nsha256 = "abc"\n', "sha256", "64 lowercase hex digits"),
    ('path = "disk.qcow2"\nfirmware = "coreboot"\n', "firmware", "not one of auto, bios, uefi, uefi32"),
    ('path = "disk.qcow2"\nformat = "iso"\n', "format", "not one of raw, qcow2"),
    ('path = "disk.qcow2"\nkernel = "linux-image-amd64"\n', "kernel", "not a key of kind disk recipes"),
    ('path = "disk.qcow2"\npackages = ["vim"]\n', "packages", "not a key of kind disk recipes"),
    ('path = "disk.qcow2"\ncloud_init = "yes"\n', "cloud_init", "must be bool, got str"),
    ('path = "disk.qcow2"\ncloud_init = false\n', "login", "cloud_init = false needs a login"),
    ('path = "disk.qcow2"\nlogin = { key = "k" }\n', "login.user", "required key is missing"),
    ('path = "disk.qcow2"\nlogin = { user = "Bad User", key = "k" }\n', "login.user", "is not a user name"),
    ('path = "disk.qcow2"\nlogin = { user = "u", key = "k", password = "p" }\n', "login", "exactly one of"),
    ('path = "disk.qcow2"\nlogin = { user = "u" }\n', "login", "exactly one of"),
    ('path = "disk.qcow2"\nlogin = { user = "u", password = "a\\nb" }\n', "login.password", "one non-empty line"),
    ('path = "disk.qcow2"\nlogin = { user = "u", pasword = "p" }\n', "login.pasword", "unknown key"),
    ('path = "disk.qcow2"\nlogin = { user = 3, key = "k" }\n', "login.user", "must be str"),
    ('path = "disk.qcow2"\nuser_data = "runcmd: [ls]"\n', "user_data", "must start with '#cloud-config'"),
    ('path = "disk.qcow2"\nuser_data = "#cloud-config\\nruncmd: [ls\\n"\n', "user_data", "not valid YAML at line"),
    ('path = "disk.qcow2"\nuser_data = "#cloud-config\\n- a\\n- b\\n"\n', "user_data", "must be a mapping, got list"),
    ('path = "disk.qcow2"\nuser_data = 3\n', "user_data", "must be str or dict"),
    ('path = "disk.qcow2"\ndisk_interface = "nvme"\n', "disk_interface", "not one of virtio, ide, sata"),
    ('path = "disk.qcow2"\nnic_model = "tulip"\n', "nic_model", "not one of virtio-net-pci, e1000"),
    ('path = "disk.qcow2"\nmemory_mb = 8\n', "memory_mb", "outside 64..65536"),
]


@pytest.mark.parametrize(("body", "key", "reason"), REFUSALS, ids=[f"{k}-{i}" for i, (_, k, _) in enumerate(REFUSALS)])
def test_every_bad_value_is_one_line_naming_file_and_key(tmp_path: Path, body: str, key: str, reason: str) -> None:
    path = _recipe(tmp_path, body)
    with pytest.raises(RecipeError) as err:
        parse_recipe(path)
    assert err.value.key == key and err.value.file == str(path), str(err.value)
    assert reason in err.value.reason, str(err.value)
    assert "\n" not in str(err.value)


def test_a_disk_key_on_another_kind_is_refused(tmp_path: Path) -> None:
    p = tmp_path / "t.toml"
    p.write_text('kind = "tiny"\narch = "x86_64"\nkernel = "linux-image-amd64"\npath = "x.qcow2"\n')
    with pytest.raises(RecipeError, match=r"t.toml: path: not a key of kind tiny recipes \(it is for kind disk\)"):
        parse_recipe(p)


def test_built_in_recipes_keep_their_digests() -> None:
    """Fields only disk recipes have are hashed only when set: no cached image of another kind is invalidated."""
    r = find_recipe("debian-x86_64")
    data = dataclasses.asdict(r)
    for k in ("file", "description", "ready_timeout", "path", "sha256", "firmware", "format", "login", "cloud_init",
              "user_data", "disk_interface", "nic_model"):
        data.pop(k)
    old = hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]
    assert r.digest() == old


# -- firmware, formats, sha256 (real small files, no boot) ------------------------------------------------

@pytest.mark.parametrize(("requested", "guess", "want"), [
    ("auto", "uefi", Firmware.UEFI), ("auto", "bios", Firmware.BIOS), ("auto", "either", Firmware.BIOS),
    ("auto", "unknown", Firmware.BIOS), ("uefi", "bios", Firmware.UEFI), ("uefi32", "unknown", Firmware.UEFI32),
])
def test_firmware_decision(requested: str, guess: str, want: Firmware) -> None:
    fw, why = disk.decide_firmware(requested, guess, "because")
    assert fw is want
    assert why == "the recipe says so" if requested != "auto" else why.startswith("auto: because")


def _gpt(path: Path, *types: str) -> None:
    with open(path, "wb") as f:
        f.truncate(8 << 20)
    rows = "".join(f"size=1M, type={t}\n" for t in types)
    subprocess.run(["sfdisk", "--no-reread", "--no-tell-kernel", "--quiet", str(path)], input=f"label: gpt\n{rows}",
                   text=True, check=True, capture_output=True, timeout=30)


def _build(tmp_path: Path, file: Path, extra: str = "") -> store.Image:
    p = tmp_path / "r.toml"
    p.write_text(f'kind = "disk"\narch = "x86_64"\npath = "{file}"\n{extra}')
    return store.build(store.image_for(parse_recipe(p)))


@pytest.mark.parametrize(("types", "fmt", "want", "why"), [
    ((inspect.GPT_ESP, "linux"), "qcow2", "uefi", "an EFI system partition (#1) and no BIOS boot partition"),
    ((inspect.GPT_BIOS_BOOT, "linux"), "vpc", "bios", "a BIOS boot partition (#1)"),
    ((inspect.GPT_BIOS_BOOT, inspect.GPT_ESP), "vhdx", "bios", "either boots, SeaBIOS is the quicker"),
    ((), "vdi", "bios", "no partition table"),
])
def test_auto_firmware_from_the_partition_table_in_any_format(tmp_path: Path, types: tuple[str, ...], fmt: str,
                                                               want: str, why: str) -> None:
    raw = tmp_path / "d.raw"
    if types:
        _gpt(raw, *types)
    else:
        raw.write_bytes(bytes(4 << 20))
    src = tmp_path / f"d.{fmt}"
    _qemu_img("convert", "-f", "raw", "-O", fmt, str(raw), str(src))
    before = src.read_bytes()
    img = _build(tmp_path, src)
    m = img.manifest
    assert (m["format"], m["firmware"]) == (fmt, want) and why in m["firmware_why"]
    assert img.disk == src and src.read_bytes() == before  # booted in place, never written


def test_a_fixed_vhd_is_opened_as_vpc(tmp_path: Path) -> None:
    raw = tmp_path / "d.raw"
    _gpt(raw, inspect.GPT_ESP)
    vhd = tmp_path / "d.vhd"
    _qemu_img("convert", "-f", "raw", "-O", "vpc", "-o", "subformat=fixed,force_size=on", str(raw), str(vhd))
    assert _build(tmp_path, vhd).manifest["format"] == "vpc"


def test_sha256_is_checked(tmp_path: Path) -> None:
    src = tmp_path / "d.raw"
    src.write_bytes(bytes(1 << 20))
    good = hashlib.sha256(src.read_bytes()).hexdigest()
    assert _build(tmp_path, src, f'sha256 = "{good}"\n').manifest["source_sha256"] == good
    with pytest.raises(RecipeError, match=rf"r.toml: sha256: .*d.raw has sha256 {good}, not 0{{64}}$"):
        _build(tmp_path, src, f'sha256 = "{"0" * 64}"\n')


def test_a_missing_or_junk_file_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match=r"r.toml: path: .*nothere.qcow2: no such file$"):
        _build(tmp_path, tmp_path / "nothere.qcow2")
    junk = tmp_path / "junk.qcow2"
    _qemu_img("create", "-f", "qcow2", str(junk), "16M")
    with open(junk, "r+b") as f:  # a qcow2 whose header says 2^40-byte clusters: qemu-img refuses it
        f.seek(20)
        f.write((40).to_bytes(4, "big"))
    with pytest.raises(UsageError) as err:
        _build(tmp_path, junk)
    assert str(junk) in str(err.value).splitlines()[0]


def test_a_changed_file_is_inspected_again(tmp_path: Path) -> None:
    src = tmp_path / "d.raw"
    src.write_bytes(bytes(2 << 20))
    img = _build(tmp_path, src)
    assert img.manifest["firmware"] == "bios" and "no partition table" in img.manifest["firmware_why"]
    _gpt(src, inspect.GPT_ESP)
    assert disk.prepare(img).manifest["firmware"] == "uefi"


# -- the conversion cache ---------------------------------------------------------------------

def test_conversion_key_is_content_and_source_format() -> None:
    a = disk.conversion_key("a" * 64, "vmdk", "streamOptimized")
    assert a == disk.conversion_key("a" * 64, "vmdk", "streamOptimized") and len(a) == 32
    assert a != disk.conversion_key("b" * 64, "vmdk", "streamOptimized")
    assert a != disk.conversion_key("a" * 64, "vmdk", "monolithicSparse")


def test_a_stream_optimized_vmdk_is_converted_once_by_content(tmp_path: Path) -> None:
    raw = tmp_path / "d.raw"
    _gpt(raw, inspect.GPT_BIOS_BOOT)
    src = tmp_path / "d.vmdk"
    _qemu_img("convert", "-f", "raw", "-O", "vmdk", "-o", "subformat=streamOptimized", str(raw), str(src))
    img = _build(tmp_path, src)
    m = img.manifest
    assert (m["source_format"], m["source_subformat"], m["format"]) == ("vmdk", "streamOptimized", "qcow2")
    sha = hashlib.sha256(src.read_bytes()).hexdigest()
    assert img.disk is not None and img.disk.name == disk.conversion_key(sha, "vmdk", "streamOptimized") + ".qcow2"
    # A copy under another name and recipe: the same content, the same converted disk, not converted again.
    copy = tmp_path / "copy" / "other.vmdk"
    copy.parent.mkdir()
    shutil.copy(src, copy)
    (tmp_path / "copy" / "r2.toml").write_text(f'kind = "disk"\narch = "x86_64"\npath = "{copy}"\n')
    again = store.build(store.image_for(parse_recipe(tmp_path / "copy" / "r2.toml")))
    assert again.disk == img.disk
    assert [j["what"] for j in publish.journal()].count("converted disk (d.vmdk)") == 1
    assert not [j for j in publish.journal() if j["what"] == "converted disk (other.vmdk)"]


# -- the seed ---------------------------------------------------------------------------------

def _mtools(*argv: str) -> str:
    env = {**os.environ, "MTOOLS_SKIP_CHECK": "1"}
    return subprocess.run(argv, check=True, capture_output=True, text=True, timeout=30, env=env).stdout


def test_seed_is_a_cidata_fat_with_key_hostname_marker_and_recipe_additions() -> None:
    extra: dict[str, Any] = {"runcmd": [["touch", "/tmp/mine"]], "packages": ["htop"], "hostname": "chosen"}
    img = seed.seed(name="My_Appliance", extra=extra, public_key=KEY)
    assert "CIDATA" in _mtools("mlabel", "-i", str(img), "-s", "::")
    assert {"meta-data", "user-data"} <= set(_mtools("mdir", "-b", "-i", str(img), "::").replace("::/", "").split())
    meta = _mtools("mcopy", "-i", str(img), "::meta-data", "-")
    assert "local-hostname: my-appliance\n" in meta and "instance-id: nestbed-" in meta
    ud = _mtools("mcopy", "-i", str(img), "::user-data", "-")
    assert ud.startswith("#cloud-config\n")
    cfg = json.loads(ud.split("\n", 1)[1])  # JSON is YAML: cloud-init reads it as cloud-config
    assert cfg["ssh_authorized_keys"] == [KEY] and cfg["disable_root"] is False
    assert cfg["hostname"] == "chosen" and cfg["packages"] == ["htop"]  # the recipe's values win
    assert cfg["runcmd"] == [["/usr/local/sbin/nestbed-ready"], ["touch", "/tmp/mine"]]  # lists: nestbed's first
    ready = next(f["content"] for f in cfg["write_files"] if f["path"] == "/usr/local/sbin/nestbed-ready")
    assert "nestbed-ready-%s" in ready and "/sys/class/dmi/id/product_serial" in ready and "/dev/ttyS0" in ready
    assert seed.seed(name="My_Appliance", extra=extra, public_key=KEY) == img  # cached by content


def test_seed_with_a_script_is_multipart_and_yaml_text_merges() -> None:
    files = seed.contents(name="x", public_key=KEY, extra="#!/bin/sh\necho hi\n")
    ud = files["user-data"]
    assert "multipart/mixed" in ud and "text/cloud-config" in ud and "text/x-shellscript" in ud and "echo hi" in ud
    files = seed.contents(name="x", public_key=KEY, extra="#cloud-config\nbootcmd:\n  - echo early\n")
    cfg = json.loads(files["user-data"].split("\n", 1)[1])
    assert cfg["bootcmd"][-1] == "echo early" and len(cfg["bootcmd"]) == 2
    assert seed.cache_key(files) != seed.cache_key(seed.contents(name="y", public_key=KEY))


def test_host_key_comes_only_from_this_boots_token() -> None:
    text = ("nestbed-hostkey-old ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOLD\n"
            "nestbed-hostkey-tok ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAINEW root@x\nnestbed-ready-tok\n")
    assert disk.host_key_from(text, "tok") == "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAINEW"
    assert disk.host_key_from(text, "other") is None
    assert disk.host_key_from("nestbed-hostkey-tok ssh-ed25519 not*base64\n", "tok") is None


# -- the argv of a disk boot --------------------------------------------------------------------

def _argv(img: store.Image, **opts: Any) -> list[str]:
    spec = spec_for(img, BootOptions(accel=Accel.TCG, **opts), "tok123")
    from harness.vm.spec import resolve_ports

    return build_argv(resolve_ports(spec, [2222]), EP)


def test_disk_boot_argv(tmp_path: Path) -> None:
    raw = tmp_path / "d.raw"
    _gpt(raw, inspect.GPT_BIOS_BOOT)
    img = _build(tmp_path, raw, 'disk_interface = "sata"\nnic_model = "e1000"\nmemory_mb = 1024\n')
    argv = _argv(img)
    assert argv[argv.index("-vga") + 1] == "std" and "-kernel" not in argv and "-append" not in argv
    assert argv[argv.index("-m") + 1] == "1024"
    assert f"file={raw},format=raw,id=drive0,if=none,snapshot=on" in argv
    assert "ide-hd,drive=drive0,bus=ahci0.0,serial=nestbed-root,bootindex=0" in argv
    assert any(a.startswith("file=") and "/seeds/seed-" in a and "snapshot=on" in a for a in argv)
    assert "type=1,serial=nestbed.token=tok123" in argv and "e1000,netdev=net0" in argv
    assert "ich9-ahci,id=ahci0" in argv
    assert "if=pflash" not in " ".join(argv)
    uefi = _argv(img, firmware="uefi")  # a boot's firmware= wins over the recipe's decision
    assert any("OVMF_CODE" in a for a in uefi)
    with pytest.raises(UsageError, match="boots by its own bootloader"):
        _argv(img, append="quiet")


def test_ide_uses_the_pc_machine_and_no_seed_without_cloud_init(tmp_path: Path) -> None:
    raw = tmp_path / "d.raw"
    _gpt(raw, inspect.GPT_BIOS_BOOT)
    img = _build(tmp_path, raw, 'disk_interface = "pvscsi"\ncloud_init = false\nlogin = { user = "u", password = "p" }\n')
    argv = _argv(img)
    assert "pvscsi,id=pvscsi0" in argv and "scsi-hd,drive=drive0,bus=pvscsi0.0,serial=nestbed-root,bootindex=0" in argv
    assert not any("seed-" in a for a in argv) and "-smbios" not in argv
    img = _build(tmp_path, raw, 'disk_interface = "ide"\n')
    assert _argv(img)[_argv(img).index("-machine") + 1] == "pc"


def test_run_takes_a_file(tmp_path: Path) -> None:
    assert disk.is_disk_file("appliance.vmdk") and disk.is_disk_file("./x") and not disk.is_disk_file("debian-x86_64")
    src = tmp_path / "My Disk.qcow2"
    _qemu_img("create", "-f", "qcow2", str(src), "16M")
    img = disk.image_for_file(src)
    assert img.recipe.kind is Kind.DISK and img.recipe.path == src.resolve() and img.name == "my-disk"
    with pytest.raises(UsageError, match="no such file"):
        disk.image_for_file(tmp_path / "gone.vmdk")


def test_every_disk_of_an_ova_is_attached_in_the_ovfs_order(tmp_path: Path) -> None:
    """A two-disk OVA: the boot disk as a monolithicSparse VMDK (booted as it is, from the image's own
    directory), a data disk as a streamOptimized one (converted once); both behind overlays, on the OVF's
    controller, in the OVF's order."""
    from ovfdata import CPU, MEMORY, NIC, OVF_NS, RASD, SCSI, VMDK_URI, item, manifest, tar_bytes

    raw = tmp_path / "boot.raw"
    _gpt(raw, inspect.GPT_BIOS_BOOT)
    _qemu_img("convert", "-f", "raw", "-O", "vmdk", str(raw), str(tmp_path / "boot.vmdk"))
    _qemu_img("create", "-f", "raw", str(tmp_path / "data.raw"), "32M")
    _qemu_img("convert", "-f", "raw", "-O", "vmdk", "-o", "subformat=streamOptimized", str(tmp_path / "data.raw"),
              str(tmp_path / "data.vmdk"))
    files = {"boot.vmdk": (tmp_path / "boot.vmdk").read_bytes(), "data.vmdk": (tmp_path / "data.vmdk").read_bytes()}
    disks = [item("17", "4", parent="3", host="ovf:/disk/d1", name="Hard disk 1"),
             item("17", "6", parent="3", host="ovf:/disk/d2", name="Hard disk 2")]
    ovf = f"""<?xml version="1.0"?>
<Envelope xmlns="{OVF_NS}" xmlns:ovf="{OVF_NS}" xmlns:rasd="{RASD}">
  <References><File ovf:href="boot.vmdk" ovf:id="f1"/><File ovf:href="data.vmdk" ovf:id="f2"/></References>
  <DiskSection><Info>disks</Info>
    <Disk ovf:capacity="8388608" ovf:diskId="d1" ovf:fileRef="f1" ovf:format="{VMDK_URI}"/>
    <Disk ovf:capacity="33554432" ovf:diskId="d2" ovf:fileRef="f2" ovf:format="{VMDK_URI}"/>
  </DiskSection>
  <VirtualSystem ovf:id="two"><Info>vm</Info><Name>two</Name>
    <VirtualHardwareSection><Info>hw</Info>{CPU}{MEMORY}{SCSI}{"".join(disks)}{NIC}</VirtualHardwareSection>
  </VirtualSystem>
</Envelope>
""".encode()
    ova = tmp_path / "two.ova"
    ova.write_bytes(tar_bytes([("two.ovf", ovf), ("two.mf", manifest({"two.ovf": ovf, **files})),
                               *files.items()]))
    img = _build(tmp_path, ova)
    m = img.manifest
    assert img.disk is not None and img.disk.is_file() and img.disk.is_relative_to(img.dir), m["files"]
    [extra] = m["hardware"]["extra_disks"]
    assert extra["format"] == "qcow2" and "/converted/" in extra["path"] and extra["interface"] == "lsi", extra
    argv = _argv(img)
    assert f"file={img.disk},format=vmdk,id=drive0,if=none,snapshot=on" in argv
    assert f"file={extra['path']},format=qcow2,id=drive1,if=none,snapshot=on" in argv
    assert "scsi-hd,drive=drive1,bus=lsi0.0,serial=nestbed-disk2" in argv, argv
    assert argv[argv.index("-smp") + 1].startswith("2") and argv[argv.index("-m") + 1] == "1024"


def test_two_versions_of_one_recipe_in_use_keep_their_builds(tmp_path: Path) -> None:
    """The store keeps a build per recipe digest while it is used: a second version of a recipe (another
    file, the same name) no longer removes the first one's build from under its user; a build unused for
    STALE_AFTER is removed when another version of the name is built."""
    a, b, c = (tmp_path / f"{n}.raw" for n in "abc")
    for f in (a, b, c):
        _gpt(f, inspect.GPT_BIOS_BOOT)
    first = _build(tmp_path, a)
    second = _build(tmp_path, b)  # the same recipe file and name, another path: another digest
    assert first.dir != second.dir and first.built and second.built
    assert store.build(first).manifest["source"] == str(a)  # still there, and marked used
    old = time.time() - store.STALE_AFTER - 60
    os.utime(first.manifest_path, (old, old))
    third = _build(tmp_path, c)
    assert not first.dir.exists() and second.built and third.built


def test_inside_an_l1_a_brought_image_needs_attaching_and_seabios(tmp_path: Path) -> None:
    from harness.nested import file_serial, own_disk_drives

    raw = tmp_path / "d.raw"
    _gpt(raw, inspect.GPT_ESP)
    img = _build(tmp_path, raw)  # auto: an ESP and no BIOS boot partition -> UEFI
    with pytest.raises(UsageError, match="was not attached to this host") as info:
        disk.check_inner(img, {}, firmware=None)
    assert "\n" not in str(info.value)
    with pytest.raises(UsageError, match=r"uefi \(auto: an EFI system partition.*the L1 image carries no OVMF"):
        disk.check_inner(img, {img.name: img}, firmware=None)
    disk.check_inner(img, {img.name: img}, firmware="bios")  # a boot's firmware= wins
    # What the L1 is given: the file in its own format and the seed, read-only, each named by a serial.
    drives = own_disk_drives(img)
    assert [(d.path, d.format.value, d.read_only) for d in drives][0] == (raw, "raw", True)
    assert "/seeds/seed-" in str(drives[1].path) and all(d.serial == file_serial(d.path) for d in drives)
    deeper = own_disk_drives(img, {str(d.path): f"/dev/vd{c}" for d, c in zip(drives, "cd", strict=True)})
    assert [(str(d.path), d.format.value) for d in deeper] == [("/dev/vdc", "raw"), ("/dev/vdd", "raw")]
