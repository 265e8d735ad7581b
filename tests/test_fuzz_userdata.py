"""Fuzz the cloud-init user-data a recipe may carry (harness/images/recipes.py ``user_data``, harness/images/seed.py).

Whatever text or TOML table a user writes, parsing the recipe either accepts it or refuses it in one
``RecipeError`` line naming the file and key; and what it accepts always makes a seed: a ``#cloud-config``
document (JSON, which YAML reads) or a MIME multipart with the recipe's script.  Nothing hangs, nothing
tracebacks, nothing is written outside the test's directory.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harness.errors import RecipeError, UsageError
from harness.images import seed
from harness.images.recipes import parse_recipe

pytest.importorskip("yaml")

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFuzzFuzzFuzzFuzzFuzzFuzzFuzzFuzzFuzzFuzzFuz nestbed-client"
HEAD = 'kind = "disk"\narch = "x86_64"\npath = "disk.qcow2"\n'

yaml_ish = st.text(alphabet=string.printable + "äé—\u2028", max_size=300)
texts = st.one_of(yaml_ish, yaml_ish.map(lambda t: "#cloud-config\n" + t), yaml_ish.map(lambda t: "#!/bin/sh\n" + t),
                  st.sampled_from(["#cloud-config\nwhen: 2001-12-14\n", "#cloud-config\n- a\n- b\n",
                                   "#cloud-config\nruncmd: [[echo, hi]]\n", "#cloud-config\n&a [*a]\n",
                                   "#cloud-config\nusers: null\n", "#cloud-config\n? [a]\n: b\n"]))
scalars = st.one_of(st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=False, allow_infinity=False),
                    st.text(max_size=20), st.dates(), st.datetimes())
keys = st.text(alphabet=string.ascii_letters + "_-", min_size=1, max_size=12)
tables = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(keys, inner, max_size=4)), max_leaves=12)


def _toml_string(text: str) -> str:
    return json.dumps(text)  # a JSON string is a valid TOML basic string for these characters


def _check_seed(recipe_user_data: object) -> None:
    files = seed.contents(name="fuzz", public_key=KEY, extra=recipe_user_data)  # type: ignore[arg-type]
    ud = files["user-data"]
    assert ud.startswith("#cloud-config\n") or "x-shellscript" in ud
    if ud.startswith("#cloud-config\n"):
        doc = json.loads(ud.split("\n", 1)[1])
        assert KEY in json.dumps(doc)  # the harness's key survives whatever the recipe merged in
    assert files["meta-data"].startswith("instance-id: nestbed-")


@settings(max_examples=150, deadline=5000, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=texts)
def test_user_data_text_is_accepted_and_seeded_or_refused_in_one_line(tmp_path: Path, text: str) -> None:
    (tmp_path / "disk.qcow2").write_bytes(b"")
    recipe = tmp_path / "fuzz.toml"
    recipe.write_text(HEAD + f"user_data = {_toml_string(text)}\n", encoding="utf-8")
    before = set(tmp_path.parent.iterdir())
    try:
        r = parse_recipe(recipe)
    except RecipeError as exc:
        assert "\n" not in str(exc) and "user_data" in str(exc) and str(recipe) in str(exc), str(exc)
        return
    try:
        _check_seed(r.user_data)
    except UsageError as exc:
        assert "\n" not in str(exc)
    assert set(tmp_path.parent.iterdir()) == before


@settings(max_examples=150, deadline=5000)
@given(table=st.dictionaries(keys, tables, max_size=5))
def test_user_data_tables_always_make_a_seed(table: dict) -> None:
    _check_seed(table)
