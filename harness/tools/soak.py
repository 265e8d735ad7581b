"""Soak runs: repeat a scenario tier and count flakes.

``nestbed soak --runs N --tier smoke`` runs ``python -m pytest scenarios --nestbed-tier smoke`` N
times (a tier of the matrix selects as ``nestbed report --tier`` does; any other ``--tier`` is a
marker expression, ``-m``), each with its own JUnit XML file, then tallies every test case over the runs:

* **flaky**: passed in some runs and failed (or errored) in others;
* **broken**: failed in every run it ran in (not a flake, but the soak is not green);
* a run that produced no JUnit file (pytest crashed, was killed, timed out) is a
  **run error**.

The pure part (:func:`parse_junit`, :func:`tally`, :func:`render`) reads files only,
so it is unit-tested on synthetic JUnit files.
"""

from __future__ import annotations

import enum
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from harness.core import paths
from harness.errors import UsageError

RUN_TIMEOUT = 3600.0  # one pass of a tier; the smoke tier takes minutes
PYTEST_EXIT = {2: "interrupted", 3: "internal error", 4: "usage error", 5: "no tests collected: is --tier a marker?"}


class Outcome(enum.StrEnum):
    PASSED = "passed"
    FAILED = "failed"
    ERROR = "error"
    SKIPPED = "skipped"


def parse_junit(path: Path) -> dict[str, Outcome]:
    """Test id (``classname::name``) → outcome, from one JUnit XML file (pytest's flavour).

    UsageError if the file is not JUnit XML, so a truncated file from a killed run is
    reported, not mistaken for "no tests".
    """
    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError) as exc:
        raise UsageError(f"{path}: not a readable JUnit XML file: {exc}") from None
    if root.tag not in ("testsuites", "testsuite"):
        raise UsageError(f"{path}: not a JUnit XML file (root element <{root.tag}>)")
    results: dict[str, Outcome] = {}
    for case in root.iter("testcase"):
        test_id = f"{case.get('classname', '')}::{case.get('name', '')}"
        tags = {child.tag for child in case}
        if "error" in tags:
            # pytest reports a teardown error as a second <error> on a passed case: still not a pass.
            outcome = Outcome.ERROR
        elif "failure" in tags:
            outcome = Outcome.FAILED
        elif "skipped" in tags:
            outcome = Outcome.SKIPPED
        else:
            outcome = Outcome.PASSED
        # The same id twice in one file (e.g. call failed + teardown error): the worse one counts.
        if results.get(test_id) in (Outcome.FAILED, Outcome.ERROR) and outcome is Outcome.PASSED:
            continue
        results[test_id] = outcome
    return results


@dataclass
class TestTally:
    """One test's outcomes over the runs."""

    passed: int = 0
    failed: int = 0  # failures and errors
    skipped: int = 0
    failed_runs: list[int] = field(default_factory=list)

    @property
    def flaky(self) -> bool:
        return self.passed > 0 and self.failed > 0

    @property
    def broken(self) -> bool:
        return self.failed > 0 and self.passed == 0


@dataclass
class SoakReport:
    runs: int
    tests: dict[str, TestTally]
    run_errors: dict[int, str] = field(default_factory=dict)  # run number -> why it has no results
    seconds: list[float] = field(default_factory=list)

    @property
    def flakes(self) -> dict[str, TestTally]:
        return {t: c for t, c in sorted(self.tests.items()) if c.flaky}

    @property
    def broken(self) -> dict[str, TestTally]:
        return {t: c for t, c in sorted(self.tests.items()) if c.broken}

    @property
    def green(self) -> bool:
        return not self.flakes and not self.broken and not self.run_errors


def tally(results: Sequence[dict[str, Outcome] | None], run_errors: dict[int, str] | None = None) -> SoakReport:
    """Combine per-run results (None: the run produced none) into a :class:`SoakReport`."""
    tests: dict[str, TestTally] = {}
    errors = dict(run_errors or {})
    for run, outcomes in enumerate(results, start=1):
        if outcomes is None:
            errors.setdefault(run, "no results")
            continue
        for test_id, outcome in outcomes.items():
            t = tests.setdefault(test_id, TestTally())
            if outcome is Outcome.PASSED:
                t.passed += 1
            elif outcome is Outcome.SKIPPED:
                t.skipped += 1
            else:
                t.failed += 1
                t.failed_runs.append(run)
    return SoakReport(runs=len(results), tests=tests, run_errors=errors)


def render(report: SoakReport) -> str:
    """A plain-text summary: one line per flaky or broken test, then the verdict."""
    lines = [f"soak: {report.runs} run(s), {len(report.tests)} test(s)"
             + (f", {sum(report.seconds):.0f} s in all" if report.seconds else "")]
    for run, why in sorted(report.run_errors.items()):
        lines.append(f"  run {run}: no results: {why}")
    for test_id, t in report.flakes.items():
        lines.append(f"  FLAKY   {test_id}: passed {t.passed}, failed {t.failed} "
                     f"(runs {', '.join(map(str, t.failed_runs))})")
    for test_id, t in report.broken.items():
        lines.append(f"  BROKEN  {test_id}: failed in all {t.failed} run(s) it ran in")
    lines.append(f"flakes: {len(report.flakes)}  broken: {len(report.broken)}  run errors: {len(report.run_errors)}")
    return "\n".join(lines)


def selection(tier: str, where: Path) -> list[str]:
    """The pytest arguments that select *tier* in the scenario directory *where*.

    A tier (or host kind) of its matrix (its own ``matrix.toml``, else nestbed's) selects the way
    ``nestbed report --tier`` does: the tier's markers, its ``[[include]]``/``[[exclude]]`` rules and its
    strictness (``nightly`` has the nested cells it includes by level, whatever their markers).  Anything
    else is a marker expression (``-m``), as before.
    """
    from harness.reports.matrix import load_matrix, matrix_for

    matrix_path = matrix_for(where)
    if matrix_path.is_file():
        matrix = load_matrix(matrix_path)
        if tier in matrix.tiers or tier in matrix.hosts:
            return ["--nestbed-matrix", str(matrix_path), "--nestbed-tier", tier]
    return ["-m", tier]


def pytest_argv(tier: str, junit: Path, extra: list[str] | None = None,
                scenarios: Path | None = None) -> list[str]:
    """The command line of one soak run (the built-in scenarios unless *scenarios* names others)."""
    where = scenarios or paths.builtin_dir("scenarios")
    return [sys.executable, "-m", "pytest", str(where), "--rootdir", str(where.parent), *selection(tier, where),
            f"--junitxml={junit}", "-p", "no:cacheprovider", "-q", *(extra or [])]


def run_soak(runs: int, *, tier: str = "smoke", out_dir: Path, timeout: float = RUN_TIMEOUT,
             extra: list[str] | None = None, say: Callable[[str], None] | None = None,
             scenarios: Path | None = None) -> SoakReport:
    """Run the tier *runs* times (each bounded by *timeout*) and tally the results."""
    if runs < 1:
        raise UsageError(f"soak: --runs must be at least 1, not {runs}")
    if scenarios is not None and not scenarios.is_dir():
        raise UsageError(f"soak: --scenarios {scenarios}: {'not a directory' if scenarios.exists() else 'does not exist'}")
    say = say or (lambda _m: None)
    out_dir.mkdir(parents=True, exist_ok=True)
    chosen = " ".join(selection(tier, scenarios or paths.builtin_dir("scenarios")))
    results: list[dict[str, Outcome] | None] = []
    errors: dict[int, str] = {}
    seconds: list[float] = []
    for run in range(1, runs + 1):
        junit = out_dir / f"run-{run}.xml"
        junit.unlink(missing_ok=True)
        log = out_dir / f"run-{run}.log"
        started = time.monotonic()
        say(f"run {run}/{runs}: pytest {scenarios or 'scenarios'} {chosen} (log: {log})")
        with open(log, "wb") as out:
            try:
                proc = subprocess.run(pytest_argv(tier, junit, extra, scenarios), cwd=Path.cwd(), stdin=subprocess.DEVNULL,
                                      stdout=out, stderr=subprocess.STDOUT, timeout=timeout)
                rc: int | None = proc.returncode
            except subprocess.TimeoutExpired:
                # subprocess.run killed pytest; its QEMUs die with it (PR_SET_PDEATHSIG).
                rc = None
        seconds.append(time.monotonic() - started)
        if rc is None:
            errors[run] = f"timed out after {timeout:g} s"
            results.append(None)
        elif rc not in (0, 1) or not junit.is_file():
            # 0: all passed, 1: some failed; anything else (interrupted, internal or usage error,
            # no tests collected) means the run says nothing about flakiness.
            errors[run] = f"pytest exited {rc} ({PYTEST_EXIT.get(rc, 'unexpected')})"
            results.append(None)
        else:
            try:
                results.append(parse_junit(junit))
            except UsageError as exc:
                errors[run] = str(exc)
                results.append(None)
        say(f"run {run}/{runs}: exit {rc}, {seconds[-1]:.0f} s")
    report = tally(results, errors)
    report.seconds = seconds
    return report
