"""Disk-format chains: the pure parts (parsing, pitfall rules, manifests, JSON shape, text
rendering) with no QEMU, then real qemu-img round trips on small images (no guests: the guest
hops are scenarios, see scenarios/test_disk_formats.py)."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import setup_installs

from harness import diskfmt
from harness.diskfmt import DiskFormatError, Hop, Pitfall, parse_chain
from harness.errors import UsageError
from harness.vm.spec import DiskFormat

REPO = Path(__file__).resolve().parent.parent

# -- pure ---------------------------------------------------------------------------------------


def test_parse_chain_with_options() -> None:
    chain = parse_chain("vmdk:subformat=streamOptimized, vpc:subformat=fixed:force_size=on,qcow2:compat=0.10,raw")
    assert [h.label for h in chain] == ["vmdk:subformat=streamOptimized", "vpc:subformat=fixed:force_size=on",
                                        "qcow2:compat=0.10", "raw"]
    assert not chain[0].guest_writable and chain[1].guest_writable
    assert chain[1].qemu_options == "subformat=fixed,force_size=on" and chain[3].qemu_options == ""


def test_every_matrix_id_is_a_hop_that_round_trips_its_label() -> None:
    for fmt in diskfmt.FORMAT_MATRIX:
        (hop,) = parse_chain(fmt)
        assert hop.label == fmt
    assert {parse_chain(f)[0].format for f in diskfmt.FORMAT_MATRIX} == set(DiskFormat)


@pytest.mark.parametrize(("text", "needle"), [
    ("", "empty"),
    (" , ,", "empty"),
    ("vmdk,floppy", "hop 2 'floppy': unknown format"),
    ("vpc:subformat=sparse", "subformat must be one of dynamic, fixed"),
    ("raw:compat=1.1", "raw takes options (none)"),
    ("qcow2:compat", "as KEY=VALUE"),
    ("qcow2:preallocation=full", "qcow2 takes options cluster_size, compat"),
])
def test_parse_chain_refuses_bad_hops(text: str, needle: str) -> None:
    with pytest.raises(UsageError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        parse_chain(text)


def test_convert_argv_is_the_bare_command() -> None:
    argv = diskfmt.convert_argv(Path("/a.raw"), DiskFormat.RAW, Path("/b.vhd"), parse_chain("vpc:force_size=on")[0])
    assert argv == ["qemu-img", "convert", "-f", "raw", "-O", "vpc", "-o", "force_size=on", "/a.raw", "/b.vhd"]


@pytest.mark.parametrize(("size", "expected"), [
    (64 << 20, 67125248),  # measured with qemu-img 7.2: 64 MiB became 67,125,248 bytes
    (640 << 20, 671440896),
    (2 << 30, 2147991552),
    (1 << 20, 1079296),
    (67125248, 67125248),  # already a CHS geometry: unchanged
])
def test_vhd_chs_rule(size: int, expected: int) -> None:
    assert diskfmt.vhd_chs_size(size) == expected


def test_size_pitfalls_name_the_vhd_rule_only_for_vhd_without_force_size() -> None:
    vpc, forced, qcow = (parse_chain(t)[0] for t in ("vpc", "vpc:force_size=on", "qcow2"))
    assert diskfmt.size_pitfall(vpc, 64 << 20, 64 << 20) is None
    p = diskfmt.size_pitfall(vpc, 64 << 20, 67125248)
    assert p is not None and p.id == "vhd-chs-geometry"
    assert "67108864 -> 67125248 bytes (+16384)" in p.message and "rule predicts 67125248)" in p.message
    wrong = diskfmt.size_pitfall(vpc, 64 << 20, 67125249)
    assert wrong is not None and "NOT what qemu-img did" in wrong.message
    for hop in (forced, qcow):
        other = diskfmt.size_pitfall(hop, 1, 2)
        assert other is not None and other.id == "virtual-size-changed"


def test_probe_pitfall_says_what_the_probe_sees() -> None:
    hop = parse_chain("vpc:subformat=fixed")[0]
    assert diskfmt.probe_pitfall(hop, Path("x.vhd"), {"format": "vpc", "virtual-size": 10}, 10) is None
    p = diskfmt.probe_pitfall(hop, Path("x.vhd"), {"format": "raw", "virtual-size": 67125760}, 67125248)
    assert p == Pitfall("probes-as-other", "x.vhd probes as 'raw', not 'vpc' (read that way it is 67125760 bytes, "
                                           "+512: the container's own bytes become data): always pass the format "
                                           "explicitly")


def test_manifest_parsing() -> None:
    a, b = "a" * 64, "b" * 64
    assert diskfmt.parse_manifest(f"{a}  seed.bin\n{b} *hop01-vmdk.bin\n\n") == {"seed.bin": a, "hop01-vmdk.bin": b}
    with pytest.raises(DiskFormatError, match="manifest line 2 is not"):
        diskfmt.parse_manifest(f"{a}  seed.bin\nnot a sum\n")


def test_ext4_uuid_reads_the_superblock(tmp_path: Path) -> None:
    img = tmp_path / "fs.raw"
    data = bytearray(4096)
    data[1024 + 0x38:1024 + 0x3A] = b"\x53\xef"
    data[1024 + 0x68:1024 + 0x78] = bytes(range(16))
    img.write_bytes(bytes(data))
    assert diskfmt.ext4_uuid(img) == "00010203-0405-0607-0809-0a0b0c0d0e0f"
    img.write_bytes(bytes(4096))
    assert diskfmt.ext4_uuid(img) is None
    img.write_bytes(b"short")
    assert diskfmt.ext4_uuid(img) is None


HOP_KEYS = {"index", "hop", "format", "source", "path", "seconds", "virtual_size", "file_size", "files",
            "probed_as", "check", "compare", "reader", "reader_hash_matches", "reader_note", "readers", "sha256",
            "pitfalls", "guest", "sha256_after_guest", "verify_seconds"}
GUEST_KEYS = {"image", "writable", "ready_seconds", "manifest_verified", "wrote", "refused", "remount_ro",
              "changed", "seconds", "serial_log"}


def test_json_shape_of_hop_and_guest_records() -> None:
    """The documented keys (docs/disk-formats.md) are exactly the dataclasses' fields."""
    from dataclasses import fields
    assert {f.name for f in fields(diskfmt.HopResult)} == HOP_KEYS
    assert {f.name for f in fields(diskfmt.GuestCheck)} == GUEST_KEYS
    assert {f.name for f in fields(Pitfall)} == {"id", "message"}


def test_render_text_shows_pitfalls_guests_and_the_end() -> None:
    hop = {"index": 1, "hop": "vpc", "seconds": 1.0, "virtual_size": 67125248, "check": "unsupported",
           "compare": "identical", "readers": [{"name": "libyal pyvhdi", "sha256": "0" * 64, "matches": True}],
           "pitfalls": [{"id": "vhd-chs-geometry", "message": "grew"}],
           "guest": {"image": "debian-x86_64", "ready_seconds": 9.5, "manifest_verified": 1,
                     "wrote": {"name": "hop01-vpc.bin", "sha256": "1" * 64}, "refused": None, "remount_ro": "ok",
                     "seconds": 12.0}}
    result = {"source": "s.raw", "source_format": "raw", "virtual_size": 64 << 20, "source_check": "unsupported",
              "sha256": "f" * 64, "seeded": None, "hops": [hop],
              "final": {"files": {"seed.bin": "", "hop01-vpc.bin": ""}, "intact": True, "fsck": "clean"}}
    text = diskfmt.render_text(result)
    assert "pitfall vhd-chs-geometry: grew" in text
    assert "libyal pyvhdi same data" in text and "wrote hop01-vpc.bin" in text
    assert "final: 2 files intact" in text


# -- real qemu-img ------------------------------------------------------------------------------


@pytest.fixture
def source(tmp_path: Path) -> Path:
    path = tmp_path / "src.raw"
    with open(path, "wb") as f:
        f.write(os.urandom(4 << 20))
        f.truncate(64 << 20)  # 64 MiB: data then a sparse zero tail
    return path


def test_round_trip_through_every_format_keeps_the_data(source: Path, tmp_path: Path) -> None:
    chain = parse_chain(",".join(diskfmt.FORMAT_MATRIX) + ",raw")
    result = diskfmt.run_chain(source, chain, tmp_path / "hops")
    json.dumps(result)  # JSON data only
    assert [h["compare"] for h in result["hops"]] == ["identical"] * len(chain)
    assert all(h["check"] in ("ok", "unsupported") for h in result["hops"])
    read = [h for h in result["hops"] if h["readers"]]
    assert read and all(h["reader_hash_matches"] is True and h["reader_note"] is None for h in read)
    assert {h["format"] for h in read} >= {"raw", "qcow2", "vmdk", "vpc", "vhdx"}
    # A hop no independent reader knows says so (None and a note), it is not counted as a match.
    unread = [h for h in result["hops"] if not h["readers"]]
    assert {h["format"] for h in unread} == {f.value for f in DiskFormat if not diskfmt.READERS.get(f)}
    assert "qed" in {h["format"] for h in unread}
    for h in unread:
        assert h["reader"] is None and h["reader_hash_matches"] is None, h
        assert h["reader_note"].startswith(f"no independent reader of {h['format']}: "), h
    by_hop = {h["hop"]: h for h in result["hops"]}
    assert by_hop["vmdk:subformat=twoGbMaxExtentSparse"]["files"] == ["hop7.vmdk", "hop7-s001.vmdk"]
    assert by_hop["vmdk:subformat=monolithicFlat"]["files"] == ["hop5.vmdk", "hop5-flat.vmdk"]
    # The first VHD without force_size grows 64 MiB to its CHS size; later hops keep that size.
    grown = by_hop["vpc:subformat=dynamic"]
    assert grown["virtual_size"] == 67125248 and [p["id"] for p in grown["pitfalls"]] == ["vhd-chs-geometry"]
    assert by_hop["vpc:subformat=dynamic:force_size=on"]["pitfalls"] == []
    assert result["hops"][-1]["virtual_size"] == 67125248
    # A fixed VHD probes as raw (its footer then reads as 512 bytes of data): reported, not hidden.
    for fixed in ("vpc:subformat=fixed", "vpc:subformat=fixed:force_size=on"):
        assert by_hop[fixed]["probed_as"] == "raw"
        assert [p["id"] for p in by_hop[fixed]["pitfalls"]] == ["probes-as-other"]
        assert "+512" in by_hop[fixed]["pitfalls"][0]["message"]
    # streamOptimized: QEMU itself refused the overwrite (measured with qemu-io on the hop).
    stream = by_hop["vmdk:subformat=streamOptimized"]
    assert [p["id"] for p in stream["pitfalls"]] == ["guest-write-refused"]
    assert "Could not write to allocated cluster for streamOptimized" in stream["pitfalls"][0]["message"]
    # ...and the refused write left the hop as it was (compare and readers above ran before it).
    assert diskfmt.compare(source, DiskFormat.RAW, Path(stream["path"]), DiskFormat.VMDK) == "identical"
    assert not any(h["pitfalls"] for h in result["hops"] if h["hop"] in ("raw", "vhdx", "vdi", "qed"))


def test_probe_overwrite_passes_on_writable_formats(source: Path, tmp_path: Path) -> None:
    result = diskfmt.run_chain(source, parse_chain("qcow2"), tmp_path / "hops")
    path = Path(result["hops"][0]["path"])
    assert diskfmt.probe_overwrite(path, DiskFormat.QCOW2, tmp_path) is None
    assert diskfmt.compare(source, DiskFormat.RAW, path, DiskFormat.QCOW2) == "identical"


def test_vhd_without_force_size_grows_and_says_so(source: Path, tmp_path: Path) -> None:
    result = diskfmt.run_chain(source, [Hop(DiskFormat.VPC)], tmp_path)
    hop = result["hops"][0]
    assert hop["virtual_size"] == 67125248  # CHS geometry rounding, measured
    assert [p["id"] for p in hop["pitfalls"]] == ["vhd-chs-geometry"]


@setup_installs(any(e.name == "dissect.hypervisor" for e in diskfmt.READERS.get(DiskFormat.VDI, [])),
                "dissect.hypervisor (the 'dissect' extra)")
def test_vdi_is_read_by_dissect_block_by_block(source: Path, tmp_path: Path) -> None:
    """dissect.hypervisor 3.21's VDI stream returns wrong data for reads spanning blocks; the
    reader asks one block at a time, so it must agree with QEMU."""
    result = diskfmt.run_chain(source, parse_chain("vdi"), tmp_path / "hops")
    (reader,) = result["hops"][0]["readers"]
    assert reader["name"] == "dissect.hypervisor" and reader["matches"]


def _bad_image(tmp_path: Path, source: Path, name: str) -> tuple[Path, DiskFormat | None]:
    """One broken image, made from a good one of its format."""
    if name == "empty.img":
        (tmp_path / name).write_bytes(b"")
        return tmp_path / name, None
    fmt = {"qcow2": DiskFormat.QCOW2, "vhd": DiskFormat.VPC, "vdi": DiskFormat.VDI}[name.rsplit(".", 1)[1]]
    good = Path(diskfmt.run_chain(source, [Hop(fmt)], tmp_path / "ok")["hops"][0]["path"]).read_bytes()
    data = {"badmagic.qcow2": b"XXXX" + good[4:],
            "truncated.qcow2": good[:200_000],  # qemu-img info is happy with it; check is not
            "truncated.vhd": good[:1_000_000],
            "half.vdi": good[:len(good) // 2]}[name]  # qemu-img check passes it; its map does not
    (tmp_path / name).write_bytes(data)
    return tmp_path / name, (None if name == "truncated.qcow2" else fmt)


@pytest.mark.parametrize(("name", "needle"), [
    ("badmagic.qcow2", "not a readable disk image as qcow2: qemu-img: Could not open"),
    ("truncated.qcow2", "qemu-img check"),
    ("truncated.vhd", "The image has been truncated"),
    ("empty.img", "virtual size is 0 bytes"),
    ("half.vdi", "(vdi) is truncated: virtual bytes 0..4194303 are mapped to file offset 1024, past the end"),
])
def test_corrupt_and_truncated_sources_are_one_line_errors(source: Path, tmp_path: Path, name: str,
                                                           needle: str) -> None:
    path, fmt = _bad_image(tmp_path, source, name)
    with pytest.raises(DiskFormatError) as exc:
        diskfmt.run_chain(path, [Hop(DiskFormat.RAW)], tmp_path / "hops", source_format=fmt)
    assert needle in str(exc.value) and "\n" not in str(exc.value), str(exc.value)
    assert str(path) in str(exc.value) or path.name in str(exc.value)


def test_a_header_claiming_a_huge_disk_is_refused_at_the_check(source: Path, tmp_path: Path) -> None:
    """A VMDK whose header claims 1 TiB (no grain tables to match) fails the source's qemu-img
    check before anything converts or hashes a terabyte."""
    path = Path(diskfmt.run_chain(source, [Hop(DiskFormat.VMDK)], tmp_path / "ok")["hops"][0]["path"])
    data = bytearray(path.read_bytes())
    data[12:20] = struct.pack("<Q", (1 << 40) // 512)
    path.write_bytes(bytes(data))
    with pytest.raises(DiskFormatError, match="qemu-img check .*huge|qemu-img check"):
        diskfmt.run_chain(path, [Hop(DiskFormat.RAW)], tmp_path / "hops", source_format=DiskFormat.VMDK)
    assert not list((tmp_path / "hops").glob("*.raw"))


def _cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "harness", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


def test_cli_roundtrip_json(source: Path, tmp_path: Path) -> None:
    proc = _cli("roundtrip", str(source), "--chain", "vpc,qcow2", "--workdir", str(tmp_path / "w"), "--json")
    assert proc.returncode == 0, proc.stderr
    result: dict[str, Any] = json.loads(proc.stdout)
    assert set(result) == {"source", "source_format", "virtual_size", "sha256", "source_check", "boot", "seeded",
                           "hops", "final", "seconds"}
    assert result["boot"] is None and result["seeded"] is None and result["final"] is None
    assert [set(h) for h in result["hops"]] == [HOP_KEYS, HOP_KEYS]
    assert result["hops"][0]["pitfalls"][0]["id"] == "vhd-chs-geometry"
    assert "hop 1/2: raw -> vpc" in proc.stderr and "hop 2/2: vpc -> qcow2" in proc.stderr  # progress lines


def test_cli_roundtrip_text_and_errors(source: Path, tmp_path: Path) -> None:
    proc = _cli("roundtrip", str(source), "--chain", "vmdk:subformat=streamOptimized")
    assert proc.returncode == 0, proc.stderr
    assert "pitfall guest-write-refused" in proc.stdout
    bad = tmp_path / "bad.qcow2"
    bad.write_bytes(b"QFI\xfb" + os.urandom(600))
    for args, needle in ((["roundtrip", str(bad), "--chain", "raw"], "bad.qcow2"),
                         (["roundtrip", str(source), "--chain", "raw,floppy"], "unknown format 'floppy'"),
                         (["roundtrip", str(tmp_path / "nope"), "--chain", "raw"], "no such file")):
        proc = _cli(*args)
        assert proc.returncode == 125, proc
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("nestbed: error: ") and needle in lines[0], proc.stderr
        assert "Traceback" not in proc.stderr


@pytest.mark.boot  # not a boot, but it needs the debian-x86_64 image built (a cache hit after the first run)
def test_boot_refuses_a_disk_without_ext4_before_booting(source: Path, tmp_path: Path) -> None:
    """--boot needs the image's own root filesystem; random data is refused at once, clearly."""
    from harness.images import store as images

    images.build("debian-x86_64")
    with pytest.raises(DiskFormatError, match="has no ext4 filesystem at its start"):
        diskfmt.run_chain(source, [Hop(DiskFormat.QCOW2)], tmp_path / "hops", boot="debian-x86_64")


def test_seed_and_read_back_a_manifest_without_mounting(tmp_path: Path) -> None:
    fs = tmp_path / "fs.raw"
    subprocess.run(["mke2fs", "-q", "-F", "-t", "ext4", str(fs), "32M"], check=True, timeout=60, capture_output=True)
    files = diskfmt.seed_manifest(fs, "/nestbed-roundtrip-test", tmp_path)
    assert list(files) == ["seed.bin"]
    got = diskfmt.read_files(fs, "/nestbed-roundtrip-test", tmp_path)
    assert diskfmt.parse_manifest(got["MANIFEST.sha256"].decode()) == files
    final = diskfmt.verify_final(fs, DiskFormat.RAW, "/nestbed-roundtrip-test", files, tmp_path, lambda _m: None)
    assert final["intact"] and final["fsck"] == "clean"
    with pytest.raises(DiskFormatError, match="missing \\['hop01-raw.bin'\\]"):
        diskfmt.verify_final(fs, DiskFormat.RAW, "/nestbed-roundtrip-test", {**files, "hop01-raw.bin": "0" * 64},
                             tmp_path, lambda _m: None)
