"""The pytest plugin, black-box with pytester."""

from __future__ import annotations

import pytest

pytest_plugins = ["pytester"]


def test_markers_and_options_are_registered(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest("--markers")
    result.stdout.fnmatch_lines(["*smoke*", "*nestbed_image(name*"])
    result = pytester.runpytest("--help")
    result.stdout.fnmatch_lines(["*nestbed*", "*--nestbed-cache-dir*", "*--nestbed-accel*", "*--nestbed-log-dir*"])


def test_guest_fixture_without_an_image_is_a_usage_error(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("def test_x(guest):\n    pass\n")
    result = pytester.runpytest()
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*needs @pytest.mark.nestbed_image(NAME)*"])


def test_unknown_image_is_a_usage_error(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("def test_x(boot_guest):\n    boot_guest('no-such-image')\n")
    result = pytester.runpytest()
    assert result.ret != 0
    result.stdout.fnmatch_lines(["*unknown image 'no-such-image'*"])


def test_bad_boot_option_is_a_usage_error(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("def test_x(boot_guest):\n    boot_guest('tiny-x86_64', warp_drive=True)\n")
    result = pytester.runpytest()
    assert result.ret != 0
    result.stdout.fnmatch_lines(["*warp_drive*"])


@pytest.mark.boot
@pytest.mark.usefixtures("tiny_images")
def test_guests_boot_and_are_shut_down(pytester: pytest.Pytester, tmp_path) -> None:  # type: ignore[no-untyped-def]
    import os

    from conftest import qemu_pids_under

    from harness.core import paths

    # This worker's own session may hold guests of its fixtures (a shared Debian guest, an L1):
    # only QEMUs that the inner run started count.
    before = set(qemu_pids_under(paths.run_root(), owners={os.getpid()}, orphans=False))
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.nestbed_image("tiny-x86_64")
        def test_marker(guest):
            assert guest.check_output("uname -m") == "x86_64"
            assert guest.host.file("/init").exists
            assert guest.host.run("exit 4").rc == 4

        from nestbed_fixtures.plugin import guest_params

        @pytest.mark.parametrize("guest", guest_params(["tiny-i386"]), indirect=True)
        def test_indirect(guest, guest_host):
            assert guest.check_output("uname -m") == "i686"
            assert guest_host.file("/bin/busybox").is_file

        def test_factory_two_at_once(boot_guest):
            a = boot_guest("tiny-x86_64")
            b = boot_guest("tiny-x86_64", vcpus=2)
            a.run("touch /tmp/only-in-a")
            assert b.run("test -e /tmp/only-in-a").exit_status == 1
            pytest.fail("deliberate: the guests must still be shut down")
        """
    )
    logs = tmp_path / "logs"
    result = pytester.runpytest(f"--nestbed-log-dir={logs}", "-v")
    result.assert_outcomes(passed=2, failed=1)
    result.stdout.fnmatch_lines(["*test_indirect?tiny-i386-serial? PASSED*"])
    result.stdout.fnmatch_lines(["*deliberate*"])
    # The failed test's report shows each guest's serial log path and tail.
    # A booted guest's tail has its ready marker; a restored one's (warm start) says it was restored.
    result.stdout.re_match_lines([r".*nestbed tiny-x86_64 \(level 1\) serial log.*", r".*-serial\.log",
                                  r".*(nestbed-ready-|\[nestbed\] restored from a saved state).*"])
    serial_logs = sorted(p.name for p in logs.rglob("*-serial.log"))
    assert len(serial_logs) == 4, serial_logs
    left = sorted(set(qemu_pids_under(paths.run_root(), owners={os.getpid()}, orphans=False)) - before)
    assert left == [], [_cmdline(p) for p in left]


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")[:300]
    except OSError:
        return f"{pid} (gone)"
