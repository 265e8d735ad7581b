"""Run reports: ``report.json`` (schema ``harness/reports/report_schema.json``), fleet merges and diffs.

The pytest side (``fixtures/reporting.py``) hands this module plain dicts, one per test phase
(:func:`cell_from_phases`); everything here is pure data in, files out, so it is tested without
pytest or QEMU.  Rendering (HTML, Markdown) is :mod:`harness.reports.render`.

A report directory holds ``report.json``, ``junit.xml``, ``index.html``, ``summary.md``,
``pytest.log`` and ``logs/`` (the guests' serial logs).  A fleet directory (``nestbed report
merge``) holds ``fleet.json``, ``index.html`` and ``summary.md``: one row per host kind (:func:`host_kind`,
:func:`host_key`), each with its own verdict of every cell.
"""

from __future__ import annotations

import json
import os
import re
import socket
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.core.paths import safe_name
from harness.errors import UsageError, headline

SCHEMA_VERSION = 1
REPORT_SCHEMA = "nestbed-report"
FLEET_SCHEMA = "nestbed-fleet"
SCHEMA_FILE = Path(__file__).with_name("report_schema.json")
OUTCOMES = ("pass", "fail", "error", "skip", "xfail", "xpass")
BAD = frozenset({"fail", "error"})
LONGREPR_LIMIT = 8000  # characters of a failure's traceback kept in report.json


class ReportError(UsageError):
    """A report that cannot be read: missing, not JSON, wrong schema (CLI exit 125)."""


def utc_stamp(t: float | None = None) -> str:
    """``20261125T070102Z``: sortable, no colons (a directory name on any file system)."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(t))


def iso(t: float | None = None) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def default_report_dir(base: Path, host: str | None = None, t: float | None = None) -> Path:
    """``<base>/<UTC timestamp>-<host>``."""
    name = safe_name(host or socket.gethostname())
    return base / f"{utc_stamp(t)}-{name}"


# --- cells from pytest phases --------------------------------------------------------------

def scenario_of(nodeid: str) -> str:
    """The scenario a cell belongs to: the node id without its parametrization."""
    return nodeid.split("[", 1)[0]


def cell_from_phases(phases: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One report cell from the phase dicts (setup/call/teardown) of one test.

    A phase dict: ``when``, ``outcome`` (passed/failed/skipped), ``duration``, ``nodeid``, and
    optionally ``wasxfail``, ``skip_reason``, ``crash``, ``longrepr``, ``worker``, ``start``,
    ``user_properties`` (a list of (name, value) pairs: ``nestbed``, ``nestbed-cell``,
    ``nestbed-l1``).
    """
    if not phases:
        raise ValueError("a cell needs at least one phase")
    nodeid = phases[0]["nodeid"]
    by_when = {p["when"]: p for p in phases}
    outcome, reason, longrepr = "pass", None, None
    setup, call, teardown = by_when.get("setup"), by_when.get("call"), by_when.get("teardown")
    if setup is not None and setup["outcome"] == "failed":
        outcome, reason, longrepr = "error", setup.get("crash") or "error in setup", setup.get("longrepr")
    elif setup is not None and setup["outcome"] == "skipped":
        if setup.get("wasxfail") is not None:
            outcome, reason = "xfail", setup.get("wasxfail") or "expected failure"
        else:
            outcome, reason = "skip", setup.get("skip_reason")
    elif call is not None:
        if call["outcome"] == "failed":
            outcome, reason, longrepr = "fail", call.get("crash"), call.get("longrepr")
            if call.get("wasxfail") is not None:  # strict xfail that passed shows as failed
                outcome = "xpass"
        elif call["outcome"] == "skipped":
            if call.get("wasxfail") is not None:
                outcome, reason = "xfail", call.get("wasxfail") or "expected failure"
            else:
                outcome, reason = "skip", call.get("skip_reason")
        elif call.get("wasxfail") is not None:
            outcome, reason = "xpass", call.get("wasxfail") or None
    if teardown is not None and teardown["outcome"] == "failed" and outcome not in BAD:
        outcome, reason, longrepr = "error", teardown.get("crash") or "error in teardown", teardown.get("longrepr")

    props: dict[str, Any] = {}
    for p in phases:
        for name, value in p.get("user_properties") or []:
            if name == "nestbed" and isinstance(value, dict):
                # setup records guests of a failed setup; call records everything: keep the richest.
                have = props.get("nestbed", {})
                if len(value.get("facts", {})) + len(value.get("guests", [])) >= \
                        len(have.get("facts", {})) + len(have.get("guests", [])):
                    props["nestbed"] = value
            else:
                props[name] = value
    meta = props.get("nestbed-cell") or {}
    nb = props.get("nestbed") or {}
    guests = list(nb.get("guests") or [])
    starts = [p["start"] for p in phases if p.get("start")]
    return {
        "nodeid": nodeid,
        "scenario": meta.get("scenario") or scenario_of(nodeid),
        "config": meta.get("config") or "default",
        "params": dict(meta.get("params") or {}),
        "coords": dict(meta.get("coords") or {}),
        "markers": list(meta.get("markers") or []),
        "outcome": outcome,
        "reason": str(reason)[:2000] if reason else None,
        "worker": next((p.get("worker") for p in phases if p.get("worker")), None),
        "started": iso(min(starts)) if starts else None,
        "duration_seconds": round(sum(float(p.get("duration") or 0.0) for p in phases), 3),
        "phases": {p["when"]: round(float(p.get("duration") or 0.0), 3) for p in phases},
        "facts": dict(nb.get("facts") or {}),
        "guests": guests,
        "l1_host": props.get("nestbed-l1"),
        "artifacts": {"serial_logs": [g["serial_log"] for g in guests if g.get("serial_log")],
                      "screenshots": screenshots_in(str(longrepr or ""))},
        "longrepr": (str(longrepr)[-LONGREPR_LIMIT:] if longrepr else None),
    }


# harness.images.disk.GuestNotReached says where the screen of a guest that was never reached was saved.
SCREENSHOT_RE = re.compile(r"its screen then: (\S+\.(?:png|ppm))")


def screenshots_in(text: str) -> list[str]:
    """The screenshots a failure's text names (QMP screendumps of guests that never became reachable)."""
    return list(dict.fromkeys(SCREENSHOT_RE.findall(text)))


def summarize(cells: Iterable[Mapping[str, Any]]) -> dict[str, int]:
    counts = {o: 0 for o in OUTCOMES}
    total = 0
    for c in cells:
        counts[c["outcome"]] += 1
        total += 1
    return {"total": total, **counts}


@dataclass
class RunInfo:
    """What the run was: filled by the plugin, rendered at the top of every view."""

    started: float
    finished: float
    tier: str | None = None
    shard: str | None = None
    workers: int = 0
    pytest_args: list[str] = field(default_factory=list)
    exit_status: int | None = None
    interrupted: bool = False


def _relativize(path: str | None, base: Path) -> str | None:
    """Serial logs inside the report directory are stored relative to it (the directory moves as one)."""
    if not path:
        return path
    try:
        return os.path.relpath(Path(path).resolve(), base.resolve()) if Path(path).resolve().is_relative_to(
            base.resolve()) else path
    except (OSError, ValueError):
        return path


def build_report(cells: Sequence[dict[str, Any]], run: RunInfo, host: Mapping[str, Any],
                 *, out_dir: Path, l1_hosts: Sequence[Mapping[str, Any]] = (),
                 deselected: Sequence[Mapping[str, str]] = ()) -> dict[str, Any]:
    """The report.json document (see docs/reports.md and harness/reports/report_schema.json)."""
    from harness.core import __version__

    fixed = []
    for c in cells:
        c = dict(c)
        c["guests"] = [{**g, "serial_log": _relativize(g.get("serial_log"), out_dir)} for g in c["guests"]]
        c["artifacts"] = {"serial_logs": [_relativize(p, out_dir) for p in c["artifacts"]["serial_logs"]],
                          "screenshots": [_relativize(p, out_dir) for p in c["artifacts"].get("screenshots", [])]}
        fixed.append(c)
    return {
        "schema": REPORT_SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "run": {
            "id": out_dir.name,
            "started": iso(run.started),
            "finished": iso(run.finished),
            "duration_seconds": round(run.finished - run.started, 1),
            "tier": run.tier,
            "shard": run.shard,
            "workers": run.workers,
            "pytest_args": list(run.pytest_args),
            "exit_status": run.exit_status,
            "interrupted": run.interrupted,
            "nestbed_version": __version__,
        },
        "host": dict(host),
        "l1_hosts": [dict(h) for h in l1_hosts],
        "summary": summarize(fixed),
        "deselected": [dict(d) for d in deselected],
        "cells": fixed,
    }


def validate(doc: Mapping[str, Any]) -> list[str]:
    """Schema problems of a report.json document (empty: valid).  Needs ``jsonschema``."""
    import jsonschema

    schema = json.loads(SCHEMA_FILE.read_text())
    validator = jsonschema.Draft202012Validator(schema)
    return [f"{'/'.join(str(p) for p in e.absolute_path) or '<root>'}: {e.message}"
            for e in sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))]


# --- reading, merging, diffing -------------------------------------------------------------

def load(path: Path | str) -> dict[str, Any]:
    """A report.json or fleet.json (or a directory holding one), checked for its schema and version."""
    p = Path(path)
    if p.is_dir():
        for name in ("report.json", "fleet.json"):
            if (p / name).is_file():
                p = p / name
                break
        else:
            raise ReportError(f"{path}: no report.json or fleet.json in this directory")
    try:
        doc = json.loads(p.read_text())
    except OSError as exc:
        raise ReportError(f"{p}: cannot read: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise ReportError(f"{p}: not valid JSON: {exc}") from None
    if not isinstance(doc, dict) or doc.get("schema") not in (REPORT_SCHEMA, FLEET_SCHEMA):
        raise ReportError(f"{p}: not a nestbed report (no \"schema\": \"{REPORT_SCHEMA}\")")
    if doc.get("schema_version") != SCHEMA_VERSION:
        raise ReportError(f"{p}: schema_version {doc.get('schema_version')!r} is not supported "
                          f"(this nestbed reads {SCHEMA_VERSION})")
    key = "cells" if doc["schema"] == REPORT_SCHEMA else "hosts"
    if not isinstance(doc.get(key), list):
        raise ReportError(f"{p}: {key}: missing or not a list")
    doc["_source"] = str(p)
    return doc


# What a host kind is called when its report does not say (``host.kind`` is absent): from the probe's
# x86_64 verdict, i.e. what level 0 ran the guests under.
DERIVED_KIND_LABELS = {"kvm": "KVM host", "tcg": "TCG host (no usable KVM)"}


def host_kind(host: Mapping[str, Any]) -> dict[str, Any]:
    """A report's host kind: ``{label, accel, explicit}``.

    A report made somewhere that knows more than its probe (nestbed inside an L1: "KVM host, emulated
    SVM") carries ``host.kind`` with a ``label``; otherwise the kind follows from the probe's x86_64
    verdict (:data:`DERIVED_KIND_LABELS`).  ``accel`` is what ``[[expect]] host = ...`` matched.
    """
    kind = host.get("kind")
    verdict = ((host.get("accel") or {}).get("x86_64") or {}).get("chosen")
    if isinstance(kind, Mapping) and isinstance(kind.get("label"), str) and kind["label"]:
        return {**kind, "accel": kind.get("accel", verdict), "explicit": True}
    label = DERIVED_KIND_LABELS.get(str(verdict), "unknown host kind") if verdict else "unknown host kind"
    return {"label": label, "accel": verdict, "explicit": False}


def host_key(host: Mapping[str, Any]) -> str:
    """What makes two hosts the same row of a fleet grid: CPU model, kernel, QEMU version; led by the host
    kind's label when the report names one (``host.kind``: an L1 that ran nestbed must not share a row
    with a machine of the same CPU model, kernel and QEMU)."""
    cpu = host.get("cpu") or {}
    qemu = host.get("qemu") or {}
    qv = qemu.get("x86_64") if isinstance(qemu, dict) else qemu
    kind = host_kind(host)
    return " | ".join([*([kind["label"]] if kind["explicit"] else []), str(cpu.get("model") or "unknown CPU"),
                       str(host.get("kernel") or "unknown kernel"), f"QEMU {qv or 'unknown'}"])


def as_hosts(doc: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Fleet rows of a report or fleet document: ``{key, host, runs, cells: {nodeid: cell}}``."""
    if doc["schema"] == FLEET_SCHEMA:
        return [dict(h) for h in doc["hosts"]]
    host = doc.get("host") or {}
    run = doc.get("run") or {}
    return [{"key": host_key(host), "kind": host_kind(host), "hostnames": [host.get("hostname") or "?"], "host": host,
             "runs": [{"id": run.get("id"), "tier": run.get("tier"), "shard": run.get("shard"),
                       "started": run.get("started"), "source": doc.get("_source")}],
             "cells": {c["nodeid"]: _fleet_cell(c, doc.get("_source")) for c in doc["cells"]}}]


def _fleet_cell(cell: Mapping[str, Any], source: str | None) -> dict[str, Any]:
    keep = ("nodeid", "scenario", "config", "outcome", "reason", "duration_seconds")
    out = {k: cell.get(k) for k in keep}
    out["source"] = source
    return out


def merge(docs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Many reports (hosts, shards, earlier merges) into one fleet document.

    Reports of the same host key (e.g. the shards of one CI host kind) become one row; when
    two reports carry the same cell for the same host, the later run wins.
    """
    rows: dict[str, dict[str, Any]] = {}
    order = sorted(docs, key=lambda d: str((d.get("run") or {}).get("started") or d.get("generated") or ""))
    for doc in order:
        for h in as_hosts(doc):
            row = rows.setdefault(h["key"], {"key": h["key"], "kind": h.get("kind") or host_kind(h["host"]),
                                             "hostnames": [], "host": h["host"], "runs": [], "cells": {}})
            for name in h.get("hostnames", []):
                if name not in row["hostnames"]:
                    row["hostnames"].append(name)
            row["runs"].extend(h.get("runs", []))
            row["cells"].update(h["cells"])
    for row in rows.values():
        row["summary"] = summarize(row["cells"].values())
    hosts = sorted(rows.values(), key=lambda r: r["key"])
    return {"schema": FLEET_SCHEMA, "schema_version": SCHEMA_VERSION, "generated": iso(),
            "sources": [str(d.get("_source")) for d in docs], "hosts": hosts,
            "summary": summarize(c for h in hosts for c in h["cells"].values())}


@dataclass
class Change:
    host: str
    nodeid: str
    old: str | None
    new: str | None
    reason: str | None = None


@dataclass
class Diff:
    regressions: list[Change] = field(default_factory=list)   # fails now, did not; or passed, skips/xfails now
    fixes: list[Change] = field(default_factory=list)         # failed, passes now
    changes: list[Change] = field(default_factory=list)       # other outcome changes (skip -> pass, ...)
    new_failures: list[Change] = field(default_factory=list)  # cells only in NEW, failing
    added: list[Change] = field(default_factory=list)
    removed: list[Change] = field(default_factory=list)
    hosts_only_old: list[str] = field(default_factory=list)
    hosts_only_new: list[str] = field(default_factory=list)


# A cell that passed and now skips or xfails no longer shows whether it works: a new skip (the
# host lost KVM, a fixture gave up) or a new xfail marker can hide a real failure, so it counts.
HIDDEN = frozenset({"skip", "xfail"})


def is_regression(old: str, new: str) -> bool:
    """Whether a cell going from outcome *old* to *new* is a regression: it fails now and did not
    before, or it passed and now skips or xfails (its reason says why)."""
    return (new in BAD and old not in BAD) or (old == "pass" and new in HIDDEN)


def diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> Diff:
    """Cell-by-cell outcome changes from *old* to *new* (regressions: :func:`is_regression`).

    Hosts are matched by :func:`host_key`; when each side has exactly one host, those two are
    compared whatever their keys (last night's CI runner need not be tonight's).
    """
    old_hosts, new_hosts = as_hosts(old), as_hosts(new)
    pairs: list[tuple[str, dict[str, Any], dict[str, Any]]] = []
    d = Diff()
    if len(old_hosts) == 1 and len(new_hosts) == 1:
        pairs.append((new_hosts[0]["key"], old_hosts[0]["cells"], new_hosts[0]["cells"]))
    else:
        old_by = {h["key"]: h for h in old_hosts}
        new_by = {h["key"]: h for h in new_hosts}
        for key in sorted(set(old_by) | set(new_by)):
            if key not in new_by:
                d.hosts_only_old.append(key)
            elif key not in old_by:
                d.hosts_only_new.append(key)
            else:
                pairs.append((key, old_by[key]["cells"], new_by[key]["cells"]))
    for key, ocells, ncells in pairs:
        for nodeid in sorted(set(ocells) | set(ncells)):
            o, n = ocells.get(nodeid), ncells.get(nodeid)
            if o is None and n is not None:
                ch = Change(key, nodeid, None, n["outcome"], n.get("reason"))
                d.added.append(ch)
                if n["outcome"] in BAD:
                    d.new_failures.append(ch)
            elif n is None and o is not None:
                d.removed.append(Change(key, nodeid, o["outcome"], None))
            elif o is not None and n is not None and o["outcome"] != n["outcome"]:
                ch = Change(key, nodeid, o["outcome"], n["outcome"], n.get("reason") if n["outcome"] != "pass" else None)
                if is_regression(o["outcome"], n["outcome"]):
                    d.regressions.append(ch)
                elif o["outcome"] in BAD and n["outcome"] not in BAD:
                    d.fixes.append(ch)
                else:
                    d.changes.append(ch)
    return d


def render_diff(d: Diff) -> str:
    """Plain text for the terminal and CI logs."""
    lines: list[str] = []

    def section(title: str, items: list[Change]) -> None:
        if not items:
            return
        lines.append(f"{title} ({len(items)}):")
        for ch in items:
            why = f"  -- {headline(ch.reason)[:160]}" if ch.reason else ""
            lines.append(f"  {ch.old or '(absent)'} -> {ch.new or '(absent)'}  {ch.nodeid}  [{ch.host}]{why}")

    section("REGRESSIONS", d.regressions)
    section("fixes", d.fixes)
    section("other changes", d.changes)
    section("new cells failing", d.new_failures)
    if d.added:
        lines.append(f"new cells: {len(d.added)}")
    if d.removed:
        section("cells gone", d.removed)
    for k in d.hosts_only_old:
        lines.append(f"host only in OLD: {k}")
    for k in d.hosts_only_new:
        lines.append(f"host only in NEW: {k}")
    lines.append(f"{len(d.regressions)} regression(s), {len(d.fixes)} fix(es), {len(d.changes)} other change(s)")
    return "\n".join(lines)
