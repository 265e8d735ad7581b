"""The path real users take: nestbed as a user who is not root.

A fresh user (``useradd``, as a new account gets it) installs nestbed's wheel into a venv of their
own and runs a guest: the image is built into their own cache by mmdebstrap's unshare mode, the
guest boots under TCG (/dev/kvm is not theirs), ``nestbed probe`` says why, and nothing is written
outside their home.  Plus the unit tests of the check that turns a missing piece of unshare mode
into one actionable line instead of ``mmdebstrap exited 25``.
"""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import stat
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
from conftest import REPO

from harness.errors import ImageBuildError
from harness.images import steps
from harness.images.recipes import find_recipe
from harness.images.steps import NON_ROOT, unshare_problem

EVERYTHING = {
    "euid": 1000, "user": "alice", "newuidmap": "/usr/bin/newuidmap", "newgidmap": "/usr/bin/newgidmap",
    "subuid": "alice:100000:65536\n", "subgid": "alice:100000:65536\n",
    "sysctls": {"kernel.unprivileged_userns_clone": None, "user.max_user_namespaces": "96365\n"},
}


def problem(**changes: object) -> str | None:
    found = unshare_problem(**{**EVERYTHING, **changes})  # type: ignore[arg-type]
    assert found is None or (found.startswith(NON_ROOT) and "\n" not in found), found
    return found


def test_root_needs_none_of_unshare_mode() -> None:
    assert problem(euid=0, newuidmap=None, newgidmap=None, subuid=None, subgid=None,
                   sysctls={"user.max_user_namespaces": "0"}) is None


def test_a_user_with_everything_in_place() -> None:
    assert problem() is None
    # Another user's line first, a longer range, and Debian's sysctl on: still fine.
    assert problem(subuid="bob:100000:65536\nalice:165536:65536\n", subgid="alice:200000:100000\n",
                   sysctls={"kernel.unprivileged_userns_clone": "1\n", "user.max_user_namespaces": "15000"}) is None


def test_no_newuidmap() -> None:
    want = f"{NON_ROOT} newuidmap/newgidmap: install Debian's uidmap (sudo apt-get install uidmap)"
    assert problem(newuidmap=None, newgidmap=None) == want
    assert problem(newgidmap=None) == want


def test_no_subordinate_range() -> None:
    fix = "sudo usermod --add-subuids 100000-165535 --add-subgids 100000-165535 alice"
    assert problem(subuid="", subgid="") == (
        f"{NON_ROOT} a subordinate uid/gid range of 65536 ids for alice in /etc/subuid and /etc/subgid: {fix}")
    assert problem(subuid=None, subgid=None) == problem(subuid="", subgid="")  # missing or unreadable files
    # Only another user's range, and one named like ours: a free range past theirs, for the gids only.
    assert problem(subuid="alice:100000:65536\nbob:165536:65536\n", subgid="alice2:100000:65536\n") == (
        f"{NON_ROOT} a subordinate gid range of 65536 ids for alice in /etc/subgid: "
        "sudo usermod --add-subgids 231072-296607 alice")
    # Too small for Debian's ids (mmdebstrap reads the first line only, so it goes first).
    assert problem(subuid="alice:100000:1000\n") == (
        f"{NON_ROOT} a subordinate uid range of 65536 ids for alice in /etc/subuid (it has only 1000 in /etc/subuid): "
        "sudo usermod --del-subuids 100000-100999 --add-subuids 165536-231071 alice")


def test_user_namespaces_off() -> None:
    assert problem(sysctls={"kernel.unprivileged_userns_clone": "0\n", "user.max_user_namespaces": "96365"}) == (
        f"{NON_ROOT} user namespaces, which are off here (kernel.unprivileged_userns_clone=0): "
        "sudo sysctl -w kernel.unprivileged_userns_clone=1 (and put that in /etc/sysctl.d/ to keep it)")
    found = problem(sysctls={"user.max_user_namespaces": "0"}, newuidmap=None, subuid="")
    assert found == (f"{NON_ROOT} user namespaces, which are off here (user.max_user_namespaces=0): "
                     "sudo sysctl -w user.max_user_namespaces=15000 (and put that in /etc/sysctl.d/ to keep it)")


def test_mmdebstrap_mode_for_root_and_for_users(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    recipe = find_recipe("tiny-x86_64")
    ran: list[list[str]] = []

    def run_step(argv: list[str], **kw: object) -> None:
        ran.append(argv)
        if "--format=tar" in argv:  # what mmdebstrap writes: a tree with a device node
            with tarfile.open(argv[-2], "w") as tar:
                for name, kind in (("./dev/null", tarfile.CHRTYPE), ("./etc", tarfile.DIRTYPE)):
                    member = tarfile.TarInfo(name)
                    member.type, member.devmajor, member.devminor, member.mode = kind, 1, 3, 0o666
                    tar.addfile(member)

    monkeypatch.setattr(steps, "run_step", run_step)
    monkeypatch.setattr(steps.os, "geteuid", lambda: 0)
    steps.mmdebstrap(recipe, tmp_path / "root", variant="extract", include=["busybox-static"], work=tmp_path)
    assert not any(a.startswith(("--mode", "--format")) for a in ran[0]), ran  # root: mmdebstrap picks
    assert ran[0][-2] == str(tmp_path / "root")

    ran.clear()
    monkeypatch.setattr(steps.os, "geteuid", lambda: 1000)
    monkeypatch.setattr(steps, "check_unprivileged", lambda: None)
    monkeypatch.setattr(steps, "as_tree_owner", lambda argv: ["ns", *argv])
    devices = steps.mmdebstrap(recipe, tmp_path / "tree", variant="extract", include=["busybox-static"],
                               work=tmp_path)
    assert "--mode=unshare" in ran[0] and "--format=tar" in ran[0] and ran[0][-2] == str(tmp_path / "rootfs.tar")
    assert ran[1][:2] == ["ns", "tar"] and str(tmp_path / "tree") in ran[1], ran  # unpacked as the tree's owner
    assert [a for a in ran[1] if a.startswith("--exclude")] == ["--exclude=./dev/null"]  # a namespace can't mknod
    assert [(d.name, d.devmajor, d.devminor) for d in devices] == [("./dev/null", 1, 3)]  # for add_devices
    assert (tmp_path / "tree").is_dir() and not (tmp_path / "rootfs.tar").exists()

    # What is missing stops the build before anything runs, in one line naming the image.
    ran.clear()
    monkeypatch.setattr(steps, "check_unprivileged", lambda: f"{NON_ROOT} newuidmap/newgidmap: ...")
    with pytest.raises(ImageBuildError) as err:
        steps.mmdebstrap(recipe, tmp_path / "t2", variant="extract", include=["busybox-static"], work=tmp_path)
    assert str(err.value) == f"tiny-x86_64: {NON_ROOT} newuidmap/newgidmap: ..." and ran == []


def test_add_devices_puts_the_left_out_nodes_into_the_filesystem(tmp_path: Path) -> None:
    (tmp_path / "tree/dev").mkdir(parents=True)
    image = tmp_path / "fs.raw"
    steps.run_step([steps.sbin("mke2fs"), "-q", "-F", "-t", "ext4", "-d", str(tmp_path / "tree"), str(image), "16M"],
                   timeout=60, what="mke2fs")
    nodes = []
    for name, kind, major, minor, mode in (("./dev/null", tarfile.CHRTYPE, 1, 3, 0o666),
                                           ("./dev/console", tarfile.CHRTYPE, 5, 1, 0o600),
                                           ("./dev/loop0", tarfile.BLKTYPE, 7, 0, 0o660)):
        member = tarfile.TarInfo(name)
        member.type, member.devmajor, member.devminor, member.mode, member.gid = kind, major, minor, mode, 6
        nodes.append(member)
    steps.add_devices(image, nodes)
    listing = steps.run_step([steps.sbin("debugfs"), "-R", "ls -l /dev", str(image)], timeout=60, what="debugfs").stdout
    # ls -l: inode, mode, (type), uid, gid, size, date..., name
    rows = {f[-1]: (f[1], f[4]) for f in (ln.split() for ln in listing.splitlines()) if len(f) > 5}
    assert rows["null"] == ("20666", "6") and rows["console"] == ("20600", "6") and rows["loop0"] == ("60660", "6")
    fsck = subprocess.run([steps.sbin("e2fsck"), "-fn", str(image)], capture_output=True, text=True, timeout=60)
    assert fsck.returncode == 0, fsck.stdout


# --- the real thing -----------------------------------------------------------------------------------------

PIP_TIMEOUT = 900
RUN_TIMEOUT = 900


def _sh(argv: list[str], *, timeout: float, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=cwd, stdin=subprocess.DEVNULL)


def _user_env(user: pwd.struct_passwd) -> list[str]:
    """A login's environment (Debian's PATH for users: no sbin), plus the machine's pip/proxy settings."""
    env = {"HOME": user.pw_dir, "USER": user.pw_name, "LOGNAME": user.pw_name, "SHELL": user.pw_shell,
           "PATH": "/usr/local/bin:/usr/bin:/bin:/usr/games", "LANG": "C.UTF-8"}
    env.update({k: v for k, v in os.environ.items() if k.startswith("PIP_") or k.lower().endswith("_proxy")})
    return [f"{k}={v}" for k, v in env.items()]


def _as(user: pwd.struct_passwd, argv: list[str], *, timeout: float) -> subprocess.CompletedProcess[str]:
    """Run *argv* as *user*, from their home, with only their environment."""
    return _sh(["runuser", "-u", user.pw_name, "--", "env", "-i", *_user_env(user), *argv], timeout=timeout,
               cwd=Path(user.pw_dir))


def _remove_user(name: str) -> None:
    subprocess.run(["pkill", "-KILL", "-u", name], capture_output=True, timeout=30)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and subprocess.run(["pgrep", "-u", name], capture_output=True,
                                                         timeout=30).returncode == 0:
        time.sleep(0.2)
    subprocess.run(["userdel", "-r", name], capture_output=True, timeout=120)


@pytest.mark.boot
@pytest.mark.timeout(2400)
@pytest.mark.skipif(os.geteuid() != 0, reason="creates a user account: needs root")
def test_a_fresh_user_installs_the_wheel_builds_and_boots_without_root(tmp_path: Path) -> None:
    for tool in ("useradd", "userdel", "runuser", "pkill", "find"):
        assert shutil.which(tool), f"{tool} is missing"
    name = f"nbuser{secrets.token_hex(4)}"
    made = _sh(["useradd", "--create-home", "--shell", "/bin/bash", name], timeout=60)
    assert made.returncode == 0, made.stderr
    try:
        stamp = tmp_path / "stamp"
        stamp.touch()
        time.sleep(0.01)  # find's -newer compares timestamps: what follows is strictly newer
        user = pwd.getpwnam(name)
        home = Path(user.pw_dir)

        wheels = tmp_path / "wheels"
        built = _sh([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(wheels), str(REPO)],
                    timeout=PIP_TIMEOUT, cwd=tmp_path)
        assert built.returncode == 0, built.stderr[-2000:]
        wheel = home / next(wheels.glob("nestbed-*.whl")).name  # the test's temp dir is root's, 0700
        shutil.copy(next(wheels.glob("nestbed-*.whl")), wheel)
        os.chown(wheel, user.pw_uid, user.pw_gid)

        venv = home / "venv"
        made_venv = _as(user, ["python3", "-m", "venv", str(venv)], timeout=300)
        assert made_venv.returncode == 0, made_venv.stderr[-2000:]
        inst = _as(user, [str(venv / "bin" / "pip"), "install", "-q", "--disable-pip-version-check", str(wheel)],
                   timeout=PIP_TIMEOUT)
        assert inst.returncode == 0, inst.stderr[-2000:]
        nestbed = str(venv / "bin" / "nestbed")

        # The first run builds the image into the user's own cache (mmdebstrap's unshare mode), boots under TCG.
        run = _as(user, [nestbed, "run", "tiny-x86_64", "--", "uname", "-m"], timeout=RUN_TIMEOUT)
        assert run.returncode == 0, run.stderr[-4000:]
        assert run.stdout.split() == ["x86_64"], run.stdout[-2000:]
        manifests = list((home / ".cache/nestbed/images").glob("tiny-x86_64-*/manifest.json"))
        assert len(manifests) == 1 and manifests[0].stat().st_uid == user.pw_uid, manifests

        probe = _as(user, [nestbed, "probe"], timeout=300)
        assert probe.returncode == 0, probe.stderr[-2000:]
        accel = next(ln for ln in probe.stdout.splitlines() if ln.startswith("accel:") and "x86_64" in ln)
        assert " tcg " in accel, probe.stdout
        kvm = Path("/dev/kvm")
        if kvm.exists() and kvm.stat().st_mode & 0o006 != 0o006:  # not world-usable: the user may not open it
            assert "/dev/kvm: Permission denied" in accel and "usermod -aG kvm $USER" in accel, accel

        # Nothing of the user's anywhere else, nor of their subordinate ids (a tree mmdebstrap left behind).
        ids = steps.subid_range(Path("/etc/subuid").read_text(), name)
        owned = ["-user", name]
        if ids:
            owned = ["(", *owned, "-o", "(", "-uid", f"+{ids[0] - 1}", "-uid", f"-{ids[0] + ids[1]}", ")", ")"]
        roots = [d for d in ("/", "/tmp", "/var/tmp", "/dev/shm", "/run") if Path(d).is_dir()]
        found = _sh(["find", *roots, "-xdev", "(", "-path", "/proc", "-o", "-path", str(home), "-o",
                     "-path", str(tmp_path), ")", "-prune", "-o", *owned, "-newer", str(stamp), "-print"],
                    timeout=900)
        outside = sorted(set(found.stdout.split("\n")) - {""})
        assert outside == [], outside[:50]
        assert stat.S_IMODE((home / ".cache/nestbed").stat().st_mode) == 0o700  # the cache stayed private
    finally:
        _remove_user(name)
    assert subprocess.run(["id", name], capture_output=True, timeout=30).returncode != 0, f"user {name} is still there"
