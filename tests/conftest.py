"""Shared test helpers, and the leak check: no QEMU started by the tests may survive them."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

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


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if hasattr(session.config, "workerinput"):
        return  # xdist workers: the controller checks once all of them are done
    leaked = qemu_pids_under(paths.run_root(), owners={os.getpid()})
    if leaked:
        for pid in leaked:
            try:
                os.kill(pid, 9)
            except OSError:
                pass
        session.exitstatus = 1
        print(f"\nFAILED: QEMU processes outlived the tests (killed now): {leaked}", file=sys.stderr)
