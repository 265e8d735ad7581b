"""nestbed inside an L1: the path real users take (a host with working KVM), run where this machine has one.

This machine kind's own ``/dev/kvm`` cannot boot a guest, but an L1 on TCG has emulated SVM and a working
KVM.  :func:`nestbed_in_l1` boots the ``kvm-host`` image as an L1, carries in on one read-only disk
everything nestbed needs there without network (nestbed's wheel and its dependencies as wheels, built on
L0; the built images; the cache's client key, which the images' authorized_keys name), installs the wheel
into a venv in the L1, and hands back a handle whose :meth:`SelfHosted.nestbed` runs the ``nestbed`` CLI
there, as that host's own level 0: its probe finds KVM by booting a guest, and its guests run under
``-accel kvm``.

Everything measured this way runs under TCG's emulated SVM, not on hardware: say so with the figures.
"""

from __future__ import annotations

import contextlib
import hashlib
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from harness.core import paths
from harness.core.publish import publish
from harness.core.run import run
from harness.errors import HarnessError, UsageError
from harness.images import store as images
from harness.nested import L1Host, boot_l1
from harness.transport import keys
from harness.transport.base import CommandResult
from harness.vm.spec import DiskFormat, Drive

HOST_IMAGE = "kvm-host"
CARRY_SERIAL = "nbcarry"
CARRY_MOUNT = "/mnt/nestbed-carry"
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
                shutil.copytree(img.dir, stage / "images" / img.dir.name)
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
cache=/root/.cache/nestbed
mkdir -p -m 0700 $cache/images $cache/keys
cp -a {mount}/images/. $cache/images/
cp -a {mount}/keys/. $cache/keys/
chmod 0700 $cache $cache/images $cache/keys
chmod 0600 $cache/keys/id_ed25519
"""


@dataclass
class SelfHosted:
    """nestbed installed in a running L1 (that L1 acting as level 0)."""

    l1: L1Host
    install_seconds: float

    def nestbed(self, *argv: str, timeout: float = 900.0) -> CommandResult:
        """``nestbed ARGV...`` inside the L1, as its root user, with its own cache."""
        return self.l1.ssh.run(f"{VENV}/bin/nestbed " + " ".join(shlex.quote(a) for a in argv), timeout=timeout)


@contextlib.contextmanager
def nestbed_in_l1(image_names: tuple[str, ...] = ("tiny-x86_64",), *, log_dir: Path | None = None
                  ) -> Iterator[SelfHosted]:
    """Boot ``kvm-host`` as an L1 with nestbed installed in it and *image_names* in its cache."""
    disk = carry_disk(list(image_names))
    with boot_l1([], image=HOST_IMAGE, probe_inner=False, log_dir=log_dir,
                 extra_drives=(Drive(disk, DiskFormat.RAW, read_only=True, serial=CARRY_SERIAL),)) as l1:
        started = time.monotonic()
        out = l1.ssh.run(SETUP.format(serial=CARRY_SERIAL, mount=CARRY_MOUNT, venv=VENV), timeout=INSTALL_TIMEOUT)
        if out.exit_status != 0:
            raise HarnessError(f"installing nestbed in the L1 failed (exit {out.exit_status}): "
                               f"{(out.stderr or out.stdout).strip()[-500:]}")
        yield SelfHosted(l1, time.monotonic() - started)
