"""Reading OVF descriptors and OVAs (harness.images.ovf): every hardware mapping, and every refusal of a bad
or hostile appliance as one line naming the file, with nothing written outside the extraction directory."""

from __future__ import annotations

import gzip
import os
import tarfile
from pathlib import Path

import pytest
from ovfdata import CPU, DISK, DISK_BYTES, MEMORY, NIC, SCSI, envelope, item, manifest, ova, special, tar_bytes

from harness.errors import OvfError, UsageError
from harness.images import ovf


def _ovf_dir(tmp_path: Path, xml: bytes, *, disk: bytes | None = DISK_BYTES, mf: bytes | None = None) -> Path:
    """An .ovf with its disk beside it (and a manifest, if given)."""
    d = tmp_path / "unpacked"
    d.mkdir(exist_ok=True)
    (d / "appliance.ovf").write_bytes(xml)
    if disk is not None:
        (d / "disk1.vmdk").write_bytes(disk)
    if mf is not None:
        (d / "appliance.mf").write_bytes(mf)
    return d / "appliance.ovf"


def _load(tmp_path: Path, xml: bytes) -> ovf.Appliance:
    return ovf.load(_ovf_dir(tmp_path, xml), workdir=tmp_path)


def _refused(path: Path, match: str, workdir: Path | None = None) -> OvfError:
    work = workdir or path.parent / "work"
    work.mkdir(exist_ok=True)
    before = _tree(path.parent)
    with pytest.raises(OvfError, match=match) as info:
        ovf.load(path, workdir=work)
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith(str(path)), msg  # one line, naming the file
    assert _tree(path.parent) - before <= {str(work)}, "something was written outside the workdir"
    assert not list(work.iterdir()), "a refused load left files in the workdir"
    return info.value


def _tree(root: Path) -> set[str]:
    return {str(p) for p in root.rglob("*")}


# -- the hardware mappings -----------------------------------------------------------------------

@pytest.mark.parametrize(("rtype", "sub", "device", "substituted"), [
    ("5", "", "ide", False),
    ("5", "PIIX4", "ide", False),
    ("6", "lsilogic", "lsi53c895a", False),
    ("6", "lsilogicsas", "mptsas1068", False),
    ("6", "VirtualSCSI", "pvscsi", False),
    ("6", "buslogic", "lsi53c895a", True),
    ("6", "VirtioSCSI", "virtio-scsi", False),
    ("6", "", "lsi53c895a", True),
    ("20", "AHCI", "ahci", False),
    ("20", "vmware.sata.ahci", "ahci", False),
    ("1", "vmware.sata.ahci", "ahci", False),
    ("20", "vmware.nvme.controller", "nvme", False),
], ids=lambda v: str(v) or "none")
def test_controllers(tmp_path: Path, rtype: str, sub: str, device: str, substituted: bool) -> None:
    ctrl = item(rtype, "3", sub=sub or None, name="ctrl0")
    app = _load(tmp_path, envelope((CPU, MEMORY, ctrl, DISK, NIC)))
    assert [d.controller for d in app.disks] == [device]
    assert device in ovf.CONTROLLERS
    assert bool([s for s in app.substitutions if s.startswith("controller 'ctrl0'")]) == substituted
    if sub.lower() == "buslogic":
        assert "controller 'ctrl0' (buslogic) → lsi53c895a: QEMU has no BusLogic emulation" in app.substitutions


@pytest.mark.parametrize(("sub", "model"), [
    ("E1000", "e1000"), ("E1000e", "e1000e"), ("VmxNet3", "vmxnet3"), ("PCNet32", "pcnet"), ("virtio", "virtio-net-pci"),
    ("VirtioNet", "virtio-net-pci"), ("Foo", "e1000"), ("VmxNet2", "vmxnet3"),
])
def test_nics(tmp_path: Path, sub: str, model: str) -> None:
    nic = item("10", "5", sub=sub, name="Network adapter 1")
    app = _load(tmp_path, envelope((CPU, MEMORY, SCSI, DISK, nic)))
    assert app.nics == (model,)
    if sub == "Foo":
        assert app.substitutions == ("NIC 'Network adapter 1' → e1000: QEMU has no Foo",)
    elif sub == "VmxNet2":
        assert app.substitutions and "vmxnet3" in app.substitutions[0]
    else:
        assert app.substitutions == ()


def test_two_nics_and_none(tmp_path: Path) -> None:
    nics = (item("10", "5", sub="VmxNet3"), item("10", "6", sub="E1000"))
    assert _load(tmp_path, envelope((CPU, MEMORY, SCSI, DISK, *nics))).nics == ("vmxnet3", "e1000")
    assert _load(tmp_path, envelope((CPU, MEMORY, SCSI, DISK))).nics == ()


@pytest.mark.parametrize(("qty", "units", "mb"), [
    ("512", "byte * 2^20", 512), ("2", "byte * 2^30", 2048), ("2", "byte*2^30", 2048), ("256", "MegaBytes", 256),
    ("536870912", "byte", 512), ("1048576", "KiloBytes", 1024), ("1", "GigaBytes", 1024), ("768", None, 768),
])
def test_memory_allocation_units(tmp_path: Path, qty: str, units: str | None, mb: int) -> None:
    mem = item("4", "2", qty=qty, units=units)
    assert _load(tmp_path, envelope((CPU, mem, SCSI, DISK))).memory_mb == mb


def test_cpus_name_capacity_and_format(tmp_path: Path) -> None:
    app = _load(tmp_path, envelope((item("3", "1", qty="4"), MEMORY, SCSI, DISK), name="web-1",
                                   capacity="8", disk_attrs=' ovf:capacityAllocationUnits="byte * 2^30"'))
    assert (app.name, app.vcpus, app.memory_mb) == ("web-1", 4, 1024)
    assert app.disks[0].capacity_bytes == 8 << 30 and app.disks[0].format == "vmdk"
    assert app.manifest is None and app.firmware == "bios"


@pytest.mark.parametrize(("hw_extra", "vs_extra", "firmware"), [
    ('<vmw:Config ovf:required="false" vmw:key="firmware" vmw:value="efi"/>', "", "uefi"),
    ('<vmw:Config ovf:required="false" vmw:key="firmware" vmw:value="bios"/>', "", "bios"),
    ("", '<vbox:Machine><Hardware><Firmware type="EFI"/></Hardware></vbox:Machine>', "uefi"),
    ("", '<vbox:Machine><Hardware><Firmware type="BIOS"/></Hardware></vbox:Machine>', "bios"),
    ("", "", "bios"),
], ids=["vmw-efi", "vmw-bios", "vbox-efi", "vbox-bios", "none"])
def test_firmware(tmp_path: Path, hw_extra: str, vs_extra: str, firmware: str) -> None:
    assert _load(tmp_path, envelope(hw_extra=hw_extra, vs_extra=vs_extra)).firmware == firmware


def test_disk_without_parent_goes_on_ide_and_cdroms_are_left_out(tmp_path: Path) -> None:
    disk = item("17", "4", host="ovf:/disk/vmdisk1", name="orphan")
    cd = item("15", "7", name="CD/DVD drive 1", parent="3")
    app = _load(tmp_path, envelope((CPU, MEMORY, SCSI, disk, cd)))
    assert app.disks[0].controller == "ide"
    assert any("orphan" in s for s in app.substitutions)
    assert "CD/DVD drive 'CD/DVD drive 1': not attached" in ovf.describe(tmp_path / "unpacked" / "appliance.ovf")[
        "ignored"]


def test_deployment_option_picks_the_default_configuration(tmp_path: Path) -> None:
    options = ('<DeploymentOptionSection><Info>sizes</Info><Configuration ovf:id="small"><Label>s</Label>'
               '</Configuration><Configuration ovf:id="large" ovf:default="true"><Label>l</Label></Configuration>'
               '</DeploymentOptionSection>')
    cpus = (item("3", "1", qty="1", attrs=' ovf:configuration="small"'),
            item("3", "1", qty="8", attrs=' ovf:configuration="large"'))
    app = _load(tmp_path, envelope((*cpus, MEMORY, SCSI, DISK), extra_top=options))
    assert app.vcpus == 8


def test_ova_with_sha256_manifest_is_extracted_into_workdir(tmp_path: Path) -> None:
    src = ova(tmp_path / "a.ova")
    work = tmp_path / "work"
    work.mkdir()
    app = ovf.load(src, workdir=work)
    assert app.source == src and app.manifest == "sha256 verified (2 files)"
    assert app.disks[0].path == work / "disk1.vmdk" and app.disks[0].path.read_bytes() == DISK_BYTES
    assert sorted(p.name for p in work.iterdir()) == ["appliance.mf", "appliance.ovf", "disk1.vmdk"]
    assert (app.name, app.vcpus, app.memory_mb, app.nics) == ("appliance", 2, 1024, ("e1000",))


def test_ova_with_sha1_manifest(tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    assert ovf.load(ova(tmp_path / "a.ova", alg="SHA1"), workdir=work).manifest == "sha1 verified (2 files)"


def test_ova_without_manifest_and_a_dot_slash_name(tmp_path: Path) -> None:
    src = tmp_path / "a.ova"
    src.write_bytes(tar_bytes([("./appliance.ovf", envelope()), ("./disk1.vmdk", DISK_BYTES)]))
    work = tmp_path / "work"
    work.mkdir()
    app = ovf.load(src, workdir=work)
    assert app.manifest is None and app.disks[0].path == work / "disk1.vmdk"


def test_ovf_beside_its_disks_writes_nothing(tmp_path: Path) -> None:
    xml = envelope()
    path = _ovf_dir(tmp_path, xml, mf=manifest({"appliance.ovf": xml, "disk1.vmdk": DISK_BYTES}))
    work = tmp_path / "work"
    work.mkdir()
    app = ovf.load(path, workdir=work)
    assert app.disks[0].path == path.parent / "disk1.vmdk" and not list(work.iterdir())
    assert app.manifest == "sha256 verified (2 files)"


def test_describe_reads_in_place(tmp_path: Path) -> None:
    src = ova(tmp_path / "a.ova")
    d = ovf.describe(src)
    assert d["kind"] == "ova" and d["manifest"] == "sha256 verified (2 files)"
    disk = d["disks"][0]
    with open(src, "rb") as f:
        f.seek(disk["offset"])
        assert f.read(disk["file_size"]) == DISK_BYTES
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.ova"]
    assert ovf.is_appliance(src) and not ovf.is_appliance(Path(__file__))


# -- refusals --------------------------------------------------------------------------------------

BILLION_LAUGHS = """<!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
<!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
<!ENTITY lol9 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">]>"""


def test_billion_laughs_is_refused(tmp_path: Path) -> None:
    xml = envelope(name="&lol9;", prolog=BILLION_LAUGHS)
    _refused(ova(tmp_path / "a.ova", ovf=xml), "DTD")
    _refused(_ovf_dir(tmp_path, xml), "entity expansion")


def test_external_entity_is_refused(tmp_path: Path) -> None:
    xml = envelope(name="&x;", prolog='<!DOCTYPE e [<!ENTITY x SYSTEM "file:///etc/passwd">]>')
    _refused(ova(tmp_path / "a.ova", ovf=xml), "refused")


def test_internal_entity_without_doctype_is_not_xml(tmp_path: Path) -> None:
    _refused(ova(tmp_path / "a.ova", ovf=envelope(name="&undefined;")), "not well-formed XML")


@pytest.mark.parametrize(("member", "match"), [
    (("../evil", b"x"), "would escape the extraction directory"),
    (("sub/../../evil", b"x"), "would escape the extraction directory"),
    (("/tmp/evil", b"x"), "is an absolute path"),
    (("sub/file", b"x"), "not a plain file name"),
    (special("link", tarfile.SYMTYPE, "/etc/passwd"), "is a symbolic link"),
    (special("disk1.vmdk.lnk", tarfile.LNKTYPE, "disk1.vmdk"), "is a hard link"),
    (special("dev", tarfile.CHRTYPE), "a device or FIFO"),
    (special("fifo", tarfile.FIFOTYPE), "a device or FIFO"),
    (special("dir", tarfile.DIRTYPE), "is a directory"),
    (("README", b"hello"), "not the descriptor, manifest, certificate or a file"),
    (("disk1.vmdk", DISK_BYTES), "appears twice"),
], ids=["dotdot", "dotdot-deep", "absolute", "subdir", "symlink", "hardlink", "chardev", "fifo", "dir", "unlisted",
        "duplicate"])
def test_bad_members_are_refused(tmp_path: Path, member: tarfile.TarInfo | tuple[str, bytes], match: str) -> None:
    src = ova(tmp_path / "a.ova", alg=None, extra=[member])
    _refused(src, match)
    assert not (tmp_path / "evil").exists() and not Path("/tmp/evil").exists()


@pytest.mark.parametrize("alg", ["SHA1", "SHA256"])
def test_digest_mismatch_is_refused(tmp_path: Path, alg: str) -> None:
    good = envelope()
    mf = manifest({"appliance.ovf": good, "disk1.vmdk": DISK_BYTES + b"tampered"}, alg)
    src = ova(tmp_path / "a.ova", mf=mf)
    err = _refused(src, f"digest mismatch: {alg} of 'disk1.vmdk'")
    assert not (tmp_path / "work" / "disk1.vmdk").exists()
    assert "digest mismatch" in err.reason
    # the descriptor itself is covered too
    mf = manifest({"appliance.ovf": good + b" ", "disk1.vmdk": DISK_BYTES}, alg)
    _refused(ova(tmp_path / "b.ova", mf=mf), f"digest mismatch: {alg} of 'appliance.ovf'")


def test_digest_mismatch_beside_an_ovf(tmp_path: Path) -> None:
    xml = envelope()
    path = _ovf_dir(tmp_path, xml, mf=manifest({"appliance.ovf": xml, "disk1.vmdk": b"other"}))
    _refused(path, "digest mismatch: SHA256 of 'disk1.vmdk'")


def test_file_missing_from_the_manifest_is_refused(tmp_path: Path) -> None:
    src = ova(tmp_path / "a.ova", mf=manifest({"appliance.ovf": envelope()}))
    _refused(src, "the manifest has no digest for 'disk1.vmdk'")


@pytest.mark.parametrize(("mf", "match"), [
    (b"MD5(disk1.vmdk)= d41d8cd98f00b204e9800998ecf8427e\n", "is not SHA1, SHA256 or SHA512"),
    (b"SHA256(disk1.vmdk)= abcd\n", "has 4 hex digits"),
    (b"garbage\n", "is not 'ALG\\(file\\)= hex'"),
    (b"", "the manifest is empty"),
])
def test_bad_manifests(tmp_path: Path, mf: bytes, match: str) -> None:
    _refused(ova(tmp_path / "a.ova", mf=mf), match)


def test_missing_disk_file(tmp_path: Path) -> None:
    src = tmp_path / "a.ova"
    src.write_bytes(tar_bytes([("appliance.ovf", envelope())]))
    _refused(src, "missing file 'disk1.vmdk': the OVF references it, it is not in the OVA")
    _refused(_ovf_dir(tmp_path, envelope(), disk=None), "missing file 'disk1.vmdk'.*beside appliance.ovf")


@pytest.mark.parametrize("where", ["disk-header", "mid-header", "mid-data", "before-end-marker"])
def test_truncated_tar(tmp_path: Path, where: str) -> None:
    full = ova(tmp_path / "full.ova", disk=DISK_BYTES * 10)
    with tarfile.open(full) as tar:
        disk = tar.getmember("disk1.vmdk")
    end = disk.offset_data + -(-disk.size // 512) * 512
    cut = {"disk-header": disk.offset, "mid-header": disk.offset + 100, "mid-data": disk.offset_data + 700,
           "before-end-marker": end}[where]
    src = tmp_path / "a.ova"
    src.write_bytes(full.read_bytes()[:cut])
    _refused(src, "truncated tar")


def test_truncated_in_the_middle_of_the_disk(tmp_path: Path) -> None:
    data = ova(tmp_path / "full.ova", disk=DISK_BYTES * 10).read_bytes()
    src = tmp_path / "a.ova"
    src.write_bytes(data[:len(data) - 10240 - 3000])
    _refused(src, "truncated tar: member 'disk1.vmdk' needs")


def test_compressed_ova_is_refused(tmp_path: Path) -> None:
    data = ova(tmp_path / "plain.ova").read_bytes()
    src = tmp_path / "a.ova"
    src.write_bytes(gzip.compress(data))
    _refused(src, "not an uncompressed tar")


def test_size_other_than_declared_is_refused(tmp_path: Path) -> None:
    _refused(ova(tmp_path / "a.ova", ovf=envelope(size=len(DISK_BYTES) + 1)), "the OVF declares")


def test_over_the_cap_and_over_the_free_space(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = ova(tmp_path / "a.ova")
    monkeypatch.setattr(ovf, "MAX_FILE", 100)
    _refused(src, "over the 100-byte cap")
    monkeypatch.undo()

    class Usage:
        free = 1000

    monkeypatch.setattr(ovf.shutil, "disk_usage", lambda _p: Usage)
    _refused(src, "too large: extracting needs")


def test_huge_descriptor_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ovf, "MAX_DESCRIPTOR", 1000)
    _refused(ova(tmp_path / "a.ova"), "over the 1000-byte cap")


@pytest.mark.parametrize(("ctrl", "match"), [
    (item("6", "3", sub="FancySCSI", name="scsi0"), "unsupported hardware: SCSI controller 'scsi0' of type 'FancySCSI'"),
    (item("20", "3", sub="weird.sata", name="sata0"), "unsupported hardware: SATA controller 'sata0'"),
    (item("23", "3", name="USB controller"), "unsupported hardware: disk 'Hard disk 1' sits on controller '3'"),
    (item("7", "3", name="FC HBA"), "unsupported hardware: 'FC HBA'"),
])
def test_unsupported_controllers(tmp_path: Path, ctrl: str, match: str) -> None:
    _refused(_ovf_dir(tmp_path, envelope((CPU, MEMORY, ctrl, DISK))), match)


@pytest.mark.parametrize(("xml", "match"), [
    (b"this is not xml", "not well-formed XML"),
    (b"<?xml version='1.0'?><html/>", "not an OVF <Envelope>"),
    (b"<?xml version='1.0' encoding='aTF-8'?><Envelope/>", "not readable XML.*unknown encoding"),
    (envelope((CPU, SCSI, DISK)), "names no memory"),
    (envelope((item("3", "1", qty="0"), MEMORY, SCSI, DISK)), "CPU count: 0 is outside"),
    (envelope((CPU, item("4", "2", qty="1", units="byte * 3^2"), SCSI, DISK)), "allocation units"),
    (envelope((CPU, item("4", "2", qty="1", units="furlongs"), SCSI, DISK)), "allocation units"),
    (envelope((CPU, item("4", "2", qty="lots"), SCSI, DISK)), "not a whole number"),
    (envelope(href="../../etc/passwd"), "outside the extraction directory|not a plain file name"),
    (envelope(href="/etc/passwd"), "absolute path|not a plain file name"),
    (envelope(href="http://example.com/disk1.vmdk"), "is a URL"),
    (envelope(capacity="99999999999999999999"), "over the"),
    (envelope((CPU, MEMORY, SCSI, item("17", "4", parent="3", host="ovf:/disk/nope"))), "not in the DiskSection"),
    (envelope(href="disk1.bin").replace(b'ovf:format="http://www.vmware.com/interfaces/specifications/vmdk.html'
                                        b'#streamOptimized"', b'ovf:format="urn:weird"'), "unsupported disk format"),
], ids=["not-xml", "not-ovf", "unknown-encoding", "no-memory", "zero-cpus", "units", "nan", "furlongs", "dotdot-href",
        "abs-href", "url", "capacity", "dangling-disk", "format"])
def test_bad_descriptors(tmp_path: Path, xml: bytes, match: str) -> None:
    _refused(_ovf_dir(tmp_path, xml), match)


def test_compressed_file_reference_is_refused(tmp_path: Path) -> None:
    xml = envelope().replace(b'ovf:id="file1"', b'ovf:id="file1" ovf:compression="gzip"')
    _refused(_ovf_dir(tmp_path, xml), "gzip-compressed: not supported")


def test_errors_are_usage_errors_with_file_and_reason(tmp_path: Path) -> None:
    err = OvfError(tmp_path / "x.ova", "line one\nline two")
    assert isinstance(err, UsageError) and str(err) == f"{tmp_path / 'x.ova'}: line one line two"


def test_existing_symlink_in_workdir_is_replaced_not_followed(tmp_path: Path) -> None:
    src = ova(tmp_path / "a.ova")
    work = tmp_path / "work"
    work.mkdir()
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep me")
    os.symlink(victim, work / "disk1.vmdk")
    ovf.load(src, workdir=work)
    assert victim.read_bytes() == b"keep me" and not (work / "disk1.vmdk").is_symlink()
