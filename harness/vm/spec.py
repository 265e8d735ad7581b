"""Declarative machine description and the pure function that turns it into QEMU argv.

A :class:`MachineSpec` is frozen user configuration; it holds no process, port or
socket.  :func:`build_argv` needs no QEMU installed, so it is unit-tested directly.
Run-time endpoints (the serial and QMP chardevs) are passed to it separately, because
they are allocated per launch (a socketpair on L0, loopback TCP inside an L1).
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from harness.errors import UsageError


class Arch(enum.StrEnum):
    X86_64 = "x86_64"
    I386 = "i386"

    @property
    def qemu_binary(self) -> str:
        return f"qemu-system-{self.value}"

    @property
    def debian(self) -> str:
        """Debian's name for the architecture."""
        return {"x86_64": "amd64", "i386": "i386"}[self.value]

    @property
    def default_cpu(self) -> str:
        return {"x86_64": "qemu64", "i386": "qemu32"}[self.value]


class Accel(enum.StrEnum):
    AUTO = "auto"
    KVM = "kvm"
    TCG = "tcg"


class Firmware(enum.StrEnum):
    BIOS = "bios"  # SeaBIOS, QEMU's default
    UEFI = "uefi"  # OVMF of the CPU's width: 64-bit on x86_64, 32-bit (OVMF32) on i386
    UEFI32 = "uefi32"  # 32-bit OVMF whatever the CPU (on x86_64: EFI mixed mode)


class DiskFormat(enum.StrEnum):
    RAW = "raw"
    QCOW2 = "qcow2"
    VMDK = "vmdk"
    VPC = "vpc"
    VHDX = "vhdx"
    VDI = "vdi"
    QED = "qed"


class DriveInterface(enum.StrEnum):
    VIRTIO = "virtio"
    IDE = "ide"  # ide-hd: on q35 the ICH9 AHCI controller's ports, on "pc" PIIX IDE
    SCSI = "scsi"  # virtio-scsi
    SATA = "sata"  # ide-hd on an ich9-ahci controller of its own
    LSI = "lsi"  # LSI 53C895A SCSI (what many VMware appliances' kernels know as "lsilogic")
    PVSCSI = "pvscsi"  # VMware paravirtual SCSI
    MEGASAS = "megasas"  # LSI MegaRAID SAS 1078

    @property
    def scsi_controller(self) -> str | None:
        """The QEMU device of the SCSI host adapter this interface's disks hang on, or None."""
        return {"scsi": "virtio-scsi-pci", "lsi": "lsi53c895a", "pvscsi": "pvscsi",
                "megasas": "megasas"}.get(self.value)


@dataclass(frozen=True)
class Ovmf:
    """One OVMF build (Debian's ``ovmf`` / ``ovmf-ia32``): CODE and its matching VARS template."""

    code: Path
    vars: Path
    smm: bool = False  # secure-boot builds need -machine smm=on and a secure pflash
    bits: int = 64


# Debian ships OVMF32 only as a secure-boot build (ovmf-ia32: OVMF32_CODE_4M.secboot.fd); its VARS
# template has no keys enrolled, so Secure Boot stays off and an unsigned GRUB boots.
OVMF = {64: Ovmf(Path("/usr/share/OVMF/OVMF_CODE.fd"), Path("/usr/share/OVMF/OVMF_VARS.fd")),
        32: Ovmf(Path("/usr/share/OVMF/OVMF32_CODE_4M.secboot.fd"), Path("/usr/share/OVMF/OVMF32_VARS_4M.fd"),
                 smm=True, bits=32)}


def ovmf_for(arch: Arch, firmware: Firmware) -> Ovmf | None:
    """The OVMF build *firmware* means on *arch*; None for SeaBIOS."""
    if firmware is Firmware.BIOS:
        return None
    return OVMF[64 if firmware is Firmware.UEFI and arch is Arch.X86_64 else 32]

LOOPBACK = "127.0.0.1"


@dataclass(frozen=True)
class Drive:
    path: Path
    format: DiskFormat = DiskFormat.QCOW2
    interface: DriveInterface = DriveInterface.VIRTIO
    read_only: bool = False
    snapshot: bool = False
    serial: str | None = None  # shows up as /dev/disk/by-id/virtio-<serial>
    bootindex: int | None = None  # firmware boot order (lowest first); None: the firmware's default


@dataclass(frozen=True)
class Forward:
    """A host→guest TCP forward.  ``host_port`` 0 means "allocate one"; the host side
    always binds 127.0.0.1."""

    guest_port: int
    host_port: int = 0

    def __post_init__(self) -> None:
        for name in ("guest_port", "host_port"):
            port = getattr(self, name)
            if not 0 <= port <= 65535 or (name == "guest_port" and port == 0):
                raise UsageError(f"Forward.{name}: {port} is not a valid TCP port")


@dataclass(frozen=True)
class Nic:
    """A user-mode (slirp) NIC."""

    model: str = "virtio-net-pci"
    forwards: tuple[Forward, ...] = ()
    restrict: bool = False  # True: the guest cannot reach outside the host


@dataclass(frozen=True)
class Chardev:
    """Where a QEMU chardev connects: an inherited fd, a loopback TCP listener, or a unix socket."""

    fd: int | None = None
    tcp_port: int | None = None
    path: Path | None = None
    wait: bool = False  # listeners only: QEMU waits for the first client before it runs the guest

    @property
    def _wait(self) -> str:
        return "on" if self.wait else "off"

    def qemu_opts(self, ident: str) -> str:
        if self.fd is not None:
            return f"socket,id={ident},fd={self.fd}"
        if self.tcp_port is not None:
            return f"socket,id={ident},host={LOOPBACK},port={self.tcp_port},server=on,wait={self._wait}"
        if self.path is not None:
            return f"socket,id={ident},path={self.path},server=on,wait={self._wait}"
        raise UsageError("Chardev needs one of fd, tcp_port or path")


@dataclass(frozen=True)
class MachineSpec:
    """What to boot.  Frozen: derive variants with :meth:`replace`."""

    arch: Arch = Arch.X86_64
    accel: Accel = Accel.AUTO
    cpu: str | None = None  # None: the arch's default model (qemu64 / qemu32)
    cpu_flags: tuple[str, ...] = ()  # e.g. ("+svm", "+npt", "-kvm-pv-unhalt")
    tcg_threads: str | None = None  # "single" or "multi" (TCG only)
    accel_opts: tuple[str, ...] = ()  # e.g. ("xen-version=0x4000a", "kernel-irqchip=split"): -accel kvm,<opts>
    memory_mb: int = 512
    vcpus: int = 1
    firmware: Firmware = Firmware.BIOS
    kernel: Path | None = None
    initrd: Path | None = None
    append: str = ""
    drives: tuple[Drive, ...] = ()
    nics: tuple[Nic, ...] = ()
    machine: str = "q35"
    qemu_binary: str | None = None  # None: qemu-system-<arch>
    extra_args: tuple[str, ...] = ()
    name: str = "guest"
    vga: str = "none"  # "std" for guests whose firmware or bootloader talk to a screen (QMP screendump reads it)

    def __post_init__(self) -> None:
        if self.memory_mb < 16:
            raise UsageError(f"MachineSpec.memory_mb: {self.memory_mb} is below 16 MiB")
        if not 1 <= self.vcpus <= 255:
            raise UsageError(f"MachineSpec.vcpus: {self.vcpus} is outside 1..255")
        if self.tcg_threads not in (None, "single", "multi"):
            raise UsageError(f"MachineSpec.tcg_threads: {self.tcg_threads!r} is not 'single' or 'multi'")
        if self.initrd is not None and self.kernel is None:
            raise UsageError("MachineSpec.initrd needs MachineSpec.kernel (direct kernel boot)")
        if self.append and self.kernel is None:
            raise UsageError("MachineSpec.append needs MachineSpec.kernel (direct kernel boot)")
        for opt in self.accel_opts:
            if "=" not in opt or "," in opt:
                raise UsageError(f"MachineSpec.accel_opts: {opt!r} must be one key=value")
        for flag in self.cpu_flags:
            if not flag or flag[0] not in "+-" and "=" not in flag:
                raise UsageError(f"MachineSpec.cpu_flags: {flag!r} must start with + or - or be key=value")

    def replace(self, **changes: object) -> MachineSpec:
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]

    @property
    def binary(self) -> str:
        return self.qemu_binary or self.arch.qemu_binary

    @property
    def cpu_arg(self) -> str:
        flags = list(self.cpu_flags)
        if self.accel is Accel.TCG and not any(f.lstrip("+-").startswith("rdrand") for f in flags):
            # TCG emulates RDRAND, and a kernel that trusts the CPU's RNG (Debian's do) has its CRNG ready at
            # once.  Without it a 32-bit guest under TCG inside an emulated L1 waited 284 s of uptime for
            # "random: crng init done", and until then sshd could not answer (RELIABILITY.md).  "-rdrand"
            # in cpu_flags keeps it off.
            flags.append("+rdrand")
        return ",".join([self.cpu or self.arch.default_cpu, *flags])


@dataclass(frozen=True)
class Endpoints:
    """Per-launch endpoints handed to :func:`build_argv`."""

    serial: Chardev
    qmp: Chardev | None = None
    pidfile: Path | None = None
    extra: tuple[str, ...] = field(default=())


def _drive_args(index: int, drive: Drive) -> list[str]:
    opts = [f"file={drive.path}", f"format={drive.format.value}", f"id=drive{index}", "if=none"]
    if drive.read_only:
        opts.append("readonly=on")
    if drive.snapshot:
        opts.append("snapshot=on")
    args = ["-drive", ",".join(opts)]
    serial = f",serial={drive.serial}" if drive.serial else ""
    if drive.bootindex is not None:
        serial += f",bootindex={drive.bootindex}"
    if drive.interface is DriveInterface.VIRTIO:
        args += ["-device", f"virtio-blk-pci,drive=drive{index}{serial}"]
    elif drive.interface is DriveInterface.IDE:
        args += ["-device", f"ide-hd,drive=drive{index}{serial}"]
    elif drive.interface is DriveInterface.SATA:
        args += ["-device", f"ide-hd,drive=drive{index},bus=ahci0.{index}{serial}"]
    else:
        bus = "scsi0" if drive.interface is DriveInterface.SCSI else drive.interface.value + "0"
        args += ["-device", f"scsi-hd,drive=drive{index},bus={bus}.0{serial}"]
    return args


def _nic_args(index: int, nic: Nic) -> list[str]:
    opts = [f"user,id=net{index}"]
    if nic.restrict:
        opts.append("restrict=on")
    for fwd in nic.forwards:
        if fwd.host_port == 0:
            raise UsageError(f"Forward to guest port {fwd.guest_port} has no host port allocated")
        opts.append(f"hostfwd=tcp:{LOOPBACK}:{fwd.host_port}-:{fwd.guest_port}")
    return ["-netdev", ",".join(opts), "-device", f"{nic.model},netdev=net{index}"]


def build_argv(spec: MachineSpec, endpoints: Endpoints) -> list[str]:
    """QEMU's argv for *spec*.  Pure: no files are touched, no processes started."""
    if spec.accel is Accel.AUTO:
        raise UsageError("build_argv needs a resolved accelerator (kvm or tcg), not 'auto'")
    accel = spec.accel.value
    if spec.accel is Accel.TCG and spec.tcg_threads:
        accel += f",thread={spec.tcg_threads}"
    if spec.accel_opts:
        # On the one -accel: QEMU takes the first accelerator that works, so a second -accel is ignored.
        accel += "," + ",".join(spec.accel_opts)
    ovmf = ovmf_for(spec.arch, spec.firmware)
    argv = [
        spec.binary,
        "-name", f"{spec.name},debug-threads=on",
        "-machine", spec.machine + (",smm=on" if ovmf and ovmf.smm else ""),
        "-accel", accel,
        "-cpu", spec.cpu_arg,
        "-m", str(spec.memory_mb),
        "-smp", str(spec.vcpus),
        "-nodefaults",
        "-no-user-config",
        "-display", "none",
        "-vga", spec.vga,
        "-no-reboot",  # a reboot (e.g. after a panic with panic=N) ends QEMU instead of looping
        "-chardev", endpoints.serial.qemu_opts("serial0"),
        "-serial", "chardev:serial0",
    ]
    if endpoints.qmp is not None:
        argv += ["-chardev", endpoints.qmp.qemu_opts("qmp0"), "-mon", "chardev=qmp0,mode=control"]
    if endpoints.pidfile is not None:
        argv += ["-pidfile", str(endpoints.pidfile)]
    if ovmf is not None:
        # CODE read-only; VARS with snapshot=on: QEMU gives this run a private writable overlay
        # (deleted when it exits), so the firmware can store its boot entries and the Debian
        # template stays pristine, with no per-run copy to manage (also inside an L1).
        argv += ["-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={ovmf.code}",
                 "-drive", f"if=pflash,format=raw,unit=1,snapshot=on,file={ovmf.vars}"]
        if ovmf.smm:
            argv += ["-global", "driver=cfi.pflash01,property=secure,value=on"]
    if spec.kernel is not None:
        argv += ["-kernel", str(spec.kernel)]
        if spec.initrd is not None:
            argv += ["-initrd", str(spec.initrd)]
        if spec.append:
            argv += ["-append", spec.append]
    for iface in dict.fromkeys(d.interface for d in spec.drives):  # one host adapter per kind, in order of use
        if iface.scsi_controller is not None:
            ident = "scsi0" if iface is DriveInterface.SCSI else f"{iface.value}0"
            argv += ["-device", f"{iface.scsi_controller},id={ident}"]
        elif iface is DriveInterface.SATA:
            argv += ["-device", "ich9-ahci,id=ahci0"]
    for i, drive in enumerate(spec.drives):
        argv += _drive_args(i, drive)
    for i, nic in enumerate(spec.nics):
        argv += _nic_args(i, nic)
    argv += list(spec.extra_args) + list(endpoints.extra)
    return argv


def resolve_ports(spec: MachineSpec, allocate: Sequence[int]) -> MachineSpec:
    """Fill every ``host_port == 0`` forward from *allocate*, in order."""
    ports = iter(allocate)
    nics = tuple(
        dataclasses.replace(nic, forwards=tuple(
            f if f.host_port else Forward(f.guest_port, next(ports)) for f in nic.forwards))
        for nic in spec.nics
    )
    return spec.replace(nics=nics)


def unallocated_forwards(spec: MachineSpec) -> int:
    return sum(1 for nic in spec.nics for f in nic.forwards if f.host_port == 0)
