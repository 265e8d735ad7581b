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
test: setup lint
	$(PY) -m pytest tests -n 2 --dist loadscope -m "not slow" $(PYTEST_ARGS)

# Fast tests only (no QEMU).
unit: setup
	$(PY) -m pytest tests -m "not boot" $(PYTEST_ARGS)

# The main job: until the report lands, the smoke scenarios (serial log paths of failures in the output).
report: setup
	$(PY) -m pytest scenarios -m smoke -p no:cacheprovider -v $(PYTEST_ARGS)

bench: setup
	.venv/bin/nestbed bench --write BENCHMARKS.md

clean:
	rm -rf .venv .pytest_cache .mypy_cache .ruff_cache
