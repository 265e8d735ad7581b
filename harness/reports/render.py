"""Rendering of reports: a self-contained ``index.html`` (no network) and a GitHub-sized ``summary.md``.

Pure functions of the report/fleet documents built by :mod:`harness.reports.model`.  The HTML pages are
Jinja2 templates (``templates/*.html.j2``, autoescaped) fed plain dicts and lists that the functions here
prepare; the Markdown is written directly.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness.core.publish import write_atomic
from harness.errors import headline
from harness.reports.model import BAD, OUTCOMES, host_key, host_kind, summarize
from harness.reports.model import scenario_of as rp_scenario

if TYPE_CHECKING:
    import jinja2

LABEL = {"pass": "pass", "fail": "FAIL", "error": "ERROR", "skip": "skip", "xfail": "xfail", "xpass": "XPASS"}
ICON = {"pass": "✅", "fail": "❌", "error": "💥", "skip": "⏭️", "xfail": "⚠️", "xpass": "❗"}
LEVEL_COLOUR = {1: "#1976d2", 2: "#7b1fa2", 3: "#ef6c00"}
MD_ROW_LIMIT = 400  # GitHub job summaries are capped at 1 MiB; keep well below


def fmt_seconds(s: float | None) -> str:
    if s is None:
        return "-"
    if s < 60:
        return f"{s:.1f} s"
    m, sec = divmod(int(round(s)), 60)
    return f"{m}m {sec:02d}s" if m < 60 else f"{m // 60}h {m % 60:02d}m"


def _workers(run: Mapping[str, Any]) -> str:
    return f"{run['workers']} xdist worker(s)" if run.get("workers") else "one process"


# --- HTML: Jinja2 templates (templates/*.html.j2) fed plain dicts and lists ----------------------
#
# The templates hold the markup and escape every value (autoescape); the functions below do the rest:
# sorting, grouping, labels, truncation, number formatting.  jinja2 is imported only when a page is
# rendered: the CLI's matrix command runs on the standard library alone (python3 -S).

@cache
def _templates() -> jinja2.Environment:
    import jinja2

    return jinja2.Environment(loader=jinja2.PackageLoader("harness.reports", "templates"), autoescape=True,
                              undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True,
                              keep_trailing_newline=True)


def _render(template: str, context: Mapping[str, Any]) -> str:
    return _templates().get_template(template).render(context)


def _text(value: Any) -> str:
    """What a page shows for a value: nothing for a missing one."""
    return "" if value is None else str(value)


def _flatten(data: Any, prefix: str = "") -> list[tuple[str, str]]:
    """Nested facts as (dotted key, text) rows."""
    rows: list[tuple[str, str]] = []
    if isinstance(data, Mapping):
        if not data and prefix:
            rows.append((prefix, "-"))
        for k, v in data.items():
            rows.extend(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(data, list) and all(not isinstance(v, (dict, list)) for v in data):
        rows.append((prefix, ", ".join(str(v) for v in data) or "-"))
    elif isinstance(data, list):
        for i, v in enumerate(data):
            rows.extend(_flatten(v, f"{prefix}[{i}]"))
    else:
        rows.append((prefix, "-" if data is None else str(data)))
    return rows


def _counts(summary: Mapping[str, int]) -> dict[str, Any]:
    """The counts line (and legend): the total, then every outcome that occurred."""
    return {"total": summary.get("total", 0),
            "outcomes": [{"outcome": o, "label": LABEL[o], "n": summary[o]} for o in OUTCOMES if summary.get(o)]}


def _cell_title(c: Mapping[str, Any]) -> str:
    bits = [f"{c['nodeid']}", f"{LABEL[c['outcome']]} in {fmt_seconds(c.get('duration_seconds'))}"]
    if c.get("reason"):
        bits.append(headline(str(c["reason"]))[:200])
    for k, v in list((c.get("facts") or {}).items())[:8]:
        bits.append(f"{k} = {json.dumps(v)[:80]}")
    for g in c.get("guests") or []:
        bits.append(f"{g.get('image')} L{g.get('level')} {g.get('accel')} ready {fmt_seconds(g.get('ready_seconds'))}")
    return "\n".join(bits)


# The grid's columns are the configurations every scenario shares: where the guest under test ran.
PRIMARY_PARAMS = frozenset({"arch", "level", "via", "guest", "image"})


def column_of(cell: Mapping[str, Any]) -> tuple[str, str, str]:
    """(arch, level, transport) of a cell: from its deepest guest, else its matrix coordinates, else its parameters."""
    coords, params = cell.get("coords") or {}, cell.get("params") or {}
    arch = coords.get("arch") or params.get("arch") or "-"
    level = coords.get("level") or params.get("level") or "-"
    via = coords.get("transport") or params.get("via") or "-"
    guests = [g for g in cell.get("guests") or [] if isinstance(g.get("level"), int)]
    if guests:
        deepest = max(guests, key=lambda g: g["level"])
        arch, level = deepest.get("arch") or arch, str(deepest["level"])
    return str(arch), str(level), str(via)


def _column_label(col: tuple[str, str, str]) -> str:
    arch, level, via = col
    parts = [arch if arch != "-" else "", f"L{level}" if level != "-" else "", via if via != "-" else ""]
    return " · ".join(p for p in parts if p) or "any"


def _column_order(col: tuple[str, str, str]) -> tuple[int, str, str, str]:
    return ({"x86_64": 0, "i386": 1}.get(col[0], 2), col[1], col[0], {"serial": "0", "ssh": "1"}.get(col[2], col[2]))


def chip_label(cell: Mapping[str, Any]) -> str:
    """What tells a cell from others in the same grid box: its parameters beyond arch/level/transport."""
    rest = [f"{k}={v}" for k, v in (cell.get("params") or {}).items() if k not in PRIMARY_PARAMS]
    return " ".join(rest)


def _columns(cells: Iterable[Mapping[str, Any]]) -> tuple[list[str], list[tuple[str, str, str]]]:
    scenarios: list[str] = []
    cols: set[tuple[str, str, str]] = set()
    for c in cells:
        if c["scenario"] not in scenarios:
            scenarios.append(c["scenario"])
        cols.add(column_of(c))
    return scenarios, sorted(cols, key=_column_order)


def _scenario_head(scenario: str) -> dict[str, str]:
    """A scenario's header: its module (shown small) and its function."""
    module, _, func = scenario.rpartition("::")
    return {"scenario": scenario, "module": module, "func": func or scenario}


def grid(cells: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    """Scenarios (rows) x configurations (columns: arch · level · transport); one chip per cell; None without cells.

    A box holds several chips when a scenario has more cells in one configuration (``vcpus=1``,
    ``vcpus=2``); every chip shows its outcome and time, hovers with the details and links to them.
    A box without cells is None.
    """
    if not cells:
        return None
    scenarios, cols = _columns(cells)
    boxes: dict[tuple[str, tuple[str, str, str]], list[dict[str, Any]]] = {}
    for i, c in enumerate(cells):
        boxes.setdefault((c["scenario"], column_of(c)), []).append(
            {"index": i, "outcome": c["outcome"], "label": LABEL[c["outcome"]], "nodeid": c["nodeid"],
             "title": _cell_title(c), "extra": chip_label(c), "duration": fmt_seconds(c.get("duration_seconds"))})
    return {"columns": [_column_label(col) for col in cols],
            "rows": [{**_scenario_head(sc), "boxes": [boxes.get((sc, col)) for col in cols]} for sc in scenarios]}


def _reason(cell: Mapping[str, Any]) -> str:
    """A cell's reason as one line, cut to fit."""
    return headline(str(cell.get("reason") or ""))[:200]


def _guest_row(g: Mapping[str, Any]) -> dict[str, str]:
    return {"image": _text(g.get("image")), "arch": _text(g.get("arch")), "level": _text(g.get("level")),
            "accel": _text(g.get("accel")), "accel_reason": _text(g.get("accel_reason")), "vcpus": _text(g.get("vcpus")),
            "memory_mb": _text(g.get("memory_mb")), "ready": fmt_seconds(g.get("ready_seconds")),
            "serial_log": _text(g.get("serial_log")), "source": _text(g.get("source"))}


def _cell_details(i: int, c: Mapping[str, Any]) -> dict[str, Any]:
    """One cell's ``<details>``: everything the report knows about it."""
    o = c["outcome"]
    return {
        "index": i, "outcome": o, "label": LABEL[o], "open": o in BAD, "nodeid": c["nodeid"],
        "duration": fmt_seconds(c.get("duration_seconds")), "reason": _reason(c) if c.get("reason") else None,
        "config": _text(c["config"]), "worker": _text(c.get("worker") or "-"),
        "phases": ", ".join(f"{k} {v:.2f}s" for k, v in (c.get("phases") or {}).items()),
        "markers": ", ".join(c.get("markers") or []) or "-",
        "coords": [(str(k), str(v)) for k, v in (c.get("coords") or {}).items() if v is not None],
        "facts": _flatten(c["facts"]) if c.get("facts") else None,
        "guests": [_guest_row(g) for g in c.get("guests") or []],
        "l1_host": _text(c.get("l1_host")), "longrepr": _text(c.get("longrepr")),
    }


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _short(cell: Mapping[str, Any]) -> str:
    """``test_name[config]`` cut to fit a chart label."""
    func = _cut(cell["scenario"].rpartition("::")[2], 28)
    return _cut(func if cell["config"] == "default" else f"{func}[{cell['config']}]", 48)


def _boot_points(cells: Sequence[Mapping[str, Any]]) -> list[tuple[str, float, int, str]]:
    """(label, seconds, level, outcome) for every guest boot and every ``*boot_seconds`` fact."""
    points = []
    for c in cells:
        for g in c.get("guests") or []:
            if isinstance(g.get("ready_seconds"), (int, float)):
                points.append((f"{_short(c)} · {g.get('image')} L{g.get('level')} ({g.get('accel')})",
                               float(g["ready_seconds"]), int(g.get("level") or 1), c["nodeid"]))
        for k, v in (c.get("facts") or {}).items():
            if "boot" in k and k.endswith("seconds") and isinstance(v, (int, float)) and not isinstance(v, bool):
                points.append((f"{_short(c)} · {k}", float(v), 1, c["nodeid"]))
    return points


def boot_chart(cells: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    """Horizontal bars: seconds from launch to ready, one per guest, coloured by level; None without boots.

    Every coordinate is worked out here; the template only draws the SVG.
    """
    points = _boot_points(cells)
    if not points:
        return None
    label_w, bar_w, row_h = 560, 380, 20
    top = max(v for _, v, _, _ in points) or 1.0
    bars = []
    for i, (label, secs, level, nodeid) in enumerate(points):
        y = i * row_h + 4
        w = max(1.0, secs / top * bar_w)
        bars.append({"label": _cut(label, 84), "label_x": label_w - 6, "text_y": y + 13, "x": label_w, "y": y,
                     "width": f"{w:.1f}", "height": row_h - 6, "colour": LEVEL_COLOUR.get(level, "#555"),
                     "nodeid": nodeid, "seconds": f"{secs:.1f}", "value_x": f"{label_w + w + 4:.1f}"})
    axis_y = row_h * len(points) + 8
    legend = [{"level": level, "colour": colour, "x": 10 + (level - 1) * 60, "y": axis_y + 6,
               "text_x": 10 + (level - 1) * 60 + 14, "text_y": axis_y + 15}
              for level, colour in LEVEL_COLOUR.items() if any(p[2] == level for p in points)]
    return {"width": label_w + bar_w + 80, "height": row_h * len(points) + 30, "bars": bars,
            "axis": {"x1": label_w, "x2": label_w + bar_w, "y": axis_y, "label_y": axis_y + 16, "top": f"{top:.0f}"},
            "legend": legend}


def _host_rows(host: Mapping[str, Any]) -> Any:
    """The probe's facts, readable: accel verdicts spelled out first."""
    if "error" in host and len(host) == 1:
        return host
    ordered: dict[str, Any] = {}
    for k in ("hostname", "kernel", "machine", "cpu", "qemu", "accel", "kvm", "probed_at"):
        if k in host:
            ordered[k] = host[k]
    ordered.update({k: v for k, v in host.items() if k not in ordered and k != "boot_id"})
    return ordered


def report_context(doc: Mapping[str, Any]) -> dict[str, Any]:
    """What ``report.html.j2`` shows of a report: plain values, lists and dicts, ready to print."""
    run, host, cells = doc["run"], doc.get("host") or {}, doc["cells"]
    what = " ".join(x for x in [f"tier {run['tier']}" if run.get("tier") else "",
                                f"shard {run['shard']}" if run.get("shard") else ""] if x) or "scenarios"
    return {
        "title": f"nestbed report {run['id']}",
        "run": {"what": what, "hostname": _text(host.get("hostname", "?")), "host_key": host_key(host),
                "host_kind": _text(host_kind(host)["label"]), "host_kind_how": _text(host_kind(host).get("how") or ""),
                "started": _text(run["started"]), "finished": _text(run["finished"]),
                "duration": fmt_seconds(run.get("duration_seconds")), "workers": _workers(run),
                "version": _text(run.get("nestbed_version")), "schema_version": _text(doc["schema_version"]),
                "interrupted": bool(run.get("interrupted"))},
        "counts": _counts(doc["summary"]),
        "grid": grid(cells),
        "failures": [{"index": i, "outcome": c["outcome"], "nodeid": c["nodeid"], "reason": _reason(c),
                      "logs": list(c["artifacts"]["serial_logs"]),
                      "screenshots": list(c["artifacts"].get("screenshots") or [])}
                     for i, c in enumerate(cells) if c["outcome"] in BAD],
        "chart": boot_chart(cells),
        "host_rows": _flatten(_host_rows(host)),
        "l1_hosts": [{"id": _text(h.get("id")), "level": _text(h.get("level")), "l0_accel": _text(h.get("l0_accel")),
                      "rows": _flatten({"accel": h.get("accel"), "facts": h.get("facts")})}
                     for h in doc.get("l1_hosts") or []],
        "cells": [_cell_details(i, c) for i, c in enumerate(cells)],
        "deselected": [{"nodeid": _text(d["nodeid"]), "reason": _text(d["reason"])} for d in doc.get("deselected") or []],
    }


def report_html(doc: Mapping[str, Any]) -> str:
    """A run's self-contained ``index.html``."""
    return _render("report.html.j2", report_context(doc))


def _md(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def report_markdown(doc: Mapping[str, Any]) -> str:
    run, host, cells, s = doc["run"], doc.get("host") or {}, doc["cells"], doc["summary"]
    what = " ".join(x for x in [run.get("tier") or "", f"shard {run['shard']}" if run.get("shard") else ""] if x)
    counts = " · ".join(f"{ICON[o]} {s[o]} {o}" for o in OUTCOMES if s.get(o)) or "no cells"
    accel = ", ".join(f"{a} {v.get('chosen')}" for a, v in (host.get("accel") or {}).items())
    lines = [f"## nestbed report {what} on {host.get('hostname', '?')}".rstrip(), "",
             f"**{s['total']} cells**: {counts} — {fmt_seconds(run.get('duration_seconds'))}, {_workers(run)}"
             + (" — **interrupted**" if run.get("interrupted") else ""), "",
             f"Host kind: **{_md(host_kind(host)['label'])}**; host: {host_key(host)}" + (f"; accel {accel}" if accel else ""),
             ""]
    bad = [c for c in cells if c["outcome"] in BAD]
    if bad:
        lines += ["### Failures", ""]
        for c in bad:
            logs = ", ".join(f"`{p}`" for p in c["artifacts"]["serial_logs"]) or "no guest log"
            lines.append(f"- {ICON[c['outcome']]} `{c['nodeid']}`: {_md(str(c.get('reason') or '')[:200])} ({logs})")
        lines.append("")
    lines += ["| scenario | configuration | outcome | time | detail |", "| --- | --- | --- | --- | --- |"]
    for c in cells[:MD_ROW_LIMIT]:
        detail = headline(str(c.get("reason") or ""))[:120]
        lines.append(f"| `{_md(c['scenario'])}` | {_md(c['config'])} | {ICON[c['outcome']]} {c['outcome']} | "
                     f"{fmt_seconds(c.get('duration_seconds'))} | {_md(detail)} |")
    if len(cells) > MD_ROW_LIMIT:
        lines.append(f"\n… {len(cells) - MD_ROW_LIMIT} more cells in report.json")
    return "\n".join(lines) + "\n"


def _fleet_columns(hosts: Sequence[Mapping[str, Any]]) -> list[str]:
    cols: list[str] = []
    for h in hosts:
        for nodeid in h["cells"]:
            if nodeid not in cols:
                cols.append(nodeid)
    return sorted(cols)


def _fleet_row(h: Mapping[str, Any], cols: Sequence[str]) -> dict[str, Any]:
    """One host kind's row: what it is, then its outcome of every cell (None where it ran none)."""
    host = h.get("host") or {}
    qemu = host.get("qemu")
    cells: list[dict[str, str] | None] = []
    for n in cols:
        c = h["cells"].get(n)
        if c is None:
            cells.append(None)
            continue
        o = c["outcome"]
        tip = f"{n}\n{LABEL[o]} in {fmt_seconds(c.get('duration_seconds'))}\n{c.get('reason') or ''}".strip()
        cells.append({"nodeid": n, "outcome": o, "label": LABEL[o], "title": tip})
    kind = h.get("kind") or host_kind(host)
    return {"key": h["key"], "kind": _text(kind.get("label")), "how": _text(kind.get("how") or ""),
            "counts": _counts(h.get("summary") or summarize(h["cells"].values())),
            "cpu": _text((host.get("cpu") or {}).get("model", "?")), "kernel": _text(host.get("kernel")),
            "qemu": _text(qemu.get("x86_64") if isinstance(qemu, dict) else qemu),
            "hostnames": ", ".join(h.get("hostnames") or []), "runs": len(h.get("runs") or []), "cells": cells}


def fleet_context(doc: Mapping[str, Any]) -> dict[str, Any]:
    """What ``fleet.html.j2`` shows of a fleet: host kinds (rows) x cells (columns, grouped by scenario)."""
    hosts = doc["hosts"]
    cols = _fleet_columns(hosts)
    scenarios: list[dict[str, Any]] = []
    for n in cols:
        sc = rp_scenario(n)
        if scenarios and scenarios[-1]["scenario"] == sc:
            scenarios[-1]["span"] += 1
        else:
            scenarios.append({**_scenario_head(sc), "span": 1})
    return {
        "title": "nestbed fleet",
        "generated": _text(doc.get("generated")),
        "counts": _counts(doc["summary"]),
        "scenarios": scenarios,
        "columns": [{"nodeid": n, "label": n[len(rp_scenario(n)):].strip("[]") or "·"} for n in cols],
        "rows": [_fleet_row(h, cols) for h in hosts],
        "hosts": [{"key": h["key"], "kind": _text((h.get("kind") or host_kind(h.get("host") or {})).get("label")),
                   "rows": _flatten(_host_rows(h.get("host") or {}))} for h in hosts],
        "sources": [_text(s) for s in doc.get("sources") or []],
    }


def fleet_html(doc: Mapping[str, Any]) -> str:
    """A fleet's self-contained ``index.html``."""
    return _render("fleet.html.j2", fleet_context(doc))


def _kind_label(h: Mapping[str, Any]) -> str:
    """A fleet row's host-kind label (rows of fleets merged before host kinds existed derive it)."""
    return str((h.get("kind") or host_kind(h.get("host") or {})).get("label"))


def fleet_markdown(doc: Mapping[str, Any]) -> str:
    hosts = doc["hosts"]
    cols = _fleet_columns(hosts)
    s = doc["summary"]
    counts = " · ".join(f"{ICON[o]} {s[o]} {o}" for o in OUTCOMES if s.get(o)) or "no cells"
    lines = [f"## nestbed fleet: {len(hosts)} host kind(s)", "", f"**{s['total']} cells**: {counts}", ""]
    for h in hosts:
        hs = h.get("summary") or summarize(h["cells"].values())
        row_counts = ", ".join(f"{hs[o]} {o}" for o in OUTCOMES if hs.get(o)) or "no cells"
        host = h.get("host") or {}
        qemu = host.get("qemu")
        what = (f"{(host.get('cpu') or {}).get('model', '?')}, kernel {host.get('kernel')}, "
                f"QEMU {qemu.get('x86_64') if isinstance(qemu, dict) else qemu}")
        how = (h.get("kind") or {}).get("how")
        lines.append(f"- **{_md(_kind_label(h))}**: {_md(what)} — {row_counts}" + (f"  \n  {_md(how)}" if how else ""))
    lines.append("")
    lines += ["| cell | " + " | ".join(f"{_md(_kind_label(h))}" for h in hosts) + " |",
              "| --- | " + " | ".join("---" for _ in hosts) + " |"]
    for n in cols[:MD_ROW_LIMIT]:
        marks = []
        for h in hosts:
            c = h["cells"].get(n)
            marks.append(f"{ICON[c['outcome']]} {c['outcome']}" if c else "—")
        lines.append(f"| `{_md(n)}` | " + " | ".join(marks) + " |")
    return "\n".join(lines) + "\n"


# --- writing a report's files ----------------------------------------------------------------

def write_report(doc: Mapping[str, Any], out_dir: Path) -> dict[str, Path]:
    """Write report.json, index.html and summary.md into *out_dir*; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "report.json", "html": out_dir / "index.html", "md": out_dir / "summary.md"}
    write_atomic(paths["json"], json.dumps(doc, indent=2, default=str) + "\n")
    write_atomic(paths["html"], report_html(doc))
    write_atomic(paths["md"], report_markdown(doc))
    return paths


def write_fleet(doc: Mapping[str, Any], out_dir: Path) -> dict[str, Path]:
    """Write fleet.json, index.html and summary.md into *out_dir*; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    clean = {k: v for k, v in doc.items() if not k.startswith("_")}
    paths = {"json": out_dir / "fleet.json", "html": out_dir / "index.html", "md": out_dir / "summary.md"}
    write_atomic(paths["json"], json.dumps(clean, indent=2, default=str) + "\n")
    write_atomic(paths["html"], fleet_html(clean))
    write_atomic(paths["md"], fleet_markdown(clean))
    return paths
