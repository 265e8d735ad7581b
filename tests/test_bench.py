"""nestbed bench: selection and rendering (pure; no benchmark runs here), and the shape of
measure_hops on one small image (qemu-img only, no guests)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from harness.errors import UsageError
from harness.tools import bench


def test_slow_benchmarks_run_only_when_named_or_asked_for() -> None:
    default = bench.select(None)
    assert {"reset", "hops", "virtme-ng"} <= set(default)
    assert not {"smoke-tier", "reset-l2"} & set(default)
    assert {"smoke-tier", "reset-l2"} <= set(bench.select(None, slow=True))
    assert bench.select(["smoke-tier"]) == ["smoke-tier"]


def test_unknown_benchmark_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="unknown benchmark.*nope"):
        bench.select(["reset", "nope"])
    with pytest.raises(UsageError, match="at least 5"):
        bench.run_all(runs=3, only=["reset"])


def _results(name: str, r: dict[str, Any]) -> dict[str, Any]:
    return {"date": "2026-11-25T00:00:00Z", "runs": 5, "benchmarks": {name: r},
            "machine": {"hostname": "h", "cpu": "c", "cores": 2, "kernel": "k", "qemu": "7.2"}}


def test_reset_result_renders_its_ratio_target_and_phases() -> None:
    r = bench._ratio("reboot", [10.0] * 5, "reset", [1.0, 1.2, 0.9, 1.1, 1.0], None)
    r.update(reset_loadvm=bench._stats([0.1] * 5), target_seconds=1.5, meets_target=True)
    text = bench.render_markdown(_results("reset", r))
    assert "| reset: reset | 1.00 s | ratio 0.100 | <= 1.5 s (met) |" in text
    assert "| reset: reset_loadvm | 0.10 s |" in text


def test_hops_result_renders_one_row_per_hop() -> None:
    hop = {"hop": "vmdk", "from": "raw", "bare": bench._stats([1.0] * 5), "nestbed": bench._stats([1.02] * 5),
           "ratio": 1.02, "meets_target": True, "verify": bench._stats([0.5] * 5)}
    text = bench.render_text(_results("hops", {"hops": [hop, {**hop, "hop": "raw", "from": "vmdk"}],
                                               "target": 1.05, "meets_target": True}))
    assert "hops: raw -> vmdk" in text and "hops: vmdk -> raw" in text
    assert "bare 1.00 s, ratio 1.020" in text


HOP_KEYS = {"hop", "from", "bare", "nestbed", "ratio", "ratio_of", "meets_target", "bare_cpu", "nestbed_cpu",
            "cpu_ratio", "verify"}


def test_measure_hops_shape(tmp_path: Path) -> None:
    source = tmp_path / "small.raw"
    source.write_bytes(os.urandom(1 << 20))
    os.truncate(source, 8 << 20)
    r = bench.measure_hops(source, "vmdk,raw", runs=5, workdir=tmp_path)
    assert [h["hop"] for h in r["hops"]] == ["vmdk", "raw"] and r["runs"] == 5 and r["target"] == 1.05
    assert set(r) == {"source", "source_format", "virtual_size", "runs", "target", "hops", "meets_target"}
    for h in r["hops"]:
        assert set(h) == HOP_KEYS and h["ratio_of"] == "nestbed/bare"
        assert len(h["bare"]["samples"]) == len(h["nestbed"]["samples"]) == len(h["verify"]["samples"]) == 5
        assert h["ratio"] == round(h["nestbed"]["median"] / h["bare"]["median"], 3)
        assert h["meets_target"] == (h["ratio"] <= 1.05)
    assert "hops: raw -> vmdk" in bench.render_text(_results("hops", r))
    with pytest.raises(UsageError, match="at least 5"):
        bench.measure_hops(source, "raw", runs=3)


def test_bench_help_names_every_benchmark(monkeypatch: pytest.MonkeyPatch) -> None:
    from harness.cli import build_parser

    monkeypatch.setenv("COLUMNS", "2000")  # no line wrapping inside a name
    from harness.tools.bench import BENCHMARKS

    sub = next(a for a in build_parser()._actions if getattr(a, "choices", None) and "bench" in a.choices)
    text = sub.choices["bench"].format_help().replace("\n", " ")
    text = " ".join(text.split())
    missing = [n for n in BENCHMARKS if n not in text]
    assert not missing, f"nestbed bench --help does not name {missing}"
