"""``nestbed bench``: side-by-side measurements, medians, ratios, BENCHMARKS.md.

Every comparison interleaves its two sides (A, B, A, B, ...) after one untimed warm-up
of each, so the noise of a shared machine hits both; results are medians of at least
five runs.  Benchmarks are a registry: ``@benchmark("name")``.
"""

from __future__ import annotations

import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from harness import images
from harness.errors import HarnessError, UsageError
from harness.recipes import REPO_ROOT

RUN_TIMEOUT = 900.0
BEGIN, END = "<!-- nestbed-bench:begin -->", "<!-- nestbed-bench:end -->"

Bench = Callable[[int], dict[str, Any]]
BENCHMARKS: dict[str, Bench] = {}


def benchmark(name: str) -> Callable[[Bench], Bench]:
    def register(fn: Bench) -> Bench:
        BENCHMARKS[name] = fn
        return fn
    return register


def _stats(samples: list[float]) -> dict[str, Any]:
    return {"samples": [round(s, 3) for s in samples], "median": round(statistics.median(samples), 3),
            "min": round(min(samples), 3), "max": round(max(samples), 3)}


def _timed(argv: list[str]) -> float:
    started = time.monotonic()
    proc = subprocess.run(argv, capture_output=True, timeout=RUN_TIMEOUT, stdin=subprocess.DEVNULL, cwd=REPO_ROOT)
    elapsed = time.monotonic() - started
    if proc.returncode != 0:
        raise HarnessError(f"bench: {' '.join(argv[:6])}... exited {proc.returncode}: "
                           f"{proc.stderr.decode(errors='replace').strip()[-300:]}")
    return elapsed


def _side_by_side(a: Callable[[], float], b: Callable[[], float], runs: int) -> tuple[list[float], list[float]]:
    a(), b()  # warm-up: page cache, first-run costs
    xs, ys = [], []
    for _ in range(runs):
        xs.append(a())
        ys.append(b())
    return xs, ys


def _ratio(name_a: str, a: list[float], name_b: str, b: list[float], target: float | None) -> dict[str, Any]:
    sa, sb = _stats(a), _stats(b)
    ratio = round(sb["median"] / sa["median"], 3)
    out = {name_a: sa, name_b: sb, "ratio": ratio, "ratio_of": f"{name_b}/{name_a}"}
    if target is not None:
        out.update(target=target, meets_target=ratio <= target)
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
    harness = [sys.executable, "-m", "harness", "run", "--accel", "tcg", f"tiny-{arch}", "--", "true"]
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
    from harness.spec import Accel

    images.build("debian-x86_64")
    ready, ssh, lag = [], [], []
    for i in range(runs + 1):
        started = time.monotonic()
        with boot("debian-x86_64", via="ssh", options=BootOptions(accel=Accel.TCG, vcpus=2)) as g:
            if i == 0:
                continue  # warm-up
            ssh.append(time.monotonic() - started)
            ready.append(g.ready_seconds or 0.0)
            lag.append(g.ready_lag or 0.0)
    return {"what": "debian-x86_64, 2 vCPUs, TCG: launch -> ready marker seen; launch -> SSH authenticated; "
                    "marker bytes arrived -> harness noticed",
            "ready_marker": _stats(ready), "ssh_ready": _stats(ssh), "detection_lag": _stats(lag),
            "target_ssh_ready": 8.0, "meets_target": statistics.median(ssh) <= 8.0}


@benchmark("nested-level-2")
def bench_nested(runs: int) -> dict[str, Any]:
    """L1 ready, L2 (debian-x86_64 under L1's KVM) SSH-ready after L1, and the whole level-2 run."""
    from harness.nested import boot_l1

    l1_ready, l2_ready, whole = [], [], []
    for i in range(runs + 1):
        started = time.monotonic()
        with boot_l1(["debian-x86_64"]) as l1:
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


def run_all(runs: int = 7, only: list[str] | None = None) -> dict[str, Any]:
    if runs < 5:
        raise UsageError(f"bench: --runs {runs}: at least 5 runs are needed for a median worth reporting")
    names = only or list(BENCHMARKS)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        raise UsageError(f"bench: unknown benchmark(s) {', '.join(unknown)} (known: {', '.join(BENCHMARKS)})")
    from harness.probe import host_facts

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
    if "ratio" in r:
        keys = [k for k in r if isinstance(r[k], dict) and "median" in r[k]]
        a, b = keys[0], keys[1]
        met = "met" if r.get("meets_target") else "missed"
        return [(f"{name}: {a}", f"{r[a]['median']:.2f} s", "", ""),
                (f"{name}: {b}", f"{r[b]['median']:.2f} s", f"ratio {r['ratio']:.3f}",
                 f"<= {r['target']} ({met})" if "target" in r else "")]
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
        path.write_text(head + block + tail.lstrip("\n"))
        return
    header = ("# Benchmarks\n\nProduced by `nestbed bench --write BENCHMARKS.md` (`make bench`). Each comparison runs "
              "its two sides interleaved after one warm-up each, on the same machine in one run; figures are "
              "medians; a ratio is the second side's median over the first's.\n\n")
    existing = path.read_text() if path.is_file() else ""
    path.write_text((existing or header) + "\n" + block)
