"""Soak the nested path: boot L2 guests one after another inside one L1 and count failures.

Used to compare how the L1 is run on L0's TCG (``--tcg-threads single`` vs ``multi``) for the
nested flakes in RELIABILITY.md.  Each round boots a Debian L2 under the L1's KVM, checks
kvm-clock, reads dmesg and hashes 16 MiB inside the guest, then powers it off.  A dead L1 is
replaced and counted.  One JSON line per round on stdout; a summary line at the end.

    .venv/bin/python bench/l2_soak.py --tcg-threads single --minutes 40 --via serial
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from harness.errors import HarnessError
from harness.guest import BootOptions
from harness.nested import boot_l1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tcg-threads", choices=["single", "multi"], default="multi")
    ap.add_argument("--vcpus", type=int, default=None, help="L1 vCPUs (default: the recipe's)")
    ap.add_argument("--l2-vcpus", type=int, default=None, help="L2 vCPUs (default: the recipe's)")
    ap.add_argument("--minutes", type=float, default=30.0, help="stop starting rounds after this long")
    ap.add_argument("--via", choices=["serial", "ssh"], default="serial")
    ap.add_argument("--image", default="debian-x86_64")
    a = ap.parse_args(argv)
    extra: dict[str, Any] = {"tcg_threads": a.tcg_threads}
    if a.vcpus is not None:
        extra["vcpus"] = a.vcpus
    end = time.monotonic() + a.minutes * 60
    rounds = fails = l1_deaths = 0
    while time.monotonic() < end:
        try:
            with boot_l1([a.image], extra_options=extra) as l1:
                while time.monotonic() < end:
                    rounds += 1
                    t0 = time.monotonic()
                    rec: dict[str, Any] = {"round": rounds, "threads": a.tcg_threads, "vcpus": a.vcpus,
                                           "l2_vcpus": a.l2_vcpus}
                    try:
                        opts = BootOptions(vcpus=a.l2_vcpus) if a.l2_vcpus else None
                        with l1.inner(a.image, via=a.via, options=opts) as g:
                            rec["ready_s"] = round(time.monotonic() - t0, 1)
                            assert g.check_output("cat /sys/devices/system/clocksource/clocksource0/"
                                                  "current_clocksource") == "kvm-clock"
                            assert "Hypervisor detected: KVM" in g.check_output("dmesg")
                            g.check_output("head -c 16M /dev/urandom | sha256sum")
                        rec["ok"] = True
                    except (HarnessError, AssertionError) as exc:
                        fails += 1
                        rec.update(ok=False, error=str(exc).splitlines()[0][:300])
                        if l1.guest.machine.poll() is not None:
                            l1_deaths += 1
                            rec["l1_died"] = True
                    rec["s"] = round(time.monotonic() - t0, 1)
                    print(json.dumps(rec), flush=True)
                    if rec.get("l1_died"):
                        break
        except HarnessError as exc:  # the L1 itself failed to boot or died outside a round
            l1_deaths += 1
            print(json.dumps({"l1_error": str(exc).splitlines()[0][:300]}), flush=True)
    print(json.dumps({"summary": True, "threads": a.tcg_threads, "rounds": rounds, "fails": fails,
                      "l1_deaths": l1_deaths}), flush=True)
    return 0 if fails == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
