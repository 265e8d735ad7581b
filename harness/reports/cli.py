"""``nestbed report`` (run the scenarios, write a report), ``report merge``, ``report diff`` and ``nestbed matrix``.

Kept out of :mod:`harness.cli` so that file only wires the subcommands in (:func:`add_parsers`).
Exit statuses follow the CLI's: 0 all good; 1 a cell failed (``report``) or a regression
(``report diff``); 125 nestbed itself failed or bad input (one line ``nestbed: error: ...``).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from harness.core import paths
from harness.core.progress import PROGRESS_FILE, Event
from harness.core.run import run
from harness.errors import HarnessError, UsageError, headline
from harness.reports import matrix as mx
from harness.reports import model as rp
from harness.reports import render as report_render

SCENARIOS = paths.builtin_dir("scenarios")  # the checkout's scenarios/, or those bundled in the package
DEFAULT_MATRIX = SCENARIOS / "matrix.toml"
DEFAULT_REPORTS = Path("reports")  # under the working directory
DEFAULT_MAX_TIME = 6 * 3600.0     # a whole nightly shard; pytest-timeout bounds each test on its own
STOP_GRACE = 120.0                # after SIGINT pytest still shuts guests down and writes the report
COLLECT_TIMEOUT = 300.0


def add_parsers(sub: Any, parser_class: type[argparse.ArgumentParser]) -> None:
    """Add ``report`` (with ``merge``, ``diff``) and ``matrix`` to the CLI's subparsers."""
    p = sub.add_parser("report", help="run the scenario matrix in parallel and write a report (or merge/diff reports)",
                       usage="nestbed report [--tier T] [--shard I/N] [-n auto|N] [--out DIR] [--host KIND] "
                             "[-- PYTEST-ARGS...]\n"
                             "       nestbed report merge DIR... -o DIR\n       nestbed report diff OLD NEW")
    p.add_argument("--tier", help="matrix tier: smoke (default; with --host: the host kind's tier), nightly, full")
    p.add_argument("--shard", metavar="I/N", help="run only shard I of N (CI jobs)")
    p.add_argument("-n", "--numprocesses", default="auto", metavar="auto|N",
                   help="pytest-xdist workers (default auto; 0 runs in one process)")
    p.add_argument("--out", metavar="DIR", help="report directory (default ./reports/<UTC timestamp>-<host>)")
    p.add_argument("--matrix", metavar="FILE",
                   help="matrix file (default: matrix.toml of the scenario directory, else nestbed's built-in one)")
    p.add_argument("--scenarios", metavar="DIR",
                   help="scenario directory: your own test modules (default: nestbed's built-in scenarios)")
    p.add_argument("--host", metavar="KIND", default="",
                   help="run on a host kind of the matrix ([hosts.KIND], e.g. kvm-l1: nestbed inside an L1) "
                        "instead of this machine; its report comes back to --out, labelled with its host kind")
    p.add_argument("--max-time", type=float, default=DEFAULT_MAX_TIME, metavar="S",
                   help=f"stop the run after S seconds (default {DEFAULT_MAX_TIME:.0f})")
    p.set_defaults(command=None, func=cmd_report, report_command=None)
    rsub = p.add_subparsers(dest="report_command", parser_class=parser_class, metavar="{merge,diff}")
    mp = rsub.add_parser("merge", help="merge reports of many hosts (or shards) into one fleet grid")
    mp.add_argument("reports", nargs="+", metavar="DIR", help="report directories (or report.json/fleet.json files)")
    mp.add_argument("-o", "--output", required=True, metavar="DIR", help="where fleet.json, index.html, summary.md go")
    mp.add_argument("--skip-missing", action="store_true",
                    help="warn about and skip a DIR without a report (a CI shard that crashed) instead of failing")
    mp.set_defaults(func=cmd_report_merge, command="absent")
    dp = rsub.add_parser("diff", help="outcome changes from OLD to NEW; exit 1 on a regression")
    dp.add_argument("old", metavar="OLD")
    dp.add_argument("new", metavar="NEW")
    dp.add_argument("--json", action="store_true")
    dp.set_defaults(func=cmd_report_diff, command="absent")

    m = sub.add_parser("matrix", help="a matrix tier's shards (json: with their cells; github: a strategy.matrix)")
    m.add_argument("--tier", required=True)
    m.add_argument("--format", choices=["json", "github"], default="json")
    m.add_argument("--shards", type=int, metavar="N", help="shard count (default: the tier's `shards`)")
    m.add_argument("--matrix", metavar="FILE", help="matrix file (default: nestbed's built-in one)")
    m.set_defaults(func=cmd_matrix)


# --- nestbed matrix ------------------------------------------------------------------------

def collect_cells(matrix_path: Path, tier: str) -> dict[str, Any]:
    """The tier's cells as the scenarios' collection hook selects them (``pytest --collect-only``)."""
    with tempfile.TemporaryDirectory(prefix="nestbed-matrix-") as tmp:
        listing = Path(tmp) / "cells.json"
        argv = [sys.executable, "-m", "pytest", str(SCENARIOS), "--rootdir", str(SCENARIOS.parent), "--collect-only", "-q",
                "-p", "no:cacheprovider", "--nestbed-matrix", str(matrix_path), "--nestbed-tier", tier,
                "--nestbed-list-cells", str(listing)]
        proc = run(argv, cwd=SCENARIOS.parent, timeout=COLLECT_TIMEOUT, what="matrix: collecting the scenarios",
                   check=False)
        if not listing.is_file():
            errors = [ln for ln in (proc.stderr + proc.stdout).splitlines() if "rror" in ln] or ["no output"]
            raise HarnessError(f"matrix: collecting the scenarios failed (pytest exit {proc.returncode}): {errors[0]}")
        data: dict[str, Any] = json.loads(listing.read_text())
        return data


def cmd_matrix(args: argparse.Namespace) -> int:
    path = Path(args.matrix) if args.matrix else DEFAULT_MATRIX
    matrix = mx.load_matrix(path)
    gh = mx.github_matrix(matrix, args.tier, args.shards)
    if args.format == "github":
        print(json.dumps(gh, separators=(",", ":")))
        return 0
    listing = collect_cells(path, args.tier)
    cells = [mx.Cell(c["nodeid"], c["params"], frozenset(c["markers"]), c["group"]) for c in listing["cells"]]
    n = sum(1 for e in gh["include"] if not e.get("host"))  # the other host kinds' jobs run their own tiers
    coords = {c["nodeid"]: c["coords"] for c in listing["cells"]}
    shards = mx.shard(cells, n)
    print(json.dumps({
        "matrix": str(path), "tier": args.tier, "shard_count": n, "cells": len(cells),
        "shards": [{"shard": f"{i}/{n}", "cells": [{"nodeid": c.nodeid, "coords": coords[c.nodeid]} for c in part]}
                   for i, part in enumerate(shards, 1)],
        "excluded": listing["excluded"], "github": gh}, indent=2))
    return 0


# --- nestbed report ------------------------------------------------------------------------

def scenario_dir(args: argparse.Namespace) -> Path:
    """The scenario directory a report runs: ``--scenarios DIR`` (checked) or the built-in one."""
    given = getattr(args, "scenarios", None)
    if not given:
        return SCENARIOS
    path = Path(given).expanduser().resolve()
    if not path.is_dir():
        raise UsageError(f"report: --scenarios {given}: {'not a directory' if path.exists() else 'does not exist'}")
    return path


def matrix_file(args: argparse.Namespace, scenarios: Path) -> Path:
    """``--matrix FILE``, else the scenario directory's own matrix.toml, else the built-in matrix."""
    if getattr(args, "matrix", None):
        return Path(args.matrix).resolve()
    return mx.matrix_for(scenarios)


def pytest_argv(args: argparse.Namespace, out: Path, matrix_path: Path, extra: list[str]) -> list[str]:
    """The pytest command line a report run uses (pure: tested)."""
    where = scenario_dir(args)
    scenarios = str(where)
    # Node ids relative to the scenario directory's parent ("scenarios/test_boot.py::..."), whatever
    # paths the other arguments name: pytest would otherwise root them at their common ancestor.
    rootdir = where.parent
    argv = [sys.executable, "-m", "pytest", scenarios, "-v", "-p", "no:cacheprovider", "--rootdir", str(rootdir),
            "--junitxml", str(out / "junit.xml"), "--nestbed-report", str(out),
            "--nestbed-log-dir", str(out / "logs"), "--nestbed-matrix", str(matrix_path),
            "--nestbed-tier", args.tier]
    if args.shard:
        argv += ["--nestbed-shard", args.shard]
    if str(args.numprocesses) != "0":
        # loadscope: a module's tests (sharing a module-scoped L1) stay on one worker.
        argv += ["-n", str(args.numprocesses), "--dist", "loadscope"]
    return argv + extra


def _check_numprocesses(value: str) -> None:
    if value != "auto" and not (value.isdigit()):
        raise UsageError(f"report: -n {value!r}: expected auto or a number")


class _ProgressTail:
    """Follows DIR/progress.jsonl (written by the plugin in pytest's controller) into a CellProgress."""

    def __init__(self, path: Path, bar: Any) -> None:
        self.path, self.bar, self.offset, self.partial = path, bar, 0, ""
        self.report: str | None = None

    def poll(self) -> None:
        try:
            with open(self.path) as f:
                f.seek(self.offset)
                chunk = f.read()
                self.offset = f.tell()
        except OSError:
            return
        data = self.partial + chunk
        lines = data.split("\n")
        self.partial = lines.pop()
        for line in lines:
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            kind = ev.get("event")
            if kind == Event.TOTAL:
                self.bar.set_total(int(ev["n"]))
            elif kind == Event.START:
                self.bar.started(ev["nodeid"])
            elif kind == Event.DONE:
                self.bar.finished(ev["nodeid"], ev["outcome"], ev.get("seconds"))
            elif kind == Event.END:
                self.report = ev.get("report")


def _stop(proc: subprocess.Popen[bytes], *, already_signalled: bool = False) -> None:
    """SIGINT first: pytest then finishes its teardowns (guests shut down) and still writes the report.

    After a Ctrl-C on the terminal pytest got the SIGINT itself: a second one would cut its teardown
    short, so then we only wait (and kill if it does not finish in time).
    """
    if proc.poll() is not None:
        return
    if already_signalled:
        try:
            proc.wait(timeout=STOP_GRACE)
            return
        except subprocess.TimeoutExpired:
            pass
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=STOP_GRACE)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=30)


def host_kind_argv(args: argparse.Namespace, host: mx.HostKind, out: Path) -> list[str]:
    """The ``nestbed in-l1 ... -- report ...`` command line that runs *host*'s tier there (pure: tested).

    ``nestbed in-l1`` (:mod:`harness.tools.selfhost`) brings the report directory back out to *out*
    and labels its host kind; the run inside uses the matrix and scenarios its wheel carries.
    """
    inner = ["report", "--tier", args.tier or host.tier, "--out", str(out), "--max-time", str(args.max_time)]
    if args.shard:
        inner += ["--shard", args.shard]
    if str(args.numprocesses) != "auto":
        inner += ["-n", str(args.numprocesses)]
    extra = list(args.command or [])
    return [sys.executable, "-m", "harness", "in-l1", *mx.in_l1_args(host), "--", *inner,
            *(["--", *extra] if extra else [])]


def cmd_report_on_host(args: argparse.Namespace, matrix: mx.Matrix) -> int:
    """``nestbed report --host KIND``: the host kind's tier, run where that kind is (``nestbed in-l1``)."""
    if args.host not in matrix.hosts:
        raise UsageError(f"report: --host {args.host!r}: no [hosts.{args.host}] in {matrix.path} "
                         f"(host kinds: {', '.join(matrix.hosts) or 'none'})")
    if getattr(args, "matrix", None) or getattr(args, "scenarios", None):
        raise UsageError("report: --host runs the scenarios and matrix that nestbed's wheel carries into the "
                         "host; --matrix and --scenarios are not carried")
    host = matrix.hosts[args.host]
    matrix.tier(args.tier or host.tier)
    out = Path(args.out).resolve() if args.out else rp.default_report_dir(DEFAULT_REPORTS, host=f"host-{host.name}")
    if (out / "report.json").exists():
        raise UsageError(f"report: {out} already holds a report (choose another --out)")
    print(f"nestbed: report {args.tier or host.tier} on host kind {host.name} ({host.label}) -> {out}",
          file=sys.stderr)
    # Not captured: the inner run's progress lines (the install, each cell) reach a CI log as they happen.
    limit = host.timeout + 3600.0
    try:
        done = subprocess.run(host_kind_argv(args, host, out), stdin=subprocess.DEVNULL, timeout=limit, check=False)
    except subprocess.TimeoutExpired:
        raise HarnessError(f"report on host kind {host.name}: did not finish within {limit:g} s") from None
    return done.returncode


def cmd_report(args: argparse.Namespace) -> int:
    from harness.core.progress import CellProgress

    _check_numprocesses(str(args.numprocesses))
    scenarios = scenario_dir(args)
    matrix_path = matrix_file(args, scenarios)
    matrix = mx.load_matrix(matrix_path)  # a bad matrix or tier fails here, in one line, before any boot
    if getattr(args, "host", ""):
        return cmd_report_on_host(args, matrix)
    args.tier = args.tier or "smoke"
    matrix.tier(args.tier)
    if args.shard:
        mx.parse_shard(args.shard)
    out = Path(args.out).resolve() if args.out else rp.default_report_dir(DEFAULT_REPORTS)
    if (out / "report.json").exists():
        raise UsageError(f"report: {out} already holds a report (choose another --out)")
    out.mkdir(parents=True, exist_ok=True)
    argv = pytest_argv(args, out, matrix_path, list(args.command or []))
    started = time.monotonic()
    title = f"{args.tier}" + (f" shard {args.shard}" if args.shard else "")
    print(f"nestbed: report {title} -> {out} (pytest output: {out / 'pytest.log'})", file=sys.stderr)
    interrupted = False
    with open(out / "pytest.log", "wb") as log, CellProgress(title) as bar:
        tail = _ProgressTail(out / PROGRESS_FILE, bar)
        # Same process group: Ctrl-C on the terminal reaches pytest too, which winds down cleanly.
        proc = subprocess.Popen(argv, cwd=scenarios.parent, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            while proc.poll() is None:
                tail.poll()
                if time.monotonic() - started > args.max_time:
                    _stop(proc)
                    raise HarnessError(f"report: stopped after --max-time {args.max_time:.0f} s "
                                       f"(partial report in {out})")
                time.sleep(0.5)
            tail.poll()
        except KeyboardInterrupt:
            _stop(proc, already_signalled=True)
            tail.poll()
            interrupted = True
        except BaseException:
            _stop(proc)
            tail.poll()
            raise
    rc = proc.returncode
    if interrupted and not (out / "report.json").is_file():
        raise KeyboardInterrupt
    report_json = out / "report.json"
    if not report_json.is_file():
        text = (out / "pytest.log").read_text(errors="replace")
        errors = [ln for ln in text.splitlines() if ln.startswith(("ERROR", "E  ")) or "Error" in ln]
        raise HarnessError(f"report: pytest exited {rc} without a report: "
                           f"{(errors or text.strip().splitlines()[-1:] or ['no output'])[0].strip()} "
                           f"(see {out / 'pytest.log'})")
    doc = rp.load(report_json)
    _print_outcome(doc, out, time.monotonic() - started)
    if interrupted or rc == 2 or doc["run"].get("interrupted"):
        return 130
    if doc["summary"]["fail"] or doc["summary"]["error"] or rc == 1:
        return 1
    return 0 if rc in (0, 5) else 125


def _print_outcome(doc: dict[str, Any], out: Path, wall: float) -> None:
    s = doc["summary"]
    counts = ", ".join(f"{s[o]} {o}" for o in rp.OUTCOMES if s.get(o)) or "no cells"
    print(f"nestbed: {s['total']} cells: {counts} in {wall:.0f} s")
    for c in doc["cells"]:
        if c["outcome"] in rp.BAD:
            logs = " ".join(str(out / p) if not os.path.isabs(p) else p for p in c["artifacts"]["serial_logs"])
            reason = headline(str(c.get("reason") or ""))[:160]
            print(f"  {c['outcome'].upper():5} {c['nodeid']}: {reason}" + (f"\n        serial: {logs}" if logs else ""))
    print(f"nestbed: report: {out / 'index.html'}")


def cmd_report_merge(args: argparse.Namespace) -> int:
    docs = []
    for path in args.reports:
        try:
            docs.append(rp.load(path))
        except rp.ReportError as exc:
            if not args.skip_missing:
                raise
            print(f"nestbed: warning: skipped: {exc}", file=sys.stderr)
    if not docs:
        raise rp.ReportError("merge: no readable report among " + " ".join(args.reports))
    fleet = rp.merge(docs)
    paths = report_render.write_fleet(fleet, Path(args.output))
    s = fleet["summary"]
    print(f"nestbed: merged {len(docs)} report(s): {len(fleet['hosts'])} host kind(s), {s['total']} cells "
          f"({s['fail'] + s['error']} failing)")
    print(f"nestbed: fleet: {paths['html']}")
    return 0


def cmd_report_diff(args: argparse.Namespace) -> int:
    d = rp.diff(rp.load(args.old), rp.load(args.new))
    if args.json:
        from dataclasses import asdict

        print(json.dumps(asdict(d), indent=2))
    else:
        print(rp.render_diff(d))
    return 1 if d.regressions else 0
