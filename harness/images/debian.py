"""Full Debian images: mmdebstrap → customize → ext4 (``mke2fs -d``) → qcow2.

No loop devices and no mounts: the root tree is customized as a directory and turned
into a filesystem by ``mke2fs -d`` (as a non-root user, inside a user namespace that gives
the tree Debian's ownership: :mod:`harness.images.steps`).  Every image gets a fresh
filesystem UUID and label (two disks labelled alike made the kernel mount the wrong root),
and a fresh SSH host key, recorded in the manifest so clients pin it.

Init modes:

* ``fast``: ``/sbin/nestbed-init`` mounts, configures the user-mode network statically,
  starts sshd and the recipe's services (shell commands), waits until sshd listens,
  prints the ready marker and keeps a root shell on ttyS0.  About 4 s to SSH under TCG.
* ``systemd``: the distribution's init, with units for the serial root shell and the
  ready marker, and systemd-networkd for DHCP.  Services are systemd units.
"""

from __future__ import annotations

import glob
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from harness.errors import ImageBuildError
from harness.images.recipes import InitMode, Recipe
from harness.images.steps import Progress, add_devices, as_tree_owner, mmdebstrap, remove_tree, resolved_versions, run_step, sbin
from harness.transport import keys

BASE_PACKAGES = ["openssh-server", "iproute2", "kmod", "procps", "coreutils", "netbase"]
SYSTEMD_PACKAGES = ["systemd-sysv", "udev", "dbus"]

FAST_INIT = r"""#!/bin/sh
# nestbed's minimal init: mount, network, sshd, services, ready marker, serial shell.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root
mount -t proc proc /proc 2>/dev/null
mount -t sysfs sysfs /sys 2>/dev/null
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs -o mode=0755 tmpfs /run
mount -t tmpfs -o mode=1777 tmpfs /tmp
mount -o remount,rw /
echo 1 > /proc/sys/kernel/printk
hostname -F /etc/hostname
token=
for w in $(cat /proc/cmdline); do
  case "$w" in nestbed.token=*) token="${w#nestbed.token=}" ;; esac
done
for m in $(cat /etc/nestbed/modules 2>/dev/null); do modprobe "$m" 2>/dev/null; done
ip link set lo up
for dev in /sys/class/net/*; do
  dev=${dev##*/}
  [ "$dev" = lo ] && continue
  ip link set "$dev" up
  ip addr add 10.0.2.15/24 dev "$dev"
  ip route add default via 10.0.2.2
  break
done
echo "nameserver 10.0.2.3" > /run/resolv.conf
mkdir -p /run/sshd && chmod 0755 /run/sshd
/usr/sbin/sshd
[ -x /etc/nestbed/services ] && /etc/nestbed/services
# The marker means "usable": wait (briefly) until sshd really listens on port 22.
i=0
while [ $i -lt 100 ] && ! grep -q ':0016 00000000:0000 0A' /proc/net/tcp /proc/net/tcp6 2>/dev/null; do
  sleep 0.05; i=$((i + 1))
done
stty -F /dev/ttyS0 -echo -onlcr 2>/dev/null
printf 'nestbed-ready-%s\n' "$token" > /dev/ttyS0
while true; do
  PS1= setsid sh -c 'exec sh </dev/ttyS0 >/dev/ttyS0 2>&1'
done
"""

SERIAL_SHELL_UNIT = """[Unit]
Description=nestbed root shell on ttyS0
After=systemd-user-sessions.service
Conflicts=serial-getty@ttyS0.service

[Service]
ExecStartPre=/bin/stty -F /dev/ttyS0 -echo -onlcr
ExecStart=/bin/sh -c 'exec sh </dev/ttyS0 >/dev/ttyS0 2>&1'
StandardInput=tty
TTYPath=/dev/ttyS0
Restart=always
RestartSec=0

[Install]
WantedBy=multi-user.target
"""

READY_UNIT = """[Unit]
Description=nestbed ready marker
After=ssh.service nestbed-serial-shell.service network-online.target {services}
Wants=ssh.service

[Service]
Type=oneshot
ExecStart=/bin/sh -c 'for w in $(cat /proc/cmdline); do case "$w" in nestbed.token=*) t="$${{w#nestbed.token=}}";; esac; done; \
stty -F /dev/ttyS0 -echo -onlcr; printf "nestbed-ready-%%s\\n" "$t" > /dev/ttyS0'

[Install]
WantedBy=multi-user.target
"""

NETWORKD = """[Match]
Name=en* eth*

[Network]
DHCP=yes
"""

SSHD_CONFIG = """# nestbed: key authentication only, one pinned host key
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitEmptyPasswords no
UseDNS no
HostKey /etc/ssh/ssh_host_ed25519_key
"""


def _write(root: Path, rel: str, content: str | bytes, mode: int = 0o644) -> Path:
    path = root / rel.lstrip("/")
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_symlink():
        path.unlink()
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    os.chmod(path, mode)
    return path


def _enable(root: Path, unit: str) -> None:
    wants = root / "etc/systemd/system/multi-user.target.wants"
    wants.mkdir(parents=True, exist_ok=True)
    link = wants / unit
    if not link.exists() and not link.is_symlink():
        target = f"/etc/systemd/system/{unit}"
        if not (root / target.lstrip("/")).exists():
            target = f"/lib/systemd/system/{unit}"
        link.symlink_to(target)


def _hypervisor_host(recipe: Recipe) -> bool:
    """Whether the image runs QEMU for guests (packages may name a suite: ``qemu-system-x86/bookworm-backports``)."""
    return "qemu-system-x86" in {p.split("/")[0] for p in recipe.packages}


def customize(root: Path, recipe: Recipe, uuid_: str) -> dict[str, Any]:
    """Everything that makes the tree a nestbed guest; returns manifest facts."""
    _, client_pub = keys.client_keypair()
    ssh_dir = root / "root/.ssh"
    ssh_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(ssh_dir, 0o700)
    _write(root, "/root/.ssh/authorized_keys", client_pub + "\n", 0o600)
    for old in glob.glob(str(root / "etc/ssh/ssh_host_*")):
        os.unlink(old)
    private, public = keys.new_host_key(f"root@{recipe.name}")
    _write(root, "/etc/ssh/ssh_host_ed25519_key", private, 0o600)
    _write(root, "/etc/ssh/ssh_host_ed25519_key.pub", public + "\n", 0o644)
    _write(root, "/etc/ssh/sshd_config.d/nestbed.conf", SSHD_CONFIG)
    # No password for anyone: root's is locked.
    shadow = root / "etc/shadow"
    lines = [("root:*:" + ln.split(":", 2)[2]) if ln.startswith("root:") else ln
             for ln in shadow.read_text().splitlines()]
    _write(root, "/etc/shadow", "\n".join(lines) + "\n", 0o640)
    hostname = recipe.name.replace("_", "-")  # underscores are not valid in host names
    _write(root, "/etc/hostname", hostname + "\n")
    _write(root, "/etc/hosts", f"127.0.0.1 localhost\n127.0.1.1 {hostname}\n")
    _write(root, "/etc/fstab", f"UUID={uuid_} / ext4 defaults 0 1\n")
    for dest, content in recipe.files.items():
        _write(root, dest, content, 0o755 if dest.endswith(".sh") else 0o644)
    append = [f"root=UUID={uuid_}", "rw"]
    if recipe.init is InitMode.FAST:
        _write(root, "/sbin/nestbed-init", FAST_INIT, 0o755)
        if recipe.services:
            _write(root, "/etc/nestbed/services", "#!/bin/sh\n" + "".join(f"( {s} ) &\n" for s in recipe.services),
                   0o755)
        modules = [m for m in ("kvm_amd", "kvm_intel") if _hypervisor_host(recipe)]
        _write(root, "/etc/nestbed/modules", " ".join(modules) + "\n")
        append.append("init=/sbin/nestbed-init")
    else:
        _write(root, "/etc/systemd/system/nestbed-serial-shell.service", SERIAL_SHELL_UNIT)
        units = " ".join(recipe.services)
        _write(root, "/etc/systemd/system/nestbed-ready.service", READY_UNIT.format(services=units))
        _write(root, "/etc/systemd/network/50-nestbed.network", NETWORKD)
        (root / "etc/systemd/system/serial-getty@ttyS0.service").unlink(missing_ok=True)
        (root / "etc/systemd/system/serial-getty@ttyS0.service").symlink_to("/dev/null")
        for unit in ("nestbed-serial-shell.service", "nestbed-ready.service", "systemd-networkd.service",
                     "ssh.service", *recipe.services):
            _enable(root, unit)
        # Kernel messages off the console: command output over serial stays clean.
        _write(root, "/etc/sysctl.d/50-nestbed.conf", "kernel.printk = 1 4 1 7\n")
    if _hypervisor_host(recipe):
        _write(root, "/etc/modprobe.d/nestbed-nested.conf", "options kvm_amd nested=1\noptions kvm_intel nested=1\n")
    return {"append": append, "host_keys": {"ssh-ed25519": " ".join(public.split()[:2])}}


def build_debian(recipe: Recipe, work: Path, say: Progress) -> dict[str, Any]:
    root = work / "root"
    include = [recipe.kernel, *BASE_PACKAGES, *recipe.packages]
    if recipe.init is InitMode.SYSTEMD:
        include += SYSTEMD_PACKAGES
    say(f"mmdebstrap {recipe.suite} ({recipe.arch.debian}): {len(include)} packages and their dependencies")
    devices = mmdebstrap(recipe, root, variant="minbase", include=include, work=work,
                         extra=["--dpkgopt=path-exclude=/usr/share/{doc,man,locale,info}/*",
                                "--dpkgopt=path-include=/usr/share/locale/locale.alias"])
    try:
        versions = resolved_versions(root)
        remove_tree(root / "var/cache/apt/archives")
        (root / "var/cache/apt/archives/partial").mkdir(parents=True, exist_ok=True)
        kernels = sorted(glob.glob(str(root / "boot/vmlinuz-*")))
        initrds = sorted(glob.glob(str(root / "boot/initrd.img-*")))
        if not kernels or not initrds:
            raise ImageBuildError(f"{recipe.name}: the tree has no /boot/vmlinuz-* or /boot/initrd.img-* "
                                  f"(is {recipe.kernel!r} a kernel package?)")
        shutil.copy(kernels[-1], work / "vmlinuz")
        shutil.copy(initrds[-1], work / "initrd.img")
        say("customizing: keys, init, network")
        fs_uuid = str(uuid.uuid4())
        facts = customize(root, recipe, fs_uuid)
        say(f"making the ext4 filesystem ({recipe.disk_size}) and the qcow2 disk")
        raw = work / "disk.raw"
        label = f"nb-{fs_uuid[:8]}"
        # As a non-root user, in the namespace where the tree has Debian's ownership (harness.images.steps).
        run_step(as_tree_owner([sbin("mke2fs"), "-q", "-F", "-t", "ext4", "-d", str(root), "-L", label,
                                "-U", fs_uuid, str(raw), recipe.disk_size]), timeout=600, what="mke2fs")
    finally:
        remove_tree(root)  # not left for the cache's cleanup: as a non-root user it holds subordinate ids' files
    add_devices(raw, devices)
    run_step(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(work / "disk.qcow2")],
             timeout=600, what="qemu-img convert")
    raw.unlink()
    return {
        "files": {"kernel": "vmlinuz", "initrd": "initrd.img", "disk": "disk.qcow2"},
        "kernel_release": Path(kernels[-1]).name.removeprefix("vmlinuz-"),
        "rootfs_uuid": fs_uuid, "rootfs_label": label, "init": recipe.init.value,
        "packages": versions, **facts,
    }
