"""The steps image builders share: running a build program, mmdebstrap from the machine's apt sources,
naming a failed step's cause, reading what apt fetched.

As root, mmdebstrap picks its own mode (root) and writes the tree in place.  As any other user it
runs in ``--mode=unshare``: its user namespace maps root to the first of the user's subordinate ids
(``/etc/subuid``), and that "root" can reach nothing inside the user's 0700 cache, so mmdebstrap
writes a tarball (its temporary tree lives in ``$TMPDIR``, /tmp, while it runs, and it removes it).
The tarball is unpacked, and the tree later read, customized, turned into a filesystem and
removed, as root of a user namespace of our own (:func:`as_tree_owner`): root there is the user
(who so owns, reads and writes root's files), uids 1-65535 are subordinate ids, so the tree keeps
Debian's ownership as ``mke2fs -d`` sees it.  A user namespace may not create device nodes: they
are left out of the tree, and :func:`add_devices` puts mmdebstrap's few (/dev/null, /dev/console,
...) into the finished filesystem with debugfs.
"""

from __future__ import annotations

import glob
import os
import pwd
import re
import shutil
import stat
import subprocess
import tarfile
import urllib.parse
from collections.abc import Callable, Mapping
from pathlib import Path

from harness.core import programs
from harness.core.run import run
from harness.errors import ImageBuildError
from harness.images import aptsources
from harness.images.recipes import Recipe

MMDEBSTRAP_TIMEOUT = 1800.0
TREE_TIMEOUT = 600.0  # unpacking or removing a tree
Progress = Callable[[str], None]

# Unshare mode: ids 0-65535 inside (Debian's packages use up to 65534, nobody), so a range of 65536.
SUBID_COUNT = 65536
SUBUID_FILE, SUBGID_FILE = Path("/etc/subuid"), Path("/etc/subgid")
USERNS_SYSCTLS = {  # sysctl → the value that turns unprivileged user namespaces back on
    "kernel.unprivileged_userns_clone": "1",  # Debian's switch before trixie; absent on other kernels
    "user.max_user_namespaces": "15000",
}
NON_ROOT = "building images as a non-root user needs"


def run_step(argv: list[str], *, timeout: float, what: str, cwd: Path | None = None,
             env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run one build step (:func:`harness.core.run.run`); a failure is an ImageBuildError naming its cause."""
    return run(argv, timeout=timeout, what=what, error=ImageBuildError, cwd=cwd, env=env, cause=failure_cause)


# Causes a user can act on, found anywhere in a failed step's output (the last lines of
# apt's and mmdebstrap's output only say "apt-get ... failed"): they go in the headline.
FAILURE_CAUSES: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"No space left on device"), "no space left on device (is the cache's filesystem full?)"),
    (re.compile(r"Unable to locate package (\S+)"), "package {0} does not exist in the configured apt sources"),
    (re.compile(r"Package '?([^' ]+)'? has no installation candidate"), "package {0} has no installation candidate"),
]


def failure_cause(output: str) -> str:
    """A one-line cause for a failed build step's *output*, or ''."""
    found: list[str] = []
    for pattern, text in FAILURE_CAUSES:
        for m in pattern.finditer(output):
            line = text.format(*m.groups())
            if line not in found:
                found.append(line)
    return "; ".join(found)


def subid_range(text: str | None, user: str) -> tuple[int, int] | None:
    """(first id, count) of *user*'s entry in ``/etc/subuid``-style *text*: the first line naming the user, which
    is the one mmdebstrap reads (it matches names, not uids)."""
    for line in (text or "").splitlines():
        fields = line.strip().split(":")
        if len(fields) == 3 and fields[0] == user:
            start, count = fields[1].strip(), fields[2].strip()
            return (int(start), int(count)) if start.isdigit() and count.isdigit() else None
    return None


def _free_subids(*texts: str | None) -> int:
    """The first id past every range in *texts* (at least 100000, login.defs' SUB_UID_MIN)."""
    end = 100000
    for text in texts:
        for line in (text or "").splitlines():
            fields = line.strip().split(":")
            if len(fields) == 3 and fields[1].isdigit() and fields[2].isdigit():
                end = max(end, int(fields[1]) + int(fields[2]))
    return end


def unshare_problem(*, euid: int, user: str, newuidmap: str | None, newgidmap: str | None,
                    subuid: str | None, subgid: str | None, sysctls: Mapping[str, str | None]) -> str | None:
    """What stops mmdebstrap's unshare mode (and :func:`as_tree_owner`) for this user, in one actionable line,
    or None.  Root needs none of it (mmdebstrap runs in root mode).

    *newuidmap*/*newgidmap*: where they are (``shutil.which``) or None; *subuid*/*subgid*: the files' text
    (None: missing or unreadable); *sysctls*: :data:`USERNS_SYSCTLS`' names → their values (None: absent).
    """
    if euid == 0:
        return None
    off = {name: value.strip() for name, value in sysctls.items() if value is not None and value.strip() == "0"}
    if off:
        fix = " ".join(f"{name}={USERNS_SYSCTLS.get(name, '1')}" for name in off)
        return (f"{NON_ROOT} user namespaces, which are off here ({', '.join(f'{k}={v}' for k, v in off.items())}): "
                f"sudo sysctl -w {fix} (and put that in /etc/sysctl.d/ to keep it)")
    if not newuidmap or not newgidmap:
        return f"{NON_ROOT} newuidmap/newgidmap: install Debian's uidmap (sudo apt-get install uidmap)"
    ranges = {"uid": subid_range(subuid, user), "gid": subid_range(subgid, user)}
    bad = {kind: r for kind, r in ranges.items() if r is None or r[1] < SUBID_COUNT}
    if not bad:
        return None
    start = _free_subids(subuid, subgid)
    last = start + SUBID_COUNT - 1
    flags = [f"--del-sub{kind}s {r[0]}-{r[0] + r[1] - 1}" for kind, r in bad.items() if r is not None]
    flags += [f"--add-sub{kind}s {start}-{last}" for kind in bad]
    files = " and ".join(f"/etc/sub{kind}" for kind in bad)
    small = [f"{r[1]} in /etc/sub{kind}" for kind, r in bad.items() if r is not None]
    why = f" (it has only {', '.join(small)})" if small else ""
    return (f"{NON_ROOT} a subordinate {'/'.join(bad)} range of {SUBID_COUNT} ids for {user} in {files}{why}: "
            f"sudo usermod {' '.join(flags)} {user}")


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def _user_name() -> str:
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return str(os.getuid())


def check_unprivileged() -> str | None:
    """:func:`unshare_problem` for this process."""
    sysctls = {name: _read(Path("/proc/sys") / name.replace(".", "/")) for name in USERNS_SYSCTLS}
    return unshare_problem(euid=os.geteuid(), user=_user_name(), newuidmap=shutil.which("newuidmap"),
                           newgidmap=shutil.which("newgidmap"), subuid=_read(SUBUID_FILE), subgid=_read(SUBGID_FILE),
                           sysctls=sysctls)


def as_tree_owner(argv: list[str]) -> list[str]:
    """*argv* run so that it sees an unprivileged build's tree as root would: as root of a user namespace where
    root is this user and uids/gids 1-65535 are its subordinate ids.  As root, *argv* itself."""
    if os.geteuid() == 0:
        return argv
    user = _user_name()
    uids, gids = subid_range(_read(SUBUID_FILE), user), subid_range(_read(SUBGID_FILE), user)
    if uids is None or gids is None:
        raise ImageBuildError(check_unprivileged() or f"{NON_ROOT} subordinate ids for {user}")
    n = SUBID_COUNT - 1
    return ["unshare", "--user", "--map-user=0", "--map-group=0",
            f"--map-users={uids[0] + 1},1,{n}", f"--map-groups={gids[0] + 1},1,{n}", "--", *argv]


def remove_tree(path: Path) -> None:
    """Remove a tree :func:`mmdebstrap` made (as a non-root user it holds files of subordinate ids)."""
    if not os.path.lexists(path):
        return
    if os.geteuid() == 0:
        shutil.rmtree(path)
    else:
        run_step(as_tree_owner(["rm", "-rf", "--", str(path)]), timeout=TREE_TIMEOUT, what=f"removing {path}")


def mmdebstrap(recipe: Recipe, target: Path, *, variant: str, include: list[str], work: Path,
               extra: list[str] | None = None) -> list[tarfile.TarInfo]:
    """Install *include* into the new directory *target*; returns the device nodes left out of it (none as root;
    see the module's docstring)."""
    unprivileged = os.geteuid() != 0
    if unprivileged and (problem := check_unprivileged()):
        raise ImageBuildError(f"{recipe.name}: {problem}")
    sources = aptsources.write_sources(work / "sources.sources", recipe.suites)
    argv = ["mmdebstrap", f"--variant={variant}", f"--architectures={recipe.arch.debian}",
            f"--include={','.join(include)}", "--skip=cleanup/apt/cache",  # no --quiet: it hides apt's causes
            *(extra or [])]
    what = f"mmdebstrap ({recipe.name})"
    if not unprivileged:
        run_step([*argv, recipe.suite, str(target), str(sources)], timeout=MMDEBSTRAP_TIMEOUT, what=what)
        return []
    tarball = work / "rootfs.tar"
    try:
        run_step([*argv, "--mode=unshare", "--format=tar", recipe.suite, str(tarball), str(sources)],
                 timeout=MMDEBSTRAP_TIMEOUT, what=what)
        with tarfile.open(tarball) as tar:
            devices = [m for m in tar if m.isdev()]
        target.mkdir(mode=0o755)
        try:
            run_step(as_tree_owner(["tar", "--extract", "--file", str(tarball), "--directory", str(target),
                                    "--numeric-owner", "--same-owner", "--same-permissions", "--xattrs",
                                    "--xattrs-include=*", "--anchored", "--no-wildcards",
                                    *(f"--exclude={m.name}" for m in devices)]),
                     timeout=TREE_TIMEOUT, what=f"unpacking {recipe.name}'s tree")
        except ImageBuildError:
            remove_tree(target)
            raise
    finally:
        tarball.unlink(missing_ok=True)
    return devices


def add_devices(image: Path, devices: list[tarfile.TarInfo]) -> None:
    """Create the device nodes *devices* (tar members, as :func:`mmdebstrap` returns them) in the ext4
    filesystem *image*, with their owners and modes."""
    if not devices:
        return
    script = []
    for m in devices:
        parent, _, name = ("/" + m.name.removeprefix("./").strip("/")).rpartition("/")
        kind, ftype = ("c", stat.S_IFCHR) if m.ischr() else ("b", stat.S_IFBLK)
        # debugfs's mknod takes a name in its current directory, not a path.
        script += [f"cd {parent or '/'}", f"mknod {name} {kind} {m.devmajor} {m.devminor}",
                   f"sif {name} mode 0{ftype | m.mode:o}", f"sif {name} uid {m.uid}", f"sif {name} gid {m.gid}"]
    commands = image.with_name(image.name + ".debugfs")
    commands.write_text("\n".join(script) + "\n")
    try:
        done = run_step([sbin("debugfs"), "-w", "-f", str(commands), str(image)], timeout=120,
                        what="debugfs (device nodes)")
    finally:
        commands.unlink()
    # debugfs exits 0 whatever its commands did: anything on stderr past its banner is an error.
    errors = [ln for ln in done.stderr.splitlines() if ln.strip() and not ln.startswith("debugfs ")]
    if errors:
        raise ImageBuildError(f"debugfs (device nodes): {errors[0]}")


def sbin(program: str) -> str:
    """*program*'s path (for argv that another program runs, e.g. inside ``unshare``): :func:`programs.find`."""
    return programs.find(program)


def resolved_versions(root: Path) -> dict[str, str]:
    """Package → version of every .deb apt fetched for *root*."""
    out = {}
    for deb in glob.glob(str(root / "var/cache/apt/archives/*.deb")):
        name, version, _arch = Path(deb).stem.split("_")
        out[name] = urllib.parse.unquote(version)
    return dict(sorted(out.items()))
