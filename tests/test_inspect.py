"""``nestbed images inspect``: format, sizes, partition table and firmware guess of a disk image nestbed did
not build, in any format QEMU reads; damaged tables are one line naming the file; fuzzed tables never crash."""

from __future__ import annotations

import hashlib
import json
import struct
import subprocess
from pathlib import Path

import pytest
from conftest import nestbed
from hypothesis import given, settings
from hypothesis import strategies as st

from harness.images import inspect
from harness.images.inspect import GPT_BIOS_BOOT, GPT_ESP, InspectError, firmware_guess, parse_partitions

GPT_BOTH = ("label: gpt\nstart=2048, size=2048, type=21686148-6449-6E6F-744E-656564454649\n"
            "start=4096, size=65536, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B, name=\"esp\"\n"
            "start=69632, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4, name=\"root\"\n")
GPT_ESP_ONLY = "label: gpt\nstart=2048, size=65536, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B\nstart=67584, type=L\n"
MBR_ACTIVE = "label: dos\nstart=2048, type=83, bootable\n"
MBR_EF = "label: dos\nstart=2048, size=65536, type=ef\nstart=67584, type=83\n"


def _disk(tmp_path: Path, script: str, name: str = "d.raw") -> Path:
    path = tmp_path / name
    with open(path, "wb") as f:
        f.truncate(64 << 20)
    subprocess.run(["sfdisk", "-q", str(path)], input=script, text=True, check=True, timeout=60, capture_output=True)
    return path


@pytest.mark.parametrize(("script", "table", "firmware"), [
    (GPT_BOTH, "gpt", "either"), (GPT_ESP_ONLY, "gpt", "uefi"), (MBR_ACTIVE, "mbr", "bios"), (MBR_EF, "mbr", "uefi"),
], ids=["gpt-bios+esp", "gpt-esp", "mbr-active", "mbr-esp"])
def test_tables_and_firmware_guesses(tmp_path: Path, script: str, table: str, firmware: str) -> None:
    head = _disk(tmp_path, script).read_bytes()[:1 << 20]
    parsed = parse_partitions(head)
    assert parsed["table"] == table
    guess, why = firmware_guess(parsed)
    assert guess == firmware, why
    assert "#" in why  # names the partition it decided by


def test_gpt_entries_in_detail(tmp_path: Path) -> None:
    parsed = parse_partitions(_disk(tmp_path, GPT_BOTH).read_bytes()[:1 << 20])
    assert [(p["index"], p["type"], p["start"], p["size"]) for p in parsed["partitions"][:2]] == [
        (1, GPT_BIOS_BOOT, 2048 * 512, 2048 * 512), (2, GPT_ESP, 4096 * 512, 65536 * 512)]
    assert [p["name"] for p in parsed["partitions"]] == ["", "esp", "root"]


@pytest.mark.parametrize("fmt", ["raw", "qcow2", "vmdk", "vmdk:subformat=streamOptimized", "vpc", "vpc:subformat=fixed",
                                 "vhdx", "vdi"])
def test_every_format_qemu_reads_shows_the_same_table(tmp_path: Path, fmt: str) -> None:
    src = _disk(tmp_path, GPT_BOTH)
    name, _, opts = fmt.partition(":")
    out = tmp_path / f"out.{name}"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", name, *(["-o", opts] if opts else []), str(src),
                    str(out)], check=True, timeout=120, capture_output=True)
    before = hashlib.sha256(out.read_bytes()).hexdigest()
    got = inspect.inspect_disk(out)
    assert hashlib.sha256(out.read_bytes()).hexdigest() == before, "inspect wrote to the image"
    assert got["format"] == name
    assert got["virtual_size"] >= 64 << 20
    assert got["table"] == "gpt" and got["firmware"] == "either"
    assert [p["type_name"] for p in got["partitions"]] == ["BIOS boot", "EFI system", "Linux filesystem"]
    assert got["path"] == str(out)
    if opts == "subformat=fixed":  # qemu-img's own probe says raw: inspect reads the footer and says so
        assert got["subformat"] == "fixed" and "probe calls it raw" in got["note"]


def test_cli_inspect_json_and_one_line_errors(tmp_path: Path) -> None:
    disk = _disk(tmp_path, MBR_ACTIVE)
    proc = nestbed("images", "inspect", "--json", str(disk), timeout=60)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["format"] == "raw" and doc["table"] == "mbr" and doc["firmware"] == "bios"
    text = nestbed("images", "inspect", str(disk), timeout=60)
    assert "partition table: mbr" in text.stdout and "firmware: bios" in text.stdout
    missing = nestbed("images", "inspect", str(tmp_path / "nope.vmdk"), timeout=60)
    assert missing.returncode == 125
    assert missing.stderr.strip().splitlines() == [f"nestbed: error: {tmp_path / 'nope.vmdk'}: no such file"]
    # A protective MBR whose GPT header is gone: a damaged table, named in one line.
    broken = _disk(tmp_path, GPT_BOTH, "broken.raw")
    with open(broken, "r+b") as f:
        f.seek(512)
        f.write(b"\0" * 512)
    damaged = nestbed("images", "inspect", str(broken), timeout=60)
    assert damaged.returncode == 125
    assert damaged.stderr.strip().splitlines() == [
        f"nestbed: error: {broken}: a protective MBR but no GPT header at LBA 1"]


def _protective(entries_lba: int, count: int, size: int) -> bytes:
    head = bytearray(1 << 16)
    head[446 + 4] = 0xEE
    struct.pack_into("<II", head, 446 + 8, 1, 0xFFFFFFFF)
    head[510:512] = b"\x55\xaa"
    head[512:520] = b"EFI PART"
    struct.pack_into("<QII", head, 512 + 72, entries_lba, count, size)
    return bytes(head)


@pytest.mark.parametrize(("lba", "count", "size", "needle"), [
    (2, 0, 128, "0 entries"), (2, 100000, 128, "100000 entries"), (2, 128, 64, "of 64 bytes"),
    (1 << 40, 128, 128, "lie outside"), (0, 4, 128, "lie outside"),
])
def test_hostile_gpt_headers_are_refused(lba: int, count: int, size: int, needle: str) -> None:
    with pytest.raises(InspectError, match=needle):
        parse_partitions(_protective(lba, count, size))


@settings(max_examples=300, deadline=None)
@given(body=st.binary(min_size=0, max_size=4096), lba=st.integers(0, 2**64 - 1), count=st.integers(0, 2**32 - 1),
       size=st.integers(0, 2**32 - 1))
def test_fuzzed_tables_parse_or_refuse(body: bytes, lba: int, count: int, size: int) -> None:
    head = bytearray(_protective(lba, count, size))
    head[1024:1024 + len(body)] = body
    for blob in (bytes(head), body, body + b"\x55\xaa"):
        try:
            firmware_guess(parse_partitions(blob))
        except InspectError as exc:
            assert "\n" not in str(exc)
