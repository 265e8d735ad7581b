# nestbed: the two commands a newcomer runs are `make report` and `make test`.
PY := .venv/bin/python
PYTEST_ARGS ?=

.PHONY: setup test lint unit report bench clean

setup:
	@scripts/setup

lint: setup
	.venv/bin/ruff check harness fixtures scenarios tests
	.venv/bin/mypy

# The project's own tests: unit, plugin and a lean set of real boots.
# An emulated L1 now and then resets under an L2 (RELIABILITY.md): a test that saw exactly that gets one
# more run on a fresh L1; any other failure fails at once.
NESTED_RERUN := --reruns 1 --only-rerun "level 1 died" --only-rerun "l1-host@L1: connection is closed"
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
