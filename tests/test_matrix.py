"""The scenario matrix: parsing and strict validation, coordinates, tiers, include/exclude, shards, CI wiring."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from harness.errors import UsageError
from harness.reports import matrix as mx
from tests.conftest import REPO, nestbed

pytest_plugins = ["pytester"]

MINI = """
version = 1
[axes.arch]
params = ["arch"]
values = ["x86_64", "i386"]
default = "x86_64"
[axes.level]
params = ["level"]
values = ["1", "2"]
default = "1"
[axes.transport]
params = ["via"]
values = ["serial", "ssh"]
default = "serial"
[[assign]]
match = "*test_nested.py::*"
level = "2"
[[exclude]]
arch = "i386"
level = "2"
reason = "32-bit L2 aborts L0"
[[include]]
tiers = ["nightly"]
level = "2"
[tiers.smoke]
markers = ["smoke"]
[tiers.nightly]
markers = ["smoke", "nightly"]
shards = 3
[tiers.full]
all = true
shards = 5
"""


def test_shipped_matrix_is_valid_and_has_the_tiers() -> None:
    m = mx.load_matrix(REPO / "scenarios" / "matrix.toml")
    assert set(m.tiers) == {"smoke", "nightly", "full"}
    assert {"arch", "level", "accel", "cpu", "flags", "firmware", "chain", "transport", "qemu"} <= set(m.axes)
    assert m.tiers["full"].all


def test_coordinates_from_params_guest_ids_assign_and_defaults() -> None:
    m = mx.parse_matrix(MINI, "mini.toml")
    cell = mx.Cell("scenarios/test_boot.py::t[debian-i386-ssh]", mx.flatten_params({"guest": ("debian-i386", "ssh")}))
    assert mx.coordinates(m, cell) == {"arch": "i386", "level": "1", "transport": "ssh"}
    nested = mx.Cell("scenarios/test_nested.py::t[serial]", mx.flatten_params({"via": "serial"}))
    assert mx.coordinates(m, nested) == {"arch": "x86_64", "level": "2", "transport": "serial"}
    # An explicit parameter wins over an assign rule.
    explicit = mx.Cell("scenarios/test_nested.py::t[1]", mx.flatten_params({"level": 1}))
    assert mx.coordinates(m, explicit)["level"] == "1"
    assert mx.config_label(mx.flatten_params({"guest": ("debian-i386", "ssh"), "vcpus": 2})) == "debian-i386-ssh vcpus=2"
    assert mx.config_label({}) == "default"


def _cells() -> list[mx.Cell]:
    return [
        mx.Cell("s/test_boot.py::a[x86_64]", {"arch": "x86_64"}, frozenset({"smoke"})),
        mx.Cell("s/test_boot.py::a[i386]", {"arch": "i386"}, frozenset({"smoke"})),
        mx.Cell("s/test_boot.py::b[i386]", {"arch": "i386"}, frozenset({"nightly"})),
        mx.Cell("s/test_boot.py::c", {}, frozenset()),
        mx.Cell("s/test_nested.py::d[x86_64]", {"arch": "x86_64"}, frozenset()),
        mx.Cell("s/test_nested.py::d[i386]", {"arch": "i386"}, frozenset({"smoke"})),
    ]


@pytest.mark.parametrize(("tier", "expected"), [
    ("smoke", ["s/test_boot.py::a[x86_64]", "s/test_boot.py::a[i386]"]),
    # nightly: its markers, plus the include of every level-2 cell; the i386 L2 is excluded in every tier.
    ("nightly", ["s/test_boot.py::a[x86_64]", "s/test_boot.py::a[i386]", "s/test_boot.py::b[i386]",
                 "s/test_nested.py::d[x86_64]"]),
    ("full", ["s/test_boot.py::a[x86_64]", "s/test_boot.py::a[i386]", "s/test_boot.py::b[i386]", "s/test_boot.py::c",
              "s/test_nested.py::d[x86_64]"]),
])
def test_tiers_include_and_exclude(tier: str, expected: list[str]) -> None:
    sel = mx.select(mx.parse_matrix(MINI, "mini.toml"), _cells(), tier)
    assert [c.nodeid for c, _ in sel.selected] == expected
    why = dict((c.nodeid, w) for c, w in sel.deselected)
    assert why["s/test_nested.py::d[i386]"] == "matrix exclude[0]: 32-bit L2 aborts L0"


def test_exclude_limited_to_a_tier() -> None:
    text = MINI.replace('reason = "32-bit L2 aborts L0"', 'reason = "nightly only"\ntiers = ["nightly"]')
    m = mx.parse_matrix(text, "mini.toml")
    assert "s/test_nested.py::d[i386]" in [c.nodeid for c, _ in mx.select(m, _cells(), "full").selected]
    assert "s/test_nested.py::d[i386]" not in [c.nodeid for c, _ in mx.select(m, _cells(), "nightly").selected]


@pytest.mark.parametrize("count", [1, 2, 3, 7, 40])
def test_every_cell_in_exactly_one_shard(count: int) -> None:
    cells = [mx.Cell(f"s/test_{i % 5}.py::t[{i}]", group=("s/test_4.py" if i % 5 == 4 else "")) for i in range(37)]
    parts = mx.shard(cells, count)
    assert len(parts) == count
    flat = [c.nodeid for part in parts for c in part]
    assert sorted(flat) == sorted(c.nodeid for c in cells) and len(flat) == len(set(flat))
    # Deterministic, whatever order the cells come in; a group stays in one shard.
    again = mx.shard(list(reversed(cells)), count)
    assert sorted(sorted(c.nodeid for c in p) for p in parts) == sorted(sorted(c.nodeid for c in p) for p in again)
    owners = {i for i, p in enumerate(parts) for c in p if c.group == "s/test_4.py"}
    assert len(owners) == 1
    sizes = [len(p) for p in parts]
    if count <= 3:  # balanced up to the one group of 7
        assert max(sizes) - min(sizes) <= 7


@pytest.mark.parametrize("text", ["1", "0/3", "4/3", "a/b", "1/0", "1/2/3"])
def test_bad_shard_spec(text: str) -> None:
    with pytest.raises(UsageError, match="--shard"):
        mx.parse_shard(text)


@pytest.mark.parametrize(("edit", "key", "reason"), [
    (lambda t: t.replace("version = 1", "version = 2"), "version", "expected 1"),
    (lambda t: "colour = 'red'\n" + t, "colour", "unknown key"),
    (lambda t: t.replace('default = "serial"', 'default = "serial"\nvalue = 3'), "axes.transport.value", "unknown key"),
    (lambda t: t.replace('params = ["via"]', 'params = "via"'), "axes.transport.params", "list of strings"),
    (lambda t: t.replace('default = "x86_64"', 'default = "arm"'), "axes.arch.default", "not one of"),
    (lambda t: t.replace("shards = 3", "shards = 0"), "tiers.nightly.shards", "positive integer"),
    (lambda t: t.replace("shards = 3", 'shards = "3"'), "tiers.nightly.shards", "positive integer"),
    (lambda t: t.replace('arch = "i386"', 'arch = "sparc"'), "exclude[0].arch", "not one of"),
    (lambda t: t.replace('arch = "i386"', 'cpu = "host"'), "exclude[0].cpu", "unknown key"),
    (lambda t: t.replace('reason = "32-bit L2 aborts L0"\n', ""), "exclude[0].reason", "missing"),
    (lambda t: t.replace('tiers = ["nightly"]', 'tiers = ["weekly"]'), "include[0].tiers", "unknown tier"),
    (lambda t: t.replace('markers = ["smoke"]', "all = 1"), "tiers.smoke.all", "true or false"),
    (lambda t: t.replace("[[include]]\ntiers", "[include]\ntiers"), "include", "array of tables"),
    (lambda t: t + "\n[[exclude]]\nreason = 'x'\n", "exclude[1]", "no condition"),
    (lambda t: t.replace("[axes.arch]", "[axes.arch\n"), "-", "not valid TOML"),
])
def test_bad_matrix_is_one_line_with_file_key_reason(edit, key: str, reason: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(mx.MatrixError) as info:
        mx.parse_matrix(edit(MINI), "bad.toml")
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith(f"bad.toml: {key}: "), msg
    assert reason in msg


def test_github_matrix_and_unknown_tier() -> None:
    m = mx.parse_matrix(MINI, "mini.toml")
    gh = mx.github_matrix(m, "nightly")
    assert [e["shard"] for e in gh["include"]] == ["1/3", "2/3", "3/3"]
    assert mx.github_matrix(m, "nightly", 2)["include"][-1] == {"tier": "nightly", "shard": "2/2", "index": 2, "total": 2}
    with pytest.raises(UsageError, match="no tier 'weekly'"):
        m.tier("weekly")


# --- the collection hook, black-box --------------------------------------------------------

SCENARIO = """
import pytest

@pytest.fixture(scope="module")
def l1():
    return "shared"

@pytest.mark.smoke
@pytest.mark.parametrize("arch", ["x86_64", "i386"])
@pytest.mark.parametrize("via", ["serial", "ssh"])
def test_boot(arch, via):
    pass

@pytest.mark.nightly
@pytest.mark.parametrize("arch", ["x86_64", "i386"])
def test_more(arch):
    pass

def test_full_only():
    pass
"""

NESTED = """
import pytest

@pytest.fixture(scope="module")
def l1():
    return "shared"

@pytest.mark.smoke
@pytest.mark.parametrize("arch", ["x86_64", "i386"])
def test_l2(l1, arch):
    pass

@pytest.mark.nightly
def test_l2_again(l1):
    pass
"""


def _selected(result: pytest.RunResult) -> list[str]:
    return sorted(line.strip() for line in result.outlines if "::" in line and not line.startswith(" "))


@pytest.fixture
def scenario_dir(pytester: pytest.Pytester) -> Path:
    # The fake scenarios are run in a subprocess: this worker may have imported tests/test_boot.py,
    # and an in-process run would take that module for the fake test_boot.py.
    pytester.makepyfile(test_boot=SCENARIO, test_nested=NESTED)
    (pytester.path / "matrix.toml").write_text(MINI)
    return pytester.path


def test_collection_hook_selects_tier_and_deselects_exclusions(pytester: pytest.Pytester, scenario_dir: Path) -> None:
    result = pytester.runpytest_subprocess("--collect-only", "-q", "--nestbed-matrix", "matrix.toml", "--nestbed-tier", "smoke")
    got = _selected(result)
    assert "test_nested.py::test_l2[i386]" not in got  # excluded: i386 at level 2
    assert got == sorted(["test_boot.py::test_boot[serial-x86_64]", "test_boot.py::test_boot[serial-i386]",
                          "test_boot.py::test_boot[ssh-x86_64]", "test_boot.py::test_boot[ssh-i386]",
                          "test_nested.py::test_l2[x86_64]"])
    full = _selected(pytester.runpytest_subprocess("--collect-only", "-q", "--nestbed-matrix", "matrix.toml", "--nestbed-tier",
                                        "full"))
    assert "test_boot.py::test_full_only" in full and len(full) == 9


def test_shards_partition_the_tier_and_keep_module_scoped_groups(pytester: pytest.Pytester, scenario_dir: Path) -> None:
    base = ["--collect-only", "-q", "--nestbed-matrix", "matrix.toml", "--nestbed-tier", "full"]
    whole = _selected(pytester.runpytest_subprocess(*base))
    parts = [_selected(pytester.runpytest_subprocess(*base, "--nestbed-shard", f"{i}/3")) for i in (1, 2, 3)]
    flat = [n for p in parts for n in p]
    assert sorted(flat) == whole and len(flat) == len(set(flat))
    nested_owners = [i for i, p in enumerate(parts) if any(n.startswith("test_nested.py") for n in p)]
    assert len(nested_owners) == 1  # the module-scoped l1 is booted once
    # The same command gives the same shard.
    assert _selected(pytester.runpytest_subprocess(*base, "--nestbed-shard", "2/3")) == parts[1]


def test_bad_matrix_or_shard_is_a_usage_error(pytester: pytest.Pytester, scenario_dir: Path) -> None:
    (pytester.path / "bad.toml").write_text(MINI.replace("version = 1", "version = 1\nspeed = 'fast'"))
    result = pytester.runpytest_subprocess("--collect-only", "--nestbed-matrix", "bad.toml")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*bad.toml: speed: unknown key*"])
    result = pytester.runpytest_subprocess("--collect-only", "--nestbed-shard", "5/4")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--shard '5/4': need 1 <= I <= N*"])
    result = pytester.runpytest_subprocess("--collect-only", "--nestbed-tier", "smoke")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--nestbed-tier needs a matrix*"])


# --- the CLI and the nightly workflow ------------------------------------------------------

def test_cli_matrix_github_and_errors(tmp_path: Path) -> None:
    r = nestbed("matrix", "--tier", "nightly", "--format", "github", timeout=60)
    assert r.returncode == 0, r.stderr
    m = mx.load_matrix(REPO / "scenarios" / "matrix.toml")
    assert json.loads(r.stdout) == mx.github_matrix(m, "nightly")
    bad = tmp_path / "m.toml"
    bad.write_text("version = 1\n[axes.arch]\nparams = 3\n")
    r = nestbed("matrix", "--tier", "nightly", "--format", "github", "--matrix", str(bad), timeout=60)
    assert r.returncode == 125
    assert r.stderr.strip() == f"nestbed: error: {bad}: axes.arch.params: expected a list of strings, got int 3"


def test_cli_matrix_github_needs_only_the_standard_library() -> None:
    # CI's plan job runs it with the system python3, before any `make setup`: -S hides site-packages.
    r = subprocess.run([sys.executable, "-S", "-m", "harness", "matrix", "--tier", "nightly", "--format", "github"],
                       cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["include"][0]["shard"].startswith("1/")


def test_cli_matrix_json_lists_every_cell_once() -> None:
    r = nestbed("matrix", "--tier", "nightly", "--shards", "3", timeout=300)
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    nodeids = [c["nodeid"] for s in data["shards"] for c in s["cells"]]
    assert len(nodeids) == len(set(nodeids)) == data["cells"] > 0
    assert [s["shard"] for s in data["shards"]] == ["1/3", "2/3", "3/3"]
    assert all(set(c["coords"]) >= {"arch", "level", "transport"} for s in data["shards"] for c in s["cells"])


def test_nightly_workflow_runs_the_matrix_shards() -> None:
    import yaml  # pyyaml: the test extra, which setup installs
    wf = yaml.safe_load((REPO / ".github/workflows/nightly.yml").read_text())
    on = wf.get("on", wf.get(True))  # YAML 1.1 reads a bare `on` as true
    assert "schedule" in on
    jobs = wf["jobs"]
    plan_cmds = " ".join(s.get("run", "") for s in jobs["plan"]["steps"])
    assert "python3 -m harness matrix --tier \"$TIER\" --format github" in plan_cmds and wf["env"]["TIER"] == "nightly"
    shard = jobs["shard"]
    assert shard["strategy"]["matrix"] == "${{ fromJSON(needs.plan.outputs.matrix) }}"
    assert shard["strategy"]["fail-fast"] is False
    steps = shard["steps"]
    runs = [s.get("run", "") for s in steps]
    assert any("make setup" in r for r in runs)
    run_step = next(r for r in runs if "nestbed report" in r)
    assert "--shard ${{ matrix.shard }}" in run_step and "--tier ${{ matrix.tier }}" in run_step
    assert any(s.get("uses", "").startswith("actions/checkout@") for s in steps)
    upload = next(s for s in steps if s.get("uses", "").startswith("actions/upload-artifact@"))
    assert upload["if"] == "always()"
    # Every matrix.<key> the workflow uses exists in every entry `nestbed matrix --format github` prints.
    import re

    text = (REPO / ".github/workflows/nightly.yml").read_text()
    used = set(re.findall(r"\$\{\{\s*matrix\.(\w+)", text))
    entries = mx.github_matrix(mx.load_matrix(REPO / "scenarios" / "matrix.toml"), "nightly")["include"]
    assert used and all(used <= set(e) for e in entries)
    merge = jobs["merge"]
    merge_runs = " ".join(s.get("run", "") for s in merge["steps"])
    assert "nestbed report merge --skip-missing shards/* -o fleet" in merge_runs
    assert "nestbed report diff previous fleet" in merge_runs
    assert merge["if"] == "always()" and merge["needs"] == "shard"
    prev = next(s for s in merge["steps"] if s.get("uses", "").startswith("actions/download-artifact@")
                and s.get("with", {}).get("name") == "fleet-report")
    assert prev["with"]["run-id"] == "${{ steps.previous.outputs.run_id }}"


def test_matrix_docs_mention_every_axis() -> None:
    doc = (REPO / "docs" / "reports.md").read_text()
    for axis in mx.load_matrix(REPO / "scenarios" / "matrix.toml").axes:
        assert f"`{axis}`" in doc, axis
    assert textwrap.dedent("nestbed matrix --tier") in doc


# -- declared skips and expected failures ([[expect]], strict tiers) ----------------------------------

EXPECT = MINI.replace('[tiers.smoke]\nmarkers = ["smoke"]', '[tiers.smoke]\nmarkers = ["smoke"]\nstrict = true') + """
[[expect]]
match = "*test_k.py::*"
outcome = "skip"
host = "kvm"
until = 2027-01-31
reason = "needs nested KVM, off on this fleet's KVM hosts"
"""


@pytest.mark.parametrize(("edit", "key", "reason"), [
    (lambda t: t.replace('outcome = "skip"', 'outcome = "fail"'), "expect[0].outcome", "expected one of"),
    (lambda t: t.replace('reason = "needs nested KVM, off on this fleet\'s KVM hosts"', ""), "expect[0].reason", "missing"),
    (lambda t: t.replace("until = 2027-01-31", 'until = "soon"'), "expect[0].until", "a date like"),
    (lambda t: t.replace('host = "kvm"', 'host = "xen"'), "expect[0].host", "expected one of"),
    (lambda t: t.replace("strict = true", "strict = 1"), "tiers.smoke.strict", "true or false"),
])
def test_bad_expect_rule_is_one_line(edit, key: str, reason: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(mx.MatrixError) as info:
        mx.parse_matrix(edit(EXPECT), "bad.toml")
    assert str(info.value).startswith(f"bad.toml: {key}: ") and reason in str(info.value), str(info.value)


def test_declared_skips_by_host_kind_and_date() -> None:
    import datetime

    m = mx.parse_matrix(EXPECT, "m.toml")
    assert m.tier("smoke").strict and not m.tier("nightly").strict
    day = datetime.date(2026, 12, 1)
    coords: dict[str, str | None] = {"arch": "x86_64", "level": "1", "transport": "serial"}
    ok = mx.declared(m, "s/test_k.py::test_a", coords, "skip", tier="smoke", host="kvm", today=day)
    assert ok.rule is not None and "needs nested KVM" in ok.why
    # Another host kind, another outcome, another cell: not declared.
    assert mx.declared(m, "s/test_k.py::test_a", coords, "skip", tier="smoke", host="tcg", today=day).rule is None
    assert mx.declared(m, "s/test_k.py::test_a", coords, "xfail", tier="smoke", host="kvm", today=day).rule is None
    assert mx.declared(m, "s/test_b.py::test_a", coords, "skip", tier="smoke", host="kvm", today=day).rule is None
    lapsed = mx.declared(m, "s/test_k.py::test_a", coords, "skip", tier="smoke", host="kvm",
                         today=datetime.date(2027, 2, 1))
    assert lapsed.rule is None and "lapsed on 2027-01-31" in lapsed.why


STRICT_SCENARIOS = '''
import pytest

@pytest.mark.smoke
def test_passes():
    pass

@pytest.mark.smoke
def test_skips_undeclared():
    pytest.skip("the probe said TCG")

@pytest.mark.smoke
@pytest.mark.xfail(reason="known bug 42", strict=True)
def test_xfails_undeclared():
    assert False

@pytest.mark.smoke
def test_skips_declared():
    pytest.skip("no OVMF on this host kind")
'''


def test_an_undeclared_skip_or_xfail_fails_a_strict_tier(pytester: pytest.Pytester) -> None:
    matrix = MINI.replace('[tiers.smoke]\nmarkers = ["smoke"]', '[tiers.smoke]\nmarkers = ["smoke"]\nstrict = true')
    matrix += '\n[[expect]]\nmatch = "*test_skips_declared*"\noutcome = "skip"\nreason = "no OVMF here"\n'
    pytester.makefile(".toml", matrix=matrix)
    pytester.makepyfile(test_strict=STRICT_SCENARIOS)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-rA", "--nestbed-matrix", "matrix.toml",
                                           "--nestbed-tier", "smoke")
    result.assert_outcomes(passed=1, failed=2, skipped=1)
    out = result.stdout.str()
    assert "undeclared skip in the strict tier 'smoke': the probe said TCG" in out
    assert "undeclared xfail in the strict tier 'smoke': known bug 42" in out
    # The same run in a tier that is not strict: skips and xfails stand.
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--nestbed-matrix", "matrix.toml",
                                           "--nestbed-tier", "nightly")
    result.assert_outcomes(passed=1, skipped=2, xfailed=1)
