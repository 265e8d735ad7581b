"""nestbed inside an L1: the path real users take (a host with working KVM), run where this machine has one.

This machine kind's own ``/dev/kvm`` cannot boot a guest, but an L1 on TCG has emulated SVM and a working
KVM.  :func:`nestbed_in_l1` boots the ``kvm-host`` image as an L1, carries in on one read-only disk
everything nestbed needs there without network (nestbed's wheel and its dependencies as wheels, built on
L0; the built images; the cache's client key, which the images' authorized_keys name), installs the wheel
into a venv in the L1, and hands back a handle whose :meth:`SelfHosted.nestbed` runs the ``nestbed`` CLI
there, as that host's own level 0: its probe finds KVM by booting a guest, and its guests run under
``-accel kvm``.

A ``nestbed report`` run there (``nestbed in-l1 -- report --tier kvm-host --out DIR``) comes back out:
:meth:`SelfHosted.nestbed` runs it with its ``--out`` on the L1's scratch disk, copies the report
directory to *DIR* on L0 over SSH, and labels its host kind (:func:`kind_label`: "KVM host,
emulated SVM" when L0 runs the L1 under TCG), so ``nestbed report merge`` shows it as a row of its own.

Everything measured this way runs under TCG's emulated SVM, not on hardware: say so with the figures.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import shlex
import shutil
import socket
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.core import paths
from harness.core.publish import publish
from harness.core.run import run
from harness.errors import HarnessError, UsageError
from harness.guest import probe_host
from harness.images import store as images
from harness.nested import L1Host, boot_l1
from harness.reports import model as rp
from harness.reports import render
from harness.transport import keys
from harness.transport.base import CommandResult
from harness.vm.spec import Accel, DiskFormat, Drive

HOST_IMAGE = "kvm-host"
CARRY_SERIAL = "nbcarry"
CARRY_MOUNT = "/mnt/nestbed-carry"
SCRATCH_SERIAL = "nbscratch"
SCRATCH_GIB = 16   # a sparse qcow2 at L0: the L1's nestbed cache, temporary files and reports live on it
INNER_CACHE = "/root/.cache/nestbed"  # where the scratch disk is mounted in the L1
INNER_TMP = f"{INNER_CACHE}/tmp"      # TMPDIR there: the L1's own root disk has ~1 GiB free
INNER_REPORTS = f"{INNER_CACHE}/reports"
FETCH_TIMEOUT = 600.0
VENV = "/opt/nestbed"
WHEEL_TIMEOUT = 1800.0   # building the libyal readers from source takes minutes
INSTALL_TIMEOUT = 1200.0  # pip inside an emulated L1 is slow
SOURCE_PARTS = ("pyproject.toml", "harness", "fixtures", "images", "scenarios", "README.md", "LICENSE")


def source_tree() -> Path:
    """The checkout nestbed runs from (a wheel is built from it); an installed wheel has none."""
    root = paths.PACKAGE_DIR.parent
    if not (root / "pyproject.toml").is_file():
        raise UsageError("nestbed inside an L1 builds nestbed's wheel from a checkout; this nestbed is installed "
                         f"from a wheel ({paths.PACKAGE_DIR}): run it from a clone of the repository")
    return root


def _source_digest(root: Path) -> str:
    h = hashlib.sha256()
    for part in SOURCE_PARTS:
        base = root / part
        files = sorted(p for p in base.rglob("*") if p.is_file() and "__pycache__" not in p.parts) \
            if base.is_dir() else [base]
        for f in files:
            h.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def wheelhouse() -> Path:
    """nestbed's wheel and every dependency as a wheel for this Python (cached per source digest)."""
    root = source_tree()
    target = paths.private_dir(paths.cache_root() / "selfhost") / f"wheels-{_source_digest(root)}"

    def make(tmp: Path) -> None:
        tmp.mkdir()
        run([sys.executable, "-m", "pip", "wheel", "-q", "--disable-pip-version-check", "-w", str(tmp), str(root)],
            timeout=WHEEL_TIMEOUT, what="wheels for nestbed inside an L1")

    publish(target, make, what="nestbed wheelhouse")
    return target


def carry_disk(image_names: list[str]) -> Path:
    """An ext4 disk (made without root or loop devices) with wheels/, images/ and keys/ for the L1."""
    wheels = wheelhouse()
    built = [images.build(name) for name in image_names]
    key_path, _ = keys.client_keypair()
    key = hashlib.sha256("\n".join([wheels.name, *sorted(str(i.dir) for i in built),
                                    key_path.read_text()]).encode()).hexdigest()[:16]
    target = paths.private_dir(paths.cache_root() / "selfhost") / f"carry-{key}.img"

    def make(tmp: Path) -> None:
        with tempfile.TemporaryDirectory(prefix=".carry-", dir=target.parent) as stage_dir:
            stage = Path(stage_dir)
            shutil.copytree(wheels, stage / "wheels")
            for img in built:
                # Only the image itself: boot disks built beside it (bootdisk-*.raw, GiBs) stay at L0.
                shutil.copytree(img.dir, stage / "images" / img.dir.name,
                                ignore=shutil.ignore_patterns("bootdisk-*", "*.lock", ".*"))
            shutil.copytree(key_path.parent, stage / "keys", ignore=shutil.ignore_patterns(".lock", "*.lock"))
            total = sum(p.stat().st_size for p in stage.rglob("*") if p.is_file())
            run(["mke2fs", "-q", "-F", "-t", "ext4", "-d", str(stage), "-L", "nbcarry", str(tmp),
                 f"{total // (1 << 20) + 64}M"], timeout=300, what="the disk carried into the L1")

    publish(target, make, what="selfhost carry disk")
    return target


SETUP = r"""
set -e
dev=""
for b in /sys/block/vd*; do
  [ "$(cat $b/serial 2>/dev/null)" = "{serial}" ] && dev=/dev/${{b##*/}}
done
[ -n "$dev" ] || {{ echo "no disk with serial {serial}" >&2; exit 3; }}
mkdir -p {mount}
mountpoint -q {mount} || mount -o ro "$dev" {mount}
[ -x {venv}/bin/nestbed ] || {{
  python3 -m venv {venv}
  {venv}/bin/pip install -q --no-index --disable-pip-version-check --find-links {mount}/wheels nestbed
}}
cache={cache}
scratch=""
for b in /sys/block/vd*; do
  [ "$(cat $b/serial 2>/dev/null)" = "{scratch_serial}" ] && scratch=/dev/${{b##*/}}
done
if [ -n "$scratch" ] && ! mountpoint -q $cache; then
  mke2fs -q -F -t ext4 -E lazy_itable_init=1,lazy_journal_init=1 "$scratch"
  mkdir -p $cache
  mount "$scratch" $cache
fi
mkdir -p -m 0700 $cache/images $cache/keys {tmp}
cp -a {mount}/images/. $cache/images/
cp -a {mount}/keys/. $cache/keys/
chmod 0700 $cache $cache/images $cache/keys
chmod 0600 $cache/keys/id_ed25519
"""


# --- the host kind of a report made in the L1 --------------------------------------------------

def kind_label(inner_accel: str | None, l0_accel: Accel) -> str:
    """What a report made inside the L1 calls its host kind: honest about where its KVM comes from (pure).

    Its probe saw KVM; on a TCG level 0 that KVM runs on TCG's emulation of SVM, not on hardware.
    """
    if inner_accel != "kvm":
        return f"{(inner_accel or 'unknown').upper()} host inside an L1 (its KVM did not work)"
    if l0_accel is Accel.TCG:
        return "KVM host, emulated SVM"
    return "KVM host, nested KVM (an L1 of a KVM host)"


def host_kind(inner_host: Mapping[str, Any], l0: Mapping[str, Any], l0_accel: Accel) -> dict[str, Any]:
    """The ``host.kind`` a report made in the L1 carries (pure): the label, the accelerator [[expect]]
    rules match (the L1's own probe verdict), and how the host was reached."""
    accel = ((inner_host.get("accel") or {}).get("x86_64") or {}).get("chosen")
    svm = "TCG's emulation of AMD SVM, not hardware" if l0_accel is Accel.TCG else "nested KVM on the L0's CPU"
    return {"label": kind_label(accel, l0_accel), "accel": accel, "emulated": l0_accel is Accel.TCG,
            "runner": "in-l1",
            "how": f"nestbed inside an L1 (image {HOST_IMAGE}) of {l0.get('hostname') or '?'}, whose level 0 runs it "
                   f"under {l0_accel.value.upper()} (QEMU {(l0.get('qemu') or {}).get('x86_64') or '?'}): the L1's "
                   f"KVM runs on {svm}",
            "l0": {"hostname": l0.get("hostname"), "accel": l0_accel.value, "cpu": (l0.get("cpu") or {}).get("model"),
                   "qemu": (l0.get("qemu") or {}).get("x86_64")}}


def label_report(out: Path, kind: Mapping[str, Any]) -> dict[str, Any]:
    """Write *kind* into the report in *out* as ``host.kind`` and render its pages again; returns the report."""
    doc = rp.load(out)
    doc.pop("_source", None)
    doc["host"] = {**(doc.get("host") or {}), "kind": dict(kind)}
    render.write_report(doc, out)
    return doc


# --- report runs: their --out lives in the L1, the directory comes back out -------------------

def is_report_run(argv: Sequence[str]) -> bool:
    """``report ...`` that runs scenarios (not ``report merge``/``report diff``)."""
    return bool(argv) and argv[0] == "report" and not (len(argv) > 1 and argv[1] in ("merge", "diff"))


def split_out(argv: Sequence[str]) -> tuple[list[str], str | None]:
    """*argv* without its ``--out DIR`` (before any ``--``), and DIR (pure)."""
    rest: list[str] = []
    out = None
    i = 0
    while i < len(argv):
        a = argv[i]
        if a == "--":
            rest.extend(argv[i:])
            break
        if a == "--out" and i + 1 < len(argv):
            out = argv[i + 1]
            i += 2
            continue
        if a.startswith("--out="):
            out = a.split("=", 1)[1]
        else:
            rest.append(a)
        i += 1
    return rest, out


def inner_report_argv(argv: Sequence[str], inside: str) -> list[str]:
    """The ``report`` command line run in the L1: its --out there, one process unless -n is given (pure).

    The L1 on a TCG level 0 has one vCPU (``harness.nested.L1_TCG_VCPUS``): xdist workers only add memory.
    """
    rest, _ = split_out(argv)
    head = rest[: rest.index("--")] if "--" in rest else rest
    tail = rest[len(head):]
    workers = [] if any(a in ("-n", "--numprocesses") or a.startswith(("-n", "--numprocesses=")) for a in head) \
        else ["-n", "0"]
    return [*head, "--out", inside, *workers, *tail]


def safe_extract(data: bytes, dest: Path) -> None:
    """Unpack a tar.gz of a report directory into *dest*: regular files and directories only, nothing outside."""
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        tar.extractall(dest, filter="data")


@dataclass
class SelfHosted:
    """nestbed installed in a running L1 (that L1 acting as level 0)."""

    l1: L1Host
    install_seconds: float

    def nestbed(self, *argv: str, timeout: float = 900.0) -> CommandResult:
        """``nestbed ARGV...`` inside the L1, as its root user, with its own cache.

        A ``report`` run is :meth:`report`: its directory comes back out to L0.
        """
        if is_report_run(argv):
            return self.report(argv, timeout=timeout)
        return self._nestbed(argv, timeout=timeout)

    def _nestbed(self, argv: Sequence[str], *, timeout: float) -> CommandResult:
        return self.l1.ssh.run(f"TMPDIR={INNER_TMP} {VENV}/bin/nestbed " + " ".join(shlex.quote(a) for a in argv),
                               timeout=timeout)

    def report(self, argv: Sequence[str], *, timeout: float) -> CommandResult:
        """``nestbed report ...`` in the L1; its report directory is copied to ``--out`` on L0 (default
        ``./reports/<UTC>-<L0 host>-in-l1``) and labelled with its host kind (:func:`host_kind`)."""
        _, out = split_out(argv)
        local = Path(out).resolve() if out else \
            rp.default_report_dir(Path("reports"), host=f"{socket.gethostname()}-in-l1")
        if (local / "report.json").exists():
            raise UsageError(f"in-l1 report: {local} already holds a report (choose another --out)")
        inside = f"{INNER_REPORTS}/{local.name}"
        result = self._nestbed(inner_report_argv(argv, inside), timeout=timeout)
        have = self.l1.ssh.run(f"test -f {shlex.quote(inside)}/report.json", timeout=60)
        if have.exit_status != 0:
            return result  # no report to bring out: the run's own error says why
        self.fetch_dir(inside, local)
        label_report(local, host_kind(rp.load(local).get("host") or {}, probe_host(), self.l1.l0_accel))
        note = f"nestbed: the report came out of the L1 to {local} (host kind: {kind_label_of(local)})\n"
        return CommandResult(result.command, result.exit_status, result.stdout.replace(inside, str(local)) + note,
                             result.stderr.replace(inside, str(local)), result.duration)

    def fetch_dir(self, remote: str, local: Path, *, timeout: float = FETCH_TIMEOUT) -> None:
        """Copy directory *remote* of the L1 into *local* at L0 (a tar.gz over SSH, unpacked safely)."""
        r = self.l1.ssh.run(f"tar -C {shlex.quote(remote)} -czf - . | base64 -w0", timeout=timeout)
        if r.exit_status != 0:
            raise HarnessError(f"in-l1: copying {remote} out of the L1 failed: {r.stderr.strip()[-300:]}")
        safe_extract(base64.b64decode(r.stdout), local)


def kind_label_of(report_dir: Path) -> str:
    """The host-kind label of the report in *report_dir*."""
    return rp.host_kind(rp.load(report_dir).get("host") or {})["label"]


@contextlib.contextmanager
def nestbed_in_l1(image_names: tuple[str, ...] = ("tiny-x86_64",), *, log_dir: Path | None = None
                  ) -> Iterator[SelfHosted]:
    """Boot ``kvm-host`` as an L1 with nestbed installed in it and *image_names* in its cache.

    The cache sits on a fresh scratch disk (a sparse qcow2 of ``SCRATCH_GIB``, deleted afterwards), so
    images, the scenarios' temporary files and reports do not fill the L1's root disk.
    """
    disk = carry_disk(list(image_names))
    with contextlib.ExitStack() as stack:
        scratch_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(
            prefix=".scratch-", dir=paths.private_dir(paths.cache_root() / "selfhost"))))
        scratch = scratch_dir / "scratch.qcow2"
        run(["qemu-img", "create", "-q", "-f", "qcow2", str(scratch), f"{SCRATCH_GIB}G"], timeout=60,
            what="the L1's scratch disk")
        drives = (Drive(disk, DiskFormat.RAW, read_only=True, serial=CARRY_SERIAL),
                  Drive(scratch, DiskFormat.QCOW2, serial=SCRATCH_SERIAL))
        l1 = stack.enter_context(boot_l1([], image=HOST_IMAGE, probe_inner=False, log_dir=log_dir,
                                         extra_drives=drives))
        started = time.monotonic()
        out = l1.ssh.run(SETUP.format(serial=CARRY_SERIAL, mount=CARRY_MOUNT, venv=VENV, cache=INNER_CACHE,
                                      scratch_serial=SCRATCH_SERIAL, tmp=INNER_TMP), timeout=INSTALL_TIMEOUT)
        if out.exit_status != 0:
            raise HarnessError(f"installing nestbed in the L1 failed (exit {out.exit_status}): "
                               f"{(out.stderr or out.stdout).strip()[-500:]}")
        yield SelfHosted(l1, time.monotonic() - started)
