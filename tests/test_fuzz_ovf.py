"""Fuzzed OVF XML and OVA tar bytes: ovf.load and ovf.describe either read them or refuse them with one
OvfError line; never another exception, never a hang, never a byte written outside the extraction directory."""

from __future__ import annotations

import shutil
import tarfile
import tempfile
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ovfdata import CPU, DISK, DISK_BYTES, MEMORY, NIC, SCSI, envelope, item, manifest, ova, tar_bytes

from harness.errors import OvfError
from harness.images import ovf

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SECONDS = 5.0  # far more than any of these inputs needs: a hang or an expansion blows it


def _check(data: bytes, name: str) -> None:
    """Load and describe *data* saved as *name* in a fresh directory; only OvfError may come out."""
    with tempfile.TemporaryDirectory(prefix="nestbed-fuzz-ovf-") as tmp:
        root = Path(tmp)
        src = root / name
        src.write_bytes(data)
        work = root / "work"
        work.mkdir()
        before = {p for p in root.rglob("*")}
        started = time.monotonic()
        for call in (lambda: ovf.describe(src), lambda: ovf.load(src, workdir=work)):
            try:
                call()
            except OvfError as exc:
                assert "\n" not in str(exc) and str(exc).startswith(str(src)), str(exc)
        assert time.monotonic() - started < SECONDS
        after = {p for p in root.rglob("*")}
        outside = {p for p in after - before if work not in p.parents}
        assert not outside, f"written outside the workdir: {sorted(outside)}"


XML_PIECES = st.sampled_from([
    CPU, MEMORY, SCSI, DISK, NIC, item("6", "3", sub="buslogic"), item("20", "3", sub="AHCI"),
    item("4", "2", qty="-1"), item("4", "2", qty="99999999999999999999999", units="byte * 2^60"),
    item("3", "1", qty="x"), item("17", "9", parent="42", host="ovf:/file/file1"), item("17", "9", host="ovf:/disk/"),
    item("10", "5", sub="\u2603"), "<Item/>", "<Item><rasd:ResourceType/></Item>", "&amp;", "<![CDATA[x]]>",
    '<vmw:Config vmw:key="firmware" vmw:value="efi"/>', "<VirtualSystem/>",
])


@SETTINGS
@given(pieces=st.lists(XML_PIECES, max_size=8), name=st.text(max_size=20),
       capacity=st.sampled_from(["1", "-5", "", "1e9", "67108864", "9" * 40]))
def test_fuzzed_descriptors(pieces: list[str], name: str, capacity: str) -> None:
    xml = envelope(tuple(pieces), name=name.replace("<", "").replace("&", ""), capacity=capacity)
    _check(xml, "a.ovf")
    _check(tar_bytes([("a.ovf", xml), ("disk1.vmdk", DISK_BYTES)]), "a.ova")


@SETTINGS
@given(data=st.binary(max_size=4096))
def test_random_bytes(data: bytes) -> None:
    _check(data, "a.ova")
    _check(data, "a.ovf")


def _good_ova() -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        return ova(Path(tmp) / "a.ova").read_bytes()


GOOD = _good_ova()


@SETTINGS
@given(flips=st.lists(st.tuples(st.integers(0, len(GOOD) - 1), st.integers(0, 255)), min_size=1, max_size=12),
       cut=st.none() | st.integers(0, len(GOOD)))
def test_mutated_ova(flips: list[tuple[int, int]], cut: int | None) -> None:
    data = bytearray(GOOD)
    for at, value in flips:
        data[at] = value
    _check(bytes(data[:cut] if cut is not None else data), "a.ova")


NAMES = st.sampled_from(["appliance.ovf", "appliance.mf", "disk1.vmdk", "../x", "/tmp/nestbed-fuzz-abs", "a/../../b",
                         "./disk1.vmdk", "x\\..\\y", "", ".", "..", "disk1.vmdk/", "sub/disk1.vmdk"])
TYPES = st.sampled_from([tarfile.REGTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.DIRTYPE, tarfile.CHRTYPE,
                         tarfile.FIFOTYPE, tarfile.CONTTYPE])


@SETTINGS
@given(members=st.lists(st.tuples(NAMES, TYPES, st.sampled_from(["", "/etc/passwd", "../x", "disk1.vmdk"]),
                                  st.binary(max_size=64)), max_size=6),
       with_manifest=st.booleans())
def test_hostile_members(members: list[tuple[str, bytes, str, bytes]], with_manifest: bool) -> None:
    xml = envelope(size=None)
    entries: list[tarfile.TarInfo | tuple[str, bytes]] = [("appliance.ovf", xml)]
    if with_manifest:
        entries.append(("appliance.mf", manifest({"appliance.ovf": xml, "disk1.vmdk": DISK_BYTES})))
    for name, kind, link, data in members:
        if kind == tarfile.REGTYPE:
            entries.append((name or "empty", data))
        else:
            info = tarfile.TarInfo(name or "empty")
            info.type, info.linkname = kind, link
            entries.append(info)
    _check(tar_bytes(entries), "a.ova")
    assert not Path("/tmp/nestbed-fuzz-abs").exists()


@pytest.mark.parametrize("depth", [10_000, 100_000])
def test_deep_nesting_does_not_crash(depth: int) -> None:
    _check(b"<Envelope>" + b"<a>" * depth + b"</a>" * depth + b"</Envelope>", "deep.ovf")


def teardown_module() -> None:
    shutil.rmtree("/tmp/nestbed-fuzz-abs", ignore_errors=True)
