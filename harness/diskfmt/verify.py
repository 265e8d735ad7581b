"""Verifying a hop: ``qemu-img check`` and ``compare``, hashes as QEMU reads an image, and the
guest part: a manifest of sha256 sums inside the image's ext4, written and read on the host
(``debugfs``, no mount) and checked by a guest booted from the hop (:func:`guest_hop`)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

# convert is called as hops.convert (looked up when called), so a monkeypatch of it applies here too.
from harness.diskfmt import hops
from harness.diskfmt.hops import QUICK_TIMEOUT, DiskFormatError, Hop, image_files, last_line, qemu_img, run_tool
from harness.diskfmt.readers import HASH_CHUNK, raw_reader
from harness.vm.spec import DiskFormat

if TYPE_CHECKING:
    from harness.guest import Guest

GUEST_CMD_TIMEOUT = 120.0
SEED_BYTES = 1 << 20  # the seed file written into the filesystem before the chain
GUEST_WRITE_BYTES = 1 << 20  # what each writable guest hop adds

# ext4's superblock sits 1024 bytes in; its magic and UUID at fixed offsets in it.
EXT4_SB, EXT4_MAGIC_AT, EXT4_UUID_AT = 1024, 0x38, 0x68


# -- qemu-img check and compare -----------------------------------------------------------------

def check(path: Path, fmt: DiskFormat) -> str:
    """'ok', 'leaks' (leaked clusters only: harmless), 'unsupported' (the format has no
    checks), or DiskFormatError with qemu-img's findings (corruption, or a check that could
    not complete)."""
    proc = qemu_img("check", "-f", fmt.value, str(path))
    out = (proc.stdout + proc.stderr).strip()
    if proc.returncode == 0:
        return "ok"
    if proc.returncode == 63 or "does not support checks" in out:
        return "unsupported"
    if proc.returncode == 3:
        return "leaks"
    what = "corrupt" if proc.returncode == 2 else "check did not complete"
    first = next((ln.strip() for ln in out.splitlines() if "error" in ln.lower()), last_line(out))
    raise DiskFormatError(f"qemu-img check {path} ({fmt.value}): {what} (exit {proc.returncode}): {first}")


def check_extents(path: Path, fmt: DiskFormat) -> None:
    """DiskFormatError if the image maps virtual data to file offsets past the end of its file:
    a truncated image that ``qemu-img check`` passes (a VDI cut in half checks clean; QEMU then
    reads the lost data as zeros).  Single-file images only (a split or flat VMDK's offsets are
    in its extent files); compressed clusters have no offset and are not judged."""
    if fmt is DiskFormat.RAW or len(image_files(path)) > 1:
        return
    proc = qemu_img("map", "--output=json", "-f", fmt.value, str(path), timeout=QUICK_TIMEOUT)
    if proc.returncode != 0:
        raise DiskFormatError(f"qemu-img map {path}: {last_line(proc.stderr)}")
    size = path.stat().st_size
    for ext in json.loads(proc.stdout):
        if ext.get("data") and "offset" in ext and ext["offset"] + ext["length"] > size:
            raise DiskFormatError(f"{path} ({fmt.value}) is truncated: virtual bytes {ext['start']}.."
                                  f"{ext['start'] + ext['length'] - 1} are mapped to file offset {ext['offset']}, "
                                  f"past the end of the {size}-byte file")


def compare(a: Path, a_fmt: DiskFormat, b: Path, b_fmt: DiskFormat) -> str:
    """'identical' (a larger image's extra tail must read as zeros), else DiskFormatError naming
    both files and what qemu-img found (the first differing offset, or why it could not compare)."""
    proc = qemu_img("compare", "-f", a_fmt.value, "-F", b_fmt.value, str(a), str(b))
    if proc.returncode == 0:
        return "identical"
    what = "differ" if proc.returncode == 1 else f"could not compare (exit {proc.returncode})"
    raise DiskFormatError(f"qemu-img compare {a.name} ({a_fmt.value}) {b.name} ({b_fmt.value}): {what}: "
                          f"{last_line(proc.stdout + proc.stderr)}")


def qemu_hash(path: Path, fmt: DiskFormat, size: int, workdir: Path) -> str:
    """sha256 of the first *size* bytes of the virtual disk as QEMU reads it."""
    if fmt is DiskFormat.RAW:
        return raw_reader(path, size)
    tmp = workdir / f".hash-{secrets.token_hex(4)}.raw"
    hops.convert(path, fmt, tmp, Hop(DiskFormat.RAW))
    try:
        return raw_reader(tmp, size)
    finally:
        tmp.unlink(missing_ok=True)


def file_digest(paths: list[Path]) -> str:
    """sha256 of the files themselves (not the virtual disk): did anything touch them?"""
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            while block := f.read(HASH_CHUNK * 4):
                h.update(block)
    return h.hexdigest()


# -- the guest part: a manifest of checksums inside the image's ext4 -------------------------

def ext4_uuid(path: Path) -> str | None:
    """The UUID of an ext4 filesystem starting at byte 0 of *path* (a raw image), else None."""
    with open(path, "rb") as f:
        f.seek(EXT4_SB)
        sb = f.read(0x78)
    if len(sb) < 0x78 or sb[EXT4_MAGIC_AT:EXT4_MAGIC_AT + 2] != b"\x53\xef":
        return None
    u = sb[EXT4_UUID_AT:EXT4_UUID_AT + 16].hex()
    return f"{u[:8]}-{u[8:12]}-{u[12:16]}-{u[16:20]}-{u[20:]}"


def debugfs(image: Path, commands: list[str], *, write: bool = False) -> str:
    """Run *commands* with ``debugfs`` on the ext4 in *image* (raw); its output, or DiskFormatError
    with the first complaint."""
    with tempfile.NamedTemporaryFile("w", suffix=".debugfs", dir=image.parent) as script:
        script.write("\n".join(commands) + "\n")
        script.flush()
        proc = run_tool(["debugfs", *(["-w"] if write else []), "-f", script.name, str(image)], QUICK_TIMEOUT)
    # debugfs exits 0 even when a command fails; its complaints go to stderr.
    errors = [ln for ln in proc.stderr.splitlines()
              if ln.strip() and not ln.startswith("debugfs ") and "EXT2_ET" not in ln]
    if proc.returncode != 0 or errors:
        raise DiskFormatError(f"debugfs on {image.name}: {errors[0] if errors else last_line(proc.stderr)}")
    return proc.stdout


def seed_manifest(raw: Path, directory: str, workdir: Path) -> dict[str, str]:
    """Write a random seed file and a sha256 manifest into the ext4 in *raw* (no mount);
    returns {file name: sha256}."""
    seed = workdir / "seed.bin"
    seed.write_bytes(os.urandom(SEED_BYTES))
    files = {"seed.bin": hashlib.sha256(seed.read_bytes()).hexdigest()}
    manifest = workdir / "MANIFEST.sha256"
    manifest.write_text("".join(f"{h}  {n}\n" for n, h in files.items()))
    debugfs(raw, [f"mkdir {directory}", f'write "{seed}" {directory}/seed.bin',
                  f'write "{manifest}" {directory}/MANIFEST.sha256'], write=True)
    return files


def read_files(raw: Path, directory: str, workdir: Path) -> dict[str, bytes]:
    """{file name: content} of every file in *directory* of the ext4 in *raw*, read on the host."""
    out = workdir / f".dump-{secrets.token_hex(4)}"
    out.mkdir()
    try:
        debugfs(raw, [f'rdump {directory} "{out}"'])
        got = out / Path(directory).name
        return {p.name: p.read_bytes() for p in sorted(got.iterdir()) if p.is_file()}
    finally:
        shutil.rmtree(out, ignore_errors=True)


def parse_manifest(text: str) -> dict[str, str]:
    """``sha256sum`` output → {name: sha256}; DiskFormatError on a malformed line."""
    files = {}
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        m = re.fullmatch(r"([0-9a-f]{64}) [ *](\S+)", line.strip())
        if not m:
            raise DiskFormatError(f"manifest line {n} is not 'SHA256  NAME': {line[:80]!r}")
        files[m.group(2)] = m.group(1)
    return files


@dataclass
class GuestCheck:
    """What a guest booted from a hop saw and did."""

    image: str
    writable: bool
    ready_seconds: float | None = None
    manifest_verified: int = 0  # files whose sha256 the guest checked
    wrote: dict[str, str] | None = None  # {"name", "sha256"} of the file it added
    refused: str | None = None  # read-only hops: the guest's own error when it tried to write
    remount_ro: str = ""  # "ok" or why not (then the next mount replays the journal)
    changed: bool | None = None  # whether the image's virtual data changed
    seconds: float = 0.0
    serial_log: str | None = None


def guest_hop(image: str, disk: Path, fmt: DiskFormat, *, index: int, directory: str, expected: dict[str, str],
              writable: bool, log_dir: Path | None, on_guest: Callable[[Guest], None] | None) -> GuestCheck:
    """Boot *image* from *disk* as its root: check the manifest, add a file (or, read-only, fail
    to), remount the root read-only and power off."""
    from harness.guest import BootOptions, boot
    from harness.vm.spec import Drive

    started = time.monotonic()
    # A read-only drive needs a read-only root mount, or the initramfs' rw mount fails.
    opts = BootOptions(root_disk=Drive(disk, fmt, read_only=not writable, serial="nestbed-root"),
                       append="" if writable else "ro")
    result = GuestCheck(image=image, writable=writable)
    with boot(image, options=opts, log_dir=log_dir) as g:
        if on_guest is not None:
            on_guest(g)
        result.ready_seconds = g.ready_seconds
        result.serial_log = str(g.machine.serial_log_path)
        listed = parse_manifest(g.check_output(f"cat {directory}/MANIFEST.sha256", timeout=GUEST_CMD_TIMEOUT))
        if listed != expected:
            missing = sorted(set(expected) - set(listed))
            raise DiskFormatError(f"hop {index} ({disk.name}): the guest's manifest differs from the record "
                                  f"(missing {missing or 'none'}, extra {sorted(set(listed) - set(expected)) or 'none'})")
        r = g.run(f"cd {directory} && sha256sum -c MANIFEST.sha256", timeout=GUEST_CMD_TIMEOUT)
        bad = [ln for ln in r.stdout.splitlines() if not ln.endswith(": OK")]
        if r.exit_status != 0 or bad:
            raise DiskFormatError(f"hop {index} ({disk.name}): the guest's sha256sum -c failed: "
                                  f"{(bad or [last_line(r.stderr)])[0]}")
        result.manifest_verified = len(r.stdout.splitlines())
        name = f"hop{index:02d}-{fmt.value}.bin"
        if writable:
            out = g.check_output(
                f"cd {directory} && head -c {GUEST_WRITE_BYTES} /dev/urandom > {name} && sha256sum {name} "
                f"| tee -a MANIFEST.sha256 && sync", timeout=GUEST_CMD_TIMEOUT)
            result.wrote = {"name": name, "sha256": parse_manifest(out)[name]}
        else:
            r = g.run(f"touch {directory}/{name}", timeout=GUEST_CMD_TIMEOUT)
            if r.exit_status == 0:
                raise DiskFormatError(f"hop {index} ({disk.name}): a read-only root disk accepted a write")
            result.refused = last_line(r.stderr or r.stdout)
        # A clean filesystem for the next hop: nothing to replay, and a read-only hop can mount it.
        r = g.run("sync && mount -o remount,ro /", timeout=GUEST_CMD_TIMEOUT)
        result.remount_ro = "ok" if r.exit_status == 0 else last_line(r.stderr or r.stdout)
    result.seconds = round(time.monotonic() - started, 2)
    return result


def verify_final(path: Path, fmt: DiskFormat, directory: str, expected: dict[str, str], workdir: Path,
                 say: Callable[[str], None]) -> dict[str, Any]:
    """Read the manifest directory of the chain's last image on the host and fsck it."""
    say(f"reading {directory} from {path.name} on the host (debugfs) and running e2fsck -fn")
    raw = path if fmt is DiskFormat.RAW else workdir / ".final.raw"
    if raw != path:
        hops.convert(path, fmt, raw, Hop(DiskFormat.RAW))
    try:
        contents = read_files(raw, directory, workdir)
        fsck = run_tool(["e2fsck", "-fn", str(raw)], QUICK_TIMEOUT * 2)
    finally:
        if raw != path:
            raw.unlink(missing_ok=True)
    listed = parse_manifest(contents.pop("MANIFEST.sha256", b"").decode(errors="replace"))
    got = {name: hashlib.sha256(data).hexdigest() for name, data in contents.items()}
    missing = sorted(set(expected) - set(got))
    mismatched = sorted(n for n in expected if n in got and got[n] != expected[n])
    out = {"directory": directory, "files": expected, "manifest_matches": listed == expected,
           "intact": not missing and not mismatched and listed == expected, "missing": missing,
           "mismatched": mismatched,
           "fsck": "clean" if fsck.returncode == 0 else f"exit {fsck.returncode}: {last_line(fsck.stdout)}"}
    if not out["intact"]:
        raise DiskFormatError(f"{path.name}: the guests' writes are not intact at the end: missing "
                              f"{missing or 'none'}, different {mismatched or 'none'}, manifest "
                              f"{'as recorded' if listed == expected else 'differs from the record'}")
    return out
