"""Shared test helpers, and the leak check: no QEMU started by the tests may survive them."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from harness.core import paths

REPO = Path(__file__).resolve().parent.parent

# A run started as a background job without job control inherits SIGINT ignored, and so would every harness
# process the fault tests interrupt (they would never see their Ctrl-C): give the tests a normal SIGINT.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


def qemu_pids_under(run_root: Path, owners: set[int] | None = None, *, orphans: bool = True) -> list[int]:
    """PIDs of live QEMU processes whose command line names a run directory under *run_root*.

    With *owners*, only QEMUs whose run directory belongs to one of those PIDs, or (with
    *orphans*) to a harness process that is gone, count.  ``orphans=False`` is for a check
    about this process's own guests while other xdist workers kill harnesses on purpose
    (their QEMUs outlive them by the moment PR_SET_PDEATHSIG takes).
    """
    found = []
    needle = str(run_root).encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if not (cmdline.startswith(b"qemu-system") and needle in cmdline and ") Z " not in stat):
            continue
        if owners is not None:
            m = re.search(rb"/run/[^/\0]*-(\d+)-[0-9a-f]+/qemu\.pid", cmdline)
            owner = int(m.group(1)) if m else 0
            if owner not in owners and (not orphans or Path(f"/proc/{owner}").exists()):
                continue  # someone else's harness
        found.append(int(entry.name))
    return found


# A Debian-shaped image's root filesystem made in seconds (test_bootdisk, test_export): an 8 MiB ext4 with this
# UUID and a fake /boot holding a kernel and an initrd of this release.
FAKE_ROOT_UUID = "267fe03f-11b5-49ce-8b48-8a65b16da299"
FAKE_RELEASE = "6.1.0-50-cloud-amd64"


def fake_debian_root(tmp_path: Path, qcow2: Path) -> None:
    """Write that root filesystem as the qcow2 *qcow2* (the ``disk`` of a fake built Debian image)."""
    tree = tmp_path / "tree"
    (tree / "boot").mkdir(parents=True)
    (tree / "boot" / f"vmlinuz-{FAKE_RELEASE}").write_bytes(b"kernel" * 1000)
    (tree / "boot" / f"initrd.img-{FAKE_RELEASE}").write_bytes(b"initrd" * 1000)
    raw = tmp_path / "root.raw"
    subprocess.run(["mke2fs", "-q", "-F", "-t", "ext4", "-d", str(tree), "-U", FAKE_ROOT_UUID, str(raw), "8M"],
                   check=True, timeout=60)
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(qcow2)], check=True, timeout=60)


def setup_installs(ok: bool, what: str) -> pytest.MarkDecorator:
    """For a test that needs what `scripts/setup` installs: when it is missing, the test FAILS (a broken setup
    is not an unsupported host, and a skip would hide it)."""
    return pytest.mark.nestbed_setup_ok if ok else pytest.mark.nestbed_broken_setup(what)


@pytest.fixture(autouse=True)
def _fail_on_broken_setup(request: pytest.FixtureRequest) -> None:
    marker = request.node.get_closest_marker("nestbed_broken_setup")
    if marker is not None:
        pytest.fail(f"broken setup: {marker.args[0]} is missing; scripts/setup installs it (run: make setup)",
                    pytrace=False)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "nestbed_broken_setup(what): scripts/setup should have installed WHAT")
    config.addinivalue_line("markers", "nestbed_setup_ok: what scripts/setup installs is there")


def pid_gone(pid: int, timeout: float = 10) -> bool:
    """Whether process *pid* is gone (or a zombie) within *timeout* seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if ") Z " in Path(f"/proc/{pid}/stat").read_text():
                return True
        except OSError:
            return True
        time.sleep(0.05)
    return False


def nestbed(*args: str, timeout: float = 300, **kw: object) -> subprocess.CompletedProcess[str]:
    """Run the nestbed CLI as a user would (a separate process)."""
    return subprocess.run([sys.executable, "-m", "harness", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, **kw)  # type: ignore[call-overload]


@pytest.fixture(scope="session")
def tiny_images() -> None:
    """Build both tiny images once (a cache hit after the first run on a machine)."""
    from harness.images import store as images

    for name in ("tiny-x86_64", "tiny-i386"):
        images.build(name)


# -- the leak check ----------------------------------------------------------------------------------
#
# Each pytest process checks its own QEMUs (those whose run directory names its PID as owner) at its
# own sessionfinish: a plain run, and each xdist worker (whose QEMUs PR_SET_PDEATHSIG would kill the
# moment it exits, before a controller could look).  A worker hands what it found to the controller
# in its workeroutput, and the controller fails the run.  QEMUs of harness subprocesses that tests
# start (and kill on purpose) belong to those processes' PIDs: not counted here.

LEAKS = "nestbed_leaked_qemus"  # workeroutput key: [[pid, name], ...]
_RUN_ROOTS = pytest.StashKey[set[Path]]()
_WORKER_LEAKS = pytest.StashKey[dict[str, list[list[object]]]]()


def qemu_name(pid: int) -> str:
    """The ``-name`` of QEMU *pid*'s command line (without its ``,debug-threads=on``), or ``?``."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "?"
    if b"-name" in argv[:-1]:
        return argv[argv.index(b"-name") + 1].split(b",")[0].decode(errors="replace")
    return "?"


def own_qemus(run_roots: set[Path]) -> list[tuple[int, str]]:
    """(PID, -name) of each live QEMU whose run directory (under one of *run_roots*) this process owns."""
    me = os.getpid()
    pids = sorted({pid for root in run_roots for pid in qemu_pids_under(root, owners={me}, orphans=False)})
    return [(pid, qemu_name(pid)) for pid in pids]


def describe_leaks(leaks: list[tuple[int, str]]) -> str:
    return ", ".join(f"{pid} (-name {name})" for pid, name in leaks)


def pytest_sessionstart(session: pytest.Session) -> None:
    session.config.stash[_RUN_ROOTS] = {paths.run_root()}
    session.config.stash[_WORKER_LEAKS] = {}


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: object) -> None:
    """xdist controller: collect what a finished worker's own leak check found."""
    leaked = getattr(node, "workeroutput", {}).get(LEAKS)
    if leaked:
        gateway = getattr(node, "gateway", None)
        node.config.stash.setdefault(_WORKER_LEAKS, {})[str(getattr(gateway, "id", node))] = leaked


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    config = session.config
    roots = config.stash.get(_RUN_ROOTS, set()) | {paths.run_root()}  # the cache dir may have changed
    leaked = own_qemus(roots)
    for pid, _name in leaked:
        try:
            os.kill(pid, 9)
        except OSError:
            pass
    worker = getattr(config, "workerinput", None)
    if worker is not None:
        if leaked:
            config.workeroutput[LEAKS] = [[pid, name] for pid, name in leaked]  # type: ignore[attr-defined]
            session.exitstatus = 1
        return  # the controller reports it (a worker's output is not shown)
    lines = []
    if leaked:
        lines.append(f"pytest pid {os.getpid()}: {describe_leaks(leaked)}")
    for gw, found in sorted(config.stash.get(_WORKER_LEAKS, {}).items()):
        lines.append(f"worker {gw}: {describe_leaks([(int(str(p)), str(n)) for p, n in found])}")
    if lines:
        session.exitstatus = 1
        print("\nFAILED: QEMU processes outlived the tests (killed now):\n  " + "\n  ".join(lines),
              file=sys.stderr)
