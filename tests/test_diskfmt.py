"""Disk-format chains: parsing (pure) and real qemu-img round trips on a small image."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from harness import diskfmt
from harness.diskfmt import DiskFormatError, Hop, parse_chain
from harness.errors import UsageError
from harness.spec import DiskFormat


def test_parse_chain_with_options() -> None:
    chain = parse_chain("vmdk:subformat=streamOptimized, vpc:subformat=fixed:force_size=on,qcow2:compat=0.10,raw")
    assert [h.label for h in chain] == ["vmdk:subformat=streamOptimized", "vpc:subformat=fixed:force_size=on",
                                        "qcow2:compat=0.10", "raw"]
    assert not chain[0].guest_writable and chain[1].guest_writable


@pytest.mark.parametrize(("text", "needle"), [
    ("", "empty"),
    ("vmdk,floppy", "hop 2 'floppy': unknown format"),
    ("vpc:subformat=sparse", "subformat must be one of dynamic, fixed"),
    ("raw:compat=1.1", "raw takes options (none)"),
    ("qcow2:compat", "as KEY=VALUE"),
])
def test_parse_chain_refuses_bad_hops(text: str, needle: str) -> None:
    with pytest.raises(UsageError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        parse_chain(text)


@pytest.fixture
def source(tmp_path: Path) -> Path:
    path = tmp_path / "src.raw"
    with open(path, "wb") as f:
        f.write(os.urandom(4 << 20))
        f.truncate(64 << 20)  # 64 MiB: data then a sparse zero tail
    return path


def test_round_trip_through_every_format_keeps_the_data(source: Path, tmp_path: Path) -> None:
    chain = parse_chain("vmdk,vmdk:subformat=monolithicFlat,vmdk:subformat=twoGbMaxExtentSparse,"
                        "vpc:force_size=on,vpc:subformat=fixed:force_size=on,vhdx,vdi,qed,qcow2:compat=0.10,"
                        "qcow2:compat=1.1,vmdk:subformat=streamOptimized,raw")
    result = diskfmt.run_chain(source, chain, tmp_path)
    assert [h["compare"] for h in result["hops"]] == ["identical"] * len(chain)
    assert all(h["check"] in ("ok", "unsupported") for h in result["hops"])
    read = [h for h in result["hops"] if h["reader"]]
    assert read and all(h["reader_hash_matches"] for h in read)
    by_hop = {h["hop"]: h for h in result["hops"]}
    # force_size keeps 64 MiB exact; a fixed VHD probes as raw: reported, not hidden.
    assert by_hop["vpc:force_size=on"]["virtual_size"] == 64 << 20
    assert any("probes as 'raw'" in p for p in by_hop["vpc:subformat=fixed:force_size=on"]["pitfalls"])
    assert any("read-only for guests" in p for p in by_hop["vmdk:subformat=streamOptimized"]["pitfalls"])


def test_vhd_without_force_size_grows_and_says_so(source: Path, tmp_path: Path) -> None:
    result = diskfmt.run_chain(source, [Hop(DiskFormat.VPC)], tmp_path)
    hop = result["hops"][0]
    assert hop["virtual_size"] == 67125248  # CHS geometry rounding, measured
    assert any("CHS geometry" in p for p in hop["pitfalls"])


def test_corrupt_image_is_a_clear_error(source: Path, tmp_path: Path) -> None:
    result = diskfmt.run_chain(source, [Hop(DiskFormat.QCOW2)], tmp_path)
    qcow = Path(result["hops"][0]["path"])
    data = bytearray(qcow.read_bytes())
    data[0:4] = b"XXXX"  # bad magic
    bad = tmp_path / "bad.qcow2"
    bad.write_bytes(bytes(data))
    with pytest.raises(DiskFormatError):
        diskfmt.run_chain(bad, [Hop(DiskFormat.RAW)], tmp_path, source_format=DiskFormat.QCOW2)
