"""The ``nestbed`` command line.

Exit status: ``nestbed run`` exits with the guest command's own status.  Any failure
of nestbed itself (bad arguments, unknown image, a guest that panics or hangs, QEMU
crashing) prints one line ``nestbed: error: ...`` on stderr and exits 125 (as
``docker run`` does), so it cannot be confused with a command's usual statuses;
130 means interrupted (Ctrl-C), 143 terminated (SIGTERM).  Full details (serial
and QEMU stderr tails) go to stderr with ``-v``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import signal
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

from harness.core import paths
from harness.errors import HarnessError, UsageError, headline
from harness.transport.base import Via
from harness.vm.spec import Accel, DiskFormat, Firmware

EXIT_HARNESS = 125


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        print(f"nestbed: error: {message}", file=sys.stderr)
        sys.exit(EXIT_HARNESS)


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2))


def cmd_probe(args: argparse.Namespace) -> int:
    from harness.guest import probe_host

    result = probe_host(refresh=args.refresh)
    if args.json:
        _print_json(result)
        return 0
    cpu, kvm = result["cpu"], result["kvm"]
    print(f"host:    {result['hostname']}  kernel {result['kernel']}  {cpu['vendor']} {cpu['model']}")
    print(f"cpu:     vmx={cpu['vmx']} svm={cpu['svm']} hypervisor={cpu['hypervisor']} cpus={cpu['cpus']}")
    print(f"kvm:     /dev/kvm present={kvm['present']} openable={kvm['openable']} "
          f"modules={','.join(kvm['modules']) or '-'} nested={kvm['nested'] or '-'}")
    print(f"qemu:    {result['qemu']}")
    for arch, verdict in result["accel"].items():
        print(f"accel:   {arch:7} {verdict['chosen']:4} {verdict['reason']}")
    return 0


def cmd_images_list(args: argparse.Namespace) -> int:
    from harness.images import store as images

    rows = [img.describe() for img in images.list_images()]
    if args.json:
        _print_json(rows)
        return 0
    for row in rows:
        state = "built" if row["built"] else "not built"
        print(f"{row['name']:20} {row['arch']:7} {row['kind']:7} {state:10} {row['description']}")
    return 0


def cmd_images_inspect(args: argparse.Namespace) -> int:
    from harness.images import inspect

    result = inspect.inspect_file(Path(args.file))
    if args.json:
        _print_json(result)
    else:
        print(inspect.render(result))
    return 0


def cmd_images_export(args: argparse.Namespace) -> int:
    from harness.core.progress import StepProgress
    from harness.images import export
    from harness.images import store as images

    image = images.get_image(args.name)
    with StepProgress(f"export {image.name} as {args.format}") as bar:
        out = export.export(image, args.format, Path(args.output), firmware=args.firmware,
                            controller=args.controller, nic=args.nic, progress=bar)
    print(out)
    return 0


def cmd_images_build(args: argparse.Namespace) -> int:
    from harness.images import store as images

    targets = [images.get_image(name) for name in args.names]  # unknown names fail before any build
    for img in targets:
        images.build(img, force=args.force)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from harness.guest import BootOptions, boot

    command = list(args.command or [])
    if not command:
        raise UsageError("run: no command given (usage: nestbed run IMAGE -- CMD...)")
    if not 0 < args.timeout <= 86400:  # also refuses nan; checked before anything boots
        raise UsageError(f"run: --timeout {args.timeout:g} is not a number of seconds in (0, 86400]")
    if args.warm_start is False:
        from harness import warmstart

        warmstart.set_default(False)  # every level: the L1 (and L2 host) of --level 2/3 too
    opts = BootOptions(accel=Accel(args.accel), vcpus=args.vcpus, memory_mb=args.memory,
                       kernel=Path(args.kernel) if args.kernel else None,
                       firmware=Firmware(args.firmware) if args.firmware else None)
    image: Any = args.image
    from harness.images import disk

    if disk.is_disk_file(args.image):  # a disk image file (any format QEMU reads), booted as kind "disk"
        image = disk.image_for_file(Path(args.image))
    with contextlib.ExitStack() as stack:
        if args.level == 1:
            guest = stack.enter_context(boot(image, options=opts, via=args.via))
        else:
            from harness.nested import boot_hosts

            # Level N: a chain of N-1 hosts (L1, then l1-host inside it, ...), IMAGE in the deepest.
            host = stack.enter_context(boot_hosts(args.level - 1, [image]))
            guest = stack.enter_context(host.inner(image, options=opts, via=args.via))
        if args.verbose:
            print(f"nestbed: {args.image} at level {args.level}: accel {guest.accel.value} ({guest.accel_reason})",
                  file=sys.stderr)
        result = guest.run(command[0], *command[1:], timeout=args.timeout)
    sys.stdout.write(result.stdout)
    sys.stderr.write(result.stderr)
    sys.stdout.flush()
    return result.exit_status


def cmd_bench(args: argparse.Namespace) -> int:
    from harness.tools import bench

    results = bench.run_all(runs=args.runs, only=args.only, slow=args.slow)
    if args.json:
        _print_json(results)
    else:
        print(bench.render_text(results))
    if args.write:
        bench.write_markdown(Path(args.write), results)
        print(f"nestbed: wrote {args.write}", file=sys.stderr)
    return 0


def cmd_in_l1(args: argparse.Namespace) -> int:
    from harness.tools import selfhost

    if not args.command:
        raise UsageError("in-l1: give the nestbed command to run inside the L1 after --, e.g. -- probe")
    with selfhost.nestbed_in_l1(tuple(args.image or ["tiny-x86_64"])) as host:
        print(f"nestbed: installed in the L1 in {host.install_seconds:.1f} s; running nestbed "
              f"{' '.join(args.command)} there", file=sys.stderr)
        result = host.nestbed(*args.command, timeout=args.timeout)
    sys.stdout.write(result.stdout)
    sys.stderr.write(result.stderr)
    return result.exit_status


def cmd_soak(args: argparse.Namespace) -> int:
    from harness.core.progress import StepProgress
    from harness.tools import soak

    out = Path(args.out) if args.out else paths.log_root() / f"soak-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}"
    with StepProgress(f"soak {args.tier} x{args.runs}") as bar:
        report = soak.run_soak(args.runs, tier=args.tier, out_dir=out, timeout=args.timeout, say=bar,
                               scenarios=Path(args.scenarios).resolve() if args.scenarios else None,
                               extra=list(args.command or []))
    print(soak.render(report))
    print(f"junit files and logs: {out}")
    return 0 if report.green else 1


def cmd_roundtrip(args: argparse.Namespace) -> int:
    import tempfile

    from harness import diskfmt
    from harness.core.progress import StepProgress
    source = Path(args.source)
    if not source.is_file():
        raise UsageError(f"roundtrip: {source}: no such file")
    chain = diskfmt.parse_chain(args.chain)
    fmt = DiskFormat(args.format) if args.format else None
    with contextlib.ExitStack() as stack:
        work = Path(args.workdir) if args.workdir else Path(stack.enter_context(
            tempfile.TemporaryDirectory(prefix="nestbed-roundtrip-", dir=paths.cache_root())))
        work.mkdir(parents=True, exist_ok=True)
        with StepProgress(f"roundtrip {source.name}") as bar:
            result = diskfmt.run_chain(source, chain, work, source_format=fmt, progress=bar, boot=args.boot,
                                       second_opinion=not args.first_reader_only)
    if args.json:
        _print_json(result)
    else:
        print(diskfmt.render_text(result))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="nestbed", description="Boot QEMU guests (and guests inside guests) and test them.",
                epilog="Exit status: `run` passes the guest command's status through; nestbed's own "
                       "errors print one line (-v: with the serial and QEMU stderr tails) and exit 125; Ctrl-C 130, "
                       "SIGTERM 143.  Serial logs: <cache>/logs/.")
    p.add_argument("--cache-dir", metavar="DIR",
                   help="cache for images, probe verdicts and logs (default: $NESTBED_CACHE or ~/.cache/nestbed)")
    p.add_argument("-v", "--verbose", action="store_true", help="log QEMU command lines; show full error details")
    sub = p.add_subparsers(dest="command_name", required=True, parser_class=_Parser)

    sp = sub.add_parser("probe", help="host facts and the accelerator each arch will use")
    sp.add_argument("--json", action="store_true", help="print one JSON object")
    sp.add_argument("--refresh", action="store_true", help="ignore the verdict cached for this host boot")
    sp.set_defaults(func=cmd_probe)

    ip = sub.add_parser("images", help="list, build, inspect or export images")
    isub = ip.add_subparsers(dest="images_command", required=True, parser_class=_Parser)
    lp = isub.add_parser("list", help="every known image, whether built, and its paths")
    lp.add_argument("--json", action="store_true")
    lp.set_defaults(func=cmd_images_list)
    bp = isub.add_parser("build", help="build images into the cache (a cache hit returns at once)")
    bp.add_argument("names", nargs="+", metavar="NAME")
    bp.add_argument("--force", action="store_true", help="rebuild even if cached")
    bp.set_defaults(func=cmd_images_build)
    inp = isub.add_parser("inspect", help="what a disk image, OVF or OVA is: format, sizes, partition table, "
                                          "firmware guess; an OVF's hardware and manifest (read only)")
    inp.add_argument("file", metavar="FILE", help="any disk image QEMU reads, an .ovf or an .ova")
    inp.add_argument("--json", action="store_true")
    inp.set_defaults(func=cmd_images_inspect)
    ep = isub.add_parser("export", help="write a built image's bootable disk as a file another product imports "
                                        "(docs/appliances.md)")
    ep.add_argument("name", metavar="NAME")
    ep.add_argument("--format", required=True, choices=["ova", "vmdk", "vhd", "vhdx", "vdi", "qcow2"],
                    help="ova: an OVF 1.0 appliance (streamOptimized VMDK, SHA256 manifest); vhd: dynamic")
    ep.add_argument("-o", "--output", required=True, metavar="FILE", help="the file to write (replaced atomically)")
    ep.add_argument("--firmware", choices=["bios", "uefi"], default="bios",
                    help="what the OVA's descriptor asks for (the disk boots under both; default bios)")
    ep.add_argument("--controller", choices=["ide", "pvscsi", "lsilogic"], default="ide",
                    help="the OVA's disk controller (default ide: the image's initramfs has ata_piix)")
    ep.add_argument("--nic", choices=["e1000", "vmxnet3", "virtio"], default="e1000",
                    help="the OVA's network adapter (default e1000; Debian's cloud kernel has vmxnet3, not e1000)")
    ep.set_defaults(func=cmd_images_export)

    rp = sub.add_parser("run", help="boot IMAGE, run CMD in it, print its output, exit with its status",
                        usage="nestbed run [options] IMAGE -- CMD...")
    rp.add_argument("image", metavar="IMAGE", help="a recipe name, or a disk image file (qcow2, vmdk, vhd, vhdx, vdi, raw) "
                                                "booted by its own bootloader and reached through cloud-init "
                                                "(docs/own-image.md)")
    # -v after the subcommand too (SUPPRESS: absent here, the global -v stands).
    rp.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                    help="show the accelerator chosen and full error details")
    rp.add_argument("--accel", choices=[a.value for a in Accel], default="auto",
                    help="accelerator (default auto: the probe's verdict)")
    rp.add_argument("--via", choices=[v.value for v in Via], default="serial",
                    help="transport for the command (ssh: images with an SSH server)")
    rp.add_argument("--level", type=int, choices=[1, 2, 3], default=1,
                    help="1: boot IMAGE on this host; 2: boot an L1 host (l1-host) and IMAGE inside it; "
                         "3: an L1 running an l1-host at level 2, IMAGE inside that (a disk image file too: "
                         "under SeaBIOS)")
    rp.add_argument("--kernel", metavar="PATH", help="boot this kernel with the image's userland")
    rp.add_argument("--firmware", choices=[f.value for f in Firmware], default=None,
                    help="boot the image's disk through its own bootloader (GRUB) under this firmware "
                         "(docs/firmware.md); default: direct kernel boot")
    rp.add_argument("--vcpus", type=int, metavar="N")
    rp.add_argument("--memory", type=int, metavar="MB")
    rp.add_argument("--timeout", type=float, default=600.0, metavar="S", help="command timeout (default 600)")
    rp.add_argument("--no-warm-start", dest="warm_start", action="store_false", default=None,
                    help="boot, do not restore the state saved at this shape's first ready marker "
                         "(docs/warm-start.md; also NESTBED_WARM_START=0)")
    rp.set_defaults(command=None)
    rp.set_defaults(func=cmd_run)

    tp = sub.add_parser("roundtrip", help="convert a disk image through a chain of formats, verifying every hop")
    tp.add_argument("source", metavar="SOURCE", help="any disk image qemu-img reads")
    tp.add_argument("--chain", required=True, metavar="FMT[:OPT=VAL...],...",
                    help="e.g. vmdk:subformat=streamOptimized,vpc:subformat=fixed:force_size=on,vhdx,qcow2,raw")
    tp.add_argument("--format", choices=[f.value for f in DiskFormat], help="SOURCE's format (default: probe)")
    tp.add_argument("--workdir", metavar="DIR", help="keep the hops here (default: a temporary directory)")
    tp.add_argument("--boot", metavar="IMAGE",
                    help="also boot IMAGE's kernel from every hop as its root disk: check a manifest written into "
                         "the source's ext4, write to it, power off; the chain goes on from what it wrote")
    tp.add_argument("--first-reader-only", action="store_true",
                    help="one independent reader per format (skip the dissect.hypervisor second opinion)")
    tp.add_argument("--json", action="store_true", help="print the result as JSON (see docs/disk-formats.md)")
    tp.set_defaults(func=cmd_roundtrip)

    bp2 = sub.add_parser("bench", help="benchmarks, side by side, medians; optionally write BENCHMARKS.md")
    bp2.add_argument("--json", action="store_true")
    bp2.add_argument("--runs", type=int, default=7, help="runs per measurement (default 7, at least 5)")
    bp2.add_argument("--only", action="append", metavar="NAME",
                     help="run only this benchmark (repeatable): boot-tiny-x86_64, boot-tiny-i386, debian-ssh-ready, "
                          "tcg-threads, nested-level-2, warm-start, reset, hops, virtme-ng, and the slow ones reset-l2, "
                          "smoke-tier, image-build, kvm-host")
    bp2.add_argument("--slow", action="store_true",
                     help="also run the slow benchmarks (smoke-tier: minutes per run, one run per side; reset-l2; "
                          "image-build; kvm-host: nestbed inside an L1)")
    bp2.add_argument("--write", metavar="FILE", help="write the results as Markdown to FILE")
    bp2.set_defaults(func=cmd_bench)

    from harness.reports import cli as report_cli  # `report` (run, merge, diff) and `matrix`: harness/reports/cli.py

    report_cli.add_parsers(sub, _Parser)

    il = sub.add_parser("in-l1", help="run nestbed itself inside an L1 (a KVM host: on a TCG machine its KVM "
                                      "comes from emulated SVM); wheels and images are carried in on a disk",
                        usage="nestbed in-l1 [--image NAME]... [--timeout S] -- NESTBED-ARGS...")
    il.add_argument("--image", action="append", metavar="NAME",
                    help="an image to carry into the L1's cache (repeatable; default tiny-x86_64)")
    il.add_argument("--timeout", type=float, default=900.0, metavar="S", help="limit for the inner command")
    il.set_defaults(func=cmd_in_l1, command=None)

    sk = sub.add_parser("soak", help="repeat a scenario tier and report flaky tests; -- PYTEST_ARGS go to each "
                                     "run (exit 1 if any test flaked or failed, or a run gave no results)",
                        usage="nestbed soak [--runs N] [--tier TIER] [--out DIR] [--scenarios DIR] [--timeout S] "
                              "[-- PYTEST_ARGS...]")
    sk.add_argument("--runs", type=int, default=10, metavar="N", help="how many times (default 10)")
    sk.add_argument("--tier", default="smoke", metavar="TIER",
                    help="a tier of the matrix (smoke, nightly, full, kvm-l1: selected as `nestbed report --tier` "
                         "selects, rules and strictness included), or a marker expression (default smoke)")
    sk.add_argument("--out", metavar="DIR", help="where the JUnit files and logs go (default: <cache>/logs/soak-*)")
    sk.add_argument("--scenarios", metavar="DIR", help="scenario directory (default: nestbed's built-in scenarios)")
    sk.add_argument("--timeout", type=float, default=3600.0, metavar="S", help="limit per run (default 3600)")
    sk.set_defaults(func=cmd_soak, command=None)  # -- PYTEST_ARGS: passed to each run, e.g. -- -n 2
    return p


def _on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(143)  # unwinds through every finally: guests shut down, run dirs removed


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    # Everything after the first "--" is the guest command, whatever it looks like.
    command = None
    if "--" in argv:
        cut = argv.index("--")
        argv, command = argv[:cut], argv[cut + 1:]
    args = parser.parse_args(argv)
    if command is not None:
        if getattr(args, "command", "absent") == "absent":
            parser.error(f"{args.command_name}: unexpected '-- {' '.join(command)}'")
        args.command = command
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="nestbed: %(message)s")
    logging.getLogger("qemu.qmp").setLevel(logging.WARNING)  # its INFO lines are protocol chatter
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        paths.set_cache_dir(args.cache_dir)
        rc: int = args.func(args)
        return rc
    except HarnessError as exc:
        text = str(exc)
        print(f"nestbed: error: {text if args.verbose else headline(text)}", file=sys.stderr)
        return EXIT_HARNESS
    except KeyboardInterrupt:
        print("nestbed: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
