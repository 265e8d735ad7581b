"""Nested virtualization: L1 hosts that run inner guests, and the inner guests' handles.

* :func:`boot_l1` boots the ``l1-host`` image with virtualization exposed (on a TCG
  host ``-cpu qemu64,+svm,+npt``: TCG emulates AMD SVM; on a KVM host ``-cpu host``),
  loads KVM with ``nested=1`` inside, and probes L1 with the same code as L0
  (:mod:`harness.hosts.hostfacts` run by L1's python3, and a tiny guest booted under L1's KVM).
* Inner images reach L1 read-only: each qcow2 disk as its own virtio disk (L1's QEMU
  opens the block device as qcow2, with a throw-away overlay), kernels and initrds on
  one small ext4 "payload" disk built and cached on L0.
* :class:`InnerMachine` is a :class:`~harness.vm.machine.Machine` whose QEMU runs in L1: its
  argv comes from the same :func:`~harness.vm.spec.build_argv`, its serial console and QMP
  are chardevs on L1's loopback reached through ``direct-tcpip`` channels (QEMU runs nothing
  until L0 holds both: :func:`inner_endpoints`), and its serial output is logged on L0 like
  any guest's.  When L1 itself dies, errors name
  level 1 and carry L1's QEMU stderr (e.g. ``qemu: fatal: invalid tss type``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import random
import shlex
import shutil
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness import warmstart
from harness.core import paths
from harness.core.publish import DISCARD, publish, scratch_name, write_atomic
from harness.errors import HarnessError, LaunchError, TransportError, headline
from harness.guest import BootOptions, Guest, boot, probe_host
from harness.hosts import probe
from harness.images import disk
from harness.images import store as images
from harness.images.disk import OWN_DISK_KINDS
from harness.images.steps import run_step
from harness.images.store import Image
from harness.transport.ssh import quiet_paramiko
from harness.vm.machine import KILL_TIMEOUT, QMP_TIMEOUT, Machine
from harness.vm.relay import socket_for
from harness.vm.spec import (
    Accel,
    Arch,
    Chardev,
    DiskFormat,
    Drive,
    Endpoints,
    MachineSpec,
    build_argv,
    resolve_ports,
    unallocated_forwards,
)

L1_IMAGE = "l1-host"
PAYLOAD_MOUNT = "/nestbed/payload"
REMOTE_RUN = "/run/nestbed"
L2_KVM_PROBE_DEADLINE = 90.0
L2_KVM_PROBE_TRIES = 2  # boots of the tiny KVM guest before L1's KVM is called unusable
CONNECT_DEADLINE = 60.0
L1_TCG_VCPUS = 1  # vCPUs of an L1 on L0's TCG (see l1_options)
FREEZE_CHECK = 30.0  # seconds a host's serial console gets to answer after an SSH stall
BLAME_GRACE = 3.0  # seconds an outer QEMU may take to be reaped after its sockets closed

# QEMU-version-specific failures seen on real machines, with their evidence.  Each is
# consulted before a risky probe: trying it would kill the L1 running the probe.
KNOWN_FAILURES: list[dict[str, str]] = [
    {
        "l0_accel": "tcg", "l0_qemu": "7.2", "arch": "i386", "inner_accel": "kvm",
        "symptom": "qemu: fatal: invalid tss type",
        "reason": "L0's QEMU 7.2 TCG aborts ('qemu: fatal: invalid tss type', register dump) when a 32-bit "
                  "guest runs under L1's KVM; the whole L1 dies with it",
    },
    {   # measured 2026-11-25 with 10.0.2 from bookworm-backports at L0: not fixed there either
        "l0_accel": "tcg", "l0_qemu": "10.0", "arch": "i386", "inner_accel": "kvm",
        "symptom": "qemu: fatal: invalid tss type",
        "reason": "L0's QEMU 10.0 TCG aborts ('qemu: fatal: invalid tss type', register dump) when a 32-bit "
                  "guest runs under L1's KVM; the whole L1 dies with it",
    },
]


def known_failure(l0_accel: str, l0_qemu: str | None, arch: str, inner_accel: str) -> dict[str, str] | None:
    for kf in KNOWN_FAILURES:
        if (kf["l0_accel"], kf["arch"], kf["inner_accel"]) == (l0_accel, arch, inner_accel) and \
                (l0_qemu or "").startswith(kf["l0_qemu"] + "."):
            return kf
    return None


def l1_options(l0_accel: Accel, recipe_vcpus: int, recipe_memory: int) -> BootOptions:
    """How to boot an L1 so that it has hardware virtualization of its own.

    On L0's KVM the L1 gets ``-cpu host`` with its recipe's vCPUs, on Intel and AMD alike: vmx
    (kvm_intel) or svm (kvm_amd) passes through where the module's ``nested`` is on; where it is
    off the L1 gets none and its L2s run under TCG inside it (:func:`harness.hosts.probe.l1_nested`
    says which, and the L0 verdict's reason how to turn nested on).  On L0's TCG the L1 gets
    ``qemu64,+svm,+npt``: TCG's emulated SVM, so KVM in L1 works.

    On L0's TCG the L1 gets ``L1_TCG_VCPUS`` (1) vCPU whatever its recipe says: with two, about one
    L2 round in 20 ended with the L1 reset or frozen (TCG's SVM emulation; RELIABILITY.md has the
    soak), with one none in 63 rounds, and L2s came up faster; the L1's own boot is ~1.2 s slower.
    """
    if l0_accel is Accel.KVM:
        return BootOptions(accel=Accel.KVM, cpu="host", vcpus=recipe_vcpus, memory_mb=recipe_memory)
    return BootOptions(accel=Accel.TCG, cpu="qemu64", cpu_flags=("+svm", "+npt"),
                       vcpus=min(recipe_vcpus, L1_TCG_VCPUS), memory_mb=recipe_memory)


def disk_serial(image: Image) -> str:
    return "nb" + hashlib.sha256(image.name.encode()).hexdigest()[:14]  # virtio-blk serials: 20 bytes max


def file_serial(path: Path) -> str:
    """The serial of the drive that shows L1 a file of a brought image (its disks, its seed)."""
    return "nf" + hashlib.sha256(str(path).encode()).hexdigest()[:14]


def own_disk_drives(img: Image, devices: dict[str, str] | None = None) -> list[Drive]:
    """The read-only drives that show a host the files of *img* (kind disk or cloud), whatever their format:
    the host's QEMU reads the format (this level's), so the host sees each file's virtual disk and its inner
    QEMU opens that raw.  *devices* (a parent host's): the files are that host's block devices already."""
    if img.recipe.kind not in OWN_DISK_KINDS:
        return []
    if devices is None:
        return [Drive(f, fmt, read_only=True, serial=file_serial(f)) for f, fmt in disk.host_files(img)]
    return [Drive(Path(devices[str(f)]), DiskFormat.RAW, read_only=True, serial=file_serial(f))
            for f, _ in disk.host_files(img)]


def payload_disk(inner: list[Image]) -> Path:
    """An ext4 image holding ``<name>/vmlinuz`` and ``<name>/initrd.img`` of each inner image; cached."""
    key = hashlib.sha256("\n".join(sorted(str(i.dir) for i in inner)).encode()).hexdigest()[:16]
    root = paths.private_dir(paths.cache_root() / "payload")
    target = root / f"payload-{key}.img"

    def make(tmp: Path) -> None:
        stage = scratch_name(tmp, "stage")  # private to this builder; swept if it dies
        stage.mkdir(mode=0o700)
        try:
            total = 0
            for img in inner:
                d = stage / img.name
                d.mkdir()
                for src, name in ((img.path("kernel"), "vmlinuz"), (img.initrd, "initrd.img")):
                    if src is not None:
                        shutil.copy(src, d / name)
                        total += src.stat().st_size
                (d / "manifest.json").write_text(json.dumps(img.manifest))
            size_mb = total // (1 << 20) + 32
            run_step(["mke2fs", "-q", "-F", "-t", "ext4", "-d", str(stage), "-L", f"nbpay{key[:8]}", str(tmp),
                      f"{size_mb}M"], timeout=120, what="payload disk")
        finally:
            shutil.rmtree(stage, ignore_errors=True)

    publish(target, make, what=f"payload disk ({', '.join(sorted(i.name for i in inner))})")
    return target


PORT_FLOOR = 20000


def pick_ports(listing: str, count: int, *, rng: random.Random | None = None) -> list[int]:
    """*count* ports from below the ephemeral range and not in use, from *listing*: the
    ``ip_local_port_range`` line, then ``/proc/net/tcp`` and ``tcp6`` (pure)."""
    lines = listing.splitlines()
    try:
        low = int(lines[0].split()[0])
    except (IndexError, ValueError):
        low = 32768  # Linux's default
    used = set()
    for line in lines[1:]:
        parts = line.split()
        if len(parts) > 1 and ":" in parts[1]:
            with contextlib.suppress(ValueError):
                used.add(int(parts[1].rsplit(":", 1)[1], 16))
    top = max(low - 1, PORT_FLOOR + 1000)  # a range set oddly low still leaves a thousand to choose from
    r = rng or random
    chosen: list[int] = []
    while len(chosen) < count:
        port = r.randint(PORT_FLOOR, top)
        if port not in used and port not in chosen:
            chosen.append(port)
    return chosen



def inner_endpoints(serial_port: int, qmp_port: int | None, remote_dir: str) -> Endpoints:
    """Where a QEMU in L1 listens for L0: loopback TCP, each chardev with ``wait=on`` (pure).

    QEMU runs nothing until L0 has connected both, in argv order (serial, then QMP).  For the serial
    console that means no byte is lost before L0 reads it.  For QMP it means the monitor starts out
    with its client: QEMU 7.2 sends its greeting before the monitor joins the list that events go
    to.  With ``wait=off`` the guest ran while L0 connected, and an event QEMU emitted as the
    connection was accepted could come before the greeting or between it and the reply to
    ``qmp_capabilities``; qemu.qmp rejects both (CI, 2026-12-02: twice in one run; RELIABILITY.md).
    """
    return Endpoints(
        serial=Chardev(tcp_port=serial_port, wait=True),
        qmp=Chardev(tcp_port=qmp_port, wait=True) if qmp_port is not None else None,
        pidfile=Path(f"{remote_dir}/qemu.pid"),
    )


@dataclass
class L1Host:
    """A running L1: its guest handle, its probe verdict, and where inner images live in it."""

    guest: Guest
    l0_accel: Accel
    l0_qemu: str | None
    inner_images: dict[str, Image]
    devices: dict[str, str] = field(default_factory=dict)  # image name -> /dev/vdX in L1
    files: dict[str, str] = field(default_factory=dict)  # a brought image's file on L0 -> /dev/vdX in L1
    payload_dev: str = ""
    facts: dict[str, Any] = field(default_factory=dict)
    accel: dict[str, dict[str, str]] = field(default_factory=dict)
    level: int = 1

    _freeze_lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    @property
    def vcpus(self) -> int:
        """The host's vCPUs: an inner guest gets no more than these unless it asks (see guest.boot)."""
        return self.guest.machine.spec.vcpus

    @property
    def memory_mb(self) -> int:
        """The host's memory: an inner guest gets no more than half of it unless it asks (see guest.boot)."""
        return self.guest.machine.spec.memory_mb

    @property
    def ssh(self) -> Any:
        t = self.guest.connect_ssh()
        t.on_stall = self.check_frozen
        return t

    def check_frozen(self, err: HarnessError) -> None:
        """After an SSH stall on this host: raise the truer error if there is one.

        A host whose QEMU died raises its exit error.  One that is alive but does not answer
        on its serial console either within ``FREEZE_CHECK`` seconds has frozen (an emulated
        L1 does, now and then, under an L2: RELIABILITY.md): its QEMU is killed, so that the
        plugin's pool replaces it, and :class:`~harness.errors.GuestFrozen` says so.  A host
        that answers leaves *err* standing.
        """
        m = self.guest.machine
        with self._freeze_lock:
            if m.poll() is None and m.killed_because is None:
                try:
                    self.guest.serial.run("true", timeout=FREEZE_CHECK)
                    return
                except HarnessError:
                    if m.poll() is None:
                        first = headline(err)
                        m.killed_because = (f"froze ({first}; no answer on the serial console within "
                                            f"{FREEZE_CHECK:g} s either) and was killed")
                        m.hard_kill()
        m.raise_exited(f"level {self.level} died")

    def run(self, cmd: str, *args: str, timeout: float = 60.0) -> Any:
        return self.ssh.run(cmd, *args, timeout=timeout)

    def free_ports(self, count: int) -> list[int]:
        """Loopback ports in L1 that nothing listens on (QEMU binds them itself).

        Below L1's ephemeral range: a port from inside it could be taken by an outgoing connection (the
        tunnels' own, to the last guest's ports) between this look and QEMU's bind (seen once, 2026-12-02:
        "Failed to find an available port: Address already in use").
        """
        out = self.run("cat /proc/sys/net/ipv4/ip_local_port_range; cat /proc/net/tcp /proc/net/tcp6 2>/dev/null").stdout
        return pick_ports(out, count)

    def resolve_accel(self, accel: Accel, image: Image) -> tuple[Accel, str]:
        arch = image.recipe.arch.value
        if accel is not Accel.AUTO:
            kf = known_failure(self.l0_accel.value, self.l0_qemu, arch, accel.value)
            note = f" (known failure: {kf['reason']})" if kf else ""
            return accel, f"requested {accel.value} at level {self.level + 1}{note}"
        verdict = self.accel.get(arch) or {"chosen": "tcg", "reason": "not probed"}
        return Accel(verdict["chosen"]), verdict["reason"]

    def machine(self, spec: MachineSpec, image: Image, *, token: str, log_dir: Path | None,
                qmp: bool) -> InnerMachine:
        if image.name not in self.inner_images:
            raise HarnessError(f"image {image.name!r} was not attached to this L1 "
                               f"(attached: {', '.join(self.inner_images)}); pass it to boot_l1(inner=[...])")
        # Paths as L1 sees them.
        base = f"{PAYLOAD_MOUNT}/{image.name}"
        if spec.kernel is None:  # a brought image: each of its files is an L1 device showing the virtual disk
            local = spec.replace(drives=tuple(
                dataclasses.replace(d, path=Path(self.files[str(d.path)]), format=DiskFormat.RAW)
                if str(d.path) in self.files else d for d in spec.drives))
            return InnerMachine(local, self, log_dir=log_dir, qmp=qmp, token=token)
        # The image's root disk becomes L1's device for it; other drives already name L1 paths.
        drives = tuple(Drive(Path(self.devices[image.name]), DiskFormat.QCOW2, snapshot=True, serial=d.serial)
                       if d.path == image.disk else d for d in spec.drives)
        local = spec.replace(kernel=Path(f"{base}/vmlinuz"),
                             initrd=Path(f"{base}/initrd.img") if spec.initrd else None,
                             drives=drives)
        return InnerMachine(local, self, log_dir=log_dir, qmp=qmp, token=token)

    @contextlib.contextmanager
    def inner(self, image: str | Image, *, options: BootOptions | None = None, via: str = "serial",
              log_dir: Path | None = None) -> Iterator[Guest]:
        """Boot *image* inside this L1 and yield its guest handle (level 2)."""
        with boot(image, options=options, via=via, log_dir=log_dir, host=self) as g:
            yield g


class InnerMachine(Machine):
    """A QEMU running inside an L1 guest, driven from L0."""

    def __init__(self, spec: MachineSpec, host: L1Host, **kw: Any) -> None:
        super().__init__(spec, level=host.level + 1, **kw)
        self.host = host
        self.remote_dir = f"{REMOTE_RUN}/{spec.name}-{self.token}"
        self._remote_stderr = ""
        self._status: int | None = None

    def _ssh(self) -> Any:
        try:
            return self.host.ssh
        except TransportError as exc:
            self._blame()
            raise exc

    def _launch(self) -> None:
        ports = self.host.free_ports(2 + unallocated_forwards(self.spec))
        self.resolved = resolve_ports(self.spec, ports[2:])
        self.argv = build_argv(self.resolved, inner_endpoints(ports[0], ports[1] if self.use_qmp else None,
                                                              self.remote_dir))
        d = shlex.quote(self.remote_dir)
        inner = f"{shlex.join(self.argv)} >stderr 2>&1 </dev/null; echo $? >status"
        script = (f"mkdir -p -m 0700 {d} && cd {d} && "
                  f"(setsid sh -c {shlex.quote(inner)} </dev/null >/dev/null 2>&1 &)")
        self._launched_at = time.monotonic()
        result = self._ssh().run(script, timeout=30)
        if result.exit_status != 0:
            raise LaunchError(f"cannot start QEMU in level {self.host.level}: {result.stderr.strip()}",
                              level=self.level)
        serial = self._connect(ports[0], "serial")
        qmp = self._connect(ports[1], "qmp") if self.use_qmp else None
        self._attach(socket_for(serial, f"{self.spec.name}-serial"),
                     socket_for(qmp, f"{self.spec.name}-qmp") if qmp is not None else None)

    def _connect(self, port: int, what: str) -> Any:
        deadline = time.monotonic() + CONNECT_DEADLINE
        while True:
            try:
                with quiet_paramiko():  # "Connect failed" until QEMU listens is expected
                    return self._ssh().open_tunnel("127.0.0.1", port, timeout=10)
            except TransportError as exc:
                if self.poll() is not None:
                    self.raise_exited(f"QEMU in level {self.host.level} exited before its {what} "
                                       f"chardev accepted a connection")
                if time.monotonic() > deadline:
                    raise LaunchError(f"level {self.level} {what} chardev never listened: {exc}",
                                      level=self.level) from None
                time.sleep(0.1)

    def screendump(self, path: Path, *, timeout: float = QMP_TIMEOUT) -> Path:
        """The guest's screen, saved by the QEMU in L1 into this machine's run directory there, then fetched
        to *path* (its suffix: what that QEMU wrote, PNG or PPM)."""
        remote = super().screendump(Path(self.remote_dir) / path.name, timeout=timeout)
        local = path.with_suffix(remote.suffix)
        self._ssh().get(str(remote), local, timeout=max(timeout, 30.0))
        return local

    def connector(self, port: int) -> Any:
        """A factory of channels to a forwarded guest port, through L1."""
        return lambda: self._ssh().open_tunnel("127.0.0.1", self.host_ports[port], timeout=10)

    # -- process hooks ---------------------------------------------------------------------

    def blame_outer(self) -> None:
        """After a lost connection or a timeout at this level: a dead or frozen host is the real error."""
        self._blame()
        self.host.check_frozen(TransportError(f"level {self.level} got no answer through it"))

    def _blame(self) -> None:
        outer = self.host.guest.machine
        # A SIGKILLed outer QEMU closes its sockets (our SSH and relays see EOF) a moment
        # before it can be reaped: give it BLAME_GRACE to be seen dead, or the error would
        # blame this level ("QemuExited, exit status None") instead of the one that died.
        if outer.poll() is not None or outer.wait(BLAME_GRACE) is not None:
            outer.raise_exited(f"level {self.host.level} died while level {self.level} was running")

    def poll(self) -> int | None:
        if self._status is not None:
            return self._status
        try:
            out = self.host.run(f"cat {shlex.quote(self.remote_dir)}/status 2>/dev/null", timeout=20).stdout.strip()
        except HarnessError:
            self._blame()
            return None
        if out.lstrip("-").isdigit():
            self._status = int(out)
        return self._status

    def wait(self, timeout: float) -> int | None:
        if self._status is not None:
            return self._status
        # One command that waits inside the host, not an SSH session per poll (each one costs
        # 0.3-1 s under an emulated host): it returns within 0.1 s of QEMU's status appearing.
        ticks = max(1, int(timeout * 10))
        status = shlex.quote(f"{self.remote_dir}/status")
        with contextlib.suppress(HarnessError):
            self.host.run(f"i=0; while [ ! -s {status} ] && [ $i -lt {ticks} ]; do sleep 0.1; i=$((i+1)); done",
                          timeout=timeout + 30)
        return self.poll()

    def stderr_text(self) -> str:
        with contextlib.suppress(HarnessError):
            if self.host.guest.machine.poll() is None:
                self._remote_stderr = self.host.run(f"cat {shlex.quote(self.remote_dir)}/stderr 2>/dev/null",
                                                    timeout=20).stdout
        return self._remote_stderr

    def hard_kill(self) -> int | None:
        if self.host.guest.machine.poll() is not None:
            return self._status
        d = shlex.quote(self.remote_dir)
        with contextlib.suppress(HarnessError):
            if self.poll() is None:
                self.host.run(f"kill -9 $(cat {d}/qemu.pid) 2>/dev/null", timeout=20)
            rc = self.wait(KILL_TIMEOUT)
            text = self.stderr_text()
            if self.stderr_path is not None:
                self.stderr_path.write_text(text)
            self.host.run(f"rm -rf {d}", timeout=20)
            return rc
        return self._status


L1_SETUP = r"""
set -e
modprobe kvm_amd nested=1 2>/dev/null || modprobe kvm_intel nested=1 2>/dev/null || true
mkdir -p {mount}
for b in /sys/block/vd*; do
  [ -f "$b/serial" ] || continue
  s=$(cat "$b/serial")
  echo "${{b##*/}} $s"
  if [ "$s" = nbpayload ]; then mount -o ro "/dev/${{b##*/}}" {mount}; fi
done
"""


@contextlib.contextmanager
def boot_l1(inner: Sequence[str | Image], *, log_dir: Path | None = None, image: str = L1_IMAGE,
            probe_inner: bool = True, extra_options: dict[str, Any] | None = None,
            parent: L1Host | None = None, extra_drives: tuple[Drive, ...] = ()) -> Iterator[L1Host]:
    """Boot a host for nested guests with *inner* images attached; yield an :class:`L1Host`.

    With *parent*, the host itself runs inside that host (one level deeper: L2 as a
    hypervisor, its guests at L3); the parent must carry this host's image and *inner*.
    *extra_drives* are attached too (level 1 only), e.g. a disk of files for the L1.
    """
    # Built; a brought image checked again if its file changed since (disk.prepare).
    inner_images = [disk.prepare(images.build(i)) for i in inner]
    if probe_inner and "tiny-x86_64" not in {i.name for i in inner_images}:
        inner_images.append(images.build("tiny-x86_64"))
    l1_image = images.build(image)
    if parent is not None:
        with _deeper_host(parent, l1_image, inner_images, log_dir, extra_options) as host:
            if probe_inner:
                _probe_l1(host)
            yield host
        return
    l0 = probe_host()
    l0_accel = Accel(l0["accel"]["x86_64"]["chosen"])
    r = l1_image.recipe
    opts = l1_options(l0_accel, r.vcpus, r.memory_mb)
    if extra_options:
        opts = dataclasses.replace(opts, **extra_options)
    payload = payload_disk(inner_images)
    drives = [Drive(payload, DiskFormat.RAW, read_only=True, serial="nbpayload")]
    for img in inner_images:
        if img.recipe.kind in OWN_DISK_KINDS:
            drives += own_disk_drives(img)
        elif img.disk is not None:
            drives.append(Drive(img.disk, DiskFormat.RAW, read_only=True, serial=disk_serial(img)))
    opts = dataclasses.replace(opts, extra_drives=(*drives, *extra_drives))
    with boot(l1_image, options=opts, via="ssh", log_dir=log_dir) as g:
        host = L1Host(guest=g, l0_accel=l0_accel, l0_qemu=l0["qemu"].get("x86_64"),
                      inner_images={i.name: i for i in inner_images})
        _setup_l1(host)
        if probe_inner:
            _probe_l1(host)
        yield host


@contextlib.contextmanager
def boot_hosts(depth: int, inner: Sequence[str | Image], *, log_dir: Path | None = None) -> Iterator[L1Host]:
    """Boot a chain of hosts *depth* levels deep and yield the deepest, carrying *inner*.

    ``depth=1`` is :func:`boot_l1`; ``depth=2`` boots an L1 whose guest is itself a host
    (``l1-host`` at level 2, with nested SVM from L1's KVM), so its guests run at level 3.
    Every host on the way carries the images the levels below it need.
    """
    if depth < 1:
        raise HarnessError(f"host depth {depth}: must be 1 or more")
    with contextlib.ExitStack() as stack:
        host: L1Host | None = None
        for level in range(1, depth + 1):
            carried: list[str | Image] = [*inner, *([L1_IMAGE] if level < depth else [])]
            host = stack.enter_context(boot_l1(carried, log_dir=log_dir, parent=host))
        assert host is not None
        yield host


@contextlib.contextmanager
def _deeper_host(parent: L1Host, image: Image, inner: list[Image], log_dir: Path | None,
                 extra_options: dict[str, Any] | None) -> Iterator[L1Host]:
    missing = [i.name for i in [image, *inner] if i.name not in parent.inner_images]
    if missing:
        raise HarnessError(f"level {parent.level} host lacks {', '.join(missing)}: attach them to it "
                           f"(boot_l1([... {', '.join(missing)} ...]))")
    # Pass the parent's payload and image devices through, read-only, as raw block devices.
    drives = [Drive(Path(parent.payload_dev), DiskFormat.RAW, read_only=True, serial="nbpayload")]
    drives += [Drive(Path(parent.devices[i.name]), DiskFormat.RAW, read_only=True, serial=disk_serial(i))
               for i in inner if i.disk is not None and i.recipe.kind not in OWN_DISK_KINDS]
    for i in inner:
        drives += own_disk_drives(i, parent.files)
    opts = BootOptions(vcpus=image.recipe.vcpus, memory_mb=image.recipe.memory_mb // 2, extra_drives=tuple(drives))
    if extra_options:
        opts = dataclasses.replace(opts, **extra_options)
    with boot(image, options=opts, via="ssh", log_dir=log_dir, host=parent) as g:
        host = L1Host(guest=g, l0_accel=parent.l0_accel, l0_qemu=parent.l0_qemu,
                      inner_images={i.name: i for i in inner}, level=parent.level + 1)
        _setup_l1(host)
        yield host


def _setup_l1(host: L1Host) -> None:
    """KVM loaded with nested=1, the payload disk found by its serial and mounted: one command."""
    out = host.ssh.check_output(L1_SETUP.format(mount=PAYLOAD_MOUNT), timeout=120)
    by_serial = dict(reversed(line.split()) for line in out.splitlines() if len(line.split()) == 2)
    if "nbpayload" not in by_serial:
        raise LaunchError(f"L1 does not show the payload disk (disks: {out!r})", level=1)
    host.payload_dev = f"/dev/{by_serial['nbpayload']}"
    for name, img in host.inner_images.items():
        if img.recipe.kind in OWN_DISK_KINDS:
            for d in own_disk_drives(img):
                host.files[str(d.path)] = f"/dev/{by_serial[file_serial(d.path)]}"
        elif img.disk is not None:
            host.devices[name] = f"/dev/{by_serial[disk_serial(img)]}"


def _probe_l1(host: L1Host) -> None:
    """Run L0's probe code in L1: host facts by L1's python3, KVM by booting a tiny guest."""
    host.facts = _l1_facts(host)
    # The KVM boot verdict depends on L1's image and on L0 (its probe key covers boot and QEMU);
    # cache it like L0's, so only the first L1 of a host boot pays the ~20 s.
    cache = paths.cache_root() / f"probe-L{host.level}-{host.guest.image.dir.name}-{probe.cache_key()}.json"
    computed: dict[str, Any] = {}

    def make(tmp: Path) -> object:
        computed["accel"], ok = _l1_kvm_verdict(host)
        if not ok:
            return DISCARD  # a failed boot is probed again by the next L1
        write_atomic(tmp, json.dumps(computed["accel"]))
        return None

    publish(cache, make, what=f"L{host.level} probe verdict ({host.guest.image.name})")
    host.accel = computed["accel"] if computed else json.loads(cache.read_text())


def _l1_facts(host: L1Host) -> dict[str, Any]:
    """L1's host facts, read by L1's python3; kept beside a warm-start state, whose L1 always shows the same."""
    key = host.guest.warm.get("key")
    kept = warmstart.warm_root() / f"{key}.facts-L{host.level}.json" if key else None
    if kept is not None and host.guest.warm.get("restored") and kept.is_file():
        with contextlib.suppress(OSError, ValueError):
            facts: dict[str, Any] = json.loads(kept.read_text())
            return facts
    src = Path(probe.__file__).with_name("hostfacts.py")
    host.ssh.put(src, "/tmp/nestbed-hostfacts.py")
    facts = json.loads(host.ssh.check_output("python3 /tmp/nestbed-hostfacts.py", timeout=60))
    if kept is not None:
        publish(kept, lambda tmp: write_atomic(tmp, json.dumps(facts)), what=f"L{host.level} host facts", timeout=5)
    return facts


def _l1_kvm_verdict(host: L1Host) -> tuple[dict[str, Any], bool]:
    """L1's accelerator verdicts, and whether they may be cached (no failed KVM boot among them)."""
    boots: dict[str, tuple[bool, str]] = {}
    if host.facts["kvm"]["openable"]:
        # Two tries: one L2 boot in some tens can reset or hang under TCG's SVM emulation
        # (RELIABILITY.md), and a "no KVM" verdict from that flake must not be believed, let
        # alone cached.
        for _ in range(L2_KVM_PROBE_TRIES):
            started = time.monotonic()
            try:
                with boot("tiny-x86_64", options=BootOptions(accel=Accel.KVM, ready_timeout=L2_KVM_PROBE_DEADLINE),
                          host=host) as g:
                    out = g.check_output("uname -m")
                boots["x86_64"] = (True, f"a tiny x86_64 guest booted under level {host.level}'s KVM in "
                                         f"{time.monotonic() - started:.1f} s ({out})")
                break
            except HarnessError as exc:
                if host.guest.machine.poll() is not None:
                    raise
                boots["x86_64"] = (False, headline(exc))
        kf = known_failure(host.l0_accel.value, host.l0_qemu, Arch.I386.value, "kvm")
        if kf is None:
            boots["i386"] = boots["x86_64"]  # no known hazard: same KVM, same verdict
    accel = probe.decide(host.facts, boots)
    kf = known_failure(host.l0_accel.value, host.l0_qemu, Arch.I386.value, "kvm")
    if kf is not None and host.facts["kvm"]["openable"]:
        accel["i386"] = {"chosen": "tcg", "reason": f"known failure, falling back to TCG in L1: {kf['reason']}"}
    return accel, boots.get("x86_64", (True, ""))[0]
