"""``nestbed bench``: side-by-side measurements, medians, ratios, BENCHMARKS.md.

Every comparison interleaves its two sides (A, B, A, B, ...) after one untimed warm-up
of each, so the noise of a shared machine hits both; results are medians of at least
five runs.  Benchmarks are a registry: ``@benchmark("name")``; ``slow=True`` ones (the
smoke tier, an L2 reset) run only when named with ``--only`` or with ``--slow``.
Everything a benchmark needs that is not part of nestbed (virtme-ng, Debian's generic
kernel) is fetched into ``<cache>/bench/`` at bench time, never into the project's venv.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import platform
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from harness.core import paths
from harness.core.publish import publish, write_atomic
from harness.core.run import run
from harness.errors import CapabilityMissing, HarnessError, UsageError
from harness.images import store as images
from harness.vm.spec import Accel, DiskFormat

if TYPE_CHECKING:
    from harness.diskfmt import Hop

# Benchmarks run commands from here: the built-in scenarios' parent (the checkout, or the installed package).
SCENARIO_ROOT = paths.builtin_dir("scenarios").parent

RUN_TIMEOUT = 900.0
BEGIN, END = "<!-- nestbed-bench:begin -->", "<!-- nestbed-bench:end -->"

Bench = Callable[[int], dict[str, Any]]
BENCHMARKS: dict[str, Bench] = {}
SLOW: set[str] = set()  # run only when named (--only) or with --slow


def benchmark(name: str, *, slow: bool = False) -> Callable[[Bench], Bench]:
    def register(fn: Bench) -> Bench:
        BENCHMARKS[name] = fn
        if slow:
            SLOW.add(name)
        return fn
    return register


def _stats(samples: list[float]) -> dict[str, Any]:
    return {"samples": [round(s, 3) for s in samples], "median": round(statistics.median(samples), 3),
            "min": round(min(samples), 3), "max": round(max(samples), 3)}


def _timed(argv: list[str]) -> float:
    started = time.monotonic()
    run(argv, timeout=RUN_TIMEOUT, what=f"bench: {' '.join(argv[:6])}...", cwd=SCENARIO_ROOT)
    return time.monotonic() - started


T = TypeVar("T")


def _side_by_side(a: Callable[[], T], b: Callable[[], T], runs: int) -> tuple[list[T], list[T]]:
    """*a* and *b* interleaved (a, b, a, b, ...) *runs* times each, after one untimed warm-up of each."""
    a(), b()  # warm-up: page cache, first-run costs
    xs: list[T] = []
    ys: list[T] = []
    for _ in range(runs):
        xs.append(a())
        ys.append(b())
    return xs, ys


def _ratio(name_a: str, a: list[float], name_b: str, b: list[float], target: float | None) -> dict[str, Any]:
    """Both sides' stats and the ratio of their medians, b over a (None if a's median is 0)."""
    sa, sb = _stats(a), _stats(b)
    ratio = round(sb["median"] / sa["median"], 3) if sa["median"] else None
    out = {name_a: sa, name_b: sb, "ratio": ratio, "ratio_of": f"{name_b}/{name_a}"}
    if target is not None:
        out.update(target=target, meets_target=ratio is not None and ratio <= target)
    return out


def _bare_tiny_argv(arch: str) -> list[str]:
    img = images.build(f"tiny-{arch}")
    cpu = "qemu64" if arch == "x86_64" else "qemu32"
    return [f"qemu-system-{arch}", "-machine", "q35", "-accel", "tcg", "-cpu", cpu, "-m", str(img.recipe.memory_mb),
            "-smp", str(img.recipe.vcpus), "-nodefaults", "-no-user-config", "-display", "none", "-vga", "none",
            "-no-reboot", "-serial", "file:/dev/null", "-kernel", str(img.kernel), "-initrd", str(img.initrd),
            "-append", "console=ttyS0 loglevel=4 panic=-1 rdinit=/init nestbed.poweroff"]


def _tiny(arch: str, runs: int) -> dict[str, Any]:
    bare = _bare_tiny_argv(arch)
    # A cold boot, as the bare side: warm start has its own benchmark (warm-start).
    harness = ["env", "NESTBED_WARM_START=0", sys.executable, "-m", "harness", "run", "--accel", "tcg", f"tiny-{arch}",
               "--", "true"]
    a, b = _side_by_side(lambda: _timed(bare), lambda: _timed(harness), runs)
    result = _ratio("bare_qemu", a, "nestbed_run", b, 1.10)
    result["what"] = f"boot tiny-{arch} to its first command and power off: `nestbed run` (whole CLI) vs bare QEMU"
    return result


@benchmark("boot-tiny-x86_64")
def bench_tiny_x86_64(runs: int) -> dict[str, Any]:
    return _tiny("x86_64", runs)


@benchmark("boot-tiny-i386")
def bench_tiny_i386(runs: int) -> dict[str, Any]:
    return _tiny("i386", runs)


@benchmark("debian-ssh-ready")
def bench_debian_ssh(runs: int) -> dict[str, Any]:
    """debian-x86_64 with 2 vCPUs under TCG: launch to ready marker, to SSH, and the detection lag."""
    from harness.guest import BootOptions, boot
    from harness.vm.spec import Accel

    images.build("debian-x86_64")
    ready, ssh, lag = [], [], []
    for i in range(runs + 1):
        started = time.monotonic()
        with boot("debian-x86_64", via="ssh", options=BootOptions(accel=Accel.TCG, vcpus=2, warm_start=False)) as g:
            if i == 0:
                continue  # warm-up
            ssh.append(time.monotonic() - started)
            ready.append(g.ready_seconds or 0.0)
            lag.append(g.ready_lag or 0.0)
    return {"what": "debian-x86_64, 2 vCPUs, TCG: launch -> ready marker seen; launch -> SSH authenticated; "
                    "marker bytes arrived -> harness noticed",
            "ready_marker": _stats(ready), "ssh_ready": _stats(ssh), "detection_lag": _stats(lag),
            "target_ssh_ready": 8.0, "meets_target": statistics.median(ssh) <= 8.0}


@benchmark("tcg-threads")
def bench_tcg_threads(runs: int) -> dict[str, Any]:
    """2-vCPU guests under TCG, launch to SSH: one TCG thread per vCPU (QEMU's default, nestbed's too) vs one
    thread for all (``BootOptions(tcg_threads="single")``): what single-threaded TCG costs a booting guest."""
    from harness.guest import BootOptions, boot

    def ssh_ready(image: str, threads: str) -> Callable[[], float]:
        def once() -> float:
            started = time.monotonic()
            with boot(image, via="ssh", options=BootOptions(accel=Accel.TCG, vcpus=2, tcg_threads=threads,
                                                            warm_start=False)):
                return time.monotonic() - started
        return once

    out: dict[str, Any] = {"what": "2 vCPUs under TCG, launch -> SSH authenticated: `-accel tcg,thread=multi` "
                                   "vs `thread=single`, interleaved"}
    for image in ("debian-x86_64", "appliance-web"):
        images.build(image)
        multi, single = _side_by_side(ssh_ready(image, "multi"), ssh_ready(image, "single"), runs)
        out[image] = _ratio("multi", multi, "single", single, None)
    return out


@benchmark("image-build", slow=True)
def bench_image_build(runs: int) -> dict[str, Any]:
    """debian-x86_64 built cold into an empty cache (once: a build is ~1-2 min), then warm (cache hits)."""
    with tempfile.TemporaryDirectory(prefix="nestbed-bench-cache-", dir=paths.cache_root()) as tmp:
        cli = [sys.executable, "-m", "harness", "--cache-dir", tmp, "images", "build", "debian-x86_64"]
        cold = [_timed(cli)]
        warm = [_timed(cli) for _ in range(runs)]
    return {"what": "`nestbed images build debian-x86_64`: cold = into an empty cache (mmdebstrap, customize, "
                    "mke2fs -d, qcow2; one run), warm = the same command again (a cache hit, whole CLI)",
            "cold_build": _stats(cold), "warm_build": _stats(warm)}


@benchmark("nested-level-2")
def bench_nested(runs: int) -> dict[str, Any]:
    """L1 ready, L2 (debian-x86_64 under L1's KVM) SSH-ready after L1, and the whole level-2 run."""
    from harness.nested import boot_l1

    l1_ready, l2_ready, whole = [], [], []
    for i in range(runs + 1):
        started = time.monotonic()
        with boot_l1(["debian-x86_64"], extra_options={"warm_start": False}) as l1:
            l1_at = time.monotonic()
            with l1.inner("debian-x86_64", via="ssh") as g:
                g.check_output("cat /sys/devices/system/clocksource/clocksource0/current_clocksource")
                l2_at = time.monotonic()
        if i == 0:
            continue  # warm-up (also fills the L1 probe cache)
        l1_ready.append(l1.guest.ready_seconds or 0.0)
        l2_ready.append(l2_at - l1_at)
        whole.append(time.monotonic() - started)
    return {"what": "boot_l1 + debian-x86_64 L2 over jump-SSH + one command + shutdown (probe verdicts cached)",
            "l1_ready": _stats(l1_ready), "l2_ssh_after_l1": _stats(l2_ready), "whole_run": _stats(whole),
            "targets": {"l1_ready": 8.0, "l2_ssh_after_l1": 15.0, "whole_run": 30.0}}


# -- warm start vs cold boot ----------------------------------------------------------------------

WARM_TARGETS = {"tiny_first_command": 0.6, "debian_ssh_ready": 1.5, "l1_ready": 2.5, "level2_whole_run": 12.0}


def _warm_pair(fn: Callable[[bool], float], runs: int) -> dict[str, Any]:
    """*fn(warm)* timed cold and warm, interleaved, after one untimed run of each (which saves the state)."""
    cold, warm = _side_by_side(lambda: fn(False), lambda: fn(True), runs)
    return _ratio("cold_boot", cold, "warm_start", warm, None)


@benchmark("warm-start")
def bench_warm_start(runs: int) -> dict[str, Any]:
    """Warm start (restored from the saved ready state) vs cold boot, side by side, and bare QEMU's cold boot."""
    from harness.guest import BootOptions, boot
    from harness.nested import boot_l1
    from harness.vm.spec import Accel

    def tiny(warm: bool) -> float:
        started = time.monotonic()
        with boot("tiny-x86_64", options=BootOptions(accel=Accel.TCG, warm_start=warm)) as g:
            g.check_output("true")
            return time.monotonic() - started

    def debian(warm: bool) -> float:
        started = time.monotonic()
        with boot("debian-x86_64", via="ssh", options=BootOptions(accel=Accel.TCG, warm_start=warm)):
            return time.monotonic() - started

    def l1(warm: bool) -> float:
        started = time.monotonic()
        with boot_l1(["tiny-x86_64"], extra_options={"warm_start": warm}):
            return time.monotonic() - started

    def level2(warm: bool) -> float:
        started = time.monotonic()
        with boot_l1(["tiny-x86_64"], extra_options={"warm_start": warm}) as host, host.inner("tiny-x86_64") as g:
            g.check_output("cat /sys/devices/system/clocksource/clocksource0/current_clocksource")
        return time.monotonic() - started

    images.build("debian-x86_64")
    bare = _bare_tiny_argv("x86_64")
    out: dict[str, Any] = {
        "what": "in-process, TCG at L0: cold boot (warm_start=False) vs warm start, interleaved; tiny = boot_guest "
                "to its first serial command; Debian = to SSH authenticated; L1 = boot_l1 ready (setup and "
                "probe included, verdicts cached); level 2 = boot_l1 + a tiny L2 under L1's KVM + one command "
                "+ shutdown; bare QEMU = tiny's kernel to poweroff with no harness",
        "targets": WARM_TARGETS,
        "tiny_first_command": _warm_pair(tiny, runs),
        "debian_ssh_ready": _warm_pair(debian, runs),
        "l1_ready": _warm_pair(l1, runs),
        "level2_whole_run": _warm_pair(level2, runs),
    }
    bare_runs = [_timed(bare) for _ in range(runs)]
    out["tiny_first_command"]["bare_qemu_cold"] = _stats(bare_runs)
    out["meets_targets"] = {k: out[k]["warm_start"]["median"] <= t for k, t in WARM_TARGETS.items()}
    return out


# -- c. reset vs reboot ------------------------------------------------------------------------

RESET_TARGET = 1.5  # seconds, debian-x86_64 under TCG


def _reset_vs_reboot(runs: int, boot_cm: Callable[..., Any], what: str, accel: Accel = Accel.TCG,
                     target: float | None = RESET_TARGET) -> dict[str, Any]:
    """One long-lived guest reset *runs* times, interleaved with as many fresh boots of the same image."""
    from harness.guest import BootOptions

    opts = BootOptions(accel=accel, vcpus=2)
    loadvm, ssh = [], []

    with boot_cm(dataclasses.replace(opts, reset=True)) as g:
        def reboot() -> float:
            started = time.monotonic()
            with boot_cm(opts) as fresh:
                fresh.check_output("true")
            return time.monotonic() - started  # launch -> SSH answers -> powered off: what a test pays

        def reset() -> float:
            g.check_output("echo dirty > /root/nestbed-bench; sync")  # untimed: something to undo
            started = time.monotonic()
            g.reset()
            g.check_output("test ! -e /root/nestbed-bench")
            elapsed = time.monotonic() - started
            loadvm.append(g.last_reset["loadvm"])
            # The serial resync overlaps the SSH handshake (harness.vm.snapshot): SSH is the phase that counts.
            ssh.append(g.last_reset.get("ssh", 0.0))
            return elapsed

        a, b = _side_by_side(reboot, reset, runs)
    del loadvm[0], ssh[0]  # the warm-up's
    result = _ratio("reboot", a, "reset", b, None)
    result.update(what=what, reset_loadvm=_stats(loadvm), reset_ssh_reconnect=_stats(ssh))
    if target is not None:
        result.update(target_seconds=target, meets_target=statistics.median(b) <= target)
    return result


@benchmark("kvm-host", slow=True)
def bench_kvm_host(runs: int) -> dict[str, Any]:
    """nestbed installed in an L1 and run there as level 0 (its KVM is TCG's emulated SVM, not hardware)."""
    from harness.tools import selfhost

    def timed(host: selfhost.SelfHosted, *argv: str) -> float:
        started = time.monotonic()
        r = host.nestbed(*argv, timeout=900)
        if r.exit_status != 0:
            raise HarnessError(f"bench kvm-host: nestbed {' '.join(argv)} in the L1 exited {r.exit_status}: "
                               f"{r.stderr.strip()[-300:]}")
        return time.monotonic() - started

    tiny = images.build("tiny-x86_64")
    inside = f"/root/.cache/nestbed/images/{tiny.dir.name}"  # where nestbed_in_l1 puts the image in the L1
    bare = [a.replace(str(tiny.dir), inside) for a in _bare_tiny_argv("x86_64")]
    bare[bare.index("-accel") + 1], bare[bare.index("-cpu") + 1] = "kvm", "host"

    def bare_run(host: selfhost.SelfHosted) -> float:
        started = time.monotonic()
        r = host.l1.ssh.run(" ".join(shlex.quote(a) for a in bare), timeout=300)
        if r.exit_status != 0:
            raise HarnessError(f"bench kvm-host: bare QEMU in the L1 exited {r.exit_status}: {r.stderr.strip()[-300:]}")
        return time.monotonic() - started

    with selfhost.nestbed_in_l1(("tiny-x86_64", "debian-x86_64")) as host:
        a, b = _side_by_side(lambda: bare_run(host),
                             lambda: timed(host, "run", "--accel", "kvm", "tiny-x86_64", "--", "true"), runs)
        result = _ratio("bare_qemu_kvm", a, "nestbed_run_kvm", b, None)
        result["debian_ssh_kvm"] = _stats([timed(host, "run", "debian-x86_64", "--via", "ssh", "--", "true")
                                           for _ in range(max(1, runs // 2))])
        result["install_seconds"] = round(host.install_seconds, 1)
    result["what"] = ("inside an L1 with nestbed installed from wheels (`nestbed in-l1`), that host's level 0: "
                      "`nestbed run tiny-x86_64 -- true` (whole CLI, its probe cached) vs bare `qemu-system-x86_64 "
                      "-accel kvm -cpu host` booting the same kernel and initramfs to poweroff, interleaved, and "
                      "`nestbed run debian-x86_64 --via ssh -- true`; each timed from L0 around the SSH exec. The "
                      "L1's KVM is TCG's emulated SVM on this machine, not hardware: figures are for the KVM code "
                      "path, not for KVM's speed")
    return result


@benchmark("reset")
def bench_reset(runs: int) -> dict[str, Any]:
    """debian-x86_64 over SSH: Guest.reset() (loadvm + serial resync + SSH reconnect) vs a reboot."""
    from harness.guest import boot

    images.build("debian-x86_64")
    return _reset_vs_reboot(
        runs, lambda opts: boot("debian-x86_64", via="ssh", options=opts),
        "debian-x86_64, 2 vCPUs, TCG, over SSH: reset = Guest.reset() until a command answers over a fresh "
        "SSH connection (phases: loadvm; SSH reconnect, during which the serial console resyncs); "
        "reboot = boot a new guest until SSH answers, then power it off")


@benchmark("reset-l2", slow=True)
def bench_reset_l2(runs: int) -> dict[str, Any]:
    """The same comparison for a debian-x86_64 L2 under L1's KVM (one L1 for all runs)."""
    from harness.nested import boot_l1

    with boot_l1(["debian-x86_64"]) as l1:
        return _reset_vs_reboot(
            runs, lambda opts: l1.inner("debian-x86_64", via="ssh", options=opts),
            "debian-x86_64 as an L2 in one l1-host, over jump-SSH: Guest.reset() vs booting a new L2 "
            "(L1 boot not counted)", accel=Accel.AUTO, target=None)  # AUTO: L1's own verdict (its KVM)


# -- d. conversion hops vs bare qemu-img -----------------------------------------------------------

HOPS_CHAIN = "vmdk,vpc:force_size=on,vhdx,qcow2,raw"
HOPS_SOURCE_MB = 256
HOPS_FILL_MB = 160  # data in the filesystem: conversions copy allocated clusters only


def _hops_source() -> Path:
    """A 256 MiB raw ext4 image holding nestbed's sources and 160 MiB of seeded pseudo-random data
    (the same bytes on every machine); cached."""
    import random

    root = _bench_dir()
    target = root / "hops-source-v2.raw"

    def make(tmp: Path) -> None:
        with tempfile.TemporaryDirectory(prefix=".hops-stage-", dir=root) as stage:
            shutil.copytree(paths.PACKAGE_DIR, Path(stage) / "harness",
                            ignore=shutil.ignore_patterns("__pycache__"))
            rng = random.Random(7)
            with open(Path(stage) / "fill.bin", "wb") as f:
                for _ in range(HOPS_FILL_MB):
                    f.write(rng.randbytes(1 << 20))
            run(["mke2fs", "-q", "-F", "-t", "ext4", "-d", stage, "-L", "nbbench", str(tmp), f"{HOPS_SOURCE_MB}M"],
                timeout=120, what=f"bench: the conversion source {target}")

    publish(target, make, what="bench conversion source")
    return target


HOPS_TARGET = 1.05  # nestbed's conversion over a bare qemu-img convert, medians


def _child_cpu() -> float:
    """CPU time (user+sys) of this process's waited-for children so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def measure_hops(source: Path, chain: str | list[Hop], *, runs: int = 5, workdir: Path | None = None,
                 source_format: DiskFormat | None = None, target: float = HOPS_TARGET) -> dict[str, Any]:
    """Each hop's conversion as nestbed runs it (:func:`harness.diskfmt.convert`) vs a bare
    ``qemu-img convert`` of the same input with the same arguments, interleaved by
    :func:`_side_by_side`; medians of *runs* (at least 5).  Also the median cost of the hop's
    verification (check, compare, every reader), which the bare command does not do.

    Returns ``{"source", "virtual_size", "runs", "target", "hops": [{"hop", "from", "bare",
    "nestbed", "ratio", "ratio_of", "meets_target", "bare_cpu", "nestbed_cpu", "cpu_ratio", "verify"}],
    "meets_target"}``: wall-clock stats, and qemu-img's CPU time (user+sys), which the noise of
    a shared machine inflates far less.  Put *workdir* on tmpfs to keep disk contention out.
    """
    from harness import diskfmt

    if runs < 5:
        raise UsageError(f"bench hops: runs={runs}: medians need at least 5 runs")
    hops = diskfmt.parse_chain(chain) if isinstance(chain, str) else chain
    src_info = diskfmt.info(source, source_format)
    src_fmt = DiskFormat(source_format or src_info["format"])
    size = int(src_info["virtual-size"])

    def one_hop(src: Path, src_fmt: DiskFormat, hop: Hop, dst: Path) -> dict[str, Any]:
        def timed(convert: Callable[[], object]) -> tuple[float, float]:
            """(wall seconds, qemu-img's CPU seconds) of one conversion into *dst*, cleared first."""
            for p in diskfmt.image_files(dst):
                p.unlink(missing_ok=True)
            cpu, t = _child_cpu(), time.monotonic()
            convert()
            return time.monotonic() - t, _child_cpu() - cpu

        def bare() -> None:
            run(diskfmt.convert_argv(src, src_fmt, dst, hop), timeout=diskfmt.QEMU_IMG_TIMEOUT,
                what=f"bare qemu-img convert to {hop.label}", error=diskfmt.DiskFormatError)

        xs, ys = _side_by_side(lambda: timed(bare), lambda: timed(lambda: diskfmt.convert(src, src_fmt, dst, hop)),
                               runs)
        verify: list[float] = []
        for _ in range(runs):
            t = time.monotonic()
            diskfmt.check(dst, hop.format)
            diskfmt.compare(src, src_fmt, dst, hop.format)
            diskfmt.independent_hashes(dst, hop.format, size)
            verify.append(time.monotonic() - t)
        wall = _ratio("bare", [x[0] for x in xs], "nestbed", [y[0] for y in ys], None)
        cpu = _ratio("bare_cpu", [x[1] for x in xs], "nestbed_cpu", [y[1] for y in ys], None)
        return {"hop": hop.label, "from": src_fmt.value, **wall,
                "meets_target": wall["ratio"] is not None and wall["ratio"] <= target,
                # qemu-img's own CPU time (user+sys): what contention on a shared machine cannot inflate
                "bare_cpu": cpu["bare_cpu"], "nestbed_cpu": cpu["nestbed_cpu"], "cpu_ratio": cpu["ratio"],
                "verify": _stats(verify)}

    with contextlib.ExitStack() as stack:
        work = workdir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="nestbed-bench-hops-")))
        work.mkdir(parents=True, exist_ok=True)
        out: list[dict[str, Any]] = []
        prev, prev_fmt = source, src_fmt
        for i, hop in enumerate(hops, start=1):
            dst = work / f"bench{i}.{diskfmt.EXTENSION[hop.format]}"  # also the next hop's input
            out.append(one_hop(prev, prev_fmt, hop, dst))
            prev, prev_fmt = dst, hop.format
    return {"source": str(source), "source_format": src_fmt.value, "virtual_size": size, "runs": runs,
            "target": target, "hops": out, "meets_target": all(h["meets_target"] for h in out)}


@benchmark("hops")
def bench_hops(runs: int) -> dict[str, Any]:
    """Each hop of a chain through harness.diskfmt vs a bare `qemu-img convert` of the same input."""
    result = measure_hops(_hops_source(), HOPS_CHAIN, runs=runs)
    result["what"] = (f"a {HOPS_SOURCE_MB} MiB raw ext4 image ({HOPS_FILL_MB} MiB of data) through {HOPS_CHAIN}: "
                      "each hop's conversion by harness.diskfmt.convert vs bare `qemu-img convert` (same arguments), "
                      "interleaved; "
                      "'verify' is what nestbed adds per hop (check, compare, independent readers)")
    return result


# -- e. the smoke tier: one worker vs -n auto ------------------------------------------------------

SMOKE_RUNS = 1  # each run takes minutes; a median of 5 per side would take over an hour


@benchmark("smoke-tier", slow=True)
def bench_smoke_tier(runs: int) -> dict[str, Any]:
    base = [sys.executable, "-m", "pytest", str(paths.builtin_dir("scenarios")), "-m", "smoke", "-p", "no:cacheprovider", "-q"]
    xdist = [*base, "-n", "auto", "--dist", "loadscope"]
    one, many = [], []
    for _ in range(SMOKE_RUNS):  # no warm-up: images are built by the first benchmark that needs them
        one.append(_timed(base))
        many.append(_timed(xdist))
    result = _ratio("one_worker", one, "n_auto", many, None)
    result.update(runs=SMOKE_RUNS, what=f"`pytest scenarios -m smoke` with one worker vs `-n auto --dist loadscope` "
                                        f"({os.cpu_count()} CPUs); {SMOKE_RUNS} run per side, not a median of 5 "
                                        "(each run takes minutes): indicative only")
    return result


# -- f. nestbed vs virtme-ng with the same generic kernel ---------------------------------------

VNG_VERSION = "1.42"
GENERIC_KERNEL_META = "linux-image-amd64"
VNG_HOST_TOOLS = {"depmod": "kmod", "busybox": "busybox-static"}


def _bench_dir() -> Path:
    return paths.private_dir(paths.cache_root() / "bench")


def generic_kernel() -> tuple[Path, str]:
    """Debian's generic amd64 kernel (image and its modules) unpacked into the cache; (vmlinuz, release)."""
    deps = run(["apt-cache", "depends", GENERIC_KERNEL_META], timeout=60, what="bench: apt-cache depends",
               check=False)
    pkg = next((ln.split(":", 1)[1].strip() for ln in deps.stdout.splitlines()
                if ln.strip().startswith("Depends:") and "linux-image-" in ln), None)
    if deps.returncode != 0 or not pkg:
        raise CapabilityMissing("generic kernel", f"apt-cache depends {GENERIC_KERNEL_META} names no kernel package "
                                                  f"(run apt-get update): {deps.stderr.strip()[-200:]}")
    release = pkg.removeprefix("linux-image-")
    root = _bench_dir() / f"kernel-{release}"
    vmlinuz = root / "boot" / f"vmlinuz-{release}"

    def make(stage: Path) -> None:
        with tempfile.TemporaryDirectory(prefix=".kernel-", dir=_bench_dir()) as tmp:
            # apt-get download as root warns that _apt cannot write here: harmless.
            run(["apt-get", "download", "-q", pkg], cwd=Path(tmp), timeout=600, what=f"bench: downloading {pkg}")
            deb = next(Path(tmp).glob("*.deb"))
            run(["dpkg-deb", "-x", str(deb), str(stage)], timeout=300, what=f"bench: unpacking {deb.name}")

    publish(root, make, what=f"generic kernel {release}", exists=lambda _r: vmlinuz.is_file())
    return vmlinuz, release


def virtme_ng() -> Path:
    """``vng`` from PyPI in its own venv under the cache (not a project dependency)."""
    venv = _bench_dir() / f"vng-{VNG_VERSION}"
    vng, done = venv / "bin" / "vng", venv.with_name(venv.name + ".complete")
    missing = [f"{tool} (apt-get install {pkg})" for tool, pkg in VNG_HOST_TOOLS.items() if shutil.which(tool) is None]
    if missing:
        raise CapabilityMissing("virtme-ng", f"vng needs {', '.join(missing)} on the host")

    def make(tmp: Path) -> None:
        # A venv's scripts name their interpreter by absolute path, so it is built in place (under
        # the marker's lock) and the marker is published last: an interrupted install is redone.
        shutil.rmtree(venv, ignore_errors=True)
        what = f"bench: installing virtme-ng {VNG_VERSION} into {venv}"
        run([sys.executable, "-m", "venv", str(venv)], timeout=120, what=what)
        run([str(venv / "bin" / "pip"), "install", "-q", f"virtme-ng=={VNG_VERSION}"], timeout=600, what=what)
        write_atomic(tmp, VNG_VERSION)

    publish(done, make, what=f"virtme-ng {VNG_VERSION}")
    return vng


def _timed_output(argv: list[str], expect: str, env: dict[str, str] | None = None) -> float:
    """Seconds for *argv*; it must print *expect* as a line of its own (its exit status is not
    trusted: see vng below)."""
    started = time.monotonic()
    proc = subprocess.run(argv, capture_output=True, timeout=RUN_TIMEOUT, stdin=subprocess.DEVNULL, cwd=SCENARIO_ROOT,
                          env=env)
    elapsed = time.monotonic() - started
    out = (proc.stdout + b"\n" + proc.stderr).decode(errors="replace")  # vng -v shows the console on stderr
    if expect not in (line.strip() for line in out.splitlines()):
        raise HarnessError(f"bench: {' '.join(argv[:6])}... exited {proc.returncode} without printing {expect!r}: "
                           f"{(proc.stderr + proc.stdout).decode(errors='replace').strip()[-300:]}")
    return elapsed


@benchmark("virtme-ng")
def bench_virtme_ng(runs: int) -> dict[str, Any]:
    """`vng --run KERNEL -- uname -r` vs `nestbed run tiny-x86_64 --kernel KERNEL -- uname -r`, TCG both."""
    kernel, release = generic_kernel()
    vng = virtme_ng()
    env = {**os.environ, "PATH": f"{vng.parent}:{os.environ.get('PATH', '')}"}  # vng runs virtme-run from PATH
    # no_timer_check on both sides (nestbed passes it to every guest): on a loaded host the generic
    # kernel's IO-APIC timer check can panic a TCG guest.
    # -v: with this kernel vng falls back to running the command on the console (below), whose
    # output it shows only when verbose or on a terminal; the guest prints the same either way.
    vng_argv = [str(vng), "-v", "--disable-kvm", "--force-9p", "--append", "no_timer_check", "--run", str(kernel),
                "--", "uname", "-r"]
    ours = [sys.executable, "-m", "harness", "run", "--accel", "tcg", "tiny-x86_64", "--kernel", str(kernel),
            "--", "uname", "-r"]
    images.build("tiny-x86_64")
    a, b = _side_by_side(lambda: _timed_output(vng_argv, release, env), lambda: _timed_output(ours, release),
                         runs)
    result = _ratio("vng", a, "nestbed_run", b, 0.5)
    result["what"] = (f"boot Debian's generic kernel {release} and run `uname -r`, whole process: virtme-ng "
                      f"{VNG_VERSION} (`vng --disable-kvm --force-9p --run`, host root over 9p) vs `nestbed run "
                      "tiny-x86_64 --kernel` (busybox initramfs; nestbed boots the bzImage's PVH ELF, decompressed "
                      "once and cached: harness/vm/vmlinux.py); vng's exit status is 255 with this kernel "
                      "(virtio_console is a module, so its status channel is missing: 'console fallback'): success "
                      "= the release printed on a line of its own; vng runs with -v to show it")
    return result


def select(only: list[str] | None, *, slow: bool = False) -> list[str]:
    """The benchmarks to run: those named (any, slow or not), else every one that is not slow
    (with *slow*: every one)."""
    names = only or [n for n in BENCHMARKS if slow or n not in SLOW]
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        raise UsageError(f"bench: unknown benchmark(s) {', '.join(unknown)} (known: {', '.join(BENCHMARKS)})")
    return names


def run_all(runs: int = 7, only: list[str] | None = None, slow: bool = False) -> dict[str, Any]:
    if runs < 5:
        raise UsageError(f"bench: --runs {runs}: at least 5 runs are needed for a median worth reporting")
    names = select(only, slow=slow)
    from harness.hosts.probe import host_facts

    facts = host_facts()
    results: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"hostname": platform.node(), "cpu": facts["cpu"]["model"], "cores": facts["cpu"]["cpus"],
                    "kernel": facts["kernel"], "qemu": facts["qemu"]["x86_64"]},
        "runs": runs, "benchmarks": {},
    }
    for name in names:
        print(f"nestbed: bench {name} ({runs} runs)", file=sys.stderr, flush=True)
        results["benchmarks"][name] = BENCHMARKS[name](runs)
    return results


def _headline(name: str, r: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(measurement, median, comparison, target) rows for one benchmark."""
    met = "met" if r.get("meets_target") else "missed"
    if "hops" in r:  # measure_hops: one comparison per hop
        return [(f"{name}: {h['from']} -> {h['hop']}", f"{h['nestbed']['median']:.2f} s",
                 f"bare {h['bare']['median']:.2f} s, ratio {h['ratio'] or 0:.3f}; verify {h['verify']['median']:.2f} s",
                 f"<= {r['target']} ({'met' if h['meets_target'] else 'missed'})") for h in r["hops"]]
    if "meets_targets" in r:  # warm-start: cold vs warm per measurement
        rows = []
        for key, t in r["targets"].items():
            pair = r[key]
            rows.append((f"{name}: {key} cold boot", f"{pair['cold_boot']['median']:.2f} s", "", ""))
            if "bare_qemu_cold" in pair:
                rows.append((f"{name}: {key} bare QEMU cold boot", f"{pair['bare_qemu_cold']['median']:.2f} s", "", ""))
            rows.append((f"{name}: {key} warm start", f"{pair['warm_start']['median']:.2f} s",
                         f"ratio {pair['ratio']:.3f} of cold", f"<= {t} s ({'met' if r['meets_targets'][key] else 'missed'})"))
        return rows
    if "ratio" in r:
        keys = [k for k in r if isinstance(r[k], dict) and "median" in r[k]]
        a, b = keys[0], keys[1]
        target = f"<= {r['target']} ({met})" if "target" in r else \
            f"<= {r['target_seconds']} s ({met})" if "target_seconds" in r else ""
        rows = [(f"{name}: {a}", f"{r[a]['median']:.2f} s", "", ""),
                (f"{name}: {b}", f"{r[b]['median']:.2f} s", f"ratio {r['ratio']:.3f}", target)]
        # Further figures (e.g. the phases of a reset) as detail rows.
        rows += [(f"{name}: {k}", f"{r[k]['median']:.2f} s", f"min {r[k]['min']:.2f} / max {r[k]['max']:.2f}", "")
                 for k in keys[2:]]
        return rows
    rows = []
    targets = r.get("targets", {})
    for key, val in r.items():
        if isinstance(val, dict) and "median" in val:
            tgt = targets.get(key) or (r.get("target_ssh_ready") if key == "ssh_ready" else None)
            rows.append((f"{name}: {key}", f"{val['median']:.2f} s", f"min {val['min']:.2f} / max {val['max']:.2f}",
                         f"<= {tgt} s ({'met' if val['median'] <= tgt else 'missed'})" if tgt else ""))
    return rows


def render_text(results: dict[str, Any]) -> str:
    m = results["machine"]
    lines = [f"{results['date']}  {m['hostname']}  {m['cpu']} x{m['cores']}  kernel {m['kernel']}  "
             f"QEMU {m['qemu']}  runs {results['runs']}"]
    for name, r in results["benchmarks"].items():
        for row in _headline(name, r):
            lines.append("  " + "  ".join(f"{c:<14}" if i else f"{c:<44}" for i, c in enumerate(row)).rstrip())
    return "\n".join(lines)


def render_markdown(results: dict[str, Any]) -> str:
    m = results["machine"]
    out = [BEGIN, f"### Run of {results['date']}", "",
           f"Machine: `{m['hostname']}`, {m['cpu']}, {m['cores']} cores, kernel {m['kernel']}, QEMU {m['qemu']}; "
           f"{results['runs']} timed runs per side after one warm-up, interleaved; medians.", "",
           "| measurement | median | comparison | target |", "| --- | --- | --- | --- |"]
    for name, r in results["benchmarks"].items():
        out += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in _headline(name, r)]
    out += ["", "What each measures:", ""]
    out += [f"- `{name}`: {r.get('what', '')}" for name, r in results["benchmarks"].items()]
    out.append(END)
    return "\n".join(out) + "\n"


def write_markdown(path: Path, results: dict[str, Any]) -> None:
    block = render_markdown(results)
    if path.is_file() and BEGIN in (text := path.read_text()) and END in text:
        head, rest = text.split(BEGIN, 1)
        _, tail = rest.split(END, 1)
        write_atomic(path, head + block + tail.lstrip("\n"))
        return
    header = ("# Benchmarks\n\nProduced by `nestbed bench --write BENCHMARKS.md` (`make bench`). Each comparison runs "
              "its two sides interleaved after one warm-up each, on the same machine in one run; figures are "
              "medians; a ratio is the second side's median over the first's.\n\n")
    existing = path.read_text() if path.is_file() else ""
    write_atomic(path, (existing or header) + "\n" + block)
