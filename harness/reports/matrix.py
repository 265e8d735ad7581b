"""The scenario matrix: axes, include/exclude rules, tiers and shards (``scenarios/matrix.toml``).

A *cell* is one collected scenario test: its node id, its parametrization (``item.callspec.params``)
and its markers.  The matrix never asks scenario files for anything: a cell's *coordinates*
(one value per axis) come from the parameter names the axes list (``arch``, ``level``, ``via``,
``firmware``, ``chain``, ...), from ``[[assign]]`` rules matched on the node id for cells whose
parameters do not say (``test_nested.py`` is level 2), and from the axis default.

Tiers select cells by marker (``smoke``, ``nightly``) or all cells (``full``); ``[[include]]``
adds cells to tiers, ``[[exclude]]`` removes them (with a reason), and sharding splits a tier's
cells into N deterministic parts.  Pure: no pytest here (``fixtures/reporting.py`` applies it in
a collection hook), so the same code answers ``nestbed matrix``.

Format (every key is checked; an unknown key or a wrong type is a one-line
``MatrixError(file, key, reason)``)::

    version = 1
    [axes.arch]                       # one table per axis
    params = ["arch"]                 # parameter names that carry its value
    values = ["x86_64", "i386"]       # allowed values in rules (optional)
    default = "x86_64"                # for cells that do not say (optional)
    [[assign]]                        # coordinates by node id (glob)
    match = "*/test_nested.py::*"
    level = "2"
    [[exclude]]
    arch = "i386"                     # a value or a list of values
    level = "2"
    tiers = ["nightly"]               # optional: the tiers this rule applies to (default: all)
    reason = "why"
    [tiers.nightly]
    markers = ["smoke", "nightly"]    # cells with any of these markers (or all = true)
    shards = 4                        # how many CI jobs run this tier
    [hosts.kvm-l1]                    # a host kind besides the CI runner's own level 0 (optional):
                                      # `nestbed report --host kvm-l1` runs its cells there
    label = "KVM host, emulated SVM"  # its row in the fleet report
    accel = "kvm"                     # what [[expect]] host = ... matches there (HOST_KINDS)
    runner = "in-l1"                  # how CI gets one (RUNNERS): nestbed inside an L1 of the runner
    markers = ["smoke"]               # its cells: a tier of its own, named after it (rules: tiers = ["kvm-l1"])
    strict = true                     # as a tier's
    ci_tiers = ["nightly"]            # the CI tiers that run it as one more job beside their shards
    images = ["tiny-x86_64"]          # what the runner carries in (in-l1: its --image list)
    timeout = 10800                   # seconds the run there may take
"""

from __future__ import annotations

import datetime
import fnmatch
import tomllib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.core import paths
from harness.errors import RecipeError, UsageError

MATRIX_VERSION = 1
RULE_KINDS = ("assign", "include", "exclude", "expect")
RUNNERS = ("in-l1",)  # how a [hosts.NAME] kind is reached: nestbed inside an L1 of the CI runner
HOST_KIND_TIMEOUT = 4 * 3600
EXPECTABLE = ("skip", "xfail")
HOST_KINDS = ("tcg", "kvm")  # what level 0 runs guests under (the probe's x86_64 verdict)
# Arch suffixes of image names: the `guest` fixture's indirect parameter names an image, not an arch.
_IMAGE_ARCHES = ("x86_64", "i386")


class MatrixError(RecipeError):
    """A bad matrix file: ``file: key: reason`` on one line."""


@dataclass(frozen=True)
class Axis:
    name: str
    params: tuple[str, ...]
    values: tuple[str, ...] = ()
    default: str | None = None


@dataclass(frozen=True)
class Rule:
    """An assign/include/exclude rule: conditions on coordinates and node ids."""

    kind: str
    index: int
    where: Mapping[str, tuple[str, ...]]   # axis -> accepted values (for assign: the values to set)
    match: tuple[str, ...] = ()
    tiers: tuple[str, ...] = ()
    reason: str = ""
    outcome: str = ""                 # expect: "skip" or "xfail"
    until: datetime.date | None = None  # expect: the declaration lapses after this day
    host: str | None = None           # expect: only on this host kind (HOST_KINDS)

    def applies_to_tier(self, tier: str | None) -> bool:
        return not self.tiers or (tier is not None and tier in self.tiers)

    def matches(self, nodeid: str, coords: Mapping[str, str | None]) -> bool:
        if self.match and not any(fnmatch.fnmatchcase(nodeid, pat) for pat in self.match):
            return False
        return all(coords.get(axis) in values for axis, values in self.where.items())


@dataclass(frozen=True)
class Tier:
    name: str
    markers: tuple[str, ...] = ()
    all: bool = False
    shards: int = 1
    strict: bool = False  # a skip or xfail no [[expect]] declares fails the cell


@dataclass(frozen=True)
class HostKind:
    """A ``[hosts.NAME]`` table: a host kind CI reaches besides its runner's own level 0.

    Its report is merged into the fleet as a row of its own, labelled *label*; *accel* is what
    ``[[expect]] host = ...`` matches for its cells.
    """

    name: str
    label: str
    accel: str
    runner: str
    cells: Tier                   # what it runs: a tier named after the host kind
    ci_tiers: tuple[str, ...] = ()
    images: tuple[str, ...] = ()
    timeout: int = HOST_KIND_TIMEOUT

    @property
    def tier(self) -> str:
        return self.cells.name


@dataclass(frozen=True)
class Matrix:
    """A parsed, validated matrix file (frozen data; selection is done by the functions below)."""

    path: str
    axes: Mapping[str, Axis]
    tiers: Mapping[str, Tier]
    rules: tuple[Rule, ...] = ()
    hosts: Mapping[str, HostKind] = field(default_factory=dict)

    def rules_of(self, kind: str) -> list[Rule]:
        return [r for r in self.rules if r.kind == kind]

    def tier(self, name: str) -> Tier:
        """A tier by name; a host kind's name is the tier of the cells it runs."""
        if name in self.tiers:
            return self.tiers[name]
        if name in self.hosts:
            return self.hosts[name].cells
        raise UsageError(f"{self.path}: no tier {name!r} (tiers: {', '.join([*self.tiers, *self.hosts])})")


@dataclass(frozen=True)
class Cell:
    """One collected scenario test, as the matrix sees it."""

    nodeid: str
    params: Mapping[str, str] = field(default_factory=dict)
    markers: frozenset[str] = frozenset()
    group: str = ""  # cells with the same group land in the same shard (module-scoped L1s)


@dataclass(frozen=True)
class Selection:
    selected: list[tuple[Cell, dict[str, str | None]]]
    deselected: list[tuple[Cell, str]]  # (cell, why)


# --- parsing -------------------------------------------------------------------------------

def _str_list(file: str, key: str, value: Any, *, allow_scalar: bool = True) -> tuple[str, ...]:
    if isinstance(value, bool):
        raise MatrixError(file, key, f"expected a string or list of strings, got {value!r}")
    if isinstance(value, (str, int)) and allow_scalar:
        return (str(value),)
    if isinstance(value, list) and all(isinstance(v, (str, int)) and not isinstance(v, bool) for v in value):
        return tuple(str(v) for v in value)
    want = "a string or list of strings" if allow_scalar else "a list of strings"
    raise MatrixError(file, key, f"expected {want}, got {type(value).__name__} {value!r}")


def _check_keys(file: str, where: str, table: Mapping[str, Any], allowed: Iterable[str]) -> None:
    allowed = set(allowed)
    for key in table:
        if key not in allowed:
            raise MatrixError(file, f"{where}.{key}" if where else key,
                              f"unknown key (allowed: {', '.join(sorted(allowed))})")


def _table(file: str, key: str, value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise MatrixError(file, key, f"expected a table, got {type(value).__name__}")
    return value


def parse_matrix(text: str, file: str = "<matrix>") -> Matrix:
    """Parse and validate matrix TOML text; raises :class:`MatrixError` on the first problem."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise MatrixError(file, "-", f"not valid TOML: {exc}") from None
    _check_keys(file, "", data, ["version", "axes", "tiers", "hosts", *RULE_KINDS])
    version = data.get("version")
    if version != MATRIX_VERSION:
        raise MatrixError(file, "version", f"expected {MATRIX_VERSION}, got {version!r}")

    axes: dict[str, Axis] = {}
    for name, raw in _table(file, "axes", data.get("axes", {})).items():
        where = f"axes.{name}"
        tbl = _table(file, where, raw)
        _check_keys(file, where, tbl, ["params", "values", "default"])
        if "params" not in tbl:
            raise MatrixError(file, f"{where}.params", "missing (the parameter names that carry this axis)")
        params = _str_list(file, f"{where}.params", tbl["params"], allow_scalar=False)
        values = _str_list(file, f"{where}.values", tbl.get("values", []), allow_scalar=False)
        default = tbl.get("default")
        if default is not None:
            if not isinstance(default, (str, int)) or isinstance(default, bool):
                raise MatrixError(file, f"{where}.default", f"expected a string, got {default!r}")
            default = str(default)
            if values and default not in values:
                raise MatrixError(file, f"{where}.default", f"{default!r} is not one of {list(values)}")
        axes[name] = Axis(name, params, values, default)
    if not axes:
        raise MatrixError(file, "axes", "no axes defined")

    tiers: dict[str, Tier] = {}
    for name, raw in _table(file, "tiers", data.get("tiers", {})).items():
        where = f"tiers.{name}"
        tbl = _table(file, where, raw)
        _check_keys(file, where, tbl, ["markers", "all", "shards", "strict"])
        tiers[name] = _tier(file, where, name, tbl)
    if not tiers:
        raise MatrixError(file, "tiers", "no tiers defined")
    hosts = {name: _host_kind(file, name, raw, tiers)
             for name, raw in _table(file, "hosts", data.get("hosts", {})).items()}
    rule_tiers_known = [*tiers, *hosts]

    rules: list[Rule] = []
    for kind in RULE_KINDS:
        raw_rules = data.get(kind, [])
        if not isinstance(raw_rules, list):
            raise MatrixError(file, kind, f"expected an array of tables ([[{kind}]]), got {type(raw_rules).__name__}")
        for i, raw in enumerate(raw_rules):
            where = f"{kind}[{i}]"
            tbl = _table(file, where, raw)
            extra = ["match", "reason"] + (["tiers"] if kind != "assign" else []) + \
                (["outcome", "until", "host"] if kind == "expect" else [])
            _check_keys(file, where, tbl, [*axes, *extra])
            cond: dict[str, tuple[str, ...]] = {}
            for axis_name in axes:
                if axis_name not in tbl:
                    continue
                vals = _str_list(file, f"{where}.{axis_name}", tbl[axis_name], allow_scalar=True)
                if kind == "assign" and len(vals) != 1:
                    raise MatrixError(file, f"{where}.{axis_name}", "assign sets one value")
                known = axes[axis_name].values
                for v in vals:
                    if known and v not in known:
                        raise MatrixError(file, f"{where}.{axis_name}", f"{v!r} is not one of {list(known)}")
                cond[axis_name] = vals
            match = _str_list(file, f"{where}.match", tbl.get("match", []))
            rule_tiers = _str_list(file, f"{where}.tiers", tbl.get("tiers", []), allow_scalar=False)
            for t in rule_tiers:
                if t not in rule_tiers_known:
                    raise MatrixError(file, f"{where}.tiers",
                                      f"unknown tier {t!r} (tiers: {', '.join(rule_tiers_known)})")
            reason = tbl.get("reason", "")
            if not isinstance(reason, str):
                raise MatrixError(file, f"{where}.reason", f"expected a string, got {reason!r}")
            if kind == "assign" and (not match or not cond):
                raise MatrixError(file, where, "assign needs match = ... and at least one axis value to set")
            if kind != "assign" and not match and not cond:
                raise MatrixError(file, where, "no condition: this rule would match every cell")
            if kind == "exclude" and not reason:
                raise MatrixError(file, f"{where}.reason", "missing: say why these cells are excluded")
            expect: dict[str, Any] = {}
            if kind == "expect":
                expect = _expectation(file, where, tbl, reason)
            rules.append(Rule(kind, i, cond, match, rule_tiers, reason, **expect))
    return Matrix(file, axes, tiers, tuple(rules), hosts)


def _tier(file: str, where: str, name: str, tbl: Mapping[str, Any]) -> Tier:
    """The selection keys of a [tiers.NAME] (or [hosts.NAME]) table, checked."""
    markers = _str_list(file, f"{where}.markers", tbl.get("markers", []), allow_scalar=False)
    every = tbl.get("all", False)
    if not isinstance(every, bool):
        raise MatrixError(file, f"{where}.all", f"expected true or false, got {every!r}")
    shards = tbl.get("shards", 1)
    if not isinstance(shards, int) or isinstance(shards, bool) or shards < 1:
        raise MatrixError(file, f"{where}.shards", f"expected a positive integer, got {shards!r}")
    if not markers and not every:
        raise MatrixError(file, where, "selects nothing: give markers = [...] or all = true")
    strict = tbl.get("strict", False)
    if not isinstance(strict, bool):
        raise MatrixError(file, f"{where}.strict", f"expected true or false, got {strict!r}")
    return Tier(name, markers, every, shards, strict)


def _host_kind(file: str, name: str, raw: Any, tiers: Mapping[str, Tier]) -> HostKind:
    """A ``[hosts.NAME]`` table, checked: what the host kind is, and its cells (a tier named NAME)."""
    where = f"hosts.{name}"
    tbl = _table(file, where, raw)
    _check_keys(file, where, tbl, ["label", "accel", "runner", "markers", "all", "strict", "ci_tiers", "images",
                                   "timeout"])
    if name in tiers:
        raise MatrixError(file, where, f"a host kind's name is the tier of its cells: {name!r} is a tier already")
    text: dict[str, str] = {}
    for key in ("label", "accel", "runner"):
        value = tbl.get(key)
        if not isinstance(value, str) or not value:
            raise MatrixError(file, f"{where}.{key}", f"missing or not a string: {value!r}")
        text[key] = value
    if text["accel"] not in HOST_KINDS:
        raise MatrixError(file, f"{where}.accel", f"expected one of {list(HOST_KINDS)}, got {text['accel']!r}")
    if text["runner"] not in RUNNERS:
        raise MatrixError(file, f"{where}.runner", f"expected one of {list(RUNNERS)}, got {text['runner']!r}")
    cells = _tier(file, where, name, tbl)
    ci_tiers = _str_list(file, f"{where}.ci_tiers", tbl.get("ci_tiers", []), allow_scalar=False)
    for t in ci_tiers:
        if t not in tiers:
            raise MatrixError(file, f"{where}.ci_tiers", f"unknown tier {t!r} (tiers: {', '.join(tiers)})")
    images = _str_list(file, f"{where}.images", tbl.get("images", []), allow_scalar=False)
    timeout = tbl.get("timeout", HOST_KIND_TIMEOUT)
    if not isinstance(timeout, int) or isinstance(timeout, bool) or timeout < 1:
        raise MatrixError(file, f"{where}.timeout", f"expected a positive number of seconds, got {timeout!r}")
    return HostKind(name, text["label"], text["accel"], text["runner"], cells, ci_tiers, images, timeout)


def _expectation(file: str, where: str, tbl: Mapping[str, Any], reason: str) -> dict[str, Any]:
    """outcome/until/host of an [[expect]] rule, checked."""
    outcome = tbl.get("outcome")
    if outcome not in EXPECTABLE:
        raise MatrixError(file, f"{where}.outcome", f"expected one of {list(EXPECTABLE)}, got {outcome!r}")
    if not reason:
        raise MatrixError(file, f"{where}.reason", "missing: say why these cells may skip or xfail")
    until = tbl.get("until")
    if until is not None:
        if isinstance(until, str):
            try:
                until = datetime.date.fromisoformat(until)
            except ValueError:
                until = None
        if not isinstance(until, datetime.date) or isinstance(until, datetime.datetime):
            raise MatrixError(file, f"{where}.until", f"expected a date like 2027-01-31, got {tbl.get('until')!r}")
    host = tbl.get("host")
    if host is not None and host not in HOST_KINDS:
        raise MatrixError(file, f"{where}.host", f"expected one of {list(HOST_KINDS)}, got {host!r}")
    return {"outcome": outcome, "until": until, "host": host}


@dataclass(frozen=True)
class Verdict:
    """Whether a skip or xfail was declared: the rule that declares it, or why none does."""

    rule: Rule | None
    why: str


def declared(matrix: Matrix, nodeid: str, coords: Mapping[str, str | None], outcome: str, *,
             tier: str | None, host: str | None, today: datetime.date) -> Verdict:
    """Is *outcome* (skip or xfail) of this cell declared by an [[expect]] rule of *matrix*?  Pure."""
    lapsed = None
    for rule in matrix.rules_of("expect"):
        if rule.outcome != outcome or not rule.applies_to_tier(tier) or not rule.matches(nodeid, coords):
            continue
        if rule.host is not None and rule.host != host:
            continue
        if rule.until is not None and today > rule.until:
            lapsed = rule
            continue
        return Verdict(rule, f"declared by expect[{rule.index}]: {rule.reason}")
    if lapsed is not None:
        return Verdict(None, f"expect[{lapsed.index}] lapsed on {lapsed.until}: {lapsed.reason}")
    return Verdict(None, "no [[expect]] rule declares it")


def matrix_for(scenarios: Path) -> Path:
    """A scenario directory's matrix: its own ``matrix.toml``, else nestbed's built-in one."""
    own = Path(scenarios) / "matrix.toml"
    return own if own.is_file() else paths.builtin_dir("scenarios") / "matrix.toml"


def load_matrix(path: Path | str) -> Matrix:
    """Read and validate a matrix file."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise MatrixError(str(p), "-", f"cannot read: {exc.strerror or exc}") from None
    return parse_matrix(text, str(p))


# --- cells and coordinates ----------------------------------------------------------------

def flatten_params(params: Mapping[str, Any]) -> dict[str, str]:
    """Parameters as strings; the ``guest`` fixture's ``(image, via)`` also gives ``image``, ``via``, ``arch``, and an
    ``image`` parameter its ``arch`` (the suffix of its name)."""
    flat: dict[str, str] = {}
    for name, value in params.items():
        if name == "guest":
            image, via = (value[0], value[1]) if isinstance(value, (tuple, list)) and len(value) == 2 else (value, None)
            flat["guest"] = f"{image}-{via}" if via else str(image)
            flat.setdefault("image", str(image))
            if via:
                flat.setdefault("via", str(via))
            for arch in _IMAGE_ARCHES:
                if str(image).endswith(f"-{arch}"):
                    flat.setdefault("arch", arch)
            continue
        if name == "image" and isinstance(value, str):
            # An image parameter names its arch too (tiny-i386): the i386 rules must see it.
            flat["image"] = value
            for arch in _IMAGE_ARCHES:
                if value.endswith(f"-{arch}"):
                    flat.setdefault("arch", arch)
            continue
        if isinstance(value, (tuple, list)):
            flat[name] = ",".join(str(v) for v in value)
        elif hasattr(value, "value") and isinstance(getattr(value, "value", None), (str, int)):
            flat[name] = str(value.value)  # enums (Arch.I386 -> "i386")
        else:
            flat[name] = str(value)
    return flat


def coordinates(matrix: Matrix, cell: Cell) -> dict[str, str | None]:
    """The cell's value on every axis: from its parameters, else ``[[assign]]`` rules, else the default."""
    coords: dict[str, str | None] = {}
    assigned: dict[str, str] = {}
    for rule in matrix.rules_of("assign"):
        if any(fnmatch.fnmatchcase(cell.nodeid, pat) for pat in rule.match):  # its axis values are what it sets
            assigned.update({axis: vals[0] for axis, vals in rule.where.items()})
    for axis in matrix.axes.values():
        value = next((cell.params[p] for p in axis.params if p in cell.params), None)
        if value is None:
            value = assigned.get(axis.name, axis.default)
        coords[axis.name] = value
    return coords


def config_label(params: Mapping[str, str]) -> str:
    """A short name for a cell's configuration: ``debian-x86_64-ssh``, ``vcpus=2``, ``default``."""
    parts = []
    for name, value in params.items():
        if name in ("image", "arch") and "guest" in params:
            continue
        if name == "via" and "guest" in params:
            continue
        if name == "arch" and params.get("image", "").endswith(f"-{value}"):
            continue  # derived from the image's name
        parts.append(value if name == "guest" else f"{name}={value}")
    return " ".join(parts) or "default"


def select(matrix: Matrix | None, cells: Sequence[Cell], tier: str | None) -> Selection:
    """Apply a tier (markers, includes) and the excludes; keeps the cells' order."""
    t = matrix.tier(tier) if matrix is not None and tier is not None else None
    selected: list[tuple[Cell, dict[str, str | None]]] = []
    deselected: list[tuple[Cell, str]] = []
    for cell in cells:
        coords = coordinates(matrix, cell) if matrix is not None else {}
        if matrix is None:
            selected.append((cell, coords))
            continue
        excluded = next((r for r in matrix.rules_of("exclude")
                         if r.applies_to_tier(tier) and r.matches(cell.nodeid, coords)), None)
        if excluded is not None:
            deselected.append((cell, f"matrix exclude[{excluded.index}]: {excluded.reason}"))
            continue
        if t is not None and not t.all and not (cell.markers & set(t.markers)):
            included = any(r.applies_to_tier(tier) and r.matches(cell.nodeid, coords)
                           for r in matrix.rules_of("include"))
            if not included:
                deselected.append((cell, f"not in tier {tier!r}"))
                continue
        selected.append((cell, coords))
    return Selection(selected, deselected)


# --- sharding ------------------------------------------------------------------------------

def parse_shard(text: str) -> tuple[int, int]:
    """``"2/4"`` -> ``(2, 4)`` (1-based); a clear UsageError otherwise."""
    try:
        i_text, n_text = text.split("/")
        i, n = int(i_text), int(n_text)
    except ValueError:
        raise UsageError(f"--shard {text!r}: expected I/N, e.g. 2/4") from None
    if n < 1 or not 1 <= i <= n:
        raise UsageError(f"--shard {text!r}: need 1 <= I <= N")
    return i, n


def shard(cells: Sequence[Cell], count: int, *, group: Callable[[Cell], str] | None = None) -> list[list[Cell]]:
    """Split *cells* into *count* shards; every cell lands in exactly one.

    Deterministic for a given set of node ids: cells of one group (a module whose tests share an
    L1) stay together; groups go, largest first (ties by node id), to the shard with the fewest
    cells so far (ties: the lowest index).  Within a shard the collection order is kept.
    """
    if count < 1:
        raise UsageError(f"shard count must be at least 1, got {count}")
    key = group or (lambda c: c.group or c.nodeid)
    groups: dict[str, list[int]] = {}
    for idx, cell in enumerate(cells):
        groups.setdefault(key(cell), []).append(idx)
    order = sorted(groups.items(), key=lambda kv: (-len(kv[1]), min(cells[i].nodeid for i in kv[1])))
    loads = [0] * count
    owner: dict[int, int] = {}
    for _, members in order:
        target = min(range(count), key=lambda s: (loads[s], s))
        loads[target] += len(members)
        for i in members:
            owner[i] = target
    out: list[list[Cell]] = [[] for _ in range(count)]
    for idx, cell in enumerate(cells):
        out[owner[idx]].append(cell)
    return out


def host_kinds_of(matrix: Matrix, ci_tier: str) -> list[HostKind]:
    """The host kinds a CI run of *ci_tier* reaches besides its runner (``ci_tiers`` lists it)."""
    return [h for h in matrix.hosts.values() if ci_tier in h.ci_tiers]


def in_l1_args(host: HostKind) -> list[str]:
    """``nestbed in-l1`` options for *host*: the images it carries in, the inner command's timeout."""
    return [a for name in host.images for a in ("--image", name)] + ["--timeout", str(host.timeout)]


def github_matrix(matrix: Matrix, tier: str, shards: int | None = None) -> dict[str, Any]:
    """A GitHub Actions ``strategy.matrix`` object: one include entry per shard of *tier*, then one per
    host kind that *tier* also runs (:func:`host_kinds_of`: its own tier, as one shard, on that host).

    When there are host kinds every entry says which it runs on (``host``, ``""``: the runner itself)
    and what to call its job (``label``), so one job definition runs them all.
    """
    n = shards if shards is not None else matrix.tier(tier).shards
    if n < 1:
        raise UsageError(f"--shards must be at least 1, got {n}")
    entries: list[dict[str, Any]] = [{"tier": tier, "shard": f"{i}/{n}", "index": i, "total": n}
                                     for i in range(1, n + 1)]
    hosts = host_kinds_of(matrix, tier)
    if hosts:
        entries = [{**e, "host": "", "label": f"shard {e['shard']}"} for e in entries]
        entries += [{"tier": h.tier, "shard": "1/1", "index": n + i, "total": 1, "host": h.name, "label": h.label}
                    for i, h in enumerate(hosts, 1)]
    return {"include": entries}
