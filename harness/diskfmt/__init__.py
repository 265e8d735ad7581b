"""Disk-format conversion chains, each hop verified independently.

A chain is ``FMT[:OPT=VAL[:OPT=VAL...]],FMT...``, e.g.
``vmdk:subformat=streamOptimized,vpc:subformat=fixed:force_size=on,vhdx,qcow2:compat=0.10,raw``.
Every hop is converted with ``qemu-img convert`` and checked four ways:

1. ``qemu-img check`` (where the format supports checks);
2. ``qemu-img compare`` against the hop's reference (the chain's source, or the image the
   previous hop's guest left behind);
3. independent readers hashing the virtual disk: libyal's Python bindings (libvmdk, libvhdi
   for VHD and VHDX, libqcow), dissect.hypervisor where installed (the only reader of VDI,
   and a second opinion elsewhere), plain Python for raw; each must read the reference's data.
   A format no reader knows (QED; VDI without dissect) is recorded as unread
   (``reader_hash_matches: null`` and a ``reader_note`` saying why), never as a match;
4. with ``boot=IMAGE``, a guest of that image booting from the hop as its root disk: it checks
   a manifest of sha256 sums written into the filesystem before the chain starts, writes a
   new file and adds it to the manifest, remounts its root read-only and powers off; the next
   hop converts the image the guest left behind.  At the end the last image's files are read
   on the host (``debugfs``, no mount) and every guest's writes must be there.

Pitfalls are reported as facts with stable ids, not hidden: a virtual size that grew (VHD's
CHS geometry without ``force_size``), a format that probes as something else (a fixed VHD
probes as raw unless the format is given), a streamOptimized VMDK refusing overwrites
(measured with ``qemu-io`` on the hop, not assumed).

Corrupt or truncated inputs are :class:`DiskFormatError` with one line naming the file and
qemu-img's own words; every subprocess has a timeout.

The modules, each importing only those before it: :mod:`~harness.diskfmt.hops` (chains, hops,
qemu-img), :mod:`~harness.diskfmt.readers` (the independent readers), :mod:`~harness.diskfmt.verify`
(check, compare, the manifest and the guest hop), :mod:`~harness.diskfmt.pitfalls`,
:mod:`~harness.diskfmt.chain` (:func:`run_chain` and its result).  This package re-exports their
public names.
"""

from __future__ import annotations

from harness.diskfmt.chain import HopResult, render_text, run_chain
from harness.diskfmt.hops import (
    EXTENSION,
    FORMAT_MATRIX,
    FORMAT_OPTIONS,
    QEMU_IMG_TIMEOUT,
    QUICK_TIMEOUT,
    DiskFormatError,
    Hop,
    convert,
    convert_argv,
    image_files,
    info,
    last_line,
    parse_chain,
    qemu_img,
    run_tool,
)
from harness.diskfmt.pitfalls import (
    VHD_MAX_GEOMETRY,
    Pitfall,
    probe_overwrite,
    probe_pitfall,
    size_pitfall,
    vhd_chs_size,
)
from harness.diskfmt.readers import (
    HASH_CHUNK,
    NO_READER_WHY,
    READERS,
    Reader,
    ReaderEntry,
    independent_hash,
    independent_hashes,
    no_reader_note,
    raw_reader,
    register_reader,
)
from harness.diskfmt.verify import (
    EXT4_MAGIC_AT,
    EXT4_SB,
    EXT4_UUID_AT,
    GUEST_CMD_TIMEOUT,
    GUEST_WRITE_BYTES,
    SEED_BYTES,
    GuestCheck,
    check,
    check_extents,
    compare,
    debugfs,
    ext4_uuid,
    file_digest,
    guest_hop,
    parse_manifest,
    qemu_hash,
    read_files,
    seed_manifest,
    verify_final,
)

__all__ = [
    # hops
    "EXTENSION", "FORMAT_MATRIX", "FORMAT_OPTIONS", "QEMU_IMG_TIMEOUT", "QUICK_TIMEOUT", "DiskFormatError", "Hop",
    "convert", "convert_argv", "image_files", "info", "last_line", "parse_chain", "qemu_img", "run_tool",
    # readers
    "HASH_CHUNK", "NO_READER_WHY", "READERS", "Reader", "ReaderEntry", "independent_hash", "independent_hashes",
    "no_reader_note", "raw_reader", "register_reader",
    # verify
    "EXT4_MAGIC_AT", "EXT4_SB", "EXT4_UUID_AT", "GUEST_CMD_TIMEOUT", "GUEST_WRITE_BYTES", "SEED_BYTES", "GuestCheck",
    "check", "check_extents", "compare", "debugfs", "ext4_uuid", "file_digest", "guest_hop", "parse_manifest",
    "qemu_hash", "read_files", "seed_manifest", "verify_final",
    # pitfalls
    "VHD_MAX_GEOMETRY", "Pitfall", "probe_overwrite", "probe_pitfall", "size_pitfall", "vhd_chs_size",
    # chain
    "HopResult", "render_text", "run_chain",
]
