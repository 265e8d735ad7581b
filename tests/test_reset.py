"""Reset without reboot (harness.vm.snapshot): a guest returns to its just-booted state via loadvm."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from harness.errors import MachineStateError
from harness.guest import Guest
from harness.images import store as images
from harness.vm.machine import Machine
from harness.vm.snapshot import RESET_TAG, hmp_error
from harness.vm.spec import MachineSpec

pytest_plugins = ["pytester"]

# -- pure parts (no QEMU) ------------------------------------------------------------------


@pytest.mark.parametrize(("text", "error"), [
    ("", None),
    ("List of snapshots present on all disks:\nID TAG\n", None),
    ("Error: No block device can accept snapshots\r\n", "Error: No block device can accept snapshots"),
    ("warning: something\nError: Snapshot 'x' does not exist in one or more devices\n",
     "Error: Snapshot 'x' does not exist in one or more devices"),
])
def test_hmp_error_finds_the_error_line(text: str, error: str | None) -> None:
    assert hmp_error(text) == error


def test_reset_without_a_reset_point_is_a_state_error() -> None:
    g = Guest(images.get_image("tiny-x86_64"), Machine(MachineSpec(name="unlaunched")))
    with pytest.raises(MachineStateError, match="no reset point"):
        g.reset()


# -- real QEMU -----------------------------------------------------------------------------

FILE = "/root/nestbed-reset-probe"


@pytest.mark.boot
def test_shared_guest_with_reset_forgets_files_and_answers_over_serial_and_ssh(
        shared_guest: Callable[..., Guest]) -> None:
    g = shared_guest("debian-x86_64", "ssh", reset=True)
    assert g.reset_tag == RESET_TAG
    g.check_output(f"echo over-ssh > {FILE} && sync")
    g.serial.check_output(f"echo over-serial > {FILE}.serial && sync")
    boot_id = g.check_output("cat /proc/sys/kernel/random/boot_id")

    again = shared_guest("debian-x86_64", "ssh", reset=True)  # a second taker: reset, not rebooted
    assert again is g and g.resets == 1
    assert g.run("test", "-e", FILE).exit_status == 1  # over SSH (reconnected)
    assert g.serial.run("test", "-e", f"{FILE}.serial").exit_status == 1  # over serial
    assert g.check_output("cat /proc/sys/kernel/random/boot_id") == boot_id  # same boot, no reboot
    assert g.host.file("/etc/os-release").contains("bookworm")  # testinfra follows the new connection

    # The snapshot survives its own loading: a second reset works as well.
    g.check_output(f"touch {FILE}")
    seconds = g.reset()
    assert g.run("test", "-e", FILE).exit_status == 1
    assert seconds < 60


@pytest.mark.boot
def test_reset_of_a_diskless_guest_uses_an_invisible_state_drive(boot_guest: Callable[..., Guest]) -> None:
    g = boot_guest("tiny-x86_64", reset=True)
    assert g.check_output("ls /sys/block | grep -c '^vd' || true") == "0"  # the state drive has no device
    g.check_output("echo x > /tmp/mark")
    g.reset()
    assert g.run("test -e /tmp/mark").exit_status == 1
    assert g.check_output("echo alive") == "alive"


@pytest.mark.boot
def test_reset_recovers_a_wedged_serial_console(boot_guest: Callable[..., Guest]) -> None:
    """A console the transport gave up on is usable again after a reset."""
    g = boot_guest("tiny-x86_64", reset=True)
    g.serial.broken = "simulated: a command timed out and the console did not recover"
    # A foreground job that swallows every following line; wait until it runs, or the line
    # could still be in flight at loadvm and reach the restored shell.
    g.machine.send("printf 'cat-%s\\n' runs; cat\n")
    g.machine.expect(r"cat-runs\n", timeout=30)
    g.reset()
    assert g.serial.broken is None
    assert g.check_output("echo back") == "back"


@pytest.mark.boot
@pytest.mark.slow
def test_reset_of_a_level_2_guest() -> None:
    from harness.guest import BootOptions
    from harness.nested import boot_l1

    with boot_l1(["debian-x86_64"]) as l1, \
            l1.inner("debian-x86_64", via="ssh", options=BootOptions(reset=True)) as g:
        g.check_output(f"touch {FILE}")
        g.reset()
        assert g.run("test", "-e", FILE).exit_status == 1
        assert g.serial.check_output("echo alive") == "alive"


@pytest.mark.boot
def test_marker_shared_reset_gives_each_test_the_just_booted_guest(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.nestbed_image("tiny-x86_64", shared=True, reset=True)
        def test_first(guest):
            guest.check_output("echo first > /tmp/mark")
            pytest.shared_id = id(guest)

        @pytest.mark.nestbed_image("tiny-x86_64", shared=True, reset=True)
        def test_second(guest):
            assert id(guest) == pytest.shared_id and guest.resets == 1  # the same guest, reset
            assert guest.run("test -e /tmp/mark").exit_status == 1
        """
    )
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=2)
