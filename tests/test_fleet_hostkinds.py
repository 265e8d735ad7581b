"""A fleet with two host kinds: the L0 TCG report and a report made by nestbed inside an L1 ("KVM host,
emulated SVM"), merged; the matrix's [hosts.*] kinds expanded into CI jobs.  Pure: report.json inputs are
built in tmp_path, no QEMU."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

import pytest

from harness.reports import cli as report_cli
from harness.reports import matrix as mx
from harness.reports import model as rp
from harness.reports import render
from harness.tools import selfhost
from harness.vm.spec import Accel
from tests.conftest import REPO

L0 = {"hostname": "vm", "kernel": "6.18.44-fc-v669", "machine": "x86_64",
      "cpu": {"vendor": "AuthenticAMD", "model": "AMD EPYC", "vmx": False, "svm": True, "hypervisor": True, "cpus": 2},
      "kvm": {"present": True, "openable": True, "modules": ["kvm", "kvm_pvm"], "nested": {}},
      "qemu": {"x86_64": "7.2.22", "i386": "7.2.22"},
      "accel": {"x86_64": {"chosen": "tcg", "reason": "a standard guest does not boot under /dev/kvm"},
                "i386": {"chosen": "tcg", "reason": "same"}}}
L1 = {"hostname": "kvm-host", "kernel": "6.1.0-41-cloud-amd64", "machine": "x86_64",
      "cpu": {"vendor": "AuthenticAMD", "model": "QEMU Virtual CPU version 2.5+", "vmx": False, "svm": True,
              "hypervisor": True, "cpus": 1},
      "kvm": {"present": True, "openable": True, "modules": ["kvm", "kvm_amd"], "nested": {"kvm_amd": "1"}},
      "qemu": {"x86_64": "7.2.22", "i386": "7.2.22"},
      "accel": {"x86_64": {"chosen": "kvm", "reason": "a tiny x86_64 guest booted under KVM in 6.1 s"},
                "i386": {"chosen": "tcg", "reason": "known failure, not tried: emulated SVM"}}}
TINY = "scenarios/test_boot.py::test_tiny_guest_boots_and_answers_over_serial[tiny-x86_64-serial]"
I386 = "scenarios/test_boot.py::test_tiny_guest_boots_and_answers_over_serial[tiny-i386-serial]"
PV = "scenarios/test_paravirt.py::test_kvm_guest_takes_every_pv_path[x86_64-L1]"


def _doc(host: dict[str, Any], outcomes: dict[str, str], run_id: str, started: str) -> dict[str, Any]:
    cells = [{"nodeid": n, "scenario": rp.scenario_of(n), "config": "default", "params": {}, "coords": {},
              "markers": [], "outcome": o, "reason": "needs KVM: level 1 runs under TCG" if o == "skip" else None,
              "worker": None, "started": started, "duration_seconds": 1.0, "phases": {}, "facts": {}, "guests": [],
              "l1_host": None, "artifacts": {"serial_logs": []}, "longrepr": None} for n, o in outcomes.items()]
    return {"schema": rp.REPORT_SCHEMA, "schema_version": rp.SCHEMA_VERSION,
            "run": {"id": run_id, "started": started, "finished": started, "duration_seconds": 1.0, "tier": "nightly",
                    "shard": None, "workers": 0, "pytest_args": [], "exit_status": 0, "interrupted": False,
                    "nestbed_version": "0.1.0"},
            "host": host, "l1_hosts": [], "summary": rp.summarize(cells), "deselected": [], "cells": cells}


def _write(path: Path, doc: dict[str, Any]) -> Path:
    render.write_report(doc, path)
    return path


def _in_l1_report(tmp_path: Path) -> Path:
    """A report as nestbed inside the L1 leaves it, then labelled as SelfHosted.report does."""
    out = _write(tmp_path / "kvm", _doc(L1, {TINY: "pass", PV: "pass"}, "kvm", "2026-12-02T02:00:00Z"))
    selfhost.label_report(out, selfhost.host_kind(L1, L0, Accel.TCG))
    return out


# --- the host kind of a report ----------------------------------------------------------------------

def test_the_label_says_where_the_kvm_comes_from() -> None:
    assert selfhost.kind_label("kvm", Accel.TCG) == "KVM host, emulated SVM"
    assert selfhost.kind_label("kvm", Accel.KVM) == "KVM host, nested KVM (an L1 of a KVM host)"
    # An L1 whose own probe found no KVM is not called a KVM host.
    assert selfhost.kind_label("tcg", Accel.TCG).startswith("TCG host inside an L1")
    kind = selfhost.host_kind(L1, L0, Accel.TCG)
    assert kind["accel"] == "kvm" and kind["emulated"] is True and kind["runner"] == "in-l1"
    assert "TCG's emulation of AMD SVM, not hardware" in kind["how"] and "QEMU 7.2.22" in kind["how"]
    assert kind["l0"] == {"hostname": "vm", "accel": "tcg", "cpu": "AMD EPYC", "qemu": "7.2.22"}


def test_a_report_without_a_kind_gets_one_from_its_probe_and_keeps_its_key() -> None:
    assert rp.host_kind(L0) == {"label": "TCG host (no usable KVM)", "accel": "tcg", "explicit": False}
    assert rp.host_kind(L1)["label"] == "KVM host" and rp.host_kind({})["label"] == "unknown host kind"
    # Keys of reports without host.kind are what they were: last night's fleet still matches tonight's.
    assert rp.host_key(L0) == "AMD EPYC | 6.18.44-fc-v669 | QEMU 7.2.22"
    labelled = {**L1, "kind": selfhost.host_kind(L1, L0, Accel.TCG)}
    assert rp.host_key(labelled) == "KVM host, emulated SVM | QEMU Virtual CPU version 2.5+ | 6.1.0-41-cloud-amd64 | QEMU 7.2.22"


def test_labelling_rewrites_the_report_and_its_pages(tmp_path: Path) -> None:
    out = _in_l1_report(tmp_path)
    doc = json.loads((out / "report.json").read_text())
    assert doc["host"]["kind"]["label"] == "KVM host, emulated SVM" and "_source" not in doc
    assert rp.validate(doc) == []
    assert 'class="kind"' in (out / "index.html").read_text()
    assert "Host kind: **KVM host, emulated SVM**" in (out / "summary.md").read_text()


# --- the fleet with both host kinds ---------------------------------------------------------------------

def test_the_fleet_shows_both_host_kinds_and_each_cells_verdict_per_kind(tmp_path: Path) -> None:
    l0 = _write(tmp_path / "l0", _doc(L0, {TINY: "pass", I386: "pass", PV: "skip"}, "l0", "2026-12-02T01:00:00Z"))
    kvm = _in_l1_report(tmp_path)
    fleet = rp.merge([rp.load(l0), rp.load(kvm)])
    paths = render.write_fleet(fleet, tmp_path / "fleet")
    rows = {h["kind"]["label"]: h for h in fleet["hosts"]}
    assert set(rows) == {"TCG host (no usable KVM)", "KVM host, emulated SVM"}
    assert {n: c["outcome"] for n, c in rows["TCG host (no usable KVM)"]["cells"].items()} == \
        {TINY: "pass", I386: "pass", PV: "skip"}
    assert {n: c["outcome"] for n, c in rows["KVM host, emulated SVM"]["cells"].items()} == {TINY: "pass", PV: "pass"}
    assert rows["KVM host, emulated SVM"]["summary"]["pass"] == 2 and rows["TCG host (no usable KVM)"]["summary"]["skip"] == 1
    assert fleet["summary"]["total"] == 5
    page = paths["html"].read_text()
    assert page.count('<th class="kind"') == 2 and "KVM host, emulated SVM" in page and "TCG host (no usable KVM)" in page
    # The PV cell: one verdict per host kind, in that kind's row.
    pv = re.findall(r'data-nodeid="' + re.escape(PV) + r'" data-host="([^"]+)" data-outcome="(\w+)"', page)
    assert sorted(pv) == sorted([(rows["KVM host, emulated SVM"]["key"], "pass"),
                                 (rows["TCG host (no usable KVM)"]["key"], "skip")])
    assert page.count('class="na"') == 1  # the i386 cell did not run on the KVM host kind
    md = paths["md"].read_text()
    header = next(line for line in md.splitlines() if line.startswith("| cell |"))
    assert header == "| cell | TCG host (no usable KVM) | KVM host, emulated SVM |"  # rows sort by key: AMD < KVM
    assert f"| `{PV}` | ⏭️ skip | ✅ pass |" in md and f"| `{I386}` | ✅ pass | — |" in md
    assert ("- **KVM host, emulated SVM**: QEMU Virtual CPU version 2.5+, kernel 6.1.0-41-cloud-amd64, QEMU 7.2.22"
            " — 2 pass  \n  nestbed inside an L1") in md
    assert "- **TCG host (no usable KVM)**: AMD EPYC, kernel 6.18.44-fc-v669, QEMU 7.2.22 — 2 pass, 1 skip\n" in md
    # A fleet merges again and diffs by host kind: the same two rows, no change.
    again = rp.merge([rp.load(tmp_path / "fleet")])
    assert [h["key"] for h in again["hosts"]] == [h["key"] for h in fleet["hosts"]]
    d = rp.diff(rp.load(tmp_path / "fleet"), again)
    assert not (d.regressions or d.changes or d.hosts_only_new or d.hosts_only_old)


def test_a_regression_on_the_kvm_host_kind_is_reported_on_its_row(tmp_path: Path) -> None:
    l0 = rp.load(_write(tmp_path / "l0", _doc(L0, {PV: "skip"}, "l0", "2026-12-01T01:00:00Z")))
    old = rp.merge([l0, rp.load(_in_l1_report(tmp_path))])
    broken = _write(tmp_path / "kvm2", _doc(L1, {TINY: "pass", PV: "fail"}, "kvm2", "2026-12-02T02:00:00Z"))
    selfhost.label_report(broken, selfhost.host_kind(L1, L0, Accel.TCG))
    new = rp.merge([l0, rp.load(broken)])
    d = rp.diff(old, new)
    assert [(c.host.split(" | ")[0], c.nodeid, c.old, c.new) for c in d.regressions] == [
        ("KVM host, emulated SVM", PV, "pass", "fail")]


# --- bringing a report out of the L1 (pure parts) --------------------------------------------------------

def test_report_runs_get_their_out_inside_and_one_process() -> None:
    assert selfhost.is_report_run(["report", "--tier", "smoke"]) and not selfhost.is_report_run(["report", "merge"])
    assert not selfhost.is_report_run(["probe"]) and not selfhost.is_report_run([])
    argv = ["report", "--tier", "kvm-l1", "--out", "/l0/out", "--", "-k", "x", "--out", "pytest's own"]
    assert selfhost.split_out(argv) == (["report", "--tier", "kvm-l1", "--", "-k", "x", "--out", "pytest's own"],
                                        "/l0/out")
    assert selfhost.split_out(["report", "--out=/a"]) == (["report"], "/a")
    assert selfhost.inner_report_argv(argv, "/in/r") == ["report", "--tier", "kvm-l1", "--out", "/in/r", "-n", "0",
                                                         "--", "-k", "x", "--out", "pytest's own"]
    assert selfhost.inner_report_argv(["report", "-n", "2"], "/in/r") == ["report", "-n", "2", "--out", "/in/r"]


def test_a_fetched_report_cannot_write_outside_its_directory(tmp_path: Path) -> None:
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        data = b"{}"
        for name in ("report.json", "../escaped.txt"):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with pytest.raises(tarfile.OutsideDestinationError):
        selfhost.safe_extract(buf.getvalue(), tmp_path / "out")
    assert not (tmp_path / "escaped.txt").exists()


# --- host kinds in the matrix and in CI ------------------------------------------------------------------

MINI = """
version = 1
[axes.arch]
params = ["arch"]
values = ["x86_64", "i386"]
default = "x86_64"
[tiers.smoke]
markers = ["smoke"]
[tiers.nightly]
markers = ["smoke", "nightly"]
shards = 2
[hosts.k]
label = "KVM host, emulated SVM"
accel = "kvm"
runner = "in-l1"
markers = ["smoke"]
strict = true
ci_tiers = ["nightly"]
images = ["tiny-x86_64", "debian-x86_64"]
timeout = 600
"""


def test_a_host_kind_is_one_more_job_of_its_ci_tier_and_only_of_it() -> None:
    m = mx.parse_matrix(MINI, "m.toml")
    assert m.hosts["k"] == mx.HostKind("k", "KVM host, emulated SVM", "kvm", "in-l1",
                                       mx.Tier("k", ("smoke",), strict=True), ("nightly",),
                                       ("tiny-x86_64", "debian-x86_64"), 600)
    # Its cells are a tier named after it: `report --tier k` there, rules with tiers = ["k"].
    assert m.tier("k") == m.hosts["k"].cells and m.hosts["k"].tier == "k" and set(m.tiers) == {"smoke", "nightly"}
    assert mx.github_matrix(m, "nightly")["include"] == [
        {"tier": "nightly", "shard": "1/2", "index": 1, "total": 2, "host": "", "label": "shard 1/2"},
        {"tier": "nightly", "shard": "2/2", "index": 2, "total": 2, "host": "", "label": "shard 2/2"},
        {"tier": "k", "shard": "1/1", "index": 3, "total": 1, "host": "k", "label": "KVM host, emulated SVM"}]
    # Tiers that reach no other host kind keep their plain shard entries.
    assert mx.github_matrix(m, "smoke")["include"] == [{"tier": "smoke", "shard": "1/1", "index": 1, "total": 1}]
    assert mx.in_l1_args(m.hosts["k"]) == ["--image", "tiny-x86_64", "--image", "debian-x86_64", "--timeout", "600"]


@pytest.mark.parametrize(("change", "key", "reason"), [
    (('accel = "kvm"', 'accel = "xen"'), "hosts.k.accel", "expected one of ['tcg', 'kvm']"),
    (('runner = "in-l1"', 'runner = "ssh"'), "hosts.k.runner", "expected one of ['in-l1']"),
    (('markers = ["smoke"]\nstrict = true\n', ''), "hosts.k", "selects nothing"),
    (('[hosts.k]', '[hosts.smoke]'), "hosts.smoke", "a host kind's name is the tier of its cells"),
    (('ci_tiers = ["nightly"]', 'ci_tiers = ["weekly"]'), "hosts.k.ci_tiers", "unknown tier 'weekly'"),
    (('timeout = 600', 'timeout = 0'), "hosts.k.timeout", "expected a positive number of seconds"),
    (('label = "KVM host, emulated SVM"', 'colour = "red"'), "hosts.k.colour", "unknown key"),
    (('[hosts.k]', '[[exclude]]\ntiers = ["q"]\narch = "i386"\nreason = "r"\n[hosts.k]'), "exclude[0].tiers",
     "unknown tier 'q' (tiers: smoke, nightly, k)"),
    (('label = "KVM host, emulated SVM"\n', ''), "hosts.k.label", "missing or not a string"),
])
def test_a_bad_host_kind_is_one_line_with_its_key(change: tuple[str, str], key: str, reason: str) -> None:
    with pytest.raises(mx.MatrixError) as exc:
        mx.parse_matrix(MINI.replace(*change), "m.toml")
    assert str(exc.value).startswith(f"m.toml: {key}: {reason}"), str(exc.value)


def _cells() -> list[mx.Cell]:
    return [mx.Cell(TINY, {"guest": "tiny-x86_64-serial", "image": "tiny-x86_64", "via": "serial", "arch": "x86_64"},
                    frozenset({"smoke"})),
            mx.Cell(I386, {"guest": "tiny-i386-serial", "image": "tiny-i386", "via": "serial", "arch": "i386"},
                    frozenset({"smoke"})),
            mx.Cell("scenarios/test_boot.py::test_debian_boots_with_its_arch_bitness_and_spec[x86_64-L2-ssh]",
                    {"arch": "x86_64", "level": "2", "via": "ssh"}, frozenset({"smoke"})),
            mx.Cell("scenarios/test_firmware.py::test_firmware_boots_the_disk_through_its_bootloader[uefi-x86_64]",
                    {"firmware": "uefi", "arch": "x86_64"}, frozenset({"smoke"})),
            mx.Cell("scenarios/test_paravirt.py::test_kvm_pv_feature_switched_off_is_not_used[pv-eoi]",
                    {"feature": "-kvm-pv-eoi"}, frozenset({"smoke"})),
            mx.Cell(PV, {"arch": "x86_64", "level": "1"}, frozenset({"nightly"})),
            mx.Cell("scenarios/test_paravirt.py::test_kvm_guest_takes_every_pv_path[i386-L1]",
                    {"arch": "i386", "level": "1"}, frozenset({"nightly"})),
            mx.Cell("scenarios/test_paravirt.py::test_virtio_devices_bind_and_move_checksummed_data[L1]",
                    {"level": "1"}, frozenset({"smoke"}))]


def test_the_kvm_host_kind_of_the_real_matrix_runs_the_cells_that_fit() -> None:
    m = mx.load_matrix(REPO / "scenarios" / "matrix.toml")
    host = m.hosts["kvm-l1"]
    assert host.label == selfhost.kind_label("kvm", Accel.TCG)  # the CI job's name is the report row's label
    assert (host.accel, host.runner, host.tier, host.ci_tiers) == ("kvm", "in-l1", "kvm-l1", ("nightly",))
    assert {"tiny-x86_64", "debian-x86_64"} <= set(host.images)
    sel = mx.select(m, _cells(), host.tier)
    assert [c.nodeid for c, _ in sel.selected] == [
        TINY, PV, "scenarios/test_paravirt.py::test_virtio_devices_bind_and_move_checksummed_data[L1]"]
    why = {c.nodeid.split("::")[1]: reason for c, reason in sel.deselected}
    assert all(r.startswith("matrix exclude[") for r in why.values()), why  # each says why it does not fit
    assert "32-bit" in why[I386.split("::")[1]] and "L3" in why["test_debian_boots_with_its_arch_bitness_and_spec[x86_64-L2-ssh]"]
    # The nightly CI run has it as one more job; the smoke tier (make report) does not.
    jobs = mx.github_matrix(m, "nightly")["include"]
    assert jobs[-1] == {"tier": "kvm-l1", "shard": "1/1", "index": m.tiers["nightly"].shards + 1, "total": 1,
                        "host": "kvm-l1", "label": "KVM host, emulated SVM"}
    assert all("host" not in e for e in mx.github_matrix(m, "smoke")["include"])


def test_what_differs_per_host_kind_is_declared_with_a_reason() -> None:
    """Level-1 paravirt skips on the TCG host kind (declared there) and must pass on the KVM one (strict tier)."""
    import datetime

    m = mx.load_matrix(REPO / "scenarios" / "matrix.toml")
    coords = mx.coordinates(m, mx.Cell(PV, {"arch": "x86_64", "level": "1"}))
    today = datetime.date(2026, 12, 2)
    on_tcg = mx.declared(m, PV, coords, "skip", tier="nightly", host="tcg", today=today)
    assert on_tcg.rule is not None and "TCG host kind has none" in on_tcg.rule.reason
    on_kvm = mx.declared(m, PV, coords, "skip", tier="kvm-l1", host="kvm", today=today)
    assert on_kvm.rule is None and m.tier("kvm-l1").strict


def _report_args(**kw: Any) -> argparse.Namespace:
    base = {"tier": None, "shard": None, "numprocesses": "auto", "out": None, "matrix": None, "scenarios": None,
            "max_time": 7200.0, "command": [], "host": "kvm-l1"}
    return argparse.Namespace(**{**base, **kw})


def test_report_on_a_host_kind_is_nestbed_in_l1_with_its_images_and_tier(tmp_path: Path) -> None:
    m = mx.load_matrix(REPO / "scenarios" / "matrix.toml")
    host = m.hosts["kvm-l1"]
    argv = report_cli.host_kind_argv(_report_args(shard="1/1", command=["-k", "tiny"]), host, tmp_path / "r")
    assert argv[1:4] == ["-m", "harness", "in-l1"]
    sep = argv.index("--")
    assert argv[4:sep] == mx.in_l1_args(host)
    assert argv[sep + 1:] == ["report", "--tier", "kvm-l1", "--out", str(tmp_path / "r"), "--max-time", "7200.0",
                              "--shard", "1/1", "--", "-k", "tiny"]
    with pytest.raises(rp.UsageError, match="no \\[hosts.nope\\]"):
        report_cli.cmd_report_on_host(_report_args(host="nope"), m)
    with pytest.raises(rp.UsageError, match="not carried"):
        report_cli.cmd_report_on_host(_report_args(matrix=str(tmp_path / "m.toml")), m)


def test_the_nightly_workflow_runs_the_host_kind_as_a_job_and_merges_it() -> None:
    import yaml

    wf = yaml.safe_load((REPO / ".github/workflows/nightly.yml").read_text())
    shard = wf["jobs"]["shard"]
    run = next(s["run"] for s in shard["steps"] if "nestbed report --tier" in s.get("run", ""))
    assert "${{ matrix.host && format('--host {0}', matrix.host) || '' }}" in run
    assert "--out reports/shard-${{ matrix.index }}" in run  # uploaded as report-shard-N, merged from shards/*
    assert "matrix.label" in shard["name"]
    text = (REPO / ".github/workflows/nightly.yml").read_text()
    used = set(re.findall(r"\$\{\{[^}]*?matrix\.(\w+)", text)) | set(re.findall(r"&& matrix\.(\w+)", text))
    for entry in mx.github_matrix(mx.load_matrix(REPO / "scenarios" / "matrix.toml"), "nightly")["include"]:
        assert used <= set(entry), (used, entry)
    merge = " ".join(s.get("run", "") for s in wf["jobs"]["merge"]["steps"])
    assert "nestbed report merge --skip-missing shards/*" in merge


def test_an_image_parameter_gives_its_arch_so_the_i386_rules_see_it() -> None:
    """test_boot's tiny cells are parametrized by `image` (not the `guest` fixture): tiny-i386 is an i386 cell,
    which the kvm-l1 host kind excludes."""
    flat = mx.flatten_params({"image": "tiny-i386"})
    assert flat == {"image": "tiny-i386", "arch": "i386"} and mx.config_label(flat) == "image=tiny-i386"
    assert mx.flatten_params({"image": "tiny-i386", "arch": "x86_64"})["arch"] == "x86_64"  # an arch param wins
    assert mx.flatten_params({"image": "appliance-web"}) == {"image": "appliance-web"}
    m = mx.load_matrix(REPO / "scenarios" / "matrix.toml")
    sel = mx.select(m, [mx.Cell(I386, flat, frozenset({"smoke"}))], "kvm-l1")
    assert not sel.selected and "32-bit" in sel.deselected[0][1]
    assert mx.select(m, [mx.Cell(I386, flat, frozenset({"smoke"}))], "smoke").selected  # L0 still runs it
