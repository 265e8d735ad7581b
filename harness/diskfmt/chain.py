"""The chain: :func:`run_chain` converts a source through its hops, verifying each (see the
package doc), and :func:`render_text` shows the result."""

from __future__ import annotations

import contextlib
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

# convert and guest_hop are looked up on their modules when called, so a monkeypatch of
# diskfmt.hops.convert or diskfmt.verify.guest_hop applies to the chain.
from harness.diskfmt import hops, verify
from harness.diskfmt.hops import EXTENSION, DiskFormatError, Hop, image_files, info
from harness.diskfmt.pitfalls import probe_overwrite, probe_pitfall, size_pitfall
from harness.diskfmt.readers import independent_hashes, no_reader_note, raw_reader
from harness.diskfmt.verify import (
    check,
    check_extents,
    compare,
    ext4_uuid,
    file_digest,
    qemu_hash,
    seed_manifest,
    verify_final,
)
from harness.errors import UsageError
from harness.vm.spec import DiskFormat

if TYPE_CHECKING:
    from harness.guest import Guest


@dataclass
class HopResult:
    index: int
    hop: str
    format: str
    source: str  # the image this hop was converted from
    path: str
    seconds: float
    virtual_size: int
    file_size: int
    files: list[str]
    probed_as: str
    check: str
    compare: str
    reader: str | None
    reader_hash_matches: bool | None  # None: no independent reader read this hop (not a match)
    reader_note: str | None  # why no reader read it (None when one did)
    readers: list[dict[str, Any]]
    sha256: str  # the virtual data this hop carries (its reference's, as QEMU read it)
    pitfalls: list[dict[str, str]] = field(default_factory=list)
    guest: dict[str, Any] | None = None
    sha256_after_guest: str | None = None
    verify_seconds: float = 0.0


@contextlib.contextmanager
def _at_hop(index: int, hop: Hop) -> Iterator[None]:
    """A DiskFormatError inside says which hop it is about."""
    try:
        yield
    except DiskFormatError as exc:
        raise DiskFormatError(f"hop {index} ({hop.label}): {exc}") from None


def _boot_image(name: str) -> Any:
    from harness.images import store as images

    img = images.build(name)
    if img.disk is None:
        raise UsageError(f"--boot {name}: that image boots from an initramfs and has no root disk")
    return img


def run_chain(source: Path, chain: list[Hop], workdir: Path, *, source_format: DiskFormat | None = None,
              progress: Callable[[str], None] | None = None, boot: str | None = None,
              second_opinion: bool = True, log_dir: Path | None = None,
              on_guest: Callable[[Guest], None] | None = None) -> dict[str, Any]:
    """Convert *source* through *chain* in *workdir*, verifying every hop (see the package doc, harness.diskfmt).

    With *boot* (an image name whose kernel boots *source*'s root filesystem), the source is
    first copied to ``workdir/seeded.raw`` and a manifest written into it; *source* itself is
    never modified.  Returns the JSON-able result documented in docs/disk-formats.md.
    """
    say = progress or (lambda _m: None)
    started = time.monotonic()
    workdir.mkdir(parents=True, exist_ok=True)
    if not source.is_file():
        raise DiskFormatError(f"{source}: no such file")
    src_info = info(source, source_format)
    src_fmt = DiskFormat(source_format or src_info["format"])
    size = int(src_info["virtual-size"])
    if size == 0:
        raise DiskFormatError(f"{source}: virtual size is 0 bytes: nothing to convert")
    say(f"checking the source ({src_fmt.value}, {size} bytes)")
    src_check = check(source, src_fmt)
    check_extents(source, src_fmt)
    directory = f"/nestbed-roundtrip-{secrets.token_hex(4)}"
    expected: dict[str, str] = {}
    seeded = workdir / "seeded.raw"
    if boot is not None:
        img = _boot_image(boot)
        say(f"copying the source to {seeded.name}")
        hops.convert(source, src_fmt, seeded, Hop(DiskFormat.RAW))
        say("hashing the source as QEMU reads it")
        src_hash = raw_reader(seeded, size)  # the copy is what QEMU read
    else:
        say("hashing the source as QEMU reads it")
        src_hash = qemu_hash(source, src_fmt, size, workdir)
    result: dict[str, Any] = {"source": str(source), "source_format": src_fmt.value, "virtual_size": size,
                              "sha256": src_hash, "source_check": src_check, "boot": boot, "seeded": None,
                              "hops": [], "final": None}
    ref, ref_fmt, ref_hash = source, src_fmt, src_hash
    if boot is not None:
        fs_uuid = ext4_uuid(seeded)
        want = img.manifest.get("rootfs_uuid")
        if fs_uuid is None:
            raise DiskFormatError(f"--boot {boot}: {source} has no ext4 filesystem at its start "
                                  "(nestbed boots whole-disk ext4 roots)")
        if want and fs_uuid != want:
            raise DiskFormatError(f"--boot {boot}: {source}'s filesystem UUID {fs_uuid} is not {boot}'s root "
                                  f"({want}): that kernel command line cannot find it")
        say(f"writing a seed file and its sha256 manifest into {seeded.name}'s ext4 ({directory}, debugfs)")
        expected = seed_manifest(seeded, directory, workdir)
        ref, ref_fmt = seeded, DiskFormat.RAW
        ref_hash = raw_reader(seeded, size)
        result["seeded"] = {"path": str(seeded), "directory": directory, "sha256": ref_hash, "files": dict(expected)}
    image_name = boot
    for i, hop in enumerate(chain, start=1):
        dst = workdir / f"hop{i}.{EXTENSION[hop.format]}"
        for stale in image_files(dst):
            stale.unlink(missing_ok=True)
        say(f"hop {i}/{len(chain)}: {ref_fmt.value} -> {hop.label}: converting")
        seconds = hops.convert(ref, ref_fmt, dst, hop)
        t0 = time.monotonic()
        dinfo = info(dst, hop.format)
        probed = info(dst)
        vsize = int(dinfo["virtual-size"])
        prev_size = result["hops"][-1]["virtual_size"] if result["hops"] else size
        pitfalls = [p for p in (size_pitfall(hop, prev_size, vsize), probe_pitfall(hop, dst, probed, vsize)) if p]
        say(f"hop {i}/{len(chain)}: {hop.label}: qemu-img check and compare")
        with _at_hop(i, hop):
            checked = check(dst, hop.format)
            check_extents(dst, hop.format)
            compared = compare(ref, ref_fmt, dst, hop.format)

        def hop_say(m: str, i: int = i) -> None:
            say(f"hop {i}/{len(chain)}: {m}")

        with _at_hop(i, hop):
            hashes = independent_hashes(dst, hop.format, size, second_opinion=second_opinion, say=hop_say)
        readers: list[dict[str, Any]] = [{"name": n, "sha256": h, "matches": h == ref_hash} for n, h in hashes]
        for r in readers:
            if not r["matches"]:
                raise DiskFormatError(f"hop {i} ({hop.label}): independent reader {r['name']} reads {dst.name} as "
                                      f"different data than QEMU reads {ref.name} (sha256 {r['sha256'][:16]} vs "
                                      f"{ref_hash[:16]})")
        # Whether QEMU lets a guest overwrite this hop is measured, not assumed from the format name.
        refused = probe_overwrite(dst, hop.format, workdir)
        if refused is not None:
            pitfalls.append(refused)
        files = image_files(dst)
        hr = HopResult(
            index=i, hop=hop.label, format=hop.format.value, source=str(ref), path=str(dst),
            seconds=round(seconds, 3), virtual_size=vsize, file_size=sum(p.stat().st_size for p in files),
            files=[p.name for p in files], probed_as=probed["format"], check=checked, compare=compared,
            reader=readers[0]["name"] if readers else None,
            reader_hash_matches=all(r["matches"] for r in readers) if readers else None,
            reader_note=None if readers else no_reader_note(hop.format) or "no independent reader read this hop",
            readers=readers,
            sha256=ref_hash, pitfalls=[asdict(p) for p in pitfalls], verify_seconds=round(time.monotonic() - t0, 3))
        next_hash = ref_hash
        if image_name is not None:
            writable = refused is None
            say(f"hop {i}/{len(chain)}: booting {image_name} from {dst.name} "
                f"({hop.format.value}, {'read-write' if writable else 'read-only'})")
            before = None if writable else file_digest(files)
            gc = verify.guest_hop(image_name, dst, hop.format, index=i, directory=directory, expected=expected,
                            writable=writable, log_dir=log_dir, on_guest=on_guest)
            if gc.wrote:
                expected[gc.wrote["name"]] = gc.wrote["sha256"]
                say(f"hop {i}/{len(chain)}: hashing what the guest left")
                next_hash = qemu_hash(dst, hop.format, size, workdir)
                gc.changed = next_hash != ref_hash
                if not gc.changed:
                    raise DiskFormatError(f"hop {i} ({hop.label}): the guest wrote {gc.wrote['name']} but "
                                          f"{dst.name}'s data did not change (sha256 still {ref_hash[:16]}): "
                                          "the write was lost")
            else:
                gc.changed = file_digest(files) != before
                if gc.changed:
                    raise DiskFormatError(f"hop {i} ({hop.label}): {', '.join(p.name for p in files)} changed "
                                          "under a read-only guest (the files differ from before it booted)")
            hr.guest = asdict(gc)
            hr.sha256_after_guest = next_hash
        result["hops"].append(asdict(hr))
        ref, ref_fmt, ref_hash = dst, hop.format, next_hash
    if image_name is not None:
        result["final"] = verify_final(ref, ref_fmt, directory, expected, workdir, say)
    result["seconds"] = round(time.monotonic() - started, 2)
    return result


def render_text(result: dict[str, Any]) -> str:
    """The human-readable form of a :func:`run_chain` result."""
    lines = [f"source {result['source']} ({result['source_format']}, {result['virtual_size']} bytes, "
             f"check {result['source_check']}) sha256 {result['sha256'][:16]}"]
    if result.get("seeded"):
        s = result["seeded"]
        lines.append(f"seeded {s['path']}: {', '.join(s['files'])} in {s['directory']} (sha256 {s['sha256'][:16]})")
    for hop in result["hops"]:
        readers = ", ".join(f"{r['name']} {'same data' if r['matches'] else 'DIFFERENT'}" for r in hop["readers"]) \
            or "no independent reader"
        lines.append(f"  {hop['index']:2} {hop['hop']:38} {hop['seconds']:6.2f}s {hop['virtual_size']:>12} B  "
                     f"check={hop['check']} compare={hop['compare']}  {readers}")
        if hop.get("reader_note"):
            lines.append(f"       unread: {hop['reader_note']}")
        for pitfall in hop["pitfalls"]:
            lines.append(f"       pitfall {pitfall['id']}: {pitfall['message']}")
        g = hop.get("guest")
        if g:
            did = f"wrote {g['wrote']['name']}" if g["wrote"] else f"read-only: {g['refused']}"
            lines.append(f"       guest {g['image']}: ready {g['ready_seconds'] or 0:.1f}s, verified "
                         f"{g['manifest_verified']} files, {did}, remount ro {g['remount_ro']} ({g['seconds']:.1f}s)")
    final = result.get("final")
    if final:
        lines.append(f"final: {len(final['files'])} files {'intact' if final['intact'] else 'NOT intact'} "
                     f"({', '.join(final['files'])}); e2fsck -fn: {final['fsck']}")
    return "\n".join(lines)
