"""Kind ``disk``: a disk image the user brings, booted as it is (docs/own-image.md).

Any format QEMU reads (raw, qcow2, vmdk of every subformat, vpc fixed and dynamic, vhdx, vdi, qed),
found by ``qemu-img info`` (:func:`harness.images.inspect.inspect_disk`, which also sees a fixed VHD that
QEMU's probe calls raw) unless the recipe names it.  The file is never written: every boot opens it
with ``snapshot=on``, so QEMU puts a throw-away qcow2 overlay in front of it.  Where a format is better
converted first (:data:`CONVERT`), the conversion is made once per content (the SHA-256 of the file)
into ``<cache>/converted/`` by :func:`harness.core.publish.publish`, and booted the same way.

"Building" a disk image is cheap and writes only the image's directory in the cache: the file's
SHA-256 is checked (when the recipe gives one), the format detected, the firmware decided (the
recipe's, or from the partition table: an EFI system partition → UEFI, a BIOS boot partition or an
active MBR partition → SeaBIOS; both → SeaBIOS, the quicker to start; the reason is recorded and
logged), and the file's size and modification time recorded: a changed file is checked and
inspected again before its next boot (:func:`prepare`).

Booting it (:func:`boot_spec`): the firmware runs the disk's own bootloader; a VGA device is there
(firmware and bootloaders talk to a screen, and a failed boot's screen is saved with QMP
``screendump``); the NIC model and disk controller are the recipe's.  With ``cloud_init`` (the
default) a NoCloud seed (:mod:`harness.images.seed`) is attached on the same controller, and this
boot's token reaches the guest through SMBIOS.  Kind ``cloud`` images (built here:
:mod:`harness.images.cloud`) boot the same way.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import logging
import os
import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness.core import paths
from harness.core.publish import publish
from harness.core.run import run
from harness.errors import ConsoleTimeout, ImageBuildError, RecipeError, TransportError, UsageError
from harness.images import inspect, seed
from harness.images.recipes import NIC_MODELS, Kind, Recipe
from harness.images.steps import Progress
from harness.vm.spec import Arch, DiskFormat, Drive, DriveInterface, Firmware, Forward, MachineSpec, Nic

if TYPE_CHECKING:
    from harness.images.store import Image
    from harness.transport.ssh import SSHTransport
    from harness.vm.machine import Machine

log = logging.getLogger(__name__)

DISK_VERSION = 1
CONVERT_VERSION = 1
CONVERT_TIMEOUT = 1800.0
OWN_DISK_KINDS = (Kind.DISK, Kind.CLOUD)  # booted by their own bootloader, reached through a seed or a login
# (format, subformat) → why it is converted to qcow2 once instead of being booted as it is.
CONVERT: dict[tuple[str, str], str] = {
    ("vmdk", "streamOptimized"): "a streamOptimized VMDK is a compressed, append-only stream (how OVAs ship disks): "
                                 "QEMU cannot write one in place and inflates a grain on every read, so it is "
                                 "converted to qcow2 once",
}
MARKER_POLL = 2.0  # seconds per wait on the serial console between SSH probes (a login and no marker)


def sha256_file(path: Path) -> str:
    """The file's SHA-256, hex (the one helper: export and the OVF reader's callers use it too)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def signature(path: Path) -> list[int]:
    """What says the file changed, cheaply: (size, mtime in ns, inode)."""
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ino]


def source_path(recipe: Recipe) -> Path:
    """The recipe's disk file; a :class:`RecipeError` naming the recipe if it is not there."""
    assert recipe.path is not None  # required for kind disk (the parser checks)
    if not recipe.path.is_file():
        raise RecipeError(str(recipe.file), "path", f"{recipe.path}: " +
                          ("not a regular file" if recipe.path.exists() else "no such file"))
    if not os.access(recipe.path, os.R_OK):
        raise RecipeError(str(recipe.file), "path", f"{recipe.path}: cannot be read by this user")
    return recipe.path


def decide_firmware(requested: str, guess: str, why: str) -> tuple[Firmware, str]:
    """(firmware, reason) from the recipe's ``firmware`` and :func:`inspect.firmware_guess`'s verdict (pure)."""
    if requested != "auto":
        return Firmware(requested), "the recipe says so"
    if guess == "uefi":
        return Firmware.UEFI, f"auto: {why}"
    if guess == "either":
        return Firmware.BIOS, f"auto: {why}; either boots, SeaBIOS is the quicker to start"
    if guess == "bios":
        return Firmware.BIOS, f"auto: {why}"
    return Firmware.BIOS, f"auto: {why}; trying SeaBIOS"


def conversion_key(sha256: str, fmt: str, subformat: str) -> str:
    """The converted copy's name in the cache: the source's content and what it was converted from (pure)."""
    blob = f"convert-v{CONVERT_VERSION}\n{fmt}\n{subformat}\n{sha256}".encode()
    return hashlib.sha256(blob).hexdigest()[:32]


def converted(src: Path, fmt: str, subformat: str, sha256: str, say: Progress) -> Path:
    """A qcow2 copy of *src*, cached by content (built once, atomically, under a lock)."""
    target = paths.cache_root() / "converted" / f"{conversion_key(sha256, fmt, subformat)}.qcow2"

    def make(tmp: Path) -> None:
        say(f"converting {src.name} ({fmt} {subformat}) to qcow2 once: {CONVERT[(fmt, subformat)]}")
        run(["qemu-img", "convert", "-f", fmt, "-O", "qcow2", str(src), str(tmp)], timeout=CONVERT_TIMEOUT,
            what=f"converting {src}", error=ImageBuildError)
        os.chmod(tmp, 0o444)

    publish(target, make, what=f"converted disk ({src.name})", error=ImageBuildError, timeout=CONVERT_TIMEOUT)
    return target


def build_disk(recipe: Recipe, work: Path, say: Progress) -> dict[str, Any]:
    """The "builder" of kind disk: check, inspect and (if needed) convert the recipe's file; manifest fields."""
    src = source_path(recipe)
    sig = signature(src)
    digest = ""
    if recipe.sha256:
        say(f"sha256 of {src}")
        digest = sha256_file(src)
        if digest != recipe.sha256:
            raise RecipeError(str(recipe.file), "sha256", f"{src} has sha256 {digest}, not {recipe.sha256}")
    hardware: dict[str, Any] = {}
    if src.suffix.lower() in (".ova", ".ovf"):
        src, hardware = _from_ovf(recipe, src, work, say)
    info = inspect.inspect_disk(src)
    fmt = recipe.format or info["format"]
    subformat = str(info.get("subformat", ""))
    if fmt not in {f.value for f in DiskFormat}:
        raise RecipeError(str(recipe.file), "path", f"{src}: format {fmt!r} is not one nestbed boots "
                                                    f"({', '.join(f.value for f in DiskFormat)})")
    if hardware.get("firmware") and recipe.firmware == "auto":
        firmware, why = Firmware(hardware["firmware"]), "the OVF says so"
    else:
        firmware, why = decide_firmware(recipe.firmware, info["firmware"], info["firmware_why"])
    say(f"{src.name}: {fmt}{' ' + subformat if subformat else ''}, {info['virtual_size']} bytes; "
        f"firmware {firmware.value} ({why})")
    disk, boot_fmt = src, fmt
    if (fmt, subformat) in CONVERT:
        disk, boot_fmt = converted(src, fmt, subformat, digest or sha256_file(src), say), DiskFormat.QCOW2.value
    if hardware:
        hardware["extra_disks"] = [_extra_disk(recipe, d, work, say) for d in hardware.pop("more_disks")]
    return {"files": {"disk": _in_image(disk, work)}, "format": boot_fmt, "source": str(recipe.path), "source_format": fmt,
            "source_subformat": subformat, "source_signature": sig, "source_sha256": digest,
            "virtual_size": info["virtual_size"], "partition_table": info["table"],
            "firmware": firmware.value, "firmware_why": why, "disk_version": DISK_VERSION, "hardware": hardware}


# OVF controllers (harness/images/ovf.py CONTROLLERS) -> the drive interface nestbed gives the disk.
OVF_CONTROLLERS = {"ide": "ide", "ahci": "sata", "lsi53c895a": "lsi", "megasas": "megasas", "pvscsi": "pvscsi",
                   "virtio-scsi": "scsi", "virtio": "virtio", "mptsas1068": "lsi", "nvme": "virtio"}


def _from_ovf(recipe: Recipe, src: Path, work: Path, say: Progress) -> tuple[Path, dict[str, Any]]:
    """An OVA/OVF's first disk (an OVA's extracted into the image's directory) and the hardware it names."""
    from harness.images import ovf

    app = ovf.load(src, workdir=_mkdir(work / "ovf"))
    if not app.disks:
        raise RecipeError(str(recipe.file), "path", f"{src}: the OVF names no disk")
    first = app.disks[0]
    subs = list(app.substitutions)
    iface = OVF_CONTROLLERS.get(first.controller, "virtio")
    if first.controller in ("mptsas1068", "nvme"):
        subs.append(f"disk controller {first.controller} -> {iface}: nestbed does not attach disks to it yet")
    nic = app.nics[0] if app.nics and app.nics[0] in NIC_MODELS else "virtio-net-pci"
    for line in subs:
        log.warning("%s: %s", recipe.name, line)
    say(f"{src.name}: OVF {app.name!r}: {app.vcpus} vCPUs, {app.memory_mb} MiB, {app.firmware}, "
        f"{len(app.disks)} disk(s) on {first.controller}, NICs {', '.join(app.nics) or 'none'}; {app.manifest or 'no manifest'}")
    return first.path, {"vcpus": app.vcpus, "memory_mb": app.memory_mb, "firmware": app.firmware,
                        "disk_interface": iface, "nic_model": nic, "substitutions": subs, "ovf_name": app.name,
                        "more_disks": list(app.disks[1:])}


def _in_image(path: Path, work: Path) -> str:
    """*path* as the manifest records it: relative when it lies in the build directory *work* (an OVA's
    extracted disk), which is renamed into the image's directory once built; else absolute."""
    return str(path.relative_to(work)) if path.is_relative_to(work) else str(path)


def _extra_disk(recipe: Recipe, d: Any, work: Path, say: Progress) -> dict[str, str]:
    """An OVF's second or later disk (an :class:`~harness.images.ovf.OvfDisk`) as the manifest records it:
    its file (converted once where :data:`CONVERT` says), format and drive interface."""
    info = inspect.inspect_disk(d.path)
    fmt, subformat = str(info["format"]), str(info.get("subformat", ""))
    if fmt not in {f.value for f in DiskFormat}:
        raise RecipeError(str(recipe.file), "path", f"{d.path.name}: format {fmt!r} is not one nestbed attaches")
    path = d.path
    if (fmt, subformat) in CONVERT:
        path, fmt = converted(d.path, fmt, subformat, sha256_file(d.path), say), DiskFormat.QCOW2.value
    say(f"{d.path.name}: {fmt}, {info['virtual_size']} bytes, attached after the boot disk on {d.controller}")
    return {"path": _in_image(path, work), "format": fmt, "interface": OVF_CONTROLLERS.get(d.controller, "virtio")}


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


DISK_SUFFIXES = (".qcow2", ".img", ".raw", ".vmdk", ".vhd", ".vpc", ".vhdx", ".vdi", ".qed", ".ova", ".ovf")


def is_disk_file(name: str) -> bool:
    """Whether ``nestbed run NAME`` means a file (a path, or a disk image's suffix) rather than a recipe name."""
    return "/" in name or name.lower().endswith(DISK_SUFFIXES) or Path(name).is_file()


def recipe_for_file(path: Path) -> Recipe:
    """A disk recipe for a bare file (``nestbed run disk.vmdk -- CMD``): x86_64, cloud-init, firmware auto."""
    resolved = Path(path).expanduser().resolve()
    if not resolved.is_file():
        raise UsageError(f"{path}: no such file")
    name = seed.hostname_for(resolved.stem) or "disk"
    return Recipe(name=name, file=resolved, kind=Kind.DISK, arch=Arch.X86_64, path=resolved,
                  description=f"the disk image {resolved}", ready_timeout=600.0)


def image_for_file(path: Path) -> Image:
    from harness.images import store

    return store.image_for(recipe_for_file(path))


def prepare(image: Image) -> Image:
    """*image* (kind disk) built, and rebuilt if its file changed since (size, mtime, inode)."""
    from harness.images import store

    if image.recipe.kind is not Kind.DISK:
        return image if image.built else store.build(image)
    current = signature(source_path(image.recipe))
    if image.built and image.manifest.get("source_signature") == current:
        return image
    return store.build(image, force=image.built)


# -- booting ----------------------------------------------------------------------------------

def boot_firmware(image: Image, override: Firmware | str | None) -> tuple[Firmware, str]:
    """The firmware this boot uses and why (a caller's ``firmware=`` wins over the image's decision)."""
    if override is not None:
        return Firmware(str(override)), "requested for this boot"
    m = image.manifest
    if image.recipe.kind is Kind.CLOUD:
        return Firmware.BIOS, "a cloud image built here boots under either; SeaBIOS is the quicker to start"
    return Firmware(m["firmware"]), str(m.get("firmware_why", ""))


def uses_seed(image: Image) -> bool:
    return image.recipe.kind is Kind.CLOUD or image.recipe.cloud_init


def extra_disks(image: Image) -> list[tuple[Path, DiskFormat, DriveInterface]]:
    """An OVA's second and later disks, in the OVF's order, as its manifest records them."""
    return [(image.dir / d["path"], DiskFormat(d["format"]), DriveInterface(d["interface"]))
            for d in (image.manifest.get("hardware") or {}).get("extra_disks", ())]


def host_files(image: Image) -> list[tuple[Path, DiskFormat]]:
    """Every file a boot of *image* (kind disk or cloud) opens, with its format: the boot disk, an OVA's
    other disks, the seed.  An L1 that runs the image gets each as a read-only drive (harness/nested.py)."""
    files = [(image.disk, DiskFormat(image.manifest.get("format", "qcow2")))]
    files += [(path, fmt) for path, fmt, _ in extra_disks(image)]
    if uses_seed(image):
        files.append((seed.seed(name=image.name, extra=image.recipe.user_data), DiskFormat.RAW))
    return [(Path(f), fmt) for f, fmt in files if f is not None]


def boot_spec(base: MachineSpec, image: Image, *, token: str, firmware: Firmware | str | None = None,
              extra_drives: tuple[Drive, ...] = (), forwards: tuple[int, ...] = ()) -> MachineSpec:
    """*base* (CPU, memory, accelerator, extra args) booting *image* (kind disk or cloud) by its own bootloader."""
    r = image.recipe
    fw, why = boot_firmware(image, firmware)
    from harness.images.bootdisk import check_firmware

    check_firmware(r.arch, fw)
    log.info("%s: firmware %s (%s)", image.name, fw.value, why)
    disk = image.disk
    assert disk is not None
    hw = image.manifest.get("hardware") or {}
    defaults = {f.name: f.default for f in dataclasses.fields(Recipe)}
    iface = DriveInterface(r.disk_interface if r.disk_interface != defaults["disk_interface"]
                           else hw.get("disk_interface", r.disk_interface))
    nic_model = r.nic_model if r.nic_model != defaults["nic_model"] else hw.get("nic_model", r.nic_model)
    if hw and base.memory_mb == r.memory_mb == defaults["memory_mb"]:  # the recipe's (and caller's) values win
        base = base.replace(memory_mb=int(hw.get("memory_mb", base.memory_mb)))
    if hw and base.vcpus == r.vcpus == defaults["vcpus"]:
        base = base.replace(vcpus=int(hw.get("vcpus", base.vcpus)))
    fmt = DiskFormat(image.manifest.get("format", "qcow2"))
    # snapshot=on: QEMU writes to a throw-away qcow2 overlay; the user's file is opened read-only under it.
    drives = [Drive(disk, fmt, interface=iface, snapshot=True, serial="nestbed-root", bootindex=0)]
    # An OVA's other disks, in the OVF's order, each behind its own throw-away overlay too.
    drives += [Drive(path, dfmt, interface=dif, snapshot=True, serial=f"nestbed-disk{i}")
               for i, (path, dfmt, dif) in enumerate(extra_disks(image), 2)]
    extra: list[str] = []
    if uses_seed(image):
        drives.append(Drive(seed.seed(name=image.name, extra=r.user_data), DiskFormat.RAW, interface=iface,
                            snapshot=True, serial="cidata"))
        extra += ["-smbios", f"type=1,serial={seed.TOKEN_PREFIX}{token}"]
    nic = Nic(model=nic_model, forwards=(Forward(22), *(Forward(p) for p in forwards if p != 22)))
    return base.replace(firmware=fw, kernel=None, initrd=None, append="", vga="std",
                        machine="pc" if iface is DriveInterface.IDE else base.machine,
                        drives=(*drives, *extra_drives), nics=(nic,), extra_args=(*extra, *base.extra_args))


def host_key_from(console_text: str, token: str) -> str | None:
    """The ``ssh-ed25519 AAAA...`` line the seed's ready script printed for this boot's *token* (pure)."""
    for line in console_text.splitlines():
        head, _, rest = line.strip().partition(" ")
        if head == f"nestbed-hostkey-{token}" and len(rest.split()) >= 2:
            keytype, b64 = rest.split()[:2]
            try:
                base64.b64decode(b64, validate=True)
            except ValueError:
                continue
            return f"{keytype} {b64}"
    return None


def probe_host_key(port: int, *, timeout: float = 5.0, connector: Any = None) -> str | None:
    """The SSH host key a server on 127.0.0.1:*port* presents (no authentication), or None if none answers.
    *connector* (:meth:`Machine.connector`): a factory of channels to the port, for a guest inside an L1."""
    import paramiko

    try:
        sock = connector() if connector is not None else socket.create_connection(("127.0.0.1", port),
                                                                                   timeout=timeout)
    except (OSError, TransportError):
        return None
    t = paramiko.Transport(sock)
    try:
        from harness.transport.ssh import quiet_paramiko

        with quiet_paramiko():
            t.banner_timeout = timeout
            t.start_client(timeout=timeout)
            key = t.get_remote_server_key()
        return f"{key.get_name()} {key.get_base64()}"
    except (paramiko.SSHException, OSError, EOFError):
        return None
    finally:
        t.close()


def wait_ready(machine: Machine, image: Image, *, timeout: float) -> str | None:
    """Wait until the guest is reachable; the SSH host key to pin for this boot (None: serial only, no SSH).

    With a seed: cloud-init's ready marker on the serial console, and the host key it printed.  With a
    login (and no marker, or no seed): an SSH server that presents a host key on the forwarded port,
    pinned on first use for this boot (said in the log); the login itself is tried by the caller.
    """
    deadline = time.monotonic() + timeout
    marker = rf"nestbed-ready-{machine.token}\n"
    seeded = uses_seed(image)
    login = image.recipe.login is not None or not seeded
    port = machine.host_ports.get(22)
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise ConsoleTimeout("ready marker from cloud-init" + (" nor an SSH server" if login else ""), timeout,
                                 serial_tail=machine.serial_tail(), stderr_tail=machine.stderr_text(),
                                 level=machine.level)
        if seeded:
            try:
                machine.expect(marker, timeout=min(left, MARKER_POLL) if login else left,
                               what="ready marker from cloud-init")
                key = host_key_from(machine.before_match(), machine.token)
                if key is None:
                    log.warning("%s: cloud-init printed no ed25519 host key: pinning the one SSH presents first",
                                image.name)
                return key or (probe_host_key(port, connector=machine.connector(22)) if port else None)
            except ConsoleTimeout:
                if not login:
                    raise
        elif machine.poll() is not None:
            machine.raise_exited("while waiting for SSH")
        if login and port and (key := probe_host_key(port, timeout=min(5.0, max(0.5, left)),
                                                     connector=machine.connector(22))):
            log.warning("%s: SSH host key %s pinned on first use for this boot (the image is not nestbed's: no "
                        "key was recorded when it was built)", image.name, key.split()[0])
            return key
        if not seeded:
            time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))


class GuestNotReached(ConsoleTimeout):
    """A guest nestbed did not build never became reachable; the error names the screenshot of its screen."""

    def __init__(self, cause: ConsoleTimeout, screenshot: Path | None, why_no_screen: str = "") -> None:
        super().__init__(cause.pattern, cause.timeout, serial_tail=cause.serial_tail, stderr_tail=cause.stderr_tail,
                         level=cause.level)
        self.screenshot = screenshot
        shown = f"; its screen then: {screenshot}" if screenshot else f"; no screenshot ({why_no_screen})"
        serial = "" if cause.serial_tail.strip() else " (it printed nothing on the serial console)"
        self.message = f"{self.message}{serial}{shown}"
        self.args = (self.message,)


def not_reached(machine: Machine, exc: ConsoleTimeout) -> GuestNotReached:
    """*exc* with a screenshot of the guest's VGA screen saved beside its serial log."""
    assert machine.serial_log_path is not None
    path = machine.serial_log_path.with_name(f"{machine.spec.name}-screen.png")
    try:
        return GuestNotReached(exc, machine.screendump(path))
    except Exception as err:  # noqa: BLE001 - the screenshot is a diagnostic: never mask the timeout
        return GuestNotReached(exc, None, f"screendump failed: {err}")


def connect_ssh(image: Image, machine: Machine, host_key: str | None, *, timeout: float,
                name: str) -> SSHTransport:
    """SSH to a guest nestbed did not build: root with the client key (cloud-init put it there) or the login."""
    from harness.transport import keys
    from harness.transport.ssh import SSHTransport

    if host_key is None or 22 not in machine.host_ports:
        raise TransportError(f"image {image.name}: no SSH server answered during the boot (boot it with via='serial')")
    login = image.recipe.login
    if login is not None and not uses_seed(image):
        if login.key is not None and not login.key.is_file():
            raise RecipeError(str(image.recipe.file), "login.key", f"{login.key}: no such file")
        log.info("%s: SSH as %s", image.name, login.describe())
        return SSHTransport(host="127.0.0.1", port=machine.host_ports[22], user=login.user, key_path=login.key,
                            password=login.password or None, host_key=host_key, timeout=timeout, name=name,
                            sock_factory=machine.connector(22))
    key_path, _ = keys.client_keypair()
    return SSHTransport(host="127.0.0.1", port=machine.host_ports[22], user="root", key_path=key_path,
                        host_key=host_key, timeout=timeout, name=name, sock_factory=machine.connector(22))


def check_inner(image: Image, attached: dict[str, Image], *, firmware: Firmware | str | None) -> None:
    """Refuse, in one line, a boot of *image* inside a host that cannot run it: not attached to that host
    (its files are drives of the host's, given when the host boots), or under UEFI (the hosts carry no OVMF)."""
    if attached.get(image.name) != image:
        raise UsageError(f"image {image.name} (kind {image.recipe.kind.value}) was not attached to this host: "
                         "pass it to boot_l1(inner=[...]) (its files become the host's drives)")
    fw, why = boot_firmware(image, firmware)
    if fw is not Firmware.BIOS:
        raise UsageError(f"image {image.name}: {fw.value} ({why}) inside an L1: the L1 image carries no OVMF; "
                         "boot it under SeaBIOS (firmware = \"bios\") or at level 1")


def check_options(image: Image, *, kernel: object, root_disk: object, append: str) -> None:
    """Refuse what a guest booted by its own bootloader cannot take."""
    if kernel is not None or root_disk is not None or append:
        raise UsageError(f"image {image.name} (kind {image.recipe.kind.value}) boots by its own bootloader: it takes "
                         "no kernel, append or root_disk")
