"""Cache artifacts are built once, under a lock, and published atomically.

The unit half drives :func:`harness.core.publish.publish` directly (files, directories, failures,
discards, stale debris, racing processes); the boot half starts several processes on an empty
cache that all need the same image, payload disk and probe verdict, as xdist workers do on a
newcomer's first ``make report``, and checks that all succeed and each artifact was built once.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import pytest
from conftest import REPO

from harness.core import paths, publish
from harness.errors import CacheError


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    paths.set_cache_dir(tmp_path / "cache")
    yield paths.cache_root()
    paths.set_cache_dir(None)


def _write(text: str):
    def make(tmp: Path) -> None:
        tmp.write_text(text)
    return make


def test_built_once_then_a_hit(cache: Path) -> None:
    target = cache / "a.txt"
    assert publish.publish(target, _write("one"), what="a")
    assert not publish.publish(target, _write("two"), what="a")
    assert target.read_text() == "one"
    assert [e["what"] for e in publish.journal()] == ["a"]


def test_a_failed_builder_publishes_nothing_and_leaves_nothing(cache: Path) -> None:
    target = cache / "a.txt"

    def boom(tmp: Path) -> None:
        tmp.write_text("half")
        raise RuntimeError("builder died")

    with pytest.raises(RuntimeError, match="builder died"):
        publish.publish(target, boom, what="a")
    assert not target.exists()
    assert [p.name for p in cache.iterdir() if not p.name.endswith(".lock")] == []
    assert publish.journal() == []


def test_a_directory_is_published_whole_and_force_replaces_it(cache: Path) -> None:
    target = cache / "d"

    def make(n: int):
        def build(tmp: Path) -> None:
            tmp.mkdir()
            (tmp / "f").write_text(str(n))
        return build

    assert publish.publish(target, make(1), what="d")
    assert publish.publish(target, make(2), what="d", force=True)
    assert (target / "f").read_text() == "2"
    assert sorted(p.name for p in cache.iterdir()) == [".d.lock", "d", publish.JOURNAL]


def test_discard_keeps_nothing(cache: Path) -> None:
    target = cache / "verdict.json"

    def flaky(tmp: Path) -> object:
        tmp.write_text("{}")
        return publish.DISCARD

    assert not publish.publish(target, flaky, what="verdict")
    assert not target.exists() and not list(cache.glob("*.part"))


def test_debris_of_a_dead_builder_is_swept(cache: Path) -> None:
    target = cache / "a.img"
    dead = cache / ".a.img.99999-deadbeef.part"
    dead.mkdir()
    stage = publish.scratch_name(dead, "stage")  # a dead builder's staging directory
    stage.mkdir()
    publish.publish(target, _write("x"), what="a")
    assert not dead.exists() and not stage.exists() and target.read_text() == "x"


def test_a_builder_that_writes_nothing_is_an_error(cache: Path) -> None:
    with pytest.raises(CacheError, match="wrote nothing"):
        publish.publish(cache / "a", lambda tmp: None, what="a")


def test_a_held_lock_times_out_with_one_line(cache: Path) -> None:
    target = cache / "a"
    with publish.lock_for(target):
        proc = subprocess.run([sys.executable, "-c", textwrap.dedent(f"""
            from pathlib import Path
            from harness.core import paths
            from harness.core import publish
            paths.set_cache_dir({str(cache)!r})
            publish.publish(Path({str(target)!r}), lambda t: t.write_text("x"), what="thing", timeout=0.5)
            """)], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert proc.returncode == 1
    assert "CacheError: thing: another process held the lock on" in proc.stderr


def test_write_atomic_keeps_mode(cache: Path) -> None:
    p = cache / "key"
    publish.write_atomic(p, b"secret", mode=0o600)
    assert p.read_bytes() == b"secret" and (p.stat().st_mode & 0o777) == 0o600


RACER = """
import sys, time
from pathlib import Path
from harness.core import paths
from harness.core import publish
paths.set_cache_dir(sys.argv[1])
def slow(tmp):
    tmp.mkdir()
    for i in range(20):
        (tmp / f"part{i}").write_text(str(i))
        time.sleep(0.01)
built = publish.publish(Path(sys.argv[1]) / "artifact", slow, what="artifact")
print(built, len(list((Path(sys.argv[1]) / "artifact").iterdir())))
"""


def test_racing_processes_build_once_and_all_see_it_whole(cache: Path) -> None:
    procs = [subprocess.Popen([sys.executable, "-c", RACER, str(cache)], stdout=subprocess.PIPE, text=True, cwd=REPO)
             for _ in range(6)]
    outs = [p.communicate(timeout=120)[0].split() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert sorted(o[0] for o in outs) == ["False"] * 5 + ["True"]
    assert {o[1] for o in outs} == {"20"}, "a process saw a half-built directory"
    assert len(publish.journal()) == 1


# -- the real artifacts, racing on an empty cache ---------------------------------------------------

COLD_START = """
import json, sys
from harness.images import store as images
from harness import nested
from harness.core import paths
from harness.guest import probe_host
paths.set_cache_dir(sys.argv[1])
img = images.build("tiny-x86_64", progress=lambda _m: None)
disk = nested.payload_disk([img])
verdict = probe_host()
print(json.dumps({"image": str(img.dir), "payload": str(disk), "size": disk.stat().st_size,
                  "accel": verdict["accel"]["x86_64"]["chosen"]}))
"""


@pytest.mark.boot
def test_workers_racing_on_an_empty_cache_build_each_artifact_once(tmp_path: Path) -> None:
    cache = tmp_path / "cold-cache"
    procs = [subprocess.Popen([sys.executable, "-c", COLD_START, str(cache)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1"})
             for _ in range(3)]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=1500)
        assert p.returncode == 0, err[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert len({json.dumps(r, sort_keys=True) for r in results}) == 1, results  # all saw the same artifacts
    paths.set_cache_dir(cache)
    try:
        built = Counter(str(e["what"]) for e in publish.journal())
    finally:
        paths.set_cache_dir(None)
    for what in ("image tiny-x86_64", "payload disk (tiny-x86_64)", "probe verdict"):
        assert built[what] == 1, built
    assert all(n == 1 for n in built.values()), f"an artifact was built more than once: {built}"
    assert not list(cache.rglob("*.part")), "a private build name was left behind"
