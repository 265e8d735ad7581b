"""Disk-format round trips: every hop verified four ways (qemu-img check, qemu-img compare,
independent readers, and a guest booting from the hop as its root disk).

The guest part (``harness.diskfmt.run_chain(..., boot="debian-x86_64")``) writes a seed file and
a sha256 manifest into the source's ext4 (debugfs, no mount); every hop's guest checks the
manifest, adds a file of its own, remounts its root read-only and powers off; the next hop
converts what it left.  At the end the host reads the last image's files (debugfs) and every
guest's write must be there, and ``e2fsck -fn`` must find the filesystem clean.

Argnames (the report's matrix keys on them): ``chain`` for a chain string, ``fmt`` for one
format/subformat id from :data:`harness.diskfmt.FORMAT_MATRIX`.  Tiers: ``smoke`` (the true round
trip raw -> vmdk -> vhd -> vhdx -> qcow2 -> raw), ``nightly`` (every format and subformat).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from nestbed_fixtures.plugin import GUESTS_KEY

from harness import diskfmt
from harness.guest import Guest
from harness.images import store as images

BOOT_IMAGE = "debian-x86_64"
# The Debian root uses ~430 MiB of its 2 GiB ext4: shrunk to 640 MiB (resize2fs, ~1 s) every hop
# hashes a third as much and the guests still have ~200 MiB free to write into.
SHRUNK = "640M"
SMOKE_CHAIN = "vmdk,vpc:force_size=on,vhdx,qcow2,raw"
NIGHTLY_CHAINS = [
    # A read-only hop first (streamOptimized), a fixed VHD that probes as raw, a growing VHD, old formats.
    "vmdk:subformat=streamOptimized,vpc:subformat=fixed,vdi,qed,vpc,qcow2:compat=0.10,raw",
]


def _run(argv: list[str], timeout: float = 120) -> None:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    if proc.returncode not in ((0, 1) if argv[0] == "e2fsck" else (0,)):  # e2fsck's 1: errors fixed
        raise RuntimeError(f"{' '.join(argv)}: exit {proc.returncode}: {proc.stderr.strip()[-300:]}")


@pytest.fixture(scope="module")
def debian_root(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A raw copy of debian-x86_64's root disk (whole-disk ext4), shrunk to SHRUNK."""
    img = images.build(BOOT_IMAGE)
    assert img.disk is not None
    d = tmp_path_factory.mktemp("debian-root")
    raw = d / "root.raw"
    _run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(img.disk), str(raw)])
    _run(["e2fsck", "-fy", str(raw)])  # resize2fs insists on a freshly checked filesystem
    _run(["resize2fs", str(raw), SHRUNK])
    os.truncate(raw, int(SHRUNK[:-1]) << 20)
    yield raw
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def workdir(tmp_path: Path) -> Iterator[Path]:
    """Hops are hundreds of MiB each: removed after the test (pytest keeps old tmp_paths)."""
    yield tmp_path / "hops"
    shutil.rmtree(tmp_path / "hops", ignore_errors=True)


@pytest.fixture
def record_guest(request: pytest.FixtureRequest) -> Callable[[Guest], None]:
    """Guests run_chain boots join the test's guest list: report summaries, serial tails on failure."""
    guests = request.node.stash.setdefault(GUESTS_KEY, [])
    return guests.append


def _facts(result: dict[str, Any]) -> dict[str, Any]:
    """The report's view of a chain: per hop sizes, hashes, checks, pitfalls, guest timings."""
    hops = []
    for h in result["hops"]:
        g = h["guest"] or {}
        hops.append({
            "hop": h["hop"], "virtual_size": h["virtual_size"], "file_size": h["file_size"],
            "convert_seconds": h["seconds"], "verify_seconds": h["verify_seconds"], "check": h["check"],
            "compare": h["compare"], "probed_as": h["probed_as"], "sha256": h["sha256"][:16],
            "readers": {r["name"]: r["matches"] for r in h["readers"]},
            # None: no independent reader read this hop (qed; vdi without dissect), which is not a match.
            "reader_hash_matches": h["reader_hash_matches"], "reader_note": h["reader_note"],
            "pitfalls": [p["id"] for p in h["pitfalls"]], "pitfall_messages": [p["message"] for p in h["pitfalls"]],
            "guest_ready_seconds": g.get("ready_seconds"), "guest_seconds": g.get("seconds"),
            "guest_wrote": (g.get("wrote") or {}).get("name"), "guest_refused": g.get("refused"),
            "guest_remount_ro": g.get("remount_ro"),
        })
    final = result.get("final") or {}
    return {"source_virtual_size": result["virtual_size"], "source_sha256": result["sha256"][:16], "hops": hops,
            "hops_not_read_independently": [h["hop"] for h in result["hops"] if h["reader_hash_matches"] is None],
            "final_files": sorted(final.get("files", {})), "final_intact": final.get("intact"),
            "final_fsck": final.get("fsck"), "seconds": result["seconds"]}


def _assert_verified(result: dict[str, Any]) -> None:
    """Every hop passed qemu-img check and compare, and every independent reader that read it saw
    the reference's data.  A hop no reader knows is neither a pass of that check nor a failure: it
    must say so (``reader_hash_matches`` None and a ``reader_note``); :func:`_facts` records it."""
    for h in result["hops"]:
        assert h["compare"] == "identical", h
        assert h["check"] in ("ok", "unsupported"), h
        if h["readers"]:
            assert h["reader_hash_matches"] is True and h["reader_note"] is None, h
            assert all(r["matches"] is True for r in h["readers"]), h
        else:
            assert h["reader"] is None and h["reader_hash_matches"] is None and h["reader_note"], h


@pytest.mark.smoke
@pytest.mark.parametrize("chain", [SMOKE_CHAIN])
def test_true_round_trip_keeps_every_guest_write(chain: str, debian_root: Path, workdir: Path,
                                                 record_guest: Callable[[Guest], None],
                                                 nestbed_facts: dict[str, Any]) -> None:
    hops = diskfmt.parse_chain(chain)
    # One reader per format here (libyal); the dissect second opinion runs in the nightly tier.
    result = diskfmt.run_chain(debian_root, hops, workdir, boot=BOOT_IMAGE, second_opinion=False,
                               on_guest=record_guest)
    nestbed_facts.update(_facts(result))
    _assert_verified(result)
    # Every hop booted a guest that verified all earlier writes and added its own.
    for i, h in enumerate(result["hops"], start=1):
        assert h["guest"]["writable"] and h["guest"]["wrote"], h
        assert h["guest"]["manifest_verified"] == i, h  # the seed + one file per earlier hop
        assert h["guest"]["remount_ro"] == "ok", h
        assert h["guest"]["changed"], h
    final = result["final"]
    assert final["intact"] and final["manifest_matches"], final
    assert sorted(final["files"]) == sorted(["seed.bin"] + [h["guest"]["wrote"]["name"] for h in result["hops"]])
    assert final["fsck"] == "clean", final
    # force_size=on: the VHD hop kept the size, so the round trip ends where it began.
    assert [h["virtual_size"] for h in result["hops"]] == [result["virtual_size"]] * len(hops)
    assert not any(h["pitfalls"] for h in result["hops"]), [h["pitfalls"] for h in result["hops"]]


@pytest.mark.smoke
@pytest.mark.parametrize("chain", ["vmdk,vpc:force_size=on,vhdx,qcow2,raw"])
def test_random_data_round_trip_without_guests(chain: str, tmp_path: Path, nestbed_facts: dict[str, Any]) -> None:
    """Data that is not a filesystem (8 MiB random, sparse tail), every reader including dissect."""
    src = tmp_path / "src.raw"
    with open(src, "wb") as f:
        f.write(os.urandom(8 << 20))
        f.truncate(64 << 20)
    result = diskfmt.run_chain(src, diskfmt.parse_chain(chain), tmp_path / "hops")
    nestbed_facts.update(_facts(result))
    _assert_verified(result)
    assert result["hops"][-1]["virtual_size"] == 64 << 20


def _expect_pitfalls(fmt: str, hop: dict[str, Any], source_size: int) -> None:
    """The known traps of *fmt*, each asserted exactly where it applies and absent elsewhere."""
    ids = {p["id"] for p in hop["pitfalls"]}
    opts = dict(o.split("=") for o in fmt.split(":")[1:])
    vhd_rounds = fmt.startswith("vpc") and opts.get("force_size") != "on"
    # Without force_size a VHD grows to the next CHS geometry (unless the size already is one).
    want = diskfmt.vhd_chs_size(source_size) if vhd_rounds else source_size
    assert hop["virtual_size"] == want, hop
    assert ("vhd-chs-geometry" in ids) == (want != source_size), hop["pitfalls"]
    assert ("probes-as-other" in ids) == (fmt.startswith("vpc") and opts.get("subformat") == "fixed"), hop
    assert ("guest-write-refused" in ids) == (opts.get("subformat") == "streamOptimized"), hop


@pytest.mark.nightly
@pytest.mark.parametrize("fmt", diskfmt.FORMAT_MATRIX)
def test_format_boots_a_guest_that_keeps_its_writes(fmt: str, debian_root: Path, workdir: Path,
                                                     record_guest: Callable[[Guest], None],
                                                     nestbed_facts: dict[str, Any]) -> None:
    result = diskfmt.run_chain(debian_root, diskfmt.parse_chain(fmt), workdir, boot=BOOT_IMAGE,
                               on_guest=record_guest)
    nestbed_facts.update(_facts(result))
    _assert_verified(result)
    hop = result["hops"][0]
    _expect_pitfalls(fmt, hop, result["virtual_size"])
    g = hop["guest"]
    assert g["manifest_verified"] == 1 and g["remount_ro"] == "ok", g
    if diskfmt.parse_chain(fmt)[0].guest_writable:
        assert g["wrote"] and g["changed"], g
        assert sorted(result["final"]["files"]) == sorted(["seed.bin", g["wrote"]["name"]])
    else:
        # streamOptimized: the guest booted read-only, verified the manifest, and its write was refused.
        assert g["wrote"] is None and "Read-only file system" in (g["refused"] or ""), g
        assert g["changed"] is False, g
        assert sorted(result["final"]["files"]) == ["seed.bin"]
    assert result["final"]["intact"] and result["final"]["fsck"] == "clean", result["final"]


@pytest.mark.nightly
@pytest.mark.parametrize("chain", NIGHTLY_CHAINS)
def test_long_chain_through_old_formats(chain: str, debian_root: Path, workdir: Path,
                                        record_guest: Callable[[Guest], None],
                                        nestbed_facts: dict[str, Any]) -> None:
    hops = diskfmt.parse_chain(chain)
    result = diskfmt.run_chain(debian_root, hops, workdir, boot=BOOT_IMAGE, on_guest=record_guest)
    nestbed_facts.update(_facts(result))
    _assert_verified(result)
    for h in result["hops"]:
        _expect_pitfalls(h["hop"], h, result["virtual_size"] if h["index"] == 1 else
                         result["hops"][h["index"] - 2]["virtual_size"])
    writers = [h["guest"]["wrote"]["name"] for h in result["hops"] if h["guest"]["wrote"]]
    assert len(writers) == sum(h.guest_writable for h in hops)
    assert sorted(result["final"]["files"]) == sorted(["seed.bin", *writers])
    assert result["final"]["intact"] and result["final"]["fsck"] == "clean", result["final"]


@pytest.mark.nightly
@pytest.mark.parametrize("chain", ["vmdk,qcow2:compat=0.10"])
def test_cli_round_trip_of_the_cached_image_itself(chain: str, tmp_path: Path, nestbed_facts: dict[str, Any]) -> None:
    """``nestbed roundtrip <debian-x86_64's own qcow2> --boot debian-x86_64 --json``: the full 2 GiB
    disk, and the cached image is left untouched."""
    img = images.build(BOOT_IMAGE)
    assert img.disk is not None
    before = img.disk.stat().st_mtime_ns, img.disk.stat().st_size
    work = tmp_path / "work"
    try:
        proc = subprocess.run([sys.executable, "-m", "harness", "roundtrip", str(img.disk), "--chain", chain,
                               "--boot", BOOT_IMAGE, "--workdir", str(work), "--json"],
                              capture_output=True, text=True, timeout=1500)
        assert proc.returncode == 0, proc.stderr[-2000:]
        result = json.loads(proc.stdout)
        nestbed_facts.update(_facts(result))
        assert "hop 1/2" in proc.stderr and "hop 2/2" in proc.stderr  # progress lines per hop
        _assert_verified(result)
        assert result["source_format"] == "qcow2" and result["virtual_size"] == 2 << 30
        assert result["final"]["intact"] and len(result["final"]["files"]) == 3
        assert (img.disk.stat().st_mtime_ns, img.disk.stat().st_size) == before
    finally:
        shutil.rmtree(work, ignore_errors=True)
