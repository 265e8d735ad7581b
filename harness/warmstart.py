"""Warm start: a guest restored from the state it had at its ready marker, instead of booted.

The first boot of an image in a given machine shape runs as before, with one difference: its
root disk is a private writable qcow2 overlay (not ``snapshot=on``), so that when the ready
marker arrives nestbed can stop the guest, save its RAM and device state to a file
(:func:`harness.vm.migrate.save_to_file`), copy the overlay beside it as the state's read-only
disk, and let the guest run on.  That pair is published in ``<cache>/warm/<key>/`` with the
atomic-publish helper.  Every later boot of the same shape starts QEMU with ``-incoming`` on
that file and a fresh overlay over that disk: the guest runs on from its ready marker.

**The key** (:func:`state_key`) is a hash of everything that shapes the saved state: QEMU's
argv for the machine (CPU model and flags, memory, vCPUs, machine type, firmware, accel,
devices, kernel command line) with the per-launch parts taken out (serial and QMP descriptors,
forwarded host ports, the ready token, the root overlay's path), the QEMU binary (path, size,
mtime), and every file the argv names (kernel, initrd, disks: path, size, mtime, inode).  A
rebuilt image, another QEMU or another shape is another key; a state is never loaded across
a mismatch.

**After a restore** (:func:`settle`), typed on the serial console in one line: the wall clock is
set to the host's (the saved one is minutes or days old), fresh random bytes from the host are
mixed into the guest's pool and, where the image has perl or python3, the kernel is told to
reseed at once (``RNDRESEEDCRNG``); a busybox-only image reseeds at the kernel's next interval.
The serial log's first line says the guest was restored, from which state.  SSH host keys are
the image's own, pinned as for a booted guest.

**When a restore fails** (QEMU refuses the stream, the guest does not answer), the state is
removed, the reason is logged, and the guest boots as before; the caller sees a booted guest.

Not warm-started: boots asked not to (``BootOptions(warm_start=False)``,
``--nestbed-no-warm-start``, ``NESTBED_WARM_START=0``), firmware boots and boots from a given
root disk (booting is what those verify), guests inside an L1 (their state would live in the
L1), guests without QMP, and machines with a writable disk other than the root.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import secrets
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.core import paths
from harness.core.publish import lock_for, publish, write_atomic
from harness.core.run import run
from harness.errors import CacheError, HarnessError, RestoreError, UsageError
from harness.images.store import Image
from harness.vm import migrate
from harness.vm.machine import Machine
from harness.vm.spec import Accel, Chardev, DiskFormat, Drive, Endpoints, Forward, MachineSpec, build_argv, resolve_ports

log = logging.getLogger(__name__)

FORMAT = 1  # bump when what a state holds, or how it is loaded, changes
ENV = "NESTBED_WARM_START"
ROOT_SERIAL = "nestbed-root"
SETTLE_TIMEOUT = 30.0
CAPTURE_LOCK_WAIT = 0.5  # another process saving the same shape: wait this long at most, then run on unsaved
RESEED = ("perl -e 'open(F,\"<\",\"/dev/urandom\") and ioctl(F,0x5207,0)' 2>/dev/null || "
          "python3 -c 'import fcntl;fcntl.ioctl(open(\"/dev/urandom\"),0x5207)' 2>/dev/null")

# The saved states kept: those used in the last MAX_AGE_DAYS, the most recently used first, within a budget of
# $NESTBED_WARM_MAX_GB (default DEFAULT_MAX_GB) GiB.  Every shape gets a state, and shapes that name one-off
# files (an L1 carrying a test's temporary disk) would otherwise pile up; a capture evicts (evict()).
MAX_GB_ENV = "NESTBED_WARM_MAX_GB"
DEFAULT_MAX_GB = 8.0
MAX_AGE_DAYS = 14.0

_default: bool | None = None


def set_default(enabled: bool | None) -> None:
    """Turn warm start on or off for boots that do not say (the plugin's ``--nestbed-no-warm-start``)."""
    global _default
    _default = enabled


def enabled(requested: bool | None) -> bool:
    """Whether a boot that asked for *requested* (None: no preference) is warm-started."""
    if requested is not None:
        return requested
    if _default is not None:
        return _default
    return os.environ.get(ENV, "1").strip().lower() not in ("0", "no", "off", "false")


def warm_root() -> Path:
    return paths.private_dir(paths.cache_root() / "warm")


@dataclass
class Plan:
    """How one eligible boot goes: restored from *state*, or booted and captured into *key*."""

    key: str
    spec: MachineSpec  # the spec to launch (root disk already on this boot's overlay)
    token: str
    overlay_dir: Path
    state: Path | None = None  # the published state directory, when restoring
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def restoring(self) -> bool:
        return self.state is not None

    def note(self) -> str | None:
        if self.state is None:
            return None
        return (f"restored from a saved state (warm start {self.key}, saved {self.meta.get('saved_at', '?')} "
                f"at {self.meta.get('ready_seconds', '?')} s after launch), not booted")

    def cleanup(self) -> None:
        shutil.rmtree(self.overlay_dir, ignore_errors=True)


# Block formats whose drivers let QEMU migrate (save) a machine; vmdk, vpc, vhdx and vdi block it even read-only.
MIGRATABLE_FORMATS = (DiskFormat.RAW, DiskFormat.QCOW2)


def eligible(spec: MachineSpec, *, qmp: bool, nested: bool, firmware: bool, root_disk: bool) -> str | None:
    """None if a boot of *spec* may be warm-started, else why not."""
    if nested:
        return "guests inside an L1 always boot"
    if not qmp:
        return "no QMP"
    if firmware:
        return "a firmware boot is what it verifies"
    if root_disk:
        return "a boot from a given root disk is what it verifies"
    for d in spec.drives:
        if d.serial != ROOT_SERIAL and not (d.read_only or d.snapshot):
            return f"writable disk {d.path}"
        if d.format not in MIGRATABLE_FORMATS:  # QEMU refuses to migrate: "does not support live migration"
            return f"a {d.format.value} drive ({d.path}): QEMU saves no state of a machine with one"
    args = list(spec.extra_args)
    for opt, value in zip(args, args[1:], strict=False):
        if opt in ("-drive", "-blockdev", "-hda", "-hdb", "-cdrom", "-virtfs", "-fsdev") and not any(
                flag in value for flag in ("readonly=on", "read-only=on", "snapshot=on")):
            return f"writable storage in extra_args ({opt} {value})"
    return None


def _file_facts(path: str) -> list[Any]:
    try:
        st = os.stat(path)
    except OSError:
        return [path, None]
    return [path, st.st_size, st.st_mtime_ns, st.st_ino]


def host_cpu_facts() -> dict[str, Any]:
    """What a KVM guest's CPU depends on beyond its argv: the host CPU, kernel, and KVM's nested setting."""
    cpu: dict[str, str] = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            name, _, value = line.partition(":")
            name = name.strip()
            if name in ("vendor_id", "model name", "flags", "microcode") and name not in cpu:
                cpu[name] = value.strip()
    nested = {}
    for mod in ("kvm_amd", "kvm_intel"):
        with contextlib.suppress(OSError):
            nested[mod] = Path(f"/sys/module/{mod}/parameters/nested").read_text().strip()
    return {"cpu": cpu, "kernel": os.uname().release, "nested": nested}


def state_key(spec: MachineSpec) -> str:
    """The hash of everything that shapes the state of *spec* (its root disk named by the image's path)."""
    canon = resolve_ports(spec, [1] * sum(len(n.forwards) for n in spec.nics))
    argv = build_argv(canon, Endpoints(serial=Chardev(fd=3), qmp=Chardev(fd=4)))
    files = sorted({p for p in _paths_in(argv) if os.path.exists(p)})
    binary = shutil.which(spec.binary) or spec.binary
    shape: dict[str, Any] = {"format": FORMAT, "argv": argv, "binary": _file_facts(os.path.realpath(binary)),
                             "files": [_file_facts(p) for p in files]}
    if spec.accel is Accel.KVM:
        # Under KVM the guest saw the host's CPU (its features, nested SVM/VMX): another host, kernel or
        # `nested` setting is another state.  Under TCG the CPU is QEMU's model alone.
        shape["host"] = host_cpu_facts()
    return hashlib.sha256(json.dumps(shape, sort_keys=True).encode()).hexdigest()[:24]


def _paths_in(argv: list[str]) -> list[str]:
    out = []
    for arg in argv:
        for part in arg.split(","):
            value = part.split("=", 1)[1] if "=" in part else part
            if value.startswith("/"):
                out.append(value)
    return out


def canonical(spec: MachineSpec, token: str) -> MachineSpec:
    """*spec* without what changes per launch: the ready token, host ports, the root disk's snapshot flag."""
    drives = tuple(Drive(d.path, d.format, d.interface, d.read_only, False, d.serial, d.bootindex)
                   if d.serial == ROOT_SERIAL else d for d in spec.drives)
    nics = tuple(dataclasses.replace(n, forwards=tuple(Forward(f.guest_port) for f in n.forwards)) for n in spec.nics)
    return spec.replace(append=spec.append.replace(token, "TOKEN"), drives=drives, nics=nics)


def _sweep_overlays(root: Path) -> None:
    for d in root.glob("overlay-*"):
        with contextlib.suppress(ValueError, IndexError, OSError):
            pid = int(d.name.split("-")[1])
            if pid != os.getpid() and not Path(f"/proc/{pid}").exists():
                shutil.rmtree(d, ignore_errors=True)


def _overlay(base: Path, fmt: DiskFormat, into: Path) -> Path:
    out = into / "root.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", fmt.value, str(out)], timeout=30,
        what=f"the warm-start overlay over {base}", error=RestoreError)
    return out


def _complete(state: Path, needs_disk: bool) -> dict[str, Any] | None:
    """The meta of a published state that has everything a restore needs, else None."""
    try:
        meta = json.loads((state / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or not isinstance(meta.get("token"), str) or not (state / "state").is_file():
        return None
    if needs_disk and not (state / "disk.qcow2").is_file():
        return None
    return meta


def plan(spec: MachineSpec, token: str, respec: Any, *, allow_restore: bool = True) -> Plan:
    """Decide restore-or-capture for *spec*; *respec(token)* rebuilds the spec for another token.

    With *allow_restore* False (the fallback after a failed restore) the plan is always a boot.
    """
    root = warm_root()
    _sweep_overlays(root)
    key = state_key(canonical(spec, token))
    state = root / key
    has_root = any(d.serial == ROOT_SERIAL for d in spec.drives)
    meta: dict[str, Any] = {}
    if allow_restore and state.exists():
        found = _complete(state, has_root)
        if found is None:
            drop(key, "the saved state is incomplete (meta.json, state or disk.qcow2 missing or unreadable)")
        else:
            meta = found
            with contextlib.suppress(OSError):
                os.utime(state / "meta.json")  # used now: what evict() keeps longest
    overlay_dir = Path(paths.private_dir(root / f"overlay-{os.getpid()}-{secrets.token_hex(4)}"))
    if meta:
        token = str(meta["token"])
        spec = respec(token)
    root_drive = next((d for d in spec.drives if d.serial == ROOT_SERIAL), None)
    if root_drive is not None:
        base = state / "disk.qcow2" if meta else root_drive.path
        try:
            ov = _overlay(base, DiskFormat.QCOW2 if meta else root_drive.format, overlay_dir)
        except BaseException:
            shutil.rmtree(overlay_dir, ignore_errors=True)
            raise
        spec = spec.replace(drives=tuple(Drive(ov, DiskFormat.QCOW2, d.interface, False, False, d.serial, d.bootindex)
                                         if d is root_drive else d for d in spec.drives))
    return Plan(key=key, spec=spec, token=token, overlay_dir=overlay_dir, state=state if meta else None, meta=meta)


def machine_for(p: Plan, *, log_dir: Path | None, qmp: bool = True) -> Machine:
    return Machine(p.spec, log_dir=log_dir, token=p.token, qmp=qmp,
                   incoming=(p.state / "state") if p.state else None, log_note=p.note())


def restore(p: Plan, machine: Machine, *, timeout: float = migrate.RESTORE_TIMEOUT) -> float:
    """Wait for *machine* (launched from the plan's state) to run and settle it; seconds taken."""
    started = time.monotonic()
    migrate.wait_incoming(machine, timeout=timeout)
    settle(machine)
    return time.monotonic() - started


def settle(machine: Machine, *, timeout: float = SETTLE_TIMEOUT) -> None:
    """Clock, entropy, and proof that the serial shell answers, in one typed line."""
    tok = secrets.token_hex(8)
    now = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())
    seed = secrets.token_hex(32)
    machine.send(f"\ndate -u -s '{now}' >/dev/null; printf %s {seed} > /dev/urandom; {RESEED}; "
                 f"printf '\\n%s-w\\n' {tok}\n")
    try:
        machine.expect(rf"\n{tok}-w\n", timeout=timeout, what="the serial shell after a restore")
    except HarnessError as exc:
        raise RestoreError(f"{machine.spec.name}: the restored guest did not answer on serial: {exc}") from exc


def max_bytes() -> int:
    """The budget of the saved states, from ``$NESTBED_WARM_MAX_GB`` (a bad value is one line naming it)."""
    text = os.environ.get(MAX_GB_ENV, "").strip()
    try:
        gib = float(text) if text else DEFAULT_MAX_GB
    except ValueError:
        gib = -1.0
    if not gib >= 0:  # also nan
        raise UsageError(f"${MAX_GB_ENV}={text!r}: expected a number of GiB (0 or more)")
    return int(gib * (1 << 30))


def to_evict(states: list[tuple[str, float, int]], *, budget: int, now: float, keep: str) -> list[tuple[str, str]]:
    """Which states go, and why (pure): *states* are (key, last used, bytes).  Those unused for
    :data:`MAX_AGE_DAYS`, then the least recently used until the rest fit in *budget*; never *keep*."""
    out: list[tuple[str, str]] = []
    kept: list[tuple[str, float, int]] = []
    for key, used, size in states:
        if key != keep and now - used > MAX_AGE_DAYS * 86400:
            out.append((key, f"unused for {(now - used) / 86400:.0f} days"))
        else:
            kept.append((key, used, size))
    total = sum(size for _, _, size in kept)
    for key, _used, size in sorted(kept, key=lambda s: s[1]):
        if total <= budget:
            break
        if key == keep:
            continue
        out.append((key, f"the least recently used, over the {budget / (1 << 30):g} GiB budget (${MAX_GB_ENV})"))
        total -= size
    return out


def evict(*, keep: str) -> list[str]:
    """Remove the states :func:`to_evict` picks (each under its lock, as :func:`drop`); the keys removed."""
    root = warm_root()
    states = []
    for d in root.iterdir():
        if d.name.startswith((".", "overlay-")) or not d.is_dir():
            continue
        with contextlib.suppress(OSError):
            used = (d / "meta.json").stat().st_mtime
            states.append((d.name, used, sum(f.stat().st_size for f in d.iterdir() if f.is_file())))
    gone = to_evict(states, budget=max_bytes(), now=time.time(), keep=keep)
    for key, why in gone:
        drop(key, why, level=logging.INFO)
    return [key for key, _ in gone]


def drop(key: str, reason: str, *, saved_at: str | None = None, level: int = logging.WARNING) -> None:
    """Remove the state *key* (it failed to load, or is evicted) and what was kept beside it; the next boot
    saves a new one.

    With *saved_at*, only that state: one another process saved since (after its own drop) stays.
    """
    from filelock import Timeout

    root = warm_root()
    state = root / key
    try:
        with lock_for(state).acquire(timeout=10):
            if saved_at is not None:
                with contextlib.suppress(OSError, ValueError):
                    if json.loads((state / "meta.json").read_text()).get("saved_at") != saved_at:
                        return  # already replaced by a newer state
            log.log(level, "warm start: dropping saved state %s: %s", key, reason)
            old = state.with_name(f".{state.name}.{os.getpid()}-{secrets.token_hex(4)}.part")
            with contextlib.suppress(FileNotFoundError):
                state.rename(old)
            shutil.rmtree(old, ignore_errors=True)
            for kept in root.glob(f"{key}.*.json"):
                kept.unlink(missing_ok=True)
    except Timeout:
        log.warning("warm start: could not drop saved state %s (%s): its lock was held for 10 s", key, reason)


def capture(p: Plan, machine: Machine, image: Image, ready_seconds: float | None) -> float | None:
    """Save *machine* (at its ready marker) as the state *p.key*; seconds the guest was paused, or None.

    Never fails the boot: a capture that cannot be made is logged, and the guest runs on.
    """
    root_drive = next((d for d in machine.spec.drives if d.serial == ROOT_SERIAL), None)
    started = time.monotonic()
    saved: dict[str, bool] = {}

    def make(tmp: Path) -> None:
        tmp.mkdir(mode=0o700)
        migrate.save_to_file(machine, tmp / "state")
        (tmp / "state").chmod(0o400)
        saved["stopped"] = True
        if root_drive is not None:
            # The migration flushed and released the overlay: its bytes are the state's disk.
            shutil.copyfile(root_drive.path, tmp / "disk.qcow2")
            (tmp / "disk.qcow2").chmod(0o444)  # a read-only base from now on
        meta = {"format": FORMAT, "key": p.key, "image": image.name, "token": p.token,
                "ready_seconds": round(ready_seconds or 0.0, 2),
                "saved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "state_bytes": (tmp / "state").stat().st_size}
        write_atomic(tmp / "meta.json", json.dumps(meta, indent=1))

    target = warm_root() / p.key
    has_root = root_drive is not None
    try:
        # "Exists" means complete: a damaged directory is replaced, not trusted.
        publish(target, make, what=f"warm-start state ({image.name})", timeout=CAPTURE_LOCK_WAIT,
                exists=lambda t: _complete(t, has_root) is not None)
    except CacheError:
        return None  # another process is saving this shape right now
    except (HarnessError, OSError) as exc:
        log.warning("warm start: could not save the state of %s: %s", image.name, exc)
    finally:
        with contextlib.suppress(HarnessError):
            if _paused(machine):  # stopped by the save, whether or not it finished
                migrate.resume(machine)
    paused = time.monotonic() - started if saved else None
    if saved:
        try:  # with the guest running again
            evict(keep=p.key)
        except (HarnessError, OSError) as exc:
            log.warning("warm start: could not evict old states: %s", exc)
    return paused


def _paused(machine: Machine) -> bool:
    if machine.qmp is None:
        return False
    try:
        status = machine.qmp.cmd("query-status")
    except Exception:  # noqa: BLE001 - a gone QEMU is not paused
        return False
    return bool(status.get("status") != "running")

