"""nestbed as a user gets it: a wheel installed (not editable) into a fresh venv, used from a
directory that is not the repository, with the user's own tests and recipes.

The venv also holds PyPI's ``fixtures`` (testing-cabal), whose import name nestbed must not take.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import REPO

PIP_TIMEOUT = 600


def _run(argv: list[str], *, cwd: Path, timeout: float, env: dict[str, str] | None = None
         ) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
                          env=env)


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with nestbed's wheel and PyPI's ``fixtures`` installed."""
    base = tmp_path_factory.mktemp("installed")
    wheels = base / "wheels"
    built = _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(wheels), str(REPO)],
                 cwd=base, timeout=PIP_TIMEOUT)
    assert built.returncode == 0, built.stderr[-2000:]
    wheel = next(wheels.glob("nestbed-*.whl"))
    env = base / "venv"
    made = _run([sys.executable, "-m", "venv", str(env)], cwd=base, timeout=120)
    assert made.returncode == 0, made.stderr
    inst = _run([str(env / "bin" / "pip"), "install", "-q", "--disable-pip-version-check", str(wheel), "fixtures"],
                cwd=base, timeout=PIP_TIMEOUT)
    assert inst.returncode == 0, inst.stderr[-2000:]
    return env


def _user_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "NESTBED_IMAGES", "VIRTUAL_ENV")}
    return {**env, **extra}


def test_no_generic_top_level_name_and_pypi_fixtures_imports_beside_it(venv: Path, tmp_path: Path) -> None:
    code = textwrap.dedent("""
        import json, importlib.metadata as md
        import fixtures, harness, nestbed_fixtures.plugin
        top = md.distribution("nestbed").read_text("top_level.txt").split()
        print(json.dumps({"fixtures": fixtures.__file__, "has_Fixture": hasattr(fixtures, "Fixture"),
                          "harness": harness.__file__, "plugin": nestbed_fixtures.plugin.__file__, "top": top}))
    """)
    proc = _run([str(venv / "bin" / "python"), "-c", code], cwd=tmp_path, timeout=60, env=_user_env())
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    assert got["has_Fixture"], got  # testing-cabal's fixtures, not nestbed's plugin
    assert "fixtures" not in got["top"], got["top"]
    for key in ("fixtures", "harness", "plugin"):
        assert str(venv) in got[key] and str(REPO) not in got[key], got  # the installed copies


def test_installed_cli_knows_the_builtin_recipes_and_refuses_bad_dirs_in_one_line(venv: Path, tmp_path: Path) -> None:
    nestbed = str(venv / "bin" / "nestbed")
    listed = _run([nestbed, "images", "list", "--json"], cwd=tmp_path, timeout=60, env=_user_env())
    assert listed.returncode == 0, listed.stderr
    names = {i["name"] for i in json.loads(listed.stdout)}
    assert {"tiny-x86_64", "debian-x86_64", "l1-host"} <= names

    missing = _run([nestbed, "images", "list"], cwd=tmp_path, timeout=60,
                   env=_user_env(NESTBED_IMAGES="no-such-dir"))
    assert missing.returncode == 125, missing.stderr
    assert missing.stderr.strip().splitlines() == [
        f"nestbed: error: recipe directory {tmp_path / 'no-such-dir'} (from $NESTBED_IMAGES): does not exist"]

    scen = _run([nestbed, "report", "--scenarios", "nowhere"], cwd=tmp_path, timeout=60, env=_user_env())
    assert scen.returncode == 125
    assert scen.stderr.strip().splitlines()[-1] == "nestbed: error: report: --scenarios nowhere: does not exist"

    # A user's recipe with a built-in name wins, with a warning that says so.
    own = tmp_path / "mine"
    own.mkdir()
    (own / "tiny-x86_64.toml").write_text('base = "tiny-x86_64"\nmemory_mb = 300\n')  # its base: the built-in one
    shadow = _run([nestbed, "images", "list", "--json"], cwd=tmp_path, timeout=60, env=_user_env(NESTBED_IMAGES="mine"))
    assert shadow.returncode == 0, shadow.stderr
    mine = next(i for i in json.loads(shadow.stdout) if i["name"] == "tiny-x86_64")
    assert mine["description"].startswith("based on tiny-x86_64: "), mine
    assert f"recipe 'tiny-x86_64' from {own / 'tiny-x86_64.toml'} (from $NESTBED_IMAGES) shadows the built-in" \
        in shadow.stderr, shadow.stderr


USER_RECIPE = '''
# my project's guest: nestbed's tiny x86_64 guest plus a file of ours
base = "tiny-x86_64"
description = "my project's tiny guest"
memory_mb = 320

[files]
"/etc/myproject/greeting" = "hello from my project\\n"
'''

USER_TESTS = '''
import pytest
from nestbed_fixtures.plugin import guest_params


def test_my_recipe_boots_with_my_file(boot_guest):
    g = boot_guest("my-tiny", via="serial")
    assert g.check_output("cat /etc/myproject/greeting") == "hello from my project"
    assert g.check_output("uname -m") == "x86_64"


@pytest.mark.parametrize("guest", guest_params(["my-tiny"], ["serial"]), indirect=True)
def test_testinfra_sees_it(guest, guest_host):
    assert guest_host.file("/etc/myproject/greeting").contains("my project")
    assert guest.run("sh", "-c", "exit 3").exit_status == 3
'''


@pytest.mark.boot
def test_a_users_project_runs_its_own_recipe_from_the_installed_wheel(venv: Path, tmp_path: Path) -> None:
    project = tmp_path / "myproject"
    (project / "recipes").mkdir(parents=True)
    (project / "tests").mkdir()
    (project / "pytest.ini").write_text("[pytest]\nnestbed_images = recipes\n")
    (project / "recipes" / "my-tiny.toml").write_text(USER_RECIPE)
    (project / "tests" / "test_mine.py").write_text(USER_TESTS)
    proc = _run([str(venv / "bin" / "python"), "-m", "pytest", "-p", "no:cacheprovider", "-q", "tests"],
                cwd=project, timeout=1200, env=_user_env())
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "2 passed" in proc.stdout, proc.stdout[-2000:]
