"""The end-of-run leak check (tests/conftest.py) shown saying no: a test that leaves a QEMU running
fails the run, in a plain run and under xdist (where each worker checks its own QEMUs before
PR_SET_PDEATHSIG could hide them), and QEMUs that belong to other harness processes do not count."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import REPO, pid_gone

from harness.core import paths
from harness.vm.machine import sweep_stale_runs

pytest_plugins = ["pytester"]
pytestmark = [pytest.mark.boot, pytest.mark.usefixtures("tiny_images")]

# A test that launches a real harness Machine (tiny-x86_64, TCG) and never shuts it down.
LEAKER = """
import os
from pathlib import Path

from harness.guest import BootOptions, spec_for
from harness.images import store
from harness.vm.machine import Machine
from harness.vm.spec import Accel

KEEP = []  # referenced, so no finalizer tears the machine down


def _leak(name):
    spec = spec_for(store.get_image("tiny-x86_64"), BootOptions(accel=Accel.TCG), "leaktest")
    m = Machine(spec, qmp=False)
    m.launch()
    KEEP.append(m)
    Path(f"leaked-{name}.pid").write_text(str(m.proc.pid))


def test_leaks_one(request):
    _leak(request.node.name)


def test_leaks_another(request):
    _leak(request.node.name)


def test_clean():
    pass
"""

# A test that starts a QEMU whose run directory names another (live) process as its owner, the way a
# harness subprocess's QEMU looks; it outlives the run, and the check must leave it alone.
FOREIGN = """
import os
import secrets
import subprocess
from pathlib import Path

from harness.core import paths


def test_starts_someone_elses_qemu():
    owner = os.environ["NESTBED_LEAKTEST_OWNER"]
    run = paths.run_root() / f"someone-else-{owner}-{secrets.token_hex(4)}"
    run.mkdir(mode=0o700)
    (run / "owner").write_text(owner)
    Path("foreign.run").write_text(str(run))
    proc = subprocess.Popen(["qemu-system-x86_64", "-name", "someone-else", "-machine", "none", "-nodefaults",
                             "-display", "none", "-S", "-pidfile", str(run / "qemu.pid")],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    Path("foreign.pid").write_text(str(proc.pid))
"""

MODES = {"plain": (), "xdist": ("-n", "2")}


def _kill(pid: int) -> None:
    with contextlib.suppress(OSError):
        os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="session")
def cache_root() -> Path:
    """The real cache (session-scoped: taken before pytester points $HOME at its directory)."""
    return paths.cache_root()


@pytest.fixture
def inner(cache_root: Path, pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.Pytester]:
    """A pytester directory with the real leak check (a copy of tests/conftest.py) and the real
    image cache; every QEMU its runs leave behind is killed at the end, whatever the check did."""
    monkeypatch.setenv("NESTBED_CACHE", str(cache_root))
    pytester.makeconftest((REPO / "tests" / "conftest.py").read_text())
    try:
        yield pytester
    finally:
        for f in pytester.path.glob("*.pid"):
            with contextlib.suppress(ValueError, OSError):
                _kill(int(f.read_text()))


@pytest.mark.parametrize("mode", list(MODES))
def test_a_test_that_leaks_a_qemu_fails_the_run(inner: pytest.Pytester, mode: str, cache_root: Path) -> None:
    inner.makepyfile(test_leaky=LEAKER)
    result = inner.runpytest_subprocess("-p", "no:cacheprovider", *MODES[mode], timeout=300)
    out = result.stdout.str() + result.stderr.str()
    leaked = {f.name: int(f.read_text()) for f in inner.path.glob("leaked-*.pid")}
    assert len(leaked) == 2, out
    # Every test passed; the session fails on the leak alone.
    assert "3 passed" in out, out
    assert result.ret == 1, out
    assert "FAILED: QEMU processes outlived the tests (killed now):" in out, out
    for pid in leaked.values():
        assert f"{pid} (-name tiny-x86_64)" in out, out
        assert pid_gone(pid, timeout=15), f"the check did not kill the leaked QEMU {pid}"
    if mode == "xdist":
        # Named per worker: each one checked the QEMUs it owned itself.
        assert re.search(r"worker gw[01]: \d+ \(-name tiny-x86_64\)", out), out
        assert "pytest pid" not in out, "the controller owns no QEMU"
    else:
        assert re.search(r"pytest pid \d+: \d+ \(-name tiny-x86_64\), \d+ \(-name tiny-x86_64\)", out), out
    sweep_stale_runs(cache_root / "run")  # the leaked machines' run directories (their owner is gone)


@pytest.mark.parametrize("mode", list(MODES))
def test_a_run_that_leaks_nothing_passes(inner: pytest.Pytester, mode: str) -> None:
    inner.makepyfile(test_tidy="""
        from harness.guest import boot

        def test_boots_and_shuts_down():
            with boot("tiny-x86_64") as g:
                assert g.check_output("echo ok") == "ok"

        def test_nothing():
            pass
    """)
    result = inner.runpytest_subprocess("-p", "no:cacheprovider", *MODES[mode], timeout=300)
    out = result.stdout.str() + result.stderr.str()
    assert result.ret == 0, out
    assert "outlived" not in out, out


@pytest.mark.parametrize("mode", list(MODES))
def test_qemus_of_other_harness_processes_do_not_count(inner: pytest.Pytester, mode: str, cache_root: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests SIGKILL harness subprocesses on purpose; their QEMUs are theirs, not the run's."""
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("no qemu-system-x86_64")
    owner = subprocess.Popen(["sleep", "300"])  # stands for a live harness subprocess
    monkeypatch.setenv("NESTBED_LEAKTEST_OWNER", str(owner.pid))
    inner.makepyfile(test_foreign=FOREIGN)
    try:
        result = inner.runpytest_subprocess("-p", "no:cacheprovider", *MODES[mode], timeout=300)
        out = result.stdout.str() + result.stderr.str()
        assert result.ret == 0, out
        assert "outlived" not in out, out
        qemu = int((inner.path / "foreign.pid").read_text())
        assert not pid_gone(qemu, timeout=0.5), "the check killed a QEMU it does not own"
    finally:
        owner.kill()
        owner.wait(timeout=10)
        if (inner.path / "foreign.pid").exists():
            _kill(int((inner.path / "foreign.pid").read_text()))
        if (inner.path / "foreign.run").exists():
            run = Path((inner.path / "foreign.run").read_text())
            assert run.parent == cache_root / "run"
            shutil.rmtree(run, ignore_errors=True)
