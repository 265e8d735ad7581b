"""Pitfalls: known traps seen on a hop, reported as facts with stable ids, not hidden: a virtual
size that grew (VHD's CHS geometry without ``force_size``), a format that probes as something
else (a fixed VHD probes as raw unless the format is given), a streamOptimized VMDK refusing
overwrites (measured with ``qemu-io`` on the hop, not assumed)."""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.diskfmt.hops import QUICK_TIMEOUT, DiskFormatError, Hop, last_line, qemu_img, run_tool
from harness.vm.spec import DiskFormat


@dataclass(frozen=True)
class Pitfall:
    """A known trap, seen on this hop.  ``id`` is stable (reports key on it)."""

    id: str
    message: str


VHD_MAX_GEOMETRY = 65535 * 16 * 255  # sectors: the largest CHS a VHD footer can state


def _vhd_geometry(sectors: int) -> tuple[int, int, int]:
    """(cylinders, heads, sectors per track) for *sectors*, by the VHD specification's
    algorithm (as QEMU's vpc driver implements it)."""
    sectors = min(sectors, VHD_MAX_GEOMETRY)
    if sectors >= 65535 * 16 * 63:
        spt, heads = 255, 16
        cth = sectors // spt
    else:
        spt = 17
        cth = sectors // spt
        heads = max(4, -(-cth // 1024))
        if cth >= heads * 1024 or heads > 16:
            spt, heads = 31, 16
            cth = sectors // spt
        if cth >= heads * 1024:
            spt, heads = 63, 16
            cth = sectors // spt
    return cth // heads, heads, spt


def vhd_chs_size(size: int) -> int:
    """The virtual size ``qemu-img`` gives a VHD of *size* bytes without ``force_size``: the
    smallest CHS geometry holding at least *size* (sizes past the CHS range stay as they are)."""
    wanted = min(VHD_MAX_GEOMETRY, size // 512)
    c = h = s = 0
    i = 0
    while wanted > c * h * s:
        c, h, s = _vhd_geometry(wanted + i)
        i += 1
    if c * h * s == VHD_MAX_GEOMETRY:
        return size // 512 * 512
    return c * h * s * 512


def size_pitfall(hop: Hop, before: int, after: int) -> Pitfall | None:
    if before == after:
        return None
    if hop.format is DiskFormat.VPC and dict(hop.options).get("force_size") != "on":
        rule = vhd_chs_size(before)
        return Pitfall("vhd-chs-geometry", f"virtual size grew {before} -> {after} bytes (+{after - before}): "
                                           f"VHD rounds up to a CHS geometry (the rule predicts {rule}"
                                           f"{'' if rule == after else ', NOT what qemu-img did'}); "
                                           "force_size=on keeps it exact")
    return Pitfall("virtual-size-changed", f"virtual size changed {before} -> {after} bytes")


def probe_pitfall(hop: Hop, path: Path, probed: dict[str, Any], virtual_size: int) -> Pitfall | None:
    if probed["format"] == hop.format.value:
        return None
    extra = ""
    if probed["format"] == "raw":
        seen = int(probed["virtual-size"])
        extra = f" (read that way it is {seen} bytes, {seen - virtual_size:+d}: the container's own bytes become data)"
    return Pitfall("probes-as-other", f"{path.name} probes as {probed['format']!r}, not {hop.format.value!r}"
                                      f"{extra}: always pass the format explicitly")


def _first_allocated(path: Path, fmt: DiskFormat) -> int | None:
    proc = qemu_img("map", "--output=json", "-f", fmt.value, str(path), timeout=QUICK_TIMEOUT)
    if proc.returncode != 0:
        raise DiskFormatError(f"qemu-img map {path.name}: {last_line(proc.stderr)}")
    for ext in json.loads(proc.stdout):
        if ext.get("data") and ext.get("length", 0) >= 65536:
            return int(ext["start"])
    return None


def probe_overwrite(path: Path, fmt: DiskFormat, workdir: Path) -> Pitfall | None:
    """Try to overwrite one allocated 64 KiB of *path* with the bytes already there (so the
    data cannot change either way) through QEMU's own block layer (``qemu-io``).

    A pitfall when QEMU refuses (a streamOptimized VMDK: "Could not write to allocated
    cluster for streamOptimized"); None when the write went through.
    """
    offset = _first_allocated(path, fmt)
    if offset is None:
        return None
    same = workdir / f".probe-{secrets.token_hex(4)}.bin"
    try:
        proc = qemu_img("dd", "-f", fmt.value, "-O", "raw", "bs=65536", f"skip={offset // 65536}", "count=1",
                        f"if={path}", f"of={same}", timeout=QUICK_TIMEOUT)
        if proc.returncode != 0:
            raise DiskFormatError(f"qemu-img dd {path.name}: {last_line(proc.stderr)}")
        # qemu-io splits its command at spaces (no quoting): name the pattern file relative to its cwd.
        proc = run_tool(["qemu-io", "-f", fmt.value, "-c", f"write -s {same.name} {offset} 64k", str(path.resolve())],
                        QUICK_TIMEOUT, cwd=workdir)
    finally:
        same.unlink(missing_ok=True)
    said = (proc.stdout + proc.stderr).strip()
    if proc.returncode == 0 and "failed" not in said.lower():
        return None
    if "write failed" not in said.lower():  # not a refusal: the probe itself went wrong
        raise DiskFormatError(f"qemu-io write probe of {path.name} ({fmt.value}) failed: {last_line(said)}")
    reason = next((ln.split(":", 1)[1].strip() for ln in said.splitlines() if ln.startswith("qemu-io:")),
                  last_line(said))
    return Pitfall("guest-write-refused", f"QEMU refuses to overwrite allocated data at offset {offset}: "
                                          f"{reason!r}; guests get I/O errors, so the guest hop is read-only")
