# nestbed: the two commands a newcomer runs are `make report` and `make test`.
PY := .venv/bin/python
PYTEST_ARGS ?=

.PHONY: setup test lint unit report bench clean

setup:
	@scripts/setup

lint: setup
	.venv/bin/ruff check harness fixtures scenarios tests bench
	.venv/bin/mypy

# The project's own tests: unit, plugin and a lean set of real boots.
# Now and then an emulated L1, or an L2 under its KVM, resets itself (TCG's SVM emulation), and L0's QEMU 7.2
# segfaults in its TCG MMIO dispatch under a multi-vCPU guest (RELIABILITY.md, Known gaps): a test that saw
# exactly one of those gets one more run (on a fresh L1 where one died); any other failure fails at once.
NESTED_RERUN := --reruns 1 --only-rerun "level 1 died" --only-rerun "l1-host@L1: connection is closed" \
	--only-rerun "level [2-9]: QEMU exited unexpectedly \(exit status 0, the guest reset the machine" \
	--only-rerun "level 1: QEMU crashed \(killed by signal 11\)"
test: setup lint
	$(PY) -m pytest tests -n 2 --dist loadscope -m "not slow" $(NESTED_RERUN) $(PYTEST_ARGS)

# Fast tests only (no QEMU).
unit: setup
	$(PY) -m pytest tests -m "not boot" $(PYTEST_ARGS)

# The main job: the smoke tier in parallel, into reports/<UTC timestamp>-<host>/ (report.json, junit.xml,
# index.html, summary.md); prints the path of index.html at the end.  REPORT_ARGS: e.g. "-n 1" or "--tier nightly".
REPORT_ARGS ?=
report: setup
	.venv/bin/nestbed report --tier smoke $(REPORT_ARGS) $(if $(strip $(PYTEST_ARGS)),-- $(PYTEST_ARGS))

bench: setup
	.venv/bin/nestbed bench --write BENCHMARKS.md

clean:
	rm -rf .venv .pytest_cache .mypy_cache .ruff_cache
