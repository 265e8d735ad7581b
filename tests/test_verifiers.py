"""Every disk-format verifier shown saying no, each next to a control run where it says yes.

A verifier that cannot fail proves nothing, so each one gets data it must refuse: a hop one byte
off (``qemu-img compare``), an independent reader that reads different data, a guest write that
changed nothing, a guest write that is not there at the end, and a read-only hop whose files
changed.  Real functions on small real images (``qemu-img``, ``qemu-io``, ``debugfs``); no guest
boots: where :func:`harness.diskfmt.run_chain` would boot one, a stand-in does (or fails to do)
what a guest does, so the harness's own checks are what is tested.  A format no reader knows is
reported as unread, never counted as a match.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
from collections.abc import Callable
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import pytest

from harness import diskfmt
from harness.diskfmt import DiskFormatError, GuestCheck, Hop, ReaderEntry, parse_chain
from harness.vm.spec import DiskFormat

REPO = Path(__file__).resolve().parent.parent
SIZE = 4 << 20  # 4 MiB virtual disks: 1 MiB of random data, then a sparse zero tail
STREAM = parse_chain("vmdk:subformat=streamOptimized")[0]


def _flip(path: Path, offset: int) -> None:
    """Change one byte of *path* in place."""
    with open(path, "r+b") as f:
        f.seek(offset)
        old = f.read(1)
        f.seek(offset)
        f.write(bytes([old[0] ^ 0x5A]))


def _sector(offset: int) -> int:
    return offset // 512 * 512  # qemu-img compare names the 512-byte sector the difference is in


def _qemu_convert(src: Path, dst: Path, fmt: str, *opts: str) -> Path:
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", fmt, *opts, str(src), str(dst)], check=True,
                   timeout=60, capture_output=True)
    return dst


@pytest.fixture
def src(tmp_path: Path) -> Path:
    path = tmp_path / "src.raw"
    with open(path, "wb") as f:
        f.write(os.urandom(1 << 20))
        f.truncate(SIZE)
    return path


def _sha(path: Path, length: int = SIZE) -> str:
    return hashlib.sha256(path.read_bytes()[:length]).hexdigest()


# -- 2. qemu-img compare -----------------------------------------------------------------------

@pytest.mark.parametrize("offset", [0, 123457, (1 << 20) - 1, 3_000_001, SIZE - 1],
                         ids=["first-byte", "in-data", "last-data-byte", "in-zero-tail", "last-byte"])
def test_compare_says_no_to_a_raw_file_one_byte_off(src: Path, tmp_path: Path, offset: int) -> None:
    other = tmp_path / "hop1.raw"
    other.write_bytes(src.read_bytes())
    assert diskfmt.compare(src, DiskFormat.RAW, other, DiskFormat.RAW) == "identical"  # the control
    _flip(other, offset)
    with pytest.raises(DiskFormatError) as exc:
        diskfmt.compare(src, DiskFormat.RAW, other, DiskFormat.RAW)
    assert str(exc.value) == (f"qemu-img compare src.raw (raw) hop1.raw (raw): differ: "
                              f"Content mismatch at offset {_sector(offset)}!")


@pytest.mark.parametrize(("fmt", "opts"), [
    (DiskFormat.QCOW2, ()), (DiskFormat.VMDK, ()), (DiskFormat.VPC, ("-o", "force_size=on")), (DiskFormat.VHDX, ()),
])
def test_compare_says_no_across_formats_when_the_reference_is_one_byte_off(
        src: Path, tmp_path: Path, fmt: DiskFormat, opts: tuple[str, ...]) -> None:
    """The hop is a faithful conversion; the reference it is compared with lost one byte."""
    hop = _qemu_convert(src, tmp_path / f"hop1.{diskfmt.EXTENSION[fmt]}", fmt.value, *opts)
    assert diskfmt.compare(src, DiskFormat.RAW, hop, fmt) == "identical"
    _flip(src, 777)
    with pytest.raises(DiskFormatError, match=rf"^qemu-img compare src\.raw \(raw\) {hop.name} \({fmt.value}\): "
                                              rf"differ: Content mismatch at offset 512!$"):
        diskfmt.compare(src, DiskFormat.RAW, hop, fmt)


def test_compare_says_no_to_a_larger_image_whose_extra_tail_is_not_zeros(src: Path, tmp_path: Path) -> None:
    longer = tmp_path / "hop1.raw"
    longer.write_bytes(src.read_bytes() + bytes(65536))
    assert diskfmt.compare(src, DiskFormat.RAW, longer, DiskFormat.RAW) == "identical"  # a zero tail is allowed
    _flip(longer, SIZE + 100)
    with pytest.raises(DiskFormatError, match=f"differ: Content mismatch at offset {SIZE}!$"):
        diskfmt.compare(src, DiskFormat.RAW, longer, DiskFormat.RAW)


def test_compare_that_cannot_run_is_not_identical(src: Path, tmp_path: Path) -> None:
    with pytest.raises(DiskFormatError, match=r"qemu-img compare src\.raw \(raw\) gone\.qcow2 \(qcow2\): "
                                              r"could not compare \(exit 2\): .*gone\.qcow2"):
        diskfmt.compare(src, DiskFormat.RAW, tmp_path / "gone.qcow2", DiskFormat.QCOW2)


def _corrupting_convert(monkeypatch: pytest.MonkeyPatch, victim: str, offset: int) -> None:
    """qemu-img convert as usual, then one byte of the hop named *victim* changes: a converter bug."""
    real = diskfmt.convert

    def convert(s: Path, s_fmt: DiskFormat, dst: Path, hop: Hop) -> float:
        seconds = real(s, s_fmt, dst, hop)
        if dst.name == victim:
            _flip(dst, offset)
        return seconds

    monkeypatch.setattr(diskfmt.hops, "convert", convert)  # where the chain looks it up


@pytest.mark.parametrize(("victim", "message"), [
    ("hop1.raw", "hop 1 (raw): qemu-img compare src.raw (raw) hop1.raw (raw): differ: Content mismatch at offset 65536!"),
    ("hop2.raw", "hop 2 (raw): qemu-img compare hop1.raw (raw) hop2.raw (raw): differ: Content mismatch at offset 65536!"),
])
def test_a_hop_one_byte_off_stops_the_chain_naming_the_hop(src: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           victim: str, message: str) -> None:
    _corrupting_convert(monkeypatch, victim, 65536 + 3)
    with pytest.raises(DiskFormatError) as exc:
        diskfmt.run_chain(src, parse_chain("raw,raw"), tmp_path / "hops")
    assert str(exc.value) == message


def test_a_one_byte_off_qcow2_hop_is_caught_by_compare_before_the_readers(
        src: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Corrupt a data cluster of a real qcow2 (qemu-img check cannot see data): compare must."""
    good = diskfmt.run_chain(src, parse_chain("qcow2"), tmp_path / "good")["hops"][0]
    assert good["compare"] == "identical" and good["reader_hash_matches"] is True  # the control
    proc = subprocess.run(["qemu-img", "map", "--output=json", "-f", "qcow2", good["path"]], check=True,
                          capture_output=True, text=True, timeout=60)
    first = next(e for e in json.loads(proc.stdout) if e["data"])
    _corrupting_convert(monkeypatch, "hop1.qcow2", first["offset"] + 1000)
    with pytest.raises(DiskFormatError) as exc:
        diskfmt.run_chain(src, parse_chain("qcow2"), tmp_path / "bad")
    assert str(exc.value) == (f"hop 1 (qcow2): qemu-img compare src.raw (raw) hop1.qcow2 (qcow2): differ: "
                              f"Content mismatch at offset {_sector(first['start'] + 1000)}!")


# -- 3. independent readers ----------------------------------------------------------------------

def _lying_reader(fmt: DiskFormat, offset: int) -> Callable[[Path, int], str]:
    """Reads the virtual disk as QEMU does, except that byte *offset* comes out different."""
    def read(path: Path, length: int) -> str:
        tmp = path.with_name(path.name + ".liar.raw")
        diskfmt.convert(path, fmt, tmp, Hop(DiskFormat.RAW))
        try:
            data = bytearray(tmp.read_bytes()[:length])
        finally:
            tmp.unlink()
        data[offset] ^= 1
        return hashlib.sha256(data).hexdigest()
    return read


@pytest.mark.parametrize("hop", ["raw", "qcow2", "vhdx"])
def test_a_reader_that_reads_different_data_stops_the_chain_naming_reader_and_hop(
        src: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, hop: str) -> None:
    (h,) = parse_chain(hop)
    liar = _lying_reader(h.format, 4242)
    monkeypatch.setitem(diskfmt.READERS, h.format, [ReaderEntry("liar-reader", liar)])
    with pytest.raises(DiskFormatError) as exc:
        diskfmt.run_chain(src, [h], tmp_path / "hops")
    dst = f"hop1.{diskfmt.EXTENSION[h.format]}"
    wrong = bytearray(src.read_bytes())
    wrong[4242] ^= 1
    assert str(exc.value) == (f"hop 1 ({hop}): independent reader liar-reader reads {dst} as different data than "
                              f"QEMU reads src.raw (sha256 {hashlib.sha256(wrong).hexdigest()[:16]} vs "
                              f"{_sha(src)[:16]})")


def test_a_second_opinion_that_disagrees_says_no_and_is_only_asked_when_wanted(
        src: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    honest = diskfmt.READERS[DiskFormat.RAW][0]
    assert honest.name == "python"
    monkeypatch.setitem(diskfmt.READERS, DiskFormat.RAW,
                        [honest, ReaderEntry("second-opinion", _lying_reader(DiskFormat.RAW, (1 << 20) - 1))])
    with pytest.raises(DiskFormatError, match=r"^hop 1 \(raw\): independent reader second-opinion reads hop1\.raw "):
        diskfmt.run_chain(src, [Hop(DiskFormat.RAW)], tmp_path / "a")
    hop = diskfmt.run_chain(src, [Hop(DiskFormat.RAW)], tmp_path / "b", second_opinion=False)["hops"][0]
    assert [r["name"] for r in hop["readers"]] == ["python"] and hop["reader_hash_matches"] is True


def test_a_reader_that_cannot_read_the_hop_names_itself_and_the_hop(
        src: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(path: Path, length: int) -> str:
        raise OSError("libqcow_file_open: unable to open file.\nlibcfile_file_open: no such file")

    monkeypatch.setitem(diskfmt.READERS, DiskFormat.QCOW2, [ReaderEntry("broken-reader", broken)])
    with pytest.raises(DiskFormatError) as exc:
        diskfmt.run_chain(src, [Hop(DiskFormat.QCOW2)], tmp_path / "hops")
    assert str(exc.value) == ("hop 1 (qcow2): broken-reader cannot read hop1.qcow2: "
                              "libcfile_file_open: no such file")


# -- a format no independent reader knows: reported, not counted as a match ----------------------

def _scenario_module() -> ModuleType:
    """scenarios/test_disk_formats.py, the caller whose checks must treat an unread hop right."""
    spec = importlib.util.spec_from_file_location("_nestbed_scenario_disk_formats",
                                                  REPO / "scenarios" / "test_disk_formats.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize(("chain", "unread", "why"), [
    ("qed", "qed", "no independent implementation of qed exists in Python"),
    ("raw,vdi", "vdi", "dissect.hypervisor (the optional 'dissect' extra) is its only reader and is not installed"),
    ("qcow2,raw", "qcow2", "no reader is registered"),
])
def test_a_hop_no_reader_knows_says_so_and_is_not_a_match(src: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          chain: str, unread: str, why: str) -> None:
    fmt = DiskFormat(unread)
    monkeypatch.setitem(diskfmt.READERS, fmt, [])  # qed has none; vdi without dissect; qcow2 without libyal
    result = diskfmt.run_chain(src, parse_chain(chain), tmp_path / "hops")
    hops = {h["format"]: h for h in result["hops"]}
    h = hops[unread]
    assert h["readers"] == [] and h["reader"] is None
    assert h["reader_hash_matches"] is None  # not True: nothing independent looked at it
    assert h["reader_note"].startswith(f"no independent reader of {unread}: {why}")
    assert h["reader_note"].endswith("only qemu-img check and compare (and a guest) verified this hop")
    assert h["compare"] == "identical"  # the other checks still ran
    for other in (o for f, o in hops.items() if f != unread):
        assert other["reader_hash_matches"] is True and other["reader_note"] is None, other
    text = diskfmt.render_text(result)
    assert f"unread: no independent reader of {unread}: " in text
    assert text.count("no independent reader") == 2  # the hop line and its unread: line, for that hop only

    # The scenarios' own checks: an unread hop neither passes as read nor fails the scenario...
    scenario = _scenario_module()
    scenario._assert_verified(result)
    facts = scenario._facts(result)
    assert facts["hops_not_read_independently"] == [h["hop"]]
    (fact,) = (f for f in facts["hops"] if f["hop"] == h["hop"])
    assert fact["readers"] == {} and fact["reader_hash_matches"] is None and fact["reader_note"] == h["reader_note"]
    # ...but a hop that claims a match without a reader, is unread without saying why, or was read
    # differently, is refused.
    differently = {**h, "reader": "x", "reader_hash_matches": False, "reader_note": None,
                   "readers": [{"name": "x", "sha256": "0" * 64, "matches": False}]}
    for forged in ({**h, "reader_hash_matches": True}, {**h, "reader_note": None}, differently):
        with pytest.raises(AssertionError):
            scenario._assert_verified({**result, "hops": [forged]})


# -- 4. the guest part, with a stand-in for the guest -------------------------------------------

@pytest.fixture
def ext4_src(tmp_path: Path) -> Path:
    """A whole-disk ext4 like an image's root disk, small (16 MiB)."""
    path = tmp_path / "root.raw"
    subprocess.run(["mke2fs", "-q", "-F", "-t", "ext4", str(path), "16M"], check=True, timeout=60,
                   capture_output=True)
    return path


StandIn = Callable[[Path, DiskFormat, int, str, dict[str, str], bool, Path], GuestCheck]


def _stand_in_guest(monkeypatch: pytest.MonkeyPatch, act: StandIn) -> list[dict[str, Any]]:
    """run_chain's boot=... path with *act* in place of a booted guest (nothing boots)."""
    monkeypatch.setattr(diskfmt.chain, "_boot_image", lambda name: SimpleNamespace(manifest={"rootfs_uuid": None}))
    calls: list[dict[str, Any]] = []

    def guest_hop(image: str, disk: Path, fmt: DiskFormat, *, index: int, directory: str, expected: dict[str, str],
                  writable: bool, log_dir: Path | None, on_guest: object) -> GuestCheck:
        calls.append({"disk": disk.name, "writable": writable, "expected": dict(expected)})
        return act(disk, fmt, index, directory, dict(expected), writable, disk.parent)

    monkeypatch.setattr(diskfmt.verify, "guest_hop", guest_hop)  # where the chain looks it up
    return calls


def _debugfs_write(raw: Path, directory: str, files: dict[str, bytes], work: Path) -> None:
    """Write *files* into *directory* of the ext4 in *raw* as a guest would (replacing any already there)."""
    existing = diskfmt.read_files(raw, directory, work)
    cmds = []
    for name, data in files.items():
        tmp = work / f".standin-{name}"
        tmp.write_bytes(data)
        cmds += [f"rm {directory}/{name}"] if name in existing else []
        cmds.append(f'write "{tmp}" {directory}/{name}')
    diskfmt.debugfs(raw, cmds, write=True)


def _writer(*, lose: str | None = None) -> StandIn:
    """A guest that writes its hop file and appends it to the manifest, as the real one does;
    *lose*: ``"everything"`` (claims the write, changes nothing), ``"elsewhere"`` (writes another
    file instead), ``"content"`` (writes the file with other bytes than it reports)."""
    def act(disk: Path, fmt: DiskFormat, index: int, directory: str, expected: dict[str, str], writable: bool,
            work: Path) -> GuestCheck:
        assert fmt is DiskFormat.RAW and writable
        name = f"hop{index:02d}-{fmt.value}.bin"
        data = os.urandom(64 << 10)
        digest = hashlib.sha256(data).hexdigest()
        manifest = "".join(f"{h}  {n}\n" for n, h in {**expected, name: digest}.items()).encode()
        if lose == "elsewhere":
            _debugfs_write(disk, directory, {"elsewhere.bin": data}, work)
        elif lose == "content":
            _debugfs_write(disk, directory, {name: data[::-1], "MANIFEST.sha256": manifest}, work)
        elif lose is None:
            _debugfs_write(disk, directory, {name: data, "MANIFEST.sha256": manifest}, work)
        return GuestCheck(image="stand-in", writable=True, ready_seconds=0.0, manifest_verified=len(expected),
                          wrote={"name": name, "sha256": digest}, remount_ro="ok")
    return act


def test_a_guest_write_that_lands_is_verified_to_the_end(ext4_src: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The control for the lost writes below: the same stand-in, writing for real, passes everything."""
    calls = _stand_in_guest(monkeypatch, _writer())
    result = diskfmt.run_chain(ext4_src, parse_chain("raw,raw"), tmp_path / "hops", boot="stand-in")
    assert [c["writable"] for c in calls] == [True, True]
    assert list(calls[1]["expected"]) == ["seed.bin", "hop01-raw.bin"]
    for h in result["hops"]:
        assert h["guest"]["changed"] is True and h["sha256_after_guest"] != h["sha256"], h
    assert result["final"]["intact"] and result["final"]["fsck"] == "clean", result["final"]
    assert sorted(result["final"]["files"]) == ["hop01-raw.bin", "hop02-raw.bin", "seed.bin"]


def test_a_guest_write_that_changed_nothing_is_refused_at_its_hop(ext4_src: Path, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    _stand_in_guest(monkeypatch, _writer(lose="everything"))
    with pytest.raises(DiskFormatError) as exc:
        diskfmt.run_chain(ext4_src, parse_chain("raw"), tmp_path / "hops", boot="stand-in")
    seeded = diskfmt.raw_reader(tmp_path / "hops" / "seeded.raw", ext4_src.stat().st_size)
    assert str(exc.value) == (f"hop 1 (raw): the guest wrote hop01-raw.bin but hop1.raw's data did not change "
                              f"(sha256 still {seeded[:16]}): the write was lost")


@pytest.mark.parametrize(("lose", "missing", "different", "manifest"), [
    ("elsewhere", "['hop01-raw.bin']", "none", "differs from the record"),
    ("content", "none", "['hop01-raw.bin']", "as recorded"),
])
def test_a_guest_write_that_is_not_there_at_the_end_is_refused(ext4_src: Path, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch, lose: str,
                                                                missing: str, different: str, manifest: str) -> None:
    """The image changed (so the hop's own check passes), but not by the write the guest reported."""
    _stand_in_guest(monkeypatch, _writer(lose=lose))
    with pytest.raises(DiskFormatError) as exc:
        diskfmt.run_chain(ext4_src, parse_chain("raw"), tmp_path / "hops", boot="stand-in")
    assert str(exc.value) == (f"hop1.raw: the guests' writes are not intact at the end: missing {missing}, "
                              f"different {different}, manifest {manifest}")


def _read_only(*, touch: bool) -> StandIn:
    """A guest on a hop QEMU refuses to overwrite: boots read-only, its write is refused; *touch*:
    the hop's file changes anyway (what a read-only drive must never let happen)."""
    def act(disk: Path, fmt: DiskFormat, index: int, directory: str, expected: dict[str, str], writable: bool,
            work: Path) -> GuestCheck:
        assert not writable, "streamOptimized must have been measured as refusing overwrites"
        if touch:
            _flip(disk, disk.stat().st_size // 2)
        return GuestCheck(image="stand-in", writable=False, ready_seconds=0.0, manifest_verified=len(expected),
                          refused=f"touch: cannot touch '{directory}/x': Read-only file system", remount_ro="ok")
    return act


def test_a_read_only_hop_that_stays_as_it_was_passes(ext4_src: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _stand_in_guest(monkeypatch, _read_only(touch=False))
    result = diskfmt.run_chain(ext4_src, [STREAM], tmp_path / "hops", boot="stand-in")
    assert calls[0]["writable"] is False
    h = result["hops"][0]
    assert h["guest"]["changed"] is False and h["sha256_after_guest"] == h["sha256"]
    assert [p["id"] for p in h["pitfalls"]] == ["guest-write-refused"]
    assert result["final"]["intact"] and list(result["final"]["files"]) == ["seed.bin"]


def test_a_read_only_hop_whose_file_changed_is_refused(ext4_src: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    _stand_in_guest(monkeypatch, _read_only(touch=True))
    with pytest.raises(DiskFormatError) as exc:
        diskfmt.run_chain(ext4_src, [STREAM], tmp_path / "hops", boot="stand-in")
    assert str(exc.value) == ("hop 1 (vmdk:subformat=streamOptimized): hop1.vmdk changed under a read-only guest "
                              "(the files differ from before it booted)")
