"""The parsers users feed, fuzzed: recipes (and their ``base`` chains), matrix files, report.json/fleet.json.

Whatever the input, each parser either accepts it or raises its own one-line error (RecipeError,
MatrixError, ReportError): never another exception, never a hang, never a write outside its directory.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harness.errors import RecipeError
from harness.images import recipes
from harness.reports import matrix as mx
from harness.reports import model as rp

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def toml_value(v: Any) -> str:
    """A TOML literal for *v* (strings as JSON strings, which TOML's basic strings accept)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf") if math.isinf(v) else repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(v)


scalars = st.one_of(st.booleans(), st.integers(-2**70, 2**70), st.floats(), st.text(max_size=30),
                    st.sampled_from(["tiny", "debian", "x86_64", "i386", "linux-image-cloud-amd64", "bookworm",
                                     "fast", "systemd", "2G", "512M", "/etc/x", "../etc", "tiny-x86_64"]))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(st.text(max_size=12), inner, max_size=3)),
                      max_leaves=8)
recipe_keys = st.sampled_from([*recipes.SETTINGS, "colour", "Kind", ""])


def _toml(doc: dict[str, Any]) -> str:
    return "".join(f"{json.dumps(k)} = {toml_value(v)}\n" for k, v in doc.items())


@pytest.fixture
def recipe_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    d = tmp_path / "recipes"
    d.mkdir()
    monkeypatch.setenv("NESTBED_IMAGES", str(d))
    return d


def _no_writes_outside(root: Path, before: set[Path]) -> None:
    new = set(root.parent.rglob("*")) - before
    assert not new, f"a parser wrote {sorted(new)}"


@FUZZ
@given(doc=st.dictionaries(recipe_keys, values, max_size=8), raw=st.binary(max_size=64))
def test_any_recipe_is_parsed_or_refused_in_one_line(recipe_dir: Path, doc: dict[str, Any], raw: bytes) -> None:
    before = set(recipe_dir.parent.rglob("*"))
    for i, blob in enumerate((_toml(doc).encode(), raw, _toml(doc).encode() + raw)):
        path = recipe_dir / f"fuzz{i}.toml"
        path.write_bytes(blob)
        before.add(path)
        try:
            recipes.parse_recipe(path)
        except RecipeError as exc:
            assert "\n" not in str(exc) and str(exc).startswith(str(path)), str(exc)
    _no_writes_outside(recipe_dir, before)


def test_recipe_bases_merge_override_and_refuse_cycles(recipe_dir: Path) -> None:
    (recipe_dir / "mine.toml").write_text('base = "debian-x86_64"\npackages = ["curl"]\nmemory_mb = 700\n'
                                          '[files]\n"/etc/a" = "a"\n')
    (recipe_dir / "mine2.toml").write_text('base = "mine"\npackages = ["jq", "curl"]\n[files]\n"/etc/b" = "b"\n')
    r = recipes.find_recipe("mine2")
    assert r.kind is recipes.Kind.DEBIAN and r.memory_mb == 700 and r.vcpus == 2  # from its bases
    assert r.packages == ("curl", "jq") and r.files == {"/etc/a": "a", "/etc/b": "b"}
    assert r.description.startswith("based on mine: based on debian-x86_64: ")
    # A recipe named like its base bases itself on the next one of that name (here the built-in one).
    (recipe_dir / "tiny-x86_64.toml").write_text('base = "tiny-x86_64"\nmemory_mb = 300\n')
    with pytest.warns(UserWarning, match="shadows the built-in"):
        assert recipes.find_recipe("tiny-x86_64").memory_mb == 300
    (recipe_dir / "a.toml").write_text('base = "b"\n')
    (recipe_dir / "b.toml").write_text('base = "a"\n')
    with pytest.raises(RecipeError, match=r"b\.toml: base: no recipe named 'a' \(other than this one\)"):
        recipes.find_recipe("a")
    (recipe_dir / "c.toml").write_text('base = "nowhere"\n')
    with pytest.raises(RecipeError, match=r"c\.toml: base: no recipe named 'nowhere'"):
        recipes.find_recipe("c")
    (recipe_dir / "d.toml").write_text('base = "../../etc/passwd"\n')
    with pytest.raises(RecipeError, match=r"d\.toml: base: must be a recipe name"):
        recipes.find_recipe("d")


matrix_tables = st.dictionaries(st.sampled_from(["version", "axes", "tiers", "assign", "include", "exclude",
                                                 "expect", "colour"]), values, max_size=6)


@FUZZ
@given(doc=matrix_tables, raw=st.text(max_size=200))
def test_any_matrix_is_parsed_or_refused_in_one_line(doc: dict[str, Any], raw: str) -> None:
    for text in (_toml(doc), raw, "version = 1\n" + _toml(doc)):
        try:
            mx.parse_matrix(text, "fuzz.toml")
        except mx.MatrixError as exc:
            assert "\n" not in str(exc) and str(exc).startswith("fuzz.toml: "), str(exc)


json_values = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False),
                                     st.text(max_size=20)),
                           lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                   st.dictionaries(st.text(max_size=10), inner, max_size=4)),
                           max_leaves=12)
report_docs = st.fixed_dictionaries(
    {}, optional={"schema": st.sampled_from([rp.REPORT_SCHEMA, rp.FLEET_SCHEMA, "x"]),
                  "schema_version": st.sampled_from([rp.SCHEMA_VERSION, 0, "1"]),
                  "cells": json_values, "hosts": json_values, "run": json_values, "host": json_values})


@FUZZ
@given(doc=report_docs, raw=st.binary(max_size=80))
def test_any_report_file_is_loaded_or_refused_in_one_line(tmp_path: Path, doc: dict[str, Any], raw: bytes) -> None:
    for i, blob in enumerate((json.dumps(doc).encode(), raw)):
        path = tmp_path / f"r{i}.json"
        path.write_bytes(blob)
        try:
            loaded = rp.load(path)
        except rp.ReportError as exc:
            assert "\n" not in str(exc) and str(exc).startswith(str(path)), str(exc)
            continue
        assert isinstance(rp.validate(loaded), list)  # a schema check reports problems, it does not raise
    assert set(os.listdir(tmp_path)) == {"r0.json", "r1.json"}  # loading wrote nothing
