"""Disk-format round trips: every hop of a chain verified by qemu-img and an independent reader."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from harness import diskfmt


@pytest.mark.smoke
def test_true_round_trip_raw_vmdk_vhd_vhdx_qcow2_raw(tmp_path: Path) -> None:
    src = tmp_path / "src.raw"
    with open(src, "wb") as f:
        f.write(os.urandom(8 << 20))
        f.truncate(64 << 20)
    result = diskfmt.run_chain(src, diskfmt.parse_chain("vmdk,vpc:force_size=on,vhdx,qcow2,raw"), tmp_path)
    for hop in result["hops"]:
        assert hop["compare"] == "identical", hop
        assert hop["check"] in ("ok", "unsupported"), hop
        assert hop["reader_hash_matches"] in (True, None), hop
    assert result["hops"][-1]["virtual_size"] == 64 << 20
