"""cloud-init NoCloud seeds: a small FAT image labelled ``CIDATA`` with ``meta-data`` and ``user-data``.

How a guest nestbed did not build lets nestbed in (docs/own-image.md).  The seed's user-data:

* root's ``authorized_keys`` gets this cache's client key (:func:`harness.transport.keys.client_keypair`),
  ``disable_root: false`` so that no "please log in as debian" prefix is put before it;
* the hostname (the recipe's name);
* ``bootcmd``: kernel messages off the serial console (they would land inside command output);
* ``runcmd``, the last thing cloud-init does: wait (bounded) until sshd listens, then start a root shell on
  ttyS0 (a systemd unit that conflicts with the serial getty), which first prints the SSH host key and
  the ready marker.  Both carry this boot's token, read from the SMBIOS type 1 serial number
  (``-smbios type=1,serial=nestbed.token=<token>``), so the seed is the same file for every boot
  and is cached, and stale console output can never pass for a marker or a key.
* what the recipe adds (``user_data``): cloud-config (a TOML table or ``#cloud-config`` YAML) is merged
  in, lists appended after nestbed's and other values the recipe's; a ``#!`` script goes in a second
  MIME part (cloud-init runs it with the other user scripts).

The image is made without root and without loop devices: ``mkfs.vfat -C`` on a file, ``mcopy`` into it.
Seeds are cached by content (``<cache>/seeds/``, published by :func:`harness.core.publish.publish`).
The user-data is written as JSON after its ``#cloud-config`` line: JSON is YAML, and nothing here
needs a YAML library (only checking a recipe's YAML text does: :mod:`harness.images.recipes`).
"""

from __future__ import annotations

import copy
import datetime
import hashlib
import json
import os
import re
import shutil
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from pathlib import Path
from typing import Any

from harness.core import paths
from harness.core.publish import publish, scratch_name
from harness.core.run import run
from harness.errors import ImageBuildError, UsageError

SEED_VERSION = 1
LABEL = "CIDATA"
TOKEN_PREFIX = "nestbed.token="  # the SMBIOS type 1 serial number: nestbed.token=<token>
STEP_TIMEOUT = 60.0
SSHD_WAIT_TENTHS = 600  # the ready script waits up to 60 s for sshd to listen
_HOST_RE = re.compile(r"[^a-z0-9-]+")

SERIAL_SHELL_UNIT = """[Unit]
Description=nestbed root shell on ttyS0 (from the cloud-init seed)
Conflicts=serial-getty@ttyS0.service
After=serial-getty@ttyS0.service

[Service]
ExecStartPre=-/bin/stty -F /dev/ttyS0 -echo -onlcr
ExecStart=/bin/sh -c 'cat /run/nestbed/announce 2>/dev/null; exec sh'
StandardInput=tty
StandardOutput=tty
StandardError=tty
TTYPath=/dev/ttyS0
TTYReset=no
Restart=always
RestartSec=0
"""

READY_SCRIPT = f"""#!/bin/sh
# nestbed (cloud-init seed): announce the host key and readiness on ttyS0, then keep a root shell there.
t=$(sed -n 's/^{re.escape(TOKEN_PREFIX)}//p' /sys/class/dmi/id/product_serial 2>/dev/null)
i=0
while [ $i -lt {SSHD_WAIT_TENTHS} ] && ! grep -q ':0016 00000000:0000 0A' /proc/net/tcp /proc/net/tcp6 2>/dev/null; do
  sleep 0.1; i=$((i + 1))
done
mkdir -p /run/nestbed
{{
  if [ -r /etc/ssh/ssh_host_ed25519_key.pub ]; then
    printf 'nestbed-hostkey-%s %s\\n' "$t" "$(cut -d' ' -f1,2 /etc/ssh/ssh_host_ed25519_key.pub)"
  fi
  printf 'nestbed-ready-%s\\n' "$t"
}} > /run/nestbed/announce
if command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
  systemctl daemon-reload
  systemctl start nestbed-serial-shell.service && exit 0
fi
stty -F /dev/ttyS0 -echo -onlcr 2>/dev/null
cat /run/nestbed/announce > /dev/ttyS0
setsid sh -c 'while true; do sh </dev/ttyS0 >/dev/ttyS0 2>&1; done' >/dev/null 2>&1 &
"""


def hostname_for(name: str) -> str:
    """A valid host name from an image name (lowercase letters, digits, dashes; at most 63)."""
    host = _HOST_RE.sub("-", name.lower()).strip("-")[:63].strip("-")
    return host or "nestbed-guest"


def nestbed_config(*, hostname: str, public_key: str) -> dict[str, Any]:
    """nestbed's own cloud-config (see the module docstring)."""
    return {
        "hostname": hostname,
        "preserve_hostname": False,
        "disable_root": False,
        "ssh_pwauth": False,
        "ssh_authorized_keys": [public_key],
        # Quicker first boots under TCG (measured: ready 135 s -> see docs/own-image.md): one host key type
        # (RSA, DSA and ECDSA took ~25 s to generate), no locale generation, apt's sources left as they are.
        # A recipe's user_data may set these otherwise.
        "ssh_genkeytypes": ["ed25519"],
        "locale": False,
        "apt": {"preserve_sources_list": True},
        "bootcmd": [["sh", "-c", "echo 1 > /proc/sys/kernel/printk"]],
        "write_files": [
            {"path": "/etc/systemd/system/nestbed-serial-shell.service", "content": SERIAL_SHELL_UNIT,
             "permissions": "0644"},
            {"path": "/usr/local/sbin/nestbed-ready", "content": READY_SCRIPT, "permissions": "0755"},
        ],
        "runcmd": [["/usr/local/sbin/nestbed-ready"]],
    }


def merge(ours: dict[str, Any], theirs: dict[str, Any]) -> dict[str, Any]:
    """*theirs* laid over *ours*: lists appended (ours first), mappings merged, other values theirs."""
    out = copy.deepcopy(ours)
    for key, value in theirs.items():
        if isinstance(value, list) and isinstance(out.get(key), list):
            out[key] = [*out[key], *value]
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _recipe_parts(extra: str | dict[str, Any]) -> tuple[dict[str, Any], str | None]:
    """(cloud-config to merge, script or None) from a recipe's ``user_data`` (validated by the recipe parser)."""
    if isinstance(extra, dict):
        return extra, None
    if not extra.strip():
        return {}, None
    if extra.lstrip().startswith("#!"):
        return {}, extra
    import yaml  # the recipe parser checked it is there and the text parses as a mapping

    data = yaml.safe_load(extra)
    if data is not None and not isinstance(data, dict):
        raise UsageError(f"user-data: #cloud-config must be a mapping, got {type(data).__name__}")
    return data or {}, None


def _json_value(value: object) -> str:
    """Dates and times (TOML and YAML both have them) as the ISO text cloud-init's YAML would read back."""
    if isinstance(value, (datetime.date, datetime.time)):
        return value.isoformat()
    raise UsageError(f"user-data: a {type(value).__name__} value cannot go into a cloud-config")


def user_data(*, hostname: str, public_key: str, extra: str | dict[str, Any] = "") -> str:
    """The seed's ``user-data``: one ``#cloud-config`` document, or a MIME multipart with the recipe's script."""
    config, script = _recipe_parts(extra)
    text = "#cloud-config\n" + json.dumps(merge(nestbed_config(hostname=hostname, public_key=public_key), config),
                                          indent=2, sort_keys=True, default=_json_value) + "\n"
    if script is None:
        return text
    mime = MIMEMultipart(boundary="==nestbed-seed==")  # a fixed boundary: the same inputs give the same seed
    mime.attach(MIMEText(text.split("\n", 1)[1], "cloud-config"))
    mime.attach(MIMEText(script, "x-shellscript"))
    return mime.as_string() + "\n"


def meta_data(*, instance_id: str, hostname: str) -> str:
    return f"instance-id: {instance_id}\nlocal-hostname: {hostname}\n"


def contents(*, name: str, public_key: str, extra: str | dict[str, Any] = "") -> dict[str, str]:
    """The seed's files: ``meta-data`` and ``user-data`` (pure)."""
    hostname = hostname_for(name)
    ud = user_data(hostname=hostname, public_key=public_key, extra=extra)
    # The instance id follows the content: a changed seed is a new instance to cloud-init.
    instance = "nestbed-" + hashlib.sha256(f"{hostname}\n{ud}".encode()).hexdigest()[:16]
    return {"meta-data": meta_data(instance_id=instance, hostname=hostname), "user-data": ud}


def cache_key(files: dict[str, str]) -> str:
    """The seed's name in the cache: its version and content, hashed (pure)."""
    blob = json.dumps({"version": SEED_VERSION, "files": files}, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:24]


def build(files: dict[str, str], out: Path) -> None:
    """Write the FAT image *out* (label CIDATA) holding *files*: no root, no loop device."""
    payload = sum(len(v.encode()) for v in files.values())
    size_kib = max(1024, 2 * (payload // 1024) + 512)  # FAT12 from 1 MiB up; room for the directory and slack
    run(["mkfs.vfat", "-C", "-n", LABEL, str(out), str(size_kib)], timeout=STEP_TIMEOUT, what="seed: mkfs.vfat",
        error=ImageBuildError)
    env = {**os.environ, "MTOOLS_SKIP_CHECK": "1"}
    staging = scratch_name(out, "files")  # beside the private build name: the stale sweep finds it
    staging.mkdir(mode=0o700)
    try:
        for name, text in files.items():
            (staging / name).write_text(text)
            run(["mcopy", "-i", str(out), str(staging / name), f"::{name}"], timeout=STEP_TIMEOUT,
                what=f"seed: mcopy {name}", error=ImageBuildError, env=env)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    os.chmod(out, 0o644)


def seed(*, name: str, extra: str | dict[str, Any] = "", public_key: str | None = None) -> Path:
    """The cached NoCloud seed image for guest *name* (built once per content)."""
    if public_key is None:
        from harness.transport import keys

        public_key = keys.client_keypair()[1]
    files = contents(name=name, public_key=public_key, extra=extra)
    target = paths.cache_root() / "seeds" / f"seed-{cache_key(files)}.img"
    publish(target, lambda tmp: build(files, tmp), what=f"cloud-init seed ({name})", error=ImageBuildError,
            timeout=120)
    return target
