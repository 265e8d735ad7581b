"""Fast tests of the pure parts: argv building, recipes, apt sources, cpio, probe decisions, CLI, errors."""

from __future__ import annotations

import gzip
import stat
from pathlib import Path

import pytest

from harness.cli import main
from harness.errors import ConsoleTimeout, GuestPanic, ImageBuildError, RecipeError, UsageError
from harness.hosts.probe import cpu_facts, decide
from harness.images import aptsources
from harness.images.recipes import parse_recipe
from harness.images.tiny import TINY_INIT, tiny_initramfs, write_cpio
from harness.transport.base import quote_command
from harness.vm.spec import (
    Accel,
    Arch,
    Chardev,
    DiskFormat,
    Drive,
    DriveInterface,
    Endpoints,
    Forward,
    MachineSpec,
    Nic,
    build_argv,
    resolve_ports,
)

EP = Endpoints(serial=Chardev(fd=5), qmp=Chardev(fd=7))


def _opt(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


# -- spec / argv -------------------------------------------------------------------------

@pytest.mark.parametrize("arch", Arch)
def test_argv_basics(arch: Arch) -> None:
    spec = MachineSpec(arch=arch, accel=Accel.TCG, memory_mb=384, vcpus=2, kernel=Path("/k"), initrd=Path("/i"),
                       append="console=ttyS0")
    argv = build_argv(spec, EP)
    assert argv[0] == f"qemu-system-{arch.value}"
    assert _opt(argv, "-accel") == ["tcg"]
    assert _opt(argv, "-cpu") == [f"{arch.default_cpu},+rdrand"]  # TCG: an RDRAND the kernel trusts
    assert _opt(argv, "-m") == ["384"] and _opt(argv, "-smp") == ["2"]
    assert _opt(argv, "-kernel") == ["/k"] and _opt(argv, "-initrd") == ["/i"]
    assert _opt(argv, "-append") == ["console=ttyS0"]
    assert "socket,id=serial0,fd=5" in _opt(argv, "-chardev")
    assert "chardev=qmp0,mode=control" in _opt(argv, "-mon")
    assert "-no-reboot" in argv and "-nodefaults" in argv


def test_argv_cpu_flags_and_tcg_threads() -> None:
    spec = MachineSpec(accel=Accel.TCG, cpu="qemu64", cpu_flags=("+svm", "+npt"), tcg_threads="single")
    argv = build_argv(spec, EP)
    assert _opt(argv, "-cpu") == ["qemu64,+svm,+npt,+rdrand"]
    assert _opt(argv, "-accel") == ["tcg,thread=single"]
    # Said either way by the caller, it is left alone; never added under KVM (the host CPU's own).
    assert _opt(build_argv(spec.replace(cpu_flags=("-rdrand",)), EP), "-cpu") == ["qemu64,-rdrand"]
    assert _opt(build_argv(spec.replace(accel=Accel.KVM, cpu="host", cpu_flags=()), EP), "-cpu") == ["host"]


def test_an_l1_on_tcg_gets_one_vcpu_and_on_kvm_its_recipes() -> None:
    from harness.nested import l1_options

    tcg = l1_options(Accel.TCG, 2, 2048)
    assert (tcg.vcpus, tcg.cpu, tcg.cpu_flags, tcg.memory_mb) == (1, "qemu64", ("+svm", "+npt"), 2048)
    kvm = l1_options(Accel.KVM, 2, 2048)
    assert (kvm.vcpus, kvm.cpu, kvm.cpu_flags) == (2, "host", ())


def test_make_test_reruns_exactly_the_nested_faults() -> None:
    # The Makefile's --only-rerun patterns against the messages the harness builds for them.
    import re

    from harness.errors import GuestFrozen, QemuCrashed, QemuExited
    from harness.vm.machine import crash_message, exit_message

    makefile = (Path(__file__).resolve().parent.parent / "Makefile").read_text().replace("\\\n", " ")
    line = next(ln for ln in makefile.splitlines() if ln.startswith("NESTED_RERUN"))
    patterns = re.findall(r'--only-rerun "((?:[^"\\]|\\.)*)"', line)
    assert len(patterns) >= 3, line

    def rerun(exc: Exception) -> bool:
        return any(re.search(p, f"{type(exc).__module__}.{type(exc).__name__}: {exc}") for p in patterns)

    def exited(level: int, reason: str | None, why: str) -> QemuExited:
        return QemuExited(exit_message(0, reason, why), returncode=0, reason=reason, level=level)

    assert rerun(exited(2, "guest-reset", "while waiting for output block O"))
    assert rerun(exited(1, "guest-reset", "level 1 died while level 2 was running"))
    assert rerun(GuestFrozen("froze (ssh:l1-host@L1: cannot start 'true': Timeout opening channel.; no answer "
                             "on the serial console within 30 s either) and was killed: level 1 died", level=1))
    assert not rerun(exited(1, "guest-reset", "while waiting for output block O"))  # a plain guest's own reset
    assert not rerun(exited(2, "guest-shutdown", "while waiting for output block O"))
    assert not rerun(exited(2, None, "while waiting for output block O"))
    # L0's QEMU 7.2 segfaulting under TCG (RELIABILITY.md): that signal only, at level 1 only.
    def crashed(level: int, rc: int, stderr: str = "") -> QemuCrashed:
        return QemuCrashed(crash_message(rc, stderr), returncode=rc, level=level)

    assert rerun(crashed(1, -11))
    assert not rerun(crashed(1, -9))  # killed on purpose (tests/test_security.py)
    assert not rerun(crashed(1, -6, "qemu-system-x86_64: x\nqemu: fatal: invalid tss type\n"))
    assert not rerun(crashed(2, -11))


def test_accel_options_go_on_the_one_accel() -> None:
    spec = MachineSpec(accel=Accel.KVM, accel_opts=("xen-version=0x4000a", "kernel-irqchip=split"))
    assert _opt(build_argv(spec, EP), "-accel") == ["kvm,xen-version=0x4000a,kernel-irqchip=split"]
    with pytest.raises(UsageError, match="accel_opts"):
        MachineSpec(accel_opts=("a=1,b=2",))


def test_auto_accel_is_refused_by_the_builder() -> None:
    with pytest.raises(UsageError, match="resolved accelerator"):
        build_argv(MachineSpec(), EP)


@pytest.mark.parametrize("iface", DriveInterface)
def test_drives(iface: DriveInterface) -> None:
    spec = MachineSpec(accel=Accel.KVM, drives=(Drive(Path("/d.qcow2"), DiskFormat.QCOW2, iface, read_only=True,
                                                      snapshot=True, serial="abc"),))
    argv = build_argv(spec, EP)
    drive = _opt(argv, "-drive")[0]
    assert drive.startswith("file=/d.qcow2,format=qcow2,id=drive0,if=none")
    assert "readonly=on" in drive and "snapshot=on" in drive
    devices = " ".join(_opt(argv, "-device"))
    assert {"virtio": "virtio-blk-pci", "ide": "ide-hd", "scsi": "scsi-hd", "sata": "ide-hd", "lsi": "scsi-hd",
            "pvscsi": "scsi-hd", "megasas": "scsi-hd"}[iface.value] in devices
    assert "serial=abc" in devices
    assert ("virtio-scsi-pci" in devices) == (iface is DriveInterface.SCSI)


def test_forwards_bind_loopback_and_need_a_port() -> None:
    spec = MachineSpec(accel=Accel.TCG, nics=(Nic(forwards=(Forward(22), Forward(80, 8080))),))
    with pytest.raises(UsageError, match="no host port"):
        build_argv(spec, EP)
    resolved = resolve_ports(spec, [40022])
    netdev = _opt(build_argv(resolved, EP), "-netdev")[0]
    assert "hostfwd=tcp:127.0.0.1:40022-:22" in netdev and "hostfwd=tcp:127.0.0.1:8080-:80" in netdev
    assert "hostfwd=tcp::" not in netdev  # never all interfaces


def test_chardev_variants() -> None:
    assert Chardev(tcp_port=5000, wait=True).qemu_opts("s") == \
        "socket,id=s,host=127.0.0.1,port=5000,server=on,wait=on"
    assert Chardev(path=Path("/run/x.sock")).qemu_opts("q") == "socket,id=q,path=/run/x.sock,server=on,wait=off"
    with pytest.raises(UsageError):
        Chardev().qemu_opts("x")


@pytest.mark.parametrize("kwargs", [{"memory_mb": 8}, {"vcpus": 0}, {"tcg_threads": "many"},
                                    {"initrd": Path("/i")}, {"cpu_flags": ("svm",)}])
def test_spec_validation(kwargs: dict[str, object]) -> None:
    with pytest.raises(UsageError):
        MachineSpec(**kwargs)  # type: ignore[arg-type]


def test_spec_is_frozen() -> None:
    spec = MachineSpec()
    with pytest.raises(AttributeError):
        spec.vcpus = 4  # type: ignore[misc]
    assert spec.replace(vcpus=4).vcpus == 4 and spec.vcpus == 1


# -- recipes ---------------------------------------------------------------------------

GOOD = 'kind = "debian"\narch = "x86_64"\nkernel = "linux-image-cloud-amd64"\n'


@pytest.mark.parametrize(("text", "key", "reason"), [
    (GOOD + "colour = 1\n", "colour", "unknown key"),
    ('kind = "debian"\narch = "x86_64"\n', "kernel", "required key is missing"),
    (GOOD + "vcpus = true\n", "vcpus", "must be int"),
    (GOOD + 'init = "upstart"\n', "init", "is not one of fast, systemd"),
    (GOOD.replace("x86_64", "arm64"), "arch", "is not one of"),
    (GOOD + 'disk_size = "2T"\n', "disk_size", "not a size"),
    (GOOD + 'packages = ["ok", "Bad Name"]\n', "packages", "not a valid name"),
    (GOOD + '[files]\n"etc/x" = "y"\n', "files.etc/x", "absolute"),
    ("kind = \n", "-", "not valid TOML"),
])
def test_recipe_errors_name_file_key_reason(tmp_path: Path, text: str, key: str, reason: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(RecipeError) as info:
        parse_recipe(path)
    assert info.value.key == key and reason in info.value.reason
    assert str(info.value).startswith(f"{path}: {key}: ")


def test_recipe_digest_tracks_content_not_prose(tmp_path: Path) -> None:
    a, b, c = (tmp_path / d / "img.toml" for d in "abc")
    for p in (a, b, c):
        p.parent.mkdir()
    a.write_text(GOOD)
    b.write_text(GOOD + 'description = "words"\n')
    c.write_text(GOOD + 'packages = ["curl"]\n')
    da, db, dc = (parse_recipe(p).digest() for p in (a, b, c))
    assert da == db != dc


def test_every_shipped_recipe_parses() -> None:
    shipped = sorted(Path(__file__).resolve().parent.parent.glob("images/*.toml"))
    assert {p.stem for p in shipped} >= {"tiny-x86_64", "tiny-i386", "debian-x86_64", "debian-i386", "l1-host",
                                         "appliance-web"}
    for path in shipped:
        parse_recipe(path)


# -- apt sources ---------------------------------------------------------------------

DEB822 = """# comment
Types: deb
URIs: http://mirror.invalid/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://mirror.invalid/debian-security
Suites: bookworm-security
Components: main

Types: deb
Enabled: no
URIs: http://elsewhere.invalid/
Suites: bookworm-backports
Components: main
"""


def test_deb822_and_restriction(tmp_path: Path) -> None:
    sources = aptsources.parse_deb822(DEB822)
    assert [s.suites for s in sources] == [("bookworm", "bookworm-updates"), ("bookworm-security",)]
    only = aptsources.restricted(sources, ["bookworm"])
    assert [s.suites for s in only] == [("bookworm",)]
    # Backports are derived from the entry carrying the main suite (the disabled entry stays unused).
    bp = aptsources.restricted(sources, ["bookworm", "bookworm-backports"])
    assert [(s.uris, s.suites) for s in bp] == [(sources[0].uris, ("bookworm",)), (sources[0].uris, ("bookworm-backports",))]
    with pytest.raises(ImageBuildError, match="trixie-backports"):
        aptsources.restricted(sources, ["trixie-backports"])
    apt = tmp_path / "apt"
    (apt / "sources.list.d").mkdir(parents=True)
    (apt / "sources.list.d" / "debian.sources").write_text(DEB822)
    (apt / "sources.list").write_text("deb [signed-by=/k.gpg arch=amd64] http://mirror.invalid/x bookworm main\n")
    out = aptsources.write_sources(tmp_path / "out.sources", ["bookworm", "bookworm-updates"], apt)
    text = out.read_text()
    assert "Suites: bookworm bookworm-updates" in text and "security" not in text and "Signed-By: /k.gpg" in text


# -- tiny initramfs ---------------------------------------------------------------------

def _read_cpio(data: bytes) -> dict[str, tuple[int, bytes]]:
    entries, off = {}, 0
    while True:
        assert data[off:off + 6] == b"070701"
        fields = [int(data[off + 6 + 8 * i: off + 14 + 8 * i], 16) for i in range(13)]
        mode, size, namesize = fields[1], fields[6], fields[11]
        name = data[off + 110: off + 110 + namesize - 1].decode()
        off += 110 + namesize
        off += -off % 4
        body = data[off: off + size]
        off += size + (-size % 4)
        if name == "TRAILER!!!":
            return entries
        entries[name] = (mode, body)


def test_cpio_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "initrd.img"
    write_cpio(path, tiny_initramfs(b"\x7fELF-busybox"))
    entries = _read_cpio(gzip.decompress(path.read_bytes()))
    assert entries["bin/busybox"][1] == b"\x7fELF-busybox"
    assert stat.S_ISLNK(entries["bin/sh"][0]) and entries["bin/sh"][1] == b"busybox"
    assert entries["init"][0] & 0o111 and entries["init"][1] == TINY_INIT.encode()
    assert entries["tmp"][0] & stat.S_ISVTX
    assert "nestbed-ready-%s" in TINY_INIT and "-echo -onlcr" in TINY_INIT


# -- probe decisions --------------------------------------------------------------------

AMD = "processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC\nflags\t\t: fpu svm hypervisor\n\n" \
      "processor\t: 1\nvendor_id\t: AuthenticAMD\n"


def test_cpu_facts() -> None:
    facts = cpu_facts(AMD)
    assert (facts["vendor"], facts["model"], facts["svm"], facts["vmx"], facts["cpus"]) == \
        ("AuthenticAMD", "AMD EPYC", True, False, 2)


def _facts(openable: bool, modules: list[str]) -> dict[str, object]:
    return {"kvm": {"openable": openable, "error": None if openable else "/dev/kvm does not exist",
                    "modules": modules}}


def test_decide() -> None:
    assert decide(_facts(False, []), {})["x86_64"] == {
        "chosen": "tcg", "reason": "KVM unusable: /dev/kvm does not exist; no KVM module loaded: `modprobe kvm_intel` "
                                   "(Intel) or `modprobe kvm_amd` (AMD)"}
    hung = decide(_facts(True, ["kvm", "kvm_pvm"]), {"x86_64": (False, "no ready marker"), "i386": (False, "x")})
    assert hung["x86_64"]["chosen"] == "tcg" and "kvm_pvm" in hung["x86_64"]["reason"]
    ok = decide(_facts(True, ["kvm", "kvm_amd"]), {"x86_64": (True, "booted"), "i386": (True, "booted")})
    assert {v["chosen"] for v in ok.values()} == {"kvm"}


# -- CLI and errors -----------------------------------------------------------------------

@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("NESTBED_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.mark.parametrize("argv", [["frobnicate"], ["run"], ["run", "tiny-x86_64", "--accel", "warp", "--", "true"],
                                  ["bench", "--runs", "3"], ["roundtrip", "/nonexistent", "--chain", "raw"]])
def test_cli_usage_errors_exit_125(cache: Path, argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    try:
        rc = main(argv)
    except SystemExit as exc:
        rc = exc.code  # type: ignore[assignment]
    assert rc == 125
    assert "nestbed: error:" in capsys.readouterr().err


def test_cli_unknown_image_is_one_line(cache: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "no-such-image", "--", "true"]) == 125
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown image 'no-such-image'" in err and "tiny-x86_64" in err


def test_cli_images_list_json(cache: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    assert main(["images", "list", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["tiny-i386"]["arch"] == "i386" and rows["tiny-i386"]["built"] is False


def test_cli_help_documents_exit_status(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "125" in capsys.readouterr().out


def test_quote_command() -> None:
    assert quote_command("ls -l") == "ls -l"
    assert quote_command("printf", "%s", "a b", "it's", "$HOME") == "printf %s 'a b' 'it'\"'\"'s' '$HOME'"


def test_errors_carry_tails_and_level() -> None:
    err = GuestPanic("guest kernel panicked: x", serial_tail="line1\nKernel panic", stderr_tail="qemu: warn",
                     level=2)
    text = str(err)
    assert text.startswith("level 2: guest kernel panicked") and "Kernel panic" in text and "qemu: warn" in text
    assert ConsoleTimeout("ready marker", 5.0).message == "no ready marker on the serial console within 5 s"


def test_hung_task_report_is_recognised() -> None:
    import re

    from harness.guest import HUNG_TASK_RE

    # Captured from an L2 whose boot hung under L1's KVM (2026-11-25).
    line = "[  242.929227] INFO: task swapper/0:1 blocked for more than 120 seconds."
    assert re.search(HUNG_TASK_RE, line)
    assert not re.search(HUNG_TASK_RE, "[    1.0] INFO: task queued")


def test_the_recipe_settings_table_and_the_recipe_fields_agree() -> None:
    import dataclasses

    from harness.images.recipes import SETTINGS, Recipe

    fields = {f.name for f in dataclasses.fields(Recipe)} - {"name", "file"}
    assert set(SETTINGS) - {"base"} == fields
    assert all(s.help for s in SETTINGS.values())


def test_an_inner_qemu_runs_nothing_until_l0_holds_its_serial_and_qmp() -> None:
    # QMP with wait=off let the guest run, and QEMU emit events, while L0 connected: in CI an event
    # came before the greeting (and once between it and the capabilities reply), and qemu.qmp refused.
    from harness.nested import inner_endpoints

    argv = build_argv(MachineSpec(accel=Accel.KVM), inner_endpoints(23000, 23001, "/run/nestbed/x"))
    chardevs = _opt(argv, "-chardev")
    assert chardevs == ["socket,id=serial0,host=127.0.0.1,port=23000,server=on,wait=on",
                        "socket,id=qmp0,host=127.0.0.1,port=23001,server=on,wait=on"]  # L0 connects in this order
    assert _opt(argv, "-pidfile") == ["/run/nestbed/x/qemu.pid"]
    no_qmp = build_argv(MachineSpec(accel=Accel.KVM), inner_endpoints(23000, None, "/r"))
    assert _opt(no_qmp, "-chardev") == [chardevs[0]] and "-mon" not in no_qmp


def test_l1_ports_are_chosen_below_the_ephemeral_range_and_free() -> None:
    import random

    from harness.nested import PORT_FLOOR, pick_ports

    listing = ("32768\t60999\n  sl  local_address rem_address   st\n"
               "   0: 0100007F:4E20 00000000:0000 0A 00000000:00000000\n")  # 127.0.0.1:20000 listening
    ports = pick_ports(listing, 500, rng=random.Random(7))
    assert len(set(ports)) == 500 and all(PORT_FLOOR < p < 32768 for p in ports)  # 20000 is taken
    assert all(PORT_FLOOR <= p <= 21000 for p in pick_ports("1024 60999\n", 5))  # an odd range: still 1000
    # Every port of that thousand in use but one: that one, whatever the draw.
    busy = "".join(f"   0: 0100007F:{port:04X} 00000000:0000 0A\n" for port in range(PORT_FLOOR, 21001) if port != 20500)
    assert pick_ports("1024 60999\n  sl  local_address\n" + busy, 1) == [20500]
    assert all(PORT_FLOOR <= p < 32768 for p in pick_ports("", 5))  # unreadable: Linux's default


def test_a_watchdog_acts_only_on_a_block_that_outlives_its_deadline() -> None:
    import threading
    import time

    from harness.core.watchdog import Watchdog

    acted = threading.Event()
    with Watchdog(0.05, acted.set) as quick:
        pass
    time.sleep(0.2)
    assert not quick.fired and not acted.is_set()  # cancelled when the block ended
    with Watchdog(0.05, acted.set) as slow:
        assert acted.wait(5)  # the block is still running: the action ends its wait
    assert slow.fired


@pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_watchdog_ignores_an_action_on_something_already_gone() -> None:
    import socket
    import time

    from harness.core.watchdog import Watchdog

    a, b = socket.socketpair()
    a.close()  # shutdown() on a closed socket raises OSError: the timer thread must not die with a traceback
    with Watchdog(0.0, lambda: a.shutdown(socket.SHUT_RDWR)) as w:
        time.sleep(0.2)
    assert w.fired
    b.close()
