"""Rendering of reports: a self-contained ``index.html`` (no network) and a GitHub-sized ``summary.md``.

Pure functions of the report/fleet documents built by :mod:`harness.reports.model`.
"""

from __future__ import annotations

import html
import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from harness.core.publish import write_atomic
from harness.errors import headline
from harness.reports.model import BAD, OUTCOMES, host_key
from harness.reports.model import scenario_of as rp_scenario

LABEL = {"pass": "pass", "fail": "FAIL", "error": "ERROR", "skip": "skip", "xfail": "xfail", "xpass": "XPASS"}
ICON = {"pass": "✅", "fail": "❌", "error": "💥", "skip": "⏭️", "xfail": "⚠️", "xpass": "❗"}
LEVEL_COLOUR = {1: "#1976d2", 2: "#7b1fa2", 3: "#ef6c00"}
MD_ROW_LIMIT = 400  # GitHub job summaries are capped at 1 MiB; keep well below

CSS = """
body{font:14px/1.4 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:1.5em;color:#222;background:#fff}
h1{font-size:1.4em;margin:0 0 .2em} h2{font-size:1.15em;margin:1.6em 0 .5em;border-bottom:1px solid #ddd}
.sub{color:#555;margin-bottom:1em}
table{border-collapse:collapse} th,td{border:1px solid #ccc;padding:3px 6px;vertical-align:top}
th{background:#f5f5f5;text-align:left;font-weight:600}
table.grid td.box{padding:2px;min-width:6em}
table.grid a.chip{display:block;text-align:center;font-weight:600;color:inherit;text-decoration:none;padding:2px 4px;
  margin:1px 0;border-radius:3px}
table.grid a.chip i{display:block;font-style:normal;font-weight:400;font-family:ui-monospace,monospace;font-size:11px;
  overflow-wrap:anywhere;max-width:16em;margin:0 auto}
table.grid a.chip small,table.grid td.cell small{display:block;font-weight:400;color:#444}
table.grid td.cell{text-align:center;min-width:5.5em;font-weight:600}
table.grid td.na{background:repeating-linear-gradient(45deg,#fafafa,#fafafa 4px,#f0f0f0 4px,#f0f0f0 8px)}
table.grid th.col{font-weight:600;font-size:12px;white-space:nowrap}
table.grid th.scenario{font-weight:600;font-size:12px;font-family:ui-monospace,monospace;max-width:30em;
  overflow-wrap:anywhere}
table.grid th.scenario small{display:block;font-weight:400;color:#666}
table.fleet th.col{font-family:ui-monospace,monospace;font-weight:500;white-space:normal;overflow-wrap:anywhere;max-width:10em}
table.fleet th.scenario{max-width:none;min-width:9em;text-align:center}
table.fleet tbody th{min-width:16em;font-weight:400}
.o-pass{background:#c8e6c9}.o-fail{background:#ffcdd2}.o-error{background:#ef9a9a}.o-skip{background:#eceff1;color:#555}
.o-xfail{background:#ffe0b2}.o-xpass{background:#e1bee7}
.legend span{display:inline-block;padding:2px 8px;margin-right:6px;border:1px solid #ccc;border-radius:3px;cursor:pointer}
.legend span.off{opacity:.35}
.counts b{margin-right:.8em}
details.cell{border:1px solid #ddd;border-left-width:6px;margin:4px 0;padding:2px 8px}
details.cell.o-pass{border-left-color:#43a047;background:#fff}details.cell.o-fail,details.cell.o-error{border-left-color:#e53935}
details.cell.o-skip{border-left-color:#90a4ae;background:#fff}details.cell.o-xfail{border-left-color:#fb8c00;background:#fff}
details.cell.o-xpass{border-left-color:#8e24aa;background:#fff}
details.cell summary{cursor:pointer;font-family:ui-monospace,monospace;font-size:13px}
details.cell:target{outline:3px solid #1976d2}
pre{background:#263238;color:#eceff1;padding:8px;overflow:auto;max-height:28em;font-size:12px}
code,.mono{font-family:ui-monospace,monospace;font-size:12px}
.kv td:first-child{font-family:ui-monospace,monospace;color:#333;white-space:nowrap}
.hidden{display:none}
svg text{font:11px system-ui,sans-serif}
"""

# Legend toggles: click an outcome to hide/show it in the grid and the details (no network, no libraries).
JS = """
(function(){
  document.querySelectorAll('.legend span[data-o]').forEach(function(el){
    el.addEventListener('click',function(){
      el.classList.toggle('off');
      var o=el.getAttribute('data-o'), off=el.classList.contains('off');
      document.querySelectorAll('details.cell.o-'+o).forEach(function(d){d.classList.toggle('hidden',off)});
      document.querySelectorAll('.chip.o-'+o+',td.cell.o-'+o).forEach(function(el){el.style.opacity=off?'0.15':''});
    });
  });
  document.body.setAttribute('data-ready','1');
})();
"""


def esc(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def fmt_seconds(s: float | None) -> str:
    if s is None:
        return "-"
    if s < 60:
        return f"{s:.1f} s"
    m, sec = divmod(int(round(s)), 60)
    return f"{m}m {sec:02d}s" if m < 60 else f"{m // 60}h {m % 60:02d}m"


def _workers(run: Mapping[str, Any]) -> str:
    return f"{run['workers']} xdist worker(s)" if run.get("workers") else "one process"


def _page(title: str, body: str) -> str:
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">"
            f"<title>{esc(title)}</title><style>{CSS}</style></head>\n<body>\n{body}\n"
            f"<script>{JS}</script>\n</body></html>\n")


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


def _kv_table(data: Any, cls: str = "kv") -> str:
    rows = "".join(f"<tr><td>{esc(k)}</td><td>{esc(v)}</td></tr>" for k, v in _flatten(data))
    return f"<table class=\"{cls}\">{rows}</table>" if rows else "<p>-</p>"


def _counts_html(summary: Mapping[str, int]) -> str:
    parts = [f"<b>{summary.get('total', 0)} cells</b>"]
    parts += [f"<span class=\"o-{o}\" data-o=\"{o}\">{LABEL[o]} {summary.get(o, 0)}</span>"
              for o in OUTCOMES if summary.get(o)]
    return f"<p class=\"counts legend\">{' '.join(parts)}</p>"


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


def grid_html(cells: Sequence[Mapping[str, Any]]) -> str:
    """Scenarios (rows) x configurations (columns: arch · level · transport); one coloured chip per cell.

    A box holds several chips when a scenario has more cells in one configuration (``vcpus=1``,
    ``vcpus=2``); every chip shows its outcome and time, hovers with the details and links to them.
    """
    scenarios, cols = _columns(cells)
    boxes: dict[tuple[str, tuple[str, str, str]], list[tuple[int, Mapping[str, Any]]]] = {}
    for i, c in enumerate(cells):
        boxes.setdefault((c["scenario"], column_of(c)), []).append((i, c))
    head = "".join(f"<th class=\"col\">{esc(_column_label(col))}</th>" for col in cols)
    rows = []
    for sc in scenarios:
        tds = []
        for col in cols:
            box = boxes.get((sc, col))
            if not box:
                tds.append("<td class=\"na\" title=\"no cell of this scenario in this configuration\"></td>")
                continue
            chips = []
            for i, c in box:
                o = c["outcome"]
                extra = chip_label(c)
                chips.append(f"<a class=\"chip o-{o}\" href=\"#cell-{i}\" data-nodeid=\"{esc(c['nodeid'])}\" "
                             f"data-outcome=\"{o}\" title=\"{esc(_cell_title(c))}\">{LABEL[o]}"
                             + (f"<i>{esc(extra)}</i>" if extra else "")
                             + f"<small>{fmt_seconds(c.get('duration_seconds'))}</small></a>")
            tds.append(f"<td class=\"box\">{''.join(chips)}</td>")
        module, _, func = sc.rpartition("::")
        rows.append(f"<tr><th class=\"scenario\" title=\"{esc(sc)}\"><small>{esc(module)}</small>{esc(func or sc)}</th>"
                    f"{''.join(tds)}</tr>")
    return (f"<table class=\"grid\"><thead><tr><th>scenario \\ configuration</th>{head}</tr></thead>"
            f"<tbody>{''.join(rows)}</tbody></table>")


def _guests_table(guests: Sequence[Mapping[str, Any]]) -> str:
    if not guests:
        return ""
    head = "<tr><th>image</th><th>arch</th><th>level</th><th>accel</th><th>why</th><th>vCPUs</th><th>MiB</th>" \
           "<th>ready</th><th>serial log</th></tr>"
    rows = []
    for g in guests:
        log = g.get("serial_log")
        link = f"<a href=\"{esc(log)}\">{esc(log)}</a>" if log else "-"
        rows.append(f"<tr><td>{esc(g.get('image'))}</td><td>{esc(g.get('arch'))}</td><td>{esc(g.get('level'))}</td>"
                    f"<td>{esc(g.get('accel'))}</td><td>{esc(g.get('accel_reason'))}</td><td>{esc(g.get('vcpus'))}</td>"
                    f"<td>{esc(g.get('memory_mb'))}</td><td>{fmt_seconds(g.get('ready_seconds'))}</td>"
                    f"<td class=\"mono\">{link}</td></tr>")
    return f"<table>{head}{''.join(rows)}</table>"


def _details_html(cells: Sequence[Mapping[str, Any]]) -> str:
    out = []
    for i, c in enumerate(cells):
        o = c["outcome"]
        reason = f" — {esc(headline(str(c['reason']))[:200])}" if c.get("reason") else ""
        body = [f"<p>configuration <code>{esc(c['config'])}</code>; worker {esc(c.get('worker') or '-')}; "
                f"phases {esc(', '.join(f'{k} {v:.2f}s' for k, v in (c.get('phases') or {}).items()))}; "
                f"markers {esc(', '.join(c.get('markers') or []) or '-')}</p>"]
        coords = {k: v for k, v in (c.get("coords") or {}).items() if v is not None}
        if coords:
            body.append("<p>matrix: " + " · ".join(f"{esc(k)}=<code>{esc(v)}</code>" for k, v in coords.items()) + "</p>")
        if c.get("facts"):
            body.append("<h4>facts</h4>" + _kv_table(c["facts"]))
        if c.get("guests"):
            body.append("<h4>guests</h4>" + _guests_table(c["guests"]))
        if c.get("l1_host"):
            body.append(f"<p>L1 host: <a href=\"#{esc(c['l1_host'])}\">{esc(c['l1_host'])}</a></p>")
        if c.get("longrepr"):
            body.append(f"<pre>{esc(c['longrepr'])}</pre>")
        is_open = " open" if o in BAD else ""
        out.append(f"<details class=\"cell o-{o}\" id=\"cell-{i}\"{is_open}><summary>{LABEL[o]} "
                   f"{fmt_seconds(c.get('duration_seconds'))} <b>{esc(c['nodeid'])}</b>{reason}</summary>"
                   f"{''.join(body)}</details>")
    return "".join(out)


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


def boot_chart_svg(cells: Sequence[Mapping[str, Any]]) -> str:
    """Horizontal bars: seconds from launch to ready, one per guest, coloured by level."""
    points = _boot_points(cells)
    if not points:
        return "<p>No guest boots were recorded.</p>"
    label_w, bar_w, row_h = 560, 380, 20
    top = max(v for _, v, _, _ in points) or 1.0
    h = row_h * len(points) + 30
    parts = [f"<svg width=\"{label_w + bar_w + 80}\" height=\"{h}\" "
             f"role=\"img\" aria-label=\"boot times\">"]
    for i, (label, secs, level, nodeid) in enumerate(points):
        y = i * row_h + 4
        w = max(1.0, secs / top * bar_w)
        colour = LEVEL_COLOUR.get(level, "#555")
        parts.append(f"<text x=\"{label_w - 6}\" y=\"{y + 13}\" text-anchor=\"end\">{esc(_cut(label, 84))}</text>"
                     f"<rect x=\"{label_w}\" y=\"{y}\" width=\"{w:.1f}\" height=\"{row_h - 6}\" fill=\"{colour}\">"
                     f"<title>{esc(nodeid)}: {secs:.1f} s</title></rect>"
                     f"<text x=\"{label_w + w + 4:.1f}\" y=\"{y + 13}\">{secs:.1f} s</text>")
    axis_y = row_h * len(points) + 8
    parts.append(f"<line x1=\"{label_w}\" y1=\"{axis_y}\" x2=\"{label_w + bar_w}\" y2=\"{axis_y}\" stroke=\"#999\"/>"
                 f"<text x=\"{label_w}\" y=\"{axis_y + 16}\">0</text>"
                 f"<text x=\"{label_w + bar_w}\" y=\"{axis_y + 16}\" text-anchor=\"end\">{top:.0f} s</text>")
    for level, colour in LEVEL_COLOUR.items():
        if any(p[2] == level for p in points):
            x = 10 + (level - 1) * 60
            parts.append(f"<rect x=\"{x}\" y=\"{axis_y + 6}\" width=\"10\" height=\"10\" fill=\"{colour}\"/>"
                         f"<text x=\"{x + 14}\" y=\"{axis_y + 15}\">L{level}</text>")
    parts.append("</svg>")
    return "".join(parts)


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


def report_html(doc: Mapping[str, Any]) -> str:
    run, host, cells = doc["run"], doc.get("host") or {}, doc["cells"]
    title = f"nestbed report {run['id']}"
    what = " ".join(x for x in [f"tier {run['tier']}" if run.get("tier") else "",
                                f"shard {run['shard']}" if run.get("shard") else ""] if x) or "scenarios"
    sub = (f"{esc(what)} on <b>{esc(host.get('hostname', '?'))}</b> ({esc(host_key(host))}); "
           f"{esc(run['started'])} – {esc(run['finished'])} ({fmt_seconds(run.get('duration_seconds'))}), "
           f"{esc(_workers(run))}; nestbed {esc(run.get('nestbed_version'))}, "
           f"schema v{esc(doc['schema_version'])}" + (" — <b>interrupted</b>" if run.get("interrupted") else ""))
    failures = [(i, c) for i, c in enumerate(cells) if c["outcome"] in BAD]
    fail_list = ""
    if failures:
        items = []
        for i, c in failures:
            logs = " ".join(f"<a href=\"{esc(p)}\">serial log</a>" for p in c["artifacts"]["serial_logs"]) or "no guest log"
            reason = esc(headline(str(c.get("reason") or ""))[:200])
            items.append(f"<li class=\"o-{c['outcome']}\"><a href=\"#cell-{i}\">{esc(c['nodeid'])}</a> {reason} — {logs}</li>")
        fail_list = f"<h2>Failures</h2><ul>{''.join(items)}</ul>"
    l1 = "".join(f"<h3 id=\"{esc(h.get('id'))}\">{esc(h.get('id'))} (level {esc(h.get('level'))}, L0 accel "
                 f"{esc(h.get('l0_accel'))})</h3>{_kv_table({'accel': h.get('accel'), 'facts': h.get('facts')})}"
                 for h in doc.get("l1_hosts") or [])
    deselected = doc.get("deselected") or []
    desel = ""
    if deselected:
        desel = "<h2>Excluded by the matrix</h2><ul>" + "".join(
            f"<li><code>{esc(d['nodeid'])}</code>: {esc(d['reason'])}</li>" for d in deselected) + "</ul>"
    body = (f"<h1>{esc(title)}</h1><div class=\"sub\">{sub}</div>{_counts_html(doc['summary'])}"
            f"<h2>Compatibility grid</h2>{grid_html(cells) if cells else '<p>No cells ran.</p>'}{fail_list}"
            f"<h2>Boot times (launch to ready)</h2>{boot_chart_svg(cells)}"
            f"<h2>Host</h2>{_kv_table(_host_rows(host))}"
            + (f"<h2>L1 hosts</h2>{l1}" if l1 else "")
            + f"<h2>Cells</h2>{_details_html(cells)}{desel}"
            f"<p class=\"sub\">Files: <a href=\"report.json\">report.json</a> · <a href=\"junit.xml\">junit.xml</a> · "
            f"<a href=\"summary.md\">summary.md</a> · <a href=\"pytest.log\">pytest.log</a></p>")
    return _page(title, body)


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
             f"Host: {host_key(host)}" + (f"; accel {accel}" if accel else ""), ""]
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


def fleet_html(doc: Mapping[str, Any]) -> str:
    hosts = doc["hosts"]
    cols = _fleet_columns(hosts)
    # Two header rows: the scenario (spanning its cells), then each cell's parametrization.
    groups: list[tuple[str, int]] = []
    for n in cols:
        sc = rp_scenario(n)
        if groups and groups[-1][0] == sc:
            groups[-1] = (sc, groups[-1][1] + 1)
        else:
            groups.append((sc, 1))
    top = "".join(f"<th class=\"scenario\" colspan=\"{span}\" title=\"{esc(sc)}\"><small>{esc(sc.rpartition('::')[0])}"
                  f"</small>{esc(sc.rpartition('::')[2])}</th>" for sc, span in groups)
    head = "".join(f"<th class=\"col\" title=\"{esc(n)}\">{esc(n[len(rp_scenario(n)):].strip('[]') or '·')}</th>"
                   for n in cols)
    rows = []
    for h in hosts:
        host = h.get("host") or {}
        label = (f"<b>{esc((host.get('cpu') or {}).get('model', '?'))}</b><br>kernel {esc(host.get('kernel'))}<br>"
                 f"QEMU {esc((host.get('qemu') or {}).get('x86_64') if isinstance(host.get('qemu'), dict) else host.get('qemu'))}"
                 f"<br><small>{esc(', '.join(h.get('hostnames') or []))}; {len(h.get('runs') or [])} run(s)</small>")
        tds = []
        for n in cols:
            c = h["cells"].get(n)
            if c is None:
                tds.append("<td class=\"na\"></td>")
                continue
            o = c["outcome"]
            tip = f"{n}\n{LABEL[o]} in {fmt_seconds(c.get('duration_seconds'))}\n{c.get('reason') or ''}".strip()
            tds.append(f"<td class=\"cell o-{o}\" data-nodeid=\"{esc(n)}\" data-host=\"{esc(h['key'])}\" "
                       f"data-outcome=\"{o}\" title=\"{esc(tip)}\">{LABEL[o]}</td>")
        rows.append(f"<tr><th>{label}</th>{''.join(tds)}</tr>")
    sources = "".join(f"<li><code>{esc(s)}</code></li>" for s in doc.get("sources") or [])
    body = (f"<h1>nestbed fleet</h1><div class=\"sub\">{len(hosts)} host kind(s), {len(cols)} cells; "
            f"generated {esc(doc.get('generated'))}</div>{_counts_html(doc['summary'])}"
            f"<h2>Hosts × scenarios</h2><table class=\"grid fleet\"><thead><tr><th rowspan=\"2\">host</th>{top}</tr>"
            f"<tr>{head}</tr></thead>"
            f"<tbody>{''.join(rows)}</tbody></table>"
            f"<h2>Hosts</h2>" + "".join(f"<h3>{esc(h['key'])}</h3>{_kv_table(_host_rows(h.get('host') or {}))}"
                                       for h in hosts)
            + f"<h2>Merged reports</h2><ul>{sources}</ul>")
    return _page("nestbed fleet", body)


def fleet_markdown(doc: Mapping[str, Any]) -> str:
    hosts = doc["hosts"]
    cols = _fleet_columns(hosts)
    s = doc["summary"]
    counts = " · ".join(f"{ICON[o]} {s[o]} {o}" for o in OUTCOMES if s.get(o)) or "no cells"
    lines = [f"## nestbed fleet: {len(hosts)} host kind(s)", "", f"**{s['total']} cells**: {counts}", ""]
    lines += ["| cell | " + " | ".join(_md(h["key"]) for h in hosts) + " |",
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
