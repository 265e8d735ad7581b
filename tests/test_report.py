"""Reports: built from real (tiny, fake) pytest runs, validated, rendered, merged, diffed, seen in a browser."""

from __future__ import annotations

import copy
import html.parser
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import setup_installs

from harness.core.progress import CellProgress
from harness.reports import model as rp
from harness.reports import render as report_render
from tests.conftest import REPO, nestbed

pytest_plugins = ["pytester"]

# A fake scenario module: what real scenarios do, minus QEMU.  Its cells cover every outcome.
FAKE = """
import pytest

@pytest.mark.smoke
@pytest.mark.parametrize("arch", ["x86_64", "i386"])
@pytest.mark.parametrize("via", ["serial", "ssh"])
def test_boot(nestbed_facts, arch, via):
    nestbed_facts["clocksource"] = "kvm-clock" if arch == "x86_64" else "tsc"
    nestbed_facts["boot_seconds"] = 2.5 if arch == "x86_64" else 5.0
    assert not (arch == "i386" and via == "ssh"), "sshd never answered on debian-i386"

@pytest.mark.smoke
def test_disk_chain(nestbed_facts):
    nestbed_facts["hops"] = ["vmdk", "vpc", "qcow2"]
    nestbed_facts["sha256"] = "ab" * 32

@pytest.mark.smoke
def test_needs_kvm():
    pytest.skip("KVM unusable: kvm_pvm")

@pytest.mark.smoke
@pytest.mark.xfail(reason="QEMU 7.2 aborts: invalid tss type")
def test_known_bad():
    raise RuntimeError("qemu: fatal: invalid tss type")

@pytest.fixture
def broken():
    raise OSError("no /dev/net/tun")

@pytest.mark.smoke
def test_setup_error(broken):
    pass
"""

EXPECTED = {
    "test_fake.py::test_boot[serial-x86_64]": "pass",
    "test_fake.py::test_boot[serial-i386]": "pass",
    "test_fake.py::test_boot[ssh-x86_64]": "pass",
    "test_fake.py::test_boot[ssh-i386]": "fail",
    "test_fake.py::test_disk_chain": "pass",
    "test_fake.py::test_needs_kvm": "skip",
    "test_fake.py::test_known_bad": "xfail",
    "test_fake.py::test_setup_error": "error",
}

HOST = {"hostname": "ci-amd", "kernel": "6.1.0-28-amd64", "machine": "x86_64",
        "cpu": {"vendor": "AuthenticAMD", "model": "AMD EPYC 7B13", "vmx": False, "svm": True, "hypervisor": True,
                "cpus": 2},
        "kvm": {"present": True, "openable": True, "error": None, "modules": ["kvm", "kvm_amd"], "nested": {}},
        "qemu": {"x86_64": "7.2.22", "i386": "7.2.22"},
        "accel": {"x86_64": {"chosen": "kvm", "reason": "a tiny guest booted"},
                  "i386": {"chosen": "kvm", "reason": "a tiny guest booted"}},
        "probed_at": "2026-11-25T06:00:00Z"}


def _run_fake(pytester: pytest.Pytester, out: Path, *extra: str, host: dict[str, Any] | None = None) -> dict[str, Any]:
    pytester.makepyfile(test_fake=FAKE)
    facts = pytester.path / "host.json"
    facts.write_text(json.dumps(host or HOST))
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--nestbed-report", str(out),
                                           "--nestbed-host-facts", str(facts), "--junitxml", str(out / "junit.xml"),
                                           *extra)
    assert result.ret == pytest.ExitCode.TESTS_FAILED, result.stdout.str()
    doc: dict[str, Any] = json.loads((out / "report.json").read_text())
    return doc


@pytest.fixture(scope="module")
def xdist_report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One report from a 2-worker pytest-xdist run of the fake scenarios (shared by the read-only tests)."""
    work = tmp_path_factory.mktemp("fake")
    (work / "test_fake.py").write_text(FAKE)
    (work / "host.json").write_text(json.dumps(HOST))
    out = work / "report"
    proc = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-n", "2", "--dist", "loadscope",
                           "--nestbed-report", str(out), "--nestbed-host-facts", "host.json",
                           "--junitxml", str(out / "junit.xml"), "test_fake.py"],
                          cwd=work, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    doc: dict[str, Any] = json.loads((out / "report.json").read_text())
    doc["_dir"] = str(out)
    return doc


def test_every_outcome_lands_in_report_json_and_validates(xdist_report: dict[str, Any]) -> None:
    doc = {k: v for k, v in xdist_report.items() if not k.startswith("_")}
    assert rp.validate(doc) == []
    got = {c["nodeid"]: c["outcome"] for c in doc["cells"]}
    assert got == EXPECTED
    assert doc["summary"] == {"total": 8, "pass": 4, "fail": 1, "error": 1, "skip": 1, "xfail": 1, "xpass": 0}
    cells = {c["nodeid"]: c for c in doc["cells"]}
    # Facts survive pytest-xdist; every cell knows its worker; reasons are kept.
    assert cells["test_fake.py::test_boot[serial-i386]"]["facts"] == {"clocksource": "tsc", "boot_seconds": 5.0}
    assert {c["worker"] for c in doc["cells"]} <= {"gw0", "gw1"} and doc["run"]["workers"] == 2
    assert "sshd never answered on debian-i386" in cells["test_fake.py::test_boot[ssh-i386]"]["reason"]
    assert "AssertionError" in cells["test_fake.py::test_boot[ssh-i386]"]["longrepr"]
    assert cells["test_fake.py::test_needs_kvm"]["reason"] == "KVM unusable: kvm_pvm"
    assert cells["test_fake.py::test_known_bad"]["reason"] == "QEMU 7.2 aborts: invalid tss type"
    assert "no /dev/net/tun" in cells["test_fake.py::test_setup_error"]["reason"]
    assert cells["test_fake.py::test_boot[ssh-i386]"]["params"] == {"via": "ssh", "arch": "i386"}
    assert cells["test_fake.py::test_boot[ssh-i386]"]["config"] == "via=ssh arch=i386"
    assert cells["test_fake.py::test_boot[ssh-i386]"]["markers"] == ["smoke"]
    assert doc["host"]["cpu"]["model"] == "AMD EPYC 7B13"
    out = Path(xdist_report["_dir"])
    for name in ("junit.xml", "index.html", "summary.md", "progress.jsonl"):
        assert (out / name).is_file(), name
    events = [json.loads(line) for line in (out / "progress.jsonl").read_text().splitlines()]
    assert events[0]["event"] == "begin" and events[-1]["event"] == "end"
    assert next(e for e in events if e["event"] == "total")["n"] == 8
    assert sum(e["event"] == "done" for e in events) == 8


def test_schema_rejects_a_broken_report(xdist_report: dict[str, Any]) -> None:
    doc = copy.deepcopy({k: v for k, v in xdist_report.items() if not k.startswith("_")})
    doc["cells"][0]["outcome"] = "passed"
    del doc["run"]["tier"]
    problems = rp.validate(doc)
    assert any(p.startswith("cells/0/outcome") for p in problems), problems
    assert any("'tier' is a required property" in p for p in problems), problems


def test_report_in_one_process_with_matrix_and_guest_logs(pytester: pytest.Pytester, tmp_path: Path) -> None:
    (pytester.path / "matrix.toml").write_text(
        'version = 1\n[axes.arch]\nparams = ["arch"]\nvalues = ["x86_64", "i386"]\n'
        '[axes.transport]\nparams = ["via"]\ndefault = "serial"\n'
        '[[exclude]]\narch = "i386"\ntransport = "ssh"\nreason = "no i386 sshd"\n'
        '[tiers.smoke]\nmarkers = ["smoke"]\n')
    doc = _run_fake(pytester, tmp_path / "r", "--nestbed-matrix", "matrix.toml", "--nestbed-tier", "smoke")
    assert rp.validate(doc) == []
    assert doc["run"]["workers"] == 0 and doc["run"]["tier"] == "smoke"
    assert doc["deselected"] == [{"nodeid": "test_fake.py::test_boot[ssh-i386]",
                                  "reason": "matrix exclude[0]: no i386 sshd"}]
    cell = next(c for c in doc["cells"] if c["nodeid"] == "test_fake.py::test_boot[ssh-x86_64]")
    assert cell["coords"] == {"arch": "x86_64", "transport": "ssh"}


def test_failed_boot_still_links_the_serial_log(pytester: pytest.Pytester, tmp_path: Path) -> None:
    # A guest that panics during boot never reaches the test: its log is found in the test's log directory.
    pytester.makepyfile(test_panic="""
        import pytest
        from pathlib import Path

        @pytest.fixture
        def panicking(request):
            safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in request.node.nodeid)
            log = Path(request.config.getoption("nestbed_log_dir")) / safe / "tiny-i386-1" / "tiny-i386-serial.log"
            log.parent.mkdir(parents=True)
            log.write_text("Kernel panic - not syncing: IO-APIC + timer doesn't work!")
            raise RuntimeError("level 1: guest kernel panicked")

        def test_boot(panicking):
            pass
        """)
    (pytester.path / "host.json").write_text(json.dumps(HOST))
    out = tmp_path / "r"
    result = pytester.runpytest_subprocess("--nestbed-report", str(out), "--nestbed-log-dir", str(out / "logs"),
                                           "--nestbed-host-facts", "host.json")
    result.assert_outcomes(errors=1)
    doc = json.loads((out / "report.json").read_text())
    assert doc["cells"][0]["artifacts"]["serial_logs"] == ["logs/test_panic.py__test_boot/tiny-i386-1/tiny-i386-serial.log"]
    page = (out / "index.html").read_text()
    assert 'href="logs/test_panic.py__test_boot/tiny-i386-1/tiny-i386-serial.log">serial log</a>' in page


def test_a_module_that_does_not_import_is_one_error_cell(pytester: pytest.Pytester, tmp_path: Path) -> None:
    pytester.makepyfile(test_good="def test_ok(nestbed_facts):\n    nestbed_facts['x'] = 1\n",
                        test_broken="import no_such_module_anywhere\n\ndef test_never():\n    pass\n")
    (pytester.path / "host.json").write_text(json.dumps(HOST))
    out = tmp_path / "r"
    pytester.runpytest_subprocess("-n", "2", "--nestbed-report", str(out), "--nestbed-host-facts", "host.json")
    doc = json.loads((out / "report.json").read_text())
    assert rp.validate(doc) == []
    errors = [c for c in doc["cells"] if c["outcome"] == "error"]
    assert len(errors) == 1 and errors[0]["nodeid"].endswith("test_broken.py")
    assert "no_such_module_anywhere" in errors[0]["reason"] + (errors[0]["longrepr"] or "")


def test_summary_md_fits_a_job_summary(xdist_report: dict[str, Any]) -> None:
    md = (Path(xdist_report["_dir"]) / "summary.md").read_text()
    assert md.startswith("## nestbed report")
    assert "**8 cells**" in md and "❌ 1 fail" in md
    assert "### Failures" in md and "`test_fake.py::test_boot[ssh-i386]`" in md
    assert md.count("\n| `test_fake.py::") == 8
    assert len(md.encode()) < 1 << 20


def test_serial_logs_in_the_report_dir_are_relative(tmp_path: Path) -> None:
    log = tmp_path / "logs" / "t" / "serial.log"
    log.parent.mkdir(parents=True)
    log.write_text("boot")
    phases = [{"nodeid": "s.py::t", "when": "setup", "outcome": "passed", "duration": 0.1},
              {"nodeid": "s.py::t", "when": "call", "outcome": "failed", "duration": 3.0, "crash": "boom",
               "longrepr": "Traceback\nboom", "user_properties": [("nestbed", {"facts": {}, "guests": [
                   {"image": "tiny-x86_64", "arch": "x86_64", "level": 1, "accel": "tcg", "accel_reason": "why",
                    "vcpus": 1, "memory_mb": 256, "ready_seconds": 2.4, "serial_log": str(log)},
                   {"image": "my-cloud", "arch": "x86_64", "level": 2, "accel": "kvm", "ready_seconds": 90.0,
                    "source": "/srv/my-cloud.vmdk (vmdk streamOptimized; firmware bios: auto: <a BIOS boot partition>)"}
               ]})]},
              {"nodeid": "s.py::t", "when": "teardown", "outcome": "passed", "duration": 0.2}]
    cell = rp.cell_from_phases(phases)
    assert cell["outcome"] == "fail" and cell["duration_seconds"] == 3.3
    doc = rp.build_report([cell], rp.RunInfo(started=0, finished=10), HOST, out_dir=tmp_path)
    assert rp.validate(doc) == []
    assert doc["cells"][0]["artifacts"]["serial_logs"] == ["logs/t/serial.log"]
    page = report_render.report_html(doc)
    assert 'href="logs/t/serial.log"' in page and "<svg" in page and "2.4 s" in page
    # A brought image's row says which file it was, in what format, under which firmware (escaped).
    assert "/srv/my-cloud.vmdk (vmdk streamOptimized; firmware bios: auto: &lt;a BIOS boot partition&gt;)" in page


def test_a_failed_cell_shows_the_screen_of_a_guest_that_was_never_reached(tmp_path: Path) -> None:
    shot = tmp_path / "logs" / "t" / "appliance-screen.png"
    shot.parent.mkdir(parents=True)
    shot.write_bytes(b"\x89PNG\r\n\x1a\n")
    text = (f"GuestNotReached: no ready marker from cloud-init on the serial console within 20 s (it printed "
            f"nothing on the serial console); its screen then: {shot}")
    phases = [{"nodeid": "s.py::t", "when": "call", "outcome": "failed", "duration": 21.0, "crash": text,
               "longrepr": text}]
    cell = rp.cell_from_phases(phases)
    assert cell["artifacts"]["screenshots"] == [str(shot)]
    doc = rp.build_report([cell], rp.RunInfo(started=0, finished=30), HOST, out_dir=tmp_path)
    assert rp.validate(doc) == []
    assert doc["cells"][0]["artifacts"]["screenshots"] == ["logs/t/appliance-screen.png"]
    page = report_render.report_html(doc)
    assert '<img src="logs/t/appliance-screen.png"' in page
    # A cell without one shows none.
    other = rp.cell_from_phases([{**phases[0], "crash": "boom", "longrepr": "boom"}])
    assert other["artifacts"]["screenshots"] == []


# --- merge and diff ------------------------------------------------------------------------

def _phases(nodeid: str, outcome: str, reason: str | None = None) -> list[dict[str, Any]]:
    """The phase dicts pytest's reports give for one test of *outcome* (reason: the crash, skip or xfail reason)."""
    if outcome == "error":
        return [{"nodeid": nodeid, "when": "setup", "duration": 0.1, "outcome": "failed", "crash": reason or "boom"}]
    call: dict[str, Any] = {"nodeid": nodeid, "when": "call", "duration": 1.0,
                            "outcome": {"pass": "passed", "fail": "failed", "skip": "skipped", "xfail": "skipped",
                                        "xpass": "passed"}[outcome]}
    if outcome == "fail":
        call["crash"] = reason or "boom"
    elif outcome == "skip":
        call["skip_reason"] = reason or "no kvm"
    elif outcome in ("xfail", "xpass"):
        call["wasxfail"] = reason or "known bad"
    return [call]


def _doc(host: dict[str, Any], outcomes: dict[str, str], run_id: str, started: str,
         reasons: dict[str, str] | None = None) -> dict[str, Any]:
    cells = []
    for nodeid, outcome in outcomes.items():
        c = rp.cell_from_phases(_phases(nodeid, outcome, (reasons or {}).get(nodeid)))
        assert c["outcome"] == outcome, c
        cells.append(c)
    doc = rp.build_report(cells, rp.RunInfo(started=0, finished=60), host, out_dir=Path(run_id))
    doc["run"]["started"] = started
    assert rp.validate(doc) == []
    return doc


def _write(path: Path, doc: dict[str, Any]) -> Path:
    path.mkdir(parents=True)
    (path / "report.json").write_text(json.dumps(doc))
    return path


INTEL = {**HOST, "hostname": "lab-intel", "kernel": "6.12.9", "cpu": {**HOST["cpu"], "model": "Intel Xeon Gold 6338"},
         "qemu": {"x86_64": "10.0.2", "i386": "10.0.2"}}
T1, T2 = "2026-11-24T02:00:00Z", "2026-11-25T02:00:00Z"
CELLS = ["s/test_boot.py::t[x86_64]", "s/test_boot.py::t[i386]", "s/test_nested.py::l2"]


def test_merge_two_hosts_and_shards_of_one(tmp_path: Path) -> None:
    a1 = _write(tmp_path / "amd-1", _doc(HOST, {CELLS[0]: "pass", CELLS[1]: "pass"}, "amd-1", "2026-11-25T01:00:00Z"))
    a2 = _write(tmp_path / "amd-2", _doc(HOST, {CELLS[2]: "fail"}, "amd-2", "2026-11-25T01:00:05Z"))
    intel = _write(tmp_path / "intel", _doc(INTEL, {CELLS[0]: "pass", CELLS[1]: "skip", CELLS[2]: "pass"}, "intel",
                                            "2026-11-25T02:00:00Z"))
    r = nestbed("report", "merge", str(a1), str(a2), str(intel), "-o", str(tmp_path / "fleet"), timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().endswith(str(tmp_path / "fleet" / "index.html"))
    fleet = json.loads((tmp_path / "fleet" / "fleet.json").read_text())
    assert [h["key"] for h in fleet["hosts"]] == ["AMD EPYC 7B13 | 6.1.0-28-amd64 | QEMU 7.2.22",
                                                  "Intel Xeon Gold 6338 | 6.12.9 | QEMU 10.0.2"]
    amd, intel_row = fleet["hosts"]
    assert {n: c["outcome"] for n, c in amd["cells"].items()} == {CELLS[0]: "pass", CELLS[1]: "pass", CELLS[2]: "fail"}
    assert len(amd["runs"]) == 2 and intel_row["cells"][CELLS[1]]["outcome"] == "skip"
    assert fleet["summary"]["total"] == 6 and fleet["summary"]["fail"] == 1
    page = (tmp_path / "fleet" / "index.html").read_text()
    assert page.count('class="cell o-') == 6 and "Intel Xeon Gold 6338" in page
    md = (tmp_path / "fleet" / "summary.md").read_text()
    assert "2 host kind(s)" in md and "| `s/test_nested.py::l2` | ❌ fail | ✅ pass |" in md
    # A merge merges again (a fleet is an input too) and can be diffed.
    r = nestbed("report", "merge", str(tmp_path / "fleet"), "-o", str(tmp_path / "fleet2"), timeout=60)
    assert r.returncode == 0, r.stderr


EVIL = "<script>alert(\"x&y\")</script>'q' & <b>bold</b>"


class _Page(html.parser.HTMLParser):
    """Every element, attribute value and text of a page, as a browser would read them."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.attrs: dict[str, list[str]] = {}
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        for k, v in attrs:
            self.attrs.setdefault(k, []).append(v or "")

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def test_hostile_strings_are_escaped_in_report_and_fleet_pages() -> None:
    """A node id, reason or host name with markup, quotes and ``&`` in it is text on the page, never markup."""
    nodeid, reason = f"s/evil.py::t[{EVIL}]", f"boom {EVIL}"
    doc = _doc({**HOST, "hostname": f"ci {EVIL}", "cpu": {**HOST["cpu"], "model": f"EPYC {EVIL}"}},
               {nodeid: "fail", CELLS[0]: "pass"}, "evil", T1, reasons={nodeid: reason})
    doc["deselected"] = [{"nodeid": f"{nodeid}-2", "reason": f"matrix exclude[0]: {EVIL}"}]
    pages = {"report": report_render.report_html(doc), "fleet": report_render.fleet_html(rp.merge([doc]))}
    parsed_pages = {name: _Page() for name in pages}
    for name, page in pages.items():
        parsed = parsed_pages[name]
        parsed.feed(page)
        assert parsed.tags.count("script") == 1 and page.count("<script>") == 1, name  # only the page's own script
        assert "<b>bold</b>" not in page and '"x&y"' not in page and "'q'" not in page, name
        assert "&lt;script&gt;alert(" in page and "x&amp;y" in page and "&lt;b&gt;bold&lt;/b&gt;" in page, name
        assert nodeid in parsed.attrs["data-nodeid"], name  # the attribute holds the whole value, quotes and all
        assert any(EVIL in t for t in parsed.attrs["title"]), name
        assert any(f"EPYC {EVIL}" in t for t in parsed.text), name
    report_text = "".join(parsed_pages["report"].text)
    for text in (nodeid, reason, f"ci {EVIL}", f"matrix exclude[0]: {EVIL}"):
        assert text in report_text, text


def test_diff_finds_a_planted_regression_and_exits_1(tmp_path: Path) -> None:
    old = _write(tmp_path / "old", _doc(HOST, {CELLS[0]: "pass", CELLS[1]: "fail", CELLS[2]: "pass"}, "old",
                                        "2026-11-24T02:00:00Z"))
    new = _write(tmp_path / "new", _doc(HOST, {CELLS[0]: "fail", CELLS[1]: "pass", CELLS[2]: "skip"}, "new",
                                        "2026-11-25T02:00:00Z"))
    r = nestbed("report", "diff", str(old), str(new), timeout=60)
    assert r.returncode == 1, r.stdout + r.stderr
    key = rp.host_key(HOST)
    assert (f"REGRESSIONS (2):\n  pass -> fail  {CELLS[0]}  [{key}]  -- boom\n"
            f"  pass -> skip  {CELLS[2]}  [{key}]  -- no kvm\n") in r.stdout  # a pass that skips now is one too
    assert f"fixes (1):\n  fail -> pass  {CELLS[1]}" in r.stdout
    assert r.stdout.strip().endswith("2 regression(s), 1 fix(es), 0 other change(s)")
    # Fixes only: exit 0.  The JSON form carries the same.
    r = nestbed("report", "diff", str(new), str(new), timeout=60)
    assert r.returncode == 0 and "0 regression(s)" in r.stdout
    r = nestbed("report", "diff", "--json", str(old / "report.json"), str(new), timeout=60)
    assert r.returncode == 1 and json.loads(r.stdout)["regressions"][0]["nodeid"] == CELLS[0]


HIDE = {"s/a.py::newly_skipped": ("pass", "skip", "KVM unusable: kvm_pvm"),
        "s/b.py::newly_xfailed": ("pass", "xfail", "QEMU 7.2 aborts: invalid tss type"),
        "s/c.py::still_skipped": ("skip", "skip", "no kvm"),
        "s/d.py::skip_now_passes": ("skip", "pass", None),
        "s/e.py::xfail_now_skips": ("xfail", "skip", "no vmx"),
        "s/f.py::still_passes": ("pass", "pass", None)}


def _hide_docs() -> tuple[dict[str, Any], dict[str, Any]]:
    old = _doc(HOST, {n: o for n, (o, _, _) in HIDE.items()}, "old", T1)
    new = _doc(HOST, {n: o for n, (_, o, _) in HIDE.items()}, "new", T2,
               reasons={n: r for n, (_, _, r) in HIDE.items() if r})
    return old, new


def test_diff_counts_a_pass_that_now_skips_or_xfails_as_a_regression_with_its_reason() -> None:
    """A cell that passed and now skips or xfails hides whatever it would say: a regression, with the
    reason it gave; skip -> skip (no change) and skip -> pass are not, nor is xfail -> skip."""
    old, new = _hide_docs()
    d = rp.diff(old, new)
    key = rp.host_key(HOST)
    assert [(c.nodeid, c.old, c.new, c.reason, c.host) for c in d.regressions] == [
        ("s/a.py::newly_skipped", "pass", "skip", "KVM unusable: kvm_pvm", key),
        ("s/b.py::newly_xfailed", "pass", "xfail", "QEMU 7.2 aborts: invalid tss type", key)]
    assert [(c.nodeid, c.old, c.new, c.reason) for c in d.changes] == [
        ("s/d.py::skip_now_passes", "skip", "pass", None), ("s/e.py::xfail_now_skips", "xfail", "skip", "no vmx")]
    assert d.fixes == [] and d.new_failures == [] and d.added == [] and d.removed == []
    text = rp.render_diff(d)
    assert text.startswith(f"REGRESSIONS (2):\n"
                           f"  pass -> skip  s/a.py::newly_skipped  [{key}]  -- KVM unusable: kvm_pvm\n"
                           f"  pass -> xfail  s/b.py::newly_xfailed  [{key}]  -- QEMU 7.2 aborts: invalid tss type\n"
                           f"other changes (2):\n"
                           f"  skip -> pass  s/d.py::skip_now_passes  [{key}]\n"
                           f"  xfail -> skip  s/e.py::xfail_now_skips  [{key}]  -- no vmx\n"), text
    assert "still_skipped" not in text and "still_passes" not in text
    assert text.endswith("2 regression(s), 0 fix(es), 2 other change(s)")


def test_report_diff_exits_1_on_a_pass_that_now_skips_and_0_on_a_skip_that_stays_or_passes(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import argparse

    from harness.reports import cli as report_cli

    old, new = _hide_docs()
    o, n = _write(tmp_path / "old", old), _write(tmp_path / "new", new)
    assert report_cli.cmd_report_diff(argparse.Namespace(old=str(o), new=str(n), json=False)) == 1
    assert "pass -> xfail  s/b.py::newly_xfailed" in capsys.readouterr().out
    assert report_cli.cmd_report_diff(argparse.Namespace(old=str(o), new=str(n), json=True)) == 1
    regressions = json.loads(capsys.readouterr().out)["regressions"]
    assert [(c["old"], c["new"], c["reason"]) for c in regressions] == [
        ("pass", "skip", "KVM unusable: kvm_pvm"), ("pass", "xfail", "QEMU 7.2 aborts: invalid tss type")]
    # Without the two hidden passes only skip -> skip, skip -> pass and xfail -> skip are left: exit 0.
    keep = {n for n, (was, _, _) in HIDE.items() if was != "pass"}
    o2 = _write(tmp_path / "old2", _doc(HOST, {c: HIDE[c][0] for c in sorted(keep)}, "old2", T1))
    n2 = _write(tmp_path / "new2", _doc(HOST, {c: HIDE[c][1] for c in sorted(keep)}, "new2", T2))
    assert report_cli.cmd_report_diff(argparse.Namespace(old=str(o2), new=str(n2), json=False)) == 0
    assert capsys.readouterr().out.strip().endswith("0 regression(s), 0 fix(es), 2 other change(s)")


@pytest.mark.parametrize("old", rp.OUTCOMES)
@pytest.mark.parametrize("new", rp.OUTCOMES)
def test_which_outcome_changes_are_regressions(old: str, new: str) -> None:
    want = (new in ("fail", "error") and old not in ("fail", "error")) or (old == "pass" and new in ("skip", "xfail"))
    assert rp.is_regression(old, new) is want
    d = rp.diff(_doc(HOST, {CELLS[0]: old}, "a", T1), _doc(HOST, {CELLS[0]: new}, "b", T2))
    assert [(c.old, c.new) for c in d.regressions] == ([(old, new)] if old != new and want else [])
    assert len(d.regressions) + len(d.fixes) + len(d.changes) == (old != new)


def test_diff_across_fleets_matches_hosts_by_cpu_kernel_qemu() -> None:
    old = rp.merge([_doc(HOST, {CELLS[0]: "pass"}, "a", T1), _doc(INTEL, {CELLS[0]: "pass"}, "b", T1)])
    new = rp.merge([_doc(HOST, {CELLS[0]: "pass"}, "a", T2), _doc(INTEL, {CELLS[0]: "fail"}, "b", T2)])
    d = rp.diff(old, new)
    assert [(c.host.split(" | ")[0], c.old, c.new) for c in d.regressions] == [("Intel Xeon Gold 6338", "pass", "fail")]


@pytest.mark.parametrize(("content", "message"), [
    (None, "no report.json or fleet.json in this directory"),
    ("{not json", "not valid JSON"),
    ('{"schema": "something-else"}', "not a nestbed report"),
    ('{"schema": "nestbed-report", "schema_version": 99, "cells": []}', "schema_version 99 is not supported"),
    ('{"schema": "nestbed-report", "schema_version": 1}', "cells: missing or not a list"),
])
def test_diff_and_merge_refuse_bad_input_with_125(tmp_path: Path, content: str | None, message: str) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    if content is not None:
        (bad / "report.json").write_text(content)
    good = _write(tmp_path / "good", _doc(HOST, {CELLS[0]: "pass"}, "good", T1))
    for argv in (["report", "diff", str(good), str(bad)], ["report", "merge", str(bad), "-o", str(tmp_path / "o")]):
        r = nestbed(*argv, timeout=60)
        assert r.returncode == 125, r.stdout + r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("nestbed: error: ") and message in lines[0], r.stderr
    r = nestbed("report", "diff", str(good), timeout=60)
    assert r.returncode == 125 and "the following arguments are required: NEW" in r.stderr
    r = nestbed("report", "merge", "--skip-missing", str(bad), str(good), "-o", str(tmp_path / "o"), timeout=60)
    assert r.returncode == 0 and f"nestbed: warning: skipped: {bad}" in r.stderr, r.stderr
    assert json.loads((tmp_path / "o" / "fleet.json").read_text())["summary"]["total"] == 1


# --- the live display and the CLI's pytest command line -----------------------------------

def test_progress_plain_lines_when_not_a_tty() -> None:
    buf = io.StringIO()
    with CellProgress("smoke", buf) as bar:
        bar.set_total(3)
        bar.started("a")
        bar.finished("a", "pass", 2.0)
        bar.started("b")
        bar.finished("b", "fail", 1.0)
    lines = buf.getvalue().splitlines()
    assert lines[0] == "nestbed: smoke: 3 cells"
    assert "1/3 pass  a (2.0 s), ETA" in lines[1] and "2/3 fail  b (1.0 s), ETA" in lines[2]
    assert "\r" not in buf.getvalue()


def test_progress_live_line_on_a_tty() -> None:
    buf = io.StringIO()
    bar = CellProgress("smoke", buf, tty=True)
    bar.set_total(4)
    bar.started("s/t.py::a")
    bar.started("s/t.py::b")
    bar.finished("s/t.py::a", "pass", 1.0)
    line = bar.line()
    assert "1/4 cells (1 pass) ETA" in line and line.endswith("| s/t.py::b")
    bar.finished("s/t.py::b", "error", 1.0)
    assert "\r\033[Knestbed: ERROR s/t.py::b\n" in buf.getvalue()


def test_report_command_line() -> None:
    import argparse

    from harness.reports.cli import pytest_argv

    args = argparse.Namespace(tier="nightly", shard="2/4", numprocesses="auto")
    argv = pytest_argv(args, Path("/r"), Path("/m.toml"), ["-k", "boot"])
    assert argv[1:3] == ["-m", "pytest"] and Path(argv[3]) == Path(__file__).resolve().parent.parent / "scenarios"
    joined = " ".join(argv)
    for part in ("--nestbed-report /r", "--junitxml /r/junit.xml", "--nestbed-log-dir /r/logs",
                 "--nestbed-tier nightly", "--nestbed-shard 2/4", "-n auto --dist loadscope",
                 "--nestbed-matrix /m.toml", f"--rootdir {Path(__file__).resolve().parent.parent}"):
        assert part in joined, part
    assert argv[-2:] == ["-k", "boot"]
    assert "-n" not in pytest_argv(argparse.Namespace(tier="smoke", shard=None, numprocesses="0"), Path("/r"),
                                   Path("/m.toml"), [])


def test_report_cli_refuses_bad_arguments_before_booting(tmp_path: Path) -> None:
    r = nestbed("report", "--tier", "weekly", "--out", str(tmp_path / "r"), timeout=60)
    assert r.returncode == 125 and "no tier 'weekly'" in r.stderr
    r = nestbed("report", "--shard", "3/2", "--out", str(tmp_path / "r"), timeout=60)
    assert r.returncode == 125 and "need 1 <= I <= N" in r.stderr
    r = nestbed("report", "-n", "lots", "--out", str(tmp_path / "r"), timeout=60)
    assert r.returncode == 125 and "expected auto or a number" in r.stderr
    assert not (tmp_path / "r").exists()


SLOW_FAKE = """
import time, pytest

@pytest.mark.smoke
def test_quick(nestbed_facts):
    nestbed_facts["boot_seconds"] = 1.0

@pytest.mark.smoke
def test_slow():
    time.sleep(float(__import__("os").environ.get("FAKE_SLEEP", "0")))
    assert False, "planted"
"""


def _fake_scenarios(tmp_path: Path) -> tuple[Path, list[str]]:
    scen = tmp_path / "scen"
    scen.mkdir()
    (scen / "test_fake.py").write_text(SLOW_FAKE)
    (tmp_path / "host.json").write_text(json.dumps(HOST))
    (tmp_path / "m.toml").write_text('version = 1\n[axes.arch]\nparams = ["arch"]\n[tiers.smoke]\nmarkers = ["smoke"]\n')
    return scen, ["--scenarios", str(scen), "--matrix", str(tmp_path / "m.toml"), "--out", str(tmp_path / "r"),
                  "--", "--nestbed-host-facts", str(tmp_path / "host.json")]


def test_report_cli_end_to_end_with_plain_progress(tmp_path: Path) -> None:
    _, args = _fake_scenarios(tmp_path)
    r = nestbed("report", "-n", "2", *args, timeout=180)
    assert r.returncode == 1, r.stdout + r.stderr
    out = tmp_path / "r"
    assert r.stdout.strip().splitlines()[-1] == f"nestbed: report: {out / 'index.html'}"
    assert "  FAIL  scen/test_fake.py::test_slow: AssertionError: planted" in r.stdout
    assert "nestbed: smoke: 2 cells" in r.stderr and "2/2 " in r.stderr  # not a TTY: one line per cell
    doc = rp.load(out)
    assert doc["summary"]["pass"] == 1 and doc["summary"]["fail"] == 1 and doc["run"]["workers"] == 2
    for name in ("junit.xml", "index.html", "summary.md", "pytest.log"):
        assert (out / name).is_file(), name
    r = nestbed("report", "-n", "0", *args, timeout=60)
    assert r.returncode == 125 and "already holds a report" in r.stderr


def test_report_cli_ctrl_c_still_writes_the_report(tmp_path: Path) -> None:
    import os
    import signal
    import time

    _, args = _fake_scenarios(tmp_path)
    proc = subprocess.Popen([sys.executable, "-m", "harness", "report", "-n", "0", *args], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "FAKE_SLEEP": "60"})
    try:
        progress = tmp_path / "r" / "progress.jsonl"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and 'test_fake.py::test_slow"' not in (
                progress.read_text() if progress.exists() else ""):
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C does: the whole foreground group gets it
        signalled = time.monotonic()
        stdout, stderr = proc.communicate(timeout=60)
        assert time.monotonic() - signalled < 30  # not after the 60 s sleep: the test was cut short
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    assert proc.returncode == 130, stdout + stderr
    doc = rp.load(tmp_path / "r")
    assert doc["run"]["interrupted"] is True
    outcomes = {c["nodeid"].rpartition("::")[2]: (c["outcome"], c["reason"]) for c in doc["cells"]}
    assert outcomes == {"test_quick": ("pass", None), "test_slow": ("error", "interrupted: the test did not finish")}
    assert stdout.strip().endswith("index.html")


# --- index.html in a real browser ----------------------------------------------------------

class _Cells(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.cells: dict[str, str] = {}
        self.body: dict[str, str | None] = {}
        self.svg_rects = 0
        self.columns: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if a.get("data-nodeid"):
            self.cells[str(a["data-nodeid"])] = f"{a.get('data-outcome')} {a.get('class')}"
        elif tag == "body":
            self.body = a
        elif tag == "rect":
            self.svg_rects += 1
        self._in_col = tag == "th" and a.get("class") == "col"

    def handle_data(self, data: str) -> None:
        if getattr(self, "_in_col", False):
            self.columns.append(data)
            self._in_col = False


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@setup_installs(CHROMIUM is not None, "chromium")
def test_index_html_renders_the_grid_in_headless_chromium(xdist_report: dict[str, Any], tmp_path: Path) -> None:
    page = Path(xdist_report["_dir"]) / "index.html"
    assert "http://" not in page.read_text() and "https://" not in page.read_text()  # no network
    flags = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
             "--window-size=1400,1100"]
    dom = subprocess.run([*flags, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    parsed = _Cells()
    parsed.feed(dom.stdout)
    assert parsed.body.get("data-ready") == "1"  # the page's script ran without an error
    assert {n: v.split()[0] for n, v in parsed.cells.items()} == EXPECTED
    assert all(v.split()[1:] == ["chip", f"o-{v.split()[0]}"] for v in parsed.cells.values())
    assert parsed.columns == ["x86_64 · serial", "x86_64 · ssh", "i386 · serial", "i386 · ssh", "any"]
    assert parsed.svg_rects >= 4  # boot-time bars (boot_seconds facts) and the legend
    shot = tmp_path / "index.png"
    r = subprocess.run([*flags, f"--screenshot={shot}", page.as_uri()], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and shot.stat().st_size > 10_000, r.stderr[-2000:]
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_docs_describe_every_report_field() -> None:
    doc = (REPO / "docs" / "reports.md").read_text()
    schema = json.loads(rp.SCHEMA_FILE.read_text())
    for key in [*schema["properties"], *schema["properties"]["run"]["properties"], *schema["$defs"]["cell"]["properties"]]:
        assert f"`{key}`" in doc, key
