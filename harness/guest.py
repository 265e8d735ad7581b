"""A booted image: a :class:`Machine` plus the transports to reach it.

::

    with boot("tiny-x86_64") as g:
        print(g.run("uname", "-m").stdout)
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness import warmstart
from harness.errors import (
    CommandTimedOut,
    ConsoleTimeout,
    HarnessError,
    MachineStateError,
    TransportError,
    UsageError,
    headline,
)
from harness.hosts import probe
from harness.images import store as images
from harness.images.disk import OWN_DISK_KINDS  # booted by their own bootloader
from harness.images.recipes import Kind
from harness.images.store import Image
from harness.transport.base import DEFAULT_TIMEOUT, CommandResult, SerialTransport, TransportBase, Via
from harness.vm import snapshot
from harness.vm.machine import Machine, Runstate
from harness.vm.spec import Accel, Arch, DiskFormat, Drive, Forward, MachineSpec, Nic

if TYPE_CHECKING:
    from harness.nested import L1Host
    from harness.transport.ssh import SSHTransport
    from harness.vm.spec import Firmware
    from harness.warmstart import Plan

log = logging.getLogger(__name__)

GUEST_POWEROFF_TIMEOUT = 10.0
# The kernel's report of a task stuck in D state for 120 s (hung_task_timeout_secs).
HUNG_TASK_RE = r"INFO: task \S+ blocked for more than \d+ seconds"
# Boots of guests inside an emulated L1 hang now and then in the L2 kernel (seen: PID 1 blocked
# for 120 s in early boot under L1's KVM on L0's TCG-emulated SVM); they get one more try.
NESTED_BOOT_ATTEMPTS = 2


@dataclass(frozen=True)
class BootOptions:
    """What a caller may change about how an image boots."""

    accel: Accel = Accel.AUTO
    vcpus: int | None = None
    memory_mb: int | None = None
    cpu: str | None = None
    cpu_flags: tuple[str, ...] = ()
    tcg_threads: str | None = None
    accel_opts: tuple[str, ...] = ()  # accelerator properties, e.g. ("xen-version=0x4000a", "kernel-irqchip=split")
    kernel: Path | None = None  # boot this kernel with the image's userland
    append: str = ""  # extra kernel command line
    extra_args: tuple[str, ...] = ()
    extra_drives: tuple[Drive, ...] = ()
    root_disk: Drive | None = None  # boot from this disk instead of the image's (e.g. a converted copy)
    forwards: tuple[int, ...] = ()  # more guest TCP ports to forward from 127.0.0.1 (Guest.machine.host_ports)
    ready_timeout: float | None = None
    reset: bool = False  # snapshot right after the ready marker, so Guest.reset() can return there
    # None: direct kernel boot.  bios/uefi/uefi32: that firmware boots the image's whole-disk image
    # through GRUB, with this boot's kernel command line (harness/images/bootdisk.py, docs/firmware.md).
    firmware: Firmware | str | None = None
    # Restore from the state saved at this shape's first ready marker instead of booting
    # (harness/warmstart.py).  None: the default (on, unless --nestbed-no-warm-start or NESTBED_WARM_START=0).
    warm_start: bool | None = None


KVM_BOOT_DEADLINE = 15.0  # a tiny guest is ready in ~1 s under a working KVM


def kvm_boot(arch: Arch) -> tuple[bool, str]:
    """Boot tiny-<arch> under KVM on this host; (worked, what happened).  The probe's functional test."""
    started = time.monotonic()
    try:
        # No QMP: its asyncio loop is per thread, and the probe boots both arches at once.
        with boot(f"tiny-{arch.value}", options=BootOptions(accel=Accel.KVM, ready_timeout=KVM_BOOT_DEADLINE),
                  qmp=False) as g:
            out = g.check_output("uname -m", timeout=KVM_BOOT_DEADLINE)
        return True, f"a tiny {arch.value} guest booted under KVM in {time.monotonic() - started:.1f} s ({out})"
    except HarnessError as exc:
        return False, probe.kvm_boot_detail(exc)


def probe_host(*, refresh: bool = False) -> dict[str, Any]:
    """This host's facts and accelerator verdicts (:func:`harness.hosts.probe.probe`, cached per host boot)."""
    return probe.probe(kvm_boot=kvm_boot, refresh=refresh)


def accel_verdict(arch: Arch) -> dict[str, str]:
    """{"chosen", "reason"} for guests of *arch* on this host."""
    verdict: dict[str, str] = probe_host()["accel"][arch.value]
    return verdict


def resolve_accel(accel: Accel, image: Image) -> tuple[Accel, str]:
    """The accelerator to use and why."""
    if accel is not Accel.AUTO:
        return accel, f"requested {accel.value}"
    verdict = accel_verdict(image.recipe.arch)
    return Accel(verdict["chosen"]), verdict["reason"]


def spec_for(image: Image, opts: BootOptions, token: str) -> MachineSpec:
    """The machine spec that boots *image* (built) with *opts* applied."""
    r = image.recipe
    if r.kind in OWN_DISK_KINDS:  # its own bootloader from its own disk (harness/images/disk.py)
        from harness.images import disk

        disk.check_options(image, kernel=opts.kernel, root_disk=opts.root_disk, append=opts.append)
        base = MachineSpec(
            arch=r.arch, accel=opts.accel, cpu=opts.cpu or ("host" if opts.accel is Accel.KVM else None),
            cpu_flags=opts.cpu_flags, tcg_threads=opts.tcg_threads, accel_opts=opts.accel_opts,
            memory_mb=r.memory_mb if opts.memory_mb is None else opts.memory_mb,
            vcpus=r.vcpus if opts.vcpus is None else opts.vcpus, extra_args=opts.extra_args, name=r.name)
        return disk.boot_spec(base, image, token=token, firmware=opts.firmware, extra_drives=opts.extra_drives,
                              forwards=opts.forwards)
    kernel = opts.kernel or image.kernel
    if opts.kernel is not None and not Path(opts.kernel).is_file():
        raise UsageError(f"--kernel {opts.kernel}: no such file")
    # loglevel=4: only warnings and worse on the console.  Every byte on an emulated UART
    # is a VM exit, and under nested KVM on TCG that made boots twice as slow (measured:
    # debian L2 ready 32 s -> 16 s).  Panics still show; append "loglevel=7" for everything.
    append = ["console=ttyS0", "loglevel=4", "panic=-1", f"nestbed.token={token}"]
    # no_timer_check: on a loaded host a TCG guest's IO-APIC timer check can miss its ticks and
    # panic ("IO-APIC + timer doesn't work!"), seen with Debian's generic kernel and tiny-i386 under
    # load.  Only there: with it on the L1 hosts' kernels too, L1s froze or reset under L2s in 4 runs
    # out of 4 (none before it); see RELIABILITY.md.
    if r.kind is Kind.TINY or opts.kernel is not None:
        append.append("no_timer_check")
    if r.kind is Kind.TINY:
        append.append("rdinit=/init")
    append += image.manifest.get("append", [])
    if opts.append:
        append.append(opts.append)
    drives: tuple[Drive, ...] = ()
    if opts.root_disk is not None:
        if image.disk is None:
            raise UsageError(f"image {image.name} boots from an initramfs: it takes no root disk")
        drives = (opts.root_disk,)
    elif image.disk is not None:
        # snapshot=on: writes go to a throw-away overlay, the cached image stays pristine.
        drives = (Drive(image.disk, DiskFormat.QCOW2, snapshot=True, serial="nestbed-root"),)
    drives += opts.extra_drives
    accel = opts.accel
    # Under KVM the guest gets the host CPU model: its PV features and no TCG-only flags.
    cpu = opts.cpu or ("host" if accel is Accel.KVM else None)
    spec = MachineSpec(
        arch=r.arch, accel=accel, cpu=cpu, cpu_flags=opts.cpu_flags, tcg_threads=opts.tcg_threads,
        accel_opts=opts.accel_opts,
        # "is None", not "or": --vcpus 0 must be refused by the spec, not replaced silently.
        memory_mb=r.memory_mb if opts.memory_mb is None else opts.memory_mb,
        vcpus=r.vcpus if opts.vcpus is None else opts.vcpus,
        kernel=kernel, initrd=image.initrd, append=" ".join(append),
        drives=drives, nics=(Nic(forwards=(Forward(22), *(Forward(p) for p in opts.forwards if p != 22))),)
        if image.disk is not None else (),
        extra_args=opts.extra_args, name=r.name,
    )
    if opts.firmware is not None:
        from harness.images import bootdisk
        from harness.vm.spec import Firmware

        if opts.kernel is not None or opts.root_disk is not None:
            raise UsageError("a firmware boot runs the kernel and root filesystem of the image's boot disk: "
                             "it takes no kernel or root_disk")
        spec = bootdisk.firmware_spec(spec, image, Firmware(opts.firmware), opts.extra_drives)
    return spec



class _Watched(TransportBase):
    """The guest's current transport behind :meth:`Guest.run`'s checks (testinfra's Host goes through it)."""

    def __init__(self, guest: Guest) -> None:
        self.guest = guest
        self.name = guest.transport.name  # testinfra's connection type; a reset drops this Host with its transport

    def run(self, cmd: str, *args: str, timeout: float = DEFAULT_TIMEOUT) -> CommandResult:
        return self.guest.run(cmd, *args, timeout=timeout)

    def put(self, local: Path, remote: str, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.guest.put(local, remote, timeout=timeout)

    def get(self, remote: str, local: Path, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.guest.get(remote, local, timeout=timeout)

class Guest:
    """A running guest booted from an image, reachable through ``transport``."""

    def __init__(self, image: Image, machine: Machine, *, accel_reason: str = "") -> None:
        self.image = image
        self.machine = machine
        self.accel_reason = accel_reason
        self.serial = SerialTransport(machine)
        self.transport: TransportBase = self.serial
        self.ready_seconds: float | None = None
        self.failed_attempts: list[str] = []  # serial logs of boots that hung before this one came up
        self.ready_lag: float | None = None
        self._ssh: SSHTransport | None = None
        self._host: Any = None
        self.reset_tag: str | None = None  # the snapshot Guest.reset() loads (harness.vm.snapshot)
        self.resets = 0
        self.last_reset: dict[str, float] = {}  # seconds per phase of the latest reset (loadvm, serial, ssh)
        self.foreign_host_key: str | None = None  # kinds disk/cloud: the host key this boot showed (disk.wait_ready)
        # Warm start (harness/warmstart.py): {"restored": bool, "key": ..., "seconds": ...}, or {} if not eligible.
        self.warm: dict[str, Any] = {}

    def connect_ssh(self, *, timeout: float = 60.0) -> SSHTransport:
        """SSH to the guest (key auth, host key pinned to the one recorded at build time)."""
        from harness.transport import keys
        from harness.transport.ssh import SSHTransport

        if self._ssh is None and self.image.recipe.kind in OWN_DISK_KINDS:
            from harness.images import disk

            self._ssh = disk.connect_ssh(self.image, self.machine, self.foreign_host_key, timeout=timeout,
                                         name=f"ssh:{self.image.name}@L{self.machine.level}")
        if self._ssh is None:
            host_key = self.image.manifest.get("host_keys", {}).get("ssh-ed25519")
            if not host_key or 22 not in self.machine.host_ports:
                # Not a host's limit but the image's (or the caller's): a failure, never a skip.
                if self.image.recipe.kind is Kind.DEBIAN:
                    raise TransportError(f"image {self.image.name} should have an SSH server, but its manifest "
                                         f"records no host key: rebuild it (nestbed images build --force "
                                         f"{self.image.name})")
                raise TransportError(f"image {self.image.name} (kind {self.image.recipe.kind.value}) has no SSH "
                                     f"server: boot it with via='serial'")
            key_path, _ = keys.client_keypair()
            self._ssh = SSHTransport(host="127.0.0.1", port=self.machine.host_ports[22], user="root",
                                     key_path=key_path, host_key=host_key, timeout=timeout,
                                     name=f"ssh:{self.image.name}@L{self.machine.level}",
                                     sock_factory=self.machine.connector(22))
        return self._ssh

    @property
    def host(self) -> Any:
        """A testinfra ``Host`` over this guest's transport, with the same checks as :meth:`run`."""
        if self._host is None:
            from harness.transport.testinfra import testinfra_host

            self._host = testinfra_host(_Watched(self), self.image.name)
        return self._host

    @property
    def accel(self) -> Accel:
        return self.machine.spec.accel

    def wait_ready(self, timeout: float) -> float:
        """Wait for init's ready marker; returns seconds since launch.

        The kernel's hung-task report during boot ends the wait at once (a boot that hangs
        in the kernel never recovers): :class:`ConsoleTimeout` with the report in the tail.
        """
        m = self.machine.expect(rf"nestbed-ready-{self.machine.token}\n|(?P<hung>{HUNG_TASK_RE})", timeout=timeout,
                                what="ready marker from the guest's init")
        if m.group("hung"):
            raise ConsoleTimeout(f"ready marker (the boot hung: {m.group('hung')})", self.machine.uptime or 0.0,
                                 serial_tail=self.machine.serial_tail(), stderr_tail=self.machine.stderr_text(),
                                 level=self.machine.level)
        self.ready_seconds = self.machine.uptime
        assert self.machine.console is not None
        # How long after the marker's bytes reached us the harness noticed them.
        self.ready_lag = time.monotonic() - self.machine.console.arrived_at
        return self.ready_seconds

    @contextlib.contextmanager
    def _watched(self) -> Iterator[None]:
        """A lost connection to an L2 is often its L1 dying: say so (blame_outer) before the error goes up."""
        try:
            yield
        except (TransportError, CommandTimedOut):
            self.machine.blame_outer()
            raise

    def run(self, cmd: str, *args: str, timeout: float = DEFAULT_TIMEOUT) -> CommandResult:
        """Run *cmd* (each of *args* quoted) over the guest's transport; its CommandResult."""
        with self._watched():
            return self.transport.run(cmd, *args, timeout=timeout)

    def check_output(self, cmd: str, *args: str, timeout: float = DEFAULT_TIMEOUT) -> str:
        """stdout without its trailing newline; :class:`CommandFailed` (with the result) on a non-zero exit."""
        with self._watched():
            return self.transport.check_output(cmd, *args, timeout=timeout)

    def put(self, local: Path, remote: str, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        """Copy the host's file *local* to *remote* in the guest."""
        with self._watched():
            self.transport.put(local, remote, timeout=timeout)

    def get(self, remote: str, local: Path, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        """Copy the guest's file *remote* to *local* on the host."""
        with self._watched():
            self.transport.get(remote, local, timeout=timeout)

    def take_reset_point(self, *, timeout: float = snapshot.SNAPSHOT_TIMEOUT) -> float:
        """Snapshot the guest now as the state :meth:`reset` returns to; seconds taken.

        Call it before SSH connects (``boot()`` does, with ``BootOptions(reset=True)``): a
        connection open at the snapshot would be dead after every reset.
        """
        if self._ssh is not None:
            raise MachineStateError(f"{self.image.name}: take the reset point before SSH connects "
                                    "(boot with BootOptions(reset=True))")
        seconds = snapshot.save(self.machine, snapshot.RESET_TAG, timeout=timeout)
        self.reset_tag = snapshot.RESET_TAG
        return seconds

    def reset(self, *, timeout: float | None = None) -> float:
        """Back to the just-booted state without rebooting (QEMU loadvm); seconds taken.

        Needs ``BootOptions(reset=True)``.  SSH is reconnected if it was the transport; files
        written and processes started since boot are gone; the guest's clock jumps back
        (harness/vm/snapshot.py says how).
        """
        timeout = timeout or snapshot.SNAPSHOT_TIMEOUT
        if self.reset_tag is None:
            raise MachineStateError(f"{self.image.name}: no reset point (boot with BootOptions(reset=True), "
                                    "or boot_guest(..., reset=True))")
        started = time.monotonic()
        over_ssh = self._ssh is not None and self.transport is self._ssh
        if self._ssh is not None:
            self._ssh.close()
            self._ssh = None
        self._host = None  # testinfra's Host holds the old transport
        self.transport = self.serial
        phases = {"loadvm": snapshot.load(self.machine, self.reset_tag, timeout=timeout)}
        mark = time.monotonic()
        # The shell answers the marker while SSH connects: the two waits overlap.
        tok = snapshot.resync_send(self.machine)
        if over_ssh:
            self.transport = self.connect_ssh()
            phases["ssh"] = time.monotonic() - mark
        snapshot.resync_wait(self.machine, tok, timeout=min(timeout, snapshot.RESYNC_TIMEOUT))
        phases["serial"] = time.monotonic() - mark
        self.serial.broken = None  # the shell a timed-out command wedged is back at its prompt
        self.resets += 1
        self.last_reset = phases
        return time.monotonic() - started

    def poweroff(self) -> int | None:
        """Power off from inside (nestbed's init has no ACPI daemon), then make sure."""
        m = self.machine
        if self._ssh is not None:
            self._ssh.close()
        try:
            if m.runstate is Runstate.RUNNING and m.poll() is None and not self.serial.broken:
                with contextlib.suppress(HarnessError, OSError):
                    # busybox has poweroff; a minbase Debian without systemd-sysv has only sysrq.
                    m.send("sync; poweroff -f 2>/dev/null || echo o > /proc/sysrq-trigger\n")
                    if m.wait(GUEST_POWEROFF_TIMEOUT) is not None:
                        return m.shutdown()
            return m.shutdown(powerdown_timeout=5.0)
        except HarnessError:
            # Shutting down must never mask the error that got us here (e.g. an outer level died).
            return m.kill()


@contextlib.contextmanager
def boot(image: str | Image, *, options: BootOptions | None = None, log_dir: Path | None = None,
         build: bool = True, qmp: bool = True, via: Via | str = Via.SERIAL,
         host: L1Host | None = None) -> Iterator[Guest]:
    """Boot *image* and yield a ready :class:`Guest`; always powers it off.

    With *host* (an :class:`~harness.nested.L1Host`), the guest runs inside that L1.
    """
    opts = options or BootOptions()
    img = images.get_image(image) if isinstance(image, str) else image
    own_disk = img.recipe.kind in OWN_DISK_KINDS
    if not img.built:
        if not build:
            from harness.errors import ImageNotBuilt
            raise ImageNotBuilt(img.name)
        img = images.build(img)
    images.mark_used(img)
    if own_disk:
        from harness.images import disk

        img = disk.prepare(img)  # checked and inspected again if the file changed since
        if host is not None:
            disk.check_inner(img, host.inner_images, firmware=opts.firmware)
    if opts.firmware is not None and not own_disk:
        from harness.images import bootdisk

        opts = bootdisk.prepare(img, opts, host)  # builds the boot disk (cached); longer ready timeout
    accel, reason = host.resolve_accel(opts.accel, img) if host else resolve_accel(opts.accel, img)
    opts_resolved = dataclasses.replace(opts, accel=accel)
    if host is not None and opts.vcpus is None and img.recipe.vcpus > host.vcpus:
        # No more vCPUs than the host has, unless asked: an L2's vCPUs time-sliced on fewer L1 vCPUs
        # only make it slower (loaded machine, 1-vCPU L1: a 2-vCPU Debian L2 up in 37-50 s, a 1-vCPU one 12-14 s).
        opts_resolved = dataclasses.replace(opts_resolved, vcpus=host.vcpus)
    if opts.reset and img.disk is None and opts.root_disk is None and host is None:

        opts_resolved = dataclasses.replace(opts_resolved, extra_args=opts.extra_args + snapshot.state_drive_args())
    if opts.kernel is not None and host is None and Path(opts.kernel).is_file() and img.recipe.arch is Arch.X86_64:
        from harness.vm.vmlinux import fast_kernel  # the same kernel, minus its emulated XZ decompression

        opts_resolved = dataclasses.replace(opts_resolved, kernel=fast_kernel(Path(opts.kernel)))
    attempts = NESTED_BOOT_ATTEMPTS if host is not None else 1
    failed: list[str] = []
    warm: Plan | None = None
    for attempt in range(1, attempts + 1):
        token = secrets.token_hex(6)
        spec = spec_for(img, opts_resolved, token)
        if host is not None and opts.memory_mb is None and spec.memory_mb > host.memory_mb // 2:
            # An OVF's or a recipe's memory may be a real machine's: half the host's leaves the host its own.
            log.info("%s: %d MiB inside a host of %d MiB: given %d MiB (ask with memory_mb)", img.name,
                     spec.memory_mb, host.memory_mb, host.memory_mb // 2)
            spec = spec.replace(memory_mb=host.memory_mb // 2)
        if attempt == 1 and not own_disk and warmstart.enabled(opts.warm_start) and warmstart.eligible(
                spec, qmp=qmp, nested=host is not None, firmware=opts.firmware is not None,
                root_disk=opts.root_disk is not None) is None:
            try:
                warm = warmstart.plan(spec, token, lambda t: spec_for(img, opts_resolved, t))
                spec, token = warm.spec, warm.token
            except (HarnessError, OSError) as exc:
                log.warning("warm start: %s boots without it: %s", img.name, headline(exc))
                warm = None
        if warm is not None:
            machine = warmstart.machine_for(warm, log_dir=log_dir, qmp=qmp)
        else:
            machine = host.machine(spec, img, token=token, log_dir=log_dir, qmp=qmp) if host \
                else Machine(spec, log_dir=log_dir, token=token, qmp=qmp)
        guest = Guest(img, machine, accel_reason=reason)
        try:
            if warm is not None and warm.restoring:
                try:
                    machine.launch()  # a stream QEMU cannot load can end it before QMP answers
                    seconds = warmstart.restore(warm, machine)
                    if opts.reset:
                        guest.take_reset_point()  # before SSH connects, as for a booted guest
                    if Via(via) is Via.SSH:
                        # A restored guest whose SSH does not come back is a failed restore too.
                        guest.transport = guest.connect_ssh(timeout=warmstart.SETTLE_TIMEOUT)
                except (HarnessError, OSError) as exc:
                    # A state that does not load is dropped; this guest boots as before (never restores again).
                    machine.kill()
                    warmstart.drop(warm.key, headline(exc), saved_at=warm.meta.get("saved_at"))
                    warm.cleanup()
                    warm = warmstart.plan(spec_for(img, opts_resolved, token), token,
                                          lambda t: spec_for(img, opts_resolved, t), allow_restore=False)
                    machine = warmstart.machine_for(warm, log_dir=log_dir, qmp=qmp)
                    guest = Guest(img, machine, accel_reason=reason)
                    machine.launch()
                else:
                    guest.ready_seconds = machine.uptime
                    guest.warm = {"restored": True, "key": warm.key, "seconds": round(seconds, 3)}
            else:
                machine.launch()
            if Via(via) is Via.SSH:
                # paramiko takes ~0.6 s to import: do it while the guest boots, not after its marker.
                import harness.transport.ssh  # noqa: F401
            if own_disk:  # cloud-init's marker or SSH; a screenshot if neither comes (harness/images/disk.py)
                try:
                    guest.foreign_host_key = disk.wait_ready(machine, img, timeout=opts.ready_timeout
                                                             or img.recipe.ready_timeout)
                except ConsoleTimeout as exc:
                    raise disk.not_reached(machine, exc) from None
                guest.ready_seconds = machine.uptime
                if not disk.uses_seed(img):
                    guest.serial.broken = "the image has no shell on its serial console (no cloud-init seed)"
            elif not guest.warm:
                # Recipes' timeouts are for level 1; each level down is emulated on top of the one above.
                guest.wait_ready(opts.ready_timeout or img.recipe.ready_timeout * (1 if host is None else 3))
                if warm is not None:
                    paused = warmstart.capture(warm, machine, img, guest.ready_seconds)
                    guest.warm = {"restored": False, "key": warm.key, "captured": paused is not None,
                                  "capture_seconds": round(paused, 3) if paused is not None else None}
            if opts.reset and guest.reset_tag is None:
                guest.take_reset_point()  # before SSH connects: a connection in the snapshot would be dead
        except ConsoleTimeout as exc:
            machine.kill()  # never became usable: nothing to shut down gracefully
            if warm is not None:
                warm.cleanup()
            if attempt == attempts or host is None or host.guest.machine.poll() is not None:
                raise
            log.warning("level %d boot of %s did not come up (%s; serial log %s); trying once more",
                        machine.level, img.name, headline(exc), machine.serial_log_path)
            failed.append(str(machine.serial_log_path))
            continue
        except BaseException:
            machine.kill()
            if warm is not None:
                warm.cleanup()
            raise
        break
    guest.failed_attempts = failed  # recorded with the guest (the plugin reports them)
    try:
        if Via(via) is Via.SSH:
            # Like the ready timeout: each level down is emulated on top of the one above.
            guest.transport = guest.connect_ssh(timeout=60.0 * (1 if host is None else 3))
        yield guest
    finally:
        guest.poweroff()
        if warm is not None:
            warm.cleanup()
