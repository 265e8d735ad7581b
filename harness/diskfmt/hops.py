"""Hops and qemu-img: what a chain is (:class:`Hop`, :func:`parse_chain`), how a hop is made
(:func:`convert`), and the subprocess plumbing every other diskfmt module runs qemu-img and
friends through (:func:`run_tool`, :func:`qemu_img`, :func:`last_line`)."""

from __future__ import annotations

import json
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.core.run import run
from harness.errors import HarnessError, UsageError
from harness.vm.spec import DiskFormat

QEMU_IMG_TIMEOUT = 600.0
QUICK_TIMEOUT = 60.0  # info, map, dd, qemu-io probes, debugfs: small work

# Options qemu-img accepts per format that chains may set (anything else is refused early).
FORMAT_OPTIONS: dict[DiskFormat, dict[str, tuple[str, ...]]] = {
    DiskFormat.RAW: {},
    DiskFormat.QCOW2: {"compat": ("0.10", "1.1"), "cluster_size": ()},
    DiskFormat.VMDK: {"subformat": ("monolithicSparse", "monolithicFlat", "streamOptimized",
                                    "twoGbMaxExtentSparse", "twoGbMaxExtentFlat"), "adapter_type": ()},
    DiskFormat.VPC: {"subformat": ("dynamic", "fixed"), "force_size": ("on", "off")},
    DiskFormat.VHDX: {"subformat": ("dynamic", "fixed"), "block_size": ()},
    DiskFormat.VDI: {"static": ("on", "off")},
    DiskFormat.QED: {"cluster_size": ()},
}
EXTENSION = {DiskFormat.RAW: "raw", DiskFormat.QCOW2: "qcow2", DiskFormat.VMDK: "vmdk", DiskFormat.VPC: "vhd",
             DiskFormat.VHDX: "vhdx", DiskFormat.VDI: "vdi", DiskFormat.QED: "qed"}

# Every format and subformat the round-trip scenarios cover, as chain hops (the ``fmt`` ids).
FORMAT_MATRIX: tuple[str, ...] = (
    "raw",
    "qcow2:compat=0.10", "qcow2:compat=1.1",
    "vmdk:subformat=monolithicSparse", "vmdk:subformat=monolithicFlat",
    "vmdk:subformat=streamOptimized", "vmdk:subformat=twoGbMaxExtentSparse",
    "vpc:subformat=dynamic", "vpc:subformat=dynamic:force_size=on",
    "vpc:subformat=fixed", "vpc:subformat=fixed:force_size=on",
    "vhdx", "vdi", "qed",
)


class DiskFormatError(HarnessError):
    """A conversion or a verification step failed (one line: what, where, and why)."""


@dataclass(frozen=True)
class Hop:
    """One conversion target: a format and its ``qemu-img create`` options."""

    format: DiskFormat
    options: tuple[tuple[str, str], ...] = ()

    @property
    def label(self) -> str:
        return ":".join([self.format.value, *(f"{k}={v}" for k, v in self.options)])

    @property
    def guest_writable(self) -> bool:
        """False for formats QEMU is known not to let a guest overwrite (streamOptimized VMDK).
        :func:`run_chain` measures it on every hop (:func:`probe_overwrite`); this is the expectation."""
        return dict(self.options).get("subformat") != "streamOptimized"

    @property
    def qemu_options(self) -> str:
        return ",".join(f"{k}={v}" for k, v in self.options)


def parse_chain(text: str) -> list[Hop]:
    """Parse ``FMT[:OPT=VAL...],...``; UsageError naming the bad hop otherwise."""
    hops = []
    for i, raw in enumerate(filter(None, (h.strip() for h in text.split(","))), start=1):
        name, *opts = raw.split(":")
        try:
            fmt = DiskFormat(name)
        except ValueError:
            raise UsageError(f"--chain hop {i} {raw!r}: unknown format {name!r} "
                             f"(known: {', '.join(f.value for f in DiskFormat)})") from None
        pairs = []
        for opt in opts:
            key, sep, value = opt.partition("=")
            allowed = FORMAT_OPTIONS[fmt]
            if not sep or key not in allowed:
                raise UsageError(f"--chain hop {i} {raw!r}: {fmt.value} takes options "
                                 f"{', '.join(sorted(allowed)) or '(none)'} as KEY=VALUE, not {opt!r}")
            if allowed[key] and value not in allowed[key]:
                raise UsageError(f"--chain hop {i} {raw!r}: {key} must be one of {', '.join(allowed[key])}")
            pairs.append((key, value))
        hops.append(Hop(fmt, tuple(pairs)))
    if not hops:
        raise UsageError("--chain is empty")
    return hops


# -- qemu-img ------------------------------------------------------------------------------

def run_tool(argv: list[str], timeout: float, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run a disk tool (qemu-img, qemu-io, debugfs, e2fsck); a missing tool or a timeout is a
    :class:`DiskFormatError`, a non-zero exit is the caller's to judge."""
    return run(argv, timeout=timeout, what=" ".join(argv[:2]), error=DiskFormatError, cwd=cwd, check=False)


def qemu_img(*args: str, timeout: float = QEMU_IMG_TIMEOUT) -> subprocess.CompletedProcess[str]:
    return run_tool(["qemu-img", *args], timeout)


def last_line(text: str) -> str:
    """The last non-blank line of a tool's output: where qemu-img and friends say what went wrong."""
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else "(no message)"


def info(path: Path, fmt: DiskFormat | None = None) -> dict[str, Any]:
    """``qemu-img info`` as a dict; a clear error for anything qemu-img cannot open."""
    args = ["info", "--output=json", *(["-f", fmt.value] if fmt else []), str(path)]
    proc = qemu_img(*args, timeout=QUICK_TIMEOUT)
    if proc.returncode != 0:
        as_what = f" as {fmt.value}" if fmt else ""
        raise DiskFormatError(f"{path}: not a readable disk image{as_what}: {last_line(proc.stderr)}")
    data: dict[str, Any] = json.loads(proc.stdout)
    return data


def convert_argv(src: Path, src_fmt: DiskFormat, dst: Path, hop: Hop) -> list[str]:
    """The exact ``qemu-img convert`` command line of a hop (also what the benchmark runs bare)."""
    opts = hop.qemu_options
    return ["qemu-img", "convert", "-f", src_fmt.value, "-O", hop.format.value,
            *(["-o", opts] if opts else []), str(src), str(dst)]


def convert(src: Path, src_fmt: DiskFormat, dst: Path, hop: Hop) -> float:
    """Convert *src* to *dst* as *hop* says; seconds taken."""
    started = time.monotonic()
    proc = run_tool(convert_argv(src, src_fmt, dst, hop), QEMU_IMG_TIMEOUT)
    if proc.returncode != 0:
        raise DiskFormatError(f"qemu-img convert {src.name} ({src_fmt.value}) to {hop.label} failed: "
                              f"{last_line(proc.stderr)}")
    return time.monotonic() - started


def image_files(path: Path) -> list[Path]:
    """The files an image consists of: *path* and, for split or flat VMDKs, its extents."""
    extents = sorted(p for p in path.parent.glob(f"{path.stem}-*{path.suffix}") if p != path)
    return [path, *extents]
